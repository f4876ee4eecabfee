"""Bi-level routing attention (BiFormer): region-level top-k routing, then token attention."""
from __future__ import annotations

import functools

import torch

from .._checks import autocast_cast
from .._cost import is_counting_flops
from ..block_sparse import BlockSparseLayout, _kernel_module
from .naive import (
    _check_inputs,
    _route,
    bi_level_routing_attention_reference,
    bi_level_routing_backend,
    bra_routing,
    has_empty_regions,
    region_geometry,
    region_slots,
    region_token_valid,
    whole_regions,
)


@functools.lru_cache(maxsize=64)
def _full_counts(shape: tuple[int, ...], topk: int, device: torch.device) -> torch.Tensor:
    """int64 counts of lists that all hold `topk` regions (cached: one launch fewer per call; never modified)."""
    return torch.full(shape, topk, dtype=torch.int64, device=device)


def bi_level_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: int | tuple[int, int],
    topk: int,
    scale: float | None = None,
    return_routing: bool = False,
    backend: str = "auto",
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
        backend: "auto" (default), "triton" or "reference" (`bi_level_routing_backend`; flash-attn-4 does not
            run routing attention: see there).

    Returns:
        `[batch, height, width, heads, head_dim_v]` (and the routing if asked).

    Backend: on CUDA for float16/bfloat16 and head_dim 32/64/128 (`bi_level_routing_backend` says),
    the Triton block-sparse kernel runs with the routed regions as its lists and reads each region as a
    2-D window of q, k, v in place (`RegionWindows`): no region-ordered copy, no padding of the map,
    and K/V are never copied per routed region (the official gather holds `topk` copies). A region
    takes `region_slots(R)` slots (16, 32, 64 or a multiple of 64: whole kernel tiles); slots past its
    tokens and the missing tokens of partial border regions are masked in-kernel. Otherwise the exact
    PyTorch reference runs (`bi_level_routing_attention_reference`, one region-ordered copy of q, k, v).
    Inside `torch.autocast`, q, k, v are cast to its dtype (as SDPA), the routing included.

    Memory (kernel path): the output, the routing and a float32 log-sum-exp per query and head.
    """
    q, k, v = autocast_cast(q, k, v)
    geometry = _check_inputs(q, k, v, n_win, topk, scale)
    if is_counting_flops() or bi_level_routing_backend(q, k, v, n_win, backend)[0] != "triton":
        return bi_level_routing_attention_reference(q, k, v, n_win, topk, scale=scale, return_routing=return_routing)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    height, width = q.shape[1:3]
    n_h, n_w, region_h, region_w = geometry
    tokens = region_h * region_w
    slots = region_slots(tokens)
    routing = _route(q, k, geometry, region_token_valid(height, width, *geometry, device=q.device), topk, scale)
    n = n_h * n_w * slots
    if has_empty_regions(height, width, geometry):  # -1 picks: lists sorted, valid entries first
        layout = BlockSparseLayout.from_checked(routing[:, None], slots, slots, n, n, transpose=False)
    else:  # every pick is a region: the top-k lists as they are (in-range and distinct by construction)
        lists = routing[:, None]
        layout = BlockSparseLayout(lists, _full_counts(tuple(lists.shape[:-1]), topk, q.device), None, None, slots,
                                   slots, n, n)
    kernel = _kernel_module()
    packed = 2 * tokens <= slots  # regions of <= 8 tokens (16 slots): list-side tiles pack several regions' tokens
    window = kernel.RegionWindows(n_w, region_h, region_w, packed=packed,
                                  masked=slots > tokens or not whole_regions(height, width, geometry))
    config = kernel.packed_config(slots, q.shape[-1]) if packed else None
    out, _ = kernel.block_sparse_attention_triton(q, k, v, layout, scale, config=config, window=window)
    return (out, routing) if return_routing else out


__all__ = ["bi_level_routing_attention", "bi_level_routing_backend", "bra_routing", "region_geometry", "region_slots"]
