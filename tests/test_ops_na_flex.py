"""zoo.ops.na.flex (NA through FlexAttention) against the reference `zoo.ops.na.naive`.

On CPU Flex runs eagerly and has no backward, so: the forward of `na_flex` itself is compared with
the reference (outputs and logsumexp), and the gradients are checked on the same `mask_mod` and
`score_mod` evaluated densely (every query-key pair, autograd through them), which is what Flex
differentiates. The GPU test runs the compiled kernels, forward and backward, in bf16.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo.ops.na.flex import flex_can_run, na_flex, na_mask_mod, na_score_mod
from zoo.ops.na.naive import axis_neighbors, neighborhood_attention, normalize_args

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def make_inputs(spatial, kernel, heads_kv, group, dim, n_extra, with_rpb, dtype=torch.float64, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    heads = heads_kv * group

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = rand(batch, *spatial, heads, dim)
    k, v = rand(batch, *spatial, heads_kv, dim), rand(batch, *spatial, heads_kv, dim)
    rpb = rand(heads, *(2 * kk - 1 for kk in kernel)) if with_rpb else None
    extra_k = rand(batch, n_extra, heads_kv, dim) if n_extra else None
    extra_v = rand(batch, n_extra, heads_kv, dim) if n_extra else None
    return q, k, v, rpb, extra_k, extra_v


def dense_from_mods(q, k, v, geometry, rpb, extra_k, extra_v, scale):
    """Attention over every pair with na_flex's mask_mod / score_mod evaluated on index grids (differentiable)."""
    batch, *spatial, heads, dim = q.shape
    n = math.prod(spatial)

    def heads_first(t):
        t = t.reshape(batch, -1, t.shape[-2], t.shape[-1]).transpose(1, 2)
        return t.repeat_interleave(heads // t.shape[1], dim=1)

    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    n_extra = 0 if extra_k is None else extra_k.shape[1]
    if n_extra:
        kh, vh = torch.cat([kh, heads_first(extra_k)], 2), torch.cat([vh, heads_first(extra_v)], 2)
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n + n_extra)[None, :]
    mask = na_mask_mod(geometry, n_extra)(0, 0, q_idx, kv_idx)
    logits = qh @ kh.transpose(-1, -2) * scale
    if rpb is not None:
        logits = na_score_mod(geometry, rpb, n_extra)(logits, 0, torch.arange(heads)[:, None, None], q_idx, kv_idx)
    out = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ vh
    return out.transpose(1, 2).reshape(batch, *spatial, heads, vh.shape[-1])


@st.composite
def configs(draw, max_tokens=120):
    na_dim = draw(st.integers(1, 3))
    kernel, dilation, spatial, stride, causal = [], [], [], [], []
    for _ in range(na_dim):
        k = draw(st.integers(2, 5 if na_dim < 3 else 3))
        d = draw(st.integers(1, 3))
        kernel.append(k)
        dilation.append(d)
        spatial.append(k * d + draw(st.integers(0, 4)))  # lengths not multiples of d: unequal dilation groups
        stride.append(draw(st.integers(1, k)))
        causal.append(draw(st.booleans()))
    if math.prod(spatial) > max_tokens:  # keep the dense check small: shrink to the minimum lengths
        spatial = [k * d for k, d in zip(kernel, dilation)]
    return dict(spatial=tuple(spatial), kernel=tuple(kernel), dilation=tuple(dilation), stride=tuple(stride),
                causal=tuple(causal), heads_kv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2])),
                n_extra=draw(st.sampled_from([0, 3])), rpb=draw(st.booleans()))


def run_case(cfg, dtype=torch.float64, dim=8):
    q, k, v, rpb, extra_k, extra_v = make_inputs(cfg["spatial"], cfg["kernel"], cfg["heads_kv"], cfg["group"], dim,
                                                 cfg["n_extra"], cfg["rpb"], dtype)
    na_dim = len(cfg["spatial"])
    kw = dict(na_dim=na_dim, kernel_size=cfg["kernel"], dilation=cfg["dilation"], stride=cfg["stride"],
              is_causal=cfg["causal"], rpb=rpb, additional_keys=extra_k, additional_values=extra_v, scale=0.7)
    return (q, k, v, rpb, extra_k, extra_v), kw


def test_mask_mod_is_the_reference_neighbourhood():
    """The mask_mod's pairs are exactly the reference tables' valid pairs (1-D, every small geometry)."""
    for length in range(2, 14):
        for k in range(2, length + 1):
            for d in range(1, length // k + 1):
                for s in range(1, k + 1):
                    for causal in (False, True):
                        keys, _, valid = axis_neighbors(length, k, d, s, causal)
                        expected = torch.zeros(length, length, dtype=torch.bool)
                        rows = torch.arange(length)[:, None].expand_as(keys)
                        expected[rows[valid], keys[valid]] = True
                        geometry = ((length,), (k,), (d,), (s,), (causal,))
                        got = na_mask_mod(geometry)(0, 0, torch.arange(length)[:, None], torch.arange(length)[None])
                        assert torch.equal(got, expected), (length, k, d, s, causal)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # ~1.5 s each (Flex traces)
@given(cfg=configs())
def test_forward_matches_reference(cfg):
    """na_flex (eager Flex, float64) = reference: outputs and logsumexp."""
    (q, k, v, *_), kw = run_case(cfg)
    with torch.no_grad():
        out, lse = na_flex(q, k, v, compile=False, return_lse=True, **kw)
    ref_out, ref_lse = neighborhood_attention(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_mods_gradients_match_reference(cfg):
    """Outputs and gradients (q, k, v, rpb, extra k/v) of the mask_mod/score_mod attention = reference, float64."""
    tensors, kw = run_case(cfg)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    geometry = (cfg["spatial"], *normalize_args(kw["na_dim"], cfg["kernel"], cfg["dilation"], cfg["stride"],
                                                cfg["causal"]))
    q, k, v, rpb, extra_k, extra_v = leaves
    out = dense_from_mods(q, k, v, geometry, rpb, extra_k, extra_v, kw["scale"])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad)
    ref_leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    rq, rk, rv, rrpb, rek, rev = ref_leaves
    ref_kw = dict(kw, rpb=rrpb, additional_keys=rek, additional_values=rev)
    ref_out = neighborhood_attention(rq, rk, rv, **ref_kw)
    ref_grads = torch.autograd.grad(ref_out, [t for t in ref_leaves if t is not None], grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cfg", [
    dict(spatial=(9, 11), kernel=(3, 4), dilation=(2, 2), stride=(1, 2), causal=(False, True), heads_kv=2, group=2,
         n_extra=3, rpb=True),
    dict(spatial=(5, 6, 7), kernel=(2, 3, 3), dilation=(1, 2, 2), stride=(2, 1, 3), causal=(True, False, False),
         heads_kv=1, group=4, n_extra=0, rpb=True),
])
def test_float32_forward(cfg):
    """float32 (Flex and reference both accumulate in float32): agreement to float32 rounding."""
    (q, k, v, *_), kw = run_case(cfg, torch.float32)
    with torch.no_grad():
        out, lse = na_flex(q, k, v, compile=False, return_lse=True, **kw)
    ref_out, ref_lse = neighborhood_attention(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_problem():
    q = torch.randn(1, 8, 8, 2, 16)
    assert flex_can_run(q, q, q) is None
    leaf = q.clone().requires_grad_()
    assert "no backward on cpu" in flex_can_run(leaf, q, q)
    with pytest.raises(ValueError, match="no backward on cpu"):
        na_flex(leaf, q, q, 2, 3, compile=False)
    with pytest.raises(ValueError, match=r"rpb must have shape \[heads, 2k-1, ...\] = \(2, 5, 5\)"):
        na_flex(q, q, q, 2, 3, rpb=torch.randn(2, 3, 3), compile=False)
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        na_flex(q, q, q, 2, 5, dilation=2, compile=False)
    with pytest.raises(ValueError, match="q heads must be a multiple"):
        na_flex(q, q[..., :1, :].expand(1, 8, 8, 3, 16).contiguous(), q, 2, 3, compile=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", [
    dict(spatial=(23, 37), kernel=(7, 6), dilation=(3, 2), stride=(1, 2), causal=(False, True), heads_kv=2, group=2,
         n_extra=5, rpb=True),
    dict(spatial=(6, 13, 15), kernel=(3, 5, 4), dilation=(2, 1, 3), stride=(1, 1, 2), causal=(True, False, False),
         heads_kv=2, group=1, n_extra=0, rpb=True),
])
def test_compiled_gpu_bf16_against_float64(cfg):
    """Compiled Flex in bf16, forward and backward: error vs float64 at most 2x the reference's own bf16 error."""
    tensors, kw = run_case(cfg, torch.float64, dim=32)  # compiled Flex needs head_dim >= 16
    kw["scale"] = None
    tensors = [None if t is None else t.cuda() for t in tensors]
    grad = torch.randn(tensors[0].shape, dtype=torch.float64, device="cuda")

    def run(fn, dtype, **extra):
        leaves = [None if t is None else t.to(dtype).requires_grad_() for t in tensors]
        if leaves[3] is not None:
            leaves[3] = tensors[3].float().requires_grad_()  # rpb stays a float32 parameter, as in the models
        q, k, v, rpb, ek, ev = leaves
        out = fn(q, k, v, **dict(kw, rpb=rpb, additional_keys=ek, additional_values=ev), **extra)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad.to(out.dtype))
        return [out.double()] + [g.double() for g in grads]

    exact = [t.double() for t in run(neighborhood_attention, torch.float64)]
    ref = run(neighborhood_attention, torch.bfloat16)
    flex = run(na_flex, torch.bfloat16)
    for name, e, r, f in zip(("out", "dq", "dk", "dv", "drpb", "dek", "dev"), exact, ref, flex):
        ref_err, flex_err = (r - e).abs().max().item(), (f - e).abs().max().item()
        assert flex_err <= 2 * ref_err + 1e-3, (name, flex_err, ref_err)


def test_na2d_backend_flex_equals_reference_on_cpu():
    """`zoo.ops.na2d(..., backend="flex")` runs ops/na/flex.py (eager on CPU, forward) and names it."""
    from zoo.ops import na2d, na_backend

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 11, 4, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(4, 9, 7, generator=gen, dtype=torch.float64)
    args = dict(kernel_size=(5, 4), dilation=(1, 2), rpb=rpb, return_lse=True)
    with torch.no_grad():
        assert na_backend(q, k, v, (5, 4), (1, 2), rpb=rpb, backend="flex")[0] == "flex"
        out, lse = na2d(q, k, v, backend="flex", **args)
        ref, ref_lse = na2d(q, k, v, backend="reference", **args)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="backend='flex' cannot run this call: FlexAttention has no backward on cpu"):
        na2d(q.requires_grad_(), k, v, backend="flex", **args)
