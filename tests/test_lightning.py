"""Lightning training: modules learn, checkpoints resume after a kill, configs validate, export loads."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

from zoo.lightning import config as zcfg  # noqa: E402
from zoo.lightning.data import MovingDigits, NpzDataModule, fit_size, synthetic_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ["model.name=vit_tiny_patch16_224", "model.kwargs.img_size=16", "model.kwargs.patch_size=4",
            "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2"]


def tiny_classify(tmp_path: Path, *extra: str):
    return zcfg.load_config(None, ["task=classify", f"output_dir={tmp_path}", "data.kind=synthetic", "data.image_size=16",
                                   "data.num_classes=4", "data.batch_size=16", "data.length=128", "data.num_workers=0",
                                   "trainer.precision=32-true", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                                   "trainer.log_every_n_steps=1", "loggers=[csv]", "optim.warmup_steps=2",
                                   "optim.lr=3e-3", *TINY_VIT, *extra])


def csv_losses(out: Path, key: str = "train/loss") -> list[float]:
    import csv

    rows = []
    for f in sorted(out.glob("csv/version_*/metrics.csv")):
        with open(f) as fh:
            rows += [float(r[key]) for r in csv.DictReader(fh) if r.get(key)]
    return rows


# ---------------------------------------------------------------- config

def test_config_override_and_validation(tmp_path):
    cfg = zcfg.load_config("classify/vit_mnist.yaml", ["trainer.max_steps=100", "model.name=vit_small_patch16_224", f"output_dir={tmp_path}"])
    assert cfg.trainer.max_steps == 100 and cfg.model.name == "vit_small_patch16_224"
    assert cfg.export == f"{tmp_path}/export/vit_small_patch16_224_mnist.safetensors"  # interpolation sees the override
    with pytest.raises(zcfg.ConfigError, match=r"trainer.devicez.*Did you mean: 'devices'"):
        zcfg.load_config("classify/vit_mnist.yaml", ["trainer.devicez=2"])
    with pytest.raises(zcfg.ConfigError, match=r"trainer.max_steps.*'eight'"):
        zcfg.load_config("classify/vit_mnist.yaml", ["trainer.max_steps=eight"])
    with pytest.raises(zcfg.ConfigError, match=r"data.kind.*'folder' is not one of"):
        zcfg.load_config("classify/vit_mnist.yaml", ["data.kind=folder"])
    with pytest.raises(zcfg.ConfigError, match="task"):
        zcfg.load_config(None, ["model.name=x"])  # task is mandatory
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classify\nmodel: {name: x}\noptimizer: {lr: 1}\n")
    with pytest.raises(zcfg.ConfigError, match="optimizer"):
        zcfg.load_config(bad)


def test_shipped_configs_validate(monkeypatch):
    from zoo.configs import list_configs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the FSDP configs are for GPU hosts: check them here too
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    names = list_configs()
    assert any(n.startswith("classify/") for n in names) and any(n.startswith("diffusion/") for n in names)
    for name in names:
        zcfg.load_config(name)


def test_train_script_rejects_bad_key_in_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "classify/vit_mnist.yaml",
                        "trainer.max_stepz=3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "max_stepz" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- optimisation

def test_no_weight_decay_groups_and_schedule():
    from zoo.lightning.optim import no_weight_decay_names, warmup_cosine

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.attn = nn.Module()
            self.attn.rpb = nn.Parameter(torch.zeros(2, 3, 3))
            self.special = nn.Parameter(torch.zeros(2, 2))
            self.kept = nn.Parameter(torch.zeros(2, 2))

        def no_weight_decay(self):
            return {"special"}

    skip = no_weight_decay_names(Net(), ["rpb"])
    assert skip == {"fc.bias", "norm.weight", "norm.bias", "attn.rpb", "special"}
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# ---------------------------------------------------------------- data

def test_moving_digits_bounce_and_seed():
    digits, labels = synthetic_images(3, 1, 8, 3, seed=0)
    ds = MovingDigits(digits, labels, num_videos=6, frames=12, size=20, digit_size=8, seed=5, mean=[0.0], std=[1.0])
    v, y = ds[2]
    assert v.shape == (1, 12, 20, 20) and 0 <= int(y) < 3
    torch.testing.assert_close(v, ds[2][0])  # a pure function of (seed, index)
    assert not torch.equal(v, MovingDigits(digits, labels, 6, 12, 20, 8, seed=6, mean=[0.0], std=[1.0])[2][0])
    rng = np.random.default_rng(0)
    for _ in range(20):
        path = ds.trajectory(rng)
        assert all(0 <= p <= 12 for yx in path for p in yx)  # the digit never leaves the frame
    mass = v[0].flatten(1).sum(1)
    assert torch.allclose(mass, mass[0].expand_as(mass), rtol=1e-5)  # whole digit in every frame


@pytest.mark.parametrize("margin", [0, 1, 2])
def test_moving_digits_in_a_frame_barely_larger_than_the_digit(margin):
    """Frames of digit_size + 0..2 px: a 3 px step used to bounce past the far border (a crash in the loader)."""
    digits, labels = torch.rand(3, 1, 8, 8), torch.arange(3)
    ds = MovingDigits(digits, labels, num_videos=20, frames=16, size=8 + margin, digit_size=8, seed=0, mean=[0.0], std=[1.0])
    for i in range(len(ds)):
        video, _ = ds[i]
        mass = video[0].flatten(1).sum(1)
        assert torch.allclose(mass, mass[0].expand_as(mass), rtol=1e-5)  # the whole digit in every frame


def test_npz_datamodule(tmp_path):
    images = (np.random.default_rng(0).random((40, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(40) % 10)
    cfg = zcfg.load_config(None, ["task=classify", "model.name=x", f"data.path={tmp_path / 'd.npz'}", "data.val_fraction=0.25",
                                  "data.batch_size=8", "data.num_workers=0", "data.mean=[0.5]", "data.std=[0.5]"])
    dm = NpzDataModule(cfg.data)
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10
    x, y = dm.val_set[0]
    assert x.shape == (1, 32, 32) and int(y) == 30 % 10
    assert torch.all(x[:, :2] == -1.0)  # 28 -> 32 by zero padding, background stays background
    assert torch.allclose(x[:, 2:30, 2:30], torch.from_numpy(images[30]).float()[None] / 255 * 2 - 1)
    assert fit_size(torch.zeros(1, 1, 20, 20), 32).shape[-1] == 32


# ---------------------------------------------------------------- classification

def test_classification_fit_loss_decreases_and_export_roundtrip(tmp_path):
    import zoo
    from zoo.lightning.train import run

    cfg = tiny_classify(tmp_path, "trainer.max_steps=40", "checkpoint.every_n_train_steps=20",
                        f"export={tmp_path / 'export' / 'vit.safetensors'}", "classify.mixup=0.2", "classify.cutmix=0.2")
    result = run(cfg)
    losses = csv_losses(tmp_path)
    assert result["global_step"] == 40 and len(losses) >= 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    saved = zcfg.load_config(tmp_path / "config.yaml")
    assert saved.trainer.max_steps == 40 and saved.output_dir == str(tmp_path)
    assert "val/top1" in result and "val/top5" in result
    # export -> create_model(checkpoint_path=) gives the same network
    from zoo.lightning.classification import ClassificationModule

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = ClassificationModule(**{k: v for k, v in ckpt["hyper_parameters"].items()})
    module.load_state_dict(ckpt["state_dict"])
    import timm

    path = Path(result["export"])
    meta = zoo.weights.read_export_config(path)
    assert meta["pretrained_cfg"]["input_size"] == [1, 16, 16] and meta["pretrained_cfg"]["num_classes"] == 4
    loaded = timm.create_model("vit_tiny_patch16_224", checkpoint_path=str(path), num_classes=4, in_chans=1, img_size=16,
                               patch_size=4, embed_dim=32, depth=2, num_heads=2)
    x = torch.randn(3, 1, 16, 16)
    module.eval(), loaded.eval()
    # the export holds the final weights: the last checkpoint (step 40) equals them
    torch.testing.assert_close(loaded(x), module.model(x))


def test_step_limited_progress_bar_counts_steps_over_epochs(tmp_path):
    """max_steps without max_epochs: the bar shows steps out of max_steps (Lightning printed "Epoch 1/-2")."""
    from zoo.lightning.data import build_datamodule
    from zoo.lightning.train import build_module, build_trainer

    cfg = tiny_classify(tmp_path, "trainer.enable_progress_bar=true", "trainer.max_steps=10",
                        "trainer.limit_val_batches=0")  # 128 samples / 16 = 8 batches per epoch: 10 steps span two epochs
    module = build_module(cfg)
    trainer = build_trainer(cfg, module)
    trainer.fit(module, datamodule=build_datamodule(cfg.data))
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.n, bar.total, bar.desc) == (10, 10, "Epoch 1: ")  # tqdm appends ": "


# ---------------------------------------------------------------- resume after a kill

def test_resume_after_kill(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "classify/vit_mnist.yaml", "task=classify",
           f"output_dir={tmp_path}", "data.kind=synthetic", "data.image_size=16", "data.num_classes=4", "data.batch_size=16",
           "data.length=128", "data.num_workers=0", "trainer.precision=32-true", "trainer.accelerator=cpu",
           "trainer.enable_progress_bar=false", "trainer.val_check_interval=null", "loggers=[csv]", "export=null",
           "checkpoint.every_n_train_steps=5", "data.mean=[0.5]", "data.std=[0.5]", *TINY_VIT]
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd + ["trainer.max_steps=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        step = 0
        while time.time() < deadline and step < 10:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
            if last.is_file():
                try:
                    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
                except Exception:  # caught mid-write
                    step = 0
        assert step >= 10, "no checkpoint within 60 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = torch.load(last, map_location="cpu", weights_only=True)
    s = killed["global_step"]
    assert s % 5 == 0 and killed["optimizer_states"][0]["state"][0]["step"] == s
    r = subprocess.run(cmd + [f"trainer.max_steps={s + 5}"], capture_output=True, text=True, timeout=80)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"Restoring states from the checkpoint path at {last}" in r.stderr + r.stdout or "resumed_from" in r.stdout
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == s + 5  # the step count continued, not restarted
    assert final["optimizer_states"][0]["state"][0]["step"] == s + 5  # so did AdamW's state
    assert final["lr_schedulers"][0]["last_epoch"] == s + 5
    assert "resumed_from" in r.stdout and str(last) in r.stdout


# ---------------------------------------------------------------- diffusion

class TinyDenoiser(nn.Module):
    """A small conditional conv net for testing the module's plumbing (not a zoo generator)."""

    def __init__(self, channels: int = 1, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(num_classes + 1, width)
        self.time = nn.Linear(1, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t, y):
        h = self.inp(x) + (self.embed(y) + self.time(t[:, None].float()))[:, :, None, None]
        return self.out(h)


def _alphas(n: int = 100) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.05, n), 0)


def eps_loss(model, x, y):
    a = _alphas().to(x.device)
    t = torch.randint(0, len(a), (x.shape[0],), device=x.device)
    noise = torch.randn_like(x)
    ab = a[t].view(-1, 1, 1, 1)
    return ((model(ab.sqrt() * x + (1 - ab).sqrt() * noise, t / len(a), y) - noise) ** 2).mean()


def ddim_sample(model, labels, num_steps, guidance_scale, generator):
    a = _alphas().to(labels.device)
    x = torch.randn(len(labels), 1, 16, 16, generator=generator, device=labels.device)
    ts = torch.linspace(len(a) - 1, 0, num_steps).long()
    for i, t in enumerate(ts):
        eps = model(x, torch.full((len(x),), float(t) / len(a)), labels)
        x0 = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        prev = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    return x.clamp(-1, 1)


def test_diffusion_module_fit_ema_and_samples(tmp_path):
    from zoo.lightning.diffusion import DiffusionModule
    from zoo.lightning.train import build_trainer

    cfg = zcfg.load_config(None, ["task=diffusion", "model.name=tiny", f"output_dir={tmp_path}", "data.kind=synthetic",
                                  "data.image_size=16", "data.num_classes=4", "data.batch_size=16", "data.length=64",
                                  "data.num_workers=0", "trainer.precision=32-true", "trainer.accelerator=cpu",
                                  "trainer.enable_progress_bar=false", "trainer.max_steps=60", "trainer.log_every_n_steps=1",
                                  "trainer.val_check_interval=30", "trainer.limit_val_batches=1", "loggers=[csv,tensorboard]",
                                  "diffusion.ema_decay=0.9", "checkpoint.every_n_train_steps=30"])
    from zoo.lightning.data import build_datamodule

    torch.manual_seed(0)
    module = DiffusionModule("tiny", model=TinyDenoiser(), loss_fn=eps_loss, sample_fn=ddim_sample, lr=3e-3,
                             sample_classes=[0, 1, 2, 3], sample_steps=4, sample_dir=str(tmp_path / "samples"))
    trainer = build_trainer(cfg, module)
    trainer.fit(module, datamodule=build_datamodule(cfg.data))
    losses = csv_losses(tmp_path)
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    grids = sorted((tmp_path / "samples").glob("step*.png"))
    assert [g.name for g in grids] == ["step0000030.png", "step0000060.png"]
    from PIL import Image

    assert Image.open(grids[0]).size == (4 * 18 + 2, 18 + 2)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    live, averaged = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(live[k], averaged[k]) for k in averaged if k.startswith("model."))  # EMA differs from live
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_video_samples_written(tmp_path):
    from zoo.lightning.diffusion import DiffusionModule

    def video_sample(model, labels, num_steps, guidance_scale, generator):
        return torch.rand(len(labels), 1, 5, 8, 8, generator=generator) * 2 - 1

    module = DiffusionModule("tiny", model=nn.Linear(1, 1), loss_fn=eps_loss, sample_fn=video_sample,
                             sample_classes=[0, 1], sample_steps=2, sample_dir=str(tmp_path))

    class FakeTrainer:
        sanity_checking, is_global_zero, global_step, loggers = False, True, 7, []

    module._trainer = FakeTrainer()
    module.on_validation_epoch_end()
    from zoo.media import count_frames

    assert count_frames(tmp_path / "step0000007.gif") == 5 and (tmp_path / "step0000007.png").is_file()


@pytest.mark.parametrize("kind", ["image", "video"])
def test_diffusion_config_fit_real_generators_and_export(tmp_path, kind):
    """The zoo's own DiT (DDPM) and video DiT (flow matching) through `run(cfg)`: loss goes down, export reloads."""
    import zoo
    from zoo.lightning.train import run

    common = [f"output_dir={tmp_path}", f"export={tmp_path / 'g.safetensors'}", "data.kind=synthetic", "data.num_classes=4",
              "data.batch_size=16", "data.num_workers=0", "trainer.precision=32-true", "trainer.accelerator=cpu",
              "trainer.enable_progress_bar=false", "trainer.max_steps=40", "trainer.log_every_n_steps=1", "loggers=[csv]",
              "optim.lr=2e-3", "optim.warmup_steps=5", "diffusion.ema_decay=0.9", "diffusion.sample_steps=2",
              "diffusion.sample_classes=[0,1]", "trainer.val_check_interval=40", "trainer.limit_val_batches=1"]
    if kind == "image":
        arch, extra = "dit_s_2", ["data.image_size=8", "data.length=64", "model.kwargs={input_size: 8, in_channels: 1, "
                                  "num_classes: 4, depth: 1, hidden_size: 32, num_heads: 2, learn_sigma: false}"]
    else:
        arch, extra = "video_dit_tiny", ["data.video=true", "data.frames=4", "data.image_size=8", "data.digit_size=4",
                                         "data.length=64", "model.kwargs={in_channels: 1, num_classes: 4, input_size: [4, 8, 8]}",
                                         "diffusion.objective_kwargs={shift: 1.0}"]
    cfg = zcfg.load_config(None, ["task=diffusion", f"model.name={arch}", *common, *extra])
    torch.manual_seed(0)
    result = run(cfg)
    losses = csv_losses(tmp_path)
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4]), losses
    assert (tmp_path / "samples" / "step0000040.png").is_file()
    if kind == "video":
        assert (tmp_path / "samples" / "step0000040.gif").is_file()
    model = zoo.create_model(arch, checkpoint_path=result["export"])
    from safetensors.torch import load_file

    exported = load_file(result["export"])
    assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
    meta = json.loads(Path(result["export"]).with_suffix(".json").read_text())
    assert meta["pretrained_cfg"]["input_size"] == ([1, 4, 8, 8] if kind == "video" else [1, 8, 8])
    assert meta["pretrained_cfg"].get("flow_shift") == (1.0 if kind == "video" else None)  # the shift it trained with
    from zoo.weights import recorded_model

    recorded = recorded_model(tmp_path / "checkpoints" / "last.ckpt")  # Lightning checkpoints record the shift too
    assert recorded["architecture"] == arch
    assert recorded.get("pretrained_cfg", {}).get("flow_shift") == (1.0 if kind == "video" else None)


def test_generate_rebuilds_the_model_from_a_training_checkpoint(tmp_path, capsys):
    """`zoo generate --checkpoint last.ckpt` of a `zoo train` DiT needs no --model: the checkpoint's hyper-parameters say it."""
    from zoo.cli import main
    from zoo.lightning.train import run

    cfg = zcfg.load_config(None, ["task=diffusion", "model.name=dit_s_2", f"output_dir={tmp_path}", "data.kind=synthetic",
                                  "data.num_classes=4", "data.batch_size=8", "data.num_workers=0", "data.image_size=8",
                                  "data.length=16", "trainer.precision=32-true", "trainer.accelerator=cpu",
                                  "trainer.enable_progress_bar=false", "trainer.max_steps=2", "loggers=[csv]",
                                  "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=2", "diffusion.ema_decay=0", "diffusion.sample_classes=[0]",
                                  "model.kwargs={input_size: 8, in_channels: 1, num_classes: 4, depth: 1, hidden_size: 32, "
                                  "num_heads: 2, learn_sigma: false}"])
    run(cfg)
    out = tmp_path / "g.png"
    code = main(["generate", "--checkpoint", str(tmp_path / "checkpoints" / "last.ckpt"), "--classes", "3", "--steps", "2",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"dit_s_2: {tmp_path / 'checkpoints' / 'last.ckpt'}" in err and out.is_file()
    from PIL import Image

    assert Image.open(out).size == (8 + 4, 8 + 4)  # one 8 x 8 sample with the grid's 2 px padding


def test_import_zoo_does_not_import_lightning():
    code = "import sys, zoo; zoo.register_all_models(); zoo.list_models(); assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
