"""zoo.ops.na1d/2d/3d against a brute-force oracle built element by element from NATTEN's rules."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo.ops import counting_flops, na1d, na2d, na3d, na_legacy_pad
from zoo.ops.na import neighborhood_attention

OPS = {1: na1d, 2: na2d, 3: na3d}


def _axis_rule(i: int, j: int, length: int, k: int, d: int, s: int, causal: bool) -> bool:
    """Is key j in query i's window on one axis? Written from the rule, one pair at a time."""
    if i % d != j % d:
        return False
    gi, gj = i // d, j // d
    group_len = len(range(i % d, length, d))
    if causal:
        leader = min(gi // s * s + s - 1, group_len - 1)
        return gj <= gi and leader - gj < k
    leader = min(gi // s * s + s // 2, group_len - 1)
    left, right = k // 2, k // 2 + k % 2 - 1
    center = min(max(leader, left), group_len - 1 - right)
    return center - left <= gj <= center + right


def oracle(q, k, v, kernel, dilation, stride, causal, rpb=None, scale=None, extra_k=None, extra_v=None):
    """Dense attention with an explicit [N, N] mask and bias (float64)."""
    batch, *spatial, heads, dim = q.shape
    n_ax = len(spatial)
    coords = list(itertools.product(*(range(n) for n in spatial)))
    n = len(coords)
    mask = torch.zeros(n, n, dtype=torch.bool)
    rel = torch.zeros(n, n, n_ax, dtype=torch.long)
    for a, qc in enumerate(coords):
        for b, kc in enumerate(coords):
            ok = all(
                _axis_rule(qc[x], kc[x], spatial[x], kernel[x], dilation[x], stride[x], causal[x]) for x in range(n_ax)
            )
            if ok:
                mask[a, b] = True
                rel[a, b] = torch.tensor(
                    [kc[x] // dilation[x] - qc[x] // dilation[x] + kernel[x] - 1 for x in range(n_ax)]
                )
    scale = dim ** -0.5 if scale is None else scale
    group = heads // k.shape[-2]  # GQA: kv head j serves query heads j*group ... (j+1)*group - 1
    k, v = k.repeat_interleave(group, -2), v.repeat_interleave(group, -2)
    if extra_k is not None:
        extra_k, extra_v = extra_k.repeat_interleave(group, -2), extra_v.repeat_interleave(group, -2)
    qf, kf, vf = (t.reshape(batch, n, heads, t.shape[-1]).transpose(1, 2) for t in (q, k, v))
    logits = qf @ kf.transpose(-1, -2) * scale
    if rpb is not None:
        logits = logits + rpb[(slice(None), *rel.unbind(-1))]
    logits = logits.masked_fill(~mask, float("-inf"))
    values = vf
    if extra_k is not None:
        logits = torch.cat([logits, qf @ extra_k.transpose(1, 2).transpose(-1, -2) * scale], -1)
        values = torch.cat([vf, extra_v.transpose(1, 2)], 2)
    lse = torch.logsumexp(logits, -1)
    out = torch.softmax(logits, -1) @ values
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1]), lse.transpose(1, 2).reshape(q.shape[:-1])


def _inputs(spatial, heads=2, dim=4, dim_v=3, kernel=None, batch=2, extra=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    def mk(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    q, k = mk(batch, *spatial, heads, dim), mk(batch, *spatial, heads, dim)
    v = mk(batch, *spatial, heads, dim_v)
    rpb = mk(heads, *(2 * kk - 1 for kk in kernel)) if kernel is not None else None
    ek = mk(batch, extra, heads, dim) if extra else None
    ev = mk(batch, extra, heads, dim_v) if extra else None
    return q, k, v, rpb, ek, ev


def _check(spatial, kernel, dilation, stride, causal, use_rpb=True, extra=0, scale=None, chunk_elements=None):
    q, k, v, rpb, ek, ev = _inputs(spatial, kernel=kernel if use_rpb else None, extra=extra)
    kw = dict(rpb=rpb, scale=scale, additional_keys=ek, additional_values=ev, return_lse=True)
    if chunk_elements is None:
        out, lse = OPS[len(spatial)](q, k, v, kernel, dilation=dilation, stride=stride, is_causal=causal, **kw)
    else:
        out, lse = neighborhood_attention(
            q, k, v, len(spatial), kernel, dilation, stride, causal, chunk_elements=chunk_elements, **kw
        )
    ref, ref_lse = oracle(q, k, v, kernel, dilation, stride, causal, rpb, scale, ek, ev)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    leaves = [t for t in (q, k, v, rpb, ek, ev) if t is not None]
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad((out * grad_out).sum() + lse.sum(), leaves)
    want = torch.autograd.grad((ref * grad_out).sum() + ref_lse.sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@st.composite
def _configs(draw, na_dim):
    kernel, dilation, stride, causal, spatial = [], [], [], [], []
    for _ in range(na_dim):
        kk = draw(st.integers(2, 5 if na_dim == 1 else 4))
        dd = draw(st.integers(1, 3))
        kernel.append(kk)
        dilation.append(dd)
        stride.append(draw(st.integers(1, kk)))
        causal.append(draw(st.booleans()))
        spatial.append(draw(st.integers(kk * dd, kk * dd + (5 if na_dim == 1 else 3))))
    return tuple(spatial), tuple(kernel), tuple(dilation), tuple(stride), tuple(causal)


_settings = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(_configs(1), st.booleans())
def test_na1d_matches_oracle(cfg, use_rpb):
    _check(*cfg, use_rpb=use_rpb)


@_settings
@given(_configs(2), st.booleans())
def test_na2d_matches_oracle(cfg, use_rpb):
    _check(*cfg, use_rpb=use_rpb)


@pytest.mark.parametrize(
    "spatial,kernel,dilation,stride,causal",
    [
        ((5, 7, 3), (3, 3, 2), (1, 2, 1), (1, 2, 1), (False, False, False)),
        ((7, 5, 5), (2, 3, 5), (3, 1, 1), (2, 3, 1), (True, False, True)),
        ((3, 9, 4), (3, 4, 2), (1, 2, 2), (3, 4, 2), (False, False, False)),  # sliding tile (stride = kernel)
    ],
)
def test_na3d_matches_oracle(spatial, kernel, dilation, stride, causal):
    _check(spatial, kernel, dilation, stride, causal)


def test_chunked_path_and_additional_kv_match_oracle():
    _check((9, 7), (3, 4), (2, 1), (2, 1), (False, True), extra=3, scale=0.37, chunk_elements=200)


def test_gqa_matches_oracle():
    g = torch.Generator().manual_seed(3)
    def mk(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = mk(2, 7, 8, 4, 5), mk(2, 7, 8, 2, 5), mk(2, 7, 8, 2, 3)
    rpb, ek, ev = mk(4, 5, 5), mk(2, 3, 2, 5), mk(2, 3, 2, 3)
    out, lse = na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, additional_keys=ek, additional_values=ev, return_lse=True)
    ref, ref_lse = oracle(q, k, v, (3, 3), (2, 1), (1, 1), (False, False), rpb, None, ek, ev)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    leaves = (q, k, v, rpb, ek, ev)
    got = torch.autograd.grad(out.sum() + lse.sum(), leaves)
    for a, b in zip(got, torch.autograd.grad(ref.sum() + ref_lse.sum(), leaves)):
        torch.testing.assert_close(a, b)


def test_uneven_dilation_groups_and_border_shift():
    """L = 11, d = 3: groups of lengths 4, 4, 3; k = 3 windows are shifted inward, never padded."""
    from zoo.ops.na import axis_neighbors

    keys, rel, valid = axis_neighbors(11, 3, 3, 1, False)
    assert valid.all()
    assert keys[0].tolist() == [0, 3, 6]  # left border: shifted right
    assert keys[10].tolist() == [4, 7, 10]  # group 1 (length 4), last query: shifted left
    assert keys[8].tolist() == [2, 5, 8]  # group 2 has only 3 tokens: the whole group
    assert rel[0].tolist() == [2, 3, 4]  # offsets 0, +1, +2 in group coordinates


def test_3d_sliding_tile_is_blocked_attention():
    """stride = kernel on every axis and sizes divisible by the tile: each tile attends to itself only."""
    tile, grid = (2, 3, 2), (3, 2, 2)
    spatial = tuple(t * g for t, g in zip(tile, grid))
    q, k, v, *_ = _inputs(spatial, dim=8, dim_v=8)
    out = na3d(q, k, v, tile, stride=tile)

    def tiles(x):  # [B, X, Y, Z, H, D] -> [B, tiles, H, tile_tokens, D]
        b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
        x = x.reshape(b, grid[0], tile[0], grid[1], tile[1], grid[2], tile[2], h, d)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(b, math.prod(grid), h, math.prod(tile), d)

    ref = F.scaled_dot_product_attention(tiles(q), tiles(k), tiles(v))
    torch.testing.assert_close(tiles(out), ref)


def test_full_window_is_self_attention_and_causal_1d_is_causal_attention():
    q, k, v, *_ = _inputs((5, 7), dim=4, dim_v=4)
    full = na2d(q, k, v, (5, 7))
    def flat(x):
        return x.reshape(2, 35, 2, 4).transpose(1, 2)
    torch.testing.assert_close(flat(full), F.scaled_dot_product_attention(flat(q), flat(k), flat(v)))
    q, k, v, *_ = _inputs((9,), dim=4, dim_v=4)
    causal = na1d(q, k, v, 9, is_causal=True)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(causal, ref.transpose(1, 2))


def test_low_precision_matches_float32():
    q, k, v, rpb, *_ = _inputs((8, 9), kernel=(3, 3))
    ref = na2d(*(t.float() for t in (q, k, v)), 3, dilation=2, rpb=rpb.float())
    out = na2d(*(t.bfloat16() for t in (q, k, v)), 3, dilation=2, rpb=rpb.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_float32_rpb_and_extra_tokens_with_bf16_qkv_under_autocast():
    """Autocast gives bf16 q/k/v from the projections while rpb and other parameters stay float32:
    they are cast, the computation runs in float32 (not re-cast to bf16 by autocast), the output is bf16,
    and float64 inputs still give the float64 oracle exactly."""
    q, k, v, rpb, ek, ev = _inputs((7, 8), kernel=(3, 3), extra=2)
    kw = dict(dilation=2, rpb=rpb.float(), additional_keys=ek.float(), additional_values=ev.float())
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = na2d(*low, 3, **kw)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in low)
    ref, _ = oracle(*(t.detach().bfloat16().double() for t in (q, k, v)), (3, 3), (2, 2), (1, 1), (False, False),
                    rpb.detach().float().double(), None, ek.detach().float().double(), ev.detach().float().double())
    # float32 compute of bf16 inputs: the only bf16 rounding left is the output's (rel. 2^-9)
    torch.testing.assert_close(out.double(), ref, atol=0, rtol=2 ** -8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = na2d(q, k, v, 3, dilation=2, rpb=rpb, additional_keys=ek, additional_values=ev)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, oracle(q, k, v, (3, 3), (2, 2), (1, 1), (False, False), rpb, None, ek, ev)[0])


def test_flop_count_is_density_aware():
    q = torch.randn(2, 6, 7, 3, 4)
    v = torch.randn(2, 6, 7, 3, 5)
    with counting_flops():
        assert torch.ops.zoo.attention_cost.default  # the placeholder op exists
        out = na2d(q, q, v, 3)
    assert out.shape == v.shape
    from zoo.flop_count import HANDLES  # noqa: F401  (the handle reads the count off the graph)

    class M(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.kw = kw

        def forward(self, x):
            return na2d(x, x, x, 3, **self.kw)

    import zoo

    x = torch.randn(1, 6, 7, 3, 4)
    assert zoo.flops(M(), inputs=(x,)) == 6 * 7 * 9 * 3 * (4 + 4)
    # causal on axis 0 (k=3): rows see 1, 2, 3, 3, 3, 3 keys
    assert zoo.flops(M(is_causal=(True, False)), inputs=(x,)) == (1 + 2 + 3 * 4) * 7 * 3 * 3 * (4 + 4)


def test_legacy_pad_amounts():
    assert na_legacy_pad((56, 56), 7, 8) == (0, 0)
    assert na_legacy_pad((14, 20), 7, 2) == (0, 0)
    assert na_legacy_pad((12, 20), 7, 2) == (2, 0)  # only the short axis needs padding
    assert na_legacy_pad((7, 7), (7, 7), (2, 1)) == (7, 0)


@pytest.mark.parametrize(
    "case,argname",
    [
        ("rank", "q"),
        ("heads", "heads"),
        ("head_dim", "head_dim"),
        ("kernel_too_big", "kernel_size * dilation"),
        ("stride", "stride"),
        ("dtype", "dtype"),
        ("device", "device"),
        ("rpb", "rpb"),
        ("kernel_tuple", "kernel_size"),
        ("extra", "additional"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(case, argname):
    q = torch.randn(1, 9, 9, 2, 4)
    args = dict(q=q, k=q.clone(), v=q.clone(), kernel_size=3)
    if case == "rank":
        args["q"] = torch.randn(1, 9, 2, 4)
    elif case == "heads":
        args["k"] = torch.randn(1, 9, 9, 3, 4)
    elif case == "head_dim":
        args["k"] = torch.randn(1, 9, 9, 2, 5)
    elif case == "kernel_too_big":
        args.update(kernel_size=5, dilation=2)
    elif case == "stride":
        args["stride"] = 4
    elif case == "dtype":
        args["v"] = q.double()
    elif case == "device":
        args["k"] = q.to("meta")
    elif case == "rpb":
        args["rpb"] = torch.randn(2, 7, 7)
    elif case == "kernel_tuple":
        args["kernel_size"] = (3, 3, 3)
    elif case == "extra":
        args["additional_keys"] = torch.randn(1, 4, 2, 4)
    with pytest.raises(ValueError, match=argname.replace("*", r"\*")):
        na2d(**args)
