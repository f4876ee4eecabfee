"""FLOP accounting for zoo.ops.

fvcore traces a model op by op. A sparse or linear attention written in PyTorch would be
counted by whatever its reference happens to compute (gathers, loops, masks), not by what
the op costs. While `counting_flops()` is active every zoo op replaces its computation with
one `zoo::attention_cost` node that carries the op's own multiply-add count (density-aware:
a block-sparse op counts only the blocks it computes); `zoo.flops` installs the handle for it.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


@contextlib.contextmanager
def counting_flops() -> Iterator[None]:
    """Within this context zoo ops return `attention_cost` placeholders instead of computing."""
    previous = getattr(_state, "counting", False)
    _state.counting = True
    try:
        yield
    finally:
        _state.counting = previous


def is_counting_flops() -> bool:
    return getattr(_state, "counting", False)


@torch.library.custom_op("zoo::attention_cost", mutates_args=())
def attention_cost(like: torch.Tensor, macs: int) -> torch.Tensor:
    """A tensor shaped like the op's output (zeros) that records `macs` multiply-adds."""
    return torch.zeros_like(like)


@attention_cost.register_fake
def _(like: torch.Tensor, macs: int) -> torch.Tensor:
    return torch.empty_like(like)


def cost_placeholder(like: torch.Tensor, macs: int) -> torch.Tensor:
    """Return the output placeholder for an op whose cost is `macs` multiply-adds."""
    return attention_cost(like, int(macs))


def block_mask_pairs(block_mask: torch.Tensor, n_q: int, n_k: int, block_q: int, block_k: int) -> int:
    """Number of (query, key) token pairs a block mask `[..., nQb, nKb]` keeps (partial tails counted exactly)."""
    rows = torch.full((block_mask.shape[-2],), block_q, dtype=torch.float64)
    rows[-1] = n_q - block_q * (block_mask.shape[-2] - 1)
    cols = torch.full((block_mask.shape[-1],), block_k, dtype=torch.float64)
    cols[-1] = n_k - block_k * (block_mask.shape[-1] - 1)
    return int(torch.einsum("q,...qk,k->", rows, block_mask.to(torch.float64).cpu(), cols).round())
