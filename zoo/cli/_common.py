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
    """Examples verbatim in the epilog, defaults shown after each flag."""


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


def add_model_source(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--model", "-m", default=default, help="model name (`zoo list`), optionally arch.tag")
    p.add_argument("--checkpoint", default=None, help="load these weights (safetensors, .pth or Lightning .ckpt) instead of the registered ones")
    p.add_argument("--random-init", action="store_true", help="use untrained weights (for smoke tests and timing)")


def device_of(args: argparse.Namespace):
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError("--device cuda but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None


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


def registered_weights(name: str, entry, prefer: str | None = None):
    """The weight entry to load for `name` (`arch.tag` or the arch's default tag), or None."""
    from zoo import weights
    from zoo._registry import split_name

    arch, tag = split_name(name)
    if tag:
        return weights.get_weights(name) if weights.has_weights(name) else None
    tags = [t for t in entry.tags if weights.has_weights(f"{arch}.{t}")]
    if prefer:
        preferred = [t for t in tags if t.endswith(f"_{prefer}")]
        tags = preferred or [t for t in tags if not any(t.endswith(f"_{a}") for a in ("radial", "sla", "na"))] or tags
    return weights.get_weights(f"{arch}.{tags[0]}") if tags else None


def no_weights_message(name: str) -> str:
    return (f"{name} has no pretrained weights registered: pass --checkpoint PATH (e.g. a file written by "
            f"`zoo train ... export=PATH`), or --random-init for an untrained model")


def load_generator_weights(args: argparse.Namespace, model, name: str, entry,
                           prefer: str | None = None) -> tuple[str, dict]:
    """Load --checkpoint or the registered weights into `model` (any attention backend).

    Returns the source and the weights' cfg (the registered entry's, or the `pretrained_cfg` that
    `zoo.weights.export` wrote next to --checkpoint or a Lightning checkpoint holds, else {}): sampling
    settings the weights were trained with, such as `flow_shift`.

    A checkpoint trained with one attention loads into another (`load_state_dict_any_attention`),
    so dense weights run with radial / SLA / NA when no fine-tuned ones are registered.
    """
    from zoo import weights

    if args.random_init:
        return "random init (untrained)", {}
    cfg = {}
    if args.checkpoint:
        try:
            state, source, converter = weights.read_checkpoint(args.checkpoint), args.checkpoint, None
        except weights.WeightsError as e:
            raise CliError(f"--checkpoint {e}") from None
        cfg = (weights.recorded_model(args.checkpoint) or {}).get("pretrained_cfg", {})
    else:
        w = registered_weights(name, entry, prefer)
        if w is None:
            raise CliError(no_weights_message(name))
        try:
            path = weights.fetch_verified(w, progress=not args.quiet)
        except weights.WeightsError as e:
            raise CliError(f"{e}; or pass --checkpoint PATH, or --random-init for an untrained model") from None
        state, source, converter, cfg = weights.read_checkpoint(path), f"{w.name} ({w.describe()})", w.converter, w.cfg
    if converter is not None:
        state = converter(state, model)
    if hasattr(model, "load_state_dict_any_attention"):
        from zoo.dit import fill_backend_keys

        state = fill_backend_keys(state, model)
    try:
        weights.load_state_dict(model, state, source)
    except weights.WeightsError as e:
        raise CliError(str(e)) from None
    return source, cfg


def writable_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create --out-dir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise CliError(f"cannot write into --out-dir {path}: permission denied")
    return path
