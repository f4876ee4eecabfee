"""zoo.ops agent and linear attention against element-by-element float64 oracles."""
import math

import pytest
import torch
import zoo.ops as ops
from zoo.ops import counting_flops

torch.manual_seed(0)
F64 = dict(dtype=torch.float64)


def _rand(*shape, requires_grad=True):
    return torch.randn(*shape, **F64).requires_grad_(requires_grad)


# ---------------------------------------------------------------- oracles (loops over rows)

def agent_oracle(q, k, v, a, ab, qb, scale, qscale):
    b, h, n, _ = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], **F64)
    for bi in range(b):
        for hi in range(h):
            agent_v = []
            for j in range(a.shape[2]):
                logits = torch.stack([scale * (a[bi, hi, j] * k[bi, hi, t]).sum() + ab[0, hi, j, t] for t in range(k.shape[2])])
                w = torch.exp(logits - logits.max())
                agent_v.append((w / w.sum()) @ v[bi, hi])
            agent_v = torch.stack(agent_v)
            for i in range(n):
                logits = torch.stack([qscale * (q[bi, hi, i] * a[bi, hi, j]).sum() + qb[0, hi, i, j] for j in range(a.shape[2])])
                w = torch.exp(logits - logits.max())
                out[bi, hi, i] = (w / w.sum()) @ agent_v
    return out


def linear_oracle(q, k, v, qn, kn):
    b, h, n, _ = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], **F64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                num = sum((qn[bi, hi, i] * kn[bi, hi, j]).sum() * v[bi, hi, j] for j in range(k.shape[2]))
                den = sum((q[bi, hi, i] * k[bi, hi, j]).sum() for j in range(k.shape[2]))
                out[bi, hi, i] = num / den
    return out


def inline_oracle(q, k, v):
    b, h, n, d = q.shape
    nk, s = k.shape[2], d ** -0.5
    out = torch.zeros(b, h, n, v.shape[-1], **F64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                sims = torch.stack([s / nk * (q[bi, hi, i] * k[bi, hi, j]).sum() for j in range(nk)])
                scores = sims - sims.mean() + 1.0 / nk  # the injective scores (phi(Q) scaled by s/N), sum to 1
                out[bi, hi, i] = scores @ v[bi, hi]
    return out


def bilinear(x, size):
    """align_corners=False bilinear resize of [..., h, w], from the index formula."""
    h0, w0 = x.shape[-2:]
    out = torch.zeros(*x.shape[:-2], *size, **F64)

    def src(i, n_in, n_out):
        c = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(c)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        return lo, hi, c - lo

    for i in range(size[0]):
        y0, y1, fy = src(i, h0, size[0])
        for j in range(size[1]):
            x0, x1, fx = src(j, w0, size[1])
            out[..., i, j] = ((1 - fy) * ((1 - fx) * x[..., y0, x0] + fx * x[..., y0, x1])
                              + fy * ((1 - fx) * x[..., y1, x0] + fx * x[..., y1, x1]))
    return out


# ---------------------------------------------------------------- agent attention

@pytest.mark.parametrize("n_q,n_k,n_a,d,dv", [(7, 5, 4, 3, 2), (12, 12, 9, 5, 5)])
def test_agent_attention_matches_oracle(n_q, n_k, n_a, d, dv):
    q, k, v, a = _rand(2, 3, n_q, d), _rand(2, 3, n_k, d), _rand(2, 3, n_k, dv), _rand(2, 3, n_a, d)
    ab, qb = _rand(1, 3, n_a, n_k), _rand(1, 3, n_q, n_a)
    out = ops.agent_attention(q, k, v, a, agent_bias=ab, query_bias=qb, scale=0.7, query_scale=0.3)
    ref = agent_oracle(q, k, v, a, ab, qb, 0.7, 0.3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, a, ab, qb), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, a, ab, qb), g)
    for x, y in zip(grads, ref_grads):
        torch.testing.assert_close(x, y)


def test_agent_attention_default_scale_and_no_bias():
    q, k, v, a = _rand(1, 2, 5, 4), _rand(1, 2, 6, 4), _rand(1, 2, 6, 3), _rand(1, 2, 4, 4)
    out = ops.agent_attention(q, k, v, a)
    ref = agent_oracle(q, k, v, a, torch.zeros(1, 2, 4, 6, **F64), torch.zeros(1, 2, 5, 4, **F64), 0.5, 0.5)
    torch.testing.assert_close(out, ref)


def test_pool_agents_is_block_mean():
    x = _rand(2, 6 * 4, 5, requires_grad=False)
    out = ops.pool_agents(x, (6, 4), (3, 2))
    grid = x.reshape(2, 6, 4, 5)
    ref = torch.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2)) for i in range(3) for j in range(2)], 1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("key_size,query_size", [((5, 5), (5, 5)), ((4, 6), (9, 7))])
def test_build_agent_biases_elementwise(key_size, query_size):
    heads, n, h0, w0 = 2, 4, 5, 5
    an, na = _rand(heads, n, 7, 7), _rand(heads, n, 7, 7)
    ah, aw = _rand(1, heads, n, h0, 1), _rand(1, heads, n, 1, w0)
    ha, wa = _rand(1, heads, h0, 1, n), _rand(1, heads, 1, w0, n)
    kb, qb = ops.build_agent_biases(an, na, ah, aw, ha, wa, key_size, query_size)
    assert kb.shape == (1, heads, n, key_size[0] * key_size[1]) and qb.shape == (1, heads, query_size[0] * query_size[1], n)
    rowcol = ah[0] + aw[0]  # heads, n, h0, w0, by broadcasting
    rowcol = rowcol if key_size == (h0, w0) else bilinear(rowcol, key_size)
    ref_k = bilinear(an, key_size) + rowcol
    q_rowcol = (ha[0] + wa[0]).permute(0, 3, 1, 2)
    q_rowcol = q_rowcol if query_size == (h0, w0) else bilinear(q_rowcol, query_size)
    ref_q = bilinear(na, query_size) + q_rowcol
    torch.testing.assert_close(kb[0], ref_k.flatten(2))
    torch.testing.assert_close(qb[0], ref_q.flatten(2).transpose(1, 2))


def test_row_bias_resize_equals_finetune_1d_linear():
    """The runtime 2-D resize equals the official fine-tuning code's 1-D linear resize."""
    ah = _rand(1, 2, 4, 6, 1, requires_grad=False)
    aw = torch.zeros(1, 2, 4, 1, 6, **F64)
    an = torch.zeros(2, 4, 7, 7, **F64)
    kb, _ = ops.build_agent_biases(an, an, ah, aw, ah.transpose(-1, -2).transpose(2, 4) * 0, aw.transpose(2, 4) * 0, (9, 6), (6, 6))
    lin = torch.nn.functional.interpolate(ah[0, :, :, :, 0], size=9, mode="linear")  # heads, n, 9
    torch.testing.assert_close(kb[0].reshape(2, 4, 9, 6), lin[..., None].expand(2, 4, 9, 6))


def test_agent_errors():
    q, k, v, a = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3), torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="q must have rank 4"):
        ops.agent_attention(q[0], k, v, a)
    with pytest.raises(ValueError, match="agents must have head_dim|k and agents"):
        ops.agent_attention(q, k, v, a[..., :3])
    with pytest.raises(ValueError, match="share batch and heads"):
        ops.agent_attention(q, k, v, a[:, :1])
    with pytest.raises(ValueError, match="agent_bias must have shape"):
        ops.agent_attention(q, k, v, a, agent_bias=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="query_bias must have shape"):
        ops.agent_attention(q, k, v, a, query_bias=torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="dtype"):
        ops.agent_attention(q, k.double(), v, a)
    with pytest.raises(ValueError, match="perfect square"):
        ops.agent_grid(10)
    with pytest.raises(ValueError, match="size="):
        ops.pool_agents(torch.randn(1, 10, 3), (3, 3), (2, 2))


def test_agent_cost_placeholder_shape():
    q, k, v, a = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 8, 4), torch.randn(2, 3, 8, 5), torch.randn(2, 3, 4, 4)
    with counting_flops():
        out = ops.agent_attention(q, k, v, a)
    assert out.shape == (2, 3, 10, 5)


# ---------------------------------------------------------------- linear attention family

def test_linear_attention_matches_oracle():
    q, k, v = _rand(2, 2, 7, 3).abs(), _rand(2, 2, 5, 3).abs(), _rand(2, 2, 5, 4)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    out = ops.linear_attention(q, k, v, eps=0.0)
    ref = linear_oracle(q, k, v, q, k)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(x, y)


def test_decoupled_linear_attention_matches_oracle():
    q, k, v = _rand(1, 3, 6, 4).abs(), _rand(1, 3, 9, 4).abs(), _rand(1, 3, 9, 2)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qn, kn = _rand(1, 3, 6, 4), _rand(1, 3, 9, 4)
    out = ops.decoupled_linear_attention(q, k, qn, kn, v, eps=0.0)
    # numerator sums over N, denominator over N: the N factors cancel in the mean form
    ref = linear_oracle(q, k, v, qn, kn)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, (q, k, qn, kn, v), g), torch.autograd.grad(ref, (q, k, qn, kn, v), g)):
        torch.testing.assert_close(x, y)


def test_injective_linear_attention_matches_oracle():
    q, k, v = _rand(2, 2, 5, 4), _rand(2, 2, 7, 4), _rand(2, 2, 7, 3)
    out = ops.injective_linear_attention(q, k, v)
    ref = inline_oracle(q, k, v)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(x, y)


def test_focused_feature_map_elementwise():
    x, s = _rand(2, 5, 6), _rand(1, 1, 6)
    out = ops.focused_feature_map(x, s, focusing_factor=3)
    ref = torch.zeros_like(out)
    for i in range(2):
        for t in range(5):
            y = [(max(float(x[i, t, c].detach()), 0.0) + 1e-6) / math.log1p(math.exp(float(s[0, 0, c].detach()))) for c in range(6)]
            n1 = math.sqrt(sum(e * e for e in y))
            n3 = math.sqrt(sum(e ** 6 for e in y))
            ref[i, t] = torch.tensor([e ** 3 / n3 * n1 for e in y], **F64)
    torch.testing.assert_close(out.detach(), ref)
    assert torch.autograd.gradcheck(lambda a, b: ops.focused_feature_map(a, b), (x[:1, :2], s))


def test_linear_errors():
    q = torch.rand(1, 2, 5, 4)
    with pytest.raises(ValueError, match="share head_dim"):
        ops.linear_attention(q, torch.rand(1, 2, 5, 3), torch.rand(1, 2, 5, 4))
    with pytest.raises(ValueError, match="keys and values must pair"):
        ops.injective_linear_attention(q, q, torch.rand(1, 2, 6, 4))
    with pytest.raises(ValueError, match="rank 4"):
        ops.linear_attention(q[0], q, q)
    with pytest.raises(ValueError, match="q_num/k_num"):
        ops.decoupled_linear_attention(q, q, q[:, :, :4], q, q)
    with pytest.raises(ValueError, match="focusing_factor"):
        ops.focused_feature_map(q, focusing_factor=0)
    with pytest.raises(ValueError, match="dtype"):
        ops.linear_attention(q, q.double(), q)


def test_linear_costs_are_exact_counts():
    q, k, v = torch.rand(2, 3, 10, 4), torch.rand(2, 3, 8, 4), torch.rand(2, 3, 8, 5)
    from zoo.flop_count import flops

    class M(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, q):
            return self.fn(q, k, v)

    expected = 2 * 3 * 4 * (8 * 5 + 10 * 5 + 10)
    for fn in (ops.linear_attention, ops.injective_linear_attention):
        assert flops(M(fn), inputs=(q,)) == expected
    agent = M(lambda q_, k_, v_: ops.agent_attention(q_, k_, v_, q_[:, :, :4]))
    assert flops(agent, inputs=(q,)) == 2 * 3 * 4 * (8 + 10) * (4 + 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_sequence_half_precision_has_no_nan(dtype):
    n = 65536
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 1, n, 16, generator=g) * 4).to(dtype)
    k = (torch.randn(1, 1, n, 16, generator=g) * 4 + 3).to(dtype)
    v = (torch.randn(1, 1, n, 16, generator=g) * 4).to(dtype)
    feats = ops.focused_feature_map(torch.cat([q, k], 0).transpose(1, 2).reshape(2, n, 16))
    fq, fk = feats[:1].reshape(1, n, 1, 16).transpose(1, 2), feats[1:].reshape(1, n, 1, 16).transpose(1, 2)
    outs = [ops.linear_attention(fq, fk, v), ops.injective_linear_attention(q, k, v),
            ops.decoupled_linear_attention(fq, fk, fq, fk, v), ops.agent_attention(q, k, v, q[:, :, :49])]
    for out in outs:
        assert out.dtype == dtype and torch.isfinite(out).all()
    ref = ops.linear_attention(fq.double(), fk.double(), v.double())
    torch.testing.assert_close(outs[0].double(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("p", [3.0, 2.5])
def test_focused_feature_map_backward_equals_autograd_of_the_formula(p):
    """The written-out backward against autograd through the plain formula (float64; a row with every channel
    negative, the temperature broadcast over a 4-D input, and none), and bfloat16 inputs against float64."""
    torch.manual_seed(0)
    x, s = _rand(2, 3, 2, 8), _rand(1, 1, 8)
    with torch.no_grad():
        x[0, 0, 1] = -x[0, 0, 1].abs()
    g = torch.randn(2, 3, 2, 8, **F64)

    def formula(x, s=None):
        y = torch.relu(x) + 1e-6
        y = y if s is None else y / torch.nn.functional.softplus(s)
        return y ** p / (y ** p).norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True)

    for got, want in zip(torch.autograd.grad(ops.focused_feature_map(x, s, p), (x, s), g),
                         torch.autograd.grad(formula(x, s), (x, s), g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ops.focused_feature_map(x, None, p), x, g)[0],
                               torch.autograd.grad(formula(x), x, g)[0], rtol=1e-10, atol=1e-12)
    xb = x.detach().bfloat16().requires_grad_()
    got = torch.autograd.grad(ops.focused_feature_map(xb, s.float(), p), xb, g.bfloat16())[0]
    exact = xb.detach().double().requires_grad_()
    want = torch.autograd.grad(formula(exact, s), exact, g.bfloat16().double())[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
