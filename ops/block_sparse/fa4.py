"""flash-attn-4 (FlashAttention's CuTe-DSL kernels) as the Hopper/Blackwell backend of the zoo's attention.

The Triton kernel (`kernel.py`) is register-bound on Hopper (no warp specialisation, no wgmma pipelining);
flash-attn-4 is not, and takes block sparsity natively (`BlockSparseTensorsTorch`): per query block, the
counts and ascending lists of "full" key blocks (no per-element mask) and "partial" ones (a `mask_mod`
decides per element). This module converts a `BlockSparseLayout` into those lists and calls
`flash_attn.cute.interface.flash_attn_func`, whose autograd function runs FA4's forward and backward
(the backward takes the transposed lists: per key block, the query blocks that list it).

Semantics are the zoo's (`naive.py`): a listed key block is visible except keys past the end (FA4 masks the
sequence length on the last entry of each list, the tail block since the lists are ascending) and keys flagged
in `key_padding_mask`: key blocks holding a padded key go to the partial lists and a `mask_mod` reads the
padding (one int32 `[B, n_k_blocks * block_k]` aux tensor); every other listed block is a full block.

Constraints (flash-attn-4 4.0.0b36, `flash_attn/cute/interface.py` and `block_sparsity.py`): the sparse
block sizes must be multiples of the kernel tiles. Key blocks: 128 (SM90 needs block_k == tile_n = 128; SM100
allows multiples, but masks the sequence end only on the last 128-key tile of a coarser block, so 128 here).
Query blocks: SM90 forward tiles are 128 (or 192 / 64) rows and the backward 64-128 rows: a multiple of 128
fits both; SM100 runs two 128-row tiles per CTA (q_stage 2) once seq_len_q > 128: a multiple of 256.
Head dims 64, 96, 128 (FA4 takes 8..256 on SM90, 8..128 on SM100; these are the ones tested here);
float16 / bfloat16. q, k, v are passed as `[B, N, H, D]` views of the zoo's `[B, H, N, D]` (no copy).
"""
from __future__ import annotations

import functools
import importlib.metadata
import math
from types import ModuleType

import torch
import torch.nn.functional as F

from .layout import BlockSparseLayout, block_indices_to_mask, mask_to_lists

FA4_DTYPES = (torch.float16, torch.bfloat16)
FA4_HEAD_DIMS = (64, 96, 128)
FA4_ARCHS = (9, 10)  # compute capability majors: sm90 (Hopper), sm100 (Blackwell)
KEY_TILE = 128  # FA4's tile_n for these head dims on SM90 and SM100: block_k must equal it
QUERY_MULTIPLE = {9: 128, 10: 256}  # block_q multiple per arch (SM100: 128 when seq_len_q <= 128)
INSTALL_HINT = "pip install 'attnzoo[hopper]' (flash-attn-4>=4.0.0b36,<4.1)"
# backend="auto" takes flash-attn-4 only once scripts/check_fa4.py and the GPU tests have passed on a GPU
# (not yet: the lent GPU's time ran out before it was installed); until then it runs when asked for
IN_AUTO = False
NOT_IN_AUTO = "not yet validated on a GPU, so backend='auto' skips it: pass backend='fa4' to use it"


@functools.cache
def fa4_interface() -> ModuleType | str:
    """`flash_attn.cute.interface`, or the reason it cannot be imported (imported once: the CuTe DSL is slow to load)."""
    try:
        from flash_attn.cute import interface
    except Exception as err:  # ImportError, or the CUTLASS DSL failing to load its libraries
        return f"flash-attn-4 is not importable ({type(err).__name__}: {err}); {INSTALL_HINT}"
    return interface


def fa4_version() -> str | None:
    """Installed flash-attn-4 version, None when it is not installed."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other device."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _common_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why FA4 cannot run q, k, v `[B, H, N, D]` at all (device, GPU, install, dtype, head dims), or None."""
    capability = device_capability(q.device)
    if capability is None:
        return f"tensors are on {q.device.type} (flash-attn-4 runs on CUDA)"
    if capability[0] not in FA4_ARCHS:
        return (f"GPU of compute capability {capability[0]}.{capability[1]} "
                "(the zoo runs flash-attn-4 on sm90 Hopper and sm100 Blackwell)")
    module = fa4_interface()
    if isinstance(module, str):
        return module
    if q.dtype not in FA4_DTYPES:
        return f"dtype {q.dtype} (flash-attn-4 takes float16/bfloat16)"
    if q.shape[-1] not in FA4_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head_dim q/k {q.shape[-1]}/{k.shape[-1]}, v {v.shape[-1]} (flash-attn-4 here: equal, in {FA4_HEAD_DIMS})"
    if 0 in q.shape or 0 in k.shape:
        return "empty inputs"
    return None


def fa4_block_reason(major: int, block_q: int, block_k: int, n_q: int) -> str | None:
    """Why FA4 cannot take blocks (block_q, block_k) on a GPU of compute capability `major` for seq_len_q `n_q`."""
    if block_k != KEY_TILE:
        return f"block_size ({block_q}, {block_k}) (flash-attn-4 here: block_k = its key tile {KEY_TILE})"
    multiple = QUERY_MULTIPLE[major] if n_q > 128 else 128
    if block_q % multiple:
        return (f"block_size ({block_q}, {block_k}) (flash-attn-4 on sm{major}0: block_q a multiple of {multiple}"
                f"{', two 128-row tiles per CTA' if multiple == 256 else ''})")
    return None


def can_run_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """None when flash-attn-4 runs this block-sparse call, else the reason it does not."""
    reason = _common_reason(q, k, v)
    if reason is None:
        reason = fa4_block_reason(device_capability(q.device)[0], block_q, block_k, q.shape[2])
    return reason


def can_run_fa4_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when flash-attn-4 runs dense attention on q, k, v `[B, H, N, D]`, else the reason it does not."""
    return _common_reason(q, k, v)


# ----------------------------------------------------------------------------- lists (pure torch)
def _empty_lists(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero counts shaped like `counts` and a one-wide list (FA4 requires the partial lists, even empty)."""
    return torch.zeros_like(counts), torch.zeros(*counts.shape, 1, dtype=torch.int32, device=counts.device)


def padded_key_blocks(key_padding_mask: torch.Tensor, block_k: int) -> torch.Tensor:
    """Bool `[B|1, n_k_blocks]`: the key block holds a padded key (True in `key_padding_mask` `[B|1, N_k]`)."""
    n_k = key_padding_mask.shape[1]
    n_blocks = math.ceil(n_k / block_k)
    padded = F.pad(key_padding_mask, (0, n_blocks * block_k - n_k))
    return padded.view(-1, n_blocks, block_k).any(-1)


def fa4_lists(layout: BlockSparseLayout, key_padding_mask: torch.Tensor | None = None,
              backward: bool = False) -> dict[str, torch.Tensor]:
    """FA4's lists for `layout` (forward: per query block; `backward`: per key block, the query blocks).

    Returns int32 `mask_block_cnt`/`mask_block_idx` (partial blocks) and `full_block_cnt`/`full_block_idx`:
    counts `[B|1, H|1, rows]`, lists `[B|1, H|1, rows, width]` ascending with the valid entries first (FA4
    reads entries 0..count-1). Without padding every listed block is full; with it, a listed pair goes to the
    partial lists iff its key block holds a padded key for that batch. No host sync.
    """
    if key_padding_mask is None:
        full_idx, full_cnt = layout.transposed() if backward else (layout.indices, layout.counts)
        mask_cnt, mask_idx = _empty_lists(full_cnt)
        return dict(mask_block_cnt=mask_cnt, mask_block_idx=mask_idx, full_block_cnt=full_cnt,
                    full_block_idx=full_idx)
    n_k_blocks = math.ceil(layout.n_k / layout.block_k)
    listed = block_indices_to_mask(layout.indices, n_k_blocks)  # [B|1, H|1, nQb, nKb]
    padded = padded_key_blocks(key_padding_mask.to(listed.device), layout.block_k)[:, None, None, :]
    partial, full = listed & padded, listed & ~padded
    if backward:
        partial, full = partial.transpose(-1, -2), full.transpose(-1, -2)
    mask_idx, mask_cnt = mask_to_lists(partial)
    full_idx, full_cnt = mask_to_lists(full)
    return dict(mask_block_cnt=mask_cnt, mask_block_idx=mask_idx, full_block_cnt=full_cnt, full_block_idx=full_idx)


def padding_aux(key_padding_mask: torch.Tensor, batch: int, block_k: int) -> torch.Tensor:
    """int32 `[B, n_k_blocks * block_k]`, 1 = padded key: the mask_mod's aux tensor. Padded to whole key blocks
    (marked padded) so that every index of a listed block reads inside it."""
    n_k = key_padding_mask.shape[1]
    width = math.ceil(n_k / block_k) * block_k
    padded = F.pad(key_padding_mask.to(torch.int32), (0, width - n_k), value=1)
    return padded.expand(batch, width).contiguous()


# ----------------------------------------------------------------------------- FA4 calls
def _sparse_tensors(interface: ModuleType, lists: dict[str, torch.Tensor], block_q: int, block_k: int):
    return interface.BlockSparseTensorsTorch(**lists, block_size=(block_q, block_k))


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def block_sparse_attention_fa4(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out `[B, H, N_q, D]`, float32 lse `[B, H, N_q]`) of block-sparse attention through flash-attn-4.

    Inputs are assumed checked (`zoo.ops.block_sparse_attention` and `can_run_fa4` do it). Differentiable in
    q, k, v and through lse (FA4's autograd function; its backward gets the transposed lists, built here only
    when a gradient is needed).
    """
    interface = fa4_interface()
    if isinstance(interface, str):
        raise RuntimeError(interface)
    block_q, block_k = layout.block_q, layout.block_k
    fwd = _sparse_tensors(interface, fa4_lists(layout, key_padding_mask), block_q, block_k)
    bwd = None
    if _needs_grad(q, k, v):
        bwd = _sparse_tensors(interface, fa4_lists(layout, key_padding_mask, backward=True), block_q, block_k)
    padding = {}
    if key_padding_mask is not None:
        aux = padding_aux(key_padding_mask.to(q.device), q.shape[0], block_k)
        from .fa4_masks import key_not_padded  # CuTe DSL code: imports only where FA4 is installed

        padding = dict(mask_mod=key_not_padded, aux_tensors=[aux])
    with torch.cuda.device(q.device):  # FA4 reads the current device's architecture
        out, lse = interface.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
            block_sparse_tensors=fwd, block_sparse_tensors_bwd=bwd, return_lse=True, **padding)
    return out.transpose(1, 2), lse


def dense_attention_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention through flash-attn-4 on `[B, H, N, D]` tensors (checked by `can_run_fa4_dense`)."""
    interface = fa4_interface()
    if isinstance(interface, str):
        raise RuntimeError(interface)
    with torch.cuda.device(q.device):
        out, _ = interface.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           softmax_scale=scale)
    return out.transpose(1, 2)
