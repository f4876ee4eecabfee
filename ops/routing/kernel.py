"""Routing attention on the Triton block-sparse kernel: the routed regions are its lists, read in place.

Each region is a 2-D window of the `[B, H, W, heads, D]` maps (`RegionWindows`), so no region-ordered copy
of q, k, v exists and K/V are never copied per routed region; a region takes `region_slots(R)` slots (whole
kernel tiles), and the kernel masks slots past its tokens and the missing tokens of partial border regions.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..block_sparse import BlockSparseLayout
from ..block_sparse import kernel as block_sparse_kernel
from ..block_sparse.kernel import largest_tile
from .regions import has_empty_regions, region_slots, region_token_valid, route, whole_regions


@dataclass(frozen=True)
class RegionWindows:
    """Mask blocks that are 2-D windows of a `[B, height, width, heads, D]` map (routing attention's regions).

    Block r is region r (row-major, `n_w` per row) of `region_h x region_w` tokens; a block has
    `block_q = block_k` slots, its tokens row-major first. `masked`: some slot holds no token (more slots
    than tokens, or partial border regions), so every tile masks its missing slots. `packed` (small
    regions, at most half their slots used): the side that walks a list (keys in forward and dq, queries
    in dk/dv) packs the tokens of consecutive listed regions into each tile instead of one padded region
    per step (BiFormer's 2x2-token regions: one 64-key step instead of 16 steps of 16 slots, 4 of them
    real); tiles then come from `packed_config`.
    """

    n_w: int
    region_h: int
    region_w: int
    masked: bool
    packed: bool = False


def packed_config(block: int, head_dim: int) -> dict[str, dict[str, int]]:
    """Tiles for `RegionWindows(packed=True)`: blocks (regions of `block` slots) on the owning side, 32 packed
    tokens on the list side, one warp per program (the tiles are tiny; more resident programs hide the gathers'
    latency). Measured on an H100 for BiFormer-S's 2x2-token regions (B 128, 8 heads x 32, top-16): fwd 0.11 ms,
    dq 0.12 ms, dk/dv 0.16 ms, against 0.29 / 0.26 / 0.33 ms with 4 warps and 64-token tiles (BENCHMARKS.md)."""
    own = largest_tile(block)
    return {"fwd": dict(BLOCK_M=own, BLOCK_N=32, num_warps=1, num_stages=2),
            "dq": dict(BLOCK_M=own, BLOCK_N=32, num_warps=1, num_stages=2),
            "dkdv": dict(BLOCK_M=32, BLOCK_N=own, num_warps=1, num_stages=2, KV_AS_B=False)}


@functools.lru_cache(maxsize=64)
def _full_counts(shape: tuple[int, ...], topk: int, device: torch.device) -> torch.Tensor:
    """int64 counts of lists that all hold `topk` regions (cached: one launch fewer per call; never modified)."""
    return torch.full(shape, topk, dtype=torch.int64, device=device)


def bi_level_routing_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      geometry: tuple[int, int, int, int], topk: int, scale: float
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output `[B, H, W, heads, Dv]`, routing `[B, n_regions, topk]`) of checked inputs, on the block-sparse
    kernel with the routed regions as its lists. See `zoo.ops.bi_level_routing_attention`."""
    height, width = q.shape[1:3]
    n_h, n_w, region_h, region_w = geometry
    tokens = region_h * region_w
    slots = region_slots(tokens)
    routing = route(q, k, geometry, region_token_valid(height, width, *geometry, device=q.device), topk, scale)
    n = n_h * n_w * slots
    if has_empty_regions(height, width, geometry):  # -1 picks: lists sorted, valid entries first
        layout = BlockSparseLayout.from_checked(routing[:, None], slots, slots, n, n, transpose=False)
    else:  # every pick is a region: the top-k lists as they are (in-range and distinct by construction)
        lists = routing[:, None]
        layout = BlockSparseLayout(lists, _full_counts(tuple(lists.shape[:-1]), topk, q.device), None, None, slots,
                                   slots, n, n)
    packed = 2 * tokens <= slots  # regions of <= 8 tokens (16 slots): list-side tiles pack several regions' tokens
    window = RegionWindows(n_w, region_h, region_w, packed=packed,
                           masked=slots > tokens or not whole_regions(height, width, geometry))
    config = packed_config(slots, q.shape[-1]) if packed else None
    out, _ = block_sparse_kernel.block_sparse_attention_triton(q, k, v, layout, scale, config=config, window=window)
    return out, routing
