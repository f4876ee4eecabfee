"""Neighborhood attention with NATTEN's functional API (`na1d`, `na2d`, `na3d`), plus the
relative position bias NATTEN >= 0.20 dropped and every NAT/DiNAT checkpoint needs.

Backends: "fa4" (`fa4.py`, flash-attn-4's block-sparse CuTe-DSL kernels with an NA mask_mod, Hopper and
Blackwell, when installed; `backend="auto"` skips it until validated on a GPU, `fa4.IN_AUTO`), "triton"
(`kernel.py`, fused forward and backward, CUDA, float16/bfloat16) and "reference" (`naive.py`, exact, any device
and dtype, the oracle). `backend="auto"` takes the first one that can run the call; `na_backend` says which one
that is and why the others cannot (NATTEN's `can_run` idea).
"""
from __future__ import annotations

import torch

from .._checks import autocast_cast
from .._kernels import kernel_module, triton_or_reference, triton_reason
from . import fa4
from .naive import BoolArg, IntArg, axis_neighbors, check_inputs, na_legacy_pad, neighborhood_attention, normalize_args

KERNEL_DEVICES = ("cuda",)  # the interpreter tests add "cpu" (TRITON_INTERPRET=1 runs the kernel on CPU tensors)
BACKENDS = ("fa4", "triton", "reference")  # in "auto" order
EXPLICIT_BACKENDS = ("flex",)  # run only when asked for: FlexAttention with the NA mask_mod (ops/na/flex.py)


def _kernel_module():
    """The Triton kernel module, or the ImportError text if Triton cannot be imported."""
    return kernel_module(__name__)


def _triton_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if the Triton kernel runs these (checked) inputs, else why not (`zoo.ops._kernels.triton_reason`)."""
    return triton_reason(__name__, KERNEL_DEVICES, q, k, v)


def na_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntArg,
    dilation: IntArg = 1,
    stride: IntArg = 1,
    is_causal: BoolArg = False,
    rpb: torch.Tensor | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[str, str]:
    """(backend that `na{1,2,3}d` would run for these arguments, why: the reasons the others cannot).
    Inside `torch.autocast` it answers for q, k, v cast to the autocast dtype, as the op runs them."""
    check_inputs(q, k, v, q.dim() - 3, kernel_size, dilation, stride, is_causal, rpb, additional_keys,
                 additional_values)
    return _select(*autocast_cast(q, k, v), rpb, backend)


def _select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
            backend: str) -> tuple[str, str]:
    """`na_backend` for checked arguments."""
    if backend not in ("auto", *BACKENDS, *EXPLICIT_BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS + EXPLICIT_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference", "asked for (backend='reference')"
    if backend == "fa4":
        reason = fa4.fa4_reason(q, k, v, rpb)
        if reason:
            raise ValueError(f"backend='fa4' cannot run this call: {reason}; use backend='auto' or 'triton'")
        return "fa4", "flash-attn-4 block-sparse with the NA mask_mod (asked for)"
    skipped = ""
    if backend == "auto":
        reason = fa4.fa4_reason(q, k, v, rpb) if fa4.IN_AUTO else fa4.NOT_IN_AUTO
        if reason is None:
            return "fa4", "flash-attn-4 block-sparse with the NA mask_mod"
        skipped = f"fa4: {reason}; "
    if backend == "flex":
        from .flex import flex_can_run

        reason = flex_can_run(q, k, v, compile=q.is_cuda)
        if reason:
            raise ValueError(f"backend='flex' cannot run this call: {reason}; use backend='auto' or 'reference'")
        return "flex", "FlexAttention with the NA mask_mod (asked for)"
    chosen, why = triton_or_reference(backend, _triton_reason(q, k, v))
    return chosen, skipped + why


def _na(na_dim: int):
    def op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel_size: IntArg,
        dilation: IntArg = 1,
        stride: IntArg = 1,
        is_causal: BoolArg = False,
        rpb: torch.Tensor | None = None,
        scale: float | None = None,
        additional_keys: torch.Tensor | None = None,
        additional_values: torch.Tensor | None = None,
        return_lse: bool = False,
        backend: str = "auto",
    ):
        kernel, dil, strd, causal = check_inputs(q, k, v, na_dim, kernel_size, dilation, stride, is_causal, rpb,
                                                 additional_keys, additional_values, scale)
        cast = autocast_cast(q, k, v)  # the kernel runs in the autocast dtype; the reference takes q, k, v as given
        chosen = _select(*cast, rpb, backend)[0]
        if chosen == "flex":
            from .flex import na_flex

            return na_flex(*cast, na_dim, kernel, dil, strd, causal, rpb=rpb, scale=scale, additional_keys=additional_keys,
                           additional_values=additional_values, return_lse=return_lse, compile=q.is_cuda)
        if chosen == "reference":
            return neighborhood_attention(
                q, k, v, na_dim, kernel_size, dilation=dilation, stride=stride, is_causal=is_causal, rpb=rpb,
                scale=scale, additional_keys=additional_keys, additional_values=additional_values,
                return_lse=return_lse,
            )
        q, k, v = cast
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if chosen == "fa4":
            out, lse = fa4.na_fa4(q, k, v, (q.shape[1:-2], kernel, dil, strd, causal), rpb, scale, additional_keys,
                                  additional_values)
            return (out, lse) if return_lse else out
        out, lse = _kernel_module().neighborhood_attention_triton(
            q, k, v, na_dim, kernel, dil, strd, causal, rpb, scale, additional_keys, additional_values)
        return (out, lse) if return_lse else out

    axes = ("L", "X, Y", "X, Y, Z")[na_dim - 1]
    op.__name__ = op.__qualname__ = f"na{na_dim}d"
    op.__doc__ = f"""{na_dim}-D neighborhood attention (NATTEN semantics, see `zoo.ops.na.naive`).

    Args:
        q: `[batch, {axes}, heads, head_dim]` (NATTEN's heads-last layout).
        k, v: `[batch, {axes}, heads_kv, head_dim]` and `[..., head_dim_v]`; heads_kv divides heads
            (GQA/MQA: kv head j serves query heads j * heads / heads_kv ...).
        kernel_size, dilation, stride: int or one int per axis; kernel_size * dilation must not
            exceed the axis, stride <= kernel_size (stride = kernel_size is blocked attention).
        is_causal: bool or one per axis.
        rpb: optional NAT/DiNAT relative position bias `[heads, 2k-1, ...]`, added after scaling
            (any float dtype: it is cast to the computation dtype, float32 or float64).
        scale: logit scale, default head_dim ** -0.5.
        additional_keys, additional_values: optional `[batch, num_extra, heads_kv, head_dim(_v)]`
            tokens every query attends to, in the same softmax.
        return_lse: also return the log-sum-exp of each query's logits, `[batch, {axes}, heads]`
            (float32; float64 for float64 inputs on the reference).
        backend: "auto" (the Triton kernel on CUDA for float16/bfloat16 and head dims 16..128 powers of
            two, else the reference), "triton" (an error if it cannot run), "fa4" (flash-attn-4 on
            sm90/sm100, float16/bfloat16, head dims 64/96/128, rpb frozen), "flex" (FlexAttention with the
            NA mask_mod and rpb as a score_mod: compiled on CUDA, eager and forward-only on CPU) or "reference";
            `zoo.ops.na_backend` says which one runs and why. Inside `torch.autocast`, q, k, v are cast
            to its dtype (as SDPA); float32 outside autocast runs the reference.
    """
    return op


na1d = _na(1)
na2d = _na(2)
na3d = _na(3)

__all__ = ["na1d", "na2d", "na3d", "na_backend", "na_legacy_pad", "axis_neighbors", "neighborhood_attention", "normalize_args"]
