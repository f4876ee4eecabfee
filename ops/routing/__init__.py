"""Bi-level routing attention (BiFormer): region-level top-k routing, then token attention."""
from __future__ import annotations

import torch

from .naive import (
    bi_level_routing_attention_reference,
    bi_level_routing_backend,
    bra_routing,
    region_geometry,
    region_slots,
)


def bi_level_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: int | tuple[int, int],
    topk: int,
    scale: float | None = None,
    return_routing: bool = False,
):
    """Bi-level routing attention: each region's queries attend to the tokens of its top-k regions.

    The map is cut into `n_win x n_win` regions; region queries/keys are the means of their
    tokens' q/k (all heads' channels together); each region routes, without gradient, to the
    `topk` regions of largest `(q_r * scale) . k_r`; then softmax attention of its tokens over
    the routed regions' tokens. Any `H, W`: partial border regions have their missing tokens
    masked (see `zoo.ops.routing.naive` for the exact rule and the legacy padding).

    Args:
        q, k: `[batch, height, width, heads, head_dim]`.
        v: `[batch, height, width, heads, head_dim_v]`.
        n_win: regions per side, int or `(n_h, n_w)`.
        topk: routed regions per region, `1 <= topk <= n_h * n_w`.
        scale: softmax scale, default `head_dim ** -0.5`. Faithful: the released BiFormer models
            use the full-width `(heads * head_dim) ** -0.5` (rayleizhu/BiFormer:ops/bra_legacy.py);
            their layers pass it explicitly.
        return_routing: also return the routing, int64 `[batch, n_h * n_w, topk]` (-1 = none).

    Returns:
        `[batch, height, width, heads, head_dim_v]` (and the routing if asked).

    Backend: on CUDA for float16/bfloat16 and head_dim 32/64/128 (`bi_level_routing_backend` says),
    every region size runs on the Triton block-sparse kernel: a region takes `region_slots(R)` token
    slots (16, 32, 64 or a multiple of 64: whole kernel tiles), the kernel's lists are the routed
    regions themselves, and the extra slots (and the missing tokens of partial border regions) are
    masked keys, masked in-kernel only in the tiles that hold them. Otherwise the exact PyTorch
    reference of `zoo.ops.block_sparse_attention` runs, with exactly R slots per region.

    Memory: one region-ordered copy of q, k, v (padded to whole regions, and on the kernel path to
    `region_slots(R)` slots per region: x 16/R for regions under 16 tokens, e.g. x4 for BiFormer's
    2x2-token regions, ~3% for 37x37 ones), plus the output in that layout; nothing else grows with
    `topk`: K and V are never copied per routed region (the official gather holds `topk` copies).
    The kernel keeps only O and the log-sum-exp for backward; the reference's working set is bounded
    by its chunking.
    """
    return bi_level_routing_attention_reference(q, k, v, n_win, topk, scale=scale, return_routing=return_routing)


__all__ = ["bi_level_routing_attention", "bi_level_routing_backend", "bra_routing", "region_geometry", "region_slots"]
