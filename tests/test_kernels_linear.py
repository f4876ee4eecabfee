"""The fused Triton linear-attention kernel (`zoo.ops.linear.kernel`) against the exact PyTorch references.

One kernel serves five ops: `linear_attention`, `decoupled_linear_attention`, `injective_linear_attention`
(InLine), `mala_attention` (MAViT) and `rala_attention` (RAVLT). Oracle: each op's reference in float64 on
the same (low-precision) inputs. Tolerance: the reference itself run on those inputs (float32 inside, the
result and the gradients rounded to the inputs' dtype) is compared to the oracle, and the kernel's max error
may be at most 2x that error plus the rounding of the exact result to the dtype; a wrong term, weight or
stride gives errors of order 1, far above it.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, read at import) in a fresh subprocess
(this file run as a script), float16 only: the interpreter's `tl.dot` mishandles bfloat16 (see
test_kernels_block_sparse.py). bfloat16 and real sizes are the GPU tests.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from interpreter import run_interpreter
from zoo.ops.linear import naive as linear_naive
from zoo.ops.linear_rmt import naive as rmt_naive

from zoo import ops

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# op name -> (public op, reference, whether it takes numerator features)
OPS = {
    "linear": (ops.linear_attention, linear_naive.linear_attention, False),
    "decoupled": (lambda q, k, v, qn, kn, **kw: ops.decoupled_linear_attention(q, k, qn, kn, v, **kw),
                  lambda q, k, v, qn, kn: linear_naive.decoupled_linear_attention(q, k, qn, kn, v), True),
    "injective": (ops.injective_linear_attention, linear_naive.injective_linear_attention, False),
    "mala": (ops.mala_attention, rmt_naive.mala_attention, False),
    "mala_rope": (ops.mala_attention, rmt_naive.mala_attention, True),
    "rala": (ops.rala_attention, rmt_naive.rala_attention, False),
    "rala_rope": (ops.rala_attention, rmt_naive.rala_attention, True),
}
# RoPE made inside the kernel from q, k and the (signed_sin, cos) tables (`rope=`): op name -> the OPS entry
FUSED_ROPE = {"mala_rope_fused": "mala", "rala_rope_fused": "rala"}


def rope_tables(n: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (signed_sin, cos) `[n, dim]` of random angles, one per channel pair (`naive.rope`'s layout)."""
    theta = (torch.rand(n, dim // 2, generator=gen, dtype=torch.float64) * 6).repeat_interleave(2, -1)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(dim // 2)
    return theta.sin() * sign, theta.cos()


def _make(shape, layout, gen, device, dtype, positive, scale=1.0, shift=0.0):
    """A `[B, H, N, D]` tensor stored as `layout`: "bhnd" (contiguous), "bnhd" (token-major, a head split of a
    projection) or "bhdn" (channel-major, a 1x1 conv's output as MAViT/RAVLT split it); (x + shift) * scale."""
    b, h, n, d = shape
    order = {"bhnd": (b, h, n, d), "bnhd": (b, n, h, d), "bhdn": (b, h, d, n)}[layout]
    x = torch.rand(order, generator=gen) + 0.05 if positive else torch.randn(order, generator=gen)
    x = ((x + shift) * scale).to(device, dtype)
    return {"bhnd": x, "bnhd": x.transpose(1, 2), "bhdn": x.transpose(2, 3)}[layout]


def check_case(op, dtype, batch, heads, n_q, n_k, dim, dim_v, seed, device, layout="bhnd", programs=None,
               scales=(1.0, 1.0, 1.0), v_shift=0.0, grad_scale=1.0):
    """Outputs and gradients of the op through the kernel, the reference at the dtype, and the float64 oracle.
    programs: the kernel's TARGET_PROGRAMS for this case (few: each program reduces several tiles).
    scales: of q (and q_num), k (and k_num), v; v_shift: added to v before scaling (a mean that K^T V keeps);
    grad_scale: of the output gradient.
    The result's "state_max" is the largest entry of the kernel's float32 state |K_num^T V / N| (RALA: weighted)."""
    if programs is not None:
        from zoo.ops.linear import kernel

        kernel.TARGET_PROGRAMS = programs
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    fused, reference, numerator = OPS[FUSED_ROPE.get(op, op)]
    tables = rope_tables(n_q, dim, gen) if op in FUSED_ROPE else None
    s_q, s_k, s_v = scales
    q = _make((batch, heads, n_q, dim), layout, gen, device, dt, True, s_q)
    k = _make((batch, heads, n_k, dim), layout, gen, device, dt, True, s_k)
    v = _make((batch, heads, n_k, dim_v), layout, gen, device, dt, False, s_v, v_shift)
    inputs = [q, k, v]
    if numerator:  # RoPE'd features: any sign
        inputs += [_make((batch, heads, n_q, dim), layout, gen, device, dt, False, s_q),
                   _make((batch, heads, n_k, dim), layout, gen, device, dt, False, s_k)]
    do = (torch.randn(batch, heads, n_q, dim_v, generator=gen) * grad_scale).to(device, dt)

    def run(fn, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves)
        return [out, *torch.autograd.grad((out.double() * do.double()).sum(), leaves)]

    if tables is None:
        fast = run(lambda *t: fused(*t, backend="triton"), inputs)
        exact = run(reference, [t.double() for t in inputs])
        low = run(reference, inputs)
    else:  # the kernel rounds RoPE's features to the inputs' dtype, as RoPE outside and a cast: so does `low`
        fast = run(lambda *t: fused(*t, backend="triton", rope=tuple(x.float().to(device) for x in tables)), inputs)
        exact = run(lambda q, k, v: reference(q, k, v, rmt_naive.rope(q, *tables), rmt_naive.rope(k, *tables)),
                    [t.double() for t in inputs])
        low_tables = [x.float().to(device) for x in tables]
        low = run(lambda q, k, v: reference(q, k, v, rmt_naive.rope(q, *low_tables).to(dt),
                                            rmt_naive.rope(k, *low_tables).to(dt)), inputs)
    names = ["out", "dq", "dk", "dv", "dq_num", "dk_num"]
    k_num = (inputs[4] if numerator else k).double()
    if tables is not None:
        k_num = rmt_naive.rope(k_num, *tables)
    if op.startswith("rala"):  # the kernel's state is weighted by RALA's key weights
        weights = torch.softmax(dim ** -0.5 * q.double().mean(2, keepdim=True) @ k.double().transpose(-1, -2), -1)
        state = (k_num * weights.transpose(-1, -2)).transpose(-1, -2) @ v.double()
    else:
        state = k_num.transpose(-1, -2) @ v.double() / n_k
    result = {"backend": ops.linear_attention_backend(q, k, v)[0], "dtype": str(fast[0].dtype),
              "state_max": state.abs().max().item()}
    for name, f, lo, ex in zip(names, fast, low, exact):
        f, lo = f.double(), lo.double()
        rounding = (ex.to(dt).double() - ex).abs().max().item()
        result[name] = {"kernel": (f - ex).abs().max().item(), "low_precision": (lo - ex).abs().max().item(),
                        "bound": 2 * (lo - ex).abs().max().item() + rounding, "nan": bool(torch.isnan(f).any()),
                        "scale": ex.abs().max().item()}
    return result


def check_compile(op: str) -> dict:
    """The kernel path under `torch.compile(fullgraph=True)` (the custom ops' fake and autograd registrations):
    outputs and gradients against the same kernel run eagerly."""
    import torch._dynamo

    gen = torch.Generator().manual_seed(0)
    fused, _, numerator = OPS[FUSED_ROPE.get(op, op)]
    shapes = [(1, 2, 70, 16)] * (5 if numerator else 3)
    inputs = [torch.rand(s, generator=gen).half() + 0.05 for s in shapes]
    extra = {"rope": tuple(t.float() for t in rope_tables(70, 16, gen))} if op in FUSED_ROPE else {}
    do = torch.randn(1, 2, 70, 16, generator=gen).half()

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, do)]

    def call(*t):
        return fused(*t, backend="triton", **extra)

    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = run(torch.compile(call, fullgraph=True, backend="aot_eager"))
    eager = run(call)
    return {"max_diff": max((c.double() - e.double()).abs().max().item() for c, e in zip(compiled, eager)),
            "graphs": counters["stats"]["unique_graphs"]}


def assert_case(result, label):
    assert result["backend"] == "triton", f"{label}: the dispatcher chose {result['backend']}"
    for name, r in result.items():
        if isinstance(r, dict):
            assert not r["nan"], f"{label}: NaN in {name}"
            assert r["kernel"] <= r["bound"], f"{label}: {name} error {r['kernel']:.3g} > bound {r['bound']:.3g} {r}"


# (op, dtype, batch, heads, n_q, n_k, dim, dim_v, seed[, options]): tails shorter than a tile, more keys than
# one tile and one split, n_q != n_k, head dims that are not powers of two (padded), strided layouts, and
# few programs (several tiles reduced per program, a partial last split)
INTERPRETER_GROUPS = [
    [("linear", "float16", 2, 2, 77, 77, 32, 32, 1), ("linear", "float16", 1, 3, 130, 200, 16, 24, 2, {"layout": "bnhd"})],
    [("decoupled", "float16", 1, 2, 70, 90, 32, 32, 3, {"layout": "bnhd"}),
     ("injective", "float16", 2, 1, 129, 129, 32, 16, 4)],
    [("injective", "float16", 1, 2, 65, 100, 24, 32, 5, {"layout": "bnhd"}), ("mala", "float16", 2, 1, 96, 96, 64, 64, 6)],
    [("mala_rope", "float16", 1, 2, 81, 81, 32, 32, 7, {"layout": "bhdn"}), ("rala", "float16", 1, 2, 100, 70, 32, 32, 8)],
    [("rala_rope", "float16", 2, 1, 81, 81, 16, 16, 9, {"layout": "bhdn"}),
     ("mala", "float16", 1, 2, 300, 330, 16, 16, 10, {"programs": 4}),
     ("rala_rope", "float16", 1, 1, 200, 270, 16, 16, 11, {"programs": 2, "layout": "bnhd"})],
    [("mala_rope_fused", "float16", 1, 2, 81, 81, 32, 32, 16, {"layout": "bhdn"}),
     ("rala_rope_fused", "float16", 2, 1, 150, 150, 16, 24, 17, {"programs": 2})],
]


# float16 states beyond float16's range (|kv| > 65504, outputs and gradients within it) and below its normal range
# (|kv| ~ 1e-6): the float32 state is split into float16 hi + lo parts, which must neither overflow nor underflow
LARGE, TINY = {"scales": (1.0, 400.0, 400.0), "v_shift": 2.0}, {"scales": (1.0, 1e-3, 1e-3), "v_shift": 2.0}
STATE_RANGE_CASES = [("linear", "float16", 1, 2, 100, 130, 16, 16, 12, LARGE),
                     ("rala_rope", "float16", 1, 2, 90, 70, 16, 16, 13, dict(LARGE, layout="bhdn")),
                     ("mala", "float16", 1, 1, 70, 70, 16, 16, 14, dict(LARGE, grad_scale=0.02)),
                     ("decoupled", "float16", 1, 2, 80, 80, 16, 16, 15, TINY)]


def test_float16_state_beyond_float16_range_interpreter():
    """The float16 split of the float32 state keeps its range: no inf from a state above 65504, no precision
    lost to subnormals below 6e-5; outputs and gradients within the usual bound of the float64 oracle."""
    for case, result in zip(STATE_RANGE_CASES, run_interpreter(__file__, STATE_RANGE_CASES)):
        options = case[9]
        if options["scales"][1] > 1:
            assert result["state_max"] > 65504 * 2, (case, result["state_max"])  # the case tests what it says
        else:
            assert result["state_max"] < 6e-5, (case, result["state_max"])
        assert_case(result, str(case))


def test_kernel_path_compiles_fullgraph_interpreter():
    """Every op's kernel path traces into one graph (no break) and runs its kernels forward and backward."""
    names = ["linear", "decoupled", "injective", "mala_rope", "rala", "rala_rope_fused"]
    for name, result in zip(names, run_interpreter(__file__, [["compile", n] for n in names])):
        assert result["graphs"] == 1 and result["max_diff"] <= 1e-3, (name, result)


# tiny configurations of every family's model (the attention ops as in the released ones)
SWIN_TINY = dict(img_size=64, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=10)
RMT_TINY = dict(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), num_classes=10)
TINY_MODELS = {
    "agent_swin_tiny": SWIN_TINY, "flatten_swin_tiny": SWIN_TINY, "inline_swin_tiny": SWIN_TINY,
    "agent_deit_tiny": dict(img_size=64, embed_dim=32, depth=2, num_heads=2, num_classes=10, agent_num=4),
    "mavit_tiny": dict(RMT_TINY, attn_kinds=("mala",) * 4), "ravlt_tiny": RMT_TINY,
}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_family_compiles_fullgraph(name):
    """torch.compile(fullgraph=True) traces each linear/agent family without a graph break and matches eager
    (Dynamo only: on CPU the ops take their references; the kernel path's tracing is the interpreter test above)."""
    import zoo

    torch.manual_seed(0)
    model = zoo.create_model(name, **TINY_MODELS[name]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))


@pytest.mark.parametrize("group", range(len(INTERPRETER_GROUPS)))
def test_kernel_matches_reference_interpreter(group):
    cases = INTERPRETER_GROUPS[group]
    for case, result in zip(cases, run_interpreter(__file__, cases)):
        assert_case(result, str(case))


def test_backend_choice_names_reason():
    q = torch.rand(1, 2, 8, 32)
    backend, reason = ops.linear_attention_backend(q, q, q)
    assert backend == "reference" and "cpu" in reason
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        ops.linear_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        ops.mala_attention(q, q, q, backend="fast")
    assert ops.linear_attention_backend(q, q, q, backend="reference") == ("reference", "asked for (backend='reference')")


@pytest.mark.parametrize("op", [ops.mala_attention, ops.rala_attention])
def test_rope_tables_mean_rope_of_q_and_k(op):
    """`rope=(signed_sin, cos)` is q_num = RoPE(q), k_num = RoPE(k) (reference path, float64, with gradients);
    bad tables get one-line errors."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.rand(2, 2, 12, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, 12, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    tables = rope_tables(12, 8, gen)
    fused, explicit = op(q, k, v, rope=tables), op(q, k, v, rmt_naive.rope(q, *tables), rmt_naive.rope(k, *tables))
    torch.testing.assert_close(fused, explicit, rtol=0, atol=0)
    g = torch.randn(fused.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(fused, (q, k, v), g), torch.autograd.grad(explicit, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="either rope"):
        op(q, k, v, q, k, rope=tables)
    with pytest.raises(ValueError, match=r"rope's cos must be a floating \[seq_len, head_dim\]"):
        op(q, k, v, rope=(tables[0], tables[1][:5]))
    with pytest.raises(ValueError, match="one length"):
        op(q, k[:, :, :6], v[:, :, :6], rope=tables)
    with pytest.raises(ValueError, match="rope's signed_sin requires grad"):
        op(q, k, v, rope=(tables[0].clone().requires_grad_(), tables[1]))


def test_kernels_compile_for_hopper_without_gpu():
    """The interpreter runs the kernels as Python; this lowers every kernel (each mode, decoupled and weighted,
    head dim 32 and 128; bfloat16, and float16 with its range fitting, at head dim 32) to an sm_90 cubin, so a
    construct the compiler rejects fails on CPU too."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoo.ops.linear import kernel as lk

    floats = ("scale", "eps", "inv_n")  # every other scalar is an int (strides, sizes)
    for dim, dtype in ((32, "bf16"), (128, "bf16"), (32, "fp16")):
        pointers = {name: f"*{dtype}" for name in ("K", "KN", "V", "Q", "QN", "OUT", "DO", "DQ", "DQN", "DK", "DKN",
                                                   "DV_")}
        pointers.update({name: "*fp32" for name in ("W", "KV", "KS", "VS", "DKV", "DKS", "DVS", "DW")})
        pointers.update(SIN="*fp32", COS="*fp32")
        for fn, flags in ((lk._state_kernel, dict(DECOUPLED=True, WEIGHTED=True, ROPE=False)),
                          (lk._state_kernel, dict(DECOUPLED=False, WEIGHTED=True, ROPE=True)),
                          (lk._query_kernel, dict(DECOUPLED=True, MODE=2, ROPE=False)),
                          (lk._query_kernel, dict(DECOUPLED=False, MODE=2, ROPE=True)),
                          (lk._query_grad_kernel, dict(DECOUPLED=False, MODE=1, ROPE=False)),
                          (lk._query_grad_kernel, dict(DECOUPLED=True, MODE=2, ROPE=False)),
                          (lk._query_grad_kernel, dict(DECOUPLED=False, MODE=0, ROPE=True)),
                          (lk._key_grad_kernel, dict(DECOUPLED=True, WEIGHTED=True, ROPE=False)),
                          (lk._key_grad_kernel, dict(DECOUPLED=False, WEIGHTED=True, ROPE=True))):
            constants = dict(D=dim, DV=dim, BD=dim, BDV=dim, BLOCK=lk.BLOCK_N, **flags)
            signature = {name: "constexpr" if name in constants else pointers.get(name, "fp32" if name in floats
                                                                                   else "i32")
                         for name in fn.arg_names}
            compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": lk._warps(dim, dim)})
            assert "cubin" in compiled.asm, fn


# ------------------------------------------------------------------ GPU, real sizes
def needs_cuda(test):
    """`pytest -m gpu` selects it; skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("op,dim,layout", [("linear", 32, "bnhd"), ("decoupled", 64, "bhnd"), ("injective", 32, "bnhd"),
                                           ("injective", 128, "bhnd"), ("mala_rope", 64, "bhdn"), ("mala", 32, "bhnd"),
                                           ("rala_rope", 64, "bhdn"), ("rala", 128, "bnhd"),
                                           ("mala_rope_fused", 64, "bhdn"), ("rala_rope_fused", 32, "bnhd")])
def test_kernel_matches_reference_gpu(dtype, op, dim, layout):
    """Swin stage-1 sizes (3136 tokens), MAViT's head dim 64, and 128; NaN-poisoned allocator: unwritten = NaN."""
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))
    result = check_case(op, dtype, 32, 3, 3136, 3136, dim, dim, dim, "cuda", layout)  # 96 (b, h): 5 tiles a program
    assert_case(result, f"{op} {dtype} d{dim} {layout}")


@needs_cuda
def test_backend_choice_gpu():
    q = torch.rand(1, 2, 64, 32, device="cuda", dtype=torch.bfloat16)
    assert ops.linear_attention_backend(q, q, q) == ("triton", "fused Triton kernel")
    backend, reason = ops.linear_attention_backend(q.float(), q.float(), q.float())
    assert backend == "reference" and "float32" in reason
    wide = torch.rand(1, 2, 64, 256, device="cuda", dtype=torch.bfloat16)
    backend, reason = ops.linear_attention_backend(wide, wide, wide)
    assert backend == "reference" and "head_dim" in reason
    with pytest.raises(ValueError, match="head_dim"):
        ops.injective_linear_attention(wide, wide, wide, backend="triton")
    a = q[:, :, :9]
    assert ops.agent_attention_backend(q, q, q, a)[0] == "sdpa"


@needs_cuda
def test_autocast_float32_inputs_run_the_kernel():
    """Under CUDA autocast float32 features (RoPE in float32, as MAViT) run the kernel in bfloat16."""
    q, k, v = (torch.rand(2, 2, 500, 64, device="cuda") for _ in range(3))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert ops.linear_attention_backend(q, k, v)[0] == "triton"
        out = ops.mala_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = rmt_naive.mala_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("name", ["agent_swin_tiny", "flatten_swin_tiny", "inline_swin_tiny", "agent_deit_small",
                                  "mavit_tiny", "ravlt_tiny", "flatten_pvt_tiny", "inline_cswin_tiny"])
def test_models_with_kernels_match_references_gpu(name, monkeypatch):
    """Released architectures at 224 under bf16 autocast: logits and input gradients with the dispatched kernels
    (Triton linear attention, SDPA agent path) are within 2x the references' own bf16 error (both against the
    float32 model) plus 1e-3 of the logits' scale."""
    import zoo.ops.agent as agent_ops
    import zoo.ops.linear as linear_ops

    import zoo

    torch.manual_seed(0)
    model = zoo.create_model(name).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")

    def run(autocast: bool):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(leaf).float()
        (grad,) = torch.autograd.grad(out.square().sum(), leaf)
        return out, grad

    fused = run(True)
    monkeypatch.setattr(linear_ops, "KERNEL_DEVICES", ())
    monkeypatch.setattr(agent_ops, "SDPA_DEVICES", ())
    reference = run(True)
    exact = run(False)  # the references in float32
    for label, f, r, e in zip(("logits", "input grad"), fused, reference, exact):
        bound = 2 * (r - e).abs().max().item() + 1e-3 * e.abs().max().item()
        assert (f - e).abs().max().item() <= bound, f"{name} {label}: {(f - e).abs().max().item():.3g} > {bound:.3g}"


if __name__ == "__main__":  # interpreter subprocess: run the cases given as JSON, print the results as JSON
    import zoo.ops.linear as linear

    linear.KERNEL_DEVICES = ("cuda", "cpu")
    cases = json.loads(sys.argv[1])
    print(json.dumps([check_compile(case[1]) if case[0] == "compile" else
                      check_case(*case[:9], device="cpu", **(case[9] if case[9:] else {}))
                      for case in cases]))
