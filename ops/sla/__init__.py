"""Sparse-linear attention (SLA): top-k block-sparse softmax plus linear attention over the rest.

Backends, in the order `backend="auto"` tries them: the fused Triton kernel (`kernel.py`: both branches in one
pass, CUDA, float16/bfloat16) and the exact PyTorch reference (`naive.py`, any device and dtype, the oracle).
`sla_backend` names the one a call takes and why the kernel cannot.
"""
from __future__ import annotations

import torch

from .._checks import autocast_cast, block_size_pair, check_qkv
from .._cost import is_counting_flops
from .._kernels import kernel_module, triton_or_reference, triton_reason
from .naive import (
    CRITICAL,
    MARGINAL,
    NEGLIGIBLE,
    resolve_sla_arguments,
    sla_block_map,
    sparse_linear_attention_reference,
)

KERNEL_DEVICES = ("cuda",)  # the interpreter tests add "cpu" (TRITON_INTERPRET=1 runs the kernel on CPU tensors)
BACKENDS = ("triton", "reference")  # the order backend="auto" tries them


def _triton_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """None if the Triton kernel runs these (checked) inputs, else why not (`zoo.ops._kernels.triton_reason`)."""
    return triton_reason(__name__, KERNEL_DEVICES, q, k, v, can_run_args=(block_q, block_k))


def sla_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int | tuple[int, int] = 64,
                backend: str = "auto") -> tuple[str, str]:
    """(backend that `sparse_linear_attention` runs these inputs on, why).

    A named `backend` ("triton", "reference") is checked alone: ValueError with the reason when it cannot run them.
    Inside `torch.autocast` it answers for q, k, v cast to the autocast dtype, as the op runs them.
    """
    check_qkv(q, k, v)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "reference":
        return "reference", "asked for (backend='reference')"
    return triton_or_reference(backend, _triton_reason(*autocast_cast(q, k, v), *block_size_pair(block_size)))


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None = None,
    topk: float = 0.05,
    negligible: float = 0.0,
    linear_on: str = "marginal",
    feature_map: str = "softmax",
    block_size: int | tuple[int, int] = 64,
    scale: float | None = None,
    eps: float = 1e-5,
    block_map: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SLA: O = O_s + proj(O_l); variants and formulas in `zoo.ops.sla.naive`.

    Args:
        q, k, v: `[batch, heads, seq_len, head_dim]` (k, v may have another seq_len; v another head_dim).
        proj_weight, proj_bias: the learnable projection of O_l, `[Dv, Dv]` and `[Dv]` (F.linear layout).
        topk: fraction k_h of key blocks per query-block row that are critical.
        negligible: fraction k_l of key blocks per row that are skipped (0 = the released code).
        linear_on: "marginal" (paper, SLA-1) or "all" (main branch: linear attention over all tokens).
        feature_map: "softmax" | "elu" | "relu".
        block_size: `block` or `(block_q, block_k)`; the official kernels use (64 or 128, 64).
        scale: softmax scale of the sparse branch (default head_dim ** -0.5).
        block_map: a precomputed `sla_block_map` (reused across calls, or for tests); when given,
            `topk` and `negligible` are not used.
        backend: "auto" (default), "triton" or "reference" (`sla_backend` says which one runs and why).

    Backends: the fused Triton kernel on CUDA for float16/bfloat16, one head_dim of 32/64/128 for q, k and v,
    and blocks of 16/32/64/128; the reference otherwise (memory: see `sparse_linear_attention_reference`;
    no N x N matrix on either). Inside `torch.autocast`, q, k, v are cast to its dtype (as SDPA).
    """
    q, k, v = autocast_cast(q, k, v)
    args = dict(linear_on=linear_on, feature_map=feature_map, scale=scale, eps=eps)
    block_q, block_k, block_map = resolve_sla_arguments(q, k, v, proj_weight, proj_bias, topk, negligible,
                                                        block_size=block_size, block_map=block_map, **args)
    if is_counting_flops() or sla_backend(q, k, v, (block_q, block_k), backend)[0] == "reference":
        return sparse_linear_attention_reference(q, k, v, proj_weight, proj_bias, block_size=(block_q, block_k),
                                                 block_map=block_map, **args)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o_s, o_l = kernel_module(__name__).sla_fused(q, k, v, block_map, scale, feature_map, linear_on, eps,
                                                 (block_q, block_k))
    # O_s + O_l W^T in one GEMM (float32 accumulate, one rounding), then the bias
    out = torch.addmm(o_s.flatten(0, 2), o_l.flatten(0, 2), proj_weight.to(q.dtype).t()).view(o_s.shape)
    return out if proj_bias is None else out + proj_bias.to(q.dtype)


from .module import SparseLinearAttention  # noqa: E402  (the module calls sparse_linear_attention above)

__all__ = ["BACKENDS", "CRITICAL", "MARGINAL", "NEGLIGIBLE", "SparseLinearAttention", "sla_backend", "sla_block_map", "sparse_linear_attention"]
