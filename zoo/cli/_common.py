"""Shared pieces of the generation / classification commands: flags, device, model loading.

Errors meant for the user are `CliError` with one line that says what to do.
"""
from __future__ import annotations

import argparse
import math
import os
from contextlib import nullcontext
from pathlib import Path

from . import CliError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples verbatim in the epilog, defaults shown after each flag: unless its help already says the default, or
    the default is None / False (an unset flag whose meaning the help or the description gives, never 'None')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse `type` that reads an int or a finite float in [low, high] (or (low, high] with `low_open`).

    argparse reports its message as `argument --steps: must be an integer >= 1, got -5`.
    """
    noun = "an integer" if kind is int else "a finite number"
    bounds = " and ".join(b for b in ((f"> {low}" if low_open else f">= {low}") if low is not None else "",
                                       f"<= {high}" if high is not None else "") if b)
    expected = f"{noun} {bounds}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse's fallback message names the type
    return parse


SEED = number(int, 0, 2**32 - 1)


def add_common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (autocast for bf16/fp16)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or info lines")
    if seed:
        p.add_argument("--seed", type=SEED, default=0, help="random seed: the same seed on the same device gives the same output")


def add_model_source(p: argparse.ArgumentParser, default: str | None,
                     checkpoint: str = "load these weights (safetensors, .pth or Lightning .ckpt) instead of the registered ones") -> None:
    p.add_argument("--model", "-m", default=default, help="model name (`zoo list`), optionally arch.tag")
    p.add_argument("--checkpoint", default=None, help=checkpoint)
    p.add_argument("--random-init", action="store_true", help="use untrained weights (for smoke tests and timing)")


def device_of(args: argparse.Namespace):
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError("--device cuda but no CUDA GPU is visible; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError("--device mps but no Apple MPS device is available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {name!r}: the zoo runs on cpu, cuda or cuda:N (or mps)")
    return device


def autocast(args: argparse.Namespace, device):
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        import sys

        print(message, file=sys.stderr)


def check_model_name(name: str, kind: str | None = None):
    """The registry entry of `name`; unknown names get the closest ones suggested."""
    from zoo._registry import get_entry

    try:
        entry = get_entry(name)
    except ValueError as e:
        raise CliError(str(e)) from None
    if kind and entry.kind != kind:
        raise CliError(f"{name} is a {entry.kind}, not a {kind}; `zoo list` shows the models")
    return entry


def check_na_kernel(model, kernel: list[int], name: str) -> None:
    """--na-kernel (one value for every axis, or one per axis) fits the DiT's token grid: a larger kernel would build
    and then fail in the first forward pass."""
    patch = model.patch_size if isinstance(model.patch_size, (tuple, list)) else [model.patch_size] * len(model.input_size)
    grid = [s // p for s, p in zip(model.input_size, patch)]
    if any(k > g for k, g in zip(kernel * len(grid) if len(kernel) == 1 else kernel, grid)):
        axes = "(frames, height, width)" if len(grid) == 3 else "(height, width)"
        raise CliError(f"--na-kernel {' '.join(map(str, kernel))} exceeds the token grid {grid} {axes} "
                       f"of {name}: use a kernel no larger than the grid on each axis")


def recorded_model(args: argparse.Namespace) -> dict:
    """The architecture and model arguments recorded with --checkpoint (an export's JSON, a `zoo train` checkpoint's
    hyper-parameters), or {}."""
    from zoo import weights

    if not args.checkpoint:
        return {}
    try:
        return weights.recorded_model(args.checkpoint) or {}
    except weights.WeightsError as e:
        raise CliError(f"--checkpoint {e}") from None


def model_name(args: argparse.Namespace, default: str) -> str:
    """--model, else the architecture recorded with --checkpoint, else `default`."""
    return args.model or recorded_model(args).get("architecture") or default


def no_weights_message(name: str) -> str:
    return (f"{name} has no pretrained weights registered: pass --checkpoint PATH (e.g. a file written by "
            f"`zoo train ... export=PATH`), or --random-init for an untrained model")


def load_cli_weights(args: argparse.Namespace, model, name: str, attention: str | None = None) -> tuple[str, dict]:
    """Load --checkpoint or the registered weights of `name` into `model`, through `zoo.weights.load_weights`.

    Without a tag, the registered weights are the arch's default ones, or those fine-tuned for `attention`
    (`zoo.factory.default_weights`); a checkpoint trained with one attention loads into another (the model's
    own converter), so dense weights run with radial / SLA / NA when no fine-tuned ones are registered.
    Returns the source and the weights' cfg (the registered entry's, or the `pretrained_cfg` that
    `zoo.weights.export` wrote next to --checkpoint or a Lightning checkpoint holds, else {}): sampling
    settings the weights were trained with, such as `flow_shift`.
    """
    from zoo import weights
    from zoo._registry import split_name
    from zoo.factory import default_weights

    if args.random_init:
        return "random init (untrained)", {}
    if args.checkpoint:
        try:
            loaded = weights.load_weights(model, Path(args.checkpoint), arch=split_name(name)[0], progress=not args.quiet)
        except weights.WeightsError as e:
            raise CliError(f"--checkpoint {e}") from None
        return loaded.source, loaded.cfg
    registered = default_weights(name, attention)
    if registered is None:
        raise CliError(no_weights_message(name))
    try:
        loaded = weights.load_weights(model, registered, progress=not args.quiet)
    except weights.WeightsError as e:
        raise CliError(f"{e}; or pass --checkpoint PATH, or --random-init for an untrained model") from None
    return loaded.source, loaded.cfg


def writable_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CliError(f"--out-dir {path} is a file; give a folder (created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create --out-dir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise CliError(f"cannot write into --out-dir {path}: permission denied")
    return path
