"""What every kernel test checks the same way: the low-precision error bound and NaN-poisoned allocations.

Bound (flash-attention style): an oracle run at the inputs' low precision (its products rounded as a kernel
rounds them) is compared to the float64 oracle; the kernel's max error may be at most 2x that error plus the
rounding of the exact result to the output dtype. The bound follows the dtype instead of a magic constant; a
wrong block, mask or tail gives errors of order 1, far above it.

Poisoning: memory a kernel allocates but never writes must not pass for a result. On the GPU the caching
allocator's free blocks are filled with NaN before a case (`poison_cuda_allocator`); under the CPU interpreter
`nan_poisoned_allocations` makes `torch.empty` / `torch.empty_like` / `Tensor.new_empty` return NaN-filled
floating tensors, so an unwritten tile of an output, gradient or scratch buffer shows up as NaN.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def bounded_error(fast: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, rounding: float) -> dict:
    """Max errors against the float64 `exact` of the kernel (`fast`) and the low-precision oracle (`low`), the
    bound 2 x low + `rounding` (the rounding of `exact` to the output dtype), and whether `fast` holds a NaN."""
    fast, low = fast.double(), low.double()
    low_error = (low - exact).abs().max().item() if exact.numel() else 0.0
    return {"kernel": (fast - exact).abs().max().item() if exact.numel() else 0.0, "low_precision": low_error,
            "bound": 2 * low_error + rounding, "nan": bool(torch.isnan(fast).any())}


def rounding_error(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Max error of rounding the float64 `exact` to `dtype`."""
    return (exact.to(dtype).double() - exact).abs().max().item() if exact.numel() else 0.0


def assert_bounded(result: dict, label: str, names: tuple[str, ...]) -> None:
    """Each `result[name]` (from `bounded_error`) has no NaN and a kernel error within its bound."""
    for name in names:
        r = result[name]
        assert not r["nan"], f"{label}: NaN in {name} (an unwritten tile, or a NaN computed) {r}"
        assert r["kernel"] <= r["bound"], f"{label}: {name} error {r['kernel']:.3g} > bound {r['bound']:.3g} {r}"


def poison_cuda_allocator() -> None:
    """Fill 1 GiB of the CUDA caching allocator with NaN and free it: the next allocations reuse it, so a
    kernel output left unwritten reads NaN."""
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))


@contextlib.contextmanager
def nan_poisoned_allocations() -> Iterator[None]:
    """Within the context, floating tensors from `torch.empty`, `torch.empty_like` and `Tensor.new_empty` come
    NaN-filled (for the CPU interpreter subprocess, where no caching allocator hands back old memory)."""
    patched = {(torch, "empty"): torch.empty, (torch, "empty_like"): torch.empty_like,
               (torch.Tensor, "new_empty"): torch.Tensor.new_empty}

    def poisoned(allocate):
        def allocate_nan(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return allocate_nan

    for (owner, name), allocate in patched.items():
        setattr(owner, name, poisoned(allocate))
    try:
        yield
    finally:
        for (owner, name), allocate in patched.items():
            setattr(owner, name, allocate)


def dense_block_oracle(q, k, v, idx, block_q, block_k, scale, upcast, key_padding_mask=None):
    """Dense softmax attention over the key blocks listed in `idx` (`[B|1, H|1, nQb, max_k]`, -1 = none): (out,
    lse). upcast=True in float64, else in the inputs' dtype (scores from the low-precision matmul, probabilities
    rounded to it before P @ V, as a flash kernel rounds them). An N x N matrix: tests only."""
    n_q, n_k = q.shape[2], k.shape[2]
    blocks = torch.zeros(*idx.shape[:-1], math.ceil(n_k / block_k) + 1, dtype=torch.bool, device=idx.device)
    blocks.scatter_(-1, torch.where(idx >= 0, idx, blocks.shape[-1] - 1), True)
    token_mask = blocks[..., :-1].repeat_interleave(block_q, -2).repeat_interleave(block_k, -1)[..., :n_q, :n_k]
    if key_padding_mask is not None:  # [B|1, n_k], True = never attended
        token_mask = token_mask & ~key_padding_mask[:, None, None, :]
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    scores = ((q * scale) @ k.transpose(-1, -2)).to(torch.float64 if upcast else torch.float32)
    scores = scores.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    return probs.to(v.dtype) @ v, lse


SLA_FEATURE_MAPS = {"softmax": lambda x: x.softmax(-1), "elu": lambda x: F.elu(x) + 1, "relu": F.relu}


def dense_sla_oracle(q, k, v, block_map, block_q, block_k, linear_on, feature_map, eps=1e-5, upcast=True):
    """(O_s, O_l) of sparse-linear attention written with N x N element masks from the int8 `block_map` (1
    critical, 0 marginal, -1 negligible): softmax over the critical elements (`dense_block_oracle`), linear
    attention phi(q) phi(k)^T over the linear ones (marginal, or all with linear_on="all"). upcast=True in
    float64; else phi(q), phi(k), their products and P rounded to the inputs' dtype, as the fused kernel's tile
    products round them (float32 sums)."""
    idx = torch.where(block_map == 1, torch.arange(block_map.shape[-1], device=block_map.device), -1)
    o_s, _ = dense_block_oracle(q, k, v, idx, block_q, block_k, q.shape[-1] ** -0.5, upcast)
    n_q, n_k = q.shape[2], k.shape[2]
    expand = block_map.repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)[:, :, :n_q, :n_k]
    linear = torch.ones_like(expand, dtype=torch.bool) if linear_on == "all" else expand == 0
    acc = torch.float64 if upcast else torch.float32
    work = torch.float64 if upcast else q.dtype
    phi = SLA_FEATURE_MAPS[feature_map]
    a = (phi(q.to(acc)).to(work) @ phi(k.to(acc)).to(work).transpose(-1, -2)) * linear
    den = a.to(acc).sum(-1, keepdim=True) + eps
    # a row with no linear key: O_l = 0 and no gradient (an infinite denominator, as the kernel stores it; 1 / eps
    # would overflow float16 in the low-precision backward)
    den = torch.where(linear.any(-1, keepdim=True), den.clamp_min(torch.finfo(acc).tiny), float("inf"))
    o_l = (a @ v.to(work)).to(acc) / den
    return o_s, o_l
