"""Lightning training for zoo models: modules, data, typed configs, a train entry point.

Lightning is imported on first use of a name from this package (`import zoo` never imports it).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClassificationModule": "classification",
    "DiffusionModule": "diffusion",
    "NpzDataModule": "data",
    "ImageFolderDataModule": "data",
    "MovingMNISTDataModule": "data",
    "SyntheticDataModule": "data",
    "MovingDigits": "data",
    "build_datamodule": "data",
    "TrainConfig": "config",
    "ConfigError": "config",
    "load_config": "config",
    "run": "train",
    "main": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zoo.lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
