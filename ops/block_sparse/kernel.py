"""Block-sparse flash attention in Triton: forward, and backward (dq, dk, dv).

The sparsity pattern is a list of key blocks per query block (`block_indices`, the shape
`zoo.ops.block_sparse_attention` takes). One program owns `BLOCK_M` query rows and walks the
listed key blocks with an online softmax (exp2, the scale folded with log2(e)); it writes the
output and the natural-log logsumexp. Backward is two kernels, so that no atomics are needed:
dq walks the same per-query-block lists, dk/dv walk the transposed lists (query blocks per key
block), which are built on the GPU from the forward lists (`launch_transpose`, one launch).

Any sequence length: the lists are sorted ascending, so the only partial key block (the last
one) is the last entry of a list; every other entry runs an unmasked inner step, only the tail
entry pays for per-element masking. Query rows past the end are loaded as zeros and never
stored; in backward their logsumexp is read as +inf so their probabilities are exactly 0.

The mask's block sizes (`BLOCK_Q`, `BLOCK_K`, any multiples of 16) are the granularity of the lists;
the program tile (`BLOCK_M` rows, `BLOCK_N` keys per step: 16, 32, 64 or 128, `tl.dot` needs >= 16)
divides them and is a tuning knob only, like `KV_AS_B` (which operand order the dk/dv kernel gives
the tensor cores); `default_config` holds the settings measured fastest on an H100 (BENCHMARKS.md).
A block larger than the tile is walked tile by tile (routing attention lists whole regions of, e.g.,
1408 = 11 x 128 token slots).

Hopper TMA (`config["fwd"]["TMA"] = True`, a tuning choice like the tiles, on by default for head_dim 128 with
128 x 128 tiles where it measured 4-7% faster on an H100): `_fwd_kernel_tma` loads Q/K/V tiles and stores O
through tensor descriptors built on the device, one `[N, D]` descriptor per (batch, head) (they zero-fill rows
past N, the same tail semantics). Inputs whose strides TMA cannot take (not 16-byte aligned) run the pointer
kernel. Backward is unchanged. (Triton's warp specialisation of this loop was tried: faster, but its
logsumexp came out wrong on the H100 with triton 3.6; BENCHMARKS.md.)

Region windows (`zoo.ops.routing.kernel.RegionWindows`, routing attention): q, k, v stay `[B, H, W, heads, D]`
maps and block r is region r, a 2-D window of the map; every kernel computes its tiles' addresses from the region
and slot (`_rows`), so no region-ordered copy exists; missing slots (a region's padding slots, the missing tokens
of border regions) are masked; with `packed`, the list side of each kernel fills a tile with the tokens of several
small listed regions (`_packed_rows`; tiles from `zoo.ops.routing.kernel.packed_config`). Gradients are written
with their own buffers' strides, so views with gaps (a fused qkv projection's q/k/v) are read in place too.

Key padding (`key_padding_mask`, True = never attended, anywhere in the sequence): a per-key-tile
flag says which `BLOCK_N` tiles hold a padded key; only those load the per-key mask and mask their
scores (K/V loads stay plain, so the loop still pipelines), every other tile stays mask-free. In
backward, dq masks the same tiles; dk/dv of padded keys are stored as exact zeros.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._flash import normalise, online_softmax, row_delta
from .layout import BlockSparseLayout

if TYPE_CHECKING:  # the window geometry is routing attention's; this kernel only reads it
    from ..routing.kernel import RegionWindows

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
BLOCK_MULTIPLE = 16  # mask blocks must be multiples of the smallest tile
TILES = (128, 64, 32, 16)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _key_valid(start_n, offs_n, N_K, kpm_ptr, HAS_KPM: tl.constexpr):
    """Keys of one BLOCK_N slice that exist and are not padding."""
    valid = (start_n + offs_n) < N_K
    if HAS_KPM:
        valid = valid & (tl.load(kpm_ptr + start_n + offs_n, mask=valid, other=1) == 0)
    return valid


@triton.jit
def _rows(block, first, offs, N, n_w, img_h, img_w, BLOCK: tl.constexpr, WINDOW: tl.constexpr,
          REGION_H: tl.constexpr, REGION_W: tl.constexpr):
    """Slots `first + offs` of mask block `block`: (row, col, exists), int64.

    Sequence: row = block * BLOCK + slot, col = 0. WINDOW (routing attention): block `block` is region
    `block` of an `img_h x img_w` map cut into regions of REGION_H x REGION_W tokens, `n_w` per row,
    row-major; slot s is the region's token (s // REGION_W, s % REGION_W); slots past the region's
    tokens or the map's border do not exist. The kernels read the map in place: no region-ordered copy."""
    slot = first + offs
    if WINDOW:
        row = ((block // n_w) * REGION_H + slot // REGION_W).to(tl.int64)
        col = ((block % n_w) * REGION_W + slot % REGION_W).to(tl.int64)
        exists = (slot < REGION_H * REGION_W) & (row < img_h) & (col < img_w)
    else:
        row = block.to(tl.int64) * BLOCK + slot
        col = row * 0
        exists = row < N
    return row, col, exists


@triton.jit
def _packed_rows(idx_ptr, cnt, first, offs, n_w, img_h, img_w, REGION_H: tl.constexpr, REGION_W: tl.constexpr):
    """Positions `first + offs` of the concatenated tokens of a list's regions (window mode, PACK): (row, col,
    exists), int64. Position p is token p % R of listed region p // R (R = REGION_H * REGION_W): a tile of small
    regions holds the tokens of several of them, with no padding slots."""
    R: tl.constexpr = REGION_H * REGION_W
    pos = first + offs
    entry = pos // R
    listed = entry < cnt
    region = tl.load(idx_ptr + entry, mask=listed, other=0)
    slot = pos % R
    row = ((region // n_w) * REGION_H + slot // REGION_W).to(tl.int64)
    col = ((region % n_w) * REGION_W + slot % REGION_W).to(tl.int64)
    return row, col, listed & (row < img_h) & (col < img_w)


@triton.jit
def _key_tile(t, idx_ptr, cnt, offs_n, N_K, n_w, img_h, img_w, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
              WINDOW: tl.constexpr, PACK: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr):
    """Key tile `t` of a query tile's list (forward and dq): (row, col, exists, start_n). Sequence: keys
    start_n + offs_n (row/col unused, the caller adds start_n to its pointers); window: the tile's map rows and
    columns (slots of one listed region, or with PACK the tokens of several)."""
    SUB: tl.constexpr = BLOCK_K // BLOCK_N
    if PACK:
        row, col, exists = _packed_rows(idx_ptr, cnt, t * BLOCK_N, offs_n, n_w, img_h, img_w, REGION_H, REGION_W)
        start_n = t * 0
    else:
        block = tl.load(idx_ptr + t // SUB).to(tl.int64)
        start_n = block * BLOCK_K + (t % SUB) * BLOCK_N
        row, col, exists = _rows(block, (t % SUB) * BLOCK_N, offs_n, N_K, n_w, img_h, img_w, BLOCK_K, WINDOW,
                                 REGION_H, REGION_W)
        if WINDOW:
            start_n = block * 0
    return row, col, exists, start_n


@triton.jit
def _key_steps(cnt, n_full, SUB: tl.constexpr, PACK: tl.constexpr, REGION_TOKENS: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """How many key tiles `_key_tile` walks: whole blocks' tiles, or with PACK the packed tokens' tiles."""
    if PACK:
        return tl.cdiv(cnt * REGION_TOKENS, BLOCK_N)
    return n_full * SUB


@triton.jit
def _offsets(row, col, s_n, s_w, WINDOW: tl.constexpr):
    """Memory offsets of rows from `_rows` (a token's row and column strides in window mode)."""
    if WINDOW:
        return row * s_n + col * s_w
    return row * s_n


@triton.jit
def _token(row, col, img_w, WINDOW: tl.constexpr):
    """Index of a row in the per-token logsumexp / delta vectors (row-major map order in window mode)."""
    if WINDOW:
        return row * img_w + col
    return row


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, valid, qk_scale, kpm_ptrs, flag_ptr,
              MASK: tl.constexpr, HAS_KPM: tl.constexpr):
    """One BLOCK_N slice of keys: update the running max, normaliser and accumulator.

    MASK: the slice holds keys that do not exist or are padding (`valid` says which): loads and scores
    masked per key. Otherwise the loads are plain (pipelined) and, with HAS_KPM, only a slice whose flag
    says it holds padding masks its scores."""
    if MASK:
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, k)
    if MASK:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    elif HAS_KPM:
        if tl.load(flag_ptr) != 0:
            padded = tl.load(kpm_ptrs) != 0
            qk = tl.where(padded[None, :], float("-inf"), qk)
    return online_softmax(acc, l_i, m_i, qk, v, qk_scale, MASK or HAS_KPM)


@triton.jit
def _list_split(idx_ptr, CNT, last_block, N_LAST_PARTIAL: tl.constexpr):
    """Entries [0, n_full) are whole blocks; entry n_full (if < cnt) is the partial last block."""
    n_full = CNT
    if N_LAST_PARTIAL:
        if CNT > 0:
            tail = tl.load(idx_ptr + CNT - 1)
            n_full = tl.where(tail == last_block, CNT - 1, CNT)
    return n_full


@triton.jit
def _query_tile(IDX, CNT, pid_m, pid_bh, H, N_Q, N_K, n_w, img_h, img_w, s_ib, s_ih, s_iq, s_cb, s_ch,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, K_PARTIAL: tl.constexpr,
                WINDOW: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr):
    """What the forward and dq programs share: (b, h, query rows and columns, which exist, this query block's
    list pointer, its count, how many of its entries are whole key blocks)."""
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    q_block = pid_m * BLOCK_M // BLOCK_Q
    q_row, q_col, row_ok = _rows(q_block, (pid_m * BLOCK_M) % BLOCK_Q, tl.arange(0, BLOCK_M), N_Q, n_w, img_h, img_w,
                                 BLOCK_Q, WINDOW, REGION_H, REGION_W)
    idx_ptr = IDX + b * s_ib + h * s_ih + q_block * s_iq
    cnt = tl.load(CNT + b * s_cb + h * s_ch + q_block)
    n_full = _list_split(idx_ptr, cnt, tl.cdiv(N_K, BLOCK_K) - 1, K_PARTIAL)
    return b, h, q_row, q_col, row_ok, idx_ptr, cnt, n_full


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, IDX, CNT, KPM, TPAD,  # noqa: E741 (flash-attention names)
    s_qb, s_qh, s_qn, s_qw, s_kb, s_kh, s_kn, s_kw, s_vb, s_vh, s_vn, s_vw, s_ob, s_oh, s_on, s_ow,
    s_ib, s_ih, s_iq, s_cb, s_ch, s_mb, s_tb,
    H, N_Q, N_K, qk_scale, n_w, img_h, img_w,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, K_PARTIAL: tl.constexpr, HAS_KPM: tl.constexpr,
    WINDOW: tl.constexpr, WINDOW_MASK: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr,
    PACK: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h, q_row, q_col, row_ok, idx_ptr, cnt, n_full = _query_tile(
        IDX, CNT, pid_m, pid_bh, H, N_Q, N_K, n_w, img_h, img_w, s_ib, s_ih, s_iq, s_cb, s_ch, BLOCK_Q, BLOCK_K,
        BLOCK_M, K_PARTIAL, WINDOW, REGION_H, REGION_W)
    SUB: tl.constexpr = BLOCK_K // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_qb + h * s_qh + _offsets(q_row, q_col, s_qn, s_qw, WINDOW)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_head = K + b * s_kb + h * s_kh
    v_head = V + b * s_vb + h * s_vh
    k_base = k_head + offs_d[:, None] + offs_n[None, :] * s_kn  # [D, BLOCK_N], K transposed
    v_base = v_head + offs_n[:, None] * s_vn + offs_d[None, :]

    kpm_ptr = KPM + b * s_mb
    tpad_ptr = TPAD + b * s_tb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in range(0, _key_steps(cnt, n_full, SUB, PACK, REGION_H * REGION_W, BLOCK_N)):
        row, col, k_ok, start_n = _key_tile(t, idx_ptr, cnt, offs_n, N_K, n_w, img_h, img_w, BLOCK_K, BLOCK_N, WINDOW,
                                            PACK, REGION_H, REGION_W)
        if WINDOW:
            k_ptrs = k_head + offs_d[:, None] + (row * s_kn + col * s_kw)[None, :]
            v_ptrs = v_head + (row * s_vn + col * s_vw)[:, None] + offs_d[None, :]
        else:
            k_ptrs, v_ptrs = k_base + start_n * s_kn, v_base + start_n * s_vn
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, k_ok, qk_scale, kpm_ptr + start_n + offs_n,
                                  tpad_ptr + start_n // BLOCK_N, WINDOW_MASK or PACK, HAS_KPM)
    if K_PARTIAL:
        if n_full < cnt:  # the partial last key block: only its slices that hold keys
            block_start = (tl.cdiv(N_K, BLOCK_K) - 1) * BLOCK_K  # the partial last key block
            for s in range(0, tl.cdiv(N_K - block_start, BLOCK_N)):
                start_n = (block_start + s * BLOCK_N).to(tl.int64)
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base + start_n * s_kn, v_base + start_n * s_vn,
                                          _key_valid(start_n, offs_n, N_K, kpm_ptr, HAS_KPM), qk_scale,
                                          kpm_ptr + start_n + offs_n, tpad_ptr, True, HAS_KPM)

    out, lse = normalise(acc, l_i, m_i)
    tl.store(O + b * s_ob + h * s_oh + _offsets(q_row, q_col, s_on, s_ow, WINDOW)[:, None] + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + _token(q_row, q_col, img_w, WINDOW), lse, mask=row_ok)


@triton.jit
def _fwd_kernel_tma(
    Q, K, V, O, LSE, IDX, CNT, KPM, TPAD,  # noqa: E741 (flash-attention names)
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    s_ib, s_ih, s_iq, s_cb, s_ch, s_mb, s_tb,
    H, N_Q, N_K, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, K_PARTIAL: tl.constexpr, HAS_KPM: tl.constexpr,
):
    """`_fwd_kernel` with Q/K/V tiles loaded (and O stored) through TMA tensor descriptors (Hopper).

    One 2-D descriptor `[N, HEAD_DIM]` per (batch, head) and tensor, built on the device (the batch/head
    strides are free, e.g. token-major q/k/v): rows past N load as zeros and are not stored, which keeps the
    tail semantics of the pointer kernel. Masks (tail, key padding) act on the scores only; the values of
    masked keys are loaded as they are (zeros past N_k), as the pointer kernel does in its unmasked steps.
    The pointer kernel's split: whole tiles mask-free, then the tail block's tiles masked per key."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    SUB: tl.constexpr = BLOCK_K // BLOCK_N
    q_desc = tl.make_tensor_descriptor(Q + b * s_qb + h * s_qh, shape=[N_Q, HEAD_DIM], strides=[s_qn, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + b * s_kb + h * s_kh, shape=[N_K, HEAD_DIM], strides=[s_kn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + b * s_vb + h * s_vh, shape=[N_K, HEAD_DIM], strides=[s_vn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(O + b * s_ob + h * s_oh, shape=[N_Q, HEAD_DIM], strides=[s_on, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([pid_m * BLOCK_M, 0])
    idx_ptr = IDX + b * s_ib + h * s_ih + (pid_m * BLOCK_M // BLOCK_Q) * s_iq
    cnt = tl.load(CNT + b * s_cb + h * s_ch + pid_m * BLOCK_M // BLOCK_Q)
    last_block = tl.cdiv(N_K, BLOCK_K) - 1
    tail_tiles = tl.cdiv(N_K - last_block * BLOCK_K, BLOCK_N)  # tiles of the last key block that hold keys

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kpm_ptr = KPM + b * s_mb
    tpad_ptr = TPAD + b * s_tb
    n_full = _list_split(idx_ptr, cnt, last_block, K_PARTIAL)
    for t in range(0, n_full * SUB):
        start_n = tl.load(idx_ptr + t // SUB) * BLOCK_K + (t % SUB) * BLOCK_N
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        qk = tl.dot(q, k.T)
        if HAS_KPM:  # only a tile flagged as holding padding reads the per-key mask
            if tl.load(tpad_ptr + start_n // BLOCK_N) != 0:
                padded = tl.load(kpm_ptr + start_n + offs_n) != 0
                qk = tl.where(padded[None, :], float("-inf"), qk)
        acc, l_i, m_i = online_softmax(acc, l_i, m_i, qk, v, qk_scale, HAS_KPM)
    if n_full < cnt:  # the partial last key block: only its tiles that hold keys, scores masked per key
        for s in range(0, tail_tiles):
            start_n = last_block * BLOCK_K + s * BLOCK_N
            valid = _key_valid(start_n, offs_n, N_K, kpm_ptr, HAS_KPM)
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            qk = tl.where(valid[None, :], tl.dot(q, k.T), float("-inf"))
            acc, l_i, m_i = online_softmax(acc, l_i, m_i, qk, v, qk_scale, True)

    out, lse = normalise(acc, l_i, m_i)
    o_desc.store([pid_m * BLOCK_M, 0], out.to(O.dtype.element_ty))
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptrs, v_ptrs, valid, qk_scale, kpm_ptrs, flag_ptr,
             MASK: tl.constexpr, HAS_KPM: tl.constexpr):
    """dq += (P * (dP - delta)) K for one BLOCK_N slice (masked keys: P = 0; MASK/HAS_KPM as in `_fwd_step`)."""
    if MASK:
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if MASK:  # a row whose keys are all padding has lse -inf: exp2(+inf) must not reach dq
        p = tl.where(valid[None, :], p, 0.0)
    elif HAS_KPM:
        if tl.load(flag_ptr) != 0:
            padded = tl.load(kpm_ptrs) != 0
            p = tl.where(padded[None, :], 0.0, p)
    dp = tl.dot(do, v)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, IDX, CNT, KPM, TPAD,
    s_qb, s_qh, s_qn, s_qw, s_kb, s_kh, s_kn, s_kw, s_vb, s_vh, s_vn, s_vw, s_ob, s_oh, s_on, s_ow,
    s_gb, s_gh, s_gn, s_gw,
    s_ib, s_ih, s_iq, s_cb, s_ch, s_mb, s_tb,
    H, N_Q, N_K, qk_scale, scale, n_w, img_h, img_w,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, K_PARTIAL: tl.constexpr, HAS_KPM: tl.constexpr,
    WINDOW: tl.constexpr, WINDOW_MASK: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr,
    PACK: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h, q_row, q_col, row_ok, idx_ptr, cnt, n_full = _query_tile(
        IDX, CNT, pid_m, pid_bh, H, N_Q, N_K, n_w, img_h, img_w, s_ib, s_ih, s_iq, s_cb, s_ch, BLOCK_Q, BLOCK_K,
        BLOCK_M, K_PARTIAL, WINDOW, REGION_H, REGION_W)
    SUB: tl.constexpr = BLOCK_K // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_qb + h * s_qh + _offsets(q_row, q_col, s_qn, s_qw, WINDOW)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_ob + h * s_oh + _offsets(q_row, q_col, s_on, s_ow, WINDOW)[:, None] + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    q_token = pid_bh.to(tl.int64) * N_Q + _token(q_row, q_col, img_w, WINDOW)
    lse2 = tl.load(LSE + q_token, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + q_token, mask=row_ok, other=0.0)
    k_head = K + b * s_kb + h * s_kh
    v_head = V + b * s_vb + h * s_vh
    k_base = k_head + offs_n[:, None] * s_kn + offs_d[None, :]  # [BLOCK_N, D]
    v_base = v_head + offs_d[:, None] + offs_n[None, :] * s_vn  # [D, BLOCK_N]

    kpm_ptr = KPM + b * s_mb
    tpad_ptr = TPAD + b * s_tb

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in range(0, _key_steps(cnt, n_full, SUB, PACK, REGION_H * REGION_W, BLOCK_N)):
        row, col, k_ok, start_n = _key_tile(t, idx_ptr, cnt, offs_n, N_K, n_w, img_h, img_w, BLOCK_K, BLOCK_N, WINDOW,
                                            PACK, REGION_H, REGION_W)
        if WINDOW:
            k_ptrs = k_head + (row * s_kn + col * s_kw)[:, None] + offs_d[None, :]
            v_ptrs = v_head + offs_d[:, None] + (row * s_vn + col * s_vw)[None, :]
        else:
            k_ptrs, v_ptrs = k_base + start_n * s_kn, v_base + start_n * s_vn
        dq = _dq_step(dq, q, do, lse2, delta, k_ptrs, v_ptrs, k_ok, qk_scale, kpm_ptr + start_n + offs_n,
                      tpad_ptr + start_n // BLOCK_N, WINDOW_MASK or PACK, HAS_KPM)
    if K_PARTIAL:
        if n_full < cnt:
            block_start = (tl.cdiv(N_K, BLOCK_K) - 1) * BLOCK_K  # the partial last key block
            for s in range(0, tl.cdiv(N_K - block_start, BLOCK_N)):
                start_n = (block_start + s * BLOCK_N).to(tl.int64)
                dq = _dq_step(dq, q, do, lse2, delta, k_base + start_n * s_kn, v_base + start_n * s_vn,
                              _key_valid(start_n, offs_n, N_K, kpm_ptr, HAS_KPM), qk_scale,
                              kpm_ptr + start_n + offs_n, tpad_ptr, True, HAS_KPM)
    tl.store(DQ + b * s_gb + h * s_gh + _offsets(q_row, q_col, s_gn, s_gw, WINDOW)[:, None] + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, valid, qk_scale,
               MASK: tl.constexpr, KV_AS_B: tl.constexpr):
    """dv += P^T dO and dk += dS^T Q for one BLOCK_M slice of query rows (`valid`: rows that exist, with MASK)."""
    if MASK:
        q = tl.load(q_ptrs, mask=valid[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=valid[:, None], other=0.0)
        lse2 = tl.load(lse_ptrs, mask=valid, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptrs, mask=valid, other=0.0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse2 = tl.load(lse_ptrs) * 1.4426950408889634
        delta = tl.load(delta_ptrs)
    if KV_AS_B:  # K, V as the B operands (shared memory); P and dS transposed into A
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)
    else:  # K, V as the A operands, P^T and dS^T computed directly
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, TIDX, TCNT, KPM,
    s_qb, s_qh, s_qn, s_qw, s_kb, s_kh, s_kn, s_kw, s_vb, s_vh, s_vn, s_vw, s_ob, s_oh, s_on, s_ow,
    s_gb, s_gh, s_gn, s_gw, s_ub, s_uh, s_un, s_uw,
    s_ib, s_ih, s_iq, s_cb, s_ch, s_mb,
    H, N_Q, N_K, qk_scale, scale, n_w, img_h, img_w,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, Q_PARTIAL: tl.constexpr, KV_AS_B: tl.constexpr, HAS_KPM: tl.constexpr,
    WINDOW: tl.constexpr, WINDOW_MASK: tl.constexpr, REGION_H: tl.constexpr, REGION_W: tl.constexpr,
    PACK: tl.constexpr,
):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    SUB: tl.constexpr = BLOCK_Q // BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k_row, k_col, key_ok = _rows(pid_n * BLOCK_N // BLOCK_K, (pid_n * BLOCK_N) % BLOCK_K, tl.arange(0, BLOCK_N), N_K,
                                 n_w, img_h, img_w, BLOCK_K, WINDOW, REGION_H, REGION_W)
    k = tl.load(K + b * s_kb + h * s_kh + _offsets(k_row, k_col, s_kn, s_kw, WINDOW)[:, None] + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + _offsets(k_row, k_col, s_vn, s_vw, WINDOW)[:, None] + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    q_head = Q + b * s_qb + h * s_qh
    do_head = DO + b * s_ob + h * s_oh
    q_base = q_head + offs_m[:, None] * s_qn + offs_d[None, :]
    do_base = do_head + offs_m[:, None] * s_on + offs_d[None, :]
    lse_head = LSE + pid_bh.to(tl.int64) * N_Q
    delta_head = DELTA + pid_bh.to(tl.int64) * N_Q
    idx_ptr = TIDX + b * s_ib + h * s_ih + (pid_n * BLOCK_N // BLOCK_K) * s_iq
    cnt = tl.load(TCNT + b * s_cb + h * s_ch + pid_n * BLOCK_N // BLOCK_K)
    last_block = tl.cdiv(N_Q, BLOCK_Q) - 1
    if HAS_KPM:  # padded keys: gradients exactly 0 (set at the store); a tile of padding only skips the work
        padded = tl.load(KPM + b * s_mb + k_row, mask=key_ok, other=1) != 0
        cnt = tl.where(tl.sum(padded.to(tl.int32), 0) == BLOCK_N, 0, cnt)
    n_full = _list_split(idx_ptr, cnt, last_block, Q_PARTIAL)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if PACK:  # small regions: each query tile packs the tokens of several query regions that list this one
        for t in range(0, tl.cdiv(cnt * (REGION_H * REGION_W), BLOCK_M)):
            row, col, q_ok = _packed_rows(idx_ptr, cnt, t * BLOCK_M, offs_m, n_w, img_h, img_w, REGION_H, REGION_W)
            token = row * img_w + col
            dk, dv = _dkdv_step(dk, dv, k, v, q_head + (row * s_qn + col * s_qw)[:, None] + offs_d[None, :],
                                do_head + (row * s_on + col * s_ow)[:, None] + offs_d[None, :], lse_head + token,
                                delta_head + token, q_ok, qk_scale, True, KV_AS_B)
    else:
        for t in range(0, n_full * SUB):
            block = tl.load(idx_ptr + t // SUB).to(tl.int64)
            if WINDOW:
                row, col, q_ok = _rows(block, (t % SUB) * BLOCK_M, offs_m, N_Q, n_w, img_h, img_w, BLOCK_Q, WINDOW,
                                       REGION_H, REGION_W)
                token = row * img_w + col
                dk, dv = _dkdv_step(dk, dv, k, v, q_head + (row * s_qn + col * s_qw)[:, None] + offs_d[None, :],
                                    do_head + (row * s_on + col * s_ow)[:, None] + offs_d[None, :], lse_head + token,
                                    delta_head + token, q_ok, qk_scale, WINDOW_MASK, KV_AS_B)
            else:
                start_m = block * BLOCK_Q + (t % SUB) * BLOCK_M
                dk, dv = _dkdv_step(dk, dv, k, v, q_base + start_m * s_qn, do_base + start_m * s_on,
                                    lse_head + start_m + offs_m, delta_head + start_m + offs_m, offs_m < BLOCK_M,
                                    qk_scale, False, KV_AS_B)
    if Q_PARTIAL:
        if n_full < cnt:
            block_start = last_block * BLOCK_Q
            for s in range(0, tl.cdiv(N_Q - block_start, BLOCK_M)):
                start_m = (block_start + s * BLOCK_M).to(tl.int64)
                dk, dv = _dkdv_step(dk, dv, k, v, q_base + start_m * s_qn, do_base + start_m * s_on,
                                    lse_head + start_m + offs_m, delta_head + start_m + offs_m,
                                    (start_m + offs_m) < N_Q, qk_scale, True, KV_AS_B)
    if HAS_KPM:
        dk = tl.where(padded[:, None], 0.0, dk)
        dv = tl.where(padded[:, None], 0.0, dv)
    tl.store(DK + b * s_gb + h * s_gh + _offsets(k_row, k_col, s_gn, s_gw, WINDOW)[:, None] + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + b * s_ub + h * s_uh + _offsets(k_row, k_col, s_un, s_uw, WINDOW)[:, None] + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _transpose_lists_kernel(IDX, CNT, TIDX, TCNT, s_ib, s_ih, s_iq, s_cb, s_ch, H_LISTS, n_q_blocks, n_k_blocks,
                            MAX_K: tl.constexpr, CHUNK: tl.constexpr):
    """Per-key-block query lists from per-query-block key lists, for one key block of one list head: scan the
    query blocks in ascending order, keep those whose first `CNT` entries hold the key block, write them
    compacted (a prefix sum gives each its slot), then -1 to the full width."""
    key_block, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H_LISTS, pid_bh % H_LISTS
    offs_q = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, MAX_K)
    out = TIDX + (pid_bh.to(tl.int64) * n_k_blocks + key_block) * n_q_blocks
    total = 0
    for start in range(0, n_q_blocks, CHUNK):
        rows = start + offs_q
        ok = rows < n_q_blocks
        cnt = tl.load(CNT + b * s_cb + h * s_ch + rows, mask=ok, other=0)
        lists = tl.load(IDX + b * s_ib + h * s_ih + rows[:, None] * s_iq + offs_k[None, :],
                        mask=offs_k[None, :] < cnt[:, None], other=-1)
        hit = tl.max((lists == key_block).to(tl.int32), 1)
        tl.store(out + total + tl.cumsum(hit, 0) - 1, rows, mask=hit > 0)
        total += tl.sum(hit, 0)
    for start in range(total, n_q_blocks, CHUNK):
        tl.store(out + start + offs_q, -1, mask=start + offs_q < n_q_blocks)
    tl.store(TCNT + pid_bh * n_k_blocks + key_block, total)


# ----------------------------------------------------------------------------- launchers
def can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """None if the Triton kernel runs these inputs, else the reason it does not."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16/bfloat16)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return (f"head_dim q/k {q.shape[-1]}, v {v.shape[-1]} "
                f"(the kernel takes equal head dims in {SUPPORTED_HEAD_DIMS})")
    if block_q % BLOCK_MULTIPLE or block_k % BLOCK_MULTIPLE:
        return f"block_size ({block_q}, {block_k}) (the kernel takes blocks that are multiples of {BLOCK_MULTIPLE})"
    return None


def largest_tile(block: int, cap: int = 128) -> int:
    """The largest tile of `TILES` (at most `cap`) that divides a mask block."""
    return next(t for t in TILES if t <= cap and block % t == 0)


def default_config(block_q: int, block_k: int, head_dim: int) -> dict[str, dict[str, int]]:
    """Tile shapes and launch settings per kernel (H100, bf16; measured in BENCHMARKS.md for blocks of 64/128).

    A block that is a multiple of 128 (64) runs like a block of 128 (64); blocks of 16 or 32 (routing
    attention's small regions) use tiles of their size, not tuned.
    """
    tq, tk = largest_tile(block_q), largest_tile(block_k)
    if head_dim > 64:
        fwd = dict(BLOCK_M=tq, BLOCK_N=tk, num_warps=8 if tq == 128 else 4, num_stages=3, TMA=tq == tk == 128)
        dq = dict(BLOCK_M=tq, BLOCK_N=tk, num_warps=8 if tq == 128 else 4, num_stages=2 if tq == tk == 128 else 3)
        # K/V as B operands pays at 64 keys per program (fewer spills), not at 128 (more): H100 sweep
        dkdv = dict(BLOCK_M=largest_tile(block_q, 64), BLOCK_N=tk, num_warps=8 if tk == 128 else 4, num_stages=3,
                    KV_AS_B=tk == 64)
    else:
        fwd = dict(BLOCK_M=tq, BLOCK_N=tk, num_warps=4, num_stages=3)
        dq = dict(BLOCK_M=tq, BLOCK_N=largest_tile(block_k, 64), num_warps=8 if tq == 128 else 4, num_stages=3)
        dkdv = dict(BLOCK_M=largest_tile(block_q, 64), BLOCK_N=largest_tile(block_k, 64), num_warps=4, num_stages=3, KV_AS_B=False)
    return {"fwd": fwd, "dq": dq, "dkdv": dkdv}


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dim is contiguous (any other strides: the kernels take them, and write
    gradients with their own buffers' strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dims(t: torch.Tensor, window: RegionWindows | None) -> tuple[int, int, int]:
    """(batch, heads, tokens) of `[B, H, N, D]`, or of a `[B, height, width, heads, D]` map in window mode."""
    if window is None:
        return t.shape[0], t.shape[1], t.shape[2]
    return t.shape[0], t.shape[3], t.shape[1] * t.shape[2]


def _strides(t: torch.Tensor, window: RegionWindows | None) -> tuple[int, int, int, int]:
    """(batch, head, row, column) strides; a sequence has no column stride (0)."""
    if window is None:
        return t.stride(0), t.stride(1), t.stride(2), 0
    return t.stride(0), t.stride(3), t.stride(1), t.stride(2)


def _window_args(q: torch.Tensor, window: RegionWindows | None) -> tuple[tuple[int, int, int], dict[str, object]]:
    """(n_w, height, width) kernel arguments and the window constexprs."""
    if window is None:
        return (1, 1, 1), dict(WINDOW=False, WINDOW_MASK=False, REGION_H=1, REGION_W=1, PACK=False)
    return (window.n_w, q.shape[1], q.shape[2]), dict(WINDOW=True, WINDOW_MASK=window.masked, PACK=window.packed,
                                                       REGION_H=window.region_h, REGION_W=window.region_w)


def _list_strides(idx: torch.Tensor, cnt: torch.Tensor) -> tuple[int, ...]:
    """Strides of [B|1, H|1, n_blocks, max] lists and [B|1, H|1, n_blocks] counts; 0 where broadcast."""
    sib = idx.stride(0) if idx.shape[0] > 1 else 0
    sih = idx.stride(1) if idx.shape[1] > 1 else 0
    scb = cnt.stride(0) if cnt.shape[0] > 1 else 0
    sch = cnt.stride(1) if cnt.shape[1] > 1 else 0
    return sib, sih, idx.stride(2), scb, sch


def _check_config(cfg: dict[str, int], block_q: int, block_k: int, packed: str | None = None) -> None:
    """Tiles must divide the mask blocks, except on a packed list side (`packed`: "BLOCK_M" or "BLOCK_N")."""
    if (block_q % cfg["BLOCK_M"] and packed != "BLOCK_M") or (block_k % cfg["BLOCK_N"] and packed != "BLOCK_N"):
        raise ValueError(f"tile {cfg} must divide the mask blocks ({block_q}, {block_k})")


def _packed_side(window: RegionWindows | None, side: str) -> str | None:
    return side if window is not None and window.packed else None


def padding_args(kpm: torch.Tensor | None, tile: int, like: torch.Tensor) -> tuple:
    """(KPM, TPAD, s_mb, s_tb) kernel arguments: uint8 key mask `[B|1, N_k]` and its per-`tile` "holds padding"
    flags (`like` stands in for both when there is no mask)."""
    if kpm is None:
        return like, like, 0, 0
    n_k = kpm.shape[1]
    n_tiles = math.ceil(n_k / tile)
    flags = F.pad(kpm, (0, n_tiles * tile - n_k)).view(kpm.shape[0], n_tiles, tile).amax(-1).contiguous()
    return kpm, flags, kpm.stride(0) if kpm.shape[0] > 1 else 0, flags.stride(0) if kpm.shape[0] > 1 else 0


def forward(q, k, v, idx, cnt, block_q, block_k, scale, config=None, kpm=None, window=None):
    """Launch the forward kernel. q, k, v `[B, H, N, D]`, or `[B, height, width, heads, D]` maps with `window`
    (last dim contiguous); lists as in `BlockSparseLayout`; kpm: None or contiguous uint8 `[B|1, N_k]`, nonzero =
    padded key (sequence mode only). Returns o (q's shape) and the float32 logsumexp `[B, H, N]`. The fwd config's
    optional `TMA` selects `_fwd_kernel_tma` (sequence mode, where `tma_strides_ok`)."""
    batch, heads, n_q = _dims(q, window)
    n_k = _dims(k, window)[2]
    dim = q.shape[-1]
    cfg = dict((config or default_config(block_q, block_k, dim))["fwd"])
    _check_config(cfg, block_q, block_k, _packed_side(window, "BLOCK_N"))
    if cfg.pop("TMA", False) and window is None and tma_strides_ok(q, k, v):  # else the pointer kernel: same results
        return _forward_tma(q, k, v, idx, cnt, block_q, block_k, scale, cfg, kpm)
    o = torch.empty_like(q) if window is None else q.new_empty(q.shape)
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
    grid = (idx.shape[2] * (block_q // cfg["BLOCK_M"]), batch * heads)
    kpm_arg, tpad, s_mb, s_tb = padding_args(kpm, cfg["BLOCK_N"], cnt)
    geometry, window_consts = _window_args(q, window)
    _fwd_kernel[grid](
        q, k, v, o, lse, idx, cnt, kpm_arg, tpad, *(s for t in (q, k, v, o) for s in _strides(t, window)),
        *_list_strides(idx, cnt), s_mb, s_tb, heads, n_q, n_k, scale * LOG2E, *geometry,
        BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=dim, K_PARTIAL=window is None and n_k % block_k != 0,
        HAS_KPM=kpm is not None, **window_consts, **cfg,
    )
    return o, lse


def tma_strides_ok(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these `[B, H, N, D]` tensors: 16-byte aligned base and batch/head/row
    strides, last dim contiguous (TMA's rules). A config asking for TMA runs the pointer kernel otherwise."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(2) * size) % 16:
            return False
        if any((t.stride(d) * size) % 16 for d in (0, 1) if t.shape[d] > 1):
            return False
    return True


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Descriptors built on the device live in a global scratch buffer that Triton asks its allocator for
    (`triton.set_allocator`); install a torch one unless the caller already set an allocator."""
    try:
        from triton.runtime import _allocation
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # Triton-internal names moved: set ours
        unset = True
    if unset:
        triton.set_allocator(_descriptor_scratch)


def _forward_tma(q, k, v, idx, cnt, block_q, block_k, scale, cfg, kpm):
    """`forward` through `_fwd_kernel_tma` (inputs already checked by `tma_strides_ok`)."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    o = torch.empty_like(q)  # q's strides (aligned) or, for a q with gaps, contiguous (aligned: D in 32/64/128)
    lse = torch.empty(batch, heads, n_q, device=q.device, dtype=torch.float32)
    grid = (idx.shape[2] * (block_q // cfg["BLOCK_M"]), batch * heads)
    kpm_arg, tpad, s_mb, s_tb = padding_args(kpm, cfg["BLOCK_N"], cnt)
    if q.device.type == "cuda":
        _ensure_allocator()
    _fwd_kernel_tma[grid](
        q, k, v, o, lse, idx, cnt, kpm_arg, tpad, *(s for t in (q, k, v, o) for s in _strides(t, None)[:3]),
        *_list_strides(idx, cnt), s_mb, s_tb, heads, n_q, n_k, scale * LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=dim, K_PARTIAL=n_k % block_k != 0, HAS_KPM=kpm is not None,
        **cfg,
    )
    return o, lse


def backward(do, dlse, q, k, v, o, lse, idx, cnt, t_idx, t_cnt, block_q, block_k, scale, config=None, kpm=None,
             window=None):
    """Launch the dq and dk/dv kernels; `t_idx`/`t_cnt` are `BlockSparseLayout.t_indices`/`t_counts`.

    A gradient `dlse` of the logsumexp (or None) enters through delta: d lse_i / d s_ij = p_ij, so
    dS = P * (dP - (rowsum(dO * O) - dlse)).
    """
    configs = config or default_config(block_q, block_k, q.shape[-1])
    do = _kernel_layout(do)
    delta = launch_delta(do, o, dlse, window)
    dq = launch_dq(do, q, k, v, lse, delta, idx, cnt, block_q, block_k, scale, configs["dq"], kpm, window)
    dk, dv = launch_dkdv(do, q, k, v, lse, delta, t_idx, t_cnt, block_q, block_k, scale, configs["dkdv"], kpm,
                         window)
    return dq, dk, dv


def launch_transpose(indices: torch.Tensor, counts: torch.Tensor, n_k_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`layout.transpose_lists` in one launch (the backward builds them from routing attention's per-call
    lists: ~10 small PyTorch launches otherwise): int32 `[B|1, H|1, n_k_blocks, n_q_blocks]` ascending, -1
    after the counts, and int32 counts."""
    lead, n_q_blocks, max_k = tuple(indices.shape[:2]), indices.shape[2], indices.shape[3]
    t_idx = torch.empty(*lead, n_k_blocks, n_q_blocks, device=indices.device, dtype=torch.int32)
    t_cnt = torch.empty(*lead, n_k_blocks, device=indices.device, dtype=torch.int32)
    width = triton.next_power_of_2(max(max_k, 1))
    _transpose_lists_kernel[(n_k_blocks, lead[0] * lead[1])](
        indices, counts, t_idx, t_cnt, *_list_strides(indices, counts), lead[1], n_q_blocks, n_k_blocks, MAX_K=width, CHUNK=max(16, min(128, 4096 // width)), num_warps=4,
    )
    return t_idx, t_cnt


def launch_delta(do, o, dlse, window=None):
    """rowsum(dO * O) - dlse, fp32 [B, H, N_q], in one pass (per map token, row-major, in window mode)."""
    if window is not None:  # the maps as [B, heads, height * width, D] sequences
        o, do = (t.reshape(t.shape[0], -1, *t.shape[3:]).transpose(1, 2) for t in (o, do))
    return row_delta(do, o, dlse)


def launch_dq(do, q, k, v, lse, delta, idx, cnt, block_q, block_k, scale, cfg, kpm=None, window=None):
    batch, heads, n_q = _dims(q, window)
    n_k = _dims(k, window)[2]
    _check_config(cfg, block_q, block_k, _packed_side(window, "BLOCK_N"))
    dq = torch.empty_like(q)
    grid = (idx.shape[2] * (block_q // cfg["BLOCK_M"]), batch * heads)
    kpm_arg, tpad, s_mb, s_tb = padding_args(kpm, cfg["BLOCK_N"], cnt)
    geometry, window_consts = _window_args(q, window)
    _bwd_dq_kernel[grid](
        q, k, v, do, dq, lse, delta, idx, cnt, kpm_arg, tpad,
        *(s for t in (q, k, v, do, dq) for s in _strides(t, window)), *_list_strides(idx, cnt), s_mb, s_tb,
        heads, n_q, n_k, scale * LOG2E, scale, *geometry,
        BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=q.shape[-1], K_PARTIAL=window is None and n_k % block_k != 0,
        HAS_KPM=kpm is not None, **window_consts, **cfg,
    )
    return dq


def launch_dkdv(do, q, k, v, lse, delta, t_idx, t_cnt, block_q, block_k, scale, cfg, kpm=None, window=None):
    batch, heads, n_q = _dims(q, window)
    n_k = _dims(k, window)[2]
    _check_config(cfg, block_q, block_k, _packed_side(window, "BLOCK_M"))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = (t_idx.shape[2] * (block_k // cfg["BLOCK_N"]), batch * heads)
    kpm_arg, _, s_mb, _ = padding_args(kpm, cfg["BLOCK_N"], t_cnt)
    geometry, window_consts = _window_args(q, window)
    _bwd_dkdv_kernel[grid](
        q, k, v, do, dk, dv, lse, delta, t_idx, t_cnt, kpm_arg,
        *(s for t in (q, k, v, do, dk, dv) for s in _strides(t, window)), *_list_strides(t_idx, t_cnt), s_mb,
        heads, n_q, n_k, scale * LOG2E, scale, *geometry,
        BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=q.shape[-1], Q_PARTIAL=window is None and n_q % block_q != 0,
        HAS_KPM=kpm is not None, **window_consts, **cfg,
    )
    return dk, dv


# ----------------------------------------------------------------------------- autograd
class BlockSparseAttention(torch.autograd.Function):
    """Autograd wrapper: saves O and the logsumexp, recomputes P block by block in backward."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, config, kpm, window):
        q, k, v = (_kernel_layout(t) for t in (q, k, v))
        o, lse = forward(q, k, v, layout.indices, layout.counts, layout.block_q, layout.block_k, scale, config, kpm,
                         window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (layout, scale, config, kpm, window)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        layout, scale, config, kpm, window = ctx.args
        do = torch.zeros_like(o) if do is None else do
        t_idx, t_cnt = layout.transposed(launch_transpose)
        dq, dk, dv = backward(do, dlse, q, k, v, o, lse, layout.indices, layout.counts, t_idx, t_cnt,
                              layout.block_q, layout.block_k, scale, config, kpm, window)
        return dq, dk, dv, None, None, None, None, None


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float,
    config: dict | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: RegionWindows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of block-sparse attention over a checked `layout` (see `layout.block_sparse_layout`).

    Inputs are assumed checked (`zoo.ops.block_sparse_attention` does it). `config` overrides the
    tile shapes and launch settings (see `default_config`); it exists for tuning. `key_padding_mask`:
    None or bool `[B|1, N_k]`, True = padded key (never attended, zero dk/dv). `window`: q, k, v are
    `[B, height, width, heads, D]` maps and the layout's blocks are their regions (`RegionWindows`);
    out has the map's shape, lse is `[B, heads, height * width]`.
    """
    kpm = None if key_padding_mask is None else key_padding_mask.to(q.device, torch.uint8).contiguous()
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        q, k, v = (_kernel_layout(t) for t in (q, k, v))  # inference: no autograd node (host time of small calls)
        return forward(q, k, v, layout.indices, layout.counts, layout.block_q, layout.block_k, scale, config, kpm,
                       window)
    return BlockSparseAttention.apply(q, k, v, layout, scale, config, kpm, window)
