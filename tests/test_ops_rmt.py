"""MALA / RALA linear attention against dense float64 oracles built score by score."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.ops import mala_attention, rala_attention

import zoo

OPS = {"mala": mala_attention, "rala": rala_attention}


def _features(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.elu(torch.randn(*shape, generator=g, dtype=dtype)) + 1  # phi(x) = ELU + 1, as the models


def _inputs(b=2, h=3, nq=37, nk=29, d=8, dv=5, decoupled=True):
    q, k = _features(b, h, nq, d, seed=1), _features(b, h, nk, d, seed=2)
    v = torch.randn(b, h, nk, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if not decoupled:
        return q, k, v, None, None
    # numerator features differ from q, k (the RoPE'd case); may be negative
    q_num = torch.randn(b, h, nq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    k_num = torch.randn(b, h, nk, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return q, k, v, q_num, k_num


def oracle_mala(q, k, v, q_num=None, k_num=None, scale=None, eps=1e-6):
    """A_ij = (1 + 1/(z_i+eps)) s/N q_num_i.k_num_j - z_i/N with z_i = s/N sum_l q_i.k_l; y = A v."""
    q_num = q if q_num is None else q_num
    k_num = k if k_num is None else k_num
    b, h, nq, d = q.shape
    nk = k.shape[2]
    s = d**-0.5 if scale is None else scale
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            dots = q[bi, hi] @ k[bi, hi].T  # [nq, nk]: q_i . k_l
            z = s * dots.sum(1) / nk
            num = q_num[bi, hi] @ k_num[bi, hi].T
            attn = torch.empty(nq, nk, dtype=torch.float64)
            for i in range(nq):
                attn[i] = (1 + 1 / (z[i] + eps)) * s / nk * num[i] - z[i] / nk
            out[bi, hi] = attn @ v[bi, hi]
    return out


def oracle_rala(q, k, v, q_num=None, k_num=None, scale=None, eps=1e-6):
    """w = softmax_j(s mean_i(q_i).k_j); A_ij = w_j q_num_i.k_num_j / (sum_l w_l q_i.k_l + eps); y = A v."""
    q_num = q if q_num is None else q_num
    k_num = k if k_num is None else k_num
    b, h, nq, d = q.shape
    nk = k.shape[2]
    s = d**-0.5 if scale is None else scale
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            logits = torch.stack([s * (q[bi, hi].mean(0) * k[bi, hi, j]).sum() for j in range(nk)])
            w = logits.exp() / logits.exp().sum()
            dots = q[bi, hi] @ k[bi, hi].T
            num = q_num[bi, hi] @ k_num[bi, hi].T
            attn = torch.empty(nq, nk, dtype=torch.float64)
            for i in range(nq):
                attn[i] = w * num[i] / ((w * dots[i]).sum() + eps)
            out[bi, hi] = attn @ v[bi, hi]
    return out


ORACLES = {"mala": oracle_mala, "rala": oracle_rala}


@pytest.mark.parametrize("name", ["mala", "rala"])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_oracle(name, decoupled, scale):
    q, k, v, qn, kn = _inputs(decoupled=decoupled)
    out = OPS[name](q, k, v, q_num=qn, k_num=kn, scale=scale)
    torch.testing.assert_close(out, ORACLES[name](q, k, v, qn, kn, scale=scale), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mala", "rala"])
def test_grads_match_oracle(name):
    tensors = [t.requires_grad_() for t in _inputs(b=1, h=2, nq=13, nk=11, d=4, dv=3)]
    grad_out = torch.randn(1, 2, 13, 3, dtype=torch.float64)
    ours = torch.autograd.grad((OPS[name](*tensors) * grad_out).sum(), tensors)
    ref = torch.autograd.grad((ORACLES[name](*tensors) * grad_out).sum(), tensors)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
    small = [t.detach().clone().requires_grad_() for t in _inputs(b=1, h=1, nq=5, nk=6, d=4, dv=3)]
    assert torch.autograd.gradcheck(lambda *t: OPS[name](*t), small)


def _rope(x, seed=7):
    """A RoPE-like per-token rotation of channel pairs (linear per token)."""
    n, d = x.shape[-2:]
    theta = torch.rand(n, d // 2, generator=torch.Generator().manual_seed(seed), dtype=x.dtype) * 6.28
    cos, sin = theta.cos().repeat_interleave(2, -1), theta.sin().repeat_interleave(2, -1)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
    return x * cos + rotated * sin


def test_rala_rope_after_reweighting():
    """Official order: re-weight keys by e_j N, then RoPE them; equals passing RoPE(k) as k_num."""
    q, k, v, _, _ = _inputs(decoupled=False)
    n = k.shape[2]
    e = torch.softmax(k.shape[-1] ** -0.5 * q.mean(2, keepdim=True) @ k.transpose(-1, -2), -1).transpose(-1, -2)
    k_w = k * e * n
    z = 1 / (q @ k_w.mean(2, keepdim=True).transpose(-1, -2) + 1e-6)
    kv = (_rope(k_w).transpose(-1, -2) * n**-0.5) @ (v * n**-0.5)
    official = _rope(q) @ kv * z
    torch.testing.assert_close(rala_attention(q, k, v, q_num=_rope(q), k_num=_rope(k)), official)


def test_mala_scores_sum_to_one():
    """MALA scores sum to one: sum_j A_ij = beta_i z_i - z_i = 1 (eps -> 0)."""
    q, k, _, _, _ = _inputs(decoupled=False)
    v = torch.ones(2, 3, 29, 1, dtype=torch.float64)
    torch.testing.assert_close(mala_attention(q, k, v, eps=1e-300), torch.ones(2, 3, 37, 1, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mala", "rala"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_64k_tokens(name, dtype):
    n, d = 65536, 16
    g = torch.Generator().manual_seed(0)
    q = F.elu(4 * torch.randn(1, 2, n, d, generator=g)) + 1
    q[:, :, :64] = 1e-7  # queries with ~zero magnitude: z ~ 0, 1/(z + eps) ~ 1e6 overflows float16
    k = F.elu(4 * torch.randn(1, 2, n, d, generator=g)) + 1
    v = 30 * torch.randn(1, 2, n, d, generator=g)
    ref = OPS[name](q.double(), k.double(), v.double())
    out = OPS[name](q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 0.05


@pytest.mark.parametrize("name", ["mala", "rala"])
def test_autocast_runs_in_float32(name):
    q, k, v, qn, kn = (t.float() for t in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OPS[name](q, k, v, qn, kn)
    torch.testing.assert_close(out, OPS[name](q, k, v, qn, kn))


@pytest.mark.parametrize("name", ["mala", "rala"])
def test_flop_count(name):
    class Wrap(torch.nn.Module):
        def forward(self, x):
            q = k = x[..., :8]
            return OPS[name](q, k, x[..., 8:])

    b, h, n, d, dv = 2, 3, 50, 8, 4
    extra = n * d if name == "rala" else 0
    expected = b * h * (n * d + extra + 2 * n * d * dv)
    assert zoo.flops(Wrap(), inputs=(torch.rand(b, h, n, d + dv),)) == expected


@pytest.mark.parametrize("name", ["mala", "rala"])
def test_bad_inputs(name):
    op = OPS[name]
    q, k, v, _, _ = (t.float() if t is not None else None for t in _inputs(decoupled=False))
    with pytest.raises(ValueError, match="q must have rank 4"):
        op(q[0], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        op(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v must have k's seq_len"):
        op(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"batch, heads"):
        op(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="dtype"):
        op(q, k.double(), v)
    with pytest.raises(ValueError, match="k_num must have k's shape"):
        op(q, k, v, k_num=k[:, :, :3])
    with pytest.raises(ValueError, match="q_num has dtype"):
        op(q, k, v, q_num=q.half())
    with pytest.raises(ValueError, match="scale must be a positive"):
        op(q, k, v, scale=0.0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        op(q, k, v, eps=0)
    with pytest.raises(ValueError, match="at least one key"):
        op(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="floating-point"):
        op(q.long(), k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mala", "rala"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_64k_tokens_cuda(name, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (F.elu(4 * torch.randn(2, 4, 65536, 64, device="cuda", generator=g)) + 1 for _ in range(2))
    v = 30 * torch.randn(2, 4, 65536, 64, device="cuda", generator=g)
    ref = OPS[name](q.double(), k.double(), v.double())
    with torch.autocast("cuda", dtype=dtype):
        out = OPS[name](q.to(dtype), k.to(dtype), v.to(dtype))
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 0.05
