"""`zoo generate` (class-conditional images from a DiT) and `zoo generate-video` (video DiT, or a diffusers
video pipeline folder with `--pipeline`)."""
from __future__ import annotations

import argparse
import time

from . import CliError, video_pipeline
from ._common import (
    HelpFormatter,
    add_common,
    add_model_source,
    autocast,
    check_model_name,
    check_na_kernel,
    device_of,
    info,
    load_cli_weights,
    model_name,
    number,
    recorded_model,
    writable_dir,
)

COUNT = number(int, 1)
CLASS_ID = number(int, 0)
GUIDANCE = number(float, 0)

DEFAULT_IMAGE_MODEL = "dit_s_2_mnist"
DEFAULT_VIDEO_MODEL = "video_dit_s_2_mmnist"

IMAGE_EXAMPLES = """examples:
  zoo generate --classes 3 7 1 --num-per-class 4 --out samples.png        # the embedded MNIST DiT, on CPU in seconds
  zoo generate --classes 0 1 2 --out-dir samples/ --scheduler dpm --steps 20
  zoo generate --model dit_xl_2 --classes 207 360 --guidance 4.0 --vae ema --device cuda --out dogs.png
  zoo generate --model dit_s_2 --random-init --model-arg input_size=16 --model-arg in_channels=3 --steps 2 --out noise.png"""

VIDEO_EXAMPLES = """examples:
  zoo generate-video --classes 3 --out three.mp4                          # the embedded Moving-MNIST video DiT
  zoo generate-video --attention radial --classes 1 7 --out video.gif     # the radial fine-tune, as a GIF
  zoo generate-video --attention sla --frames 16 --steps 30 --seed 0 --out sla.mp4
  zoo generate-video --pipeline ./Wan2.1-T2V-1.3B-Diffusers --prompt "a cat runs on the beach" --attention radial \\
      --decay-factor 0.2 --dense-steps 12 --dense-layers 1 --frames 81 --height 480 --width 832 --dtype bf16 --out cat.mp4"""

DEFAULT_VIDEO_STEPS = 30
DEFAULT_VIDEO_GUIDANCE = 2.0


def _model_args(pairs: list[str]) -> dict:
    """`key=value` pairs, values parsed as YAML (ints, floats, lists)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--model-arg {pair!r} is not key=value (e.g. --model-arg depth=6)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise CliError(f"--model-arg {pair!r}: the value is not YAML ({str(e).splitlines()[0]}); e.g. --model-arg input_size=[16,32,32]") from None
    return out


def _exported_args(args: argparse.Namespace, name: str) -> dict:
    """The model arguments recorded with --checkpoint (same architecture only)."""
    meta = recorded_model(args)
    return dict(meta.get("model_args", {})) if meta.get("architecture") == name.partition(".")[0] else {}


def _labels(args: argparse.Namespace, num_classes: int) -> list[int]:
    bad = [c for c in args.classes if not 0 <= c < num_classes]
    if bad:
        raise CliError(f"--classes {bad}: this model knows classes 0..{num_classes - 1}")
    return [c for c in args.classes for _ in range(args.num_per_class)]


def _build(args: argparse.Namespace, default: str, **kwargs):
    import zoo

    name = model_name(args, default)
    check_model_name(name, kind="generator")
    kwargs = {**_exported_args(args, name), **_model_args(getattr(args, "model_arg", None)), **kwargs}
    try:
        model = zoo.create_model(name.partition(".")[0], **kwargs)
    except (TypeError, ValueError) as e:
        raise CliError(f"--model-arg: {e}" if getattr(args, "model_arg", None) else f"{name}: {e}") from None
    return name, model


def load_vae(name: str, device):
    """The SD VAE `--vae name` decodes latents with, from the Hugging Face cache; offline (HF_HUB_OFFLINE or
    ZOO_OFFLINE) an uncached one is refused at once with what to download, as the weight registry does."""
    from huggingface_hub import try_to_load_from_cache

    from zoo.dit.diffusion import VAE_SOURCES, load_vae
    from zoo.weights import offline_mode

    repo = VAE_SOURCES[name]
    fix = f"download it with `huggingface-cli download {repo}` (into the Hugging Face cache), or pass --vae none for raw latents"
    if offline_mode() and not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        raise CliError(f"--vae {name}: offline mode and {repo} is not cached; {fix}")
    try:
        return load_vae(name, device)
    except Exception as e:  # hub / network errors come in many types; all mean the same to the user
        raise CliError(f"--vae {name}: could not load {repo} ({type(e).__name__}: {str(e).splitlines()[0]}); {fix}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from zoo import dit, media

    if not args.out and not args.out_dir:
        raise CliError("give --out FILE.png and/or --out-dir DIR")
    out = media.check_writable(args.out, (".png",)) if args.out else None
    out_dir = writable_dir(args.out_dir) if args.out_dir else None
    device = device_of(args)
    name, model = _build(args, DEFAULT_IMAGE_MODEL)
    if len(getattr(model, "input_size", ())) != 2:
        raise CliError(f"{name} is a video model: use `zoo generate-video --model {name}`")
    source, _ = load_cli_weights(args, model, name)
    labels = _labels(args, model.num_classes)
    vae = None if args.vae in ("none", "auto") else args.vae
    if args.vae == "auto" and model.in_channels == 4:
        vae = "ema"  # the official latent DiTs decode through the SD VAE
    info(args, f"{name}: {source}; {len(labels)} samples, {args.steps} {args.scheduler} steps, guidance {args.guidance}, {device}")
    if vae is not None:  # before sampling: a missing decoder fails at once
        vae = load_vae(vae, device)
    model.to(device).eval()
    torch.manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        with autocast(args, device):
            x = dit.sample(model, labels, num_steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                           vae=vae, generator=g, progress=not args.quiet, guidance_channels="all" if model.in_channels < 3 else 3)
    except ValueError as e:
        raise CliError(str(e)) from None
    x = x.float().cpu()
    images = x * 2 - 1 if vae is not None else x  # decoded images are in [0, 1], pixel-space samples in [-1, 1]
    if out is not None:
        media.save_grid(images, out, nrow=args.num_per_class)
        info(args, f"wrote {out} ({len(labels)} samples, {time.perf_counter() - start:.1f} s)")
    if out_dir is not None:
        for i, (img, c) in enumerate(zip(images, labels)):
            media.save_image(img, out_dir / f"{i:03d}_class{c}.png")
        info(args, f"wrote {len(labels)} files to {out_dir}")
    return 0


def attention_sparsity(model) -> str:
    """The share of query-key pairs the backends skip, averaged over layers, as each backend counts it."""
    grid = tuple(s // p for s, p in zip(model.input_size, model.patch_size))
    fractions = [block.attn.backend.skipped_fraction(grid) for block in model.blocks]
    return f"{100 * sum(fractions) / max(1, len(fractions)):.1f}% of attention skipped (mean over {len(fractions)} layers)"


def _create_video(name: str, kwargs: dict, args: argparse.Namespace):
    import zoo

    try:
        model = zoo.create_model(name.partition(".")[0], **kwargs)
    except ImportError as e:
        raise CliError(f"--attention {args.attention}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CliError(f"{name} with --attention {args.attention}" + (f" --frames {args.frames}" if args.frames else "") + f": {e}") from None
    if len(getattr(model, "input_size", ())) != 3:
        raise CliError(f"{name} is an image model: use `zoo generate --model {name}`")
    return model


def cmd_generate_video(args: argparse.Namespace) -> int:
    import torch

    from zoo import dit, media

    if args.pipeline is not None:
        return video_pipeline.cmd_generate_pipeline(args)
    video_pipeline.check_dit_arguments(args)
    out = media.check_writable(args.out, (".mp4", ".gif"))
    device = device_of(args)
    name = model_name(args, DEFAULT_VIDEO_MODEL)
    check_model_name(name, kind="generator")
    if args.attention not in dit.attention_backends():
        raise CliError(f"--attention {args.attention!r}: {name} supports {', '.join(dit.attention_backends())}")
    kwargs = dict(_exported_args(args, name), **_model_args(args.model_arg), attention=args.attention)
    if args.attention == "na":
        kwargs["attention_kwargs"] = {"kernel_size": args.na_kernel}
    model = _create_video(name, kwargs, args)
    if args.frames is not None and args.frames != model.input_size[0]:
        pf = model.patch_size[0]
        if args.frames % pf:
            raise CliError(f"--frames {args.frames}: {name} needs a multiple of its temporal patch size {pf}")
        model = _create_video(name, dict(kwargs, input_size=(args.frames, *model.input_size[1:])), args)
    frames = model.input_size[0]
    if args.attention == "na":
        check_na_kernel(model, args.na_kernel, name)
    source, weights_cfg = load_cli_weights(args, model, name, attention=args.attention)
    labels = _labels(args, model.num_classes)
    info(args, f"{name}: {source}; attention {args.attention}: {attention_sparsity(model)}")
    model.to(device).eval()
    torch.manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    shift = args.shift if args.shift is not None else weights_cfg.get("flow_shift", 3.0)
    start = time.perf_counter()
    try:
        with autocast(args, device):
            videos = dit.sample_video(model, labels, num_steps=args.steps or DEFAULT_VIDEO_STEPS,
                                      guidance_scale=DEFAULT_VIDEO_GUIDANCE if args.guidance is None else args.guidance,
                                      scheduler=args.scheduler, shift=shift, generator=g, progress=not args.quiet)
    except ValueError as e:
        raise CliError(str(e)) from None
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    media.save_video(media.video_grid(videos.float().cpu(), nrow=args.num_per_class), out, fps=args.fps)
    info(args, f"wrote {out}: {len(labels)} video(s) of {frames} frames; sampling took {seconds:.1f} s on {device}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="class-conditional images from a DiT (PNG grid or files)",
                       description="Generate class-conditional images with a DiT. Without --model, the embedded "
                       f"{DEFAULT_IMAGE_MODEL} (trained on MNIST digits) runs on CPU in seconds.",
                       epilog=IMAGE_EXAMPLES, formatter_class=HelpFormatter)
    add_model_source(p, None)
    p.add_argument("--classes", type=CLASS_ID, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], help="class ids")
    p.add_argument("--num-per-class", type=COUNT, default=1, help="samples per class (a grid row each)")
    p.add_argument("--steps", type=number(int, 1, 1000), default=50, help="sampler steps (the DiTs trained with 1000 timesteps)")
    p.add_argument("--guidance", type=GUIDANCE, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm", "dpm"], help="diffusers scheduler")
    p.add_argument("--vae", default="auto", choices=["auto", "ema", "mse", "none"],
                   help="decoder for latent models (auto: ema for 4-channel latents, none for pixel models)")
    p.add_argument("--out", "-o", default=None, help="PNG grid (one row per class)")
    p.add_argument("--out-dir", default=None, help="also write one PNG per sample here")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra model constructor argument (repeatable)")
    add_common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("generate-video", help="videos from a video DiT or a local diffusers video pipeline (MP4 or GIF)",
                       description="Generate videos with a video DiT and a chosen attention backend; prints the "
                       "backend's sparsity and the sampling time. Without --model, the embedded "
                       f"{DEFAULT_VIDEO_MODEL} (Moving-MNIST, 16 frames of 32x32) runs on CPU. With --pipeline PATH, "
                       "a local diffusers video pipeline (Wan, HunyuanVideo, CogVideoX; no download) runs a prompt "
                       "with the zoo.diffusers plugin of --attention on its transformer(s).",
                       epilog=VIDEO_EXAMPLES, formatter_class=HelpFormatter)
    add_model_source(p, None)
    p.add_argument("--attention", default="dense", help="attention backend: dense, radial, sla or na, or one registered with "
                   "zoo.dit.register_backend before calling zoo.cli.main (zoo.dit.attention_backends() lists them); "
                   "with --pipeline, the zoo.diffusers plugin: dense, radial, sla or na")
    p.add_argument("--na-kernel", type=COUNT, nargs=3, default=[3, 7, 7], metavar=("F", "H", "W"), help="NA kernel per axis")
    p.add_argument("--frames", type=COUNT, default=None, help="frames to generate (default: the model's, or the pipeline's)")
    p.add_argument("--classes", type=CLASS_ID, nargs="+", default=[3], help="one video per class id")
    p.add_argument("--num-per-class", type=COUNT, default=1, help="videos per class")
    p.add_argument("--steps", type=COUNT, default=None,
                   help=f"sampler steps (default {DEFAULT_VIDEO_STEPS}; with --pipeline, the pipeline's)")
    p.add_argument("--guidance", type=GUIDANCE, default=None, help="classifier-free guidance scale (1 = none; default "
                   f"{DEFAULT_VIDEO_GUIDANCE}; with --pipeline, the pipeline's)")
    p.add_argument("--scheduler", default="euler", choices=["euler", "unipc"], help="flow-matching scheduler")
    p.add_argument("--shift", type=number(float, 0, low_open=True), default=None,
                   help="timestep shift (Wan's); default: the shift the weights were trained with (`flow_shift` in the "
                   "registered cfg or in the JSON beside a --checkpoint export), else 3.0 (exports that predate it)")
    p.add_argument("--fps", type=number(int, 1, 240), default=8, help="frames per second of the output")
    p.add_argument("--out", "-o", default="video.mp4", help="output .mp4 or .gif")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra model constructor argument (repeatable)")
    video_pipeline.add_arguments(p)
    add_common(p)
    p.set_defaults(func=cmd_generate_video)
