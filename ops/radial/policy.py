"""Which (layer, denoising step) pairs run sparse attention: shared by models and plugins."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SparsityPolicy:
    """Keep the first `dense_layers` blocks and the first `dense_timesteps` steps dense.

    `layer_idx` is the transformer block index counted from 0 (HunyuanVideo: the 20 double
    blocks are 0..19 and the single blocks continue at 20); `timestep_idx` is the 0-based
    index of the sampler loop, the same for the CFG conditional and unconditional calls.
    Faithful: radial-attention's processors run dense iff
    `numeral_timestep < dense_timestep or layer_idx < dense_block`.
    """

    dense_layers: int = 0
    dense_timesteps: int = 0

    def __post_init__(self) -> None:
        for name in ("dense_layers", "dense_timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def use_sparse(self, layer_idx: int, timestep_idx: int) -> bool:
        """True when block `layer_idx` at sampler step `timestep_idx` should use the sparse attention."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        if isinstance(timestep_idx, bool) or not isinstance(timestep_idx, int) or timestep_idx < 0:
            raise ValueError(f"timestep_idx must be the 0-based sampler step (an int >= 0), got {timestep_idx!r}")
        return layer_idx >= self.dense_layers and timestep_idx >= self.dense_timesteps
