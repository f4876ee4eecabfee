"""flash-attn-4 `mask_mod` / `score_mod` of neighborhood attention (CuTe DSL): imported only where flash-attn-4
is installed (`fa4.py`). Written as `block_sparse/fa4_masks.py` and FA4's own tests write theirs
(`tests/cute/mask_mod_definitions.py`, `score_mod_definitions.py`): module-level `@cute.jit` functions of
TensorSSAs reading aux tensors at scalar indices `[x[0]]` (FA4 calls score_mods with one element when aux tensors
are given). All geometry lives in the aux tensors (`fa4.NaFa4Plan`), so one compiled kernel serves every geometry:

  aux_tensors[0] int32 `[n_q, 9]`   per query slot: lo, hi of its window per axis, then W - its coordinates;
  aux_tensors[1] int32 `[n_k, 3]`   per key slot: its coordinates (padded / additional keys: 2W, past every window);
  aux_tensors[2] int32 `[3, 3W+1]`  per axis, the rpb offset part at key coordinate + W - query coordinate;
  aux_tensors[3] float32 `[heads, R + 1]` the bias table, flattened, a zero appended.
"""
import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils


@cute.jit
def na_window(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """True when key `kv_idx` is in query `q_idx`'s window on every axis (lo <= key coordinate <= hi). Called on
    partial blocks only, whose queries and keys share a dilation group."""
    queries, keys = aux_tensors[0], aux_tensors[1]
    q, kv = q_idx[0], kv_idx[0]
    key = utils.scalar_to_ssa(keys[kv, 0], cutlass.Int32)
    inside = (key >= utils.scalar_to_ssa(queries[q, 0], cutlass.Int32)) & (
        key <= utils.scalar_to_ssa(queries[q, 1], cutlass.Int32))
    for axis in cutlass.range_constexpr(1, 3):
        key = utils.scalar_to_ssa(keys[kv, axis], cutlass.Int32)
        inside = inside & (key >= utils.scalar_to_ssa(queries[q, 2 * axis], cutlass.Int32)) & (
            key <= utils.scalar_to_ssa(queries[q, 2 * axis + 1], cutlass.Int32))
    return inside


@cute.jit
def na_relative_bias(score, batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """score (already scaled) + bias[head, sum over axes of offsets[axis, key coordinate + W - query coordinate]]."""
    queries, keys, offsets, bias = aux_tensors[0], aux_tensors[1], aux_tensors[2], aux_tensors[3]
    q, kv, h = q_idx[0], kv_idx[0], head[0]
    index = offsets[0, keys[kv, 0] + queries[q, 6]]
    for axis in cutlass.range_constexpr(1, 3):
        index = index + offsets[axis, keys[kv, axis] + queries[q, 6 + axis]]
    bias_frag = cute.make_rmem_tensor(1, cutlass.Float32)
    bias_frag[0] = bias[h, index]
    return score + bias_frag.load()


@cute.jit
def additive_bias_bwd(grad, score, batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """d(score + bias) / d score = 1 (the bias table itself gets no gradient: `fa4.fa4_reason`)."""
    return grad
