"""Importing an op's Triton kernel module without making Triton a hard requirement."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def kernel_module(package: str) -> ModuleType | str:
    """`<package>.kernel`, or the ImportError text if Triton cannot be imported (the reference still works)."""
    try:
        return importlib.import_module(f"{package}.kernel")
    except ImportError as err:
        return f"triton is not importable ({err})"
