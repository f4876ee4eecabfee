"""Non-causal linear attention: normalised, decoupled, FLatten's focused map, InLine's injective form."""
from .naive import (
    decoupled_linear_attention,
    focused_feature_map,
    injective_linear_attention,
    linear_attention,
)

__all__ = ["linear_attention", "decoupled_linear_attention", "focused_feature_map", "injective_linear_attention"]
