"""Neighborhood attention through PyTorch FlexAttention: the benchmark baseline and a backend.

The semantics are exactly `zoo.ops.na.naive`'s (per-axis dilation groups of unequal length, windows
shifted inward at borders, even kernels, stride leaders, per-axis causal, RPB after scaling,
additional keys/values in the same softmax). They are written twice on purpose: as a `mask_mod`
and a `score_mod` of the flattened (row-major) token index, evaluated in-kernel by Flex, while the
reference gathers from per-axis tables; tests/test_ops_na_flex.py checks one against the other.

* mask_mod: the per-axis window of the query (its group, stride leader, clamped start) is computed
  arithmetically from the query coordinate, and the key must lie in it on every axis. Additional
  keys/values are appended after the N spatial keys; every query sees key indices >= N.
* score_mod: `rpb[h, dk_0 + k_0 - 1, ...]` with dk the key-query offset in group coordinates,
  nothing on the additional keys.
* GQA/MQA: Flex's `enable_gqa` (query head h reads kv head h // (heads / heads_kv), as the reference).
* return_lse: Flex's logsumexp, which it already returns in natural-log units (it converts its
  base-2 statistics), as the reference.

Tokens are not permuted: the block mask is built on the row-major order, as NATTEN's Flex backend does
without tile shapes. Block masks are cached by `_block_mask`, a `functools.lru_cache` on a pure
function of the geometry (no other module state); the compiled `flex_attention` is cached likewise.

Limits (`flex_can_run` reports them): Flex has no backward on CPU/MPS, and its compiled GPU kernels
need head_dim >= 16 for q/k and v.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from .naive import BoolArg, IntArg, check_against_shape, normalize_args

Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]


def _at_most(x: torch.Tensor, bound: torch.Tensor | int) -> torch.Tensor:
    return torch.minimum(x, bound) if isinstance(bound, torch.Tensor) else x.clamp_max(bound)


def _axis_window(i: torch.Tensor, length: int, kernel: int, dilation: int, stride: int, causal: bool):
    """Group, in-group index and inclusive window [lo, hi] (group coordinates) of coordinate `i` on one axis."""
    if dilation > 1:
        group, inner = i % dilation, i // dilation
        group_len = torch.where(group < length % dilation, length // dilation + 1, length // dilation)
    else:
        group, inner, group_len = None, i, length
    if causal:
        leader = inner if stride == 1 else _at_most((inner // stride) * stride + stride - 1, group_len - 1)
        return group, inner, leader - kernel + 1, inner
    leader = inner if stride == 1 else _at_most((inner // stride) * stride + stride // 2, group_len - 1)
    start = _at_most((leader - kernel // 2).clamp_min(0), group_len - kernel)
    return group, inner, start, start + kernel - 1


def _coords(idx: torch.Tensor, spatial: Sequence[int]) -> list[torch.Tensor]:
    """Row-major coordinates of a flattened token index (wrapped into range for indices >= N)."""
    out, stride = [], math.prod(spatial)
    for length in spatial:
        stride //= length
        out.append((idx // stride) % length)
    return out


def na_mask_mod(geometry: Geometry, n_extra: int = 0) -> Callable:
    """Flex `mask_mod` of NA on row-major flattened tokens; key indices >= N are the additional keys."""
    spatial, kernel, dilation, stride, causal = geometry
    n_tokens = math.prod(spatial)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = None
        for axis, (qc, kc) in enumerate(zip(_coords(q_idx, spatial), _coords(kv_idx, spatial))):
            d = dilation[axis]
            group, _, lo, hi = _axis_window(qc, spatial[axis], kernel[axis], d, stride[axis], causal[axis])
            inner_key = kc // d if d > 1 else kc
            ok = (inner_key >= lo) & (inner_key <= hi)
            if group is not None:
                ok = ok & (kc % d == group)
            allowed = ok if allowed is None else allowed & ok
        return allowed | (kv_idx >= n_tokens) if n_extra else allowed

    return mask_mod


def na_score_mod(geometry: Geometry, rpb: torch.Tensor, n_extra: int = 0) -> Callable:
    """Flex `score_mod` adding the relative position bias `rpb [heads, 2k-1, ...]` (scores are already scaled)."""
    spatial, kernel, dilation, _, _ = geometry
    n_tokens = math.prod(spatial)
    table = rpb.reshape(rpb.shape[0], -1)
    table_strides = [math.prod(2 * k - 1 for k in kernel[a + 1:]) for a in range(len(kernel))]

    def score_mod(score, b, h, q_idx, kv_idx):
        index = None
        for axis, (qc, kc) in enumerate(zip(_coords(q_idx, spatial), _coords(kv_idx, spatial))):
            d, k = dilation[axis], kernel[axis]
            offset = (kc // d - qc // d) if d > 1 else kc - qc
            part = (offset + k - 1).clamp(0, 2 * k - 2) * table_strides[axis]  # clamped: masked pairs read in range
            index = part if index is None else index + part
        biased = score + table[h, index]
        return torch.where(kv_idx < n_tokens, biased, score) if n_extra else biased

    return score_mod


@functools.lru_cache(maxsize=32)
def _block_mask(geometry: Geometry, n_extra: int, device: str) -> BlockMask:
    """The block mask of one geometry, built once per (geometry, extra keys, device)."""
    n_tokens = math.prod(geometry[0])
    # compiled on GPU: the eager builder materialises the full N x N mask (tens of GB at video sizes)
    return create_block_mask(na_mask_mod(geometry, n_extra), None, None, n_tokens, n_tokens + n_extra, device=device,
                             _compile=torch.device(device).type == "cuda")


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def flex_can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compile: bool = True) -> str | None:
    """None when `na_flex` can run on these inputs, else the reason it cannot (one line)."""
    if not torch._dynamo.is_dynamo_supported():
        return "FlexAttention needs TorchDynamo, which this Python version does not support"
    device = q.device.type
    if device not in ("cuda", "cpu", "xpu", "hpu", "mps"):
        return f"FlexAttention does not run on {device} tensors"
    if device in ("cpu", "mps") and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return f"FlexAttention has no backward on {device}: call it under torch.no_grad() or use the reference"
    if compile and device == "cuda" and min(q.shape[-1], v.shape[-1]) < 16:
        return f"compiled FlexAttention needs head_dim >= 16 for q/k and v, got {q.shape[-1]} and {v.shape[-1]}"
    return None


def na_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    na_dim: int,
    kernel_size: IntArg,
    dilation: IntArg = 1,
    stride: IntArg = 1,
    is_causal: BoolArg = False,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    return_lse: bool = False,
    compile: bool = True,
):
    """N-d neighborhood attention with FlexAttention; arguments and result as `zoo.ops.na2d` (heads-last).

    `compile=False` runs Flex eagerly (it materialises the scores: small inputs, CPU tests).
    k, v and the additional keys/values are cast to q's dtype (Flex's backward needs one dtype), rpb to
    float32 (float64 for float64 q).
    """
    if q.dim() != na_dim + 3 or k.dim() != na_dim + 3 or v.dim() != na_dim + 3:
        raise ValueError(f"q, k, v must be [batch, *{na_dim} spatial, heads, head_dim], got {q.dim()}-D, "
                         f"{k.dim()}-D and {v.dim()}-D tensors")
    if k.shape[:-1] != v.shape[:-1] or k.shape[:-2] != q.shape[:-2] or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and spatial must agree, "
                         "k and v heads too, and q heads must be a multiple of k/v heads")
    reason = flex_can_run(q, k, v, compile)
    if reason:
        raise ValueError(f"na_flex cannot run: {reason}")
    kernel, dil, strd, causal = normalize_args(na_dim, kernel_size, dilation, stride, is_causal)
    batch, *spatial, heads, dim = q.shape
    check_against_shape(spatial, kernel, dil)
    geometry = (tuple(spatial), kernel, dil, strd, causal)
    if rpb is not None and tuple(rpb.shape) != (heads, *(2 * kk - 1 for kk in kernel)):
        raise ValueError(f"rpb must have shape [heads, 2k-1, ...] = {(heads, *(2 * kk - 1 for kk in kernel))}, "
                         f"got {tuple(rpb.shape)}")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("pass both additional_keys and additional_values, or neither")

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, ..., h, D] -> [B, h, tokens, D]
        return t.reshape(batch, -1, t.shape[-2], t.shape[-1]).transpose(1, 2).to(q.dtype)

    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    n_extra = 0
    if additional_keys is not None:
        if additional_keys.shape[1] != additional_values.shape[1]:
            raise ValueError(f"additional_keys has {additional_keys.shape[1]} tokens, additional_values "
                             f"{additional_values.shape[1]}: they must match")
        n_extra = additional_keys.shape[1]
        kh = torch.cat([kh, heads_first(additional_keys)], dim=2)
        vh = torch.cat([vh, heads_first(additional_values)], dim=2)
    block_mask = _block_mask(geometry, n_extra, str(q.device))
    # the bias stays float32 for half inputs: Flex's kernels compute scores in float32
    score_mod = None if rpb is None else na_score_mod(geometry, rpb.to(torch.promote_types(q.dtype, torch.float32)),
                                                      n_extra)
    attend = _compiled_flex() if compile else flex_attention
    scale = dim ** -0.5 if scale is None else float(scale)
    result = attend(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale,
                    enable_gqa=kh.shape[1] != heads, return_aux=AuxRequest(lse=True) if return_lse else None)
    out = (result[0] if return_lse else result).transpose(1, 2).reshape(batch, *spatial, heads, v.shape[-1])
    if return_lse:
        return out, result[1].lse.transpose(1, 2).reshape(batch, *spatial, heads)
    return out
