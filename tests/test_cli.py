"""The `zoo` CLI: generate, generate-video, classify, train, bench (CPU, in-process)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main

DIGITS = sorted((Path(__file__).parent / "data" / "digits").glob("*.png"))
TINY_DIT = ["--model", "dit_s_2", "--random-init", "--model-arg", "input_size=16", "--model-arg", "in_channels=1",
            "--model-arg", "num_classes=10", "--model-arg", "depth=1", "--model-arg", "hidden_size=32",
            "--model-arg", "num_heads=2", "--model-arg", "learn_sigma=false", "--steps", "2", "--quiet"]
TINY_VIDEO = ["--model", "video_dit_tiny", "--random-init", "--model-arg", "in_channels=1", "--steps", "2", "--quiet"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def shipped(name: str) -> bool:
    zoo.register_all_models()
    return any(zoo.weights.has_weights(f"{name}.{t}") for t in zoo._registry.get_entry(name).tags)


# ---------------------------------------------------------------- help and errors

@pytest.mark.parametrize("command", ["generate", "generate-video", "classify", "train", "bench"])
def test_help_has_examples(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    # argparse's "(default: ...)" only where it informs: never None/False, never twice after a help that gives it
    assert "default: None" not in out and "default: False" not in out
    assert not re.search(r"default[^)]*\)\s*\(default:", " ".join(out.split()))


@pytest.mark.parametrize("argv, pattern", [
    (["generate", "--model", "dit_s_3", "--out", "{tmp}/a.png"], r"unknown model 'dit_s_3'; did you mean .*dit_s_2"),
    (["generate", "--model", "dit_s_2", "--out", "{tmp}/a.png"], r"no pretrained weights registered: pass --checkpoint PATH .* or --random-init"),
    (["generate", "--model", "dit_s_2", "--checkpoint", "{tmp}/missing.safetensors", "--out", "{tmp}/a.png"], r"--checkpoint .*no such file"),
    (["generate", *TINY_DIT, "--out", "{tmp}/a.jpg"], r"must end in \.png"),
    (["generate", *TINY_DIT, "--out", "{tmp}/file.txt/a.png"], r"cannot create the folder"),
    (["generate", *TINY_DIT, "--classes", "12", "--out", "{tmp}/a.png"], r"--classes \[12\]: this model knows classes 0..9"),
    (["generate", "--model", "dit_s_2", "--random-init", "--model-arg", "input_size=15", "--out", "{tmp}/a.png"], r"not divisible by patch_size"),
    (["generate", "--model", "video_dit_tiny", "--random-init", "--out", "{tmp}/a.png"], r"video model: use `zoo generate-video"),
    (["generate-video", *TINY_VIDEO, "--attention", "flash", "--out", "{tmp}/v.gif"], r"--attention 'flash': .* dense, radial, sla, na"),
    (["generate-video", *TINY_VIDEO, "--frames", "0", "--out", "{tmp}/v.gif"], r"argument --frames: must be an integer >= 1, got 0"),
    (["generate-video", *TINY_VIDEO, "--out", "{tmp}/v.avi"], r"must end in \.mp4 or \.gif"),
    (["generate-video", *TINY_VIDEO, "--attention", "na", "--out", "{tmp}/v.gif"], r"--na-kernel 3 7 7 exceeds the token grid \[4, 4, 4\]"),
    (["generate-video", "--model", "video_dit_s_2", "--out", "{tmp}/v.gif"], r"video_dit_s_2 has no pretrained weights registered: pass --checkpoint PATH"),
    (["generate-video", "--model", "dit_s_2", "--random-init", "--out", "{tmp}/v.gif"], r"image model: use `zoo generate"),
    (["classify", "--model", "nat_tinyy", "x.png"], r"unknown model 'nat_tinyy'; did you mean .*nat_tiny"),
    (["classify", "--model", "nat_tiny", "--random-init", "{tmp}/none.png"], r"none.png: no such image"),
    (["classify", "--model", "dit_s_2", "x.png"], r"dit_s_2 is a generator, not a classifier"),
    (["train", "--config", "classify/vit_mnist.yaml", "trainer.devicez=2"], r"trainer.devicez.*Did you mean: 'devices'"),
])
def test_one_line_errors(capsys, tmp_path, argv, pattern):
    (tmp_path / "file.txt").write_text("")
    code, out, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code in (1, 2)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------- generate

def test_generate_grid_files_and_determinism(capsys, tmp_path):
    from PIL import Image

    args = [*TINY_DIT, "--classes", "3", "7", "1", "--num-per-class", "2", "--seed", "0"]
    assert run(capsys, "generate", *args, "--out", str(tmp_path / "a.png"), "--out-dir", str(tmp_path / "each"))[0] == 0
    assert run(capsys, "generate", *args, "--out", str(tmp_path / "b.png"))[0] == 0
    assert run(capsys, "generate", *args[:-1], "1", "--out", str(tmp_path / "c.png"))[0] == 0
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (2 * 18 + 2, 3 * 18 + 2)  # 2 per row (16 px + 2 px padding), one row per class
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # same seed, same image
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()
    files = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert files == ["000_class3.png", "001_class3.png", "002_class7.png", "003_class7.png", "004_class1.png", "005_class1.png"]


@pytest.mark.parametrize("suffix, attention, skipped", [(".gif", "dense", "0.0"), (".mp4", "dense", "0.0"), (".gif", "sla", "100.0"),
                                                       (".gif", "na", "71.9")])
# sla: 96 tokens = 2 key blocks of 64, int(0.05 * 2) = 0 critical blocks; na: 1 - 27 / (6 * 4 * 4)
def test_generate_video_frames_and_report(capsys, tmp_path, suffix, attention, skipped):
    from zoo.media import count_frames

    out = tmp_path / f"v{suffix}"
    na = ["--na-kernel", "3", "3", "3"] if attention == "na" else []
    code, _, err = run(capsys, "generate-video", *TINY_VIDEO[:-1], "--classes", "1", "2", "--frames", "6", "--attention", attention,
                       *na, "--out", str(out))
    assert code == 0, err
    assert count_frames(out) == 6
    assert f"attention {attention}: {skipped}% of attention skipped" in err and re.search(r"sampling took [0-9.]+ s", err)


def test_generate_video_radial_reports_the_share_outside_its_mask(capsys, tmp_path):
    """Radial without shipped weights (random init): the report is the share of token pairs outside the radial mask."""
    from zoo.ops import radial_block_mask

    code, _, err = run(capsys, "generate-video", *TINY_VIDEO[:-1], "--frames", "6", "--attention", "radial",
                       "--model-arg", "attention_kwargs={block_size: 16, decay_factor: 0.2}", "--out", str(tmp_path / "v.gif"))
    assert code == 0, err
    block_mask = radial_block_mask(6, 16, 0.2, block_size=16)  # 6 frames of 4 x 4 tokens, a block per frame
    token_mask = block_mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    expected = 1 - token_mask.float().mean().item()
    assert 0.05 < expected < 1
    assert f"attention radial: {100 * expected:.1f}% of attention skipped (mean over 2 layers)" in err


def _embedded_video_skipped(attention: str, grid: tuple[int, int, int]) -> float:
    """What each op skips on `grid` with the embedded fine-tunes' settings, computed from the ops, not the backends."""
    from zoo.ops.radial import block_mask_pairs, radial_block_mask

    from zoo.pretrained import VIDEO_ATTENTION_ARGS

    n = math.prod(grid)
    if attention == "radial":
        options = VIDEO_ATTENTION_ARGS["radial"]
        mask = radial_block_mask(grid[0], grid[1] * grid[2], options["decay_factor"], block_size=options["block_size"])
        return 1 - block_mask_pairs(mask, n, n, options["block_size"], options["block_size"]) / n**2
    if attention == "sla":  # int(topk * key blocks) critical key blocks of 64 tokens
        key_blocks = -(-n // 64)
        return 1 - int(VIDEO_ATTENTION_ARGS["sla"]["topk"] * key_blocks) / key_blocks
    return 1 - 3 * 7 * 7 / n  # na: the default --na-kernel 3 7 7


@pytest.mark.parametrize("attention", ["radial", "sla", "na"])
def test_generate_video_reports_what_the_embedded_sparse_model_skips(capsys, tmp_path, attention):
    """The report is the op's own sparsity for the model's token grid (radial once printed 0.0% while ~48% was skipped)."""
    from zoo.cli.generate import DEFAULT_VIDEO_MODEL

    assert shipped(DEFAULT_VIDEO_MODEL), f"{DEFAULT_VIDEO_MODEL}'s weights must ship in zoo/pretrained (zoo.pretrained.SHIPPED)"
    code, _, err = run(capsys, "generate-video", "--attention", attention, "--frames", "4", "--steps", "1", "--guidance", "1",
                       "--classes", "1", "--out", str(tmp_path / "v.gif"))
    assert code == 0, err
    expected = _embedded_video_skipped(attention, (4, 16, 16))  # 4 frames of 32 x 32 latents, patch 2
    assert 0.05 < expected < 1
    assert f"attention {attention}: {100 * expected:.1f}% of attention skipped (mean over 6 layers)" in err


def test_generate_from_exported_checkpoint(capsys, tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("dit_s_2", input_size=8, in_channels=1, num_classes=3, depth=1, hidden_size=32, num_heads=2, learn_sigma=False)
    path = zoo.weights.export(model, tmp_path / "tiny.safetensors")
    code, _, err = run(capsys, "generate", "--model", "dit_s_2", "--checkpoint", str(path), "--classes", "0", "2",
                       "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert code == 0, err
    assert "tiny.safetensors" in err


@pytest.mark.parametrize("strip, extra, expected", [(False, [], 1.5), (False, ["--shift", "4"], 4.0), (True, [], 3.0)])
def test_generate_video_samples_with_the_exports_training_shift(capsys, tmp_path, monkeypatch, strip, extra, expected):
    """An export of a flow run records its shift; generate-video samples with it (--shift wins; older exports: 3.0)."""
    import json

    from zoo import dit
    from zoo.lightning.config import load_config
    from zoo.lightning.diffusion import DiffusionModule
    from zoo.lightning.train import export_model

    cfg = load_config(None, ["task=diffusion", "model.name=video_dit_tiny", "data.video=true", "data.frames=4", "data.image_size=8",
                             "data.num_classes=4", "diffusion.objective_kwargs={shift: 1.5}"])
    torch.manual_seed(0)
    module = DiffusionModule("video_dit_tiny", dict(in_channels=1, num_classes=4, input_size=[4, 8, 8]), objective="flow",
                             objective_kwargs=dict(cfg.diffusion.objective_kwargs))
    path = export_model(cfg, module, tmp_path / "tiny_video.safetensors")
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    assert meta["pretrained_cfg"]["flow_shift"] == 1.5
    if strip:  # as written before exports recorded the shift
        del meta["pretrained_cfg"]["flow_shift"]
        sidecar.write_text(json.dumps(meta))
    shifts, sample_video = [], dit.sample_video
    monkeypatch.setattr(dit, "sample_video", lambda *a, shift, **kw: shifts.append(shift) or sample_video(*a, shift=shift, **kw))
    code, _, err = run(capsys, "generate-video", "--model", "video_dit_tiny", "--checkpoint", str(path), "--classes", "0", "3",
                       "--steps", "2", "--quiet", *extra, "--out", str(tmp_path / "v.gif"))
    assert code == 0, err
    assert shifts == [expected]


# ---------------------------------------------------------------- classify

TINY_CLASSIFIERS = {  # name -> (shipped config, model arguments)
    "nat_mini": ("classify/nat_mnist.yaml", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), kernel_size=3, legacy_pad=True)),
    "vit_tiny_patch16_224": ("classify/vit_mnist.yaml", dict(img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=1)),
}


@pytest.mark.parametrize("name, with_model", [("nat_mini", True), ("nat_mini", False), ("vit_tiny_patch16_224", False)])
def test_classify_exported_checkpoint_prints_top5(capsys, tmp_path, name, with_model):
    """An export classifies with or without --model: it records its architecture and arguments (timm models too)."""
    from zoo.lightning.config import load_config
    from zoo.lightning.train import export_model

    config, kwargs = TINY_CLASSIFIERS[name]
    model = zoo.create_model(name, num_classes=10, in_chans=1, **kwargs)

    class Module:  # what export_model reads from a LightningModule
        pass

    Module.model = model
    path = export_model(load_config(config), Module, tmp_path / "exported.safetensors")
    chosen = ["--model", name] if with_model else []
    code, out, err = run(capsys, "classify", *chosen, "--checkpoint", str(path), *map(str, DIGITS[:2]))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].endswith(DIGITS[0].name) and len(lines) == 2 * (1 + 5)
    assert all(re.match(r"^\s+[0-9.]+%\s+\d+\s+\d$", line) for line in lines[1:6])


# ---------------------------------------------------------------- train

def test_train_print_config(capsys):
    code, out, _ = run(capsys, "train", "--config", "classify/vit_mnist.yaml", "--print-config", "trainer.max_steps=7")
    assert code == 0 and "max_steps: 7" in out


# ---------------------------------------------------------------- embedded defaults

def test_pretrained_args_match_training_configs():
    from zoo.lightning.config import load_config
    from zoo.pretrained import CLASSIFIER_ARGS, DIT_ARGS, VIDEO_DIT_ARGS

    for name, (base, args) in CLASSIFIER_ARGS.items():
        cfg = load_config(f"classify/{name}.yaml")
        assert cfg.model.name == base and dict(cfg.model.kwargs) == args, name
    dit_cfg = load_config("diffusion/dit_s_2_mnist.yaml")
    assert {**dit_cfg.model.kwargs} == DIT_ARGS
    video_cfg = load_config("diffusion/video_dit_s_2_mmnist.yaml")
    kwargs = {k: v for k, v in video_cfg.model.kwargs.items() if k != "attention"}
    assert {**kwargs, "input_size": tuple(kwargs["input_size"])} == VIDEO_DIT_ARGS
    for tag in ("mmnist", "mmnist_radial", "mmnist_sla"):  # generate-video samples with the shift they trained with
        assert zoo.weights.get_weights(f"video_dit_s_2_mmnist.{tag}").cfg["flow_shift"] == video_cfg.diffusion.objective_kwargs.shift


def test_embedded_shipped_files_match_sha256():
    from zoo.pretrained import SHIPPED, shipped_files

    for path in shipped_files():
        assert zoo.weights.sha256_of(path) == SHIPPED[path.name]


@pytest.mark.parametrize("model", [None, "nat_mnist", "mavit_mnist"])  # None: the default (biformer_mnist)
def test_shipped_classifiers_read_real_digits(capsys, model):
    from zoo.cli.classify import DEFAULT_CLASSIFIER

    assert len(DIGITS) >= 10, "tests/data/digits/*.png ship with the repository"
    assert shipped(model or DEFAULT_CLASSIFIER), f"{model or DEFAULT_CLASSIFIER}'s weights must ship in zoo/pretrained (zoo.pretrained.SHIPPED)"
    code, out, err = run(capsys, "classify", "--quiet", *(["--model", model] if model else []), *map(str, DIGITS))
    assert code == 0, err
    blocks = out.strip().split("\n")
    predicted = [int(blocks[i + 1].split()[1]) for i in range(0, len(blocks), 6)]
    truth = [int(p.name[0]) for p in DIGITS]
    assert sum(p == t for p, t in zip(predicted, truth)) >= 9, (predicted, truth)


def test_generate_default_digits_are_recognised(capsys, tmp_path):
    from zoo import digits
    from zoo.cli.classify import DEFAULT_CLASSIFIER
    from zoo.cli.generate import DEFAULT_IMAGE_MODEL

    for name in (DEFAULT_IMAGE_MODEL, DEFAULT_CLASSIFIER):
        assert shipped(name), f"{name}'s weights must ship in zoo/pretrained (zoo.pretrained.SHIPPED)"
    code, _, err = run(capsys, "generate", "--classes", "3", "7", "1", "--num-per-class", "2", "--steps", "10",
                       "--seed", "0", "--quiet", "--out-dir", str(tmp_path))
    assert code == 0, err
    import numpy as np
    from PIL import Image

    files = sorted(tmp_path.glob("*.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(f))).float()[None] / 127.5 - 1 for f in files])
    assert images.shape[-2:] == (32, 32)
    labels = torch.tensor([3, 3, 7, 7, 1, 1])
    assert digits.image_accuracy(zoo.create_model(DEFAULT_CLASSIFIER, pretrained=True).eval(), images, labels) >= 5 / 6


def test_generate_video_default_digits_are_recognised(capsys, tmp_path):
    """The embedded video DiT draws the requested digits, frame after frame (seed 0, guidance 4)."""
    import numpy as np
    from PIL import Image, ImageSequence

    from zoo import digits
    from zoo.cli.classify import DEFAULT_CLASSIFIER
    from zoo.cli.generate import DEFAULT_VIDEO_MODEL

    for name in (DEFAULT_VIDEO_MODEL, DEFAULT_CLASSIFIER):
        assert shipped(name), f"{name}'s weights must ship in zoo/pretrained (zoo.pretrained.SHIPPED)"
    out = tmp_path / "v.gif"
    code, _, err = run(capsys, "generate-video", "--classes", "1", "7", "--steps", "10", "--guidance", "4", "--seed", "0",
                       "--quiet", "--out", str(out))
    assert code == 0, err
    frames = [np.array(f.convert("L")) for f in ImageSequence.Iterator(Image.open(out))]
    assert len(frames) == 16 and frames[0].shape == (2 * 34 + 2, 36)  # two 32x32 videos in a column, 2 px padding
    grid = torch.from_numpy(np.stack(frames)).float() / 127.5 - 1
    videos = torch.stack([grid[:, 2 + 34 * i: 34 + 34 * i, 2:34] for i in range(2)])[:, None]
    classifier = zoo.create_model(DEFAULT_CLASSIFIER, pretrained=True).eval()
    assert digits.frame_accuracy(classifier, videos, torch.tensor([1, 7])) >= 0.75


def test_bench_model_prints_ratios(capsys):
    code, out, err = run(capsys, "bench", "model", "--model", "video_dit_tiny", "--attention", "dense", "sla", "na", "--repeats", "2",
                         "--na-kernel", "3", "--device", "cpu")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "x vs dense" in line]
    assert [r.split()[0] for r in rows] == ["dense", "sla", "na"] and "1.00x" in rows[0]
