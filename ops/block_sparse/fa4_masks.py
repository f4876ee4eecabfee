"""flash-attn-4 `mask_mod` functions (CuTe DSL): imported only where flash-attn-4 is installed (`fa4.py`).

Written as FA4's own tests write theirs (`tests/cute/mask_mod_definitions.py`, e.g. `cute_document_mask`):
module-level `@cute.jit` functions of (batch, head, q_idx, kv_idx, seqlen_info, aux_tensors) TensorSSAs,
reading aux tensors at `[batch[0], idx[0]]`, returning a boolean TensorSSA (True = attend).
"""
import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils


@cute.jit
def key_not_padded(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """Attend key `kv_idx` unless `aux_tensors[0][batch, kv_idx]` (int32 `[B, n_k_blocks * block_k]`) is nonzero."""
    padded = aux_tensors[0]
    flag = utils.scalar_to_ssa(padded[batch[0], kv_idx[0]], cutlass.Int32)
    return flag == utils.scalar_to_ssa(0, cutlass.Int32)
