"""Bad inputs to the CLI, the training config and model construction: each gets a ONE-LINE error naming the
argument (or config key) and the fix, a non-zero exit status, and no traceback; nothing is written.

The CLI runs in-process (`zoo.cli.main`), as in test_cli.py; nothing here trains or samples for real.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.cli import main

TINY_DIT = ["--model", "dit_s_2", "--random-init", "--model-arg", "input_size=8", "--model-arg", "in_channels=1",
            "--model-arg", "depth=1", "--model-arg", "hidden_size=32", "--model-arg", "num_heads=2",
            "--model-arg", "learn_sigma=false", "--quiet"]
TINY_VIDEO = ["--model", "video_dit_tiny", "--random-init", "--model-arg", "in_channels=1", "--quiet"]
GENERATE = ["generate", *TINY_DIT, "--out", "{tmp}/a.png"]
TRAIN = ["train", "--config", "classify/nat_mnist.yaml"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def one_line_error(capsys, argv: list[str]) -> str:
    """Run `zoo argv`; assert a failure with exactly one line on stderr and no traceback; return that line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, pattern", [
    # zoo generate: every numeric option is range-checked and finite
    ([*GENERATE, "--steps", "-5"], r"argument --steps: must be an integer >= 1 and <= 1000, got -5"),
    ([*GENERATE, "--steps", "0"], r"argument --steps: must be an integer >= 1"),
    ([*GENERATE, "--steps", "ten"], r"argument --steps: must be an integer .*got 'ten'"),
    ([*GENERATE, "--guidance", "nan"], r"argument --guidance: must be a finite number >= 0, got nan"),
    ([*GENERATE, "--guidance", "-1"], r"argument --guidance: must be a finite number >= 0"),
    ([*GENERATE, "--num-per-class", "0"], r"argument --num-per-class: must be an integer >= 1"),
    ([*GENERATE, "--classes", "-1"], r"argument --classes: must be an integer >= 0"),
    ([*GENERATE, "--seed", "-1"], r"argument --seed: must be an integer >= 0"),
    ([*GENERATE, "--scheduler", "euler"], r"argument --scheduler: invalid choice: 'euler'"),
    # --model-arg: parsed as YAML, then checked against the model class's signature
    ([*GENERATE, "--model-arg", "input_size=abc"], r"--model-arg: dit_s_2: model argument input_size='abc' must be int"),
    ([*GENERATE, "--model-arg", "bogus=1"], r"--model-arg: dit_s_2: unknown model argument 'bogus'; .*DiT takes input_size"),
    ([*GENERATE, "--model-arg", "deph=2"], r"unknown model argument 'deph'; did you mean 'depth'"),
    ([*GENERATE, "--model-arg", "hidden_size=0"], r"model argument hidden_size=0 must be >= 1"),
    ([*GENERATE, "--model-arg", "depth=[1,"], r"--model-arg 'depth=\[1,': the value is not YAML"),
    ([*GENERATE, "--model-arg", "depth"], r"--model-arg 'depth' is not key=value"),
    # zoo generate-video
    (["generate-video", *TINY_VIDEO, "--steps", "0", "--out", "{tmp}/v.gif"], r"argument --steps: must be an integer >= 1, got 0"),
    (["generate-video", *TINY_VIDEO, "--fps", "0", "--out", "{tmp}/v.gif"], r"argument --fps: must be an integer >= 1 and <= 240"),
    (["generate-video", *TINY_VIDEO, "--shift", "nan", "--out", "{tmp}/v.gif"], r"argument --shift: must be a finite number > 0"),
    (["generate-video", *TINY_VIDEO, "--shift", "0", "--out", "{tmp}/v.gif"], r"argument --shift: must be a finite number > 0, got 0"),
    (["generate-video", *TINY_VIDEO, "--guidance", "inf", "--out", "{tmp}/v.gif"], r"argument --guidance: must be a finite number"),
    (["generate-video", *TINY_VIDEO, "--na-kernel", "0", "3", "3", "--out", "{tmp}/v.gif"], r"argument --na-kernel: must be an integer >= 1"),
    (["generate-video", *TINY_VIDEO, "--model-arg", "patch_size=[2,2,2]", "--frames", "3", "--out", "{tmp}/v.gif"],
     r"--frames 3: video_dit_tiny needs a multiple of its temporal patch size 2"),
    # zoo classify, flops, bench
    (["classify", "--model", "nat_mini", "--random-init", "--top", "0", "{tmp}/x.png"], r"argument --top: must be an integer >= 1"),
    (["classify", "--model", "nat_mini", "--random-init", "{tmp}/garbage.png"], r"garbage.png: not an image Pillow can read"),
    (["flops", "nat_mini", "--input-size", "3", "0", "32"], r"argument --input-size: must be an integer >= 1, got 0"),
    (["bench", "model", "--repeats", "0"], r"zoo bench model: error: argument --repeats: must be an integer >= 1"),
    (["bench", "model", "--batch-size", "-2"], r"argument --batch-size: must be an integer >= 1"),
    (["bench", "model", "--model", "video_dit_tiny", "--attention", "dense", "na"], r"--na-kernel 7 exceeds the token grid \[4, 4, 4\]"),
    (["list", "--bogus"], r"unrecognized arguments: --bogus"),
    (["list", "xyz*"], r"zoo list: error: no model matches 'xyz\*': see `zoo list` for every name"),
    ([*GENERATE, "--device", "meta"], r"--device 'meta': the zoo runs on cpu, cuda or cuda:N"),
    (["generate", *TINY_DIT, "--out-dir", "{tmp}/garbage.png"], r"--out-dir .*garbage.png is a file; give a folder"),
    (["flops", "nat_mini", "--input-size", "1", "3", "64", "64"],
     r"input_size \(1, 3, 64, 64\) must be one image's \(C, H, W\) or \(H, W\), without the batch dimension"),
    # zoo train: the config file itself
    (["train", "--config", "{tmp}/broken.yaml"], r"--config .*broken.yaml: not valid YAML at line 3, column 1"),
    (["train", "--config", "{tmp}/garbage.png"], r"--config .*garbage.png: not a text file; give a YAML config"),
    (["train", "--config", "{tmp}/list.yaml"], r"--config .*list.yaml: holds a YAML list, not a mapping of keys"),
    (["train", "--config", "{tmp}/missing.yaml"], r"--config .*missing.yaml: no such file, nor a shipped config; shipped: classify/"),
    # zoo train: keys and values
    ([*TRAIN, "trainer.max_steps=-5"], r"'trainer.max_steps': -5; give a number of steps >= 1"),
    ([*TRAIN, "trainer.max_steps=-1"], r"'trainer.max_steps': -1 \(no step limit\) needs trainer.max_epochs or trainer.max_time"),
    ([*TRAIN, "trainer.max_time=5h"], r"'trainer.max_time': '5h' is not DD:HH:MM:SS"),
    ([*TRAIN, "trainer.precision=fp8"], r"'trainer.precision': 'fp8' is not one of"),
    ([*TRAIN, "trainer.devices=0"], r"'trainer.devices': 0; give auto, a count >= 1"),
    ([*TRAIN, "trainer.accumulate_grad_batches=0"], r"'trainer.accumulate_grad_batches': 0 is out of range; it must be >= 1"),
    ([*TRAIN, "trainer.limit_val_batches=1.5"], r"'trainer.limit_val_batches': 1.5; give a fraction in \[0, 1\] or a whole number"),
    ([*TRAIN, "data.val_fraction=1.5"], r"'data.val_fraction': 1.5; give the held-out share, > 0 and < 1"),
    ([*TRAIN, "data.batch_size=0"], r"'data.batch_size': 0 is out of range; it must be >= 1"),
    ([*TRAIN, "data.std=[0]"], r"'data.std': \[0.0\]; give 1 or data.channels finite values > 0"),
    ([*TRAIN, "optim.lr=nan"], r"'optim.lr': nan is out of range; it must be > 0"),
    ([*TRAIN, "optim.betas=[0.9]"], r"'optim.betas': \[0.9\]; give two values in \[0, 1\)"),
    ([*TRAIN, "classify.label_smoothing=2"], r"'classify.label_smoothing': 2.0 is out of range; it must be >= 0 and <= 1"),
    ([*TRAIN, "checkpoint.mode=maximum"], r"'checkpoint.mode': 'maximum' is not one of min, max"),
    ([*TRAIN, "model.kwargs.bogus_arg=1"], r"'model.kwargs.bogus_arg': nat_mini: unknown model argument 'bogus_arg'"),
    ([*TRAIN, "model.kwargs.kernel_size=abc"], r"'model.kwargs.kernel_size': nat_mini: model argument kernel_size='abc' must be int"),
    (["train", "--config", "classify/vit_mnist.yaml", "model.kwargs.depth=abc"],
     r"'model.kwargs.depth': vit_tiny_patch16_224: model argument depth='abc' must be int"),  # a timm model
    (["train", "--config", "diffusion/dit_s_2_mnist.yaml", "diffusion.class_dropout=0.2"],
     r"'diffusion.class_dropout' was removed .*set model.kwargs.class_dropout_prob"),
    (["train", "--config", "diffusion/dit_s_2_mnist.yaml", "diffusion.sample_every_n_steps=5"],
     r"'diffusion.sample_every_n_steps' was removed .*trainer.val_check_interval"),
    (["train", "--config", "diffusion/dit_s_2_mnist.yaml", "diffusion.ema_decay=1.5"], r"'diffusion.ema_decay': 1.5 is out of range"),
    ([*TRAIN, "traner.max_steps=2"], r"config key 'traner': .*Did you mean: 'trainer'"),
    ([*TRAIN, "model.name=nat_tinyy"], r"^zoo train: error: config key 'model.name': unknown model 'nat_tinyy'; did you mean nat_tiny"),
    ([*TRAIN, "data.path={tmp}/ok.npz", "output_dir={tmp}/run", "resume={tmp}/missing.ckpt"],  # refused inside the run
     r"^zoo train: error: config key 'resume': .*missing.ckpt is not a file"),
    ([*TRAIN, "output_dir={tmp}/garbage.png"], r"config key 'output_dir': .*garbage.png is a file; give a folder"),
    # zoo train: the arrays of data.path, checked against data.channels / data.num_classes before anything is built
    ([*TRAIN, "data.path={tmp}/nchw.npz"], r"'images' has shape \(4, 1, 28, 28\), read as channels-last .*np.moveaxis\(images, 1, -1\)"),
    ([*TRAIN, "data.path={tmp}/rgb.npz"], r"'images' has shape \(4, 28, 28, 3\).*3 channels, but data.channels=1; set data.channels=3"),
    ([*TRAIN, "data.path={tmp}/labels12.npz"], r"'labels' holds 11, beyond the classes 0..9 of data.num_classes=10; set data.num_classes=12"),
    ([*TRAIN, "data.path={tmp}/short_labels.npz"], r"'labels' has shape \(3,\) for 4 images; give one label per image"),
    ([*TRAIN, "data.path={tmp}/garbage.png"], r"data.path=.*garbage.png: not an .npz NumPy can read"),
])
def test_one_line_error_naming_the_argument(capsys, tmp_path, argv, pattern):
    (tmp_path / "broken.yaml").write_text("task: classify\nmodel: {name: x\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    digits = np.zeros((4, 28, 28), np.uint8)
    for name, images, labels in (("nchw", digits[:, None], [0, 1, 2, 3]), ("rgb", np.stack([digits] * 3, -1), [0, 1, 2, 3]),
                                 ("labels12", digits, [0, 1, 2, 11]), ("short_labels", digits, [0, 1, 2]),
                                 ("ok", digits, [0, 1, 2, 3])):
        np.savez(tmp_path / f"{name}.npz", images=images, labels=np.array(labels))
    line = one_line_error(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert re.search(pattern, line), line
    assert not list(tmp_path.glob("*.gif")) and not (Path("outputs").exists() and list(Path("outputs").glob("*nat*")))


def test_classify_refuses_decompression_bombs_before_loading_a_model(capsys, tmp_path, monkeypatch):
    """Pillow's bomb limit (scaled down here: a 20000x20000 PNG takes seconds to write) is a one-line error."""
    from PIL import Image

    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 * 64 > 2 * 1000: DecompressionBombError
    line = one_line_error(capsys, ["classify", "--model", "nat_mini", "--random-init", str(tmp_path / "big.png")])
    assert re.search(r"big.png: Image size \(4096 pixels\) exceeds limit .*; downscale it first", line), line


@NO_CUDA
def test_train_gpu_accelerator_without_cuda(capsys):
    line = one_line_error(capsys, [*TRAIN, "trainer.accelerator=gpu"])
    assert "'trainer.accelerator': 'gpu' but no CUDA GPU is visible; use trainer.accelerator=cpu" in line


@NO_CUDA
def test_bench_op_without_cuda_says_why(capsys):
    line = one_line_error(capsys, ["bench", "op"])
    assert "needs a CUDA GPU" in line


@NO_CUDA
def test_device_cuda_without_cuda(capsys, tmp_path):
    line = one_line_error(capsys, ["generate", *TINY_DIT, "--device", "cuda", "--out", str(tmp_path / "a.png")])
    assert "--device cuda but no CUDA GPU is visible; use --device cpu" in line


@pytest.mark.parametrize("path, pattern", [(None, r"data.path is not set: data.kind=npz needs data.path=FILE"),
                                           ("{tmp}/none.npz", r"data.path=.*none.npz: no such file")])
def test_train_names_a_missing_data_path(capsys, tmp_path, path, pattern):
    """Caught before training starts (shipped configs leave data.path to the command line, so load_config cannot)."""
    overrides = [f"output_dir={tmp_path / 'run'}", "trainer.accelerator=cpu", "loggers=[csv]",
                 "data.path=null" if path is None else f"data.path={path.replace('{tmp}', str(tmp_path))}"]
    line = one_line_error(capsys, [*TRAIN, *overrides])
    assert re.search(pattern, line), line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_offline_without_the_vae_says_what_to_download(capsys, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE is honoured at once (no 30 s hub timeout) and the message names the download."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("stabilityai/sd-vae-ft-ema", "config.json"), str):
        pytest.skip("the SD VAE is cached here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["generate", *[a if a != "in_channels=1" else "in_channels=4" for a in TINY_DIT], "--steps", "1", "--classes", "1",
            "--out", str(tmp_path / "a.png")]
    line = one_line_error(capsys, argv)
    assert "--vae ema: offline mode and stabilityai/sd-vae-ft-ema is not cached; download it with `huggingface-cli download" in line
    assert not (tmp_path / "a.png").exists()


def test_bench_model_refuses_a_backend_before_timing_any(capsys):
    assert main(["bench", "model", "--model", "dit_s_2", "--input-size", "8", "--attention", "dense", "radial"]) == 1
    out, err = capsys.readouterr()
    assert re.search(r"^zoo bench: error: --attention radial: .*needs video", err) and len(err.strip().splitlines()) == 1, err
    assert out == ""  # dense was not timed first


def test_verbose_after_the_subcommand_shows_the_traceback(capsys):
    with pytest.raises(zoo.lightning.ConfigError, match="trainer.max_steps"):
        main([*TRAIN, "--verbose", "trainer.max_steps=-5"])


def test_verbose_shows_the_traceback_of_an_error_inside_the_run(tmp_path):
    (tmp_path / "random.safetensors").write_bytes(b"\x07" * 64)
    with pytest.raises(zoo.weights.WeightsError, match="random.safetensors"):
        main([*TRAIN, "--verbose", "data.kind=synthetic", f"output_dir={tmp_path}/run",
              f"model.checkpoint_path={tmp_path}/random.safetensors"])


def test_list_into_a_closed_pipe_is_quiet():
    r = subprocess.run(f"{sys.executable} -m zoo list | head -1", shell=True, capture_output=True, text=True, timeout=120)
    assert r.stdout.count("\n") == 1 and r.stderr == "", r.stderr


# ---------------------------------------------------------------- model construction

@pytest.mark.parametrize("name, kwargs, pattern", [
    ("dit_s_3", {}, r"unknown model 'dit_s_3'; did you mean .*dit_s_2"),
    ("dit_s_2", {"bogus": 1}, r"dit_s_2: unknown model argument 'bogus'; DiT takes input_size, patch_size"),
    ("dit_s_2", {"input_size": "abc"}, r"dit_s_2: model argument input_size='abc' must be int \| Sequence\[int\]"),
    ("dit_s_2", {"mlp_ratio": math.nan}, r"dit_s_2: model argument mlp_ratio=nan must be a finite number"),
    ("dit_s_2", {"depth": 0}, r"dit_s_2: model argument depth=0 must be >= 1 \(default 28\)"),
    ("dit_s_2", {"learn_sigma": 1}, r"dit_s_2: model argument learn_sigma=1 must be bool"),
    ("video_dit_tiny", {"input_size": 16}, r"video_dit_tiny: model argument input_size=16 must be Sequence\[int\]"),
    ("nat_mini", {"embed_dim": "x"}, r"nat_mini: model argument embed_dim='x' must be int"),
    ("nat_mini", {"drop_path_rate": -0.1}, r"nat_mini: model argument drop_path_rate=-0.1 must be >= 0"),
    ("nat_mini", {"depths": ["a"]}, r"nat_mini: model argument depths=\['a'\] must be Sequence\[int\]"),
    ("nat_mnist", {"bogus": 1}, r"nat_mnist cannot be built with bogus=1 \(TypeError: .*unexpected keyword argument 'bogus'"),
])
def test_create_model_refuses_bad_arguments_in_one_line(name, kwargs, pattern):
    with pytest.raises(ValueError) as e:
        zoo.create_model(name, **kwargs)
    assert "\n" not in str(e.value) and re.search(pattern, str(e.value)), str(e.value)


def test_create_model_accepts_timm_builder_arguments():
    """features_only & co. belong to timm's builder, not the model class: not refused as unknown."""
    model = zoo.create_model("nat_mini", features_only=True, out_indices=(1,), depths=(1, 1, 1, 1), embed_dim=16)
    assert len(model(torch.randn(1, 3, 64, 64))) == 1


def test_val_fraction_that_empties_a_split_names_the_key():
    from zoo.lightning.data import split

    with pytest.raises(ValueError, match=r"data.val_fraction=0.001 holds out 0 of 100 samples, leaving no validation data"):
        split(100, 0.001, "val")


@pytest.mark.parametrize("objective, options, pattern", [
    ("flow", {"shift": -1.0}, r"objective_kwargs.shift=-1.0: the flow timestep shift must be a finite number > 0"),
    ("flow", {"shift": "abc"}, r"objective_kwargs.shift='abc'"),
    ("flow", {"scheduler": "ddim"}, r"objective_kwargs.scheduler='ddim': use one of euler, unipc"),
    ("ddpm", {"scheduler": "euler"}, r"objective_kwargs.scheduler='euler': use one of ddpm, ddim, dpm"),
    ("ddpm", {"shift": 3.0}, r"unknown ddpm options \['shift'\]"),
])
def test_diffusion_objective_options_fail_before_training(objective, options, pattern):
    """Samplers run at the first validation: a bad option must fail when the module is built, not there."""
    from zoo.lightning.diffusion import resolve_objective

    model = zoo.create_model("video_dit_tiny", in_channels=1, num_classes=4, input_size=[2, 8, 8])
    with pytest.raises(ValueError, match=pattern):
        resolve_objective(objective, model, options)


def test_sample_classes_outside_the_model_fail_when_the_module_is_built():
    from zoo.lightning.diffusion import DiffusionModule

    kwargs = dict(in_channels=1, num_classes=4, input_size=[2, 8, 8])
    with pytest.raises(ValueError, match=r"diffusion.sample_classes \[4, 9\]: the model has classes 0..3"):
        DiffusionModule("video_dit_tiny", kwargs, sample_classes=[0, 4, 9])
    assert DiffusionModule("video_dit_tiny", kwargs).sample_classes == [0, 1, 2, 3]  # the default fits the model


def test_create_classifier_checks_timm_model_arguments():
    from zoo.lightning.classification import create_classifier

    with pytest.raises(ValueError, match=r"resnet18: unknown model argument 'img_size'; ResNet takes"):
        create_classifier("resnet18", num_classes=10, in_chans=1, img_size=32)


@pytest.mark.parametrize("call, pattern", [
    (lambda media: media.save_video(torch.zeros(2, 1, 4, 4), "v.gif", fps=0), r"fps must be > 0 and <= 1000, got 0"),
    (lambda media: media.make_grid(torch.zeros(2, 1, 4, 4), nrow=-1), r"nrow must be >= 1"),
])
def test_media_refuses_bad_sizes(tmp_path, monkeypatch, call, pattern):
    from zoo import media

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        call(media)
    assert not list(tmp_path.iterdir())
