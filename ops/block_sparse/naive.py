"""Exact block-sparse softmax attention in PyTorch (the reference for the Triton kernel).

Queries are cut into blocks of `block_q` rows and keys into blocks of `block_k` columns.
Query block i attends exactly to the key blocks listed for it; inside those blocks every key
is visible except positions past the end of the sequence (a partial last block is masked,
never padded into the softmax) and keys flagged in the optional `key_padding_mask` (for
callers whose blocks hold padding inside the sequence, e.g. routing attention's partial
regions). Rows that see no key give zeros and lse = -inf.

Memory: query blocks are processed in chunks; each chunk gathers only its own key blocks
(bounded by `chunk_elements`) and, under autograd, is recomputed in backward
(activation checkpointing), so no N x N matrix and no top-k-fold copy of K/V is ever held.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .._checks import block_size_pair, check_allocation, check_qkv, check_scale, empty_output
from .._cost import cost_placeholder, is_counting_flops


def block_mask_to_indices(block_mask: torch.Tensor) -> torch.Tensor:
    """Bool [..., n_q_blocks, n_k_blocks] -> int32 [..., n_q_blocks, max_k], ascending, padded with -1."""
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor, got dtype {block_mask.dtype}")
    n_k = block_mask.shape[-1]
    max_k = max(int(block_mask.sum(-1).max()), 1) if block_mask.numel() else 1
    cols = torch.arange(n_k, device=block_mask.device).expand_as(block_mask)
    keyed = torch.where(block_mask, cols, n_k + cols)  # listed blocks first, in order
    order = keyed.sort(dim=-1).values[..., :max_k]
    return torch.where(order < n_k, order, -1).to(torch.int32)


def block_indices_to_mask(block_indices: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """Inverse of `block_mask_to_indices` (entries < 0 are padding)."""
    idx = block_indices.long()
    mask = torch.zeros(*idx.shape[:-1], num_k_blocks + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx >= 0, idx, num_k_blocks), True)
    return mask[..., :num_k_blocks]


def _check_indices(block_indices: torch.Tensor, n_q_blocks: int, n_k_blocks: int, batch: int, heads: int) -> None:
    if block_indices.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"block_indices must be an integer tensor, got dtype {block_indices.dtype}")
    if block_indices.ndim != 4 or block_indices.shape[0] not in (1, batch) or block_indices.shape[1] not in (1, heads):
        raise ValueError(
            f"block_indices must have shape [batch|1, heads|1, {n_q_blocks}, max_k], got {tuple(block_indices.shape)}"
        )
    if block_indices.shape[2] != n_q_blocks:
        raise ValueError(f"block_indices has {block_indices.shape[2]} query blocks, expected {n_q_blocks}")
    if not block_indices.numel():
        return
    ordered = block_indices.long().sort(-1).values
    repeated = ((ordered[..., :-1] == ordered[..., 1:]) & (ordered[..., 1:] >= 0)).any()
    largest, repeated = torch.stack([ordered[..., -1].max(), repeated.long()]).tolist()  # one host sync
    if largest >= n_k_blocks:
        raise ValueError(f"block_indices lists key block {largest} but there are {n_k_blocks}")
    if repeated:
        raise ValueError("block_indices lists a key block twice in one row: each row must list unique blocks")


def _check_key_padding_mask(key_padding_mask: torch.Tensor, batch: int, n_k: int) -> None:
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padded key), got {got}")
    if key_padding_mask.ndim != 2 or key_padding_mask.shape[0] not in (1, batch) or key_padding_mask.shape[1] != n_k:
        raise ValueError(
            f"key_padding_mask must have shape [batch|1, {n_k}] (batch {batch}, key seq_len {n_k}), "
            f"got {tuple(key_padding_mask.shape)}"
        )


def resolve_block_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None,
    block_indices: torch.Tensor | None,
    block_size: int | tuple[int, int],
) -> tuple[torch.Tensor, int, int]:
    """Check the arguments of block-sparse attention; return (int64 lists [B|1, H|1, nQb, max_k] on q's device,
    block_q, block_k). Shared by the reference and the Triton path, so both refuse the same inputs."""
    check_qkv(q, k, v)
    block_q, block_k = block_size_pair(block_size)
    batch, heads, n_q, _ = q.shape
    n_q_blocks, n_k_blocks = math.ceil(n_q / block_q), math.ceil(k.shape[2] / block_k)
    if (block_mask is None) == (block_indices is None):
        raise ValueError("pass exactly one of block_mask or block_indices")
    if block_mask is not None:
        expected = (n_q_blocks, n_k_blocks)
        if block_mask.ndim != 4 or tuple(block_mask.shape[2:]) != expected:
            raise ValueError(
                f"block_mask must have shape [batch|1, heads|1, {n_q_blocks}, {n_k_blocks}] for seq lens "
                f"({n_q}, {k.shape[2]}) and block_size ({block_q}, {block_k}), got {tuple(block_mask.shape)}"
            )
        if block_mask.shape[0] not in (1, batch) or block_mask.shape[1] not in (1, heads):
            raise ValueError(
                f"block_mask batch/heads dims must be 1 or ({batch}, {heads}), got {tuple(block_mask.shape)}"
            )
        block_indices = block_mask_to_indices(block_mask)
    else:
        _check_indices(block_indices, n_q_blocks, n_k_blocks, batch, heads)
    return block_indices.to(q.device).long(), block_q, block_k


def _attend_chunk(q_chunk, k, v, key_pos, key_valid, scale):
    """q_chunk [G, C, bq, D]; key_pos/key_valid [G, C, L]; k/v [G, N, D]."""
    g = torch.arange(k.shape[0], device=k.device)[:, None, None]
    k_sel, v_sel = k[g, key_pos], v[g, key_pos]  # [G, C, L, D]
    acc = torch.promote_types(q_chunk.dtype, torch.float32)  # fp16/bf16 accumulate in fp32, fp64 stays
    with torch.autocast(q_chunk.device.type, enabled=False):  # autocast would run the einsums in bf16/fp16
        scores = torch.einsum("gcqd,gcld->gcql", q_chunk.to(acc), k_sel.to(acc)) * scale
        scores = scores.masked_fill(~key_valid[:, :, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.clamp_min(torch.finfo(acc).min)[..., None])
        out = torch.einsum("gcql,gcld->gcqd", probs, v_sel.to(acc))
    return out.to(q_chunk.dtype), lse


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    chunk_elements: int = 1 << 24,
):
    """Block-sparse attention, exact, in PyTorch. See `zoo.ops.block_sparse_attention`."""
    indices, block_q, block_k = resolve_block_indices(q, k, v, block_mask, block_indices, block_size)
    check_scale("scale", scale)
    batch, heads, n_q, dim = q.shape
    n_q_blocks = math.ceil(n_q / block_q)
    indices = indices.expand(batch, heads, -1, -1)
    n_k, dim_v = k.shape[2], v.shape[-1]
    scale = dim ** -0.5 if scale is None else scale
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, batch, n_k)
    if not batch * heads * n_q * n_k:  # no work: empty output, or zeros for queries without keys (as SDPA)
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        out = empty_output((batch, heads, n_q, dim_v), q.dtype, q, k, v)
        lse = torch.full((batch, heads, n_q), float("-inf"), dtype=lse_dtype, device=q.device)
        return (out, lse) if return_lse else out
    listed = batch * heads * n_q_blocks * indices.shape[-1] * block_k
    check_allocation(f"block-sparse reference key lists ({listed} key slots for block_size ({block_q}, {block_k}))",
                     listed * 18, "use larger blocks or fewer listed key blocks")  # 2 int64 copies + 2 bools

    # key positions of every listed block: [B, H, n_q_blocks, max_k * block_k]
    offsets = torch.arange(block_k, device=q.device)
    key_pos = (indices.clamp_min(0)[..., None] * block_k + offsets).flatten(-2)
    key_valid = ((indices >= 0)[..., None] & (key_pos.view(*indices.shape, block_k) < n_k)).flatten(-2)
    key_pos = key_pos.clamp_max(n_k - 1)
    if key_padding_mask is not None:
        padded = key_padding_mask.to(q.device).expand(batch, n_k)
        batch_idx = torch.arange(batch, device=q.device)[:, None, None, None]
        key_valid = key_valid & ~padded[batch_idx, key_pos]

    if is_counting_flops():
        rows = torch.full((n_q_blocks,), block_q, device=q.device)
        rows[-1] = n_q - block_q * (n_q_blocks - 1)
        pairs = (key_valid.sum(-1) * rows).sum()
        out = cost_placeholder(q.new_empty(batch, heads, n_q, dim_v), int(pairs) * (dim + dim_v))
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        return (out, q.new_zeros(batch, heads, n_q, dtype=lse_dtype)) if return_lse else out

    groups = batch * heads
    q_blocks = F.pad(q, (0, 0, 0, n_q_blocks * block_q - n_q)).reshape(groups, n_q_blocks, block_q, dim)
    kf, vf = k.reshape(groups, n_k, dim), v.reshape(groups, n_k, dim_v)
    key_pos, key_valid = key_pos.flatten(0, 1), key_valid.flatten(0, 1)

    per_block = groups * key_pos.shape[-1] * max(block_q, dim + dim_v)
    chunk = max(1, chunk_elements // max(per_block, 1))
    outs, lses = [], []
    for start in range(0, n_q_blocks, chunk):
        part = slice(start, start + chunk)
        args = (q_blocks[:, part], kf, vf, key_pos[:, part], key_valid[:, part], scale)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            out, lse = checkpoint(_attend_chunk, *args, use_reentrant=False)
        else:
            out, lse = _attend_chunk(*args)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, 1).reshape(batch, heads, n_q_blocks * block_q, dim_v)[:, :, :n_q]
    lse = torch.cat(lses, 1).reshape(batch, heads, n_q_blocks * block_q)[:, :, :n_q]
    return (out, lse) if return_lse else out
