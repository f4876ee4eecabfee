"""Block-sparse softmax attention: the primitive radial, routing and SLA attention run on."""
from __future__ import annotations

import torch

from .naive import block_indices_to_mask, block_mask_to_indices, block_sparse_attention_reference


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
):
    """Exact softmax attention restricted to listed key blocks per query block.

    Args:
        q, k, v: `[batch, heads, seq_len, head_dim]` (q and k may differ in seq_len).
        block_mask: bool `[batch|1, heads|1, ceil(Nq/block_q), ceil(Nk/block_k)]`, or
        block_indices: int `[batch|1, heads|1, ceil(Nq/block_q), max_k]`, key-block ids, -1 = unused.
        block_size: `block` or `(block_q, block_k)`.
        return_lse: also return the log-sum-exp of each row's scaled scores (fp32; fp64 for fp64 inputs).
        key_padding_mask: optional bool `[batch|1, Nk]`, True = padded key, never attended
            (as in `nn.MultiheadAttention`); for padding inside the sequence, not only at its end.
    """
    return block_sparse_attention_reference(
        q, k, v, block_mask=block_mask, block_indices=block_indices, block_size=block_size, scale=scale,
        return_lse=return_lse, key_padding_mask=key_padding_mask,
    )


__all__ = ["block_sparse_attention", "block_mask_to_indices", "block_indices_to_mask"]
