"""Non-causal (vision) linear attention in PyTorch: the exact references.

All functions take feature-mapped queries and keys in the layout `[B, H, N, D]` and never
form an N x N matrix: cost O(N D Dv) and memory O(D Dv) per head.

Numerics: the sums over the N keys are taken as *means* (FLatten's fix for AMP, commit
e205a01): `kv = (K^T / sqrt(N)) (V / sqrt(N))`, `z = 1 / (q . mean(K) + eps)`, so every
intermediate is O(1) instead of O(N) and cannot overflow float16 at long sequence lengths;
for half inputs the reductions additionally run in float32 and the output is cast back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_qkv as check_sequence_qkv
from .._checks import check_same, check_scale, check_tensor
from .._cost import cost_placeholder, is_counting_flops


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The sequence ops' q, k, v checks, plus at least one key: the normaliser sums over the keys."""
    check_sequence_qkv(q, k, v)
    if k.shape[2] < 1:
        raise ValueError("k must hold at least one token, got 0")


def check_decoupled(q: torch.Tensor, k: torch.Tensor, q_num: torch.Tensor, k_num: torch.Tensor, v: torch.Tensor) -> None:
    """`check_qkv` for both feature pairs, plus numerator features shaped like the denominator's."""
    check_qkv(q, k, v)
    check_qkv(q_num, k_num, v)
    check_same(("q", "q_num"), (q, q_num))
    if q_num.shape != q.shape or k_num.shape != k.shape:
        raise ValueError(
            f"q_num/k_num must have the shapes of q/k, got {tuple(q_num.shape)}/{tuple(k_num.shape)} "
            f"vs {tuple(q.shape)}/{tuple(k.shape)}"
        )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """K^T V, Q (K^T V) and Q mean(K): B H (Nk D Dv + Nq D Dv + Nq D)."""
    b, h, n_q, d = q.shape
    return b * h * d * (k.shape[2] * v.shape[3] + n_q * v.shape[3] + n_q)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised linear attention `out_i = q_i (sum_j k_j^T v_j) / (q_i . sum_j k_j)`, in the
    mean-normalised form `(q_i kv) / (q_i . mean(k) + eps)` with `kv = K^T V / N`.

    q, k must already be non-negative features (e.g. ReLU, ELU+1, FLatten's focused map).
    Returns `[B, H, Nq, Dv]`.
    """
    return decoupled_linear_attention(q, k, q, k, v, eps=eps)


def decoupled_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    q_num: torch.Tensor,
    k_num: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention with different features in numerator and denominator (the RoPE'd form):
    `out_i = (q_num_i (K_num^T V / N)) / (q_i . mean(K) + eps)`.

    q, k: denominator features `[B, H, N, D]`; q_num, k_num: numerator features (same shapes,
    e.g. RoPE applied to q, k); v `[B, H, Nk, Dv]`. Returns `[B, H, Nq, Dv]`.
    """
    check_decoupled(q, k, q_num, k_num, v)
    if is_counting_flops():
        return cost_placeholder(q.new_empty(*q.shape[:3], v.shape[3]), _macs(q, k, v))
    compute = _compute_dtype(q)
    n = k.shape[2]
    kc, qc = k.to(compute), q.to(compute)
    z = 1.0 / (qc @ kc.mean(dim=2, keepdim=True).transpose(-2, -1) + eps)
    kv = (k_num.to(compute).transpose(-2, -1) * n ** -0.5) @ (v.to(compute) * n ** -0.5)
    return ((q_num.to(compute) @ kv) * z).to(q.dtype)


def injective_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """InLine attention (Han et al., NeurIPS 2024): scores that sum to one without a division,

        InL(Q_i, K_j) = q'_i.k_j - (1/N) sum_m q'_i.k_m + 1/N,      q' = q s / N,  s = D^-1/2,
        out_i = s q_i (K^T V / N) + (1 - s q_i . mean(K)) mean(V)

    (the released code folds the paper's s/N into phi(Q)).

    The map is injective in q (no query-scale invariance, unlike normalised linear attention);
    q, k may be any features (InLine's released models use the identity). Returns `[B, H, Nq, Dv]`.
    """
    check_qkv(q, k, v)
    check_scale("scale", scale)
    if is_counting_flops():
        return cost_placeholder(q.new_empty(*q.shape[:3], v.shape[3]), _macs(q, k, v))
    compute = _compute_dtype(q)
    n, d = k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    kv = (kc.transpose(-2, -1) * (scale / n) ** 0.5) @ (vc * (scale / n) ** 0.5)
    out = qc @ kv + (1 - (qc @ kc.mean(dim=2, keepdim=True).transpose(-2, -1)) * scale) * vc.mean(dim=2, keepdim=True)
    return out.to(q.dtype)


def focused_feature_map(x: torch.Tensor, scale: torch.Tensor | None = None, focusing_factor: float = 3.0) -> torch.Tensor:
    """FLatten's focused kernel (Han et al., ICCV 2023) on full-width tokens `[..., C]`:

        phi(x) = ReLU(x) + 1e-6;  x <- phi(x) / softplus(scale);  f_p(x) = x^p * ||x|| / ||x^p||

    with the norms over the whole channel dimension C (all heads together, before the head
    split), as the released models do. `scale` is the learnable temperature (shape broadcasting
    to x, zero-initialised in the models); None means no temperature. Computed in float32 for
    half inputs (x^3 overflows float16 otherwise). The backward is written out (`_FocusedMap`).
    """
    check_tensor("x", x, tuple(range(1, 9)), "[..., channels]")
    if focusing_factor <= 0:
        raise ValueError(f"focusing_factor must be positive, got {focusing_factor}")
    return _FocusedMap.apply(x, scale, float(focusing_factor))


class _FocusedMap(torch.autograd.Function):
    """The focused map with its gradient in closed form: ~16 kernels where autograd of the forward's norms,
    max and powers launches ~45 (the block's largest glue in training). With u = phi(x) / softplus(scale) > 0,
    out = u^p ||u|| / ||u^p|| (||out|| = ||u|| = n), S = g . out per token:

        dL/du = p out (g - S out / n^2) / u + S u / n^2

    (the row max only guards the range: out does not depend on it); then x through the ReLU, scale through
    u's division and the softplus. Checked against autograd of the forward in float64 (tests)."""

    @staticmethod
    def forward(ctx, x, scale, p):
        compute = _compute_dtype(x)
        u = F.relu(x.to(compute)) + 1e-6
        softplus = None if scale is None else F.softplus(scale.to(compute))
        if softplus is not None:
            u = u / softplus
        norm = u.norm(dim=-1, keepdim=True)
        # x^p / ||x^p|| does not change when x is scaled: dividing by the row max first keeps ||x^p|| >= 1, where
        # a row of tiny entries (all channels negative: ReLU + 1e-6) would underflow to 0 / 0 in float32
        z = (u / u.amax(dim=-1, keepdim=True)) ** p
        out = z / z.norm(dim=-1, keepdim=True) * norm
        ctx.save_for_backward(x, scale, softplus, u, out, norm)
        ctx.p = p
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, softplus, u, out, norm = ctx.saved_tensors
        ratio = torch.linalg.vecdot(grad.to(out.dtype), out).unsqueeze(-1) / norm.square()  # S / n^2
        residual = torch.addcmul(grad.to(out.dtype), out, ratio, value=-1)
        grad_u = torch.addcmul(u * ratio, residual, out / u, value=ctx.p)
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_u if softplus is None else grad_u / softplus
            grad_x = torch.ops.aten.threshold_backward(grad_y, x, 0).to(x.dtype)
        if softplus is not None and ctx.needs_input_grad[1]:  # u = y / s: du/ds = -u / s
            grad_softplus = (grad_u * u).sum_to_size(softplus.shape) / -softplus
            grad_scale = torch.ops.aten.softplus_backward(grad_softplus, scale.to(u.dtype), 1, 20).to(scale.dtype)
        return grad_x, grad_scale, None
