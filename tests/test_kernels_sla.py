"""The fused SLA Triton kernel against a dense float64 oracle, within the low-precision bound.

Oracle: `kernel_checks.dense_sla_oracle`, O_s and O_l of SLA written with N x N element masks (tests only), in
float64; the PyTorch reference (`sparse_linear_attention_reference`) must match it to float64 rounding.
Tolerance as in test_kernels_block_sparse.py: the same oracle run at the inputs' precision (phi(q), phi(k),
the linear scores and the softmax probabilities rounded to the dtype, as the kernel's tile products round them)
sets the bound, 2x its error plus the rounding of the exact result to the dtype, for O_s, O_l and the q, k, v
gradients (upstream gradients on both outputs); a wrong block, mask, tail or correction gives errors of order 1.
Buffers are NaN-poisoned (`kernel_checks`), so a tile the kernel never writes fails the case.

CPU: the kernel runs under the Triton interpreter in a subprocess (TRITON_INTERPRET must be set before triton
is imported, and must not leak into other test modules), fp16 at tiny odd sizes, every head_dim, every variant
and feature map, the backward's row sub-tiles, and one case through the public op (`zoo.ops.sla.KERNEL_DEVICES`
widened to CPU tensors). (Triton 3.7's interpreter multiplies bf16 dot operands wrongly, so bf16 is checked on
the GPU only.) GPU: real sizes, fp16 and bf16, through the public op.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from interpreter import run_interpreter
from kernel_checks import (
    assert_bounded,
    bounded_error,
    dense_sla_oracle,
    nan_poisoned_allocations,
    poison_cuda_allocator,
    rounding_error,
)
from zoo.ops import sla_backend, sla_block_map, sparse_linear_attention

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = ("o_s", "o_l", "dq", "dk", "dv")


def check_sla_case(dtype, batch, heads, n_q, n_k, dim, block_q, block_k, feature_map, linear_on, negligible, topk,
                   seed, device, public=False):
    """Run one case: dict of the errors and bounds of O_s, O_l and dq, dk, dv (asserted by `assert_sla_case`).

    public: through `sparse_linear_attention` (backend "triton") with the identity projection, so its output is
    O_s + O_l; checked as "out" (bound from the low-precision O_s + O_l) instead of O_s and O_l apart."""
    from zoo.ops.sla.kernel import sla_fused
    from zoo.ops.sla.naive import sparse_linear_attention_reference

    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen).to(device, dt) for n in (n_q, n_k, n_k))
    d_s, d_l = (torch.randn(batch, heads, n_q, dim, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    block_map = sla_block_map(q, k, topk, negligible, (block_q, block_k))
    eye = torch.eye(dim, dtype=torch.float64, device=device)
    args = dict(linear_on=linear_on, feature_map=feature_map, block_size=(block_q, block_k), block_map=block_map)

    def run(fn, inputs, upstream):
        leaves = [t.detach().requires_grad_() for t in inputs]
        outs = fn(*leaves)
        loss = sum((o.double() * g).sum() for o, g in zip(outs, upstream))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))

    def oracle(upcast, summed=False):
        def fn(a, b, c):
            o_s, o_l = dense_sla_oracle(a, b, c, block_map, block_q, block_k, linear_on, feature_map, upcast=upcast)
            return (o_s + o_l,) if summed else (o_s, o_l)
        return fn

    exact64 = [q.double(), k.double(), v.double()]
    exact_sum = run(oracle(True, summed=True), exact64, (d_s,))  # O_s + O_l and its gradients for upstream d_s
    ref = run(lambda a, b, c: (sparse_linear_attention_reference(a, b, c, eye, **args),), exact64, (d_s,))
    result = {"reference_vs_oracle": max((r - e).abs().max().item() for r, e in zip(ref, exact_sum))}
    if public:
        backend = sla_backend(q, k, v, (block_q, block_k))
        exact, low = exact_sum, run(oracle(False, summed=True), [q, k, v], (d_s,))
        fast = run(lambda a, b, c: (sparse_linear_attention(a, b, c, eye.to(dt), backend="triton", **args),),
                   [q, k, v], (d_s,))
        names = ("out", "dq", "dk", "dv")
    else:
        backend = ("triton", "fused Triton kernel")
        exact, low = run(oracle(True), exact64, (d_s, d_l)), run(oracle(False), [q, k, v], (d_s, d_l))
        fast = run(lambda a, b, c: sla_fused(a, b, c, block_map, dim**-0.5, feature_map, linear_on, 1e-5,
                                             (block_q, block_k)), [q, k, v], (d_s, d_l))
        names = NAMES
    result["backend"] = list(backend)
    for name, f, lo, ex in zip(names, fast, low, exact):
        result[name] = bounded_error(f, lo, ex, rounding_error(ex, dt))
    return result


def assert_sla_case(result, label):
    assert result["backend"] == ["triton", "fused Triton kernel"], f"{label}: the dispatcher chose {result['backend']}"
    assert result["reference_vs_oracle"] < 1e-9, f"{label}: reference disagrees with the dense oracle {result}"
    assert_bounded(result, label, tuple(name for name in ("out", *NAMES) if name in result))


# ------------------------------------------------------------------ CPU, Triton interpreter
# (dtype, batch, heads, n_q, n_k, head_dim, block_q, block_k, feature_map, linear_on, negligible, topk, seed
# [, public]): every variant and feature map, every head_dim, partial tails on both sides, n_q != n_k, backward
# row sub-tiles (BWD_Q_TILE 16 below block_q 32), rows with every block critical (O_l = 0).
INTERPRETER_CASES = [
    ("float16", 2, 2, 45, 45, 32, 16, 16, "softmax", "marginal", 0.0, 0.34, 1),  # SLA-1 (released default)
    ("float16", 2, 2, 50, 37, 64, 32, 16, "elu", "marginal", 0.3, 0.34, 2),  # paper: negligible skipped; sub-tiles
    ("float16", 2, 2, 33, 33, 128, 16, 16, "relu", "all", 0.0, 0.5, 3),  # released main: linear over all tokens
    ("float16", 2, 2, 29, 121, 64, 16, 32, "softmax", "marginal", 0.25, 0.25, 4),  # partial tails on both
    ("float16", 2, 2, 40, 40, 32, 16, 16, "softmax", "marginal", 0.0, 1.0, 5),  # every block critical: O_l = 0
    ("float16", 1, 2, 47, 47, 32, 16, 16, "elu", "marginal", 0.2, 0.4, 6, True),  # through the public op
]


@pytest.mark.parametrize("group", [INTERPRETER_CASES[:3], INTERPRETER_CASES[3:]])
def test_fused_kernel_matches_oracle_interpreter(group):
    for case, result in zip(group, run_interpreter(__file__, group)):
        assert_sla_case(result, str(case))


def test_backend_choice_names_reason():
    """CPU tensors never reach the kernel (the interpreter is not the CPU path); a named backend that cannot
    run the call says why."""
    q = torch.randn(1, 1, 20, 32, dtype=torch.float16)
    backend, reason = sla_backend(q, q, q, 16)
    assert backend == "reference" and "cpu" in reason
    assert sla_backend(q, q, q, 16, backend="reference") == ("reference", "asked for (backend='reference')")
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: tensors are on cpu"):
        sla_backend(q, q, q, 16, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        sla_backend(q, q, q, 16, backend="fa4")


# ------------------------------------------------------------------ GPU, real sizes
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "n, d, linear_on, negligible, feature_map, block",
    [
        (4097, 128, "marginal", 0.0, "softmax", (64, 64)),
        (4097, 128, "marginal", 0.1, "softmax", (128, 64)),  # backward in 64-row sub-tiles
        (3001, 64, "marginal", 0.2, "elu", (64, 64)),
        (2049, 32, "all", 0.0, "relu", (64, 64)),
    ],
)
def test_fused_kernel_gpu(dtype, n, d, linear_on, negligible, feature_map, block):
    for public in (False, True):
        poison_cuda_allocator()
        result = check_sla_case(dtype, 2, 3, n, n, d, *block, feature_map, linear_on, negligible, 0.1, n + d,
                                "cuda", public=public)
        assert_sla_case(result, f"{dtype} n{n} d{d} {linear_on} {feature_map} {block} public={public}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_projection_and_bias_on_kernel_path_gpu():
    """The kernel path's O_s + O_l W^T + b (one addmm) equals the float32 reference's within bf16 rounding."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2049, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w, b = torch.randn(64, 64, device="cuda") * 0.3, torch.randn(64, device="cuda")
    assert sla_backend(q, k, v, 64) == ("triton", "fused Triton kernel")
    out = sparse_linear_attention(q, k, v, w, b, topk=0.1, block_size=64)
    ref = sparse_linear_attention(q.float(), k.float(), v.float(), w, b, topk=0.1, block_size=64,
                                  block_map=sla_block_map(q, k, 0.1, 0.0, 64))
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)


if __name__ == "__main__":  # interpreter subprocess: run the cases given as JSON, print the results as JSON
    import zoo.ops.sla as sla
    from zoo.ops.sla import kernel as sla_kernel

    sla.KERNEL_DEVICES = ("cuda", "cpu")  # the public-op case takes the kernel on CPU tensors
    sla_kernel.BWD_Q_TILE = 16  # below block_q 32: the backward's row sub-tiling runs too
    cases = json.loads(sys.argv[1])
    with nan_poisoned_allocations():  # an unwritten tile of any buffer reads NaN
        print(json.dumps([check_sla_case(*case[:13], device="cpu", public=bool(case[13:])) for case in cases]))
