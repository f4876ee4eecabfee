"""Non-causal linear attention in Triton: one fused core for FLatten, InLine, MAViT (MALA) and RAVLT (RALA).

Every family reduces to the same two passes over per-(batch, head) statistics of the keys, with key
weights w_j (1/N, or RALA's softmax weights e_j):

    kv = sum_j w_j k_num_j^T v_j   [D, Dv]      ks = sum_j w_j k_j   [D]      vs = sum_j w_j v_j   [Dv]
    num_i = q_num_i kv,  z_i = q_i . ks, and per `MODE`:
      NORMALISED (FLatten, decoupled, RALA)  out_i = num_i / (z_i + eps)
      INJECTIVE  (InLine)                    out_i = s num_i + (1 - s z_i) vs
      MAGNITUDE  (MALA)                      out_i = s num_i (1 + 1 / (s z_i + eps)) - s z_i vs

Forward: `_state_kernel` (grid: batch*heads x key splits) reads k, k_num, v once and adds its part of
kv, ks, vs (float32) with atomics; `_query_kernel` (grid: query tiles x batch*heads) reads q, q_num and
writes out. Backward: `_query_grad_kernel` (grid: batch*heads x query splits) recomputes num and z per
query tile, writes dq (dq_num) and adds its part of d kv, d ks, d vs; `_key_grad_kernel` writes dk, dv (dk_num) and RALA's dw. The feature maps (FLatten's
focused map over all channels, ELU+1) stay outside. RoPE (`ROPE`) can be made inside: the numerator
features are then RoPE of the q, k tiles already loaded (from `[N, D]` signed-sin and cos tables, rounded to
the input dtype as RoPE outside and a cast would be), and its transpose is applied to dq, dk in the backward:
no RoPE'd copies of q, k and none of RoPE's elementwise kernels, forward or backward.

Layout: q, k, v are read through all four strides of `[B, H, N, D]`, so the head-split views of a fused
projection (`[B, N, H, D]` or a conv's `[B, H, D, N]`) need no copy; out is written token-major
`[B, N, H, Dv]` (returned as its `[B, H, N, Dv]` view) so merging heads is free.

Precision: products of two input-dtype operands run on tensor cores with float32 accumulation; a float32
operand (kv, the gradients) is split into hi + lo parts in the input dtype (`_split_dot`), so it keeps
about twice the dtype's mantissa. fp16/bf16 only (`can_run`); head dims up to 128 (padded to a power of two).

Range: bfloat16 has float32's exponent range, so its split cannot overflow. float16 stops at 65504, and the
state is not bounded by the inputs (kv = mean k^T v reaches |k| |v|, e.g. 300 x 300; d_num = do / z grows as z
-> 0): a plain float16 split turns such an entry into inf, and an entry below 2^-14 into a few-bit subnormal.
So for float16 every float32 operand is first scaled per column (per row for the left one of `_split_dot2`)
by a power of two that puts its max in [2^13, 2^14) and the product is scaled back (`_fit_float16`). Chosen
over the alternatives: a bfloat16 hi/lo split would need the float16 operand split too (mixed-dtype dots do not
exist: four products instead of two); float32 operands with tf32 dots keep only a 10-bit mantissa (tf32x3
costs three dots at half the float16 rate); detecting overflow on the host costs a device sync per call (and
breaks CUDA graphs), and a silent inf is what this must rule out. Powers of two are exact, so results equal the
unscaled split's wherever that one was in range; the cost is one max-reduction and a multiply on a tile
already in registers, paid only for float16.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
MODES = {"normalised": 0, "injective": 1, "magnitude": 2}
BLOCK_N = 64  # tokens per tile in every kernel
TARGET_PROGRAMS = 1024  # splits of the two reduction passes (state, query gradients): a small batch fills the GPU


@triton.jit
def _fit_float16(x, AXIS: tl.constexpr):
    """(x * up, down = 1 / up): `up` a power of two per slice along AXIS (kept as a broadcast dim) that puts the
    slice's max |x| in [2^13, 2^14), so a float16 hi + lo split of it neither overflows (65504) nor loses bits
    to subnormals (< 2^-14); powers of two scale exactly. Built from the float32 exponent bits (exact, unlike
    exp2/log2); a slice below 2^-113 (or all zero) gets up = 2^126, above 2^127 up = 2^-114."""
    m = tl.max(tl.abs(x), axis=AXIS, keep_dims=True)
    e = tl.minimum(tl.maximum((m.to(tl.int32, bitcast=True) >> 23) & 0xFF, 14), 254)  # biased exponent of m
    up = ((267 - e) << 23).to(tl.float32, bitcast=True)  # 2^(13 - (e - 127))
    down = ((e - 13) << 23).to(tl.float32, bitcast=True)  # 2^((e - 127) - 13)
    return x * up, down


@triton.jit
def _hi_lo_dot(a, b, acc, DT: tl.constexpr):
    """acc + a @ b for `a` in DT and float32 `b` carried as hi + lo in DT."""
    hi = b.to(DT)
    acc = tl.dot(a, hi, acc)
    return tl.dot(a, (b - hi.to(tl.float32)).to(DT), acc)


@triton.jit
def _hi_lo_dot2(a, b, acc, DT: tl.constexpr):
    """acc + a @ b for two float32 operands (three hi/lo products; lo @ lo is below the rounding)."""
    a_hi = a.to(DT)
    acc = _hi_lo_dot(a_hi, b, acc, DT)
    return tl.dot((a - a_hi.to(tl.float32)).to(DT), b.to(DT), acc)


@triton.jit
def _split_dot(a, b, acc, DT: tl.constexpr):
    """acc + a @ b for `a` in the input dtype DT and a float32 `b` (see "Precision" above): for float16 each
    column of b is first brought into float16's range by a power of two, undone on the product."""
    if DT == tl.float16:
        b, down = _fit_float16(b, 0)
        return acc + _hi_lo_dot(a, b, tl.zeros_like(acc), DT) * down
    return _hi_lo_dot(a, b, acc, DT)


@triton.jit
def _split_dot2(a, b, acc, DT: tl.constexpr):
    """acc + a @ b for two float32 operands; for float16 the rows of a and the columns of b are fitted."""
    if DT == tl.float16:
        a, a_down = _fit_float16(a, 1)
        b, b_down = _fit_float16(b, 0)
        return acc + _hi_lo_dot2(a, b, tl.zeros_like(acc), DT) * a_down * b_down  # in turn: no 2^-252 underflow
    return _hi_lo_dot2(a, b, acc, DT)


@triton.jit
def _swap_pairs(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) along the columns, in registers."""
    even, odd = tl.split(tl.reshape(x, (ROWS, COLS // 2, 2)))
    return tl.reshape(tl.join(odd, even), (ROWS, COLS))


@triton.jit
def _rope_tables(SIN, COS, rows, rd, n_rows, D: tl.constexpr):
    """The signed-sin and cos tables (contiguous float32 `[N, D]`) at a tile's rows; zero outside."""
    offsets = rows[:, None] * D + rd[None, :]
    mask = (rows[:, None] < n_rows) & (rd[None, :] < D)
    return tl.load(SIN + offsets, mask=mask, other=0.0), tl.load(COS + offsets, mask=mask, other=0.0)


@triton.jit
def _rope(x, sin, cos, BLOCK: tl.constexpr, BD: tl.constexpr):
    """RoPE of a tile in float32, x cos + swap_pairs(x) signed_sin (`zoo.ops.linear_rmt.naive.rope`)."""
    x = x.to(tl.float32)
    return x * cos + _swap_pairs(x, BLOCK, BD) * sin


@triton.jit
def _rope_grad(g, sin, cos, BLOCK: tl.constexpr, BD: tl.constexpr):
    """The gradient through `_rope`: g cos + swap_pairs(g signed_sin)."""
    return g * cos + _swap_pairs(g * sin, BLOCK, BD)


@triton.jit
def _tile(PTR, b, h, rows, cols, sb, sh, sn, sd, n_rows, n_cols):
    """Pointers and mask of a [rows, cols] tile of a strided `[B, H, N, D]` tensor."""
    ptrs = PTR + b * sb + h * sh + rows[:, None] * sn + cols[None, :] * sd
    return ptrs, (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def _load_state(KV, KS, VS, bh, rd, rdv, D: tl.constexpr, DV: tl.constexpr):
    kv = tl.load(KV + bh * D * DV + rd[:, None] * DV + rdv[None, :], mask=(rd[:, None] < D) & (rdv[None, :] < DV),
                 other=0.0)
    ks = tl.load(KS + bh * D + rd, mask=rd < D, other=0.0)
    vs = tl.load(VS + bh * DV + rdv, mask=rdv < DV, other=0.0)
    return kv, ks, vs


@triton.jit
def _add_state(KV, KS, VS, bh, rd, rdv, kv, ks, vs, D: tl.constexpr, DV: tl.constexpr, HAS_VS: tl.constexpr):
    tl.atomic_add(KV + bh * D * DV + rd[:, None] * DV + rdv[None, :], kv, mask=(rd[:, None] < D) & (rdv[None, :] < DV))
    tl.atomic_add(KS + bh * D + rd, ks, mask=rd < D)
    if HAS_VS:
        tl.atomic_add(VS + bh * DV + rdv, vs, mask=rdv < DV)


@triton.jit
def _state_kernel(
    K, KN, V, W, SIN, COS, KV, KS, VS,
    skb, skh, skn, skd, snb, snh, snn, snd, svb, svh, svn, svd, swb, swh,
    H, N, per_split, inv_n,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLOCK: tl.constexpr,
    DECOUPLED: tl.constexpr, WEIGHTED: tl.constexpr, ROPE: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    start = tl.program_id(1) * per_split
    end = tl.minimum(start + per_split, N)
    rd, rdv, rn = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BLOCK)
    kv = tl.zeros((BD, BDV), tl.float32)
    ks = tl.zeros((BD,), tl.float32)
    vs = tl.zeros((BDV,), tl.float32)
    for n0 in range(start, end, BLOCK):
        rows = n0 + rn
        ptrs, mask = _tile(K, b, h, rows, rd, skb, skh, skn, skd, end, D)
        k = tl.load(ptrs, mask=mask, other=0.0)
        ptrs, mask = _tile(V, b, h, rows, rdv, svb, svh, svn, svd, end, DV)
        v = tl.load(ptrs, mask=mask, other=0.0)
        if DECOUPLED:
            ptrs, mask = _tile(KN, b, h, rows, rd, snb, snh, snn, snd, end, D)
            kn = tl.load(ptrs, mask=mask, other=0.0)
        elif ROPE:  # rounded to the input dtype, as RoPE outside the kernel and a cast would
            sin, cos = _rope_tables(SIN, COS, rows, rd, end, D)
            kn = _rope(k, sin, cos, BLOCK, BD).to(k.dtype)
        else:
            kn = k
        if WEIGHTED:  # w N: 1 on average, up to N (one dominant key); the split fits it to float16's range
            w = tl.load(W + b * swb + h * swh + rows, mask=rows < end, other=0.0) * N
            vw = v.to(tl.float32) * w[:, None]
            kv = _split_dot(tl.trans(kn), vw, kv, v.dtype)
            ks += tl.sum(k.to(tl.float32) * w[:, None], 0)
            vs += tl.sum(vw, 0)
        else:
            kv = tl.dot(tl.trans(kn), v, kv)
            ks += tl.sum(k.to(tl.float32), 0)
            vs += tl.sum(v.to(tl.float32), 0)
    _add_state(KV, KS, VS, bh, rd, rdv, kv * inv_n, ks * inv_n, vs * inv_n, D, DV, True)


@triton.jit
def _query_kernel(
    Q, QN, SIN, COS, KV, KS, VS, OUT,
    sqb, sqh, sqn, sqd, snb, snh, snn, snd, sob, soh, son, sod,
    H, N, scale, eps,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLOCK: tl.constexpr,
    DECOUPLED: tl.constexpr, MODE: tl.constexpr, ROPE: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rd, rdv = tl.arange(0, BD), tl.arange(0, BDV)
    ptrs, mask = _tile(Q, b, h, rows, rd, sqb, sqh, sqn, sqd, N, D)
    q = tl.load(ptrs, mask=mask, other=0.0)
    if DECOUPLED:
        ptrs, mask = _tile(QN, b, h, rows, rd, snb, snh, snn, snd, N, D)
        qn = tl.load(ptrs, mask=mask, other=0.0)
    elif ROPE:
        sin, cos = _rope_tables(SIN, COS, rows, rd, N, D)
        qn = _rope(q, sin, cos, BLOCK, BD).to(q.dtype)
    else:
        qn = q
    kv, ks, vs = _load_state(KV, KS, VS, bh, rd, rdv, D, DV)
    num = _split_dot(qn, kv, tl.zeros((BLOCK, BDV), tl.float32), q.dtype)
    z = tl.sum(q.to(tl.float32) * ks[None, :], 1)
    if MODE == 0:
        out = num / (z + eps)[:, None]
    elif MODE == 1:
        out = scale * num + (1 - scale * z)[:, None] * vs[None, :]
    else:
        zs = scale * z
        out = scale * num * (1 + 1 / (zs + eps))[:, None] - zs[:, None] * vs[None, :]
    ptrs, mask = _tile(OUT, b, h, rows, rdv, sob, soh, son, sod, N, DV)
    tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _query_grad_kernel(
    Q, QN, SIN, COS, DO, KV, KS, VS, DQ, DQN, DKV, DKS, DVS,
    sqb, sqh, sqn, sqd, snb, snh, snn, snd, sob, soh, son, sod, sgb, sgh, sgn, sgd, smb, smh, smn, smd,
    H, N, per_split, scale, eps,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLOCK: tl.constexpr,
    DECOUPLED: tl.constexpr, MODE: tl.constexpr, ROPE: tl.constexpr,
):
    """One program = one (batch, head) and a range of query tiles: d kv, d ks, d vs are summed in registers
    over the range and added once (atomics per program, not per tile)."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    start = tl.program_id(1) * per_split
    end = tl.minimum(start + per_split, N)
    rd, rdv, rn = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BLOCK)
    kv, ks, vs = _load_state(KV, KS, VS, bh, rd, rdv, D, DV)
    d_kv = tl.zeros((BD, BDV), tl.float32)
    d_ks = tl.zeros((BD,), tl.float32)
    d_vs = tl.zeros((BDV,), tl.float32)
    for n0 in range(start, end, BLOCK):
        rows = n0 + rn
        ptrs, mask = _tile(Q, b, h, rows, rd, sqb, sqh, sqn, sqd, end, D)
        q = tl.load(ptrs, mask=mask, other=0.0)
        if DECOUPLED:
            ptrs, mask = _tile(QN, b, h, rows, rd, snb, snh, snn, snd, end, D)
            qn = tl.load(ptrs, mask=mask, other=0.0)
        elif ROPE:
            sin, cos = _rope_tables(SIN, COS, rows, rd, end, D)
            qn = _rope(q, sin, cos, BLOCK, BD).to(q.dtype)
        else:
            qn = q
        ptrs, mask = _tile(DO, b, h, rows, rdv, sob, soh, son, sod, end, DV)
        do = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        num = _split_dot(qn, kv, tl.zeros((BLOCK, BDV), tl.float32), q.dtype)
        z = tl.sum(q.to(tl.float32) * ks[None, :], 1)
        if MODE == 0:
            r = 1 / (z + eps)
            d_num = do * r[:, None]
            dz = -tl.sum(do * num, 1) * r * r
        elif MODE == 1:
            d_num = scale * do
            dz = -scale * tl.sum(do * vs[None, :], 1)
            d_vs += tl.sum((1 - scale * z)[:, None] * do, 0)
        else:
            zs = scale * z
            r = 1 / (zs + eps)
            d_num = (scale * (1 + r))[:, None] * do
            dz = scale * (-scale * tl.sum(do * num, 1) * r * r - tl.sum(do * vs[None, :], 1))
            d_vs += tl.sum(-zs[:, None] * do, 0)
        dqn = _split_dot2(d_num, tl.trans(kv), tl.zeros((BLOCK, BD), tl.float32), q.dtype)
        dq = dz[:, None] * ks[None, :]
        if DECOUPLED:
            ptrs, mask = _tile(DQN, b, h, rows, rd, smb, smh, smn, smd, end, D)
            tl.store(ptrs, dqn.to(DQN.dtype.element_ty), mask=mask)
        elif ROPE:
            dq += _rope_grad(dqn, sin, cos, BLOCK, BD)
        else:
            dq += dqn
        ptrs, mask = _tile(DQ, b, h, rows, rd, sgb, sgh, sgn, sgd, end, D)
        tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=mask)
        d_kv = _split_dot(tl.trans(qn), d_num, d_kv, q.dtype)
        d_ks += tl.sum(dz[:, None] * q.to(tl.float32), 0)
    _add_state(DKV, DKS, DVS, bh, rd, rdv, d_kv, d_ks, d_vs, D, DV, MODE != 0)


@triton.jit
def _key_grad_kernel(
    K, KN, V, W, SIN, COS, DKV, DKS, DVS, DK, DKN, DV_, DW,
    skb, skh, skn, skd, snb, snh, snn, snd, svb, svh, svn, svd, swb, swh,
    sgb, sgh, sgn, sgd, smb, smh, smn, smd, sdb, sdh, sdn, sdd,
    H, N, inv_n,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLOCK: tl.constexpr,
    DECOUPLED: tl.constexpr, WEIGHTED: tl.constexpr, ROPE: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rd, rdv = tl.arange(0, BD), tl.arange(0, BDV)
    ptrs, mask = _tile(K, b, h, rows, rd, skb, skh, skn, skd, N, D)
    k = tl.load(ptrs, mask=mask, other=0.0)
    ptrs, mask = _tile(V, b, h, rows, rdv, svb, svh, svn, svd, N, DV)
    v = tl.load(ptrs, mask=mask, other=0.0)
    if DECOUPLED:
        ptrs, mask = _tile(KN, b, h, rows, rd, snb, snh, snn, snd, N, D)
        kn = tl.load(ptrs, mask=mask, other=0.0)
    elif ROPE:
        sin, cos = _rope_tables(SIN, COS, rows, rd, N, D)
        kn = _rope(k, sin, cos, BLOCK, BD).to(k.dtype)
    else:
        kn = k
    d_kv, d_ks, d_vs = _load_state(DKV, DKS, DVS, bh, rd, rdv, D, DV)
    d_kv, d_ks, d_vs = d_kv * inv_n, d_ks * inv_n, d_vs * inv_n  # sums over the queries: O(N) before this
    if WEIGHTED:  # w N: 1 for uniform weights
        w = tl.load(W + b * swb + h * swh + rows, mask=rows < N, other=0.0) * N
    else:
        w = tl.full((BLOCK,), 1.0, tl.float32)
    v_dkv = _split_dot(v, tl.trans(d_kv), tl.zeros((BLOCK, BD), tl.float32), v.dtype)  # v_j d_kv^T / N
    kn_dkv = _split_dot(kn, d_kv, tl.zeros((BLOCK, BDV), tl.float32), v.dtype)
    dv = (kn_dkv + d_vs[None, :]) * w[:, None]
    dkn = v_dkv * w[:, None]
    dk = w[:, None] * d_ks[None, :]
    if DECOUPLED:
        ptrs, mask = _tile(DKN, b, h, rows, rd, smb, smh, smn, smd, N, D)
        tl.store(ptrs, dkn.to(DKN.dtype.element_ty), mask=mask)
    elif ROPE:
        dk += _rope_grad(dkn, sin, cos, BLOCK, BD)
    else:
        dk += dkn
    ptrs, mask = _tile(DK, b, h, rows, rd, sgb, sgh, sgn, sgd, N, D)
    tl.store(ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    ptrs, mask = _tile(DV_, b, h, rows, rdv, sdb, sdh, sdn, sdd, N, DV)
    tl.store(ptrs, dv.to(DV_.dtype.element_ty), mask=mask)
    if WEIGHTED:  # d w_j = k_num_j . (d_kv v_j) + k_j . d_ks + v_j . d_vs (the three scaled by 1/N above)
        dw = tl.sum(kn.to(tl.float32) * v_dkv, 1) + tl.sum(k.to(tl.float32) * d_ks[None, :], 1) \
            + tl.sum(v.to(tl.float32) * d_vs[None, :], 1)
        tl.store(DW + bh * N + rows, dw * N, mask=rows < N)


# ----------------------------------------------------------------------------- host side
def can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if the kernel runs these inputs, else the reason (float32 runs the reference: no TF32 path)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16/bfloat16; use autocast or cast q, k, v)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head_dim q/k {q.shape[-1]}, v {v.shape[-1]} (the kernel takes up to {MAX_HEAD_DIM})"
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch * heads = {q.shape[0] * q.shape[1]} > 65535 (the launch grid's second axis)"
    return None


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _warps(d: int, dv: int) -> int:
    return 8 if max(d, dv) > 64 else 4


def _splits(n: int, programs: int) -> tuple[int, int]:
    """(splits, tokens per split, a multiple of BLOCK_N) of a sequence reduced by `programs` (batch * heads)
    programs each: enough programs to fill the GPU, few atomics per state entry."""
    splits = max(1, min(math.ceil(n / BLOCK_N), TARGET_PROGRAMS // programs))
    per_split = math.ceil(math.ceil(n / splits) / BLOCK_N) * BLOCK_N
    return math.ceil(n / per_split), per_split


def _strides(t: torch.Tensor | None) -> tuple[int, ...]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def token_major_like(q: torch.Tensor, dim_v: int) -> torch.Tensor:
    """An uninitialised `[B, H, N, dim_v]` view of a `[B, N, H, dim_v]` buffer (heads merge without a copy)."""
    b, h, n, _ = q.shape
    return q.new_empty(b, n, h, dim_v).transpose(1, 2)


def state_size(q: torch.Tensor, v: torch.Tensor) -> int:
    """Entries of the flat float32 state (kv, ks, vs of every batch and head) of q `[B, H, N, D]`, v `[..., Dv]`."""
    b, h, _, d = q.shape
    dv = v.shape[3]
    return b * h * (d * dv + d + dv)


def _state_parts(state: torch.Tensor, q: torch.Tensor, v: torch.Tensor):
    """kv `[B, H, D, Dv]`, ks `[B, H, D]`, vs `[B, H, Dv]`: views of one flat buffer (one memset, not three)."""
    b, h, _, d = q.shape
    dv = v.shape[3]
    n_kv, n_ks = b * h * d * dv, b * h * d
    return (state[:n_kv].view(b, h, d, dv), state[n_kv:n_kv + n_ks].view(b, h, d),
            state[n_kv + n_ks:].view(b, h, dv))


def forward(q, k, v, q_num, k_num, weights, rope_sin, rope_cos, mode: int, scale: float, eps: float):
    """(out `[B, H, Nq, Dv]`, the float32 state: kv, ks, vs flat, `_state_parts`). rope_sin/rope_cos: None or
    contiguous float32 `[N, D]` tables (Nq = Nk = N): the numerator features are RoPE of q, k, made in the kernels."""
    b, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    state = torch.zeros(state_size(q, v), device=q.device, dtype=torch.float32)
    kv, ks, vs = _state_parts(state, q, v)
    bd, bdv, warps = _pad(d), _pad(dv), _warps(d, dv)
    splits, per_split = _splits(n_k, b * h)
    decoupled, weighted, rope = k_num is not None, weights is not None, rope_sin is not None
    tables = (rope_sin, rope_cos) if rope else (kv, kv)
    _state_kernel[(b * h, splits)](
        k, k_num if decoupled else k, v, weights if weighted else kv, *tables, kv, ks, vs,
        *_strides(k), *_strides(k_num), *_strides(v), *(_strides(weights)[:2] if weighted else (0, 0)),
        h, n_k, per_split, 1.0 / n_k,
        D=d, DV=dv, BD=bd, BDV=bdv, BLOCK=BLOCK_N, DECOUPLED=decoupled, WEIGHTED=weighted, ROPE=rope,
        num_warps=warps,
    )
    out = token_major_like(q, dv)
    _query_kernel[(math.ceil(n_q / BLOCK_N), b * h)](
        q, q if q_num is None else q_num, *tables, kv, ks, vs, out,
        *_strides(q), *_strides(q_num), *_strides(out), h, n_q, scale, eps,
        D=d, DV=dv, BD=bd, BDV=bdv, BLOCK=BLOCK_N, DECOUPLED=q_num is not None, MODE=mode, ROPE=rope,
        num_warps=warps,
    )
    return out, state


def backward(do, q, k, v, q_num, k_num, weights, rope_sin, rope_cos, state, mode: int, scale: float, eps: float):
    """(dq, dk, dv, dq_num or None, dk_num or None, d weights (float32) or None) from the forward's state."""
    b, h, n_q, d = q.shape
    n_k, dv = k.shape[2], v.shape[3]
    bd, bdv, warps = _pad(d), _pad(dv), _warps(d, dv)
    kv, ks, vs = _state_parts(state, q, v)
    d_kv, d_ks, d_vs = _state_parts(torch.zeros_like(state), q, v)
    rope = rope_sin is not None
    tables = (rope_sin, rope_cos) if rope else (kv, kv)
    dq = torch.empty_like(q)
    dq_num = None if q_num is None else torch.empty_like(q_num)
    splits, per_split = _splits(n_q, b * h)
    _query_grad_kernel[(b * h, splits)](
        q, q if q_num is None else q_num, *tables, do, kv, ks, vs, dq, dq if dq_num is None else dq_num, d_kv, d_ks,
        d_vs,
        *_strides(q), *_strides(q_num), *_strides(do), *_strides(dq), *_strides(dq_num), h, n_q, per_split, scale,
        eps,
        D=d, DV=dv, BD=bd, BDV=bdv, BLOCK=BLOCK_N, DECOUPLED=q_num is not None, MODE=mode, ROPE=rope,
        num_warps=warps,
    )
    dk, d_v = torch.empty_like(k), torch.empty_like(v)
    dk_num = None if k_num is None else torch.empty_like(k_num)
    d_weights = None if weights is None else torch.empty(b, h, n_k, device=q.device, dtype=torch.float32)
    _key_grad_kernel[(math.ceil(n_k / BLOCK_N), b * h)](
        k, k if k_num is None else k_num, v, kv if weights is None else weights, *tables, d_kv, d_ks, d_vs, dk,
        dk if dk_num is None else dk_num, d_v, kv if d_weights is None else d_weights,
        *_strides(k), *_strides(k_num), *_strides(v), *(_strides(weights)[:2] if weights is not None else (0, 0)),
        *_strides(dk), *_strides(dk_num), *_strides(d_v), h, n_k, 1.0 / n_k,
        D=d, DV=dv, BD=bd, BDV=bdv, BLOCK=BLOCK_N, DECOUPLED=k_num is not None, WEIGHTED=weights is not None,
        ROPE=rope, num_warps=warps,
    )
    return dq, dk, d_v, dq_num, dk_num, d_weights


# ----------------------------------------------------------------------------- custom ops + autograd
# torch.compile sees one opaque op per direction (no graph break). weights: float32 `[B, H, Nk]`, unit stride
# along the keys, or None for the uniform 1/Nk; q_num/k_num None means q/k (read once), or RoPE of q/k when
# rope_sin/rope_cos (contiguous float32 `[N, D]` tables, no gradient) are given.
@torch.library.custom_op("zoo::linear_attention_forward", mutates_args=())
def linear_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_num: torch.Tensor | None,
                      k_num: torch.Tensor | None, weights: torch.Tensor | None, rope_sin: torch.Tensor | None,
                      rope_cos: torch.Tensor | None, mode: int, scale: float,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, flat float32 state for the backward)."""
    return forward(q, k, v, q_num, k_num, weights, rope_sin, rope_cos, mode, scale, eps)


@linear_forward_op.register_fake
def _(q, k, v, q_num, k_num, weights, rope_sin, rope_cos, mode, scale, eps):
    return token_major_like(q, v.shape[3]), q.new_empty(state_size(q, v), dtype=torch.float32)


@torch.library.custom_op("zoo::linear_attention_backward", mutates_args=())
def linear_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       q_num: torch.Tensor | None, k_num: torch.Tensor | None, weights: torch.Tensor | None,
                       rope_sin: torch.Tensor | None, rope_cos: torch.Tensor | None, state: torch.Tensor, mode: int,
                       scale: float, eps: float) -> list[torch.Tensor]:
    """[dq, dk, dv] + [dq_num, dk_num] when decoupled + [d weights] when weighted."""
    grads = backward(do, q, k, v, q_num, k_num, weights, rope_sin, rope_cos, state, mode, scale, eps)
    return [g for g in grads if g is not None]


@linear_backward_op.register_fake
def _(do, q, k, v, q_num, k_num, weights, rope_sin, rope_cos, state, mode, scale, eps):
    grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
    if q_num is not None:
        grads += [torch.empty_like(q_num), torch.empty_like(k_num)]
    if weights is not None:
        grads.append(torch.empty_like(weights, dtype=torch.float32))
    return grads


def _setup_context(ctx, inputs, output):
    q, k, v, q_num, k_num, weights, rope_sin, rope_cos, *constants = inputs
    _, state = output
    ctx.mark_non_differentiable(state)
    ctx.set_materialize_grads(False)  # the state gets no gradient: no zero-filled one made for it every backward
    ctx.save_for_backward(q, k, v, q_num, k_num, weights, rope_sin, rope_cos, state)
    ctx.constants = constants


def _backward(ctx, d_out, _d_state):
    q, k, v, q_num, k_num, weights, rope_sin, rope_cos, state = ctx.saved_tensors
    grads = iter(linear_backward_op(d_out, q, k, v, q_num, k_num, weights, rope_sin, rope_cos, state,
                                    *ctx.constants))
    dq, dk, dv = next(grads), next(grads), next(grads)
    dq_num, dk_num = (None, None) if q_num is None else (next(grads), next(grads))
    d_weights = None if weights is None else next(grads)
    return dq, dk, dv, dq_num, dk_num, d_weights, None, None, None, None, None


linear_forward_op.register_autograd(_backward, setup_context=_setup_context)


def linear_attention_triton(q, k, v, q_num, k_num, weights, mode: str, scale: float, eps: float,
                            rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """out `[B, H, Nq, Dv]` (a view of a token-major buffer) through the custom op; inputs checked, one dtype,
    non-empty; q_num/k_num None or tensors shaped like q/k (both or neither); rope: None, or the (signed_sin,
    cos) `[N, D]` tables of `zoo.ops.linear_rmt.naive.rope` with q_num/k_num None (numerator = RoPE of q, k)."""
    weights = None if weights is None else weights.float().contiguous()
    rope_sin, rope_cos = (None, None) if rope is None else (t.float().contiguous() for t in rope)
    return linear_forward_op(q, k, v, q_num, k_num, weights, rope_sin, rope_cos, MODES[mode], float(scale),
                             float(eps))[0]
