"""Linear attentions of the RMT-style hybrids: MALA (MAViT) and RALA (RAVLT).

Both run on the fused linear-attention kernel of `zoo.ops.linear` (mode "magnitude" for MALA; RALA as
normalised linear attention with its softmax key weights, computed here in float32) or on the exact
references of `naive.py`; `zoo.ops.linear_attention_backend` says which one a call takes and why.
"""
from __future__ import annotations

import torch

from ..linear import _kernel_module, kernel_inputs
from . import naive


def _features(q, k, q_num, k_num):
    """(q_num, k_num) for the kernel: None when they are q, k themselves (read once, not twice)."""
    if (q_num is None or q_num is q) and (k_num is None or k_num is k):
        return None, None
    return (q if q_num is None else q_num), (k if k_num is None else k_num)


def _reference_features(q, k, q_num, k_num, rope):
    """(q_num, k_num) for a reference: RoPE of q, k made here when `rope` tables are given, in q's dtype (the
    kernel rounds them so too)."""
    return (q_num, k_num) if rope is None else (naive.rope(q, *rope).to(q.dtype), naive.rope(k, *rope).to(k.dtype))


def mala_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_num: torch.Tensor | None = None,
                   k_num: torch.Tensor | None = None, scale: float | None = None, eps: float = 1e-6,
                   backend: str = "auto", rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Magnitude-aware linear attention (MALA), non-causal; the math and arguments are
    `naive.mala_attention`'s. backend: "auto" (the Triton kernel on CUDA for float16/bfloat16, head dims
    up to 128, else the reference), "triton" or "reference"; inside autocast the kernel runs in its dtype.
    rope: instead of q_num/k_num, the (signed_sin, cos) `[N, D]` tables of `naive.rope`: the numerator features
    are RoPE of q and k, made inside the kernel (no RoPE'd copies, no RoPE kernels before or after).
    Returns `[batch, heads, seq_len_q, head_dim_v]`."""
    naive.check_inputs(q, k, v, q_num, k_num, scale, eps)
    naive.check_rope(q, k, q_num, k_num, rope)
    cast = kernel_inputs((q, k, v, *_features(q, k, q_num, k_num)), backend)
    if cast is None:
        return naive.mala_attention(q, k, v, *_reference_features(q, k, q_num, k_num, rope), scale=scale, eps=eps)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return _kernel_module().linear_attention_triton(*cast, None, "magnitude", s, eps, rope=rope)


def rala_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_num: torch.Tensor | None = None,
                   k_num: torch.Tensor | None = None, scale: float | None = None, eps: float = 1e-6,
                   backend: str = "auto", rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rank-augmented linear attention (RALA), non-causal; the math and arguments are
    `naive.rala_attention`'s, `backend` and `rope` as `mala_attention`. Returns
    `[batch, heads, seq_len_q, head_dim_v]`."""
    naive.check_inputs(q, k, v, q_num, k_num, scale, eps)
    naive.check_rope(q, k, q_num, k_num, rope)
    cast = kernel_inputs((q, k, v, *_features(q, k, q_num, k_num)), backend)
    if cast is None:
        return naive.rala_attention(q, k, v, *_reference_features(q, k, q_num, k_num, rope), scale=scale, eps=eps)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):  # the key weights in float32, as the reference
        q_mean = cast[0].mean(dim=2, keepdim=True, dtype=torch.float32) * s  # no float32 copy of q
        weights = torch.softmax(q_mean @ cast[1].float().transpose(-1, -2), dim=-1)[:, :, 0]
    return _kernel_module().linear_attention_triton(*cast, weights, "normalised", 1.0, eps, rope=rope)


__all__ = ["mala_attention", "rala_attention"]
