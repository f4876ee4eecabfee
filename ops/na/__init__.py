"""Neighborhood attention with NATTEN's functional API (`na1d`, `na2d`, `na3d`), plus the
relative position bias NATTEN >= 0.20 dropped and every NAT/DiNAT checkpoint needs."""
from __future__ import annotations

import torch

from .naive import BoolArg, IntArg, axis_neighbors, na_legacy_pad, neighborhood_attention


def _na(na_dim: int):
    def op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: IntArg,
        dilation: IntArg = 1,
        stride: IntArg = 1,
        is_causal: BoolArg = False,
        rpb: torch.Tensor | None = None,
        scale: float | None = None,
        additional_keys: torch.Tensor | None = None,
        additional_values: torch.Tensor | None = None,
        return_lse: bool = False,
    ):
        return neighborhood_attention(
            q, k, v, na_dim, kernel_size, dilation=dilation, stride=stride, is_causal=is_causal, rpb=rpb,
            scale=scale, additional_keys=additional_keys, additional_values=additional_values, return_lse=return_lse,
        )

    axes = ("L", "X, Y", "X, Y, Z")[na_dim - 1]
    op.__name__ = op.__qualname__ = f"na{na_dim}d"
    op.__doc__ = f"""{na_dim}-D neighborhood attention (NATTEN semantics, see `zoo.ops.na.naive`).

    Args:
        q: `[batch, {axes}, heads, head_dim]` (NATTEN's heads-last layout).
        k, v: `[batch, {axes}, heads_kv, head_dim]` and `[..., head_dim_v]`; heads_kv divides heads
            (GQA/MQA: kv head j serves query heads j * heads / heads_kv ...).
        kernel_size, dilation, stride: int or one int per axis; kernel_size * dilation must not
            exceed the axis, stride <= kernel_size (stride = kernel_size is blocked attention).
        is_causal: bool or one per axis.
        rpb: optional NAT/DiNAT relative position bias `[heads, 2k-1, ...]`, added after scaling
            (any float dtype: it is cast to the computation dtype, float32 or float64).
        scale: logit scale, default head_dim ** -0.5.
        additional_keys, additional_values: optional `[batch, num_extra, heads_kv, head_dim(_v)]`
            tokens every query attends to, in the same softmax.
        return_lse: also return the log-sum-exp of each query's logits, `[batch, {axes}, heads]`.
    """
    return op


na1d = _na(1)
na2d = _na(2)
na3d = _na(3)

__all__ = ["na1d", "na2d", "na3d", "na_legacy_pad", "axis_neighbors", "neighborhood_attention"]
