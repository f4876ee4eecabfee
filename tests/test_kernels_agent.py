"""Agent attention's fast path (two fused SDPA calls, `backend="sdpa"`) against the exact reference.

Oracle: `naive.agent_attention` in float64. In float64 the SDPA path must equal it to rounding. In half
precision the tolerance follows flash attention's: the same two stages run with the biases, the softmax
maps and the agents' values rounded to the dtype (what a fused kernel rounds) are compared to the oracle,
and the SDPA path may be at most 2x that error plus the rounding of the exact result; a wrong bias, scale or
stage order gives errors of order 1.
"""
from __future__ import annotations

import pytest
import torch
from zoo.ops.agent import naive

from zoo import ops

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def low_precision_stages(q, k, v, agents, agent_bias, query_bias, scale, query_scale):
    """Agent attention with every tensor a fused kernel stores rounded to the inputs' dtype (float32 logits)."""
    dt = q.dtype

    def stage(x, y, values, bias, s):
        logits = (x.float() * s) @ y.float().transpose(-1, -2) + bias.to(dt).float()
        return (logits.softmax(-1).to(dt).float() @ values.float()).to(dt)

    return stage(q, agents, stage(agents, k, v, agent_bias, scale), query_bias, query_scale)


def check_case(dtype, batch, heads, n_q, n_agents, dim, seed, device, scales=(None, None)):
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(batch, heads, n_q, dim, generator=gen).to(device, dt) for _ in range(3))
    agents = torch.randn(batch, heads, n_agents, dim, generator=gen).to(device, dt)
    # biases shared by the batch (as the backbones build them), float32 parameters (float64 with float64 inputs)
    bias_dtype = torch.float64 if dt == torch.float64 else torch.float32
    agent_bias = (torch.randn(1, heads, n_agents, n_q, generator=gen) * 0.5).to(device, bias_dtype)
    query_bias = (torch.randn(1, heads, n_q, n_agents, generator=gen) * 0.5).to(device, bias_dtype)
    do = torch.randn(batch, heads, n_q, dim, generator=gen).to(device, dt)
    scale = dim ** -0.5 if scales[0] is None else scales[0]
    query_scale = scale if scales[1] is None else scales[1]

    def run(fn, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves)
        return [out, *torch.autograd.grad((out.double() * do.double()).sum(), leaves)]

    inputs = [q, k, v, agents, agent_bias, query_bias]
    fast = run(lambda *t: ops.agent_attention(*t, scale=scale, query_scale=query_scale, backend="sdpa"), inputs)
    exact = run(lambda *t: naive.agent_attention(*t, scale=scale, query_scale=query_scale),
                [t.double() for t in inputs])
    low = run(lambda *t: low_precision_stages(*t, scale, query_scale), inputs)
    result = {}
    for name, f, lo, ex in zip(("out", "dq", "dk", "dv", "d_agents", "d_agent_bias", "d_query_bias"), fast, low, exact):
        f, lo = f.double(), lo.double()
        rounding = (ex.to(f.dtype if dt == torch.float64 else dt).double() - ex).abs().max().item()
        result[name] = {"sdpa": (f - ex).abs().max().item(), "bound": 2 * (lo - ex).abs().max().item() + rounding,
                        "nan": bool(torch.isnan(f).any())}
    return result


def assert_case(result, label):
    for name, r in result.items():
        assert not r["nan"], f"{label}: NaN in {name}"
        assert r["sdpa"] <= r["bound"], f"{label}: {name} error {r['sdpa']:.3g} > bound {r['bound']:.3g}"


def test_sdpa_path_equals_reference_float64():
    """Biases, both scales and every gradient (biases included) to float64 rounding, on CPU."""
    result = check_case("float64", 2, 3, 70, 9, 16, 0, "cpu", scales=(0.3, 0.7))
    assert max(r["sdpa"] for r in result.values()) < 1e-10, result


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sdpa_path_half_precision_cpu(dtype):
    assert_case(check_case(dtype, 2, 2, 100, 16, 32, 1, "cpu"), dtype)


def test_backend_choice_names_reason():
    q = torch.randn(1, 2, 8, 16)
    backend, reason = ops.agent_attention_backend(q, q, q, q[:, :, :4])
    assert backend == "reference" and "cpu" in reason
    assert ops.agent_attention_backend(q, q, q, q[:, :, :4], backend="sdpa")[0] == "sdpa"
    with pytest.raises(ValueError, match="backend must be"):
        ops.agent_attention(q, q, q, q[:, :, :4], backend="triton")
    with pytest.raises(ValueError, match="backend='sdpa' cannot run"):
        ops.agent_attention(q[:0], q[:0], q[:0], q[:0, :, :4], backend="sdpa")


def needs_cuda(test):
    """`pytest -m gpu` selects it; skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("n_q,n_agents,dim", [(3136, 9, 32), (784, 16, 32), (197, 49, 64), (49, 49, 32)])
def test_sdpa_path_matches_reference_gpu(dtype, n_q, n_agents, dim):
    """Agent-Swin-T's stages and agent DeiT-S (196 patches + CLS, 49 agents); NaN-poisoned allocator."""
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))
    assert_case(check_case(dtype, 8, 3, n_q, n_agents, dim, n_q, "cuda"), f"{dtype} {n_q} {n_agents} d{dim}")
