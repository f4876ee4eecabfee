"""Bi-level routing attention (BiFormer): region-level top-k routing, then token attention."""
from __future__ import annotations

import torch

from .naive import bi_level_routing_attention_reference, bra_routing, region_geometry


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

    Memory: one region-ordered copy of q, k, v; the attention runs on
    `zoo.ops.block_sparse_attention` with the routed regions as block indices, so K/V are never
    copied per routed region.
    """
    return bi_level_routing_attention_reference(q, k, v, n_win, topk, scale=scale, return_routing=return_routing)


__all__ = ["bi_level_routing_attention", "bra_routing", "region_geometry"]
