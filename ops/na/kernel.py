"""Neighborhood attention in Triton: forward and backward for 1-D/2-D/3-D (1-D and 2-D run as 3-D with
singleton leading axes), with dilation, stride (GNA), per-axis causal, RPB, GQA/MQA and additional keys.

Layout: q, k, v, out stay heads-last `[B, X0, X1, X2, heads, D]` and are read in place through their
strides. Semantics are exactly `naive.neighborhood_attention`'s: the per-axis windows come from the same
`axis_neighbors` tables, reduced on the host to four int32 vectors per axis (`axis_bounds`), in group
coordinates (token x of dilation group g = x mod d sits at x // d):
  key_lo[x], key_hi[x]  the keys query x sees (a contiguous range: clamped window, stride leader, causal);
  q_lo[x],   q_hi[x]    the queries that see key x (the inverse relation, for dk/dv).
Both ends are non-decreasing along an axis, so a tile of queries sees the box
[key_lo[first], key_hi[last]] per axis, and a tile of keys is seen from [q_lo[first], q_hi[last]].

Forward (and dq): one program = one N-d tile of queries of ONE dilation group; it walks the key tiles
covering the union box of its windows with an online softmax (exp2, `block_sparse.kernel` helpers). A key
tile that every query of the tile sees whole (checked from the box ends alone) runs without per-element
masks; other tiles mask each (query, key) pair from the coordinates. RPB is gathered in-kernel from the
bias table (offset per axis: clamp(j - i + k - 1, 0, 2k - 2), as the reference). Additional keys/values
are one more dense key segment of the same softmax. dq also accumulates the RPB gradient with fp32 atomics.
dk/dv: one program = one key tile of one kv head; it walks the query tiles of the box that can see it, for
every query head of its GQA group (no atomics). The additional keys' gradients are one dense kernel.

fp16/bf16 only (`can_run`); float32 inputs run the reference (the dispatcher says so), head dims powers of
two 16..128 (q/k and v may differ).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._flash import normalise, online_softmax, row_delta
from .naive import axis_bounds

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


# ----------------------------------------------------------------------------- geometry helpers
@triton.jit
def _tile_origin(pid, L0, L1, L2, dil0, dil1, dil2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Program `pid` -> (dilation group per axis, group lengths, first in-group coordinate of its tile)."""
    n0 = tl.cdiv(tl.cdiv(L0, dil0), T0)
    n1 = tl.cdiv(tl.cdiv(L1, dil1), T1)
    n2 = tl.cdiv(tl.cdiv(L2, dil2), T2)
    per_group = n0 * n1 * n2
    g, t = pid // per_group, pid % per_group
    g0, g1, g2 = g // (dil1 * dil2), (g // dil2) % dil1, g % dil2
    first0, first1, first2 = (t // (n1 * n2)) * T0, ((t // n2) % n1) * T1, (t % n2) * T2
    len0 = (L0 - g0 + dil0 - 1) // dil0
    len1 = (L1 - g1 + dil1 - 1) // dil1
    len2 = (L2 - g2 + dil2 - 1) // dil2
    return g0, g1, g2, len0, len1, len2, first0, first1, first2


@triton.jit
def _tile_coords(first0, first1, first2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """In-group coordinates of a tile's T0*T1*T2 tokens (row-major)."""
    r = tl.arange(0, T0 * T1 * T2)
    return first0 + r // (T1 * T2), first1 + (r // T2) % T1, first2 + r % T2


@triton.jit
def _offsets(c0, c1, c2, g0, g1, g2, dil0, dil1, dil2, s0, s1, s2):
    """Memory offsets (int64) of in-group coordinates."""
    return ((c0 * dil0 + g0).to(tl.int64) * s0 + (c1 * dil1 + g1).to(tl.int64) * s1
            + (c2 * dil2 + g2).to(tl.int64) * s2)


@triton.jit
def _token(c0, c1, c2, g0, g1, g2, dil0, dil1, dil2, L1, L2):
    """Row-major token index of in-group coordinates (the lse / delta vectors)."""
    return ((c0 * dil0 + g0) * L1 + (c1 * dil1 + g1)) * L2 + (c2 * dil2 + g2)


@triton.jit
def _bound(TAB, tab_len, axis: tl.constexpr, row: tl.constexpr, c, g, dil, ok):
    """Table `row` (0 key_lo, 1 key_hi, 2 q_lo, 3 q_hi) of `axis` at in-group coordinate c."""
    return tl.load(TAB + (axis * 4 + row) * tab_len + c * dil + g, mask=ok, other=0)


@triton.jit
def _box(TAB, tab_len, axis: tl.constexpr, ROW_LO: tl.constexpr, first, length, g, dil, T: tl.constexpr):
    """Per axis for a tile starting at `first`: (box start, box end, number of opposite tiles of size T,
    the largest lower bound and smallest upper bound over the tile's own tokens)."""
    last = tl.minimum(first + T - 1, length - 1)
    ok = first <= last
    lo = _bound(TAB, tab_len, axis, ROW_LO, first, g, dil, ok)
    hi = _bound(TAB, tab_len, axis, ROW_LO + 1, last, g, dil, ok)
    max_lo = _bound(TAB, tab_len, axis, ROW_LO, last, g, dil, ok)
    min_hi = _bound(TAB, tab_len, axis, ROW_LO + 1, first, g, dil, ok)
    return lo, hi, max_lo, min_hi, tl.where(ok & (hi >= lo), hi - lo + 1, 0)


@triton.jit
def _axis_rel(qc, kc, ks):
    """Per-axis rpb index of each (query, key) pair: clamp(j - i + k - 1, 0, 2k - 2), as the reference."""
    return tl.minimum(tl.maximum(kc[None, :] - qc[:, None] + ks - 1, 0), 2 * ks - 2)


@triton.jit
def _rpb_offset(qc0, qc1, qc2, kc0, kc1, kc2, ks0, ks1, ks2, NA_DIM: tl.constexpr):
    """Offset of each pair's bias in one head's flattened table (axes before the last NA_DIM are singletons)."""
    off = _axis_rel(qc2, kc2, ks2)
    if NA_DIM >= 2:
        off += _axis_rel(qc1, kc1, ks1) * (2 * ks2 - 1)
    if NA_DIM == 3:
        off += _axis_rel(qc0, kc0, ks0) * ((2 * ks1 - 1) * (2 * ks2 - 1))
    return off


@triton.jit
def _inside(kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2, NA_DIM: tl.constexpr):
    """Which (query, key) pairs are in the query's window (lo/hi: per query row, in-group)."""
    inside = (kc2[None, :] >= lo2[:, None]) & (kc2[None, :] <= hi2[:, None])
    if NA_DIM >= 2:
        inside = inside & (kc1[None, :] >= lo1[:, None]) & (kc1[None, :] <= hi1[:, None])
    if NA_DIM == 3:
        inside = inside & (kc0[None, :] >= lo0[:, None]) & (kc0[None, :] <= hi0[:, None])
    return inside


@triton.jit
def _bias_mask(qk, qc0, qc1, qc2, kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2, ks0, ks1, ks2, rpb_head, inv_scale,
               HAS_RPB: tl.constexpr, MASKED: tl.constexpr, NA_DIM: tl.constexpr):
    """Raw scores of a [queries, keys] tile + rpb / scale; with MASKED, -inf where a key is outside the
    query's window."""
    if MASKED:
        inside = _inside(kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2, NA_DIM)
    if HAS_RPB:
        off = _rpb_offset(qc0, qc1, qc2, kc0, kc1, kc2, ks0, ks1, ks2, NA_DIM)
        if MASKED:
            bias = tl.load(rpb_head + off, mask=inside, other=0.0)
        else:
            bias = tl.load(rpb_head + off)
        qk = qk + bias * inv_scale
    if MASKED:
        qk = tl.where(inside, qk, float("-inf"))
    return qk


@triton.jit
def _rpb_grad(ds, qc0, qc1, qc2, kc0, kc1, kc2, ks0, ks1, ks2, drpb_head, inside, NA_DIM: tl.constexpr):
    """drpb[offset(i, j)] += dS_ij (fp32 atomics) for the pairs `inside` says exist."""
    off = _rpb_offset(qc0, qc1, qc2, kc0, kc1, kc2, ks0, ks1, ks2, NA_DIM)
    tl.atomic_add(drpb_head + off, ds, mask=inside, sem="relaxed")


@triton.jit
def _split(t, n1, n2):
    return t // (n1 * n2), (t // n2) % n1, t % n2


# ----------------------------------------------------------------------------- forward / dq
@triton.jit
def _na_query_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, RPB, DRPB, EK, EV, TAB,  # noqa: E741 (flash-attention names)
    s_qb, s_q0, s_q1, s_q2, s_qh, s_kb, s_k0, s_k1, s_k2, s_kh, s_vb, s_v0, s_v1, s_v2, s_vh,
    s_ob, s_o0, s_o1, s_o2, s_oh, s_gb, s_g0, s_g1, s_g2, s_gh, s_eb, s_en, s_eh, s_fb, s_fn, s_fh,
    L0, L1, L2, dil0, dil1, dil2, ks0, ks1, ks2, tab_len, H, KV_GROUP, N_EXTRA, DRPB_SLOTS, qk_scale, inv_scale,
    scale, TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr,
    TK2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, HAS_RPB: tl.constexpr,
    HAS_EXTRA: tl.constexpr, BACKWARD: tl.constexpr, NA_DIM: tl.constexpr,
):
    """Forward (BACKWARD=False: O, LSE) or dq (+ drpb) (BACKWARD=True) of one query tile: the same walk.
    Backward passes DO's strides in the s_o* slots and DQ's in s_g* (O itself is not read)."""
    pid, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), pid_bh % H
    hk = (h // KV_GROUP).to(tl.int64)
    g0, g1, g2, len0, len1, len2, f0, f1, f2 = _tile_origin(pid, L0, L1, L2, dil0, dil1, dil2, TQ0, TQ1, TQ2)
    qc0, qc1, qc2 = _tile_coords(f0, f1, f2, TQ0, TQ1, TQ2)
    q_ok = (qc0 < len0) & (qc1 < len1) & (qc2 < len2)
    lo0 = _bound(TAB, tab_len, 0, 0, qc0, g0, dil0, q_ok)
    hi0 = _bound(TAB, tab_len, 0, 1, qc0, g0, dil0, q_ok)
    lo1 = _bound(TAB, tab_len, 1, 0, qc1, g1, dil1, q_ok)
    hi1 = _bound(TAB, tab_len, 1, 1, qc1, g1, dil1, q_ok)
    lo2 = _bound(TAB, tab_len, 2, 0, qc2, g2, dil2, q_ok)
    hi2 = _bound(TAB, tab_len, 2, 1, qc2, g2, dil2, q_ok)
    box0, end0, maxlo0, minhi0, span0 = _box(TAB, tab_len, 0, 0, f0, len0, g0, dil0, TQ0)
    box1, end1, maxlo1, minhi1, span1 = _box(TAB, tab_len, 1, 0, f1, len1, g1, dil1, TQ1)
    box2, end2, maxlo2, minhi2, span2 = _box(TAB, tab_len, 2, 0, f2, len2, g2, dil2, TQ2)
    n1, n2 = tl.cdiv(span1, TK1), tl.cdiv(span2, TK2)
    n_tiles = tl.cdiv(span0, TK0) * n1 * n2

    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_off = _offsets(qc0, qc1, qc2, g0, g1, g2, dil0, dil1, dil2, s_q0, s_q1, s_q2)
    q = tl.load(Q + b * s_qb + h * s_qh + q_off[:, None] + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    k_head = K + b * s_kb + hk * s_kh
    v_head = V + b * s_vb + hk * s_vh
    rpb_head = RPB + h * (2 * ks0 - 1) * (2 * ks1 - 1) * (2 * ks2 - 1)
    token = pid_bh.to(tl.int64) * L0 * L1 * L2 + _token(qc0, qc1, qc2, g0, g1, g2, dil0, dil1, dil2, L1, L2)
    o_off = b * s_ob + h * s_oh + _offsets(qc0, qc1, qc2, g0, g1, g2, dil0, dil1, dil2, s_o0, s_o1, s_o2)
    kr0, kr1, kr2 = _tile_coords(0, 0, 0, TK0, TK1, TK2)
    if BACKWARD:
        do = tl.load(DO + o_off[:, None] + offs_dv[None, :], mask=q_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + token, mask=q_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + token, mask=q_ok, other=0.0)
        dq = tl.zeros([TQ0 * TQ1 * TQ2, HEAD_DIM], tl.float32)
        # one of DRPB_SLOTS copies of the table per program (summed on the host): fewer atomics on one address
        drpb_head = DRPB + ((pid % DRPB_SLOTS) * H + h) * (2 * ks0 - 1) * (2 * ks1 - 1) * (2 * ks2 - 1)
    else:
        m_i = tl.full([TQ0 * TQ1 * TQ2], float("-inf"), tl.float32)
        l_i = tl.zeros([TQ0 * TQ1 * TQ2], tl.float32)
        acc = tl.zeros([TQ0 * TQ1 * TQ2, HEAD_DIM_V], tl.float32)

    for t in range(0, n_tiles):
        t0, t1, t2 = _split(t, n1, n2)
        s0, s1, s2 = box0 + t0 * TK0, box1 + t1 * TK1, box2 + t2 * TK2
        kc0, kc1, kc2 = s0 + kr0, s1 + kr1, s2 + kr2
        k_off = _offsets(kc0, kc1, kc2, g0, g1, g2, dil0, dil1, dil2, s_k0, s_k1, s_k2)
        v_off = _offsets(kc0, kc1, kc2, g0, g1, g2, dil0, dil1, dil2, s_v0, s_v1, s_v2)
        whole = ((s0 >= maxlo0) & (s0 + TK0 - 1 <= minhi0) & (s1 >= maxlo1) & (s1 + TK1 - 1 <= minhi1)
                 & (s2 >= maxlo2) & (s2 + TK2 - 1 <= minhi2))
        if whole:  # every query of the tile sees every key of this tile: no per-element mask
            k = tl.load(k_head + k_off[:, None] + offs_d[None, :])
            v = tl.load(v_head + v_off[:, None] + offs_dv[None, :])
            qk = _bias_mask(tl.dot(q, tl.trans(k)), qc0, qc1, qc2, kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2,
                            ks0, ks1, ks2, rpb_head, inv_scale, HAS_RPB, False, NA_DIM)
            if BACKWARD:
                p = tl.math.exp2(qk * qk_scale - lse2[:, None])
                ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
                dq = tl.dot(ds.to(k.dtype), k, dq)
                if HAS_RPB:
                    _rpb_grad(ds, qc0, qc1, qc2, kc0, kc1, kc2, ks0, ks1, ks2, drpb_head, q_ok[:, None], NA_DIM)
            else:
                acc, l_i, m_i = online_softmax(acc, l_i, m_i, qk, v, qk_scale, False)
        else:
            k_ok = (kc0 <= end0) & (kc1 <= end1) & (kc2 <= end2)
            k = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)
            v = tl.load(v_head + v_off[:, None] + offs_dv[None, :], mask=k_ok[:, None], other=0.0)
            qk = _bias_mask(tl.dot(q, tl.trans(k)), qc0, qc1, qc2, kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2,
                            ks0, ks1, ks2, rpb_head, inv_scale, HAS_RPB, True, NA_DIM)
            if BACKWARD:
                p = tl.math.exp2(qk * qk_scale - lse2[:, None])
                ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
                dq = tl.dot(ds.to(k.dtype), k, dq)
                if HAS_RPB:
                    _rpb_grad(ds, qc0, qc1, qc2, kc0, kc1, kc2, ks0, ks1, ks2, drpb_head, qk > float("-inf"), NA_DIM)
            else:
                acc, l_i, m_i = online_softmax(acc, l_i, m_i, qk, v, qk_scale, True)

    if HAS_EXTRA:  # the additional keys: one dense segment of the same softmax
        BLOCK_E: tl.constexpr = TK0 * TK1 * TK2
        offs_e = tl.arange(0, BLOCK_E)
        for start in range(0, N_EXTRA, BLOCK_E):
            e_ok = start + offs_e < N_EXTRA
            rows = (start + offs_e).to(tl.int64)
            k = tl.load(EK + b * s_eb + hk * s_eh + rows[:, None] * s_en + offs_d[None, :], mask=e_ok[:, None],
                        other=0.0)
            v = tl.load(EV + b * s_fb + hk * s_fh + rows[:, None] * s_fn + offs_dv[None, :], mask=e_ok[:, None],
                        other=0.0)
            qk = tl.where(e_ok[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
            if BACKWARD:
                p = tl.math.exp2(qk * qk_scale - lse2[:, None])
                ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
                dq = tl.dot(ds.to(k.dtype), k, dq)
            else:
                acc, l_i, m_i = online_softmax(acc, l_i, m_i, qk, v, qk_scale, True)

    if BACKWARD:
        dq_off = b * s_gb + h * s_gh + _offsets(qc0, qc1, qc2, g0, g1, g2, dil0, dil1, dil2, s_g0, s_g1, s_g2)
        tl.store(DQ + dq_off[:, None] + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])
    else:
        out, lse = normalise(acc, l_i, m_i)
        tl.store(O + o_off[:, None] + offs_dv[None, :], out.to(O.dtype.element_ty), mask=q_ok[:, None])
        tl.store(LSE + token, lse, mask=q_ok)


# ----------------------------------------------------------------------------- dk / dv
@triton.jit
def _na_key_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, RPB, TAB,
    s_qb, s_q0, s_q1, s_q2, s_qh, s_kb, s_k0, s_k1, s_k2, s_kh, s_vb, s_v0, s_v1, s_v2, s_vh,
    s_ob, s_o0, s_o1, s_o2, s_oh, s_gb, s_g0, s_g1, s_g2, s_gh, s_ub, s_u0, s_u1, s_u2, s_uh,
    L0, L1, L2, dil0, dil1, dil2, ks0, ks1, ks2, tab_len, H_KV, KV_GROUP, qk_scale, inv_scale, scale,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr,
    TK2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, HAS_RPB: tl.constexpr,
    NA_DIM: tl.constexpr,
):
    """dk, dv of one key tile of one kv head: the query tiles of the box that can see it, every query head of
    the GQA group (DO strides in the s_o* slots; dk, dv with their own strides s_g*, s_u*)."""
    pid, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // H_KV).to(tl.int64), pid_bh % H_KV
    g0, g1, g2, len0, len1, len2, f0, f1, f2 = _tile_origin(pid, L0, L1, L2, dil0, dil1, dil2, TK0, TK1, TK2)
    kc0, kc1, kc2 = _tile_coords(f0, f1, f2, TK0, TK1, TK2)
    k_ok = (kc0 < len0) & (kc1 < len1) & (kc2 < len2)
    box0, end0, _, _, span0 = _box(TAB, tab_len, 0, 2, f0, len0, g0, dil0, TK0)
    box1, end1, _, _, span1 = _box(TAB, tab_len, 1, 2, f1, len1, g1, dil1, TK1)
    box2, end2, _, _, span2 = _box(TAB, tab_len, 2, 2, f2, len2, g2, dil2, TK2)
    last0 = tl.minimum(f0 + TK0 - 1, len0 - 1)
    last1 = tl.minimum(f1 + TK1 - 1, len1 - 1)
    last2 = tl.minimum(f2 + TK2 - 1, len2 - 1)
    n1, n2 = tl.cdiv(span1, TQ1), tl.cdiv(span2, TQ2)
    n_tiles = tl.cdiv(span0, TQ0) * n1 * n2

    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k_off = b * s_kb + hk * s_kh + _offsets(kc0, kc1, kc2, g0, g1, g2, dil0, dil1, dil2, s_k0, s_k1, s_k2)
    v_off = b * s_vb + hk * s_vh + _offsets(kc0, kc1, kc2, g0, g1, g2, dil0, dil1, dil2, s_v0, s_v1, s_v2)
    k = tl.load(K + k_off[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(V + v_off[:, None] + offs_dv[None, :], mask=k_ok[:, None], other=0.0)
    qr0, qr1, qr2 = _tile_coords(0, 0, 0, TQ0, TQ1, TQ2)
    dk = tl.zeros([TK0 * TK1 * TK2, HEAD_DIM], tl.float32)
    dv = tl.zeros([TK0 * TK1 * TK2, HEAD_DIM_V], tl.float32)
    n_q_tokens = L0 * L1 * L2
    for j in range(0, KV_GROUP * n_tiles):
        h = hk * KV_GROUP + j // n_tiles
        t0, t1, t2 = _split(j % n_tiles, n1, n2)
        s0, s1, s2 = box0 + t0 * TQ0, box1 + t1 * TQ1, box2 + t2 * TQ2
        qc0, qc1, qc2 = s0 + qr0, s1 + qr1, s2 + qr2
        q_ok = (qc0 <= end0) & (qc1 <= end1) & (qc2 <= end2)
        lo0 = _bound(TAB, tab_len, 0, 0, qc0, g0, dil0, q_ok)
        hi0 = _bound(TAB, tab_len, 0, 1, qc0, g0, dil0, q_ok)
        lo1 = _bound(TAB, tab_len, 1, 0, qc1, g1, dil1, q_ok)
        hi1 = _bound(TAB, tab_len, 1, 1, qc1, g1, dil1, q_ok)
        lo2 = _bound(TAB, tab_len, 2, 0, qc2, g2, dil2, q_ok)
        hi2 = _bound(TAB, tab_len, 2, 1, qc2, g2, dil2, q_ok)
        q_off = b * s_qb + h * s_qh + _offsets(qc0, qc1, qc2, g0, g1, g2, dil0, dil1, dil2, s_q0, s_q1, s_q2)
        o_off = b * s_ob + h * s_oh + _offsets(qc0, qc1, qc2, g0, g1, g2, dil0, dil1, dil2, s_o0, s_o1, s_o2)
        token = (b * (H_KV * KV_GROUP) + h) * n_q_tokens + _token(qc0, qc1, qc2, g0, g1, g2, dil0, dil1, dil2, L1, L2)
        q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        do = tl.load(DO + o_off[:, None] + offs_dv[None, :], mask=q_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + token, mask=q_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + token, mask=q_ok, other=0.0)
        rpb_head = RPB + h * (2 * ks0 - 1) * (2 * ks1 - 1) * (2 * ks2 - 1)
        # whole: every query of this tile exists and sees every key of the key tile
        q_last0 = tl.minimum(s0 + TQ0 - 1, end0)
        q_last1 = tl.minimum(s1 + TQ1 - 1, end1)
        q_last2 = tl.minimum(s2 + TQ2 - 1, end2)
        whole = ((s0 + TQ0 - 1 <= end0) & (s1 + TQ1 - 1 <= end1) & (s2 + TQ2 - 1 <= end2)
                 & (_bound(TAB, tab_len, 0, 0, q_last0, g0, dil0, True) <= f0)
                 & (_bound(TAB, tab_len, 0, 1, s0, g0, dil0, True) >= last0)
                 & (_bound(TAB, tab_len, 1, 0, q_last1, g1, dil1, True) <= f1)
                 & (_bound(TAB, tab_len, 1, 1, s1, g1, dil1, True) >= last1)
                 & (_bound(TAB, tab_len, 2, 0, q_last2, g2, dil2, True) <= f2)
                 & (_bound(TAB, tab_len, 2, 1, s2, g2, dil2, True) >= last2))
        qk = tl.dot(q, tl.trans(k))
        if whole:
            qk = _bias_mask(qk, qc0, qc1, qc2, kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2, ks0, ks1, ks2, rpb_head,
                            inv_scale, HAS_RPB, False, NA_DIM)
        else:
            qk = _bias_mask(qk, qc0, qc1, qc2, kc0, kc1, kc2, lo0, hi0, lo1, hi1, lo2, hi2, ks0, ks1, ks2, rpb_head,
                            inv_scale, HAS_RPB, True, NA_DIM)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])  # [queries, keys]; masked pairs and missing rows: 0
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)
    dk_off = b * s_gb + hk * s_gh + _offsets(kc0, kc1, kc2, g0, g1, g2, dil0, dil1, dil2, s_g0, s_g1, s_g2)
    dv_off = b * s_ub + hk * s_uh + _offsets(kc0, kc1, kc2, g0, g1, g2, dil0, dil1, dil2, s_u0, s_u1, s_u2)
    tl.store(DK + dk_off[:, None] + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(DV + dv_off[:, None] + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


@triton.jit
def _extra_kv_kernel(
    Q, DO, EK, EV, DEK, DEV, LSE, DELTA,
    s_qb, s_q0, s_q1, s_q2, s_qh, s_ob, s_o0, s_o1, s_o2, s_oh, s_eb, s_en, s_eh, s_fb, s_fn, s_fh,
    L0, L1, L2, H_KV, KV_GROUP, N_EXTRA, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    """dk, dv of one block of additional keys of one kv head: every query token of the group's heads (dense);
    DEK/DEV are contiguous `[B, N_EXTRA, H_KV, D]`, the extra inputs' strides are s_e*, s_f*."""
    pid, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // H_KV).to(tl.int64), pid_bh % H_KV
    offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < N_EXTRA
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    rows = offs_e.to(tl.int64)
    k = tl.load(EK + b * s_eb + hk * s_eh + rows[:, None] * s_en + offs_d[None, :], mask=e_ok[:, None], other=0.0)
    v = tl.load(EV + b * s_fb + hk * s_fh + rows[:, None] * s_fn + offs_dv[None, :], mask=e_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_E, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_E, HEAD_DIM_V], tl.float32)
    n_tokens = L0 * L1 * L2
    n_blocks = tl.cdiv(n_tokens, BLOCK_M)
    for j in range(0, KV_GROUP * n_blocks):
        h = hk * KV_GROUP + j // n_blocks
        tok = (j % n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = tok < n_tokens
        x0, x1, x2 = tok // (L1 * L2), (tok // L2) % L1, tok % L2
        q_off = b * s_qb + h * s_qh + _offsets(x0, x1, x2, 0, 0, 0, 1, 1, 1, s_q0, s_q1, s_q2)
        o_off = b * s_ob + h * s_oh + _offsets(x0, x1, x2, 0, 0, 0, 1, 1, 1, s_o0, s_o1, s_o2)
        q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
        do = tl.load(DO + o_off[:, None] + offs_dv[None, :], mask=ok[:, None], other=0.0)
        token = (b * (H_KV * KV_GROUP) + h) * n_tokens + tok
        lse2 = tl.load(LSE + token, mask=ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + token, mask=ok, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)
    out_rows = (b * N_EXTRA + rows) * H_KV + hk
    tl.store(DEK + out_rows[:, None] * HEAD_DIM + offs_d[None, :], (dk * scale).to(DEK.dtype.element_ty),
             mask=e_ok[:, None])
    tl.store(DEV + out_rows[:, None] * HEAD_DIM_V + offs_dv[None, :], dv.to(DEV.dtype.element_ty), mask=e_ok[:, None])


# ----------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=64)
def bounds_table(spatial: tuple, kernel: tuple, dilation: tuple, stride: tuple, causal: tuple,
                 device: torch.device) -> torch.Tensor:
    """`axis_bounds` of the three axes, int32 `[3, 4, max length]` (cached: a handful of geometries per model)."""
    width = max(spatial)
    table = torch.zeros(3, 4, width, dtype=torch.int32, device=device)
    for axis, args in enumerate(zip(spatial, kernel, dilation, stride, causal)):
        table[axis, :, :args[0]] = axis_bounds(*args, device)
    return table


def can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if the kernel runs these inputs, else the reason (float32 runs the reference: no TF32 path)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16/bfloat16; use autocast or cast q, k, v)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim q/k {q.shape[-1]}, v {v.shape[-1]} (the kernel takes {SUPPORTED_HEAD_DIMS})"
    if q.shape[0] * q.shape[-2] > 65535:
        return f"batch * heads = {q.shape[0] * q.shape[-2]} > 65535 (the launch grid's second axis)"
    return None


def default_config(na_dim: int, head_dim: int) -> dict[str, dict]:
    """Tile shapes (3-D, leading axes 1 for 1-D/2-D) and launch settings per kernel; not tuned yet."""
    tile = {1: (1, 1, 64), 2: (1, 8, 8), 3: (2, 4, 8)}[na_dim]
    warps = 8 if head_dim > 64 else 4
    fwd = dict(TQ=tile, TK=tile, num_warps=warps, num_stages=2)
    # DRPB_SLOTS: copies of the rpb gradient table the dq programs spread their atomics over
    return {"fwd": fwd, "dq": dict(fwd, DRPB_SLOTS=32), "dkdv": dict(fwd),
            "extra": dict(BLOCK_M=64, BLOCK_E=64, num_warps=4)}


def _geometry(q: torch.Tensor, kernel, dilation, tiles) -> tuple[tuple, tuple, int]:
    """(kernel args L0..ks2, grid size along the tiles, dilation groups)."""
    spatial = q.shape[1:4]
    n_tiles = math.prod(math.ceil(math.ceil(n / d) / t) for n, d, t in zip(spatial, dilation, tiles))
    return (*spatial, *dilation, *kernel), n_tiles * math.prod(dilation)


def _s(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a `[B, X0, X1, X2, heads, D]` tensor, without the (unit) last one."""
    return tuple(t.stride())[:5]


def _extra_strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def forward(q, k, v, rpb, extra_k, extra_v, kernel, dilation, stride, causal, scale, na_dim, config=None):
    """(out `[B, X0, X1, X2, heads, Dv]`, fp32 natural-log lse `[B, heads, X0 * X1 * X2]`); 3-D inputs."""
    batch, *spatial, heads, dim = q.shape
    heads_kv, dim_v = k.shape[-2], v.shape[-1]
    cfg = (config or default_config(na_dim, max(dim, dim_v)))["fwd"]
    table = bounds_table(tuple(spatial), tuple(kernel), tuple(dilation), tuple(stride), tuple(causal), q.device)
    out = q.new_empty(batch, *spatial, heads, dim_v)
    lse = torch.empty(batch, heads, math.prod(spatial), device=q.device, dtype=torch.float32)
    geometry, n_programs = _geometry(q, kernel, dilation, cfg["TQ"])
    tq, tk = cfg["TQ"], cfg["TK"]
    _na_query_kernel[(n_programs, batch * heads)](
        q, k, v, out, out, out, lse, lse, q if rpb is None else rpb, lse, q if extra_k is None else extra_k,
        q if extra_v is None else extra_v, table,
        *_s(q), *_s(k), *_s(v), *_s(out), *_s(out), *_extra_strides(extra_k), *_extra_strides(extra_v),
        *geometry, table.shape[-1], heads, heads // heads_kv, 0 if extra_k is None else extra_k.shape[1], 1,
        scale * LOG2E, 1.0 / scale, scale,
        TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], TK0=tk[0], TK1=tk[1], TK2=tk[2], HEAD_DIM=dim, HEAD_DIM_V=dim_v,
        HAS_RPB=rpb is not None, HAS_EXTRA=extra_k is not None, BACKWARD=False, NA_DIM=na_dim,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def backward(do, dlse, q, k, v, out, lse, rpb, extra_k, extra_v, kernel, dilation, stride, causal, scale, na_dim,
             config=None):
    """(dq, dk, dv, drpb fp32 `[heads, R]` or None, d extra_k, d extra_v) for `forward`'s inputs."""
    batch, *spatial, heads, dim = q.shape
    heads_kv, dim_v = k.shape[-2], v.shape[-1]
    n_tokens = math.prod(spatial)
    configs = config or default_config(na_dim, max(dim, dim_v))
    table = bounds_table(tuple(spatial), tuple(kernel), tuple(dilation), tuple(stride), tuple(causal), q.device)
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = row_delta(do.reshape(batch, n_tokens, heads, dim_v).transpose(1, 2),
                      out.reshape(batch, n_tokens, heads, dim_v).transpose(1, 2), dlse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    slots = configs["dq"].get("DRPB_SLOTS", 1)
    drpb = None if rpb is None else torch.zeros(slots, *rpb.shape, device=q.device, dtype=torch.float32)
    n_extra = 0 if extra_k is None else extra_k.shape[1]
    rpb_arg = q if rpb is None else rpb
    common = (*_extra_strides(extra_k), *_extra_strides(extra_v))

    cfg = configs["dq"]
    geometry, n_programs = _geometry(q, kernel, dilation, cfg["TQ"])
    tq, tk = cfg["TQ"], cfg["TK"]
    _na_query_kernel[(n_programs, batch * heads)](
        q, k, v, out, do, dq, lse, delta, rpb_arg, q if drpb is None else drpb,
        q if extra_k is None else extra_k, q if extra_v is None else extra_v, table,
        *_s(q), *_s(k), *_s(v), *_s(do), *_s(dq), *common,
        *geometry, table.shape[-1], heads, heads // heads_kv, n_extra, slots, scale * LOG2E, 1.0 / scale, scale,
        TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], TK0=tk[0], TK1=tk[1], TK2=tk[2], HEAD_DIM=dim, HEAD_DIM_V=dim_v,
        HAS_RPB=rpb is not None, HAS_EXTRA=extra_k is not None, BACKWARD=True, NA_DIM=na_dim,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    cfg = configs["dkdv"]
    geometry, n_programs = _geometry(q, kernel, dilation, cfg["TK"])
    tq, tk = cfg["TQ"], cfg["TK"]
    _na_key_kernel[(n_programs, batch * heads_kv)](
        q, k, v, do, dk, dv, lse, delta, rpb_arg, table,
        *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv),
        *geometry, table.shape[-1], heads_kv, heads // heads_kv, scale * LOG2E, 1.0 / scale, scale,
        TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], TK0=tk[0], TK1=tk[1], TK2=tk[2], HEAD_DIM=dim, HEAD_DIM_V=dim_v,
        HAS_RPB=rpb is not None, NA_DIM=na_dim, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    d_extra_k = d_extra_v = None
    if extra_k is not None:
        cfg = configs["extra"]
        d_extra_k = q.new_empty(batch, n_extra, heads_kv, dim)
        d_extra_v = q.new_empty(batch, n_extra, heads_kv, dim_v)
    if n_extra:
        _extra_kv_kernel[(math.ceil(n_extra / cfg["BLOCK_E"]), batch * heads_kv)](
            q, do, extra_k, extra_v, d_extra_k, d_extra_v, lse, delta,
            *_s(q), *_s(do), *common, *spatial, heads_kv, heads // heads_kv, n_extra, scale * LOG2E, scale,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_E=cfg["BLOCK_E"], HEAD_DIM=dim, HEAD_DIM_V=dim_v,
            num_warps=cfg["num_warps"],
        )
    return dq, dk, dv, None if drpb is None else drpb.sum(0), d_extra_k, d_extra_v


# ----------------------------------------------------------------------------- custom ops + autograd
# torch.compile sees one opaque op per direction (no graph break); q, k, v are 3-D `[B, X0, X1, X2, heads, D]`,
# rpb float32 `[heads, R]`-shaped (any trailing shape), the extra keys/values in q's dtype.
@torch.library.custom_op("zoo::na_forward", mutates_args=())
def na_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
                  extra_k: torch.Tensor | None, extra_v: torch.Tensor | None, kernel: list[int], dilation: list[int],
                  stride: list[int], causal: list[bool], scale: float, na_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    rpb = None if rpb is None else rpb.contiguous()
    return forward(q, k, v, rpb, extra_k, extra_v, kernel, dilation, stride, causal, scale, na_dim)


@na_forward_op.register_fake
def _(q, k, v, rpb, extra_k, extra_v, kernel, dilation, stride, causal, scale, na_dim):
    batch, *spatial, heads, _ = q.shape
    out = q.new_empty(batch, *spatial, heads, v.shape[-1])
    return out, q.new_empty(batch, heads, math.prod(spatial), dtype=torch.float32)


@torch.library.custom_op("zoo::na_backward", mutates_args=())
def na_backward_op(do: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, rpb: torch.Tensor | None, extra_k: torch.Tensor | None,
                   extra_v: torch.Tensor | None, kernel: list[int], dilation: list[int], stride: list[int],
                   causal: list[bool], scale: float, na_dim: int) -> list[torch.Tensor]:
    """[dq, dk, dv] + [drpb (fp32)] with rpb + [d extra_k, d extra_v] with extra keys."""
    rpb = None if rpb is None else rpb.contiguous()
    grads = backward(do, dlse, q, k, v, out, lse, rpb, extra_k, extra_v, kernel, dilation, stride, causal, scale,
                     na_dim)
    return [g for g in grads if g is not None]


@na_backward_op.register_fake
def _(do, dlse, q, k, v, out, lse, rpb, extra_k, extra_v, kernel, dilation, stride, causal, scale, na_dim):
    grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
    if rpb is not None:
        grads.append(torch.empty_like(rpb, dtype=torch.float32, memory_format=torch.contiguous_format))
    if extra_k is not None:
        batch, n_extra, heads_kv, _ = extra_k.shape
        grads += [q.new_empty(batch, n_extra, heads_kv, q.shape[-1]), q.new_empty(batch, n_extra, heads_kv,
                                                                                  v.shape[-1])]
    return grads


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, extra_k, extra_v, *geometry = inputs
    ctx.save_for_backward(q, k, v, *output, rpb, extra_k, extra_v)
    ctx.geometry = geometry


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, rpb, extra_k, extra_v = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out
    grads = iter(na_backward_op(d_out, d_lse, q, k, v, out, lse, rpb, extra_k, extra_v, *ctx.geometry))
    dq, dk, dv = next(grads), next(grads), next(grads)
    drpb = None if rpb is None else next(grads)
    d_extra_k, d_extra_v = (None, None) if extra_k is None else (next(grads), next(grads))
    return dq, dk, dv, drpb, d_extra_k, d_extra_v, None, None, None, None, None, None


na_forward_op.register_autograd(_backward, setup_context=_setup_context)


def neighborhood_attention_triton(q, k, v, na_dim, kernel, dilation, stride, causal, rpb, scale, extra_k, extra_v):
    """(out, lse `[B, *spatial, heads]`) through the custom op; arguments checked and per-axis already."""
    pad = 3 - na_dim

    def to_3d(t: torch.Tensor) -> torch.Tensor:
        t = t if t.stride(-1) == 1 else t.contiguous()
        return t.reshape(t.shape[0], *(1,) * pad, *t.shape[1:])

    rpb = None if rpb is None else rpb.float()
    extra_k, extra_v = (None, None) if extra_k is None else (extra_k.to(q.dtype), extra_v.to(q.dtype))
    if extra_k is not None:
        extra_k, extra_v = (t if t.stride(-1) == 1 else t.contiguous() for t in (extra_k, extra_v))
    out, lse = na_forward_op(to_3d(q), to_3d(k), to_3d(v), rpb, extra_k, extra_v, [1] * pad + list(kernel),
                             [1] * pad + list(dilation), [1] * pad + list(stride), [False] * pad + list(causal),
                             scale, na_dim)
    spatial = q.shape[1:-2]
    return out.reshape(q.shape[0], *spatial, q.shape[-2], v.shape[-1]), lse.transpose(1, 2).reshape(q.shape[:-1])
