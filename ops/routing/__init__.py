"""Bi-level routing attention (BiFormer): region-level top-k routing, then token attention.

Backends: "triton" (`kernel.py`: the block-sparse Triton kernel reading each region in place as a window of the
map) and "reference" (`naive.py`, exact, any device and dtype); `regions.py` holds the region geometry and the
routing both share. `bi_level_routing_backend` says which one a call takes and why.
"""
from __future__ import annotations

import torch

from .._checks import autocast_cast
from .._cost import is_counting_flops
from .._kernels import kernel_module
from ..block_sparse import block_sparse_backend
from .naive import bi_level_routing_attention_reference
from .regions import check_inputs, region_geometry, region_slots, region_token_valid, route


def bra_routing(
    q: torch.Tensor, k: torch.Tensor, n_win: int | tuple[int, int], topk: int, scale: float | None = None
) -> torch.Tensor:
    """The routed regions of every region: int64 `[B, n_win^2, topk]`, -1 for none (rule: `zoo.ops.routing.naive`)."""
    geometry = check_inputs(q, k, k, n_win, topk, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    valid = region_token_valid(q.shape[1], q.shape[2], *geometry, device=q.device)
    return route(q, k, geometry, valid, topk, scale)


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
    2-D window of q, k, v in place (`zoo.ops.routing.kernel`): no region-ordered copy, no padding of the map,
    and K/V are never copied per routed region (the official gather holds `topk` copies). A region
    takes `region_slots(R)` slots (16, 32, 64 or a multiple of 64: whole kernel tiles); slots past its
    tokens and the missing tokens of partial border regions are masked in-kernel. Otherwise the exact
    PyTorch reference runs (`bi_level_routing_attention_reference`, one region-ordered copy of q, k, v).
    Inside `torch.autocast`, q, k, v are cast to its dtype (as SDPA), the routing included.

    Memory (kernel path): the output, the routing and a float32 log-sum-exp per query and head.
    """
    q, k, v = autocast_cast(q, k, v)
    geometry = check_inputs(q, k, v, n_win, topk, scale)
    if is_counting_flops() or bi_level_routing_backend(q, k, v, n_win, backend)[0] != "triton":
        return bi_level_routing_attention_reference(q, k, v, n_win, topk, scale=scale, return_routing=return_routing)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, routing = kernel_module(__name__).bi_level_routing_attention_triton(q, k, v, geometry, topk, scale)
    return (out, routing) if return_routing else out


__all__ = ["bi_level_routing_attention", "bi_level_routing_backend", "bra_routing", "region_geometry", "region_slots"]
