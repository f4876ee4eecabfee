"""zoo.ops: every attention the zoo uses, as a small functional API.

Each op lives in its own folder: `naive.py` is the exact PyTorch reference (CPU and GPU,
autograd), Triton kernels sit beside it and are dispatched to on CUDA tensors.
"""
from ._cost import counting_flops, is_counting_flops
from .block_sparse import (
    BlockSparseLayout,
    block_indices_to_mask,
    block_mask_to_indices,
    block_sparse_attention,
    block_sparse_backend,
    block_sparse_layout,
)

__all__ = [
    "block_sparse_attention",
    "block_sparse_backend",
    "block_sparse_layout",
    "BlockSparseLayout",
    "block_mask_to_indices",
    "block_indices_to_mask",
    "counting_flops",
    "is_counting_flops",
]
