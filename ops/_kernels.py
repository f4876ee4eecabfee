"""Importing an op's Triton kernel module without making Triton a hard requirement."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch


@functools.cache
def kernel_module(package: str) -> ModuleType | str:
    """`<package>.kernel`, or the ImportError text if Triton cannot be imported (the reference still works)."""
    try:
        return importlib.import_module(f"{package}.kernel")
    except ImportError as err:
        return f"triton is not importable ({err})"


def usable_kernel(package: str, q: torch.Tensor) -> ModuleType | str:
    """`<package>.kernel` when Triton imports and q's dtype runs on its GPU, else the reason it cannot."""
    module = kernel_module(package)
    if isinstance(module, str):
        return module
    if q.dtype == torch.bfloat16 and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    return module
