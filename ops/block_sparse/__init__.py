"""Block-sparse softmax attention: the primitive radial, routing and SLA attention run on.

On CUDA tensors the Triton flash-attention kernel (`kernel.py`) runs when it supports the inputs;
otherwise, and on CPU, the exact PyTorch reference (`naive.py`). `block_sparse_backend` says which
one a call would take and why.
"""
from __future__ import annotations

import functools

import torch

from .._checks import autocast_cast, check_scale
from .._cost import is_counting_flops
from .layout import BlockSparseLayout, block_sparse_layout
from .naive import (
    _check_key_padding_mask,
    block_indices_to_mask,
    block_mask_to_indices,
    block_sparse_attention_reference,
    check_qkv,
    resolve_block_indices,
)

KERNEL_DEVICES = ("cuda",)  # the interpreter tests add "cpu" (TRITON_INTERPRET=1 runs the kernel on CPU tensors)


@functools.cache
def _kernel_module():
    """The Triton kernel module, or the ImportError text if Triton cannot be imported."""
    try:
        from . import kernel
    except ImportError as err:  # triton missing or broken: the reference still works
        return f"triton is not importable ({err})"
    return kernel


def block_sparse_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int
) -> tuple[str, str]:
    """("triton", "") when the kernel runs these inputs, else ("reference", the reason)."""
    if not q.numel() or not k.numel():
        return "reference", "an empty input (batch, heads or a sequence of size 0) has no work for the kernel"
    if q.device.type not in KERNEL_DEVICES:
        return "reference", f"tensors are on {q.device.type} (the Triton kernel runs on CUDA)"
    module = _kernel_module()
    if isinstance(module, str):
        return "reference", module
    if (q.dtype == torch.bfloat16 and q.device.type == "cuda"
            and torch.cuda.get_device_capability(q.device) < (8, 0)):
        return "reference", "bfloat16 needs a GPU of compute capability 8.0 or newer"
    reason = module.can_run(q, k, v, block_q, block_k)
    return ("reference", reason) if reason else ("triton", "")


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

    Runs the Triton kernel on CUDA for float16/bfloat16, head_dim 32/64/128 and blocks that are
    multiples of 16 (see `block_sparse_backend`), the reference otherwise. Both are differentiable
    in q, k, v (and through the returned lse). Inside `torch.autocast`, q, k, v are cast to its
    dtype (as SDPA).
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
    backend, _ = block_sparse_backend(q, k, v, block_q, block_k)
    if backend == "reference":
        return block_sparse_attention_reference(q, k, v, **args)
    if layout is None:
        # the transposed lists (backward only) are built by the kernel on the first backward
        layout = BlockSparseLayout.from_checked(indices, block_q, block_k, q.shape[2], k.shape[2], transpose=False)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = _kernel_module().block_sparse_attention_triton(q, k, v, layout, scale,
                                                              key_padding_mask=key_padding_mask)
    return (out, lse) if return_lse else out


__all__ = [
    "block_sparse_attention",
    "block_sparse_backend",
    "block_sparse_layout",
    "BlockSparseLayout",
    "block_mask_to_indices",
    "block_indices_to_mask",
]
