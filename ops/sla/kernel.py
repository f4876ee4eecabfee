"""Fused Triton kernels for sparse-linear attention (SLA), forward and backward.

One program per query block computes the softmax branch over its critical key blocks and the
linear branch of that row in the same pass. The linear branch is never summed over the
(many) marginal blocks; it is the whole-sequence sum minus the row's excluded blocks:

    H_i = S - sum_{j in X_i} phi(K_j)^T V_j,   Z_i = z - sum_{j in X_i} colsum phi(K_j)
    phi(Q_i) H_i = phi(Q_i) S - sum_{j in X_i} (phi(Q_i) phi(K_j)^T) V_j

with S = phi(K)^T V, z = colsum phi(K) over all keys (one small reduction kernel) and X_i the
row's critical + negligible blocks (empty for the main-branch variant `linear_on="all"`).
The correction is computed from the key/value tiles the softmax branch has already loaded
(two extra tile matmuls per excluded block), so no per-block D x Dv state is stored or read
(the released SLA kernel reads a float32 D x Dv matrix per critical block instead).
phi(K) is rounded to the input dtype once and the same rounded values feed S, z and the
corrections, so the subtraction cancels exactly what was added (up to float32 summation).

Backward: kernel `_bwd_q` (per query tile) gives dq, kernel `_bwd_kv` (per key block, over
the transposed block lists) gives dk, dv, both with the same excluded-block corrections; the
gradient of S and z is one more reduction. Rows with no marginal block get O_l = 0 and no
gradient (their denominator is stored as inf). The whole-sequence products phi(Q) S, g S^T,
phi(K) dS, V dS^T use S as a scaled hi/lo pair in the input dtype (`_split`, `_dot_split`).
Layout `[B, H, N, D]` (made contiguous); fp16/bf16; head_dim 32/64/128 (q, k, v alike); any N;
blocks 16..128. Launch configs: `LAUNCH`, swept on an H100 by scripts/benchmark_sla.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FEATURE_IDS = {"softmax": 0, "elu": 1, "relu": 2}
LOG2E = 1.4426950408889634
REDUCE_BLOCKS = 8  # row tiles per program of the S / z reductions
# query rows per tile in the backward kernels: 128-row blocks run as two 64-row tiles (128 x 128
# tiles of q, dO, phi(q), g exceed the H100's shared memory in both backward kernels)
BWD_Q_TILE = 64
# (num_warps, num_stages) per kernel and (head_dim, block_q); scripts/benchmark_sla.py --sweep times
# the alternatives (H100 numbers for head_dim 128 are in the benchmark report)
LAUNCH = {
    kind: {(d, bq): (4 if d * bq <= 64 * 64 else 8, 2) for d in (32, 64, 128) for bq in (16, 32, 64, 128)}
    for kind in ("fwd", "bwd_q", "bwd_kv")
}
LAUNCH["fwd"][(128, 64)] = (8, 3)
LAUNCH["fwd"][(128, 128)] = (8, 3)
LAUNCH["bwd_q"][(128, 64)] = (4, 3)
LAUNCH["bwd_kv"][(128, 64)] = (8, 2)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_BLOCKS = (16, 32, 64, 128)


def can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """None if the fused kernel runs these (checked) inputs, else the reason it does not."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16/bfloat16)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return f"head_dim q/k {q.shape[-1]}, v {v.shape[-1]} (the kernel takes one head_dim in {SUPPORTED_HEAD_DIMS})"
    if block_q not in SUPPORTED_BLOCKS or block_k not in SUPPORTED_BLOCKS:
        return f"block_size ({block_q}, {block_k}) (the kernel takes blocks in {SUPPORTED_BLOCKS})"
    return None


def _launch(kind: str, d: int, block_q: int) -> dict:
    warps, stages = LAUNCH[kind][(d, block_q)]
    return {"num_warps": warps, "num_stages": stages}


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """SLA's feature map per row (over head_dim) of a float32 tile."""
    if FEATURE == 0:
        e = tl.exp(x - tl.max(x, 1)[:, None])
        return e / tl.sum(e, 1)[:, None]
    elif FEATURE == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(x))  # ELU(x) + 1
    else:
        return tl.maximum(x, 0.0)


@triton.jit
def _phi_bwd(x, f, df, FEATURE: tl.constexpr):
    """Gradient w.r.t. x of phi(x) = f, given df."""
    if FEATURE == 0:
        return f * (df - tl.sum(f * df, 1)[:, None])
    elif FEATURE == 1:
        return tl.where(x > 0, df, df * f)
    else:
        return tl.where(x > 0, df, 0.0)


@triton.jit
def _dot_split(a, M, scale, D: tl.constexpr, TRANS: tl.constexpr):
    """a @ (scale * (hi + lo)) for a float32 D x D matrix stored as a hi/lo pair in a's dtype
    (`_split`): two tile matmuls with float32-like accuracy and little shared memory."""
    offs = tl.arange(0, D)
    if TRANS:
        ptr = offs[None, :] * D + offs[:, None]
    else:
        ptr = offs[:, None] * D + offs[None, :]
    acc = tl.dot(a, tl.load(M + ptr))
    return tl.dot(a, tl.load(M + D * D + ptr), acc) * scale


@triton.jit
def _outer_sum(X, B, W, A_OUT, S_PART, Z_PART, N, n_chunks,
               FEATURE: tl.constexpr, APPLY_PHI: tl.constexpr, HAS_W: tl.constexpr,
               D: tl.constexpr, BR: tl.constexpr, CHUNK: tl.constexpr):
    """Partial sums over CHUNK row tiles of A^T B (float32 accumulate) and of colsum(w * A).

    APPLY_PHI: A = phi(X) (zero on padded rows), also stored to A_OUT in X's dtype; else A = X.
    """
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, D)
    s = tl.zeros([D, D], dtype=tl.float32)
    z = tl.zeros([D], dtype=tl.float32)
    for t in range(CHUNK):
        offs_r = (c * CHUNK + t) * BR + tl.arange(0, BR)
        valid = offs_r < N
        ptr = bh * N * D + offs_r[:, None] * D + offs_d[None, :]
        x = tl.load(X + ptr, mask=valid[:, None], other=0.0)
        if APPLY_PHI:
            a = tl.where(valid[:, None], _phi(x.to(tl.float32), FEATURE), 0.0).to(x.dtype)
            tl.store(A_OUT + ptr, a, mask=valid[:, None])
        else:
            a = x
        b = tl.load(B + ptr, mask=valid[:, None], other=0.0)
        s += tl.dot(tl.trans(a), b)
        if HAS_W:
            w = tl.load(W + bh * N + offs_r, mask=valid, other=0.0)
            z += tl.sum(a.to(tl.float32) * w[:, None], 0)
        else:
            z += tl.sum(a.to(tl.float32), 0)
    part = bh * n_chunks + c
    tl.store(S_PART + part * D * D + offs_d[:, None] * D + offs_d[None, :], s)
    tl.store(Z_PART + part * D + offs_d, z)


@triton.jit
def _fwd(Q, K, V, FK, S_SPLIT, S_SCALE, Z_ALL, LUT, NCRIT, NNEG, OS, OL, LSE, DEN,
         qk_scale, eps, N_Q, N_K, NQB, NKB,
         FEATURE: tl.constexpr, CORRECT: tl.constexpr, D: tl.constexpr,
         BQ: tl.constexpr, BK: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = i * BQ + tl.arange(0, BQ)
    offs_n = tl.arange(0, BK)
    offs_d = tl.arange(0, D)
    m_valid = offs_m < N_Q
    q_ptr = bh * N_Q * D + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(Q + q_ptr, mask=m_valid[:, None], other=0.0)
    fq = tl.where(m_valid[:, None], _phi(q.to(tl.float32), FEATURE), 0.0).to(q.dtype)
    row = bh * NQB + i
    n_crit = tl.load(NCRIT + row)
    n_neg = tl.load(NNEG + row)
    lut = LUT + row * NKB
    kv_base = bh * N_K * D

    m_i = tl.full([BQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BQ], dtype=tl.float32)
    acc = tl.zeros([BQ, D], dtype=tl.float32)
    c_num = tl.zeros([BQ, D], dtype=tl.float32)
    c_den = tl.zeros([BQ], dtype=tl.float32)
    for t in range(n_crit):
        j = tl.load(lut + t)
        offs_k = j * BK + offs_n
        k_valid = offs_k < N_K
        kt = tl.load(K + kv_base + offs_k[None, :] * D + offs_d[:, None], mask=k_valid[None, :], other=0.0)
        v = tl.load(V + kv_base + offs_k[:, None] * D + offs_d[None, :], mask=k_valid[:, None], other=0.0)
        s = tl.dot(q, kt) * qk_scale
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        if CORRECT:
            fkt = tl.load(FK + kv_base + offs_k[None, :] * D + offs_d[:, None], mask=k_valid[None, :], other=0.0)
            a = tl.dot(fq, fkt)
            c_num += tl.dot(a.to(v.dtype), v)
            c_den += tl.sum(a, 1)
    if CORRECT:
        for t in range(n_crit, n_crit + n_neg):
            j = tl.load(lut + t)
            offs_k = j * BK + offs_n
            k_valid = offs_k < N_K
            fkt = tl.load(FK + kv_base + offs_k[None, :] * D + offs_d[:, None], mask=k_valid[None, :], other=0.0)
            v = tl.load(V + kv_base + offs_k[:, None] * D + offs_d[None, :], mask=k_valid[:, None], other=0.0)
            a = tl.dot(fq, fkt)
            c_num += tl.dot(a.to(v.dtype), v)
            c_den += tl.sum(a, 1)

    has_keys = l_i > 0
    o_s = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(OS + q_ptr, o_s.to(q.dtype), mask=m_valid[:, None])
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(LSE + bh * N_Q + offs_m, lse, mask=m_valid)

    z_all = tl.load(Z_ALL + bh * D + offs_d)
    num = _dot_split(fq, S_SPLIT + bh * 2 * D * D, tl.load(S_SCALE + bh), D, False) - c_num
    den = eps + tl.sum(fq.to(tl.float32) * z_all[None, :], 1) - c_den
    if CORRECT:
        has_linear = (NKB - n_crit - n_neg) > 0
    else:
        has_linear = NKB > 0
    den = tl.maximum(den, 1.1754943508222875e-38)  # the reference's clamp: num = 0 then gives 0
    den = tl.where(m_valid & has_linear, den, float("inf"))
    o_l = num / den[:, None]
    tl.store(OL + q_ptr, o_l.to(q.dtype), mask=m_valid[:, None])
    tl.store(DEN + bh * N_Q + offs_m, den, mask=m_valid)


@triton.jit
def _bwd_q(Q, K, V, FK, S_SPLIT, S_SCALE, Z_ALL, LUT, NCRIT, NNEG, OS, OL, DO, DOL, LSE, DEN,
           DQ, FQ, G, C, DELTA, sm_scale, qk_scale, N_Q, N_K, NQB, NKB,
           FEATURE: tl.constexpr, CORRECT: tl.constexpr, D: tl.constexpr,
           BQ: tl.constexpr, BK: tl.constexpr, QT: tl.constexpr):
    """dq, plus the per-row quantities `_bwd_kv` needs: phi(q), g = dO_l / den, c, delta.
    One program per QT-row tile (QT divides BQ) of the query block it lies in."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tile * QT + tl.arange(0, QT)
    offs_n = tl.arange(0, BK)
    offs_d = tl.arange(0, D)
    m_valid = offs_m < N_Q
    q_ptr = bh * N_Q * D + offs_m[:, None] * D + offs_d[None, :]
    row_ptr = bh * N_Q + offs_m
    q = tl.load(Q + q_ptr, mask=m_valid[:, None], other=0.0)
    x = q.to(tl.float32)
    fq32 = tl.where(m_valid[:, None], _phi(x, FEATURE), 0.0)
    fq = fq32.to(q.dtype)
    tl.store(FQ + q_ptr, fq, mask=m_valid[:, None])
    do = tl.load(DO + q_ptr, mask=m_valid[:, None], other=0.0)
    o_s = tl.load(OS + q_ptr, mask=m_valid[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o_s.to(tl.float32), 1)
    tl.store(DELTA + row_ptr, delta, mask=m_valid)
    dol = tl.load(DOL + q_ptr, mask=m_valid[:, None], other=0.0).to(tl.float32)
    o_l = tl.load(OL + q_ptr, mask=m_valid[:, None], other=0.0).to(tl.float32)
    den = tl.load(DEN + row_ptr, mask=m_valid, other=float("inf"))
    g = dol / den[:, None]
    c = -tl.sum(o_l * dol, 1) / den
    g_lo = g.to(q.dtype)
    tl.store(G + q_ptr, g_lo, mask=m_valid[:, None])
    tl.store(C + row_ptr, c, mask=m_valid)
    lse = tl.load(LSE + row_ptr, mask=m_valid, other=float("inf"))

    row = bh * NQB + tile * QT // BQ
    n_crit = tl.load(NCRIT + row)
    n_neg = tl.load(NNEG + row)
    lut = LUT + row * NKB
    kv_base = bh * N_K * D
    dq = tl.zeros([QT, D], dtype=tl.float32)
    dfq = tl.zeros([QT, D], dtype=tl.float32)
    for t in range(n_crit):
        j = tl.load(lut + t)
        offs_k = j * BK + offs_n
        k_valid = offs_k < N_K
        kv_ptr = kv_base + offs_k[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_ptr, mask=k_valid[:, None], other=0.0)
        v = tl.load(V + kv_ptr, mask=k_valid[:, None], other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        p = tl.where(k_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        if CORRECT:
            fk = tl.load(FK + kv_ptr, mask=k_valid[:, None], other=0.0)
            da = -(tl.dot(g_lo, tl.trans(v)) + c[:, None])
            dfq += tl.dot(da.to(fk.dtype), fk)
    if CORRECT:
        for t in range(n_crit, n_crit + n_neg):
            j = tl.load(lut + t)
            offs_k = j * BK + offs_n
            k_valid = offs_k < N_K
            kv_ptr = kv_base + offs_k[:, None] * D + offs_d[None, :]
            v = tl.load(V + kv_ptr, mask=k_valid[:, None], other=0.0)
            fk = tl.load(FK + kv_ptr, mask=k_valid[:, None], other=0.0)
            da = -(tl.dot(g_lo, tl.trans(v)) + c[:, None])
            dfq += tl.dot(da.to(fk.dtype), fk)
    z_all = tl.load(Z_ALL + bh * D + offs_d)
    dfq += _dot_split(g_lo, S_SPLIT + bh * 2 * D * D, tl.load(S_SCALE + bh), D, True) + c[:, None] * z_all[None, :]
    dq = dq * sm_scale + _phi_bwd(x, fq32, dfq, FEATURE)
    tl.store(DQ + q_ptr, dq.to(q.dtype), mask=m_valid[:, None])


@triton.jit
def _bwd_kv(Q, K, V, FQ, G, C, DO, LSE, DELTA, DS_SPLIT, DS_SCALE, DZ_ALL, LUT, NCRIT, NNEG,
            DK, DV, sm_scale, qk_scale, N_Q, N_K, NQB, NKB,
            FEATURE: tl.constexpr, CORRECT: tl.constexpr, D: tl.constexpr,
            BQ: tl.constexpr, BK: tl.constexpr, QT: tl.constexpr):
    """dk, dv of one key block over the query blocks that list it (LUT is the transposed map),
    each visited in BQ // QT tiles of QT rows."""
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_k = j * BK + tl.arange(0, BK)
    offs_m0 = tl.arange(0, QT)
    offs_d = tl.arange(0, D)
    k_valid = offs_k < N_K
    kv_ptr = bh * N_K * D + offs_k[:, None] * D + offs_d[None, :]
    k = tl.load(K + kv_ptr, mask=k_valid[:, None], other=0.0)
    v = tl.load(V + kv_ptr, mask=k_valid[:, None], other=0.0)
    x = k.to(tl.float32)
    fk32 = tl.where(k_valid[:, None], _phi(x, FEATURE), 0.0)
    fk = fk32.to(k.dtype)

    col = bh * NKB + j
    n_crit = tl.load(NCRIT + col)
    n_neg = tl.load(NNEG + col)
    lut = LUT + col * NQB
    q_base = bh * N_Q * D
    dk = tl.zeros([BK, D], dtype=tl.float32)
    dv = tl.zeros([BK, D], dtype=tl.float32)
    dfk = tl.zeros([BK, D], dtype=tl.float32)
    for t in range(n_crit * (BQ // QT)):
        i = tl.load(lut + t // (BQ // QT))
        offs_m = i * BQ + (t % (BQ // QT)) * QT + offs_m0
        m_valid = offs_m < N_Q
        q_ptr = q_base + offs_m[:, None] * D + offs_d[None, :]
        q = tl.load(Q + q_ptr, mask=m_valid[:, None], other=0.0)
        do = tl.load(DO + q_ptr, mask=m_valid[:, None], other=0.0)
        lse = tl.load(LSE + bh * N_Q + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(DELTA + bh * N_Q + offs_m, mask=m_valid, other=0.0)
        pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        pt = tl.where(k_valid[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
        if CORRECT:
            fq = tl.load(FQ + q_ptr, mask=m_valid[:, None], other=0.0)
            g = tl.load(G + q_ptr, mask=m_valid[:, None], other=0.0)
            c = tl.load(C + bh * N_Q + offs_m, mask=m_valid, other=0.0)
            at = tl.dot(fk, tl.trans(fq))
            dat = -(tl.dot(v, tl.trans(g)) + c[None, :])
            dfk += tl.dot(dat.to(fq.dtype), fq)
            dv -= tl.dot(at.to(g.dtype), g)
    if CORRECT:
        for t in range(n_crit * (BQ // QT), (n_crit + n_neg) * (BQ // QT)):
            i = tl.load(lut + t // (BQ // QT))
            offs_m = i * BQ + (t % (BQ // QT)) * QT + offs_m0
            m_valid = offs_m < N_Q
            q_ptr = q_base + offs_m[:, None] * D + offs_d[None, :]
            fq = tl.load(FQ + q_ptr, mask=m_valid[:, None], other=0.0)
            g = tl.load(G + q_ptr, mask=m_valid[:, None], other=0.0)
            c = tl.load(C + bh * N_Q + offs_m, mask=m_valid, other=0.0)
            at = tl.dot(fk, tl.trans(fq))
            dat = -(tl.dot(v, tl.trans(g)) + c[None, :])
            dfk += tl.dot(dat.to(fq.dtype), fq)
            dv -= tl.dot(at.to(g.dtype), g)
    ds_scale = tl.load(DS_SCALE + bh)
    dz_all = tl.load(DZ_ALL + bh * D + offs_d)
    dv += _dot_split(fk, DS_SPLIT + bh * 2 * D * D, ds_scale, D, False)
    dfk += _dot_split(v, DS_SPLIT + bh * 2 * D * D, ds_scale, D, True) + dz_all[None, :]
    dk = dk * sm_scale + _phi_bwd(x, fk32, dfk, FEATURE)
    tl.store(DK + kv_ptr, dk.to(k.dtype), mask=k_valid[:, None])
    tl.store(DV + kv_ptr, dv.to(v.dtype), mask=k_valid[:, None])


def _block_lists(block_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `block_map` [B, H, R, C]: column indices ordered critical, negligible, marginal
    (int32 [B*H*R, C]) and the critical / negligible counts (int32 [B*H*R])."""
    key = torch.where(block_map == 1, 0, torch.where(block_map == -1, 1, 2)).to(torch.int8)
    order = key.argsort(dim=-1, stable=True).to(torch.int32).flatten(0, 2).contiguous()
    n_crit = (block_map == 1).sum(-1, dtype=torch.int32).flatten()
    n_neg = (block_map == -1).sum(-1, dtype=torch.int32).flatten()
    return order, n_crit, n_neg


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [BH, D, D] -> (hi/lo pair [BH, 2, D, D] in dtype, scale [BH]) with x ~ scale * (hi + lo);
    the scale (max |x| per slice) keeps fp16 in range at any sequence length."""
    scale = x.abs().amax((1, 2)).clamp_min(1e-30)
    y = x / scale[:, None, None]
    hi = y.to(dtype)
    return torch.stack((hi, (y - hi.float()).to(dtype)), 1).contiguous(), scale


def _reduce(x: torch.Tensor, b: torch.Tensor, block: int, feature: int, apply_phi: bool,
            w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(A^T B summed over rows [BH, D, D] fp32, colsum(w * A) [BH, D] fp32, phi(x) if apply_phi)."""
    bh, n, d = x.shape
    n_chunks = triton.cdiv(triton.cdiv(n, block), REDUCE_BLOCKS)
    s_part = torch.empty(bh, n_chunks, d, d, device=x.device, dtype=torch.float32)
    z_part = torch.empty(bh, n_chunks, d, device=x.device, dtype=torch.float32)
    a_out = torch.empty_like(x) if apply_phi else x
    _outer_sum[(n_chunks, bh)](
        x, b, w if w is not None else x, a_out, s_part, z_part, n, n_chunks,
        FEATURE=feature, APPLY_PHI=apply_phi, HAS_W=w is not None, D=d, BR=block, CHUNK=REDUCE_BLOCKS,
        num_warps=4,
    )
    return s_part.sum(1), z_part.sum(1), a_out if apply_phi else None


class _SLAFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_map, scale, feature_map, linear_on, eps, block_q, block_k):
        batch, heads, n_q, d = q.shape
        n_k = k.shape[2]
        bh = batch * heads
        q3, k3, v3 = (t.reshape(bh, t.shape[2], d).contiguous() for t in (q, k, v))
        feature, correct = FEATURE_IDS[feature_map], linear_on == "marginal"
        n_qb, n_kb = block_map.shape[-2:]
        lut, n_crit, n_neg = _block_lists(block_map)
        s_all, z_all, fk = _reduce(k3, v3, block_k, feature, apply_phi=True)
        s_split, s_scale = _split(s_all, q.dtype)
        o_s, o_l = torch.empty_like(q3), torch.empty_like(q3)
        lse = torch.empty(bh, n_q, device=q.device, dtype=torch.float32)
        den = torch.empty_like(lse)
        _fwd[(n_qb, bh)](
            q3, k3, v3, fk, s_split, s_scale, z_all, lut, n_crit, n_neg, o_s, o_l, lse, den,
            scale * LOG2E, eps, n_q, n_k, n_qb, n_kb,
            FEATURE=feature, CORRECT=correct, D=d, BQ=block_q, BK=block_k, **_launch("fwd", d, block_q),
        )
        ctx.save_for_backward(q3, k3, v3, fk, s_split, s_scale, z_all, block_map, lut, n_crit, n_neg, o_s, o_l, lse, den)
        ctx.cfg = (batch, heads, scale, feature, correct, block_q, block_k)
        return o_s.view(batch, heads, n_q, d), o_l.view(batch, heads, n_q, d)

    @staticmethod
    def backward(ctx, do_s, do_l):
        q3, k3, v3, fk, s_split, s_scale, z_all, block_map, lut, n_crit, n_neg, o_s, o_l, lse, den = ctx.saved_tensors
        batch, heads, scale, feature, correct, block_q, block_k = ctx.cfg
        bh, n_q, d = q3.shape
        n_k = k3.shape[1]
        n_qb, n_kb = block_map.shape[-2:]
        do3 = do_s.reshape(bh, n_q, d).contiguous()
        dol3 = do_l.reshape(bh, n_q, d).contiguous()
        dq, fq, g = torch.empty_like(q3), torch.empty_like(q3), torch.empty_like(q3)
        c, delta = torch.empty_like(lse), torch.empty_like(lse)
        tile = min(block_q, BWD_Q_TILE)
        _bwd_q[(triton.cdiv(n_q, tile), bh)](
            q3, k3, v3, fk, s_split, s_scale, z_all, lut, n_crit, n_neg, o_s, o_l, do3, dol3, lse, den,
            dq, fq, g, c, delta, scale, scale * LOG2E, n_q, n_k, n_qb, n_kb,
            FEATURE=feature, CORRECT=correct, D=d, BQ=block_q, BK=block_k, QT=tile, **_launch("bwd_q", d, tile),
        )
        ds_all, dz_all, _ = _reduce(fq, g, block_q, feature, apply_phi=False, w=c)
        ds_split, ds_scale = _split(ds_all, q3.dtype)
        lut_t, n_crit_t, n_neg_t = _block_lists(block_map.transpose(-1, -2))
        dk, dv = torch.empty_like(k3), torch.empty_like(v3)
        _bwd_kv[(n_kb, bh)](
            q3, k3, v3, fq, g, c, do3, lse, delta, ds_split, ds_scale, dz_all, lut_t, n_crit_t, n_neg_t,
            dk, dv, scale, scale * LOG2E, n_q, n_k, n_qb, n_kb,
            FEATURE=feature, CORRECT=correct, D=d, BQ=block_q, BK=block_k, QT=tile, **_launch("bwd_kv", d, tile),
        )
        shape_q, shape_k = (batch, heads, n_q, d), (batch, heads, n_k, d)
        return dq.view(shape_q), dk.view(shape_k), dv.view(shape_k), None, None, None, None, None, None, None


def sla_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_map: torch.Tensor, scale: float,
    feature_map: str, linear_on: str, eps: float, block_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O_s, O_l) of SLA in one fused kernel per direction; arguments as validated by
    `zoo.ops.sparse_linear_attention` (which applies the projection after) and accepted by `can_run`."""
    block_q, block_k = block_size
    return _SLAFused.apply(q, k, v, block_map, float(scale), feature_map, linear_on, float(eps), block_q, block_k)
