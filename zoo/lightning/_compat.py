"""Lightning is an optional dependency: `lightning` (the unified package) or `pytorch_lightning`."""
from __future__ import annotations

try:
    import lightning.pytorch as pl
except ModuleNotFoundError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("zoo.lightning needs Lightning: pip install 'attnzoo[train]'") from e

__all__ = ["pl"]
