"""`SparseLinearAttention`: SLA as an nn.Module holding the zero-initialised projection."""
from __future__ import annotations

import torch
from torch import nn

from .._checks import block_size_pair
from . import sparse_linear_attention
from .naive import FEATURE_MAPS, LINEAR_ON, _block_counts


class SparseLinearAttention(nn.Module):
    """SLA over `[batch, heads, seq_len, head_dim]` q, k, v: O = O_s + proj_l(O_l).

    Defaults are the released code's SLA-1 variant (every non-critical block goes to the linear
    branch); `negligible=k_l > 0` is the paper's variant (bottom k_l blocks skipped);
    `linear_on="all"` is the released main branch (linear attention over all tokens). See
    `zoo.ops.sla.naive` for the formulas. `proj_l` has the official name, so thu-ml/SLA and
    TurboDiffusion state dicts (`...local_attn.proj_l.weight/bias`) load unchanged.
    """

    def __init__(
        self,
        head_dim: int,
        topk: float = 0.05,
        negligible: float = 0.0,
        linear_on: str = "marginal",
        feature_map: str = "softmax",
        block_size: int | tuple[int, int] = 64,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _block_counts(1, topk, negligible)  # range checks at construction time
        if linear_on not in LINEAR_ON:
            raise ValueError(f"linear_on must be one of {LINEAR_ON}, got {linear_on!r}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
        self.topk, self.negligible, self.linear_on = topk, negligible, linear_on
        self.feature_map, self.block_size, self.eps = feature_map, block_size_pair(block_size), eps
        self.proj_l = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.proj_l.weight)  # starts as pure top-k sparse attention
        nn.init.zeros_(self.proj_l.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sparse_linear_attention(
            q, k, v, self.proj_l.weight, self.proj_l.bias, topk=self.topk, negligible=self.negligible,
            linear_on=self.linear_on, feature_map=self.feature_map, block_size=self.block_size, eps=self.eps,
        )

    def skipped_fraction(self, seq_len: int) -> float:
        """Share of key blocks per query-block row left out of the exact softmax branch for `seq_len` keys.

        Counted as the op counts them (`int(topk * key_blocks)` critical blocks); the rest goes
        through the linear branch (or is dropped when negligible), so reports can state the sparsity.
        """
        key_blocks = max(1, -(-seq_len // self.block_size[1]))
        critical, _ = _block_counts(key_blocks, self.topk, self.negligible)
        return 1.0 - critical / key_blocks

    def extra_repr(self) -> str:
        return (f"topk={self.topk}, negligible={self.negligible}, linear_on={self.linear_on!r}, "
                f"feature_map={self.feature_map!r}, block_size={self.block_size}")
