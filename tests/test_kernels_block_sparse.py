"""The Triton block-sparse flash-attention kernel against the exact PyTorch reference.

Oracle: dense attention with an explicit token mask built from the block lists (an N x N matrix,
allowed in tests only), in float64. The PyTorch reference must match it to float64 rounding.
Tolerance for the kernel (flash-attention style): the same dense attention run at the inputs'
low precision (scores and probabilities rounded to the dtype, as a flash kernel rounds them)
is compared to the float64 oracle, and the kernel's max error may be at most 2x that error plus
the rounding of the exact result to the dtype. The bound follows the dtype instead of a magic
constant; a wrong block, mask or tail gives errors of order 1, far above it.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1), which Triton reads when
a kernel is decorated, i.e. at import: those cases run in a fresh subprocess with the variable
set (this file run as a script). The interpreter's `tl.dot` multiplies bfloat16 as raw 16-bit
integers (triton 3.7 runtime/interpreter.py create_dot), so bfloat16 is checked on GPU only.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from interpreter import run_interpreter
from kernel_checks import (
    assert_bounded,
    bounded_error,
    dense_block_oracle,
    nan_poisoned_allocations,
    poison_cuda_allocator,
    rounding_error,
)
from zoo.ops import block_mask_to_indices, block_sparse_attention, block_sparse_backend, block_sparse_layout
from zoo.ops.block_sparse.naive import block_sparse_attention_reference

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _random_lists(batch, heads, n_q, n_k, block_q, block_k, density, gen, device):
    """Random per-head key-block lists with an empty row, -1 holes in the middle and unsorted order."""
    n_qb, n_kb = math.ceil(n_q / block_q), math.ceil(n_k / block_k)
    mask = torch.rand(batch, heads, n_qb, n_kb, generator=gen) < density
    mask[..., -1] |= torch.rand(batch, heads, n_qb, generator=gen) < 0.5  # the partial tail block often
    mask[0, 0, 0] = False  # a query block with no keys: output 0, lse -inf
    idx = block_mask_to_indices(mask).long()
    idx = torch.cat([idx, torch.full_like(idx[..., :1], -1)], -1)  # padding in the middle after shuffling
    perm = torch.argsort(torch.rand(idx.shape, generator=gen), dim=-1)
    return idx.gather(-1, perm).to(device)


def check_case(dtype, batch, heads, n_q, n_k, dim, block_q, block_k, density, seed, device, kernel=True,
               token_major=False, padding=None, fused=False, tma=None, backend=None):
    """Run one case; return a dict of errors and bounds (asserted by `assert_case`).

    token_major: q, k, v are `[B, N, H, D]` tensors seen as `[B, H, N, D]` (permuted, dense).
    fused: q, k, v are views of one `[B, N, 3, H, D]` projection (with gaps: dq/dk/dv cannot take their
    strides; the kernels write gradients with their own buffers' strides).
    tma: None, or forward-config entries (e.g. `{"BLOCK_N": 16}`) that run the
    forward through the TMA kernel (`TMA=True` added); kernel=True only.
    padding: None, or a key_padding_mask of shape "batch" `[B, N_k]` or "shared" `[1, N_k]`: random
    padded keys, key block 0 wholly padded (query blocks listing only it become empty rows), and the
    keys of block 1 all valid (a mask-free block among padded ones).
    backend: with kernel=False, the public op's backend ("fa4", ...); None: the one the dispatcher picks among
    triton and reference."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    if fused:
        qkv = torch.randn(batch, n_q, 3, heads, dim, generator=gen).to(device, dt)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    elif token_major:
        q, k, v = (torch.randn(batch, n, heads, dim, generator=gen).to(device, dt).transpose(1, 2)
                   for n in (n_q, n_k, n_k))
    else:
        q, k, v = (torch.randn(batch, heads, n, dim, generator=gen).to(device, dt) for n in (n_q, n_k, n_k))
    do = torch.randn(batch, heads, n_q, dim, generator=gen).to(device, dt)
    dlse = torch.randn(batch, heads, n_q, generator=gen).to(device)
    idx = _random_lists(batch, heads, n_q, n_k, block_q, block_k, density, gen, device)
    scale = dim**-0.5
    kpm = None
    if padding is not None:
        kpm = torch.rand(batch if padding == "batch" else 1, n_k, generator=gen) < 0.3
        kpm[:, :block_k] = True
        kpm[:, block_k:2 * block_k] = False
        kpm = kpm.to(device)

    def run(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out, lse = fn(*leaves)
        finite = torch.isfinite(lse)
        loss = (out.double() * do.double()).sum() + (torch.where(finite, lse, 0).double() * dlse.double()).sum()
        return [out, lse, *torch.autograd.grad(loss, leaves)]

    config = None
    if kernel:  # the kernel itself (interpreter)
        from zoo.ops.block_sparse.kernel import block_sparse_attention_triton, default_config

        if tma is not None:
            config = default_config(block_q, block_k, dim)
            config["fwd"].update(tma, TMA=True)
        layout = block_sparse_layout(n_q, n_k, block_indices=idx, block_size=(block_q, block_k))
        fast = run(lambda a, b, c: block_sparse_attention_triton(a, b, c, layout, scale, config,
                                                                 key_padding_mask=kpm), [q, k, v])
    else:  # the public dispatcher (GPU, or CPU with the interpreter and KERNEL_DEVICES widened)
        dispatched = backend or block_sparse_backend(q, k, v, block_q, block_k, candidates=("triton", "reference"))[0]
        fast = run(lambda a, b, c: block_sparse_attention(a, b, c, block_indices=idx, block_size=(block_q, block_k),
                                                          scale=scale, return_lse=True, key_padding_mask=kpm,
                                                          backend=dispatched),
                   [q, k, v])
    exact64 = [q.double(), k.double(), v.double()]
    exact = run(lambda a, b, c: dense_block_oracle(a, b, c, idx, block_q, block_k, scale, True, kpm), exact64)
    low = run(lambda a, b, c: dense_block_oracle(a, b, c, idx, block_q, block_k, scale, False, kpm), [q, k, v])
    ref = run(lambda a, b, c: block_sparse_attention_reference(
        a, b, c, block_indices=idx, block_size=(block_q, block_k), scale=scale, return_lse=True,
        key_padding_mask=kpm), exact64)
    result = {"reference_vs_oracle": max(((r - e).nan_to_num(posinf=0, neginf=0)).abs().max().item()
                                         for r, e in zip(ref, exact))}
    for name, f, lo, ex in zip(("out", "lse", "dq", "dk", "dv"), fast, low, exact):
        if name == "lse":  # -inf rows must match exactly; compare the finite ones
            result["lse_inf_match"] = bool(torch.equal(torch.isinf(f), torch.isinf(ex)))
            keep = torch.isfinite(ex)
            result[name] = bounded_error(f[keep], lo[keep], ex[keep], 1e-6 * ex[keep].abs().max().item())
        else:
            result[name] = bounded_error(f, lo, ex, rounding_error(ex, dt))
    result["empty_row_zero"] = bool((fast[0][0, 0, :block_q] == 0).all())
    if tma is not None:  # the TMA kernel ran (not the pointer fallback); its output equals the pointer kernel's
        from zoo.ops.block_sparse.kernel import forward, tma_strides_ok

        result["tma_ran"] = tma_strides_ok(q, k, v)
        kpm8 = None if kpm is None else kpm.to(torch.uint8).contiguous()
        pointer_cfg = dict(config, fwd={key: val for key, val in config["fwd"].items()
                                        if key not in ("TMA", "WARP_SPECIALIZE")})
        o_ptr, lse_ptr = forward(q, k, v, layout.indices, layout.counts, block_q, block_k, scale, pointer_cfg, kpm8)
        result["tma_vs_pointer"] = {"out": (fast[0].double() - o_ptr.double()).abs().max().item(),
                                    "lse": (fast[1] - lse_ptr).nan_to_num(posinf=0, neginf=0).abs().max().item()}
    result["backend"] = "triton" if kernel else dispatched
    return result


def assert_case(result, label, backend="triton"):
    assert result["backend"] == backend, f"{label}: the dispatcher chose {result['backend']}"
    assert result["reference_vs_oracle"] < 1e-9, f"{label}: reference disagrees with the dense oracle {result}"
    assert result["lse_inf_match"], f"{label}: rows with no keys must have lse -inf (and only those)"
    assert result["empty_row_zero"], f"{label}: a query block with no keys must give zeros"
    assert_bounded(result, label, ("out", "lse", "dq", "dk", "dv"))
    if "tma_ran" in result:
        assert result["tma_ran"], f"{label}: the TMA config fell back to the pointer kernel"
        for name in ("out", "lse"):  # same tiles and order of operations: at most the kernel-vs-oracle bound apart
            assert result["tma_vs_pointer"][name] <= result[name]["bound"], f"{label}: TMA != pointer {name} {result}"


# ------------------------------------------------------------------ CPU, Triton interpreter
# (dtype, batch, heads, n_q, n_k, dim, block_q, block_k, density, seed[, options]): odd lengths with
# partial tail blocks, every head_dim, blocks of 16/32/64/128 and multiples of 16 larger than a tile (48, 80),
# q/k lengths that differ, 1-row tails, strided inputs (dense and fused-qkv views with gaps), key padding masks (per batch and shared).
INTERPRETER_GROUPS = [
    [
        ("float16", 1, 2, 150, 150, 32, 64, 64, 0.6, 1),
        ("float16", 2, 1, 193, 129, 64, 64, 128, 0.7, 2),
    ],
    [
        ("float16", 1, 1, 129, 257, 128, 128, 64, 0.6, 3),
        ("float16", 1, 2, 257, 200, 32, 128, 128, 0.8, 4, {"token_major": True}),
    ],
    [
        ("float16", 2, 1, 75, 83, 32, 16, 16, 0.4, 5, {"padding": "batch"}),
        ("float16", 1, 2, 70, 97, 64, 32, 16, 0.5, 6, {"padding": "shared"}),
    ],
    [
        ("float16", 1, 1, 101, 130, 128, 48, 32, 0.6, 7, {"padding": "shared", "token_major": True}),
        ("float16", 2, 1, 161, 170, 32, 80, 80, 0.6, 8, {"padding": "batch"}),
        ("float16", 1, 2, 100, 100, 64, 16, 32, 0.5, 9, {"fused": True}),
        ("float16", 2, 1, 90, 77, 32, 32, 16, 0.5, 10, {"padding": "batch", "kernel": False}),  # via the dispatcher
    ],
    [  # the TMA forward (descriptors zero-fill past N): one tile per block and several (a 1-key tail tile),
        # token-major and fused-qkv (gapped) inputs, key padding
        ("float16", 2, 1, 150, 133, 32, 64, 64, 0.6, 11, {"tma": {}}),
        ("float16", 1, 2, 97, 129, 64, 32, 64, 0.6, 12, {"tma": {"BLOCK_N": 16}, "token_major": True}),
        ("float16", 2, 1, 83, 75, 32, 16, 16, 0.5, 13, {"tma": {}, "padding": "batch"}),
        ("float16", 1, 1, 90, 90, 64, 32, 32, 0.5, 14, {"tma": {}, "padding": "shared", "fused": True}),
    ],
]


def check_transpose(seed: int) -> bool:
    """The one-launch Triton transpose of key lists equals `layout.transpose_lists` (unsorted lists with -1 holes,
    lists shared by heads, more query blocks than one scan chunk)."""
    from zoo.ops.block_sparse import kernel as bsk
    from zoo.ops.block_sparse.layout import sort_lists, transpose_lists

    gen = torch.Generator().manual_seed(seed)
    same = True
    for lead, n_qb, n_kb in (((2, 1), 150, 37), ((1, 3), 20, 200)):
        idx = _random_lists(*lead, n_qb * 16, n_kb * 16, 16, 16, 0.2, gen, "cpu")
        for lists in (idx, sort_lists(idx)[0]):  # raw (counts = full width) and sorted (counts = valid entries)
            counts = (torch.full(lists.shape[:-1], lists.shape[-1]) if lists is idx else sort_lists(idx)[1])
            got = bsk.launch_transpose(lists, counts, n_kb)
            want = transpose_lists(lists, n_kb)
            same &= all(torch.equal(g.long(), w.long()) for g, w in zip(got, want))
    return same


def test_transpose_lists_kernel_interpreter():
    assert run_interpreter(__file__, [["transpose", 0]]) == [True]


@pytest.mark.parametrize("group", range(len(INTERPRETER_GROUPS)))
def test_kernel_matches_reference_interpreter(group):
    cases = INTERPRETER_GROUPS[group]
    for case, result in zip(cases, run_interpreter(__file__, cases)):
        assert_case(result, str(case))


def test_backend_choice_names_reason():
    q = torch.randn(1, 1, 8, 32)
    backend, reason = block_sparse_backend(q, q, q, 64, 64)
    assert backend == "reference" and "cpu" in reason
    out = block_sparse_attention(q, q, q, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=64)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))


def test_layout_matches_lists_and_checks():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen) for n in (70, 90, 90))
    idx = _random_lists(1, 2, 70, 90, 64, 64, 0.7, gen, "cpu")
    layout = block_sparse_layout(70, 90, block_indices=idx, block_size=64)
    expect = block_sparse_attention(q, k, v, block_indices=idx, block_size=64)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout=layout), expect, rtol=0, atol=0)
    assert layout.counts.tolist() == (idx >= 0).sum(-1).tolist()
    t_mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)  # key block -> query blocks that list it
    for h in range(2):
        for qb in range(2):
            for kb in idx[0, h, qb][idx[0, h, qb] >= 0].tolist():
                t_mask[0, h, kb, qb] = True
    assert layout.t_counts.tolist() == t_mask.sum(-1).tolist()
    with pytest.raises(ValueError, match="seq lens"):
        block_sparse_attention(q[:, :, :60], k, v, layout=layout)
    with pytest.raises(ValueError, match="layout alone"):
        block_sparse_attention(q, k, v, block_indices=idx, layout=layout)
    with pytest.raises(ValueError, match="twice"):
        block_sparse_layout(70, 90, block_indices=torch.tensor([[[[0, 0], [1, -1]]]]), block_size=64)
    with pytest.raises(ValueError, match="key block 2"):
        block_sparse_layout(70, 90, block_indices=torch.tensor([[[[2, -1], [1, -1]]]]), block_size=64)


@pytest.mark.parametrize("dim,blocks,window", [(32, (16, 16), None), (128, (1408, 1408), None),
                                               (32, (16, 16), (2, 2, True, True)), (32, (64, 64), (8, 8, False, False)),
                                               (64, (64, 64), (6, 7, True, False))])
def test_kernels_compile_for_hopper_without_gpu(dim, blocks, window):
    """The interpreter runs the kernels as Python; this lowers them to an sm_90 cubin (no GPU needed), so a
    construct the compiler rejects (the runtime branch on padded tiles, small tiles, region windows) fails on
    CPU too. `window`: (region_h, region_w, masked, packed) of routing attention's in-place region windows."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoo.ops.block_sparse import kernel as bsk
    from zoo.ops.routing.kernel import packed_config

    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "IDX": "*i64", "CNT": "*i64", "TIDX": "*i32", "TCNT": "*i32",
                "KPM": "*u8", "TPAD": "*u8", **dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"), "*bf16")}
    packed = window is not None and window[3]
    config = packed_config(blocks[0], dim) if packed else bsk.default_config(*blocks, dim)
    geometry = dict(WINDOW=False, WINDOW_MASK=False, REGION_H=1, REGION_W=1, PACK=False) if window is None else dict(
        WINDOW=True, WINDOW_MASK=window[2], REGION_H=window[0], REGION_W=window[1], PACK=packed)
    for fn, key in ((bsk._fwd_kernel, "fwd"), (bsk._bwd_dq_kernel, "dq"), (bsk._bwd_dkdv_kernel, "dkdv")):
        cfg = dict(config[key])
        cfg.pop("TMA", None)  # which forward kernel runs (this test compiles the pointer one; the TMA one below)
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        partial = "Q_PARTIAL" if key == "dkdv" else "K_PARTIAL"
        constants = dict(BLOCK_Q=blocks[0], BLOCK_K=blocks[1], HEAD_DIM=dim, HAS_KPM=window is None,
                         **{partial: window is None}, **geometry, **cfg)
        constexprs = {name for name, p in zip(fn.arg_names, fn.params) if p.is_constexpr}
        assert constexprs == set(constants), constexprs ^ set(constants)  # every constexpr given, no runtime flag
        signature = {name: "constexpr" if name in constants else pointers.get(name, "fp32" if "scale" in name else "i32")
                     for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        assert "cubin" in compiled.asm and compiled.metadata.shared <= 227 * 1024, (key, compiled.metadata.shared)


def test_tma_needs_aligned_strides_else_pointer_kernel():
    """TMA descriptors need 16-byte aligned bases and batch/head/row strides: otherwise `forward` runs the
    pointer kernel (the same results), so a config with TMA=True accepts any input the pointer kernel does."""
    from zoo.ops.block_sparse.kernel import tma_strides_ok

    x = torch.randn(2, 3, 40, 64, dtype=torch.float16)
    assert tma_strides_ok(x, x.transpose(1, 2).contiguous().transpose(1, 2))  # contiguous and token-major
    flat = torch.randn(2 * 3 * 40 * 64 + 1, dtype=torch.float16)
    shifted = flat[1:].view(2, 3, 40, 64)  # base 2 bytes past an aligned address
    assert not tma_strides_ok(x, shifted)
    rows = torch.randn(2, 3, 40, 68, dtype=torch.float16)[..., :64]  # row stride 136 bytes
    assert not tma_strides_ok(rows)
    assert tma_strides_ok(torch.randn(1, 1, 40, 72, dtype=torch.float16)[..., :64])  # 144 bytes: aligned


def test_tma_kernel_compiles_for_hopper_without_gpu():
    """The TMA forward lowers to an sm_90 cubin that copies tiles with the tensor-copy engine
    (`cp.async.bulk.tensor`), within the shared memory of an H100, at its default setting."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoo.ops.block_sparse import kernel as bsk

    fn = bsk._fwd_kernel_tma
    pointers = {"LSE": "*fp32", "IDX": "*i32", "CNT": "*i32", "KPM": "*u8", "TPAD": "*u8",
                **dict.fromkeys("QKVO", "*bf16")}
    cfg = dict(bsk.default_config(128, 128, 128)["fwd"])
    assert cfg.pop("TMA")  # the default for head_dim 128 with 128 x 128 tiles
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    constants = dict(BLOCK_Q=128, BLOCK_K=128, HEAD_DIM=128, K_PARTIAL=True, HAS_KPM=True, **cfg)
    signature = {name: "constexpr" if name in constants else pointers.get(name, "fp32" if "scale" in name else "i32")
                 for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)
    assert "cp.async.bulk.tensor" in compiled.asm["ptx"] and compiled.metadata.shared <= 227 * 1024


# ------------------------------------------------------------------ GPU, real sizes
def needs_cuda(test):
    """`pytest -m gpu` selects it; skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("blocks", [(128, 128), (64, 64), (128, 64)])
def test_kernel_matches_reference_gpu(dtype, dim, blocks):
    poison_cuda_allocator()
    result = check_case(dtype, 2, 3, 4099, 4099, dim, *blocks, 0.4, dim + blocks[1], "cuda", kernel=False,
                        token_major=blocks == (128, 64))
    assert_case(result, f"{dtype} d{dim} {blocks}")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (64, 64), (384, 1408)])
def test_kernel_small_blocks_and_key_padding_gpu(dtype, dim, blocks):
    """Routing attention's shapes: blocks of 16/32, whole regions larger than a tile, padded keys."""
    poison_cuda_allocator()
    result = check_case(dtype, 2, 3, 3001, 3001, dim, *blocks, 0.3, dim + blocks[0], "cuda", kernel=False,
                        padding="batch" if blocks[0] != 64 else "shared")
    assert_case(result, f"{dtype} d{dim} {blocks} padded")


@needs_cuda
@pytest.mark.gpu
def test_backend_choice_gpu():
    q = torch.randn(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    assert block_sparse_backend(q, q, q, 128, 128, backend="triton") == ("triton", "")
    backend, reason = block_sparse_backend(q.float(), q.float(), q.float(), 128, 128)
    assert backend == "reference" and "float32" in reason
    backend, reason = block_sparse_backend(q, q, q, 24, 128)
    assert backend == "reference" and "block_size" in reason
    assert block_sparse_backend(q, q, q, 16, 1408)[0] == "triton"  # flash-attn-4 (if installed) refuses 16


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dim", [64, 128])
def test_tma_forward_gpu(dtype, dim):
    """The TMA forward against the oracle and the pointer forward, odd lengths, token-major inputs; and with a
    key padding mask."""
    tma = {}
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA descriptors need a Hopper GPU (older GPUs run them as pointer loads)")
    poison_cuda_allocator()
    result = check_case(dtype, 2, 3, 4099, 4001, dim, 128, 128, 0.4, dim, "cuda", token_major=True, tma=tma)
    assert_case(result, f"{dtype} d{dim} tma {tma}")
    result = check_case(dtype, 2, 3, 3001, 3001, dim, 64, 64, 0.3, dim + 1, "cuda", padding="batch", tma=tma)
    assert_case(result, f"{dtype} d{dim} tma {tma} padded")


@needs_cuda
def test_autocast_float32_queries_run_the_kernel():
    """Under CUDA autocast (fp32 q/k out of norms, bf16 v) the call takes the kernel, in bf16."""
    q, k = torch.randn(2, 1, 2, 256, 64, device="cuda").unbind(0)
    v = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = block_sparse_attention(q, k, v, block_mask=mask, block_size=128)
    assert out.dtype == torch.bfloat16
    ref = torch.nn.functional.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(), v.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_fused_qkv_views_gradients_gpu():
    """The video DiT's layout: q, k contiguous (after RoPE), v a strided view of the qkv projection."""
    torch.manual_seed(0)
    b, n, heads, d = 4, 4096, 3, 64
    qkv = torch.randn(b, n, 3 * heads * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (t.reshape(b, n, heads, d).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    q, k = q.contiguous(), k.contiguous()
    mask = torch.rand(1, 1, n // 64, n // 64, device="cuda") < 0.5
    mask |= torch.eye(n // 64, dtype=torch.bool, device="cuda")
    out = block_sparse_attention(q, k, v, block_mask=mask, block_size=64)
    ref = block_sparse_attention_reference(*(t.float() for t in (q, k, v)), block_mask=mask, block_size=64)
    grad = torch.randn_like(out)
    (g_kernel,) = torch.autograd.grad(out, qkv, grad)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad.float())
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(g_kernel.float(), g_ref.float(), atol=5e-2, rtol=5e-2)


if __name__ == "__main__":  # interpreter subprocess: run the cases given as JSON, print the results as JSON
    import zoo.ops.block_sparse as block_sparse

    block_sparse.KERNEL_DEVICES = ("cuda", "cpu")  # kernel=False cases: the public dispatcher takes the kernel
    cases = json.loads(sys.argv[1])  # an 11th entry: options (token_major, padding, kernel); or ["transpose", seed]
    with nan_poisoned_allocations():  # an unwritten tile of any buffer reads NaN
        print(json.dumps([check_transpose(case[1]) if case[0] == "transpose" else
                          check_case(*case[:10], device="cpu", **(case[10] if case[10:] else {})) for case in cases]))
