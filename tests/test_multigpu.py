"""Several processes: DDP equals one process at the same global batch, resumes across device counts, FSDP setup.

The DDP runs are real: Lightning's `strategy=ddp` on CPU starts 2 processes talking through gloo
(`zoo train ... trainer.accelerator=cpu trainer.devices=2`). The same check runs on 2 GPUs with NCCL
(`multigpu` mark, skipped with fewer than 2 CUDA devices).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from zoo.lightning import config as zcfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, EPOCH, STEPS = 8, 8, 16  # 64 samples: 8 steps an epoch, checkpoints at the epoch ends
# a ViT with 2 blocks on 4-class 16x16 templates; drop-path, shifts and label smoothing off: nothing random after init
TINY = ["task=classify", "model.name=vit_tiny_patch16_224", "model.kwargs.img_size=16", "model.kwargs.patch_size=4",
        "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2", "model.kwargs.drop_path_rate=0",
        "data.kind=synthetic", "data.random_shift=0",
        "data.image_size=16", "data.num_classes=4", "data.length=64", "data.num_workers=0", "optim.warmup_steps=1",
        "optim.lr=3e-3", "classify.label_smoothing=0", "trainer.enable_progress_bar=false", "loggers=[csv]",
        "trainer.log_every_n_steps=1", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=null",
        f"checkpoint.every_n_train_steps={EPOCH}", "checkpoint.save_top_k=-1"]


def train(out: Path, devices: int, *extra: str, accelerator: str = "cpu", precision: str = "64-true",
          strategy: str = "ddp") -> subprocess.CompletedProcess:
    """`zoo train` in a fresh process (Lightning's DDP launcher re-runs this command once per extra process)."""
    cmd = [sys.executable, "-m", "zoo", "train", "--config", "classify/vit_mnist.yaml", *TINY, f"output_dir={out}",
           f"export={out}/export.safetensors", f"trainer.accelerator={accelerator}", f"trainer.devices={devices}",
           f"trainer.strategy={strategy if devices > 1 else 'auto'}", f"trainer.precision={precision}",
           f"data.batch_size={GLOBAL_BATCH // devices}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def exported(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "export.safetensors")


def val_losses(out: Path) -> list[float]:
    import csv

    rows = []
    for f in sorted(out.glob("csv/version_*/metrics.csv")):
        with open(f) as fh:
            rows += [float(r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/loss")]
    return rows


def assert_same_training(a: Path, b: Path, rtol: float, atol: float) -> None:
    wa, wb = exported(a), exported(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    la, lb = val_losses(a), val_losses(b)
    assert len(la) == len(lb) >= 2  # the validations at the ends of the 2 epochs (synced over processes with DDP)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=rtol, atol=atol)


# float64: the runs differ only in summation order (one mean over 8 samples vs the mean of two means over 4, averaged
# by the all-reduce), ~1e-16 relative per operation; AdamW divides by sqrt(v) + 1e-8, so a gradient element at its
# rounding level moves a weight by at most lr * 1e-16 / 1e-8 ~ 3e-11 per step. Training on other samples (a wrong
# split of the global batch, a lost or doubled shard) shows up at 1e-3.
F64_TOL = dict(rtol=1e-7, atol=1e-9)


@pytest.mark.slow  # three runs of 10-20 s, two of them DDP
def test_ddp_two_processes_train_as_one_and_resume_on_another_device_count(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, 1)
    result = train(two, 2)
    assert "'world_size': 2" in result.stdout
    assert_same_training(one, two, **F64_TOL)
    # written once (by rank 0, atomically): the checkpoints, the config, no partial files left
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000008.ckpt", "step0000016.ckpt"], names
    assert sorted(p.name for p in two.iterdir() if p.is_file()) == ["config.yaml", "export.json", "export.safetensors"]
    # the 2-process checkpoint after epoch 1, resumed by one process: the same epoch 2 as the one-process run (resumes
    # from a mid-epoch checkpoint restart that epoch's order: Lightning's loaders do not record their position)
    resumed = tmp_path / "two_then_one"
    train(resumed, 1, f"resume={two / 'checkpoints' / 'step0000008.ckpt'}")
    torch.testing.assert_close(exported(resumed), exported(one), **F64_TOL)


@pytest.mark.slow  # two runs, one DDP
def test_one_process_checkpoint_resumes_with_two_processes(tmp_path):
    one, resumed = tmp_path / "one", tmp_path / "one_then_two"
    train(one, 1)
    result = train(resumed, 2, f"resume={one / 'checkpoints' / 'step0000008.ckpt'}")
    assert "resumed_from" in result.stdout
    torch.testing.assert_close(exported(resumed), exported(one), **F64_TOL)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["last.ckpt", "step0000016.ckpt"]


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ddp_two_gpus_train_as_one_gpu(tmp_path):
    """NCCL on 2 GPUs vs 1 GPU at the same global batch, in float64 (TF32 touches float32 only), so the same
    tolerance as on CPU; then the 2-GPU checkpoint continued on 1 GPU."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, 1, accelerator="gpu")
    train(two, 2, accelerator="gpu")
    assert_same_training(one, two, **F64_TOL)
    resumed = tmp_path / "two_then_one"
    train(resumed, 1, f"resume={two / 'checkpoints' / 'step0000008.ckpt'}", accelerator="gpu")
    torch.testing.assert_close(exported(resumed), exported(one), **F64_TOL)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_two_gpus_train_as_ddp_and_its_checkpoint_resumes_anywhere(tmp_path):
    """FSDP (one unit per ViT Block, full state dicts) against DDP, both on 2 GPUs at per-GPU batch 4, in float32
    (Lightning's FSDP has no float64): each GPU multiplies the same inputs with the same kernels, and the average of
    2 gradients is the same either way, so only the clipping norm (summed over shards) and the flat layout differ:
    float32 rounding, ~1e-7 relative per step over 16 steps. The FSDP export gathers the shards; its full
    checkpoint continues under DDP (the same as DDP throughout, to that tolerance) and on one GPU (batch 8 in one
    matmul: other TF32 kernels, ~1e-3 relative per product, so TF32's tolerance over 8 AdamW steps of lr 3e-3)."""
    ddp, sharded = tmp_path / "ddp", tmp_path / "fsdp"
    train(ddp, 2, accelerator="gpu", precision="32-true")
    train(sharded, 2, accelerator="gpu", precision="32-true", strategy="fsdp")
    assert_same_training(ddp, sharded, rtol=1e-4, atol=1e-5)
    checkpoint = f"resume={sharded / 'checkpoints' / 'step0000008.ckpt'}"
    train(tmp_path / "fsdp_then_ddp", 2, checkpoint, accelerator="gpu", precision="32-true")
    torch.testing.assert_close(exported(tmp_path / "fsdp_then_ddp"), exported(ddp), rtol=1e-4, atol=1e-5)
    train(tmp_path / "fsdp_then_one", 1, checkpoint, accelerator="gpu", precision="32-true")
    torch.testing.assert_close(exported(tmp_path / "fsdp_then_one"), exported(ddp), rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------- without processes


def test_train_sampler_gives_the_same_global_batches_on_any_device_count():
    from types import SimpleNamespace

    from zoo.lightning.data import build_datamodule

    cfg = zcfg.load_config(None, [*TINY, "data.batch_size=8"]).data
    single = build_datamodule(cfg)
    single.setup("fit")
    batches_one = [y for _, y in single.train_dataloader()]
    cfg.batch_size = 4
    index_batches = []
    for rank in (0, 1):
        dm = build_datamodule(cfg)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(0)
        order = list(sampler)
        index_batches.append([order[i:i + 4] for i in range(0, len(order) - 3, 4)])
    single_sampler = single.train_dataloader().sampler
    single_sampler.set_epoch(0)
    order_one = list(single_sampler)
    assert len(batches_one) == len(index_batches[0]) == len(index_batches[1]) == 64 // 8
    for step, (r0, r1) in enumerate(zip(*index_batches)):
        assert sorted(r0 + r1) == sorted(order_one[8 * step:8 * step + 8])
    single_sampler.set_epoch(1)
    assert list(single_sampler) != order_one  # reshuffled each epoch


MODELS_AND_BLOCKS = {
    "dit_s_2": {"DiTBlock"}, "video_dit_tiny": {"VideoDiTBlock"}, "nat_mini": {"NATLayer"}, "vit_rpb_small": {"NATLayer"},
    "biformer_tiny": {"BiFormerBlock"}, "biformer_stl_nchw": {"NCHWBiFormerBlock"}, "agent_swin_tiny": {"SwinBlock"},
    "agent_cswin_tiny": {"CSWinBlock"}, "agent_pvt_tiny": {"PVTBlock"}, "agent_deit_tiny": {"DeiTBlock"},
    "mavit_tiny": {"RMTBlock"}, "vit_tiny_patch16_224": {"Block"},
}


@pytest.mark.parametrize("name", sorted(MODELS_AND_BLOCKS))
def test_fsdp_units_are_the_transformer_blocks_of_every_family(name):
    import timm

    import zoo
    from zoo.lightning.train import block_classes

    zoo.register_all_models()
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model(name) if name.startswith("vit_tiny") else zoo.create_model(name)
    assert {c.__name__ for c in block_classes(model, [])} == MODELS_AND_BLOCKS[name]


def test_fsdp_strategy_from_config(monkeypatch):
    import zoo
    from zoo.lightning.train import block_classes, build_strategy, enable_grad_checkpointing

    model = zoo.create_model("dit_s_2", input_size=8, in_channels=1, num_classes=4, depth=2, hidden_size=32, num_heads=2)
    module = torch.nn.Module()
    module.model = model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # load_config refuses fsdp without CUDA
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = zcfg.load_config(None, ["task=diffusion", "model.name=dit_s_2", "trainer.strategy=fsdp", "diffusion.ema_decay=0",
                                  "model.grad_checkpointing=true", "trainer.fsdp_sharding=SHARD_GRAD_OP", "trainer.devices=2"])
    strategy = build_strategy(cfg, module)
    assert type(strategy).__name__ == "FSDPStrategy" and strategy._state_dict_type == "full"
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    assert set(strategy.kwargs["auto_wrap_policy"]._module_classes) == {type(model.blocks[0])}
    assert strategy._activation_checkpointing_kwargs  # the same blocks are recomputed in backward
    enable_grad_checkpointing(cfg, model)
    assert not model.grad_checkpointing  # under FSDP Lightning's policy does it, not the model's own flag
    cfg.trainer.strategy = "ddp"
    enable_grad_checkpointing(cfg, model)
    assert model.grad_checkpointing
    with pytest.raises(zcfg.ConfigError, match="fsdp_wrap.*NoSuchBlock"):
        block_classes(model, ["NoSuchBlock"])


@pytest.mark.parametrize("overrides, message", [
    (["trainer.strategy=fsdp"], "fsdp needs CUDA GPUs .*use trainer.strategy=ddp on CPU"),
    (["trainer.strategy=fsdp", "trainer.accelerator=cpu"], "fsdp needs CUDA GPUs"),
    (["trainer.strategy=dpp"], "'dpp' is not a Lightning strategy; did you mean 'ddp'"),
    (["trainer.fsdp_sharding=FULL"], "'trainer.fsdp_sharding': 'FULL' is not one of FULL_SHARD"),
])
def test_bad_strategy_is_one_line(overrides, message):
    with pytest.raises(zcfg.ConfigError, match=message) as e:
        zcfg.load_config(None, ["task=classify", "model.name=nat_mini", *overrides])
    assert "\n" not in str(e.value)


def test_fsdp_refuses_ema_float64_compile_and_too_many_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    base = ["task=diffusion", "model.name=dit_s_2", "trainer.strategy=fsdp"]
    with pytest.raises(zcfg.ConfigError, match="EMA does not support sharded"):
        zcfg.load_config(None, base)
    with pytest.raises(zcfg.ConfigError, match="'trainer.precision': 64-true with trainer.strategy=fsdp.*32-true"):
        zcfg.load_config(None, [*base, "diffusion.ema_decay=0", "trainer.precision=64-true"])
    with pytest.raises(zcfg.ConfigError, match="trainer.compile"):
        zcfg.load_config(None, [*base, "diffusion.ema_decay=0", "trainer.compile=true"])
    with pytest.raises(zcfg.ConfigError, match="'trainer.devices': 4 but 2 CUDA GPU"):
        zcfg.load_config(None, [*base, "diffusion.ema_decay=0", "trainer.accelerator=gpu", "trainer.devices=4"])


def test_grad_checkpointing_needs_a_model_that_has_it(tmp_path):
    from zoo.lightning.train import enable_grad_checkpointing

    cfg = zcfg.load_config(None, ["task=classify", "model.name=nat_mini", "model.grad_checkpointing=true"])
    with pytest.raises(zcfg.ConfigError, match="model.grad_checkpointing.*no set_grad_checkpointing"):
        enable_grad_checkpointing(cfg, torch.nn.Linear(2, 2))


def test_rank_seed_gives_each_process_its_own_stream():
    from types import SimpleNamespace

    from zoo.lightning.train import RankSeed

    draws = []
    for rank in (0, 1):
        torch.manual_seed(0)
        RankSeed(7).setup(SimpleNamespace(world_size=2, global_rank=rank), None, "fit")
        draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(0)
    RankSeed(7).setup(SimpleNamespace(world_size=1, global_rank=0), None, "fit")  # one process: the seed run() set stays
    torch.testing.assert_close(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(0)))


def test_log_throughput_writes_samples_per_second(tmp_path):
    from zoo.lightning.train import run

    cfg = zcfg.load_config(None, [*TINY, f"output_dir={tmp_path}", "export=null", "trainer.accelerator=cpu", "trainer.max_steps=3",
                                  "data.batch_size=8", "trainer.precision=32-true", "trainer.log_throughput=true",
                                  "checkpoint.every_n_train_steps=0", "trainer.limit_val_batches=0"])
    run(cfg)
    import csv

    rows = [r for f in tmp_path.glob("csv/version_*/metrics.csv") for r in csv.DictReader(f.open())]
    rates = [float(r["perf/samples_per_s"]) for r in rows if r.get("perf/samples_per_s")]
    assert len(rates) == 3 and all(0 < rate < 1e6 for rate in rates)


def test_weight_decay_groups_survive_fsdp_flattening():
    """Under FSDP (use_orig_params) a weight is a flat 1-D shard inside `_fsdp_wrapped_module` by the time
    optimizers are configured: the no-decay names recorded on the unwrapped model still put it in the decayed group."""
    from zoo.lightning.optim import no_weight_decay_names, param_groups

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    skip = no_weight_decay_names(net)
    assert skip == {"0.bias", "1.weight", "1.bias"}

    class Unit(torch.nn.Module):  # the name level FSDP inserts for each wrapped unit
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    wrapped = torch.nn.Sequential(Unit(net[0]), net[1])
    net[0].weight = torch.nn.Parameter(net[0].weight.detach().flatten())  # what the shard looks like
    decay, no_decay = param_groups(wrapped, 0.05, skip=skip)
    assert [p.shape for p in decay["params"]] == [(16,)] and len(no_decay["params"]) == 3
    assert param_groups(wrapped, 0.05)[0]["params"] == []  # without the recorded names the flat weight would lose its decay
