"""Magnitude-aware (MALA) and rank-augmented (RALA) linear attention in PyTorch.

Both are non-causal linear attentions over non-negative features (the models use
phi(x) = ELU(x) + 1) in the *decoupled* form of the RoPE'd vision models: the features that
weigh keys (z, the normaliser, RALA's key weights) are the plain `q`, `k`, while the
numerator `q_num k_num^T v` may use different features of the same shape (RoPE'd `q`, `k`).
With `q_num = q`, `k_num = k` they are the textbook formulas.

Per batch and head, with s = `scale` (default head_dim^-1/2), N keys, eps = `eps`:

MALA (Fan et al., "Rectifying Magnitude Neglect in Linear Attention", ICCV 2025)::

    z_i  = s * q_i . mean_j k_j                              (before RoPE)
    y_i  = (q_num_i . KV) * (1 + 1 / (z_i + eps)) - z_i * mean_j v_j,
    KV   = (s / N) * sum_j k_num_j^T v_j

i.e. y_i = sum_j A_ij v_j with A_ij = beta_i s/N q_num_i.k_num_j - gamma_i, beta_i = 1 + 1/(z_i+eps),
gamma_i = z_i / N: the scores sum to ~1 and sharpen as |q_i| grows (the query's magnitude is
kept, unlike plain linear attention where it cancels).

RALA (Fan et al., "Breaking the Low-Rank Dilemma of Linear Attention", CVPR 2025)::

    e_j  = softmax_j(s * mean_i q_i . k_j)                   (key re-weighting, sums to 1)
    y_i  = (q_num_i . sum_j e_j k_num_j^T v_j) / (q_i . sum_j e_j k_j + eps)

The official code writes the re-weighted keys as k_j * e_j * N and averages them
(mean_j k_j e_j N = sum_j e_j k_j); the form above is the same quantity without the factor N.

Numerics: every reduction is a mean or a softmax-weighted sum (the "mean-normalised" form),
so intermediates stay O(1) at any N; half-precision inputs are computed in float32 with
autocast off (1/(z+eps) alone overflows float16 when z < 1.5e-5) and the result is cast
back. Memory: O(N*D) (float32 copies of q, k, v for half inputs) plus D x Dv per head;
no N x N matrix.

Cost (`zoo.flops`): the matrix products the official code runs, which is what fvcore counts
there: MALA Nq*D (z) + Nk*D*Dv (KV) + Nq*D*Dv (q.KV); RALA adds Nk*D for the key weights.
"""
from __future__ import annotations

import math

import torch

from .._checks import SEQUENCE_LAYOUT, check_same, check_scale, check_tensor
from .._cost import cost_placeholder, is_counting_flops


def check_inputs(q, k, v, q_num, k_num, scale, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """MALA's and RALA's argument checks (shared with the dispatcher); returns (q_num, k_num) defaulted to q, k."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4, SEQUENCE_LAYOUT)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k, v must share [batch, heads], got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's head_dim {q.shape[-1]}, got k {tuple(k.shape)}: project both to one head_dim")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's seq_len {k.shape[2]}, got v {tuple(v.shape)} and k {tuple(k.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"k must hold at least one key, got k {tuple(k.shape)}")
    q_num = q if q_num is None else q_num
    k_num = k if k_num is None else k_num
    for name, t, ref, ref_name in (("q_num", q_num, q, "q"), ("k_num", k_num, k, "k")):
        check_tensor(name, t, 4, SEQUENCE_LAYOUT)
        check_same((ref_name, name), (ref, t))
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    check_scale("scale", scale)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps > 0:
        raise ValueError(f"eps must be a positive number (the models use 1e-6), got {eps}")
    return q_num, k_num


def rope(x: torch.Tensor, signed_sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `[..., N, D]` with the `[N, D]` tables (signed_sin, cos): channel pairs turn together,
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), written as x cos + swap_pairs(x) signed_sin where
    swap_pairs(x) = (x1, x0, x3, x2, ...) and signed_sin = (-sin, sin, ...) (the MAViT/RAVLT layout: both
    channels of a pair share an angle). In the tables' dtype when it is wider (float32 tables: float32)."""
    return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * signed_sin


def check_rope(q: torch.Tensor, k: torch.Tensor, q_num, k_num, rope_tables) -> None:
    """`rope_tables` None, or (signed_sin, cos) `[N, D]` on q's device for q and k of N tokens, without q_num/k_num."""
    if rope_tables is None:
        return
    if q_num is not None or k_num is not None:
        raise ValueError("pass either rope (numerator features made from q, k) or q_num/k_num, not both")
    if not isinstance(rope_tables, (tuple, list)) or len(rope_tables) != 2:
        raise ValueError(f"rope must be a (signed_sin, cos) pair of tensors, got {type(rope_tables).__name__}")
    want = (q.shape[2], q.shape[3])
    for name, t in zip(("signed_sin", "cos"), rope_tables):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"rope's {name} must be a floating [seq_len, head_dim] = {list(want)} table, got {got}")
        if t.device != q.device:
            raise ValueError(f"rope's {name} is on {t.device} but q is on {q.device}: move it to one device")
        if t.requires_grad and torch.is_grad_enabled():  # the fused kernel gives the tables no gradient
            raise ValueError(f"rope's {name} requires grad, but the tables get no gradient here: pass fixed tables "
                             "(.detach()), or q_num=/k_num= made with zoo.ops.linear_rmt.naive.rope for learnable ones")
    if k.shape[2] != q.shape[2] or q.shape[3] % 2:
        raise ValueError(f"rope needs q and k of one length and an even head_dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def mala_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_num: torch.Tensor | None = None,
    k_num: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Magnitude-aware linear attention (MALA), non-causal.

    Args:
        q, k: non-negative features `[batch, heads, seq_len, head_dim]` (q and k may differ
            in seq_len); they give z = s q.mean(k).
        v: `[batch, heads, seq_len_k, head_dim_v]`.
        q_num, k_num: numerator features shaped like q, k (e.g. RoPE'd q, k); default q, k.
        scale: s, default head_dim**-0.5.
        eps: added to z before the reciprocal (1e-6 in the official code).

    Returns:
        `[batch, heads, seq_len_q, head_dim_v]` in v's dtype.
    """
    q_num, k_num = check_inputs(q, k, v, q_num, k_num, scale, eps)
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    if is_counting_flops():
        return cost_placeholder(v.new_empty(b, h, nq, dv), b * h * (nq * d + nk * d * dv + nq * d * dv))
    s = d**-0.5 if scale is None else scale
    out_dtype, dtype = v.dtype, _compute_dtype(v.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, q_num, k_num = (t.to(dtype) for t in (q, k, v, q_num, k_num))
        z = s * (q @ k.mean(dim=2, keepdim=True).transpose(-1, -2))  # [b, h, nq, 1]
        kv = (s / nk) * (k_num.transpose(-1, -2) @ v)  # [b, h, d, dv]
        y = (q_num @ kv) * (1 + 1 / (z + eps)) - z * v.mean(dim=2, keepdim=True)
    return y.to(out_dtype)


def rala_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_num: torch.Tensor | None = None,
    k_num: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rank-augmented linear attention (RALA), non-causal.

    Args:
        q, k: non-negative features `[batch, heads, seq_len, head_dim]` (q and k may differ
            in seq_len); they give the key weights e = softmax(s mean(q).k) and the normaliser.
        v: `[batch, heads, seq_len_k, head_dim_v]`.
        q_num, k_num: numerator features shaped like q, k (e.g. RoPE'd q, k); default q, k.
            RoPE is linear per token, so RoPE of the re-weighted key equals e_j * k_num_j.
        scale: s inside the key-weight softmax, default head_dim**-0.5.
        eps: added to the normaliser (1e-6 in the official code).

    Returns:
        `[batch, heads, seq_len_q, head_dim_v]` in v's dtype.
    """
    q_num, k_num = check_inputs(q, k, v, q_num, k_num, scale, eps)
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    if is_counting_flops():
        return cost_placeholder(v.new_empty(b, h, nq, dv), b * h * (nk * d + nq * d + nk * d * dv + nq * d * dv))
    s = d**-0.5 if scale is None else scale
    out_dtype, dtype = v.dtype, _compute_dtype(v.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, q_num, k_num = (t.to(dtype) for t in (q, k, v, q_num, k_num))
        e = torch.softmax(s * (q.mean(dim=2, keepdim=True) @ k.transpose(-1, -2)), dim=-1)  # [b, h, 1, nk]
        k_mean = e @ k  # [b, h, 1, d], the re-weighted key mean
        kv = (k_num * e.transpose(-1, -2)).transpose(-1, -2) @ v  # [b, h, d, dv]
        y = (q_num @ kv) / (q @ k_mean.transpose(-1, -2) + eps)
    return y.to(out_dtype)
