"""A checked block-sparse pattern in the form the Triton kernel reads, built once and reused.

Checking a list of key blocks costs a host sync (its largest entry and repeats must be read on
the host to raise a clear error). Masks such as radial attention's are fixed for a resolution
and reused by every layer and step, so `block_sparse_layout` checks once and keeps the sorted
per-query-block lists plus the transposed per-key-block lists that the backward pass needs;
`zoo.ops.block_sparse_attention(..., layout=...)` then runs with no host sync.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._checks import block_size_pair
from .naive import _check_indices, block_indices_to_mask, block_mask_to_indices


def sort_lists(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-1-padded lists -> (int32 lists, ascending, valid entries first, -1 after; int32 counts)."""
    idx = indices.to(torch.int32)
    big = torch.iinfo(torch.int32).max
    idx = torch.where(idx >= 0, idx, big).sort(dim=-1).values
    cnt = (idx != big).sum(-1, dtype=torch.int32)
    return torch.where(idx == big, -1, idx).contiguous(), cnt.contiguous()


def mask_to_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool `[..., rows, cols]` -> per-row lists of its True columns (int32, ascending, full width, -1 after the
    valid entries) and int32 counts, on the mask's device with no host sync."""
    n_cols = mask.shape[-1]
    cols = torch.arange(n_cols, device=mask.device, dtype=torch.int32)
    ordered = torch.where(mask, cols, cols + n_cols).sort(dim=-1).values
    lists = torch.where(ordered < n_cols, ordered, -1)
    return lists.contiguous(), mask.sum(-1, dtype=torch.int32).contiguous()


def transpose_lists(indices: torch.Tensor, n_k_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query-block key lists -> per-key-block query lists (int32, ascending, full width, valid entries
    first) and counts, on the lists' device with no host sync."""
    return mask_to_lists(block_indices_to_mask(indices, n_k_blocks).transpose(-1, -2))


@dataclass(frozen=True)
class BlockSparseLayout:
    """Checked lists for sequence lengths (n_q, n_k) and blocks (block_q, block_k).

    indices int32 `[B|1, H|1, ceil(n_q/block_q), max_k]` ascending, -1 after the `counts` valid entries;
    t_indices / t_counts the same per key block (query blocks that list it), for the backward pass
    (`transposed()`; None until then for a layout built with `transpose=False`).
    """

    indices: torch.Tensor
    counts: torch.Tensor
    t_indices: torch.Tensor | None
    t_counts: torch.Tensor | None
    block_q: int
    block_k: int
    n_q: int
    n_k: int

    @classmethod
    def from_checked(cls, indices: torch.Tensor, block_q: int, block_k: int, n_q: int, n_k: int,
                     transpose: bool = True) -> BlockSparseLayout:
        """Build from lists already checked by `resolve_block_indices` (no host sync).

        `transpose=False` defers the per-key-block lists to the first backward: a per-call layout
        (routing attention's) under `no_grad` never builds them.
        """
        idx, cnt = sort_lists(indices)
        t_idx, t_cnt = transpose_lists(idx, math.ceil(n_k / block_k)) if transpose else (None, None)
        return cls(idx, cnt, t_idx, t_cnt, block_q, block_k, n_q, n_k)

    def transposed(self, build: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_indices, t_counts), built on first use if the layout was made without them; `build(indices,
        counts, n_k_blocks)` replaces `transpose_lists` (the Triton kernel's one-launch version)."""
        if self.t_indices is None:
            n_k_blocks = math.ceil(self.n_k / self.block_k)
            t_idx, t_cnt = (transpose_lists(self.indices, n_k_blocks) if build is None
                            else build(self.indices, self.counts, n_k_blocks))
            object.__setattr__(self, "t_indices", t_idx)  # a cache: the lists themselves never change
            object.__setattr__(self, "t_counts", t_cnt)
        return self.t_indices, self.t_counts

    def check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise ValueError unless q/k `[B, H, N, D]` match the lengths, batch/heads and device of this layout."""
        if (q.shape[2], k.shape[2]) != (self.n_q, self.n_k):
            raise ValueError(f"layout was built for seq lens ({self.n_q}, {self.n_k}), got q {q.shape[2]} and "
                             f"k {k.shape[2]}: build one with block_sparse_layout for these lengths")
        lead = tuple(self.indices.shape[:2])
        if lead[0] not in (1, q.shape[0]) or lead[1] not in (1, q.shape[1]):
            raise ValueError(f"layout lists have batch/heads {lead}, which do not broadcast to q {tuple(q.shape[:2])}")
        if self.indices.device != q.device:
            raise ValueError(f"layout is on {self.indices.device} but q is on {q.device}: build it on q's device")


def block_sparse_layout(
    n_q: int,
    n_k: int,
    block_mask: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
    device: torch.device | str | None = None,
) -> BlockSparseLayout:
    """Check a block mask or key-block lists once (one host sync) and return a reusable `BlockSparseLayout`.

    Args:
        n_q, n_k: query and key sequence lengths.
        block_mask: bool `[B|1, H|1, ceil(n_q/block_q), ceil(n_k/block_k)]`, or
        block_indices: int `[B|1, H|1, ceil(n_q/block_q), max_k]`, key-block ids, -1 = unused.
        device: where the layout lives (default: the mask's device).
    """
    block_q, block_k = block_size_pair(block_size)
    n_qb, n_kb = math.ceil(n_q / block_q), math.ceil(n_k / block_k)
    if (block_mask is None) == (block_indices is None):
        raise ValueError("pass exactly one of block_mask or block_indices")
    if block_mask is not None:
        if block_mask.ndim != 4 or tuple(block_mask.shape[2:]) != (n_qb, n_kb):
            raise ValueError(f"block_mask must have shape [B|1, H|1, {n_qb}, {n_kb}] for seq lens ({n_q}, {n_k}) "
                             f"and block_size ({block_q}, {block_k}), got {tuple(block_mask.shape)}")
        block_indices = block_mask_to_indices(block_mask)
    else:
        if block_indices.ndim != 4:
            raise ValueError(
                f"block_indices must have shape [B|1, H|1, {n_qb}, max_k], got {tuple(block_indices.shape)}"
            )
        _check_indices(block_indices, n_qb, n_kb, *block_indices.shape[:2])
    device = block_indices.device if device is None else device
    return BlockSparseLayout.from_checked(block_indices.to(device), block_q, block_k, n_q, n_k)
