"""Triton pieces of flash attention shared by the zoo's kernels (block-sparse, neighborhood): the online-softmax
step, the final normalisation, and backward's per-row delta. Imported only by kernel modules (needs Triton)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def online_softmax(acc, l_i, m_i, qk, v, qk_scale, MASKED: tl.constexpr):
    """Fold one slice of raw scores `qk` (q . k, -inf = masked) and its values into the running max (log2
    units: scores x `qk_scale`), normaliser and accumulator. The scale is applied inside the exponent, one
    fused multiply-add per score (the max commutes with a positive scale), as Triton's attention tutorial does.

    MASKED: some score may be -inf (a slice of padded keys before any valid one), so a row can still be all
    -inf: keep -inf - -inf from giving NaN."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def normalise(acc, l_i, m_i):
    """(output, natural-log logsumexp) of the accumulated rows; a row with no listed key: output 0, lse -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    return out, tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, s_ob, s_oh, s_on, s_db, s_dh, s_dn, H, N_Q,  # noqa: E741
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x strides can pass 2**31
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < N_Q
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dn + offs_d[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = pid_bh.to(tl.int64) * N_Q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=ok)


def row_delta(do: torch.Tensor, o: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """rowsum(dO * O) - dlse, fp32 `[B, H, N_q]`, in one pass; do, o `[B, H, N_q, D]` (any batch/head/row strides,
    last dim contiguous), dlse None or `[B, H, N_q]`."""
    batch, heads, n_q, dim = o.shape
    delta = torch.empty(batch, heads, n_q, device=o.device, dtype=torch.float32)
    rows = 64
    dlse_arg = delta if dlse is None else dlse.float().contiguous()
    _delta_kernel[(math.ceil(n_q / rows), batch * heads)](
        o, do, dlse_arg, delta, *o.stride()[:3], *do.stride()[:3], heads, n_q,
        BLOCK_M=rows, HEAD_DIM=dim, HAS_DLSE=dlse is not None,
    )
    return delta
