"""Importing an op's Triton kernel module without making Triton a hard requirement."""
from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType

import torch

from ._cost import is_counting_flops


def kernel_module(package: str) -> ModuleType | str:
    """`<package>.kernel`, or the ImportError text if Triton cannot be imported (the reference still works).

    Traceable by torch.compile (fullgraph): Dynamo cannot trace importlib, so the import runs as a constant
    of the graph (`_import_error`, executed while tracing) and the module is then read from `sys.modules`.
    """
    error = _import_error(package)
    return error if error else sys.modules[f"{package}.kernel"]


@torch.compiler.assume_constant_result
def _import_error(package: str) -> str:
    """"" once `<package>.kernel` is imported, else why it cannot be."""
    return _import_once(package)


@functools.cache
def _import_once(package: str) -> str:
    try:
        importlib.import_module(f"{package}.kernel")
    except ImportError as err:
        return f"triton is not importable ({err})"
    return ""


def usable_kernel(package: str, q: torch.Tensor) -> ModuleType | str:
    """`<package>.kernel` when Triton imports and q's dtype runs on its GPU, else the reason it cannot."""
    module = kernel_module(package)
    if isinstance(module, str):
        return module
    if q.dtype == torch.bfloat16 and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    return module


def triton_reason(package: str, devices: tuple[str, ...], q: torch.Tensor, *others: torch.Tensor,
                  can_run_args: tuple = ()) -> str | None:
    """Why `<package>.kernel` cannot run q and `others`, or None.

    The gate every op's dispatch shares (the tensors' device among the op's `devices`, no FLOP counting, no
    empty input, Triton importable, the dtype on this GPU), then the kernel's own `can_run(q, *others,
    *can_run_args)`. Ops pass their module-level `KERNEL_DEVICES` at call time, so the interpreter tests can
    widen it to CPU tensors.
    """
    if q.device.type not in devices:
        return f"tensors are on {q.device.type} (the Triton kernel runs on CUDA)"
    if is_counting_flops():
        return "FLOP counting runs the reference's cost model"
    if any(not t.numel() for t in (q, *others)):
        return "an empty input (batch, heads or a sequence of size 0) has no work for a kernel"
    module = usable_kernel(package, q)
    if isinstance(module, str):
        return module
    return module.can_run(q, *others, *can_run_args)


def triton_or_reference(backend: str, reason: str | None) -> tuple[str, str]:
    """(backend, why) for an op with a Triton kernel and a reference, once `triton_reason` has answered: the
    kernel when it can run; else the reference, unless the call asked for backend='triton' (ValueError, why)."""
    if reason is None:
        return "triton", "fused Triton kernel" + (" (asked for)" if backend == "triton" else "")
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run this call: {reason}; use backend='auto' or 'reference'")
    return "reference", f"triton: {reason}"
