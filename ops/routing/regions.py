"""BiFormer's region geometry and routing, shared by the reference (`naive.py`) and the kernel path (`kernel.py`).

Regions are `ceil(H / n_h) x ceil(W / n_w)` (the official geometry), row-major; border regions may be partial
and tiny maps may have empty regions (see `zoo.ops.routing.naive` for the rule).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .._checks import check_same, check_scale, check_tensor, positive_int_pair

LAYOUT = "[batch, height, width, heads, head_dim]"


def region_geometry(height: int, width: int, n_win: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """`(n_h, n_w, region_h, region_w)`: regions per side and region side lengths (ceil division)."""
    n_h, n_w = positive_int_pair("n_win", n_win, "(n_h, n_w)")
    return n_h, n_w, math.ceil(height / n_h), math.ceil(width / n_w)


def region_slots(region_tokens: int) -> int:
    """Token slots per region on the Triton path: 16, 32 or 64, or the next multiple of 64 (whole kernel tiles;
    the kernel masks the slots past the region's tokens)."""
    for slots in (16, 32, 64):
        if region_tokens <= slots:
            return slots
    return -(-region_tokens // 64) * 64


@functools.lru_cache(maxsize=64)
def region_token_valid(height: int, width: int, n_h: int, n_w: int, region_h: int, region_w: int,
                       device: torch.device | None = None) -> torch.Tensor:
    """Bool `[n_h * n_w, region_h * region_w]`: which slots of each region are real tokens.

    Cached per geometry and device (one fewer set of launches per call); callers must not modify it.
    """
    rows = torch.arange(n_h * region_h, device=device) < height
    cols = torch.arange(n_w * region_w, device=device) < width
    valid = (rows[:, None] & cols[None, :]).reshape(n_h, region_h, n_w, region_w).permute(0, 2, 1, 3)
    return valid.reshape(n_h * n_w, region_h * region_w)


def whole_regions(height: int, width: int, geometry: tuple[int, int, int, int]) -> bool:
    """Whether the map divides into whole regions (no partial border region)."""
    n_h, n_w, region_h, region_w = geometry
    return (height, width) == (n_h * region_h, n_w * region_w)


def has_empty_regions(height: int, width: int, geometry: tuple[int, int, int, int]) -> bool:
    """Whether a region of the ceil-division geometry holds no token (tiny maps): it is never routed to."""
    n_h, n_w, region_h, region_w = geometry
    return (n_h - 1) * region_h >= height or (n_w - 1) * region_w >= width


def region_means(x: torch.Tensor, geometry: tuple[int, int, int, int], counts: torch.Tensor | None) -> torch.Tensor:
    """`[B, H, W, heads, D]` -> `[B, n_regions, heads * D]`, mean over each region's real tokens
    (`counts` of them per region; None when every region is whole: a plain mean, as the official code).

    Read from the map itself, so the routing does not depend on how the attention lays regions out.
    """
    n_h, n_w, region_h, region_w = geometry
    batch, height, width = x.shape[:3]
    x = x.flatten(3)
    channels = x.shape[-1]  # explicit sizes below: batch may be 0
    if counts is None:
        return x.reshape(batch, n_h, region_h, n_w, region_w, channels).mean((2, 4)).reshape(batch, n_h * n_w, channels)
    x = F.pad(x, (0, 0, 0, n_w * region_w - width, 0, n_h * region_h - height))  # zeros add nothing
    sums = x.reshape(batch, n_h, region_h, n_w, region_w, channels).sum((2, 4)).reshape(batch, n_h * n_w, channels)
    return sums / counts.clamp_min(1).to(sums.dtype)[:, None]


def route(q, k, geometry, valid, topk: int, scale: float) -> torch.Tensor:
    """Detached top-k routing from the `[B, H, W, heads, D]` maps: int64 `[B, n_regions, topk]`, -1 where the pick
    is an empty region (only maps with empty regions have any)."""
    counts = None if whole_regions(q.shape[1], q.shape[2], geometry) else valid.sum(1)
    q_r = region_means(q.detach(), geometry, counts)
    k_r = region_means(k.detach(), geometry, counts)
    logits = (q_r * scale) @ k_r.transpose(-2, -1)  # [B, n_regions, n_regions]
    if not has_empty_regions(q.shape[1], q.shape[2], geometry):
        return logits.topk(topk, dim=-1).indices
    nonempty = valid.any(1)
    picks = logits.masked_fill(~nonempty, float("-inf")).topk(topk, dim=-1).indices
    keep = nonempty[picks] & nonempty[:, None]  # empty key regions and empty query regions list nothing
    return torch.where(keep, picks, -1)


def check_inputs(q, k, v, n_win, topk, scale) -> tuple[int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 5, LAYOUT)
    check_same(("q", "k", "v"), (q, k, v))
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape {LAYOUT}")
    if v.shape[:4] != q.shape[:4]:
        raise ValueError(f"v {tuple(v.shape)} must match q {tuple(q.shape)} in batch, height, width and heads")
    if 0 in q.shape[1:3]:
        raise ValueError(f"q has an empty spatial axis: shape {tuple(q.shape)}")
    geometry = region_geometry(q.shape[1], q.shape[2], n_win)
    n_regions = geometry[0] * geometry[1]
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= n_regions:
        raise ValueError(f"topk must be an int in [1, n_win^2 = {n_regions}], got {topk!r}")
    check_scale("scale", scale)
    return geometry
