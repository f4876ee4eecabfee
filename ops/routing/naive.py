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

import torch
import torch.nn.functional as F

from .._cost import cost_placeholder, is_counting_flops
from ..block_sparse.naive import block_sparse_attention_reference
from .regions import check_inputs, region_token_valid, route, whole_regions


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
    geometry = check_inputs(q, k, v, n_win, topk, scale)
    height, width = q.shape[1:3]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    heads = q.shape[3]
    valid = region_token_valid(height, width, *geometry, device=q.device)
    tokens = valid.shape[1]
    full = whole_regions(height, width, geometry)
    if is_counting_flops():  # with partial regions the exact count depends on the routing
        routing = None
        if not full or return_routing:
            routing = route(q, k, geometry, valid, topk, scale)
        out = cost_placeholder(v.new_empty(v.shape), _macs(routing, valid, q.shape[0], topk, heads, q.shape[-1],
                                                            v.shape[-1]))
        return (out, routing) if return_routing else out

    routing = route(q, k, geometry, valid, topk, scale)
    q_regions, k_regions, v_regions = (to_regions(t, *geometry) for t in (q, k, v))
    padded = None if full else ~valid.reshape(1, -1)  # missing tokens of partial regions: never attended
    out = block_sparse_attention_reference(q_regions, k_regions, v_regions, block_indices=routing[:, None],
                                           block_size=tokens, scale=scale, key_padding_mask=padded)
    out = from_regions(out, height, width, *geometry)
    return (out, routing) if return_routing else out
