"""Sparse-linear attention (SLA): top-k block-sparse softmax plus linear attention over the rest."""
from .module import SparseLinearAttention
from .naive import sla_block_map, sparse_linear_attention

__all__ = ["SparseLinearAttention", "sla_block_map", "sparse_linear_attention"]
