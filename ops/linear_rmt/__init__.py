"""Linear attentions of the RMT-style hybrids: MALA (MAViT) and RALA (RAVLT)."""
from .naive import mala_attention, rala_attention

__all__ = ["mala_attention", "rala_attention"]
