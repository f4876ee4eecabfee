"""Bi-level routing attention: brute-force oracle, the official gather algorithm, padding, errors, FLOPs."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo.ops import bi_level_routing_attention, block_sparse_attention, bra_routing
from zoo.ops.block_sparse.naive import block_sparse_attention_reference

import zoo

DT = torch.float64


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


def brute_force(q, k, v, n_win, topk, scale):
    """Routing and a dense token mask built token by token from the rule, then masked softmax attention.

    Regions have side ceil(H / n_win); a region's descriptor is the mean of its real tokens'
    full-width q (k); regions without tokens are never picked and list nothing.
    """
    b, h, w, heads, d = q.shape
    n_h, n_w = (n_win, n_win) if isinstance(n_win, int) else n_win
    rh, rw = math.ceil(h / n_h), math.ceil(w / n_w)
    region_of = [[(y // rh) * n_w + x // rw for x in range(w)] for y in range(h)]
    n_regions = n_h * n_w
    routing = torch.full((b, n_regions, topk), -1, dtype=torch.long)
    mask = torch.zeros(b, h * w, h * w, dtype=torch.bool)
    for bi in range(b):
        members = [[] for _ in range(n_regions)]
        for y in range(h):
            for x in range(w):
                members[region_of[y][x]].append((y, x))
        q_r = [torch.stack([q[bi, y, x].flatten() for y, x in m]).mean(0) if m else None for m in members]
        k_r = [torch.stack([k[bi, y, x].flatten() for y, x in m]).mean(0) if m else None for m in members]
        for r in range(n_regions):
            if not members[r]:
                continue
            scores = [float((q_r[r].detach() * scale) @ k_r[s].detach()) if members[s] else -math.inf
                      for s in range(n_regions)]
            order = sorted(range(n_regions), key=lambda s: -scores[s])[:topk]
            picked = [s for s in order if members[s]]
            routing[bi, r, : len(picked)] = torch.tensor(picked)
            for yq, xq in members[r]:
                for s in picked:
                    for yk, xk in members[s]:
                        mask[bi, yq * w + xq, yk * w + xk] = True
    qf, kf, vf = (t.reshape(b, h * w, heads, -1).transpose(1, 2) for t in (q, k, v))
    logits = (qf @ kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask[:, None], -math.inf)
    out = (logits.softmax(-1) @ vf).transpose(1, 2).reshape(b, h, w, heads, -1)
    return out, routing, mask


def official_bra(q, k, v, n_win, topk, scale):
    """The released algorithm (rayleizhu/BiFormer:ops/bra_legacy.py) written plainly with gather copies.

    q, k, v: `[N, H, W, heads, d]`, H and W divisible by n_win. Full-width region means,
    detached routing by top-k of (q_r * scale) k_r^T, gather of the routed regions' K/V
    (topk copies), attention per head over topk * region tokens.
    """
    n, h, w, m, d = q.shape
    dv = v.shape[-1]
    rh, rw = h // n_win, w // n_win
    p2 = n_win * n_win

    def regions(t):  # [N, p2, rh*rw, m*c], region-major, channels (m c)
        c = t.shape[-1]
        t = t.reshape(n, n_win, rh, n_win, rw, m * c).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(n, p2, rh * rw, m * c)

    q_pix, k_pix, v_pix = regions(q), regions(k), regions(v)
    q_win, k_win = q_pix.mean(2), k_pix.mean(2)
    logits = (q_win.detach() * scale) @ k_win.detach().transpose(-2, -1)
    idx = torch.topk(logits, k=topk, dim=-1).indices  # [N, p2, topk]
    kv = torch.cat([k_pix, v_pix], -1)
    ckv = kv.shape[-1]
    sel = torch.gather(kv[:, None].expand(-1, p2, -1, -1, -1), 2,
                       idx[..., None, None].expand(-1, -1, -1, rh * rw, ckv))  # [N, p2, topk, R, ckv]
    k_sel, v_sel = sel.split([m * d, m * dv], -1)
    k_sel = k_sel.reshape(n * p2, topk * rh * rw, m, d).permute(0, 2, 3, 1)  # (n p2) m c (k w2)
    v_sel = v_sel.reshape(n * p2, topk * rh * rw, m, dv).transpose(1, 2)
    qh = q_pix.reshape(n * p2, rh * rw, m, d).transpose(1, 2)
    out = ((qh * scale) @ k_sel).softmax(-1) @ v_sel  # [(n p2), m, R, dv]
    out = out.reshape(n, n_win, n_win, m, rh, rw, dv).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(n, h, w, m, dv), idx


def _grads(fn, *inputs):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    cot = _rand(*out.shape, seed=99)
    (out * cot).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize(
    "shape,n_win,topk",
    [
        ((2, 9, 11, 2, 5), 3, 2),  # both sides partial
        ((1, 7, 10, 3, 4), 3, 4),  # height partial, width partial with a 2-token column
        ((2, 4, 5, 1, 3), 3, 9),  # empty regions; topk larger than the non-empty regions
        ((1, 6, 6, 2, 4), 3, 1),  # divisible
    ],
    ids=["partial-both", "partial-mixed", "empty-regions", "divisible"],
)
def test_matches_brute_force_oracle(shape, n_win, topk):
    b, h, w, heads, d = shape
    q, k = _rand(*shape, seed=1), _rand(*shape, seed=2)
    v = _rand(b, h, w, heads, d + 2, seed=3)
    scale = 0.37
    expected, routing_ref, mask = brute_force(q, k, v, n_win, topk, scale)
    assert bool(mask.any(-1).all()), "every real query must see some key"
    routing = bra_routing(q, k, n_win, topk, scale=scale)
    torch.testing.assert_close(routing.sort(-1).values, routing_ref.sort(-1).values, rtol=0, atol=0)

    fn = lambda q, k, v: bi_level_routing_attention(q, k, v, n_win, topk, scale=scale)  # noqa: E731
    out, grads = _grads(fn, q, k, v)
    out_ref, grads_ref = _grads(lambda q, k, v: brute_force(q, k, v, n_win, topk, scale)[0], q, k, v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref, name in zip(grads, grads_ref, "qkv"):
        torch.testing.assert_close(g, g_ref, msg=lambda m, name=name: f"grad {name}: {m}")


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 8), w=st.integers(1, 8), n_win=st.integers(1, 4), data=st.data())
def test_property_any_size_matches_oracle(h, w, n_win, data):
    topk = data.draw(st.integers(1, n_win * n_win))
    q, k, v = (_rand(1, h, w, 2, 3, seed=s) for s in (30, 31, 32))
    expected, routing, _ = brute_force(q, k, v, n_win, topk, 0.6)
    out, got = bi_level_routing_attention(q, k, v, n_win, topk, scale=0.6, return_routing=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(got.sort(-1).values, routing.sort(-1).values)


def test_runs_on_block_sparse_indices_without_kv_copies(monkeypatch):
    """The reference: the routed regions are block indices over one region-ordered copy of K/V."""
    import zoo.ops.routing.naive as naive

    calls = []

    def spy(q, k, v, **kwargs):
        calls.append((k.shape, kwargs))
        return block_sparse_attention_reference(q, k, v, **kwargs)

    monkeypatch.setattr(naive, "block_sparse_attention_reference", spy)
    q = torch.randn(2, 9, 10, 2, 4)
    bi_level_routing_attention(q, q, q, 3, 4)
    ((k_shape, kwargs),) = calls
    assert k_shape == (2, 2, 9 * 12, 4)  # one region-ordered copy of K (3x4 regions), not topk of them
    assert kwargs["block_size"] == 12 and kwargs["block_indices"].shape == (2, 1, 9, 4)
    assert torch.equal(kwargs["block_indices"].sort(-1).values, bra_routing(q, q, 3, 4)[:, None].sort(-1).values)
    assert kwargs["key_padding_mask"].shape == (1, 108) and int(kwargs["key_padding_mask"].sum()) == 18


@pytest.mark.parametrize("n_win,topk,heads", [(7, 4, 2), (4, 1, 3), (2, 4, 1)])
def test_matches_official_gather_algorithm(n_win, topk, heads):
    h = w = 2 * n_win if n_win > 2 else 6
    q, k, v = (_rand(2, h, w, heads, 4, seed=s) for s in (4, 5, 6))
    scale = (heads * 4) ** -0.5  # the released models' full-width scale
    out, grads = _grads(lambda q, k, v: bi_level_routing_attention(q, k, v, n_win, topk, scale=scale), q, k, v)
    out_ref, grads_ref = _grads(lambda q, k, v: official_bra(q, k, v, n_win, topk, scale)[0], q, k, v)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    routing = bra_routing(q, k, n_win, topk, scale=scale)
    torch.testing.assert_close(routing, official_bra(q, k, v, n_win, topk, scale)[1])


def test_routing_is_detached_and_shared_by_heads():
    q, k, v = (_rand(1, 8, 8, 2, 4, seed=s) for s in (7, 8, 9))
    base = bra_routing(q, k, 4, 3)
    # scaling one head's keys changes the (shared, full-width) region affinity of every head
    k2 = k.clone()
    k2[..., 1, :] *= -3
    assert not torch.equal(bra_routing(q, k2, 4, 3), base)
    q.requires_grad_(True)
    out = bi_level_routing_attention(q, k, v, 4, 3)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all()
    assert not bra_routing(q, k, 4, 3).requires_grad


def test_default_scale_is_head_dim():
    q, k, v = (_rand(1, 6, 6, 2, 4, seed=s) for s in (10, 11, 12))
    torch.testing.assert_close(
        bi_level_routing_attention(q, k, v, 3, 2), bi_level_routing_attention(q, k, v, 3, 2, scale=0.5)
    )
    assert not torch.allclose(
        bi_level_routing_attention(q, k, v, 3, 2), bi_level_routing_attention(q, k, v, 3, 2, scale=8 ** -0.5)
    )


def test_rectangular_n_win_and_float32():
    q, k, v = (_rand(1, 7, 9, 2, 4, seed=s) for s in (13, 14, 15))
    out = bi_level_routing_attention(q.float(), k.float(), v.float(), (2, 3), 2)
    expected, routing, _ = brute_force(q, k, v, (2, 3), 2, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bra_routing(q, k, (2, 3), 2).sort(-1).values, routing.sort(-1).values)


class _BRA(nn.Module):
    def __init__(self, n_win, topk):
        super().__init__()
        self.n_win, self.topk = n_win, topk

    def forward(self, q, k, v):
        return bi_level_routing_attention(q, k, v, self.n_win, self.topk)


@pytest.mark.parametrize("h,w", [(8, 8), (7, 10)])
def test_flops_are_routing_matmul_plus_routed_pairs(h, w):
    b, heads, d, dv, n_win, topk = 2, 2, 4, 6, 4, 3
    q, k = torch.randn(b, h, w, heads, d, dtype=DT), torch.randn(b, h, w, heads, d, dtype=DT)
    v = torch.randn(b, h, w, heads, dv, dtype=DT)
    _, _, mask = brute_force(q, k, v, n_win, topk, d ** -0.5)
    expected = b * (n_win**2) ** 2 * heads * d + int(mask.sum()) * heads * (d + dv)
    assert zoo.flops(_BRA(n_win, topk), inputs=(q.float(), k.float(), v.float())) == expected


def test_block_sparse_key_padding_mask_matches_dense_oracle():
    b, heads, n, d, block = 2, 2, 11, 4, 3
    q, k, v = (_rand(b, heads, n, d, seed=s) for s in (20, 21, 22))
    n_blocks = math.ceil(n / block)
    block_mask = torch.rand(b, 1, n_blocks, n_blocks, generator=torch.Generator().manual_seed(0)) < 0.6
    block_mask[..., 0] = True
    padded = torch.zeros(b, n, dtype=torch.bool)
    padded[0, [1, 4, 5]] = True
    padded[1, [0, 2]] = True
    dense = torch.zeros(b, 1, n, n, dtype=torch.bool)
    for bi in range(b):
        for i in range(n):
            for j in range(n):
                dense[bi, 0, i, j] = bool(block_mask[bi, 0, i // block, j // block]) and not bool(padded[bi, j])
    logits = ((q @ k.transpose(-1, -2)) * d**-0.5).masked_fill(~dense, -math.inf)
    expected = torch.nan_to_num(logits.softmax(-1)) @ v
    out = block_sparse_attention(q, k, v, block_mask=block_mask, block_size=block, key_padding_mask=padded)
    torch.testing.assert_close(out, expected)
    # no mask = unchanged behaviour
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, block_mask=block_mask, block_size=block),
        block_sparse_attention(q, k, v, block_mask=block_mask, block_size=block,
                               key_padding_mask=torch.zeros(1, n, dtype=torch.bool)),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(key_padding_mask=torch.zeros(2, 11)), "key_padding_mask must be a bool"),
        (dict(key_padding_mask=torch.zeros(2, 10, dtype=torch.bool)),
         r"key_padding_mask must have shape \[batch\|1, 11\]"),
    ],
)
def test_block_sparse_key_padding_mask_errors(kwargs, match):
    q = torch.randn(2, 1, 11, 4)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, q, q, block_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size=3, **kwargs)


def _qkv(shape=(1, 6, 6, 2, 4)):
    return torch.randn(*shape), torch.randn(*shape), torch.randn(*shape)


@pytest.mark.parametrize(
    "case,match",
    [
        (lambda q, k, v: bi_level_routing_attention(q[0], k[0], v[0], 3, 2), "q must have rank 5"),
        (lambda q, k, v: bi_level_routing_attention(q, k, v, 3, 0),
         r"topk must be an int in \[1, n_win\^2 = 9\], got 0"),
        (lambda q, k, v: bi_level_routing_attention(q, k, v, 3, 10), "got 10"),
        (lambda q, k, v: bi_level_routing_attention(q, k, v, 3, 2.0), "got 2.0"),
        (lambda q, k, v: bi_level_routing_attention(q, k, v, 0, 1), "n_win must be a positive int"),
        (lambda q, k, v: bi_level_routing_attention(q, k, v, (2, 2, 2), 1), "n_win must be"),
        (lambda q, k, v: bi_level_routing_attention(q, k[..., :3], v, 3, 2), "must have the same shape"),
        (lambda q, k, v: bi_level_routing_attention(q, k, v[:, :, :, :1], 3, 2), "must match q"),
        (lambda q, k, v: bi_level_routing_attention(q, k.double(), v, 3, 2), "dtype"),
        (lambda q, k, v: bi_level_routing_attention(q, k, v, 3, 2, scale=-1.0), "scale must be a positive"),
        (lambda q, k, v: bi_level_routing_attention(q.int(), k, v, 3, 2), "floating-point"),
    ],
    ids=["rank", "topk0", "topk-big", "topk-float", "n_win0", "n_win-3d", "k-shape", "v-heads", "dtype", "scale",
         "int"],
)
def test_bad_inputs_raise_value_error(case, match):
    with pytest.raises(ValueError, match=match):
        case(*_qkv())
