"""Argument checks shared by the ops: each error names the argument, its value and the fix."""
from __future__ import annotations

import math
import os

import torch

SEQUENCE_LAYOUT = "[batch, heads, seq_len, head_dim]"  # the sequence ops' layout (see zoo.ops)


def check_tensor(name: str, t: torch.Tensor, ndim: int | tuple[int, ...], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.ndim not in dims:
        raise ValueError(f"{name} must have rank {' or '.join(map(str, dims))} {layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # where torch.is_autocast_enabled(device) may be asked


def autocast_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on for their device, as SDPA is cast.

    Inside `torch.autocast`, projections give bf16/fp16 but norms and rotary embeddings may give
    float32; casting here keeps q, k, v in one dtype and lets the fused kernels run.
    """
    device = getattr(tensors[0], "device", None)
    device = device.type if device is not None else None
    # a fixed tuple rather than torch.amp.is_autocast_available, which dynamo cannot trace in torch <= 2.11
    if device not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], dtype: bool = True) -> None:
    """Same device (and, with `dtype`, same dtype) for all tensors."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if dtype and t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}: cast them to one dtype")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")


def empty_output(shape: tuple[int, ...], dtype: torch.dtype, *inputs: torch.Tensor | None) -> torch.Tensor:
    """Zeros of `shape` kept in the autograd graph of `inputs` (their gradients are zeros).

    For calls with no work (batch 0, no queries, no keys): as `F.scaled_dot_product_attention`,
    the op returns a correctly shaped output, zeros where a query sees no key, that backward accepts.
    """
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    out = tensors[0].new_zeros(shape, dtype=dtype)
    for t in tensors:
        if t.requires_grad:
            out = out + t.reshape(-1)[:0].sum().to(dtype)  # an empty sum: exactly 0, never NaN
    return out


MAX_ALLOCATION_ENV = "ZOO_MAX_ALLOCATION_GB"
DEFAULT_MAX_ALLOCATION_GB = 64.0  # far above any real call's masks and aggregates, below what exhausts a host


def max_allocation_bytes() -> int:
    """The largest single working allocation an op may ask for: `$ZOO_MAX_ALLOCATION_GB` (default 64) GB."""
    raw = os.environ.get(MAX_ALLOCATION_ENV, "")
    try:
        limit = float(raw) if raw else DEFAULT_MAX_ALLOCATION_GB
    except ValueError:
        raise ValueError(f"{MAX_ALLOCATION_ENV} must be a number of GB, got {raw!r}") from None
    if not limit > 0 or not math.isfinite(limit):
        raise ValueError(f"{MAX_ALLOCATION_ENV} must be a positive finite number of GB, got {raw!r}")
    return int(limit * 1e9)


def check_allocation(what: str, n_bytes: int, fix: str) -> None:
    """Refuse, before allocating, an op working set of `n_bytes` above `max_allocation_bytes()`.

    Absurd sizes (a 39 TB block mask) otherwise fail late with an allocator error or swap the host.
    """
    limit = max_allocation_bytes()
    if n_bytes > limit:
        raise ValueError(
            f"{what} would need {format_bytes(n_bytes)} (limit {format_bytes(limit)}, set {MAX_ALLOCATION_ENV} "
            f"to raise it): {fix}"
        )


def format_bytes(n_bytes: float) -> str:
    """`n_bytes` in decimal units, e.g. 39.1 TB."""
    units = ("B", "KB", "MB", "GB", "TB", "PB", "EB")
    power = min(len(units) - 1, max(0, int(math.log10(max(n_bytes, 1)) // 3)))
    return f"{n_bytes / 1000 ** power:.1f} {units[power]}"


def check_scale(name: str, value: float | None) -> None:
    """None (the op's default) or a finite positive number: a NaN or infinite scale gives NaN/zero outputs."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number or None (head_dim ** -0.5), got {value!r}")


def positive_int_pair(name: str, value: int | tuple[int, int], pair: str) -> tuple[int, int]:
    """`value` or `(value, value)` as two ints >= 1 (block sizes, regions per side); `pair` names the two."""
    try:
        values = (value, value) if isinstance(value, int) else tuple(value)  # tuples, lists, config lists
    except TypeError:
        values = ()
    if len(values) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in values):
        raise ValueError(f"{name} must be a positive int or {pair} of positive ints, got {value!r}")
    return values


def block_size_pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    """(block_q, block_k) of a block-sparse op's `block_size` argument."""
    return positive_int_pair("block_size", block_size, "(block_q, block_k)")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v `[batch, heads, seq_len, head_dim]`: same dtype/device, matching batch/heads, k/v lengths, q/k dims."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4, SEQUENCE_LAYOUT)
    check_same(("q", "k", "v"), (q, k, v))
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree in batch/heads")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} tokens but v has {v.shape[2]}: keys and values must pair up")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head_dim {q.shape[-1]} != k head_dim {k.shape[-1]}: q and k must share head_dim")
