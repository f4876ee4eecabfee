"""Bi-level routing attention (BiFormer, CVPR 2023) in exact PyTorch, on block-sparse attention.

Algorithm (rayleizhu/BiFormer:ops/bra_legacy.py, the code of the released checkpoints):

1. Cut the `H x W` map into `n_win x n_win` regions (row-major region ids).
2. Region query/key = mean of the token queries/keys of the region, over all heads' channels
   at once (one routing for all heads).
3. Routing, detached from autograd: affinity `(q_r * scale) @ k_r^T` between regions, each
   region keeps the `topk` regions of highest affinity (it may or may not pick itself); the
   routing weights are not applied.
4. Token-to-token attention of each region's queries over all tokens of its routed regions.

How the reference runs: tokens are laid out region by region (one permutation copy, exactly R
slots per region), so region `r` is key/query block `r` of a sequence, and the routed regions are
the block indices of the PyTorch reference of `zoo.ops.block_sparse_attention`. K and V are never
copied `topk` times (the official `torch.gather` copy, rayleizhu/BiFormer#21, is what made 600x500
inputs need ~100 GB). The Triton path (`zoo.ops.bi_level_routing_attention`) needs no copy at all:
the kernel reads each region as a 2-D window of the map.

Sizes not divisible by `n_win`: regions are `ceil(H / n_win) x ceil(W / n_win)` (the official
geometry), the bottom/right regions are partial. Their missing tokens are masked: they do not
enter the region means and are never attended. Empty regions (tiny maps) are never routed to.
The official `auto_pad` instead zero-pads the block input *before* the qkv projection and
attends to the padded tokens; that legacy behaviour belongs to the layer, which pads before
calling this op with divisible sizes (`zoo.backbones.biformer.BiLevelRoutingAttention`).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .._checks import check_same, check_scale, check_tensor, positive_int_pair
from .._cost import cost_placeholder, is_counting_flops
from ..block_sparse import block_sparse_backend
from ..block_sparse.naive import block_sparse_attention_reference

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


def to_regions(x: torch.Tensor, n_h: int, n_w: int, region_h: int, region_w: int) -> torch.Tensor:
    """`[B, H, W, heads, D]` -> `[B, heads, n_h * n_w * R, D]`, region by region (R = region_h * region_w), one copy.

    Zero-pads the bottom/right to whole regions; region `r` (row-major) occupies rows `r * R ... (r + 1) * R - 1`,
    its tokens row-major.
    """
    batch, height, width, heads, dim = x.shape
    if (height, width) != (n_h * region_h, n_w * region_w):
        x = F.pad(x, (0, 0, 0, 0, 0, n_w * region_w - width, 0, n_h * region_h - height))
    x = x.reshape(batch, n_h, region_h, n_w, region_w, heads, dim).permute(0, 5, 1, 3, 2, 4, 6)
    # contiguous: one copy either way, and torch.compile (aot) otherwise mis-tracks the strides of 1-token regions
    return x.reshape(batch, heads, n_h * n_w * region_h * region_w, dim).contiguous()


def from_regions(x: torch.Tensor, height: int, width: int, n_h: int, n_w: int, region_h: int, region_w: int
                 ) -> torch.Tensor:
    """Inverse of `to_regions`: `[B, heads, N', D]` -> `[B, H, W, heads, D]` (padding cropped)."""
    batch, heads, _, dim = x.shape
    x = x.reshape(batch, heads, n_h, n_w, region_h, region_w, dim).permute(0, 2, 4, 3, 5, 1, 6)
    return x.reshape(batch, n_h * region_h, n_w * region_w, heads, dim)[:, :height, :width]


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


def _region_means(x: torch.Tensor, geometry: tuple[int, int, int, int], counts: torch.Tensor | None) -> torch.Tensor:
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


def _route(q, k, geometry, valid, topk: int, scale: float) -> torch.Tensor:
    """Detached top-k routing from the `[B, H, W, heads, D]` maps: int64 `[B, n_regions, topk]`, -1 where the pick
    is an empty region (only maps with empty regions have any)."""
    counts = None if whole_regions(q.shape[1], q.shape[2], geometry) else valid.sum(1)
    q_r = _region_means(q.detach(), geometry, counts)
    k_r = _region_means(k.detach(), geometry, counts)
    logits = (q_r * scale) @ k_r.transpose(-2, -1)  # [B, n_regions, n_regions]
    if not has_empty_regions(q.shape[1], q.shape[2], geometry):
        return logits.topk(topk, dim=-1).indices
    nonempty = valid.any(1)
    picks = logits.masked_fill(~nonempty, float("-inf")).topk(topk, dim=-1).indices
    keep = nonempty[picks] & nonempty[:, None]  # empty key regions and empty query regions list nothing
    return torch.where(keep, picks, -1)


def _check_inputs(q, k, v, n_win, topk, scale) -> tuple[int, int, int, int]:
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


def bra_routing(
    q: torch.Tensor, k: torch.Tensor, n_win: int | tuple[int, int], topk: int, scale: float | None = None
) -> torch.Tensor:
    """The routed regions of every region: int64 `[B, n_win^2, topk]`, -1 for none (see module doc)."""
    geometry = _check_inputs(q, k, k, n_win, topk, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    valid = region_token_valid(q.shape[1], q.shape[2], *geometry, device=q.device)
    return _route(q, k, geometry, valid, topk, scale)


def _macs(routing: torch.Tensor | None, valid: torch.Tensor, batch: int, topk: int, heads: int, dim_qk: int,
          dim_v: int) -> int:
    """Multiply-adds: the region affinity matmul plus real-query x real-routed-key pairs.

    With every region full (`routing=None` allowed) each query sees `topk` whole regions.
    """
    n_regions, region_tokens = valid.shape
    routing_macs = batch * n_regions * n_regions * heads * dim_qk
    if routing is None:
        pairs = batch * n_regions * region_tokens * topk * region_tokens
    else:
        counts = valid.sum(1)
        keys = torch.where(routing >= 0, counts[routing.clamp_min(0)], 0).sum(-1)  # [B, n_regions]
        pairs = int((keys * counts).sum())
    return routing_macs + pairs * heads * (dim_qk + dim_v)


def bi_level_routing_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             n_win: int | tuple[int, int], backend: str = "auto") -> tuple[str, str]:
    """("triton", "") when `bi_level_routing_attention` runs these inputs on the Triton block-sparse kernel
    (regions of `region_slots(R)` token slots), else ("reference", the reason); a named `backend` ("triton",
    "reference") is checked alone (ValueError with the reason when it cannot run them).

    flash-attn-4 is not a routing backend: the Triton kernel reads each region in place as a 2-D window of the
    map, FA4 takes sequences (a region-ordered copy of q, k, v per call), and BiFormer's head_dim 32 is outside
    the head dims the zoo runs FA4 with."""
    if backend == "fa4":
        raise ValueError("backend='fa4' does not run routing attention (regions are 2-D windows of the map, read "
                         "in place by the Triton kernel); use backend='auto', 'triton' or 'reference'")
    _, _, region_h, region_w = region_geometry(q.shape[1], q.shape[2], n_win)
    slots = region_slots(region_h * region_w)
    return block_sparse_backend(q, k, v, slots, slots, backend, candidates=("triton", "reference"))


def bi_level_routing_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_win: int | tuple[int, int],
    topk: int,
    scale: float | None = None,
    return_routing: bool = False,
):
    """Bi-level routing attention, exact PyTorch. See `zoo.ops.bi_level_routing_attention`."""
    geometry = _check_inputs(q, k, v, n_win, topk, scale)
    height, width = q.shape[1:3]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    heads = q.shape[3]
    valid = region_token_valid(height, width, *geometry, device=q.device)
    tokens = valid.shape[1]
    full = whole_regions(height, width, geometry)
    if is_counting_flops():  # with partial regions the exact count depends on the routing
        routing = None
        if not full or return_routing:
            routing = _route(q, k, geometry, valid, topk, scale)
        out = cost_placeholder(v.new_empty(v.shape), _macs(routing, valid, q.shape[0], topk, heads, q.shape[-1],
                                                            v.shape[-1]))
        return (out, routing) if return_routing else out

    routing = _route(q, k, geometry, valid, topk, scale)
    q_regions, k_regions, v_regions = (to_regions(t, *geometry) for t in (q, k, v))
    padded = None if full else ~valid.reshape(1, -1)  # missing tokens of partial regions: never attended
    out = block_sparse_attention_reference(q_regions, k_regions, v_regions, block_indices=routing[:, None],
                                           block_size=tokens, scale=scale, key_padding_mask=padded)
    out = from_regions(out, height, width, *geometry)
    return (out, routing) if return_routing else out
