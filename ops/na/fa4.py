"""Neighborhood attention through flash-attn-4 (FlashAttention's CuTe-DSL kernels, Hopper/Blackwell): block
sparsity from the NA geometry, the window test as a `mask_mod`, RPB as a `score_mod`.

Everything but the two CuTe functions (`fa4_mods.py`) is plain PyTorch built once per geometry (`na_fa4_plan`,
cached) and checked on CPU (tests/test_fa4_backend.py):

* Token order: 1-D/2-D run as 3-D with singleton leading axes. Dilation groups are put apart first (group-major;
  each group is a dense NA problem in group coordinates, `naive.py`), then each group is cut into N-d tiles of
  `block_q` query tokens (`block_k` key tokens), the tile shapes chosen per geometry (`choose_tiles`: the least
  block work, partial blocks weighted above full ones). A FA4 query block is then one compact query tile, a key block one key tile. Every group
  is padded to the same whole number of tiles per axis: padded queries take the window of the nearest real
  query of their group (finite rows, dropped on the way back), padded keys get a coordinate outside every window.
* Block lists: the window relation is a product over axes, so per axis and group the tile pairs that some
  (query, key) pair links ("listed") and those that every pair links ("full") are exact from the per-axis
  window ends (`axis_tiles`); an N-d tile pair is listed (full) iff it is on every axis. Listed but not full blocks are FA4's partial
  blocks, where the mask_mod decides per pair from two aux tensors: per query slot its window [lo, hi] per axis,
  per key slot its group coordinates.
* RPB: the score_mod adds `bias[h, off0[kc0 - qc0 + W] + off1[...] + off2[...]]`, per-axis tables of the
  clamped relative position's offset (as the reference), with one zero entry appended to the bias table that
  padded and additional keys (at a sentinel coordinate) read.
* Additional keys/values (HunyuanVideo's text tokens) follow the padded spatial keys, in key blocks every query
  block lists as full (FA4 masks the sequence end on the last, ascending, entry of a list, as `block_sparse/fa4.py`).

FA4's backward has no gradient for aux tensors, so an rpb that requires grad cannot run here (`fa4_reason`).
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._cost import is_counting_flops
from ..block_sparse import fa4 as fa4_common
from ..block_sparse.layout import mask_to_lists
from .naive import axis_bounds

# backend="auto" takes flash-attn-4 only once tests/test_fa4_backend.py's NA GPU tests have passed on a GPU (not
# yet: written without one); until then it runs when asked for
IN_AUTO = False
NOT_IN_AUTO = "not yet validated on a GPU, so backend='auto' skips it: pass backend='fa4' to use it"
AXES = 3  # 1-D and 2-D run as 3-D with singleton leading axes
Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]


def as_3d(spatial: Sequence[int], kernel: Sequence[int], dilation: Sequence[int], stride: Sequence[int],
          causal: Sequence[bool]) -> Geometry:
    """The geometry with singleton leading axes (length 1, kernel 1: one key, offset 0) up to 3 axes."""
    pad = AXES - len(spatial)
    return ((1,) * pad + tuple(spatial), (1,) * pad + tuple(kernel), (1,) * pad + tuple(dilation),
            (1,) * pad + tuple(stride), (False,) * pad + tuple(causal))


def _unravel(index: torch.Tensor, shape: Sequence[int]) -> list[torch.Tensor]:
    """Row-major coordinates of a flat index."""
    out, step = [], math.prod(shape)
    for size in shape:
        step //= size
        out.append((index // step) % size)
    return out


def _ravel(coords: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    flat = torch.zeros_like(coords[0])
    for c, size in zip(coords, shape):
        flat = flat * size + c
    return flat


def group_lengths(length: int, dilation: int) -> torch.Tensor:
    """Length of each dilation group of an axis, `[dilation]`."""
    return length // dilation + (torch.arange(dilation) < length % dilation).long()


@functools.lru_cache(maxsize=256)
def group_windows(length: int, kernel: int, dilation: int, stride: int, causal: bool,
                  group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) `[group length]`: the keys each query of one dilation group sees, in group coordinates (both
    non-decreasing along the axis, `kernel.py` relies on it too)."""
    bounds = axis_bounds(length, kernel, dilation, stride, causal, "cpu").long()
    return bounds[0, group::dilation].contiguous(), bounds[1, group::dilation].contiguous()


def axis_tiles(geometry: Geometry, axis: int, group: int, tile_q: int, tile_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(listed, full) bool `[query tiles, key tiles]` of one axis and dilation group, both sides padded to whole
    tiles: some / every (query, key) pair of the two tiles is related. Padded queries take the group's last
    query's window; padded keys are seen by none. Exact from the monotone window ends: the queries whose window
    starts at or before the tile's last key are a prefix, those whose window ends at or after its first key a
    suffix, and some query sees a key of the tile iff the two meet inside the query tile."""
    lo, hi = group_windows(*(g[axis] for g in geometry), group)
    glen, extent = len(lo), _extent(geometry, axis)
    q_first = torch.arange(0, _padded(extent, tile_q), tile_q)
    q_last, q_first = (q_first + tile_q - 1).clamp_max(glen - 1), q_first.clamp_max(glen - 1)
    k_first = torch.arange(0, _padded(extent, tile_k), tile_k)
    k_last = (k_first + tile_k - 1).clamp_max(glen - 1)
    prefix_end = torch.searchsorted(lo, k_last, right=True) - 1
    suffix_start = torch.searchsorted(hi, k_first)
    listed = ((torch.maximum(suffix_start[None, :], q_first[:, None]) <= torch.minimum(prefix_end[None, :],
                                                                                       q_last[:, None]))
              & (k_first < glen)[None, :])
    full = ((lo[q_last][:, None] <= k_first[None, :]) & (hi[q_first][:, None] >= k_first[None, :] + tile_k - 1)
            & (k_first + tile_k <= glen)[None, :])
    return listed, full


def _extent(geometry: Geometry, axis: int) -> int:
    """The longest dilation group of an axis."""
    return math.ceil(geometry[0][axis] / geometry[2][axis])


def _padded(extent: int, tile: int) -> int:
    return math.ceil(extent / tile) * tile


def _tile_shapes(block: int, geometry: Geometry) -> list[tuple[int, int, int]]:
    """The 3-D tiles of powers of two holding `block` (a power of two) tokens, no longer on an axis than its longest
    group rounded up to a power of two (unless none fits: tiny inputs)."""
    bits = block.bit_length() - 1
    shapes = [(1 << a, 1 << b, 1 << (bits - a - b)) for a in range(bits + 1) for b in range(bits + 1 - a)]
    caps = [1 << (_extent(geometry, a) - 1).bit_length() for a in range(AXES)]
    fitting = [t for t in shapes if all(size <= cap for size, cap in zip(t, caps))]
    return fitting or shapes


PARTIAL_COST = 2.0  # a partial block (mask_mod on every pair, six aux reads each) against a full one: to be measured


@functools.lru_cache(maxsize=64)
def choose_tiles(geometry: Geometry, block_q: int, block_k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(query tile, key tile) shapes of the least work: full block pairs plus `PARTIAL_COST` x partial ones, then
    the fewest padded queries.

    The counts are exact and cheap: pairs multiply over axes, so their sum over the dilation groups is the product
    over axes of each axis' sum over its groups."""
    per_axis = {}  # (axis, tile_q, tile_k) -> (listed, full) tile pairs summed over the axis' groups

    def counts(axis: int, tq: int, tk: int) -> tuple[int, int]:
        if (axis, tq, tk) not in per_axis:
            tiles = [axis_tiles(geometry, axis, group, tq, tk) for group in range(geometry[2][axis])]
            per_axis[axis, tq, tk] = sum(int(t[0].sum()) for t in tiles), sum(int(t[1].sum()) for t in tiles)
        return per_axis[axis, tq, tk]

    def cost(tiles):
        tq, tk = tiles
        listed = math.prod(counts(a, tq[a], tk[a])[0] for a in range(AXES))
        full = math.prod(counts(a, tq[a], tk[a])[1] for a in range(AXES))
        return full + PARTIAL_COST * (listed - full), math.prod(_padded(_extent(geometry, a), tq[a]) for a in range(AXES))

    return min(itertools.product(_tile_shapes(block_q, geometry), _tile_shapes(block_k, geometry)), key=cost)


@dataclass(frozen=True)
class Slots:
    """The permuted order of one side (queries or keys): per slot its source token (row-major index into the
    spatial grid, clamped into the slot's group for padding), its in-group coordinates `[3, n]` (unclamped) and
    whether it is a real token."""

    source: torch.Tensor
    coords: torch.Tensor
    clamped: torch.Tensor
    real: torch.Tensor


def slots(geometry: Geometry, tile: Sequence[int]) -> Slots:
    """Group-major, then tile-major (row-major over the tiles of a group), then row-major inside a tile."""
    spatial, _, dilation, _, _ = geometry
    grid = [_padded(_extent(geometry, a), tile[a]) // tile[a] for a in range(AXES)]
    size = math.prod(tile)
    index = torch.arange(math.prod(dilation) * math.prod(grid) * size)
    inside = _unravel(index % size, tile)
    tile_at = _unravel((index // size) % math.prod(grid), grid)
    group = _unravel(index // (size * math.prod(grid)), dilation)
    coords = torch.stack([tile_at[a] * tile[a] + inside[a] for a in range(AXES)])
    glen = torch.stack([group_lengths(spatial[a], dilation[a])[group[a]] for a in range(AXES)])
    clamped = torch.minimum(coords, glen - 1)
    source = _ravel([clamped[a] * dilation[a] + group[a] for a in range(AXES)], spatial)
    return Slots(source, coords, clamped, (coords < glen).all(0))


def block_masks(geometry: Geometry, tile_q: Sequence[int], tile_k: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(listed, full) bool `[query blocks, key blocks]` of the spatial keys in `slots` order: block-diagonal over
    the dilation groups, each group's the outer product over axes of the per-axis tile relations."""
    dilation = geometry[2]
    listed_axes, full_axes = [], []
    for a in range(AXES):
        pairs = [axis_tiles(geometry, a, group, tile_q[a], tile_k[a]) for group in range(dilation[a])]
        listed_axes.append(torch.stack([p[0] for p in pairs]))  # [d_a, query tiles_a, key tiles_a]
        full_axes.append(torch.stack([p[1] for p in pairs]))

    def per_group(axes: list[torch.Tensor]) -> torch.Tensor:  # [groups, query tiles, key tiles]
        (d0, q0, k0), (d1, q1, k1), (d2, q2, k2) = (t.shape for t in axes)
        product = (axes[0][:, None, None, :, None, None, :, None, None]
                   & axes[1][None, :, None, None, :, None, None, :, None]
                   & axes[2][None, None, :, None, None, :, None, None, :])
        return product.reshape(d0 * d1 * d2, q0 * q1 * q2, k0 * k1 * k2)

    def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
        groups, rows, cols = blocks.shape
        out = torch.zeros(groups, rows, groups, cols, dtype=torch.bool)
        out[torch.arange(groups), :, torch.arange(groups)] = blocks
        return out.view(groups * rows, groups * cols)

    return block_diagonal(per_group(listed_axes)), block_diagonal(per_group(full_axes))


def key_sentinel(geometry: Geometry) -> int:
    """Coordinate of padded and additional keys on every axis, 2W (W the longest group): past every window."""
    return 2 * max(_extent(geometry, a) for a in range(AXES))


def offset_tables(geometry: Geometry) -> torch.Tensor:
    """int32 `[3, 3W + 1]`: per axis, at `key coordinate + W - query coordinate` (the query slots store W minus
    their coordinate), the flattened rpb offset part `clamp(kc - qc + k - 1, 0, 2k - 2) x stride`; past 2W (keys at
    the sentinel 2W) the entries read, summed over the axes, the appended zero entry `prod(2k - 1)` of the table."""
    kernel = geometry[1]
    width = key_sentinel(geometry) // 2
    sizes = [2 * k - 1 for k in kernel]
    table = torch.zeros(AXES, 3 * width + 1, dtype=torch.int32)
    rel = torch.arange(2 * width + 1) - width  # kc - qc
    for a in range(AXES):
        table[a, :2 * width + 1] = (rel + kernel[a] - 1).clamp(0, sizes[a] - 1) * math.prod(sizes[a + 1:])
    table[0, 2 * width + 1:] = math.prod(sizes)
    return table


def _lists(mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's (counts `[1, 1, rows]`, lists `[1, 1, rows, width]`) of a bool block mask, trimmed to the longest
    list (at least 1 wide: FA4 requires the partial lists even when empty)."""
    lists, counts = mask_to_lists(mask)
    width = max(1, int(counts.max())) if counts.numel() else 1
    return counts[None, None].to(device), lists[..., :width].contiguous()[None, None].to(device)


@dataclass(frozen=True)
class NaFa4Plan:
    """Everything FA4 needs for one geometry, on the device.

    q_source / k_source `[n_q]` / `[n_k spatial slots]`: token gathered into each slot; q_slot `[N]`: the slot of
    each token (for the way back); query_info int32 `[n_q, 9]` (lo, hi per axis, then W minus the clamped
    coordinates); key_info int32 `[n_k + extra, 3]` (padded and additional keys: `key_sentinel`); offsets (`offset_tables`); forward / backward FA4 lists (dicts of
    `*_block_cnt` / `*_block_idx`); block sizes."""

    q_source: torch.Tensor
    k_source: torch.Tensor
    q_slot: torch.Tensor
    query_info: torch.Tensor
    key_info: torch.Tensor
    offsets: torch.Tensor
    forward: dict
    backward: dict
    block_q: int
    block_k: int
    tiles: tuple

    def gather_queries(self, q: torch.Tensor) -> torch.Tensor:
        """`[B, *spatial, heads, D]` -> FA4's `[B, query slots, heads, D]`."""
        return q.reshape(q.shape[0], -1, *q.shape[-2:]).index_select(1, self.q_source)

    def gather_keys(self, k: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """`[B, *spatial, heads_kv, D]` (+ additional `[B, n, heads_kv, D]`) -> `[B, key slots, heads_kv, D]`."""
        keys = k.reshape(k.shape[0], -1, *k.shape[-2:]).index_select(1, self.k_source)
        return keys if extra is None else torch.cat([keys, extra.to(k.dtype)], 1)

    def aux_tensors(self, rpb: torch.Tensor | None) -> list[torch.Tensor]:
        """The mods' aux tensors (`fa4_mods.py`); with rpb `[heads, 2k-1, ...]` the offsets and the float32 bias
        table `[heads, R + 1]` (detached: FA4 gives it no gradient)."""
        if rpb is None:
            return [self.query_info, self.key_info]
        table = rpb.detach().float().reshape(rpb.shape[0], -1)
        return [self.query_info, self.key_info, self.offsets,
                torch.cat([table, table.new_zeros(rpb.shape[0], 1)], 1).contiguous()]

    def scatter_back(self, out: torch.Tensor, lse: torch.Tensor, spatial: Sequence[int]):
        """FA4's out `[B, query slots, heads, Dv]` and lse `[B, heads, query slots]` -> `[B, *spatial, heads, Dv]`
        and `[B, *spatial, heads]` (padded queries dropped)."""
        batch, _, heads, dim_v = out.shape
        out = out.index_select(1, self.q_slot).reshape(batch, *spatial, heads, dim_v)
        return out, lse.index_select(2, self.q_slot).transpose(1, 2).reshape(batch, *spatial, heads)


@functools.lru_cache(maxsize=32)
def na_fa4_plan(geometry: Geometry, block_q: int, block_k: int, n_extra: int, device: torch.device) -> NaFa4Plan:
    """The token order, aux tensors and block lists of a 3-D geometry (`as_3d`) with `n_extra` additional keys."""
    spatial, kernel, dilation, stride, causal = geometry
    tile_q, tile_k = choose_tiles(geometry, block_q, block_k)
    queries, keys = slots(geometry, tile_q), slots(geometry, tile_k)
    q_slot = torch.empty(math.prod(spatial), dtype=torch.long)
    q_slot[queries.source[queries.real]] = torch.nonzero(queries.real).squeeze(1)
    windows = []
    for a in range(AXES):
        bounds = axis_bounds(spatial[a], kernel[a], dilation[a], stride[a], causal[a], "cpu")
        token_axis = _unravel(queries.source, spatial)[a]
        windows += [bounds[0, token_axis], bounds[1, token_axis]]
    sentinel = key_sentinel(geometry)
    query_info = torch.cat([torch.stack(windows, 1), sentinel // 2 - queries.clamped.T], 1).int()
    key_coords = torch.where(keys.real, keys.coords, sentinel).T
    key_info = torch.cat([key_coords, torch.full((n_extra, AXES), sentinel)]).int()

    listed, full = block_masks(geometry, tile_q, tile_k)
    extra_blocks = math.ceil(n_extra / block_k)
    listed = torch.cat([listed, torch.ones(listed.shape[0], extra_blocks, dtype=torch.bool)], 1)
    full = torch.cat([full, torch.ones(full.shape[0], extra_blocks, dtype=torch.bool)], 1)
    partial = listed & ~full
    lists = {}
    for direction, transpose in (("forward", False), ("backward", True)):
        lists[direction] = {}
        for kind, mask in (("mask", partial), ("full", full)):
            counts, indices = _lists(mask.T if transpose else mask, device)
            lists[direction][f"{kind}_block_cnt"], lists[direction][f"{kind}_block_idx"] = counts, indices
    return NaFa4Plan(queries.source.to(device), torch.where(keys.real, keys.source, 0).to(device), q_slot.to(device),
                     query_info.contiguous().to(device), key_info.contiguous().to(device),
                     offset_tables(geometry).to(device), lists["forward"], lists["backward"], block_q, block_k,
                     (tile_q, tile_k))


def plan_blocks(major: int, geometry: Geometry) -> tuple[int, int]:
    """(block_q, block_k) for a GPU of compute capability `major` (`block_sparse/fa4.py`'s constraints): key
    blocks of FA4's key tile; query blocks of 128 rows, 256 on sm100 once there is more than one query block."""
    block_q = 128
    tile_q = choose_tiles(geometry, block_q, fa4_common.KEY_TILE)[0]
    n_q = math.prod(geometry[2]) * math.prod(_padded(_extent(geometry, a), tile_q[a]) for a in range(AXES))
    if fa4_common.fa4_block_reason(major, block_q, fa4_common.KEY_TILE, n_q):
        block_q = fa4_common.QUERY_MULTIPLE[major]
    return block_q, fa4_common.KEY_TILE


def fa4_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None = None) -> str | None:
    """None when flash-attn-4 runs this (checked) NA call on q, k, v `[B, *spatial, heads, D]`, else why not."""
    if is_counting_flops():
        return "FLOP counting runs the reference's cost model"
    reason = fa4_common.can_run_fa4_dense(q, k, v)
    if reason:
        return reason
    if rpb is not None and rpb.requires_grad and torch.is_grad_enabled():
        return ("rpb requires grad and flash-attn-4's score_mod gives no gradient to its aux tensors (the bias "
                "table): freeze rpb or use backend='triton'")
    return None


def na_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: Geometry, rpb: torch.Tensor | None,
           scale: float, additional_keys: torch.Tensor | None = None,
           additional_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out `[B, *spatial, heads, Dv]`, float32 lse `[B, *spatial, heads]`) through flash-attn-4; arguments checked
    (`zoo.ops.na.check_inputs`, `fa4_reason`), geometry as given to `na_fa4_plan`'s `as_3d`. Differentiable in q,
    k, v and the additional keys/values (FA4's autograd function, the gathers' backward)."""
    interface = fa4_common.fa4_interface()
    if isinstance(interface, str):
        raise RuntimeError(interface)
    from . import fa4_mods  # CuTe DSL code: imports only where FA4 is installed

    geometry3 = as_3d(*geometry)
    n_extra = 0 if additional_keys is None else additional_keys.shape[1]
    block_q, block_k = plan_blocks(fa4_common.device_capability(q.device)[0], geometry3)
    plan = na_fa4_plan(geometry3, block_q, block_k, n_extra, q.device)

    mods = dict(mask_mod=fa4_mods.na_window)
    if rpb is not None:
        mods.update(score_mod=fa4_mods.na_relative_bias, score_mod_bwd=fa4_mods.additive_bias_bwd)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                                 (q, k, v, additional_keys, additional_values))
    forward = interface.BlockSparseTensorsTorch(**plan.forward, block_size=(block_q, block_k))
    backward = interface.BlockSparseTensorsTorch(**plan.backward, block_size=(block_q, block_k)) if needs_grad else None
    with torch.cuda.device(q.device):  # FA4 reads the current device's architecture
        out, lse = interface.flash_attn_func(
            plan.gather_queries(q), plan.gather_keys(k, additional_keys), plan.gather_keys(v, additional_values),
            softmax_scale=scale, aux_tensors=plan.aux_tensors(rpb), block_sparse_tensors=forward,
            block_sparse_tensors_bwd=backward, return_lse=True, **mods)
    return plan.scatter_back(out, lse, q.shape[1:-2])
