"""zoo.ops: every attention the zoo uses, as a small functional API.

One folder per op (`ops/<op>/`), one contract:

- `__init__.py`: the public functions (what `zoo.ops.<op>` exports), their argument checks and the backend
  dispatch; where a kernel exists, `<op>_backend(...)` returns (the backend a call runs on, why the ones
  tried before it cannot), `backend="auto"` takes the first that runs, a named backend that cannot run the
  call raises ValueError with the reason. Kernel modules are imported through `_kernels.py` (`usable_kernel`,
  `kernel_module`), so Triton is never a hard requirement.
- `naive.py`: the exact PyTorch reference (any device and dtype, autograd): the oracle the kernels are tested
  against and the fallback of the dispatch, with the argument checks it shares with the kernel path (so both
  refuse the same inputs); never a dispatch.
- `kernel.py`: the Triton kernel and its launchers (`can_run(...)` says which inputs it takes); other backends
  are named after themselves (`fa4.py` for flash-attn-4, `flex.py` for FlexAttention).
- other modules say what they hold: pieces both paths share (`block_sparse/layout.py`, `routing/regions.py`,
  `radial/mask.py`), modules (`sla/module.py`), policies (`radial/policy.py`).

An op imports another op through its public names (`from ..block_sparse import block_sparse_attention`); a
kernel may call another op's kernel by that kernel's public names (routing attention runs the block-sparse
kernel over its regions), a reference another op's reference.

Shared helpers, one place each:
- `_checks.py`: `SEQUENCE_LAYOUT`, `check_qkv` (sequence q/k/v), `check_tensor`, `check_same`, `check_scale`,
  `block_size_pair` / `positive_int_pair`, `autocast_cast` (q, k, v in the autocast dtype, as SDPA),
  `empty_output`, `check_allocation`;
- `_cost.py`: FLOP counting (`counting_flops`, `cost_placeholder`) and `block_mask_pairs`;
- `_kernels.py`: importing an op's kernel module without requiring Triton;
- `_flash.py`: Triton flash-attention pieces the kernels share (online softmax step, normalisation, row delta).

Tensor layouts (two, each the convention of the ops' upstream code):
- sequence ops (dense, block-sparse, radial, SLA, linear, agent, RMT): `[batch, heads, seq_len, head_dim]`,
  as `F.scaled_dot_product_attention`; k/v may have another seq_len, v another head_dim where the op allows.
- spatial ops take heads-last maps `[batch, *grid, heads, head_dim]`: neighborhood attention
  (`na1d/na2d/na3d`, NATTEN's convention, `grid` of 1-3 axes) and bi-level routing attention
  (`[batch, height, width, heads, head_dim]`, BiFormer's), which read windows of the map in place.
Outputs keep their inputs' layout.
"""
from ._cost import counting_flops, is_counting_flops
from .agent import agent_attention, agent_attention_backend, agent_grid, build_agent_biases, pool_agents
from .block_sparse import (
    BlockSparseLayout,
    block_indices_to_mask,
    block_mask_to_indices,
    block_sparse_attention,
    block_sparse_backend,
    block_sparse_layout,
)
from .dense import dense_attention, dense_attention_backend
from .linear import (
    decoupled_linear_attention,
    focused_feature_map,
    injective_linear_attention,
    linear_attention,
    linear_attention_backend,
)
from .linear_rmt import mala_attention, rala_attention
from .na import na1d, na2d, na3d, na_backend, na_legacy_pad
from .radial import SparsityPolicy, radial_attention, radial_block_mask
from .routing import bi_level_routing_attention, bi_level_routing_backend, bra_routing
from .sla import SparseLinearAttention, sla_backend, sla_block_map, sparse_linear_attention

__all__ = [
    "agent_attention",
    "agent_attention_backend",
    "pool_agents",
    "agent_grid",
    "build_agent_biases",
    "linear_attention",
    "decoupled_linear_attention",
    "focused_feature_map",
    "injective_linear_attention",
    "linear_attention_backend",
    "block_sparse_attention",
    "block_sparse_backend",
    "dense_attention",
    "dense_attention_backend",
    "block_sparse_layout",
    "BlockSparseLayout",
    "block_mask_to_indices",
    "block_indices_to_mask",
    "bi_level_routing_attention",
    "bra_routing",
    "bi_level_routing_backend",
    "mala_attention",
    "rala_attention",
    "radial_block_mask",
    "radial_attention",
    "SparsityPolicy",
    "sparse_linear_attention",
    "sla_block_map",
    "sla_backend",
    "SparseLinearAttention",
    "counting_flops",
    "na1d",
    "na2d",
    "na3d",
    "na_backend",
    "na_legacy_pad",
    "is_counting_flops",
]
