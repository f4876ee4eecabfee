"""Dense softmax attention with one backend switch: flash-attn-4 on Hopper/Blackwell, PyTorch SDPA otherwise.

The DiTs' dense layers (and the dense steps of their sparse ones) call `dense_attention`; `backend="auto"`
takes flash-attn-4 (`zoo.ops.block_sparse.fa4`) on sm90/sm100 when it is installed and runs the call
(float16/bfloat16, head_dim 64/96/128), else SDPA (which picks cuDNN / flash / memory-efficient / math itself).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import autocast_cast, check_qkv
from .._cost import is_counting_flops
from ..block_sparse import fa4

DENSE_BACKENDS = ("fa4", "sdpa")  # the order backend="auto" tries them


def dense_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """(backend that runs `dense_attention` on these inputs, why the ones tried before it cannot: "" if none).

    A named backend is checked alone: ValueError with the reason when it cannot run them.
    """
    if backend not in ("auto", *DENSE_BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {', '.join(DENSE_BACKENDS)}; got {backend!r}")
    reason = fa4.can_run_fa4_dense(q, k, v) if backend in ("auto", "fa4") else None
    if backend == "fa4" and reason:
        raise ValueError(f"backend='fa4' cannot run these inputs: {reason}; use backend='auto'")
    if backend == "auto":
        reason = reason if fa4.IN_AUTO else fa4.NOT_IN_AUTO
        return ("sdpa", f"fa4: {reason}") if reason else ("fa4", "")
    return backend, ""


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Softmax attention of every query over every key: `[B, H, N_q, D]` from q `[B, H, N_q, D]`, k/v `[B, H, N_k, D]`.

    `scale` defaults to head_dim ** -0.5; `backend` "auto" (see `dense_attention_backend`), "fa4" or "sdpa".
    Differentiable in q, k, v on both backends. Inside `torch.autocast`, q, k, v are cast to its dtype.
    """
    check_qkv(q, k, v)
    if is_counting_flops():  # the FLOP counter has a handle for SDPA
        backend = "sdpa"
    q, k, v = autocast_cast(q, k, v)
    chosen, _ = dense_attention_backend(q, k, v, backend)
    if chosen == "fa4":
        return fa4.dense_attention_fa4(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


__all__ = ["dense_attention", "dense_attention_backend", "DENSE_BACKENDS"]
