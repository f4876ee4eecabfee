"""Radial attention: the static O(n log n) block mask of video DiTs, its attention, and the dense-step policy.

`mask.py` builds the mask exactly as the official code (its rule is documented there); the attention is
`zoo.ops.block_sparse_attention` over it, so its backends and their reference are block-sparse's.
"""
from __future__ import annotations

import functools

import torch

from .._checks import autocast_cast, check_same, check_scale, check_tensor
from .._cost import block_mask_pairs, cost_placeholder, is_counting_flops
from ..block_sparse import BlockSparseLayout, block_sparse_attention, block_sparse_layout
from .mask import check_mask_args, device_mask, radial_block_mask
from .policy import SparsityPolicy


@functools.lru_cache(maxsize=16)
def _device_layout(args: tuple, device: torch.device) -> BlockSparseLayout:
    """The mask as checked key-block lists, so repeated calls skip the per-call check (a host sync)."""
    n = args[0] * args[1] + args[5]
    return block_sparse_layout(n, n, block_mask=device_mask(args, device), block_size=args[3], device=device)


def radial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    block_size: int = 128,
    model: str = "wan",
    text_tokens: int = 0,
    legacy: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Softmax attention restricted to the radial block mask (`radial_block_mask`).

    Args:
        q, k, v: `[batch, heads, N, head_dim]`, N = num_frames * tokens_per_frame + text_tokens,
            tokens frame-major, video first then text.
        The other arguments are `radial_block_mask`'s; `scale` defaults to head_dim ** -0.5; `backend` is
            `block_sparse_attention`'s ("auto": flash-attn-4 on sm90/sm100 when installed, else Triton / reference).

    The mask is built once per argument tuple and device (an LRU cache keyed by all of them, so
    a new resolution gets a new mask). Runs `zoo.ops.block_sparse_attention`.

    Faithful: HunyuanVideo's official path attends video -> (radial video + valid text) and
    text -> everything; the same blocks are selected here. Its prompt padding mask is not an
    argument: pass only the valid text tokens (`text_tokens` = their number), as a block mask
    cannot drop single keys (the official text rows would also see the padded text keys).

    Memory (reference): the block mask plus block_sparse_attention's chunked working set;
    no N x N matrix. Inside `torch.autocast`, q, k, v are cast to its dtype (as SDPA).
    """
    q, k, v = autocast_cast(q, k, v)
    check_tensor("q", q, 4, "[batch, heads, N, head_dim]")
    check_same(("q", "k", "v"), (q, k, v))
    check_mask_args(num_frames, tokens_per_frame, decay_factor, block_size, model, text_tokens, legacy)
    check_scale("scale", scale)
    n = num_frames * tokens_per_frame + text_tokens
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4 or t.shape[2] != n:
            raise ValueError(
                f"{name} must be [batch, heads, N, head_dim] with N = num_frames * tokens_per_frame + text_tokens "
                f"= {num_frames} * {tokens_per_frame} + {text_tokens} = {n}, got shape {tuple(t.shape)}"
            )
    args = (num_frames, tokens_per_frame, float(decay_factor), block_size, model, text_tokens, bool(legacy))
    mask = device_mask(args, q.device)
    if is_counting_flops():
        batch, heads, _, dim = q.shape
        pairs = block_mask_pairs(mask, n, n, block_size, block_size)
        out = cost_placeholder(q.new_empty(batch, heads, n, v.shape[-1]), batch * heads * pairs * (dim + v.shape[-1]))
        return (out, q.new_zeros(batch, heads, n, dtype=torch.float32)) if return_lse else out
    layout = _device_layout(args, q.device)
    return block_sparse_attention(q, k, v, layout=layout, scale=scale, return_lse=return_lse, backend=backend)


__all__ = ["SparsityPolicy", "block_mask_pairs", "radial_attention", "radial_block_mask"]
