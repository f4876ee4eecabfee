"""The fused SLA Triton kernel against the reference `zoo.ops.sparse_linear_attention`.

CPU: the kernel runs under the Triton interpreter in a subprocess (TRITON_INTERPRET must be set
before triton is imported, and must not leak into other test modules), fp16 at tiny odd sizes,
every head_dim, every variant and feature map; outputs and q/k/v/proj gradients are compared with
the float64 reference on the same inputs. (Triton 3.7's interpreter multiplies bf16 dot operands
wrongly, so bf16 is checked on the GPU only.) GPU: real sizes, fp16 and bf16, and the dispatch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from zoo.ops import sla_backend, sla_block_map, sparse_linear_attention

import zoo  # noqa: F401  (the subprocess imports the same package)

# (n_q, n_k, head_dim, block_q, block_k, feature_map, linear_on, negligible, topk)
CASES = [
    (45, 45, 32, 16, 16, "softmax", "marginal", 0.0, 0.34),   # SLA-1 (released default)
    (50, 37, 64, 32, 16, "elu", "marginal", 0.3, 0.34),       # paper: negligible blocks skipped; bwd sub-tiles
    (33, 33, 128, 16, 16, "relu", "all", 0.0, 0.5),           # released main: linear over all tokens
    (29, 61, 64, 16, 32, "softmax", "marginal", 0.25, 0.25),  # n_q != n_k, partial tails on both
    (40, 40, 32, 16, 16, "softmax", "marginal", 0.0, 1.0),    # every block critical: O_l = 0
]

_SCRIPT = r"""
import json, sys
import torch
import torch.nn.functional as F
from zoo.ops import sla_block_map, sparse_linear_attention
from zoo.ops.sla import kernel as sla_kernel
from zoo.ops.sla.kernel import sla_fused

def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

seed = int(sys.argv[1])
sla_kernel.BWD_Q_TILE = int(sys.argv[3])  # below block_q: the backward's sub-tiling runs too
torch.manual_seed(seed)
out = []
for nq, nk, d, bq, bk, feat, lin, neg, topk in json.loads(sys.argv[2]):
    q, k, v = (torch.randn(2, 2, n, d, dtype=torch.float16) for n in (nq, nk, nk))
    w, b = torch.randn(d, d, dtype=torch.float64) * 0.3, torch.randn(d, dtype=torch.float64)
    bm = sla_block_map(q, k, topk, neg, (bq, bk))
    go = torch.randn(2, 2, nq, d, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        x = [t.detach().double().requires_grad_() for t in (q, k, v)] if not fused else \
            [t.detach().clone().requires_grad_() for t in (q, k, v)]
        wt = w.clone().requires_grad_()
        if fused:
            o_s, o_l = sla_fused(*x, bm, d ** -0.5, feat, lin, 1e-5, (bq, bk))
            o = o_s.double() + F.linear(o_l.double(), wt, b)
        else:
            o = sparse_linear_attention(*x, wt, b, linear_on=lin, feature_map=feat, block_size=(bq, bk), block_map=bm)
        (o * go).sum().backward()
        grads.append([o.detach()] + [t.grad for t in x] + [wt.grad])
    errs = [rel(a, r) for a, r in zip(*grads)]
    finite = all(bool(torch.isfinite(a).all()) for a in grads[0])
    out.append({"case": [nq, nk, d, feat, lin, neg, topk], "errs": errs, "finite": finite})
print(json.dumps(out))
"""


def test_fused_kernel_matches_reference_under_interpreter():
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs each run; printed on failure
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(seed), json.dumps(CASES), "16"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)
    for r in results:
        # fp16 inputs: output and gradients within fp16 rounding of the float64 reference
        assert r["finite"], (seed, r)
        assert max(r["errs"]) < 5e-3, (seed, r)  # [out, dq, dk, dv, dW]


def test_backend_choice_names_reason():
    """CPU tensors never reach the kernel (the interpreter is not the CPU path); a named backend that cannot
    run the call says why."""
    q = torch.randn(1, 1, 20, 32, dtype=torch.float16)
    backend, reason = sla_backend(q, q, q, 16)
    assert backend == "reference" and "cpu" in reason
    assert sla_backend(q, q, q, 16, backend="reference") == ("reference", "")
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs: tensors are on cpu"):
        sla_backend(q, q, q, 16, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        sla_backend(q, q, q, 16, backend="fa4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
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
    torch.manual_seed(n + d)
    q, k, v = (torch.randn(2, 3, n, d, device="cuda", dtype=dtype) for _ in range(3))
    w, b = torch.randn(d, d, device="cuda") * 0.3, torch.randn(d, device="cuda")
    bm = sla_block_map(q, k, 0.1, negligible, block)
    go = torch.randn(2, 3, n, d, device="cuda")
    res = []
    for x in ([t.clone().requires_grad_() for t in (q, k, v)], [t.float().requires_grad_() for t in (q, k, v)]):
        wt = w.clone().requires_grad_()
        # dtype inputs dispatch to the kernel; float32 inputs take the reference
        o = sparse_linear_attention(*x, wt, b, linear_on=linear_on, feature_map=feature_map, block_size=block,
                                    block_map=bm)
        (o.float() * go).sum().backward()
        res.append([o.detach().float()] + [t.grad.float() for t in x] + [wt.grad])
    for name, a, r in zip(("out", "dq", "dk", "dv", "dW"), *res):
        err = float((a - r).norm() / r.norm())  # a, r are detached values
        assert torch.isfinite(a).all() and err < 2e-2, (name, err)
