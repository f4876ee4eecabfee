"""Radial attention: the static O(n log n) block mask of video DiTs, its attention, and the dense-step policy."""
from .._cost import block_mask_pairs
from .naive import radial_attention, radial_block_mask
from .policy import SparsityPolicy

__all__ = ["SparsityPolicy", "block_mask_pairs", "radial_attention", "radial_block_mask"]
