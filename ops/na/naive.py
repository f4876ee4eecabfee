"""Neighborhood attention (NA / dilated NA / strided "GNA" / causal NA) in exact PyTorch.

Semantics are NATTEN's, per axis (length L, kernel k, dilation d, stride s), and the
N-d neighbourhood is the Cartesian product of the per-axis windows:

* dilation: token i is in group g = i mod d at in-group index i' = i // d; a query sees only
  keys of its own group, and the group has its own length L_g = L // d + (g < L mod d);
* non-causal: the window of k keys starts at clamp(c - k // 2, 0, L_g - k), i.e. it is
  shifted inward at the borders (always exactly k keys), even k put one more key on the left;
* stride: queries in blocks of s (group coordinates) share the window of the block leader
  c = min((i' // s) * s + s // 2, L_g - 1) (c = i' for s = 1; s = k gives blocked attention);
* causal: keys j' with c - k < j' <= i' for the leader c = min((i' // s) * s + s - 1, L_g - 1),
  so early queries see fewer than k keys;
* rpb (NAT/DiNAT relative position bias, [heads, 2k-1, ...]) is added after scaling, indexed by
  the key-query offset in group coordinates plus k - 1;
* additional keys/values are seen by every query, in the same softmax.

Precision: the computation runs in float32 (float64 for float64 q) with autocast off, whatever
the dtypes of rpb and the additional keys/values (they are cast), and the output has q's dtype.
Under bf16/fp16 autocast q/k/v come from the projections in low precision while parameters such
as rpb stay float32; mixing them is allowed.

Memory: no N x N matrix. Each query's k^d neighbour indices are computed from small per-axis
tables; queries are processed in chunks whose gathered K/V stay under `chunk_elements`, and
under autograd each chunk is recomputed in backward (activation checkpointing). Peak extra
memory is a heads-first float32 copy of q, k, v plus about `chunk_elements` (default 2^24,
64 MiB in float32) for one chunk's gathered neighbours, logits and probabilities; the kept
activations are the output and, with `return_lse`, the logsumexp.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .._checks import AUTOCAST_DEVICES, check_same, check_scale, check_tensor, empty_output
from .._cost import cost_placeholder, is_counting_flops

IntArg = int | Sequence[int]
BoolArg = bool | Sequence[bool]


def _per_axis(name: str, value, n: int, kind: type) -> tuple:
    values = (value,) * n if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(values) != n or not all(isinstance(v, (bool, int)) for v in values):
        raise ValueError(
            f"{name} must be a single {kind.__name__} or a tuple of {n} (one per spatial axis), got {value!r}"
        )
    return tuple(kind(v) for v in values)


def normalize_args(na_dim: int, kernel_size: IntArg, dilation: IntArg, stride: IntArg, is_causal: BoolArg):
    """Per-axis tuples, checked for values alone (not against an input)."""
    kernel = _per_axis("kernel_size", kernel_size, na_dim, int)
    dil = _per_axis("dilation", dilation, na_dim, int)
    strd = _per_axis("stride", stride, na_dim, int)
    causal = _per_axis("is_causal", is_causal, na_dim, bool)
    for name, vals, low in (("kernel_size", kernel, 2), ("dilation", dil, 1), ("stride", strd, 1)):
        if min(vals) < low:
            raise ValueError(f"{name} must be >= {low} on every axis, got {vals}")
    if any(s > k for s, k in zip(strd, kernel)):
        raise ValueError(
            f"stride {strd} must be <= kernel_size {kernel} on every axis (stride = kernel is blocked attention)"
        )
    return kernel, dil, strd, causal


def check_against_shape(spatial: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> None:
    for axis, (length, k, d) in enumerate(zip(spatial, kernel, dilation)):
        if k * d > length:
            raise ValueError(
                f"kernel_size * dilation = {k} * {d} = {k * d} exceeds spatial axis {axis} of length {length} "
                f"(input spatial shape {tuple(int(s) for s in spatial)}): use a smaller kernel_size/dilation or a larger input, "
                "or zero-pad the input up to kernel_size * dilation (NATTEN <= 0.15 did that; see "
                "zoo.ops.na_legacy_pad, which the NAT/DiNAT models apply with legacy_pad=True)"
            )


def na_legacy_pad(spatial: Sequence[int], kernel: IntArg, dilation: IntArg) -> tuple[int, ...]:
    """Per-axis zero padding (after the end) that NATTEN <= 0.15 added when any axis < kernel * dilation.

    The old modules padded every axis up to kernel * dilation as soon as one axis was too small,
    before the qkv projection (so padded tokens carry the qkv bias and are not masked), and
    cropped after the output projection. Dense-prediction NAT/DiNAT checkpoints rely on it.
    """
    n = len(spatial)
    kernel = _per_axis("kernel_size", kernel, n, int)
    dilation = _per_axis("dilation", dilation, n, int)
    need = [k * d for k, d in zip(kernel, dilation)]
    if all(length >= w for length, w in zip(spatial, need)):
        return (0,) * n
    return tuple(max(0, w - length) for length, w in zip(spatial, need))


def axis_neighbors(length: int, kernel: int, dilation: int, stride: int, causal: bool, device=None):
    """Per-axis window tables, each `[length, kernel]`: key index, rpb index (offset + k - 1), valid."""
    i = torch.arange(length, device=device)
    group, inner = i % dilation, i // dilation
    group_len = length // dilation + (group < length % dilation).long()
    slot = torch.arange(kernel, device=device)
    if causal:
        leader = torch.minimum((inner // stride) * stride + stride - 1, group_len - 1)
        keys = (leader - kernel + 1)[:, None] + slot
        valid = (keys >= 0) & (keys <= inner[:, None])
    else:
        leader = torch.minimum((inner // stride) * stride + stride // 2, group_len - 1)
        start = torch.minimum((leader - kernel // 2).clamp_min(0), group_len - kernel)
        keys = start[:, None] + slot
        valid = torch.ones_like(keys, dtype=torch.bool)
    rel = (keys - inner[:, None] + kernel - 1).clamp(0, 2 * kernel - 2)
    keys = keys.clamp_min(0)  # causal slots before the sequence start (masked); windows never pass the end
    return keys * dilation + group[:, None], rel, valid


def axis_bounds(length: int, kernel: int, dilation: int, stride: int, causal: bool, device) -> torch.Tensor:
    """int32 `[4, length]`: key_lo, key_hi (keys each query sees), q_lo, q_hi (queries that see each key),
    in group coordinates, from the reference's own window tables (`axis_neighbors`); empty = lo > hi."""
    keys, _, valid = axis_neighbors(length, kernel, dilation, stride, causal, device)
    inner_keys = keys // dilation
    key_lo = torch.where(valid, inner_keys, length).amin(1)
    key_hi = torch.where(valid, inner_keys, -1).amax(1)
    queries = (torch.arange(length, device=device) // dilation)[:, None].expand_as(keys)[valid]
    seen = keys[valid]
    q_lo = torch.full((length,), length, device=device, dtype=torch.long).scatter_reduce(0, seen, queries, "amin")
    q_hi = torch.full((length,), -1, device=device, dtype=torch.long).scatter_reduce(0, seen, queries, "amax")
    return torch.stack([key_lo, key_hi, q_lo, q_hi]).to(torch.int32)


def _combine(tables: list[torch.Tensor], coords: list[torch.Tensor], strides: Sequence[int], reduce: str):
    """Cartesian product of per-axis window tables for a chunk of queries -> `[n, prod(k)]`."""
    out = None
    n_ax = len(tables)
    for a, (table, coord) in enumerate(zip(tables, coords)):
        part = table[coord]  # [n, k_a]
        shape = [part.shape[0]] + [1] * n_ax
        shape[1 + a] = part.shape[1]
        part = part.view(shape)
        if reduce == "sum":
            part = part * strides[a]
            out = part if out is None else out + part
        else:
            out = part if out is None else out & part
    return out.flatten(1)


def _attend_chunk(q, k, v, key_idx, key_valid, rel_idx, rpb, extra_k, extra_v, scale, with_lse):
    """Heads-first: q [B, H, n, D]; k/v [B, H, N, D]; key_idx/key_valid/rel_idx [n, K]; rpb [H, R] or None."""
    k_sel, v_sel = k[:, :, key_idx], v[:, :, key_idx]  # [B, H, n, K, D], contiguous for the batched matmuls
    scores = (k_sel @ q.unsqueeze(-1)).squeeze(-1) * scale  # [B, H, n, K]
    if rpb is not None:
        scores = scores + rpb[:, rel_idx]
    scores = scores.masked_fill(~key_valid, float("-inf"))
    if extra_k is not None:
        scores = torch.cat([scores, q @ extra_k.transpose(-1, -2) * scale], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    n_keys = key_idx.shape[1]
    out = (probs[..., None, :n_keys] @ v_sel).squeeze(-2)
    if extra_v is not None:
        out = out + probs[..., n_keys:] @ extra_v
    return out, (torch.logsumexp(scores, dim=-1) if with_lse else None)


def check_inputs(q, k, v, na_dim: int, kernel_size: IntArg, dilation: IntArg, stride: IntArg, is_causal: BoolArg,
                 rpb, additional_keys, additional_values, scale: float | None = None) -> tuple[tuple, tuple, tuple, tuple]:
    """Every argument check of `neighborhood_attention` (shared with the kernels' dispatcher): per-axis
    (kernel, dilation, stride, causal) tuples, or a one-line ValueError."""
    layout = f"[batch, {', '.join('XYZ'[:na_dim]) if na_dim > 1 else 'L'}, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, na_dim + 3, layout)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch and spatial shape, "
            "k and v also in heads (only head_dim of v may differ)"
        )
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(
            f"q has {q.shape[-2]} heads but k/v have {k.shape[-2]}: q heads must equal k/v heads or be a multiple "
            "of them (GQA/MQA)"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head_dim {k.shape[-1]} != q head_dim {q.shape[-1]}: q and k must have the same head_dim")
    kernel, dil, strd, causal = normalize_args(na_dim, kernel_size, dilation, stride, is_causal)
    batch, *spatial, heads, dim = q.shape
    heads_kv, dim_v = k.shape[-2], v.shape[-1]
    check_against_shape(spatial, kernel, dil)
    if rpb is not None:
        expected = (heads, *(2 * kk - 1 for kk in kernel))
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != expected:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"rpb must have shape [heads, 2k-1, ...] = {expected} for kernel_size {kernel}, got {got}")
        check_tensor("rpb", rpb, na_dim + 1, "[heads, 2k-1, ...]")
        check_same(("q", "rpb"), (q, rpb), dtype=False)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("pass both additional_keys and additional_values, or neither")
    if additional_keys is not None:
        for name, t, d in (("additional_keys", additional_keys, dim), ("additional_values", additional_values, dim_v)):
            check_tensor(name, t, 4, "[batch, num_extra, heads_kv, head_dim]")
            check_same(("q", name), (q, t), dtype=False)
            if t.shape[0] != batch or t.shape[2] != heads_kv or t.shape[3] != d:
                raise ValueError(f"{name} must have shape [{batch}, num_extra, {heads_kv}, {d}], got {tuple(t.shape)}")
        if additional_keys.shape[1] != additional_values.shape[1]:
            raise ValueError(
                f"additional_keys has {additional_keys.shape[1]} tokens but additional_values has "
                f"{additional_values.shape[1]}: they must match"
            )
    check_scale("scale", scale)
    return kernel, dil, strd, causal


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    na_dim: int,
    kernel_size: IntArg,
    dilation: IntArg = 1,
    stride: IntArg = 1,
    is_causal: BoolArg = False,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    return_lse: bool = False,
    chunk_elements: int = 1 << 24,
):
    """N-d neighborhood attention, exact, in PyTorch. See `zoo.ops.na2d` for the arguments."""
    kernel, dil, strd, causal = check_inputs(q, k, v, na_dim, kernel_size, dilation, stride, is_causal, rpb,
                                             additional_keys, additional_values, scale)
    batch, *spatial, heads, dim = q.shape
    dim_v = v.shape[-1]
    scale = dim ** -0.5 if scale is None else float(scale)
    n_extra = 0 if additional_keys is None else additional_keys.shape[1]

    device = q.device
    tables = [axis_neighbors(*axis, device) for axis in zip(spatial, kernel, dil, strd, causal)]
    if is_counting_flops():
        per_axis_pairs = [int(t[2].sum()) for t in tables]
        n_tokens = math.prod(spatial)
        macs = batch * heads * (math.prod(per_axis_pairs) + n_tokens * n_extra) * (dim + dim_v)
        out = cost_placeholder(q.new_empty(batch, *spatial, heads, dim_v), macs)
        return (out, q.new_zeros(batch, *spatial, heads, dtype=torch.float32)) if return_lse else out

    compute = torch.promote_types(q.dtype, torch.float32)
    if not batch * heads:  # no work (the batched matmuls below reject empty batches), as SDPA: an empty output
        out = empty_output((batch, *spatial, heads, dim_v), q.dtype, q, k, v, rpb, additional_keys, additional_values)
        return (out, q.new_zeros(batch, *spatial, heads, dtype=compute)) if return_lse else out
    n_tokens, n_keys = math.prod(spatial), math.prod(kernel)
    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B, ..., h, D] -> [B, H, tokens, D], kv heads repeated
        t = t.reshape(batch, -1, t.shape[-2], t.shape[-1]).transpose(1, 2).to(compute)
        return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t

    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    extra_k = None if additional_keys is None else heads_first(additional_keys)
    extra_v = None if additional_values is None else heads_first(additional_values)
    rpb_flat = None if rpb is None else rpb.to(compute).reshape(heads, -1)

    token_strides = [math.prod(spatial[a + 1:]) for a in range(na_dim)]
    rpb_strides = [math.prod([2 * kk - 1 for kk in kernel[a + 1:]]) for a in range(na_dim)]
    per_query = batch * heads * (n_keys * (dim + dim_v + 2) + n_extra)
    chunk = max(1, chunk_elements // max(per_query, 1))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, rpb, additional_keys, additional_values)
    )
    outs, lses = [], []
    # autocast would run the matmuls in bf16/fp16 again (float64 it leaves alone)
    no_autocast = (torch.autocast(device.type, enabled=False) if device.type in AUTOCAST_DEVICES
                   else contextlib.nullcontext())
    with no_autocast:
        for start in range(0, n_tokens, chunk):
            stop = min(start + chunk, n_tokens)
            ids = torch.arange(start, stop, device=device)
            coords = [(ids // token_strides[a]) % spatial[a] for a in range(na_dim)]
            key_idx = _combine([t[0] for t in tables], coords, token_strides, "sum")
            rel_idx = _combine([t[1] for t in tables], coords, rpb_strides, "sum")
            key_valid = _combine([t[2] for t in tables], coords, token_strides, "and")
            args = (qh[:, :, start:stop], kh, vh, key_idx, key_valid, rel_idx, rpb_flat, extra_k, extra_v, scale,
                    return_lse)
            out, lse = checkpoint(_attend_chunk, *args, use_reentrant=False) if needs_grad else _attend_chunk(*args)
            outs.append(out)
            lses.append(lse)
    out = torch.cat(outs, 2).transpose(1, 2).reshape(batch, *spatial, heads, dim_v).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, 2).transpose(1, 2).reshape(batch, *spatial, heads)
    return out
