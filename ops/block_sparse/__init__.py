"""Block-sparse softmax attention: the primitive radial, routing and SLA attention run on.

Backends, in the order `backend="auto"` tries them: flash-attn-4 (`fa4.py`, Hopper/Blackwell, when
installed: `pip install 'attnzoo[hopper]'`), the Triton flash-attention kernel (`kernel.py`, any CUDA GPU:
the portable path), the exact PyTorch reference (`naive.py`, any device). `block_sparse_backend` names
the one a call would take and why the ones before it cannot.
"""
from __future__ import annotations

import torch

from .._checks import autocast_cast, check_qkv, check_scale
from .._cost import is_counting_flops
from .._kernels import kernel_module, triton_reason
from . import fa4
from .layout import BlockSparseLayout, block_sparse_layout
from .naive import (
    _check_key_padding_mask,
    block_indices_to_mask,
    block_mask_to_indices,
    block_sparse_attention_reference,
    resolve_block_indices,
)

KERNEL_DEVICES = ("cuda",)  # the interpreter tests add "cpu" (TRITON_INTERPRET=1 runs the kernel on CPU tensors)


def _kernel_module():
    """The Triton kernel module, or the ImportError text if Triton cannot be imported."""
    return kernel_module(__name__)


BACKENDS = ("fa4", "triton", "reference")  # the order backend="auto" tries them


def _triton_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """None if the Triton kernel runs these (checked) inputs, else why not (`zoo.ops._kernels.triton_reason`)."""
    return triton_reason(__name__, KERNEL_DEVICES, q, k, v, can_run_args=(block_q, block_k))


def _reason(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> str | None:
    if backend != "reference" and (not q.numel() or not k.numel()):
        return "an empty input (batch, heads or a sequence of size 0) has no work for a kernel"
    if backend == "fa4":
        return fa4.can_run_fa4(q, k, v, block_q, block_k)
    if backend == "triton":
        return _triton_reason(q, k, v, block_q, block_k)
    return None  # the reference runs anything


def block_sparse_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int, backend: str = "auto",
    candidates: tuple[str, ...] = BACKENDS,
) -> tuple[str, str]:
    """(backend that runs these inputs, why the `candidates` tried before it cannot: "" if none failed).

    `backend="auto"` takes the first of `candidates` (fa4, triton, reference) that runs them; a named backend
    is checked alone and raises ValueError with the reason when it cannot run them.
    """
    if backend != "auto" and backend not in candidates:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(candidates)}; got {backend!r}")
    if backend != "auto":
        reason = _reason(backend, q, k, v, block_q, block_k)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}; use backend='auto'")
        return backend, ""
    reasons = []
    for name in candidates:
        reason = fa4.NOT_IN_AUTO if name == "fa4" and not fa4.IN_AUTO else _reason(name, q, k, v, block_q, block_k)
        if reason is None:
            return name, "; ".join(reasons)
        reasons.append(f"{name}: {reason}")
    raise ValueError(f"no backend runs these inputs: {'; '.join(reasons)}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    layout: BlockSparseLayout | None = None,
    backend: str = "auto",
):
    """Exact softmax attention restricted to listed key blocks per query block.

    Args:
        q, k, v: `[batch, heads, seq_len, head_dim]` (q and k may differ in seq_len).
        block_mask: bool `[batch|1, heads|1, ceil(Nq/block_q), ceil(Nk/block_k)]`, or
        block_indices: int `[batch|1, heads|1, ceil(Nq/block_q), max_k]`, key-block ids, -1 = unused.
        block_size: `block` or `(block_q, block_k)`.
        layout: instead of block_mask/block_indices (and block_size), a `block_sparse_layout(...)` checked
            once and reused: no host sync per call (the pattern of a fixed mask such as radial attention's).
        return_lse: also return the float32 log-sum-exp of each row's scaled scores (float64 for float64
            inputs on the reference path).
        key_padding_mask: optional bool `[batch|1, Nk]`, True = padded key, never attended
            (as in `nn.MultiheadAttention`); for padding inside the sequence, not only at its end
            (routing attention's padded region slots). The kernel masks only the key tiles that hold
            padding; their dk/dv are exact zeros.

        backend: "auto" (default: the first that runs the call), or "fa4", "triton", "reference"
            (ValueError naming the reason when that one cannot run it).

    Backends (`block_sparse_backend` says which one runs and why): flash-attn-4 on sm90/sm100 when
    installed, for float16/bfloat16, head_dim 64/96/128, block_k 128 and block_q a multiple of 128 (sm90)
    or 256 (sm100); the Triton kernel on CUDA for float16/bfloat16, head_dim 32/64/128 and blocks that are
    multiples of 16; the reference otherwise. All are differentiable in q, k, v (and through the returned
    lse). Inside `torch.autocast`, q, k, v are cast to its dtype (as SDPA).
    """
    q, k, v = autocast_cast(q, k, v)
    check_scale("scale", scale)
    if layout is not None:
        if block_mask is not None or block_indices is not None:
            raise ValueError("pass layout alone, or block_mask / block_indices without layout")
        check_qkv(q, k, v)
        layout.check(q, k)
        block_indices, block_size = layout.indices, (layout.block_q, layout.block_k)
    args = dict(block_mask=block_mask, block_indices=block_indices, block_size=block_size, scale=scale,
                return_lse=return_lse, key_padding_mask=key_padding_mask)
    if is_counting_flops():
        return block_sparse_attention_reference(q, k, v, **args)
    if layout is None:
        indices, block_q, block_k = resolve_block_indices(q, k, v, block_mask, block_indices, block_size)
    else:
        block_q, block_k = layout.block_q, layout.block_k
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2])
    backend, _ = block_sparse_backend(q, k, v, block_q, block_k, backend)
    if backend == "reference":
        return block_sparse_attention_reference(q, k, v, **args)
    if layout is None:
        # the transposed lists (backward only) are built on the first backward
        layout = BlockSparseLayout.from_checked(indices, block_q, block_k, q.shape[2], k.shape[2], transpose=False)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "fa4":
        out, lse = fa4.block_sparse_attention_fa4(q, k, v, layout, scale, key_padding_mask=key_padding_mask)
    else:
        out, lse = _kernel_module().block_sparse_attention_triton(q, k, v, layout, scale,
                                                                  key_padding_mask=key_padding_mask)
    return (out, lse) if return_lse else out


__all__ = [
    "block_sparse_attention",
    "block_sparse_backend",
    "BACKENDS",
    "block_sparse_layout",
    "BlockSparseLayout",
    "block_mask_to_indices",
    "block_indices_to_mask",
]
