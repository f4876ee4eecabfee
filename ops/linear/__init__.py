"""Non-causal linear attention: normalised, decoupled, FLatten's focused map, InLine's injective form.

Backends: "triton" (`kernel.py`, one fused core for every family, forward and backward, CUDA,
float16/bfloat16) and "reference" (`naive.py`, exact, any device and dtype, the oracle). `backend="auto"`
takes the kernel when it can run the call; `linear_attention_backend` says which one runs and why.
MALA and RALA (`zoo.ops.linear_rmt`) dispatch through `kernel_inputs` here onto the same kernel.
"""
from __future__ import annotations

import torch

from .._checks import autocast_cast, check_scale
from .._kernels import kernel_module, triton_or_reference, triton_reason
from . import naive
from .naive import focused_feature_map

KERNEL_DEVICES = ("cuda",)  # the interpreter tests add "cpu" (TRITON_INTERPRET=1 runs the kernel on CPU tensors)
BACKENDS = ("triton", "reference")  # in "auto" order


def _kernel_module():
    """The Triton kernel module, or the ImportError text if Triton cannot be imported."""
    return kernel_module(__name__)


def _triton_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if the Triton kernel runs these (checked) inputs, else why not (`zoo.ops._kernels.triton_reason`)."""
    return triton_reason(__name__, KERNEL_DEVICES, q, k, v)


def _select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> tuple[str, str]:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference", "asked for (backend='reference')"
    return triton_or_reference(backend, _triton_reason(q, k, v))


def linear_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """(backend that the linear attentions here and in `zoo.ops.linear_rmt` would run for q, k, v, why).
    Inside `torch.autocast` it answers for q, k, v cast to the autocast dtype, as the ops run them."""
    naive.check_qkv(q, k, v)
    return _select(*autocast_cast(q, k, v), backend)


def kernel_inputs(tensors: tuple[torch.Tensor | None, ...], backend: str) -> tuple | None:
    """`tensors` (q, k, v first; None entries kept) cast as the kernel runs them, or None when the reference runs."""
    cast = autocast_cast(*tensors)
    return cast if _select(*cast[:3], backend)[0] == "triton" else None


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     backend: str = "auto") -> torch.Tensor:
    """Normalised linear attention `out_i = q_i (sum_j k_j^T v_j) / (q_i . sum_j k_j)`, in the
    mean-normalised form `(q_i kv) / (q_i . mean(k) + eps)` with `kv = K^T V / N`.

    q, k `[B, H, N, D]` must already be non-negative features (ReLU, ELU+1, FLatten's focused map);
    v `[B, H, Nk, Dv]`. backend: "auto" (the Triton kernel on CUDA for float16/bfloat16, head dims up to
    128, else the reference), "triton" or "reference"; inside autocast q, k, v run in its dtype.
    Returns `[B, H, Nq, Dv]`.
    """
    naive.check_qkv(q, k, v)
    cast = kernel_inputs((q, k, v), backend)
    if cast is None:
        return naive.linear_attention(q, k, v, eps=eps)
    return _kernel_module().linear_attention_triton(*cast, None, None, None, "normalised", 1.0, eps)


def decoupled_linear_attention(q: torch.Tensor, k: torch.Tensor, q_num: torch.Tensor, k_num: torch.Tensor,
                               v: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Linear attention with different features in numerator and denominator (the RoPE'd form):
    `out_i = (q_num_i (K_num^T V / N)) / (q_i . mean(K) + eps)`; `backend` as `linear_attention`.

    q, k: denominator features `[B, H, N, D]`; q_num, k_num: numerator features (same shapes);
    v `[B, H, Nk, Dv]`. Returns `[B, H, Nq, Dv]`.
    """
    naive.check_decoupled(q, k, q_num, k_num, v)
    cast = kernel_inputs((q, k, v, q_num, k_num), backend)
    if cast is None:
        return naive.decoupled_linear_attention(q, k, q_num, k_num, v, eps=eps)
    return _kernel_module().linear_attention_triton(*cast, None, "normalised", 1.0, eps)


def injective_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                               backend: str = "auto") -> torch.Tensor:
    """InLine attention (Han et al., NeurIPS 2024), see `naive.injective_linear_attention`:
    `out_i = s q_i (K^T V / N) + (1 - s q_i . mean(K)) mean(V)`, s = `scale` (default D^-1/2).
    `backend` as `linear_attention`. Returns `[B, H, Nq, Dv]`.
    """
    naive.check_qkv(q, k, v)
    check_scale("scale", scale)
    cast = kernel_inputs((q, k, v), backend)
    if cast is None:
        return naive.injective_linear_attention(q, k, v, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _kernel_module().linear_attention_triton(*cast, None, None, None, "injective", scale, 0.0)


__all__ = ["linear_attention", "decoupled_linear_attention", "focused_feature_map", "injective_linear_attention",
           "linear_attention_backend"]
