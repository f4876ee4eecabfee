"""`zoo generate-video --pipeline PATH`: a local diffusers video pipeline with a zoo attention plugin.

The pipeline folder (`pipe.save_pretrained(PATH)`, or a downloaded Hub snapshot) is loaded with
`local_files_only=True`, so nothing is fetched. The plugin (`zoo.diffusers.apply_attention`) goes on
the pipeline's transformer, and on `transformer_2` where there is one (Wan2.2 A14B); after sampling,
one line per transformer says what it skipped (`zoo.diffusers.attention_report`).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import time
from contextlib import contextmanager
from pathlib import Path

from . import CliError
from ._common import DTYPES, device_of, info, number

# the plugin configs' fields and the flags that set them
OPTION_FLAGS = {"decay_factor": "--decay-factor", "block_size": "--block-size", "topk": "--topk",
                "dense_layers": "--dense-layers", "dense_timesteps": "--dense-steps"}
TRANSFORMERS = ("transformer", "transformer_2")  # Wan2.2 A14B: high-noise and low-noise experts


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the pipeline path (the plugin options default to the configs' own defaults)."""
    from zoo.diffusers.config import RadialAttentionConfig, SLAConfig

    p.add_argument("--pipeline", default=None, metavar="PATH",
                   help="a local diffusers video pipeline folder (Wan, HunyuanVideo, CogVideoX) to run instead of a zoo DiT; "
                   "--dtype is then the dtype it loads in")
    p.add_argument("--prompt", default=None, help="text prompt (with --pipeline)")
    p.add_argument("--height", type=number(int, 1), default=None, help="video height in pixels (with --pipeline; default: the pipeline's)")
    p.add_argument("--width", type=number(int, 1), default=None, help="video width in pixels (with --pipeline; default: the pipeline's)")
    p.add_argument("--decay-factor", type=float, default=None,
                   help=f"radial window decay for distant frames (with --pipeline; default {RadialAttentionConfig.decay_factor})")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"radial / SLA block (with --pipeline; default {RadialAttentionConfig.block_size} / {SLAConfig.block_size})")
    p.add_argument("--topk", type=float, default=None,
                   help=f"SLA share of key blocks computed exactly (with --pipeline; default {SLAConfig.topk})")
    p.add_argument("--dense-layers", type=int, default=None, help="first blocks kept dense (with --pipeline; default 0)")
    p.add_argument("--dense-steps", type=int, default=None, help="first sampler steps kept dense (with --pipeline; default 0)")


def _value(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def check_dit_arguments(args: argparse.Namespace) -> None:
    """Refuse the pipeline-only flags on the zoo DiT path (they would be silently ignored there)."""
    given = [flag for flag in ("--prompt", "--height", "--width", *OPTION_FLAGS.values()) if _value(args, flag) is not None]
    if given:
        raise CliError(f"{given[0]} needs --pipeline PATH (a diffusers pipeline); the zoo video DiTs take --classes")


def plugin_config(args: argparse.Namespace):
    """The plugin config of --attention and its flags (None for dense), validated by the config itself."""
    from zoo.diffusers import NeighborhoodAttentionConfig
    from zoo.diffusers.config import CONFIGS

    kinds = {"dense": None, **{config.kind: config for config in CONFIGS}}
    if args.attention not in kinds:
        raise CliError(f"--attention {args.attention!r}: --pipeline supports {', '.join(kinds)}")
    config_class = kinds[args.attention]
    fields = {f.name for f in dataclasses.fields(config_class)} if config_class else set()
    options = {}
    for field, flag in OPTION_FLAGS.items():
        value = _value(args, flag)
        if value is None:
            continue
        if field not in fields:
            takers = [kind for kind, c in kinds.items() if c and field in {f.name for f in dataclasses.fields(c)}]
            raise CliError(f"{flag} applies to --attention {' or '.join(takers)}, not {args.attention}")
        options[field] = value
    if config_class is None:
        return None
    if config_class is NeighborhoodAttentionConfig:
        options["kernel_size"] = tuple(args.na_kernel)
    try:
        return config_class(**options)
    except ValueError as e:
        field = next((f for f in (*OPTION_FLAGS, "kernel_size") if str(e).startswith(f)), None)
        flag = OPTION_FLAGS.get(field, "--na-kernel" if field == "kernel_size" else f"--attention {args.attention}")
        raise CliError(f"{flag}: {e}") from None


@contextmanager
def _loading_bars(show: bool):
    """Hides diffusers' and transformers' loading progress bars inside the block unless `show`; restores them after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    hidden = [] if show else [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in hidden:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in hidden:
            lib.enable_progress_bar()


def load_pipeline(path: str, dtype, progress: bool = True):
    """`DiffusionPipeline.from_pretrained(path)` from local files only; one-line errors for what is not a video pipeline."""
    from diffusers import DiffusionPipeline

    folder = Path(path)
    if not folder.is_dir():
        raise CliError(f"--pipeline {path}: no such folder (give a diffusers pipeline folder, e.g. one written by "
                       "pipe.save_pretrained(PATH) or `huggingface-cli download REPO --local-dir PATH`)")
    if not (folder / "model_index.json").is_file():
        raise CliError(f"--pipeline {path} is not a diffusers pipeline folder (it has no model_index.json); "
                       "give the folder pipe.save_pretrained(PATH) wrote")
    try:
        with _loading_bars(progress):
            pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception as e:  # diffusers / transformers / hub raise many types; all mean the folder is incomplete
        first = (str(e).strip().splitlines() or [""])[0]
        raise CliError(f"--pipeline {path}: could not load it ({type(e).__name__}: {first})") from None
    if getattr(pipe, "transformer", None) is None or "num_frames" not in inspect.signature(pipe.__call__).parameters:
        raise CliError(f"--pipeline {path} holds a {type(pipe).__name__}, not a transformer video pipeline "
                       "(Wan, HunyuanVideo or CogVideoX); use `zoo generate` or diffusers for other pipelines")
    return pipe


def apply_plugin(pipe, config, path: str) -> list[str]:
    """`apply_attention` on each of the pipeline's transformers; their names."""
    from zoo.diffusers import apply_attention

    names = [name for name in TRANSFORMERS if getattr(pipe, name, None) is not None]
    for name in names:
        try:
            apply_attention(getattr(pipe, name), config)
        except TypeError as e:
            raise CliError(f"--pipeline {path}: --attention {config.kind} cannot run in its {name}: {e}") from None
    return names


def describe(config) -> str:
    """The plugin's settings, as the info line shows them (what it skipped is reported after sampling)."""
    if config is None:
        return "dense (the pipeline's own attention)"
    settings = ", ".join(f"{k}={v}" for k, v in config.to_dict().items())
    return f"{config.kind} ({settings})"


def cmd_generate_pipeline(args: argparse.Namespace) -> int:
    import torch

    from zoo import media

    given = [flag for flag, value in (("--model", args.model), ("--checkpoint", args.checkpoint),
                                      ("--random-init", args.random_init or None), ("--model-arg", args.model_arg),
                                      ("--shift", args.shift)) if value is not None]
    if given:
        raise CliError(f"--pipeline and {given[0]} cannot be combined: --pipeline runs a diffusers pipeline folder, "
                       "--model/--checkpoint a zoo video DiT")
    if not args.prompt:
        raise CliError("--pipeline needs --prompt TEXT")
    out = media.check_writable(args.out, (".mp4", ".gif"))
    config = plugin_config(args)
    device = device_of(args)
    pipe = load_pipeline(args.pipeline, getattr(torch, DTYPES[args.dtype]), progress=not args.quiet)
    names = apply_plugin(pipe, config, args.pipeline) if config is not None else []
    attention = describe(config) + (f" in {' and '.join(names)}" if names else "")
    info(args, f"{args.pipeline}: {type(pipe).__name__} ({type(pipe.transformer).__name__}); attention {attention}")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet)
    call = {key: value for key, value in (("num_frames", args.frames), ("height", args.height), ("width", args.width),
                                          ("num_inference_steps", args.steps), ("guidance_scale", args.guidance))
            if value is not None}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        frames = pipe(prompt=args.prompt, generator=generator, output_type="pt", **call).frames
    except ValueError as e:  # the pipeline's own checks (sizes not divisible by 16, ...)
        raise CliError(f"{type(pipe).__name__}: {e}") from None
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    video = frames[0].float().cpu() * 2 - 1  # one prompt, one video: [F, C, H, W] in [0, 1] -> [-1, 1]
    media.save_video(video, out, fps=args.fps)
    info(args, f"wrote {out}: {video.shape[0]} frames of {video.shape[2]}x{video.shape[3]}; "
               f"sampling took {seconds:.1f} s on {device}")
    if names:
        from zoo.diffusers import attention_report

        for name in names:
            info(args, f"{name}: {attention_report(getattr(pipe, name))}")
    return 0
