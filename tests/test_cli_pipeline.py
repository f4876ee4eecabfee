"""`zoo generate-video --pipeline PATH`: a tiny WanPipeline saved to disk, run through the CLI (CPU, no download)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from test_diffusers_plugins import tiny_wan, tiny_wan_pipeline  # noqa: E402

from zoo import media  # noqa: E402
from zoo.cli import main  # noqa: E402

SIZE = ["--frames", "9", "--height", "32", "--width", "64", "--steps", "2", "--device", "cpu"]  # 3 x 4 x 8 latent


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Wan2.1-style pipeline and a Wan2.2 A14B-style one (two transformers), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("pipelines")
    pipe = tiny_wan_pipeline()
    pipe.save_pretrained(root / "wan")
    pipe.register_modules(transformer_2=tiny_wan(layers=3, seed=1))
    pipe.register_to_config(boundary_ratio=0.5)
    pipe.save_pretrained(root / "wan22")
    return root


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def gif_frames(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    return np.stack(frames)


def test_dense_is_the_stock_pipeline_and_plugins_change_it(capsys, folders, tmp_path):
    from diffusers import DiffusionPipeline

    prompt = ["--pipeline", str(folders / "wan"), "--prompt", "a cat runs on the beach", "--seed", "3", *SIZE]
    code, err = run(capsys, "generate-video", *prompt, "--out", str(tmp_path / "dense.gif"))
    assert code == 0, err
    assert "WanPipeline (WanTransformer3DModel); attention dense" in err and "wrote" in err and "9 frames of 32x64" in err
    dense = gif_frames(tmp_path / "dense.gif")
    assert dense.shape == (9, 32, 64, 3)

    stock = DiffusionPipeline.from_pretrained(folders / "wan", local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    video = stock(prompt="a cat runs on the beach", num_frames=9, height=32, width=64, num_inference_steps=2,
                  output_type="pt", generator=torch.Generator().manual_seed(3)).frames[0]
    media.save_video(video * 2 - 1, tmp_path / "stock.gif")  # the same writer: equal frames mean equal videos
    capsys.readouterr()  # the stock pipeline's loading bars
    assert np.array_equal(dense, gif_frames(tmp_path / "stock.gif"))

    for attention, options in (("radial", ["--block-size", "8", "--decay-factor", "0.2", "--dense-layers", "1"]),
                               ("sla", ["--block-size", "8", "--topk", "0.25", "--dense-steps", "1"]),
                               ("na", ["--na-kernel", "2", "3", "3"])):
        out = tmp_path / f"{attention}.gif"
        code, err = run(capsys, "generate-video", *prompt, "--attention", attention, *options, "--quiet", "--out", str(out))
        assert code == 0 and err == "", err
        frames = gif_frames(out)
        assert frames.shape == dense.shape
        assert not np.array_equal(frames, dense), attention  # the plugin ran: a sparse attention changes the video
    from diffusers.utils import logging as diffusers_logging

    assert diffusers_logging.is_progress_bar_enabled()  # --quiet hid the loading bars for its own run only


def test_both_transformers_of_a_two_expert_pipeline(capsys, folders, tmp_path):
    assert "transformer_2" in json.loads((folders / "wan22" / "model_index.json").read_text())
    code, err = run(capsys, "generate-video", "--pipeline", str(folders / "wan22"), "--prompt", "a dog", *SIZE,
                    "--attention", "na", "--na-kernel", "2", "3", "3", "--out", str(tmp_path / "v.mp4"))
    assert code == 0, err
    assert re.search(r"attention na \(.*kernel_size=\[2, 3, 3\].*\) in transformer and transformer_2", err), err
    # one report line per transformer: each expert ran one of the 2 steps (x cond, uncond x 3 layers)
    for name in ("transformer", "transformer_2"):
        assert re.search(rf"^{name}: na: \d+\.\d% of query-key pairs skipped over 6 sparse and 0 dense attention "
                         r"calls; last grid 3x2x4: \d+\.\d%$", err, re.M), err
    assert media.count_frames(tmp_path / "v.mp4") == 9


def test_a_transformer_the_plugins_do_not_know_is_a_one_line_error():
    from types import SimpleNamespace

    from zoo.cli import CliError
    from zoo.cli.video_pipeline import apply_plugin
    from zoo.diffusers import RadialAttentionConfig

    pipe = SimpleNamespace(transformer=torch.nn.Linear(2, 2))  # what apply_plugin reads of a pipeline
    with pytest.raises(CliError, match=r"^--pipeline p: --attention radial cannot run in its transformer: "
                                       r"zoo attention plugins support diffusers' WanTransformer3DModel.*got Linear$"):
        apply_plugin(pipe, RadialAttentionConfig(), "p")


def tiny_image_pipeline(folder) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                       up_block_types=("UpBlock2D",), norm_num_groups=4, layers_per_block=1)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)


@pytest.mark.parametrize("argv, pattern", [
    (["--pipeline", "{tmp}/missing", "--prompt", "x"], r"--pipeline .*missing: no such folder"),
    (["--pipeline", "{tmp}", "--prompt", "x"], r"is not a diffusers pipeline folder \(it has no model_index.json\)"),
    (["--pipeline", "{tmp}/broken", "--prompt", "x"], r"--pipeline .*broken: could not load it"),
    (["--pipeline", "{tmp}/image", "--prompt", "x"], r"holds a DDPMPipeline, not a transformer video pipeline"),
    (["--pipeline", "{wan}", "--prompt", "x", "--model", "video_dit_tiny"], r"--pipeline and --model cannot be combined"),
    (["--pipeline", "{wan}", "--prompt", "x", "--checkpoint", "w.safetensors"], r"--pipeline and --checkpoint cannot be combined"),
    (["--pipeline", "{wan}"], r"--pipeline needs --prompt TEXT"),
    (["--prompt", "x", "--model", "video_dit_tiny", "--random-init"], r"--prompt needs --pipeline PATH"),
    (["--topk", "0.1", "--model", "video_dit_tiny", "--random-init"], r"--topk needs --pipeline PATH"),
    (["--pipeline", "{wan}", "--prompt", "x", "--attention", "flash"], r"--attention 'flash': --pipeline supports dense, radial, sla, na"),
    (["--pipeline", "{wan}", "--prompt", "x", "--attention", "sla", "--topk", "1.5"], r"^zoo generate-video: error: --topk: topk must be"),
    (["--pipeline", "{wan}", "--prompt", "x", "--attention", "radial", "--decay-factor", "-1"], r"--decay-factor: decay_factor must be a finite number >= 0"),
    (["--pipeline", "{wan}", "--prompt", "x", "--attention", "radial", "--dense-steps", "-2"], r"--dense-steps: dense_timesteps must be an int >= 0"),
    (["--pipeline", "{wan}", "--prompt", "x", "--attention", "radial", "--topk", "0.1"], r"--topk applies to --attention sla, not radial"),
    (["--pipeline", "{wan}", "--prompt", "x", "--block-size", "8"], r"--block-size applies to --attention radial or sla, not dense"),
    (["--pipeline", "{wan}", "--prompt", "x", "--height", "20", "--width", "64", "--frames", "5"], r"WanPipeline: .*divisible by 16"),
])
def test_one_line_errors(capsys, folders, tmp_path, argv, pattern):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text('{"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}')
    if "{tmp}/image" in argv:
        tiny_image_pipeline(tmp_path / "image")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{wan}", str(folders / "wan")) for a in argv]
    code, err = run(capsys, "generate-video", *argv, "--steps", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "v.gif"))
    lines = err.strip().splitlines()
    assert code in (1, 2) and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "v.gif").exists()
