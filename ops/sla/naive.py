"""Sparse-linear attention (SLA, Zhang et al., ICLR 2026; arXiv 2509.24006), exact PyTorch reference.

Blocks of the attention map are classified from mean-pooled q and k (one score per
(query block, key block)); per query-block row the top `topk` fraction of key blocks is
*critical*, the bottom `negligible` fraction *negligible*, the rest *marginal*:

    O   = O_s + proj(O_l)
    O_s = softmax attention over the critical blocks only      (zoo.ops.block_sparse_attention)
    O_l = phi(Q_i) H_i / (eps + phi(Q_i) Z_i),  H_i = sum_{j linear} phi(K_j)^T V_j,
                                                Z_i = sum_{j linear} colsum phi(K_j)

for query block i, where the "linear" key blocks j of that row are chosen by `linear_on`:

| variant | `negligible` | `linear_on` | linear branch covers |
|---|---|---|---|
| paper (Alg. 1)                         | k_l > 0 | "marginal" | marginal blocks, negligible skipped |
| released code, branch SLA-1 (325cc75)  | 0       | "marginal" | every non-critical block, none skipped |
| released code, branch main (d973e55)   | 0       | "all"      | all tokens, critical ones included |

The defaults are the SLA-1 release (the fused kernel the paper describes, with k_l = 0,
confirmed in thu-ml/SLA#7).

Faithful details (thu-ml/SLA `get_block_map`, `SparseLinearAttention`):
- block scores: pooled_q @ pooled_k^T with k centred over the sequence first ("smooth-k": it
  subtracts a per-row constant, so it only matters numerically), mean pooling over the tokens
  actually present in a partial last block, no scale or softmax (the ranking is invariant to
  them); critical count per row = min(nK, int(topk * nK)), negligible int(negligible * nK);
- phi per token over head_dim: softmax (default), elu (ELU(x) + 1) or relu; the same phi for q, k
  (the official `tie_feature_map_qk` changes nothing for these parameter-free maps);
- eps = 1e-5 in the denominator (main; SLA-1 has none and returns O_l = 0 when a row has no
  linear block, as here, where an empty row gives 0 for any eps);
- proj: Linear(head_dim_v, head_dim_v), zero-initialised (SLA starts as pure top-k sparse attention).
On CUDA fp16/bf16 tensors with head_dim 32/64/128 (q, k, v alike) and power-of-two blocks of
16..128 `zoo.ops.sparse_linear_attention` runs the fused Triton kernel of `kernel.py` (both branches in
one pass, forward and backward, every variant above); elsewhere this reference. The kernel keeps phi(q),
phi(k) in the input dtype for its tile products (float32 accumulation), like the official one.

Deviation: the official module casts q, k, v to bf16/fp16 and runs the linear branch in that
precision; here the linear branch accumulates in float32 (float64 for float64 inputs) and only
the output is cast back, which is what keeps fp16/bf16 finite at 64k tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import (
    SEQUENCE_LAYOUT,
    autocast_cast,
    block_size_pair,
    check_allocation,
    check_qkv,
    check_scale,
    check_tensor,
)
from .._cost import block_mask_pairs, cost_placeholder, is_counting_flops
from ..block_sparse import block_sparse_attention

FEATURE_MAPS = {
    "softmax": lambda x: x.softmax(dim=-1),
    "elu": lambda x: F.elu(x) + 1,
    "relu": F.relu,
}
LINEAR_ON = ("marginal", "all")
CRITICAL, MARGINAL, NEGLIGIBLE = 1, 0, -1


def _block_counts(n_key_blocks: int, topk: float, negligible: float) -> tuple[int, int]:
    if not isinstance(topk, (int, float)) or not 0 <= topk <= 1:
        raise ValueError(f"topk must be the fraction of key blocks per row that are critical, in [0, 1], got {topk!r}")
    if not isinstance(negligible, (int, float)) or not 0 <= negligible <= 1 or topk + negligible > 1:
        raise ValueError(
            f"negligible must be the fraction of key blocks skipped, in [0, 1 - topk] = [0, {1 - topk}], "
            f"got {negligible!r}"
        )
    n_critical = min(n_key_blocks, int(topk * n_key_blocks))
    return n_critical, min(n_key_blocks - n_critical, int(negligible * n_key_blocks))


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, ceil(N/block), D], the mean over the tokens present in each block."""
    n = x.shape[2]
    n_blocks = -(-n // block)
    sums = F.pad(x, (0, 0, 0, n_blocks * block - n)).unflatten(2, (n_blocks, block)).sum(3)
    counts = torch.full((n_blocks, 1), block, dtype=x.dtype, device=x.device)
    counts[-1] = n - block * (n_blocks - 1)
    return sums / counts


@torch.no_grad()
def sla_block_map(
    q: torch.Tensor,
    k: torch.Tensor,
    topk: float,
    negligible: float = 0.0,
    block_size: int | tuple[int, int] = 64,
) -> torch.Tensor:
    """SLA's block classification, int8 `[B, H, ceil(Nq/bq), ceil(Nk/bk)]`: 1 critical, 0 marginal, -1 negligible.

    Not differentiable (the selection is discrete, as in the paper). Ties between equal scores
    are broken by `torch.sort` order.
    """
    check_tensor("q", q, 4, SEQUENCE_LAYOUT)
    check_tensor("k", k, 4, SEQUENCE_LAYOUT)
    block_q, block_k = block_size_pair(block_size)
    batch, heads, n_q, n_k = *q.shape[:3], k.shape[2]
    n_qb, n_kb = -(-n_q // block_q), -(-n_k // block_k)
    n_critical, n_negligible = _block_counts(n_kb, topk, negligible)
    # the scores, their two argsorts (int64) and the map
    check_allocation(f"the SLA block map [{batch}, {heads}, {n_qb}, {n_kb}]", batch * heads * n_qb * n_kb * 25,
                     "use larger block_size")
    if not n_q or not n_k:
        return torch.zeros(batch, heads, n_qb, n_kb, dtype=torch.int8, device=q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    pooled_q = _mean_pool(q.to(acc), block_q)
    kf = k.to(acc)
    pooled_k = _mean_pool(kf - kf.mean(dim=2, keepdim=True), block_k)  # smooth-k
    scores = pooled_q @ pooled_k.transpose(-1, -2)
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = highest score
    block_map = torch.zeros(scores.shape, dtype=torch.int8, device=q.device)
    block_map[rank < n_critical] = CRITICAL
    block_map[rank >= n_kb - n_negligible] = NEGLIGIBLE
    return block_map


def _linear_branch(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, linear_blocks: torch.Tensor | None,
    block_q: int, block_k: int, eps: float,
) -> torch.Tensor:
    """phi(Q_i) H_i / (eps + phi(Q_i) Z_i) per query block, with H, Z summed per key block.

    `linear_blocks` bool `[B, H, nQb, nKb]` (None: every key, the main-branch variant).
    Works on block aggregates: S_j = phi(K_j)^T V_j `[B, H, nKb, D, Dv]`, then H_i = sum_j m_ij S_j;
    never an N x N matrix.
    """
    n_q, n_k = phi_q.shape[2], phi_k.shape[2]
    n_qb, n_kb = -(-n_q // block_q), -(-n_k // block_k)
    # zero-padding *after* phi: padded keys add nothing to S and Z
    phi_k = F.pad(phi_k, (0, 0, 0, n_kb * block_k - n_k)).unflatten(2, (n_kb, block_k))
    v = F.pad(v, (0, 0, 0, n_kb * block_k - n_k)).unflatten(2, (n_kb, block_k))
    s = torch.einsum("bhjnd,bhjne->bhjde", phi_k, v)
    z = phi_k.sum(3)
    if linear_blocks is None:
        h, zs = s.sum(2, keepdim=True), z.sum(2, keepdim=True)  # one aggregate for every row
    else:
        m = linear_blocks.to(s.dtype)
        h, zs = torch.einsum("bhij,bhjde->bhide", m, s), torch.einsum("bhij,bhjd->bhid", m, z)
    phi_q = F.pad(phi_q, (0, 0, 0, n_qb * block_q - n_q)).unflatten(2, (n_qb, block_q))
    num = torch.einsum("bhiqd,bhide->bhiqe", phi_q, h)
    den = torch.einsum("bhiqd,bhid->bhiq", phi_q, zs) + eps
    # a row with no linear key (or a relu row with phi(q).Z = 0) has num = 0: give 0, not 0/0
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]
    return out.flatten(2, 3)[:, :, :n_q]


def sla_cost(
    block_map: torch.Tensor, n_q: int, n_k: int, dim: int, dim_v: int, block_size: tuple[int, int], linear_on: str
) -> int:
    """Multiply-adds of SLA: block scores, the critical blocks' softmax attention, the linear
    branch (S_j, Z_j, the per-row sums over linear blocks, phi(Q)H, phi(Q)Z) and the projection."""
    block_q, block_k = block_size
    batch, heads, n_qb, n_kb = block_map.shape
    critical = block_mask_pairs(block_map == CRITICAL, n_q, n_k, block_q, block_k)
    # H_i, Z_i: one sum over all key blocks (main) or a sum over each row's marginal blocks
    aggregated = batch * heads * n_kb if linear_on == "all" else int((block_map == MARGINAL).sum())
    per_head = (
        n_qb * n_kb * dim  # pooled scores
        + n_k * dim * (dim_v + 1)  # S_j and Z_j
        + n_q * dim * (dim_v + 1)  # phi(Q) H, phi(Q) Z
        + n_q * dim_v * dim_v  # proj
    )
    return batch * heads * per_head + aggregated * dim * (dim_v + 1) + critical * (dim + dim_v)


def resolve_sla_arguments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    topk: float,
    negligible: float,
    linear_on: str,
    feature_map: str,
    block_size: int | tuple[int, int],
    scale: float | None,
    eps: float,
    block_map: torch.Tensor | None,
) -> tuple[int, int, torch.Tensor]:
    """Check the arguments of `zoo.ops.sparse_linear_attention`; return (block_q, block_k, the block map, computed
    by `sla_block_map` when not given). Shared by the reference and the kernel path, so both refuse the same inputs."""
    check_qkv(q, k, v)
    dim_v = v.shape[-1]
    if not isinstance(proj_weight, torch.Tensor) or tuple(proj_weight.shape) != (dim_v, dim_v):
        got = tuple(proj_weight.shape) if isinstance(proj_weight, torch.Tensor) else type(proj_weight).__name__
        raise ValueError(f"proj_weight must be a [{dim_v}, {dim_v}] tensor (v's head_dim squared), got {got}")
    if proj_bias is not None and tuple(proj_bias.shape) != (dim_v,):
        raise ValueError(f"proj_bias must have shape [{dim_v}] or be None, got {tuple(proj_bias.shape)}")
    if linear_on not in LINEAR_ON:
        raise ValueError(f"linear_on must be one of {LINEAR_ON}, got {linear_on!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
    check_scale("scale", scale)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if linear_on == "all" and negligible:
        raise ValueError(f"negligible={negligible} skips blocks, which linear_on='all' cannot: use linear_on='marginal'")
    block_q, block_k = block_size_pair(block_size)
    n_q, n_k = q.shape[2], k.shape[2]
    expected = (q.shape[0], q.shape[1], math.ceil(n_q / block_q), math.ceil(n_k / block_k))
    if block_map is None:
        block_map = sla_block_map(q, k, topk, negligible, (block_q, block_k))
    elif block_map.dtype != torch.int8 or tuple(block_map.shape) != expected:
        raise ValueError(
            f"block_map must be an int8 sla_block_map of shape {list(expected)}, "
            f"got {block_map.dtype} {tuple(block_map.shape)}"
        )
    return block_q, block_k, block_map


def sparse_linear_attention_reference(
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
) -> torch.Tensor:
    """SLA, exact PyTorch (the formulas of the module docstring). See `zoo.ops.sparse_linear_attention`.

    Memory: the sparse branch is block_sparse_attention's chunked working set; the linear branch holds
    S_j, Z_j and H_i, Z_i, i.e. B*H*(ceil(Nk/bk) + ceil(Nq/bq))*D*(Dv+1) floats in float32, plus phi(q),
    phi(k) and O_l (B*H*N*D each); no N x N matrix.
    """
    q, k, v = autocast_cast(q, k, v)
    block_q, block_k, block_map = resolve_sla_arguments(q, k, v, proj_weight, proj_bias, topk, negligible, linear_on,
                                                        feature_map, block_size, scale, eps, block_map)
    if is_counting_flops():
        macs = sla_cost(block_map, q.shape[2], k.shape[2], q.shape[-1], v.shape[-1], (block_q, block_k), linear_on)
        return cost_placeholder(q.new_empty(*q.shape[:3], v.shape[-1]), macs)
    o_s = block_sparse_attention(q, k, v, block_mask=block_map == CRITICAL, block_size=(block_q, block_k), scale=scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    phi = FEATURE_MAPS[feature_map]
    linear_blocks = None if linear_on == "all" else block_map == MARGINAL
    o_l = _linear_branch(phi(q.to(acc)), phi(k.to(acc)), v.to(acc), linear_blocks, block_q, block_k, eps)
    bias = None if proj_bias is None else proj_bias.to(acc)
    return (o_s.to(acc) + F.linear(o_l, proj_weight.to(acc), bias)).to(q.dtype)
