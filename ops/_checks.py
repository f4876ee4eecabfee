"""Argument checks shared by the ops: each error names the argument, its value and the fix."""
from __future__ import annotations

import torch


def check_tensor(name: str, t: torch.Tensor, ndim: int | tuple[int, ...], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.ndim not in dims:
        raise ValueError(f"{name} must have rank {' or '.join(map(str, dims))} {layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def autocast_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on for their device, as SDPA is cast.

    Inside `torch.autocast`, projections give bf16/fp16 but norms and rotary embeddings may give
    float32; casting here keeps q, k, v in one dtype and lets the fused kernels run.
    """
    device = getattr(tensors[0], "device", None)
    device = device.type if device is not None else None
    if device is None or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], dtype: bool = True) -> None:
    """Same device (and, with `dtype`, same dtype) for all tensors."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if dtype and t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}: cast them to one dtype")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")
