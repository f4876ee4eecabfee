"""The Triton neighborhood-attention kernels against the exact PyTorch reference.

Oracle: dense attention over all tokens with an explicit N x N mask and bias built from the reference's
own per-axis window tables (`axis_neighbors`; allowed in tests only), in float64, gradients by the softmax
backward formulas; the reference (`neighborhood_attention`, autograd) must match it, outputs and gradients,
to float64 rounding. Tolerance for the kernel, as in tests/test_kernels_block_sparse.py: the same dense
attention run at the inputs' low precision the way a flash kernel rounds (`dense_attention(exact=False)`:
float32 scores, probabilities and dS rounded to the dtype before their matmuls, delta from the rounded
output) is compared to the float64 oracle, and the kernel's max error may be at most 2x that error plus the
rounding of the exact result to the output dtype. A wrong window, mask, bias entry or tail gives errors of
order 1.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, read at import): those cases run in a
fresh subprocess (this file as a script). The interpreter multiplies bfloat16 as raw integers in `tl.dot`
(see tests/test_kernels_block_sparse.py), so bfloat16 is checked on GPU only.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys

import pytest
import torch
from interpreter import run_interpreter
from kernel_checks import assert_bounded, bounded_error, nan_poisoned_allocations, poison_cuda_allocator, rounding_error
from zoo.ops import na1d, na2d, na3d, na_backend
from zoo.ops.na import fa4 as na_fa4
from zoo.ops.na.naive import axis_neighbors, neighborhood_attention, normalize_args

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
OPS = {1: na1d, 2: na2d, 3: na3d}
NAMES = ("out", "lse", "dq", "dk", "dv", "drpb", "dek", "dev")


def dense_geometry(spatial, kernel, dilation, stride, causal, device):
    """(mask [N, N] bool, rpb offset [N, N] long) of N-d neighborhood attention, from the reference's tables."""
    mask, offset = None, None
    for length, k, d, s, c in zip(spatial, kernel, dilation, stride, causal):
        keys, rel, valid = axis_neighbors(length, k, d, s, c, device)
        rows = torch.arange(length, device=device)[:, None].expand_as(keys)[valid]
        axis_mask = torch.zeros(length, length, dtype=torch.bool, device=device)
        axis_mask[rows, keys[valid]] = True
        axis_rel = torch.zeros(length, length, dtype=torch.long, device=device)
        axis_rel[rows, keys[valid]] = rel[valid]
        if mask is None:
            mask, offset = axis_mask, axis_rel
        else:
            n = mask.shape[0]
            mask = (mask[:, None, :, None] & axis_mask[None, :, None, :]).reshape(n * length, n * length)
            offset = (offset[:, None, :, None] * (2 * k - 1) + axis_rel[None, :, None, :]).reshape(n * length,
                                                                                                     n * length)
    return mask, offset


def _head_scores(q, k, rpb, ek, geometry, scale, h, work):
    """Scaled, biased, masked scores `[B, N, N (+ extra)]` of query head h (heads-last inputs)."""
    mask, offset = geometry
    batch, n, heads, dim = q.shape[0], mask.shape[0], q.shape[-2], q.shape[-1]
    hk = h // (heads // k.shape[-2])
    qh = q.reshape(batch, n, heads, dim)[:, :, h].to(work)
    scores = (qh @ k.reshape(batch, n, -1, dim)[:, :, hk].to(work).transpose(-1, -2)) * scale
    if rpb is not None:
        scores = scores + rpb[h].reshape(-1).to(work)[offset]
    scores = scores.masked_fill(~mask, float("-inf"))
    if ek is not None:
        scores = torch.cat([scores, (qh @ ek[:, :, hk].to(work).transpose(-1, -2)) * scale], -1)
    return scores


def _head_values(v, ev, n, h, heads, work):
    hk = h // (heads // v.shape[-2])
    vh = v.reshape(v.shape[0], n, -1, v.shape[-1])[:, :, hk].to(work)
    return vh if ev is None else torch.cat([vh, ev[:, :, hk].to(work)], 1)


def dense_attention(q, k, v, rpb, ek, ev, geometry, scale, d_out, d_lse, exact):
    """[out, lse, dq, dk, dv, drpb, d extra_k, d extra_v] of dense masked attention, gradients by the softmax
    backward formulas (dS = P * (dO V^T - rowsum(dO * O) + dlse)), one head at a time (no autograd graph:
    real sizes fit on a GPU).
    exact=True: the float64 oracle. exact=False: as a flash kernel computes, in float32 with its roundings to
    the inputs' dtype (P before P @ V and P^T dO, dS before dS K and dS^T Q, delta from the rounded output O):
    the low-precision yardstick of the bounds."""
    batch, *spatial, heads, dim = q.shape
    n = math.prod(spatial)
    f32 = torch.float64 if exact else torch.float32  # the working precision
    dt = f32 if exact else q.dtype  # what the flash kernel rounds to
    group = heads // k.shape[-2]
    outs, lses, dqs = [], [], []
    dk, dv = torch.zeros(k.shape, dtype=f32, device=q.device), torch.zeros(v.shape, dtype=f32, device=q.device)
    dk, dv = dk.reshape(batch, n, -1, dim), dv.reshape(batch, n, -1, v.shape[-1])
    drpb = None if rpb is None else torch.zeros(rpb.shape[0], rpb[0].numel(), dtype=f32, device=q.device)
    dek = None if ek is None else torch.zeros(ek.shape, dtype=f32, device=q.device)
    dev = None if ev is None else torch.zeros(ev.shape, dtype=f32, device=q.device)
    offset = geometry[1]
    for h in range(heads):
        hk = h // group
        qh = q.reshape(batch, n, heads, dim)[:, :, h].to(f32)
        kh = k.reshape(batch, n, -1, dim)[:, :, hk].to(f32)
        scores = _head_scores(q, k, rpb, ek, geometry, scale, h, f32)
        values = _head_values(v, ev, n, h, heads, f32)
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - lse[..., None])
        p_low = probs.to(dt).to(f32)
        out = (p_low @ values).to(dt)
        do = d_out.reshape(batch, n, heads, -1)[:, :, h].to(f32)
        delta = (do * out.to(f32)).sum(-1) - d_lse.reshape(batch, n, heads)[:, :, h].to(f32)
        ds = probs * (do @ values.transpose(-1, -2) - delta[..., None])
        ds_low = ds.to(dt).to(f32)
        keys = kh if ek is None else torch.cat([kh, ek[:, :, hk].to(f32)], 1)
        dqs.append((ds_low @ keys) * scale)
        dk_all = (ds_low.transpose(-1, -2) @ qh) * scale
        dv_all = p_low.transpose(-1, -2) @ do
        dk[:, :, hk] += dk_all[:, :n]
        dv[:, :, hk] += dv_all[:, :n]
        if ek is not None:
            dek[:, :, hk] += dk_all[:, n:]
            dev[:, :, hk] += dv_all[:, n:]
        if rpb is not None:
            drpb[h].index_add_(0, offset.reshape(-1), ds[:, :, :n].sum(0).reshape(-1))
        outs.append(out)
        lses.append(lse)
    return [torch.stack(outs, 2).reshape(batch, *spatial, heads, -1), torch.stack(lses, 2).reshape(d_lse.shape),
            torch.stack(dqs, 2).reshape(q.shape).to(dt), dk.reshape(k.shape).to(dt), dv.reshape(v.shape).to(dt),
            None if rpb is None else drpb.reshape(rpb.shape), None if ek is None else dek.to(dt),
            None if ev is None else dev.to(dt)]


@contextlib.contextmanager
def small_tiles(tile):
    """Run the kernels with `tile` (3-D) query and key tiles instead of `default_config`'s (None: unchanged)."""
    if tile is None:
        yield
        return
    import zoo.ops.na.kernel as na_kernel

    original = na_kernel.default_config
    tiles = {name: dict(TQ=tuple(tile), TK=tuple(tile), num_warps=4, num_stages=1) for name in ("fwd", "dq", "dkdv")}
    na_kernel.default_config = lambda *_: dict(tiles, extra=dict(BLOCK_M=16, BLOCK_E=16, num_warps=4))
    try:
        yield
    finally:
        na_kernel.default_config = original


def check_case(dtype, spatial, heads, heads_kv, dim, kernel_size, dilation, stride, causal, batch, n_extra, rpb,
               seed, device, options=None):
    """Run one case through `na{1,2,3}d` (backend='triton'); return errors and bounds (see `assert_case`).

    options: {"tiles": (t0, t1, t2)} small tiles, {"dim_v": n} v's head_dim, {"fused": True} (q, k, v
    strided views of one qkv tensor), {"backend": name} another backend, {"frozen_rpb": True} rpb without grad."""
    options = options or {}
    backend_asked = options.get("backend", "triton")
    train_rpb = rpb and not options.get("frozen_rpb")
    na_dim = len(spatial)
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    kernel, dil, strd, caus = normalize_args(na_dim, kernel_size, dilation, stride, causal)
    dim_v = options.get("dim_v", dim)
    if options.get("fused"):
        qkv = torch.randn(batch, *spatial, 3, heads, dim, generator=gen).to(device, dt)
        q, k, v = qkv.unbind(-3)
    else:
        q = torch.randn(batch, *spatial, heads, dim, generator=gen).to(device, dt)
        k = torch.randn(batch, *spatial, heads_kv, dim, generator=gen).to(device, dt)
        v = torch.randn(batch, *spatial, heads_kv, dim_v, generator=gen).to(device, dt)
    bias = torch.randn(heads, *(2 * kk - 1 for kk in kernel), generator=gen).to(device) if rpb else None
    ek, ev = ((torch.randn(batch, n_extra, k.shape[-2], d, generator=gen).to(device, dt) for d in (dim, dim_v))
              if n_extra else (None, None))
    inputs = [t for t in (q, k, v, bias, ek, ev) if t is not None]
    d_out = torch.randn(batch, *spatial, heads, dim_v, generator=gen).to(device, dt)
    d_lse = torch.randn(batch, *spatial, heads, generator=gen).to(device)
    scale = dim ** -0.5

    def run(fn, tensors):
        leaves = [t.detach().requires_grad_(i != 3 or not rpb or bool(train_rpb)) for i, t in enumerate(tensors)]
        it = iter(leaves[3:])
        b = next(it) if rpb else None
        e_k, e_v = (next(it), next(it)) if n_extra else (None, None)
        out, lse = fn(*leaves[:3], b, e_k, e_v)
        loss = (out.double() * d_out.double()).sum() + (lse.double() * d_lse.double()).sum()
        grads = iter(torch.autograd.grad(loss, [t for t in leaves if t.requires_grad]))
        return [out, lse, next(grads), next(grads), next(grads), next(grads) if train_rpb else None,
                *((next(grads), next(grads)) if n_extra else (None, None))]

    args = dict(kernel_size=kernel, dilation=dil, stride=strd, is_causal=caus, scale=scale)
    # triton: the choice of backend='auto'; another backend: that it accepts the call
    backend = na_backend(q, k, v, kernel, dil, strd, caus, None if bias is None else bias.detach().requires_grad_(bool(train_rpb)),
                         ek, ev, backend="auto" if backend_asked == "triton" else backend_asked)[0]
    with small_tiles(options.get("tiles")):
        fast = run(lambda a, b, c, r, e, f: OPS[na_dim](a, b, c, rpb=r, additional_keys=e, additional_values=f,
                                                        return_lse=True, backend=backend_asked, **args), inputs)
    geometry = dense_geometry(spatial, kernel, dil, strd, caus, device)
    exact64 = [t.double() for t in inputs]
    exact = dense_attention(q, k, v, bias, ek, ev, geometry, scale, d_out, d_lse, exact=True)
    low = dense_attention(q, k, v, bias, ek, ev, geometry, scale, d_out, d_lse, exact=False)
    ref = run(lambda a, b, c, r, e, f: neighborhood_attention(a, b, c, na_dim, rpb=r, additional_keys=e,
                                                              additional_values=f, return_lse=True, **args), exact64)
    result = {"backend": backend, "reference_vs_oracle": max((r - e).abs().max().item()
                                                             for r, e in zip(ref, exact) if r is not None)}
    for name, f, lo, ex in zip(NAMES, fast, low, exact):
        if f is None:
            continue
        out_dtype = torch.float32 if name in ("lse", "drpb") else dt
        rounding = 1e-6 * ex.abs().max().item() if name == "lse" else rounding_error(ex, out_dtype)
        result[name] = bounded_error(f, lo, ex, rounding)
    return result


def assert_case(result, label, backend="triton"):
    assert result["backend"] == backend, f"{label}: the dispatcher chose {result['backend']}"
    assert result["reference_vs_oracle"] < 1e-9, f"{label}: reference disagrees with the dense oracle {result}"
    assert_bounded(result, label, tuple(name for name in NAMES if name in result))


# ------------------------------------------------------------------ CPU, Triton interpreter
# (dtype, spatial, heads, heads_kv, dim, kernel, dilation, stride, causal, batch, n_extra, rpb, seed[, options]):
# sizes not multiples of the tiles, dilation groups of unequal length, even kernels, per-axis causal, stride,
# GQA/MQA, extra keys, batch 1 and odd, 1-D/2-D/3-D; small tiles walk several key/query tiles, and with kernels
# larger than two tiles the mask-free whole-tile steps run too.
INTERPRETER_GROUPS = [
    [
        ("float16", (12, 11), 1, 1, 16, (9, 8), 1, 1, False, 1, 0, True, 0, {"tiles": (1, 4, 4)}),
        ("float16", (7, 9), 2, 1, 16, (4, 5), 1, 1, (True, False), 3, 5, True, 1),
    ],
    [
        ("float16", (12, 11), 2, 1, 32, (4, 3), (1, 2), (2, 3), False, 1, 0, True, 2),
        ("float16", (37,), 2, 2, 16, 5, 3, 2, True, 2, 3, True, 3, {"dim_v": 32}),
        ("float16", (90,), 1, 1, 16, 40, 1, 1, False, 1, 0, True, 6, {"tiles": (1, 1, 16)}),
    ],
    [
        ("float16", (5, 6, 7), 3, 1, 16, (2, 3, 3), (1, 2, 1), 1, (False, True, False), 1, 0, True, 4),
        ("float16", (9, 10), 2, 2, 32, 5, (1, 2), (3, 1), (False, True), 1, 4, False, 5, {"fused": True}),
    ],
]


@pytest.mark.parametrize("group", range(len(INTERPRETER_GROUPS)))
def test_kernel_matches_reference_interpreter(group):
    cases = [list(c) for c in INTERPRETER_GROUPS[group]]
    for case, result in zip(cases, run_interpreter(__file__, cases)):
        assert_case(result, str(case))


def test_backend_choice_names_reason():
    q = torch.randn(1, 8, 8, 2, 32)
    assert na_backend(q, q, q, 3) == ("reference", f"fa4: {na_fa4.NOT_IN_AUTO}; "
                                      "triton: tensors are on cpu (the Triton kernel runs on CUDA)")
    assert na_backend(q, q, q, 3, backend="reference")[0] == "reference"
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        na2d(q, q, q, 3, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        na2d(q, q, q, 3, backend="natten")


@pytest.mark.parametrize("na_dim,dim,flags", [(2, 32, (True, True)), (3, 128, (False, False))])
def test_kernels_compile_for_hopper_without_gpu(na_dim, dim, flags):
    """The interpreter runs the kernels as Python; this lowers them (default tiles) to an sm_90 cubin without a
    GPU, so a construct the compiler rejects fails on CPU too. flags: (HAS_RPB, HAS_EXTRA)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoo.ops.na import kernel as nak

    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "RPB": "*fp32", "DRPB": "*fp32", "TAB": "*i32",
                **dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "EK", "EV", "DEK", "DEV"), "*bf16")}
    config = nak.default_config(na_dim, dim)
    for fn, key, extra in ((nak._na_query_kernel, "fwd", dict(BACKWARD=False, HAS_EXTRA=flags[1])),
                           (nak._na_query_kernel, "dq", dict(BACKWARD=True, HAS_EXTRA=flags[1])),
                           (nak._na_key_kernel, "dkdv", {}), (nak._extra_kv_kernel, "extra", None)):
        cfg = dict(config[key])
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages", 2)}
        if extra is None:
            constants = dict(cfg, HEAD_DIM=dim, HEAD_DIM_V=dim)
        else:
            tq, tk = cfg.pop("TQ"), cfg.pop("TK")
            constants = dict(TQ0=tq[0], TQ1=tq[1], TQ2=tq[2], TK0=tk[0], TK1=tk[1], TK2=tk[2], HEAD_DIM=dim,
                             HEAD_DIM_V=dim, HAS_RPB=flags[0], NA_DIM=na_dim, **extra)
        constexprs = {name for name, p in zip(fn.arg_names, fn.params) if p.is_constexpr}
        assert constexprs == set(constants), constexprs ^ set(constants)
        signature = {name: "constexpr" if name in constants else pointers.get(
            name, "fp32" if "scale" in name else "i32") for name in fn.arg_names}
        compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        assert "cubin" in compiled.asm and compiled.metadata.shared <= 227 * 1024, (key, compiled.metadata.shared)


# ------------------------------------------------------------------ GPU, real sizes
def needs_cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


GPU_CASES = {  # (spatial, heads, heads_kv, dim, kernel, dilation, stride, causal, batch, n_extra, rpb)
    "nat_t_stage1": ((56, 56), 2, 2, 32, 7, 1, 1, False, 8, 0, True),
    "dinat_t_stage1_dil8": ((56, 56), 2, 2, 32, 7, 8, 1, False, 4, 0, True),
    "na2d_128_k7": ((128, 128), 8, 8, 64, 7, 1, 1, False, 1, 0, False),
    "na2d_128_k13": ((128, 128), 8, 8, 64, 13, 1, 1, False, 1, 0, True),
    "na3d_8x16x16": ((8, 16, 16), 4, 4, 128, (3, 7, 7), 1, 1, False, 1, 0, False),
    "na3d_causal_gqa_extra": ((8, 16, 16), 8, 2, 128, (3, 7, 7), (1, 2, 1), (1, 2, 2), (True, False, False),
                              1, 77, True),
    "na1d_even_stride": ((1000,), 4, 4, 64, 16, 3, 4, False, 3, 0, True),
}


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_kernel_matches_reference_gpu(dtype, name):
    poison_cuda_allocator()
    result = check_case(dtype, *GPU_CASES[name], seed=len(name), device="cuda")
    assert_case(result, f"{name} {dtype}")


@needs_cuda
def test_autocast_float32_inputs_run_the_kernel():
    """Under CUDA autocast float32 q/k/v (out of norms) take the kernel in bf16; rpb stays float32."""
    q, k, v = torch.randn(3, 2, 20, 24, 2, 32, device="cuda").unbind(0)
    rpb = torch.randn(2, 13, 13, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert na_backend(*(t.bfloat16() for t in (q, k, v)), 7, rpb=rpb)[0] == "triton"
        out = na2d(q, k, v, 7, rpb=rpb)
    assert out.dtype == torch.bfloat16
    ref = neighborhood_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), 2, 7, rpb=rpb)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert rpb.grad is not None and rpb.grad.dtype == torch.float32


@needs_cuda
def test_torch_compile_no_graph_break():
    q, k, v = torch.randn(3, 2, 20, 24, 2, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True).unbind(0)
    rpb = torch.randn(2, 13, 13, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda a, b, c, r: na2d(a, b, c, 7, rpb=r), fullgraph=True)
    out = compiled(q, k, v, rpb)
    torch.testing.assert_close(out, na2d(q, k, v, 7, rpb=rpb))
    out.float().sum().backward()


@needs_cuda
@pytest.mark.parametrize("name", ["nat_mini", "dinat_mini"])
def test_models_take_the_kernel_gpu(name, monkeypatch):
    """NAT/DiNAT under bf16 autocast run the kernel without model changes (forward and backward) and match the
    same model on the reference (the test turns the kernel off through the dispatcher's device list)."""
    import zoo.ops.na as na

    import zoo

    torch.manual_seed(0)
    model = zoo.create_model(name).cuda().eval()  # eval: no dropout / drop-path, the two runs compare
    x = torch.randn(4, 3, 224, 224, device="cuda")
    calls = []
    original = na._select
    monkeypatch.setattr(na, "_select", lambda *a: calls.append(original(*a)) or calls[-1])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = model(x)
    fast.float().sum().backward()
    assert {c[0] for c in calls} == {"triton"}, calls
    monkeypatch.setattr(na, "KERNEL_DEVICES", ())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x)
    assert calls[-1][0] == "reference"
    torch.testing.assert_close(fast.float(), ref.float(), atol=5e-2, rtol=5e-2)


if __name__ == "__main__":  # interpreter subprocess: run the cases given as JSON, print the results as JSON
    import zoo.ops.na as na

    na.KERNEL_DEVICES = ("cuda", "cpu")
    cases = json.loads(sys.argv[1])
    results = []
    with nan_poisoned_allocations():  # an unwritten tile of any buffer reads NaN
        for case in cases:
            options = case[13] if case[13:] else None
            case = [tuple(c) if isinstance(c, list) else c for c in case[:13]]
            results.append(check_case(*case, device="cpu", options=options))
    print(json.dumps(results))
