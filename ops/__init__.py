"""zoo.ops: every attention the zoo uses, as a small functional API.

Each op lives in its own folder: `naive.py` is the exact PyTorch reference (CPU and GPU,
autograd), Triton kernels sit beside it and are dispatched to on CUDA tensors.
"""
from ._cost import counting_flops, is_counting_flops
from .agent import agent_attention, agent_attention_backend, agent_grid, build_agent_biases, pool_agents
from .block_sparse import (
    BlockSparseLayout,
    block_indices_to_mask,
    block_mask_to_indices,
    block_sparse_attention,
    block_sparse_backend,
    block_sparse_layout,
)
from .dense import dense_attention, dense_attention_backend
from .linear import (
    decoupled_linear_attention,
    focused_feature_map,
    injective_linear_attention,
    linear_attention,
    linear_attention_backend,
)
from .linear_rmt import mala_attention, rala_attention
from .na import na1d, na2d, na3d, na_backend, na_legacy_pad
from .radial import SparsityPolicy, radial_attention, radial_block_mask
from .routing import bi_level_routing_attention, bi_level_routing_backend, bra_routing
from .sla import SparseLinearAttention, sla_block_map, sparse_linear_attention

__all__ = [
    "agent_attention",
    "agent_attention_backend",
    "pool_agents",
    "agent_grid",
    "build_agent_biases",
    "linear_attention",
    "decoupled_linear_attention",
    "focused_feature_map",
    "injective_linear_attention",
    "linear_attention_backend",
    "block_sparse_attention",
    "block_sparse_backend",
    "dense_attention",
    "dense_attention_backend",
    "block_sparse_layout",
    "BlockSparseLayout",
    "block_mask_to_indices",
    "block_indices_to_mask",
    "bi_level_routing_attention",
    "bra_routing",
    "bi_level_routing_backend",
    "mala_attention",
    "rala_attention",
    "radial_block_mask",
    "radial_attention",
    "SparsityPolicy",
    "sparse_linear_attention",
    "sla_block_map",
    "SparseLinearAttention",
    "counting_flops",
    "na1d",
    "na2d",
    "na3d",
    "na_backend",
    "na_legacy_pad",
    "is_counting_flops",
]
