"""Op fuzz suite: every zoo.ops function against its float64 oracle over seeded random configurations.

Per configuration (tests/op_fuzz_cases.py draws shapes, odd sizes, batch 1 and odd batches, masks,
GQA, rpb, dilation/stride/causal, scales, feature maps): the float64 op against an independent dense
float64 oracle (outputs and input gradients for a fresh random output gradient, tolerance 1e-9 relative:
float64 roundoff times the reduction lengths here); the float64 op on non-contiguous views (sliced,
transposed storage) against the same op on contiguous inputs; and the float32 op against the float64 op
(tolerance 2e-4 relative to the output scale: float32 roundoff 6e-8 times reductions of at most a few
hundred terms and exp/normalisations). The GPU variant runs the CUDA kernels in bf16/fp16.

`ZOO_FUZZ_EXAMPLES` sets the configurations per op (default 6, CI-sized); docs/fuzz.md records a run at 1000.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
from op_fuzz_cases import CASES, KERNEL_OPS, Case

EXAMPLES = int(os.environ.get("ZOO_FUZZ_EXAMPLES", "6"))


def as_view(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values as a non-contiguous view: a slice of a wider buffer, or a transposed storage."""
    if t.ndim >= 2 and rng.random() < 0.5:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    wide = torch.randn(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
    wide[..., 1:-2] = t
    return wide[..., 1:-2]


def run(op, inputs: list[torch.Tensor], grad_seed: int):
    """Output and input gradients for a fresh random output gradient (the same for every precision)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = op(*leaves)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out.detach().double().cpu(), [None if g is None else g.double().cpu() for g in grads]


def assert_close(actual, expected, rel: float, what: str) -> None:
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:.1g} * {scale:.3g}"


def compare(result, reference, rel: float, what: str) -> None:
    (out, grads), (ref_out, ref_grads) = result, reference
    assert_close(out, ref_out, rel, f"{what} output")
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (ref is None), f"{what}: gradient of input {i} is {g} but expected {ref}"
        if g is None:
            continue
        assert_close(g, ref, rel, f"{what} gradient of input {i}")


def same_selection(case: Case, inputs: list[torch.Tensor]) -> bool:
    """Whether low-precision inputs select what the float64 ones do (always true for ops that select nothing)."""
    if case.selection is None:
        return True
    return torch.equal(case.selection(*inputs).cpu(), case.selection(*case.inputs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_float64_oracle(name):
    for index in range(EXAMPLES):
        rng = random.Random(f"{name}-{index}")
        case = CASES[name](rng)
        where = f"{name} config {index}"
        reference = run(case.op, case.inputs, index)
        if case.oracle is not None:
            compare(run(case.oracle, case.inputs, index), reference, 1e-9, f"{where} float64 vs oracle")
        views = [as_view(t, rng) for t in case.inputs]
        compare(run(case.op, views, index), reference, 1e-12, f"{where} float64 non-contiguous")
        low = [as_view(t.float(), rng) for t in case.inputs]
        if same_selection(case, low):
            compare(run(case.op, low, index), reference, 2e-4, f"{where} float32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_kernel_matches_float64_oracle_on_gpu(name, dtype):
    """The CUDA kernels (configurations they run) against the float64 oracle: bf16 keeps 8 bits of
    mantissa (roundoff 4e-3), fp16 11 (5e-4); the inputs are rounded once, so the output error is a few
    roundoffs of the output scale: 3e-2 (bf16) and 5e-3 (fp16)."""
    rel = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for index in range(EXAMPLES):
        rng = random.Random(f"{name}-gpu-{index}")
        case = CASES[name](rng, kernel=True)
        low = [t.to("cuda", dtype) for t in case.inputs]
        if not same_selection(case, low):
            continue
        rounded = [t.double().cpu() for t in low]  # the oracle sees the rounded inputs
        reference = run(case.oracle or case.op, rounded, index)
        compare(run(case.op, low, index), reference, rel, f"{name} config {index} {dtype} on CUDA")
