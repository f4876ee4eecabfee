"""SLA: the block classification against a loop, outputs and gradients against a dense float64
oracle with explicit element masks, the all-critical limit, fp16/bf16 at 64k tokens, FLOPs, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import dense_sla_oracle
from zoo.ops import SparseLinearAttention, counting_flops, sla_block_map, sparse_linear_attention

import zoo


def loop_block_map(q, k, topk, negligible, bq, bk):
    """Per (b, h, query block): mean-pooled scores with smooth-k, ranked by a Python sort."""
    B, H, nq, _ = q.shape
    nk = k.shape[2]
    kc = k - k.mean(2, keepdim=True)
    n_qb, n_kb = math.ceil(nq / bq), math.ceil(nk / bk)
    out = torch.zeros(B, H, n_qb, n_kb, dtype=torch.int8)
    n_crit = min(n_kb, int(topk * n_kb))
    n_neg = min(n_kb - n_crit, int(negligible * n_kb))
    for b in range(B):
        for h in range(H):
            for i in range(n_qb):
                pq = q[b, h, i * bq : (i + 1) * bq].mean(0)
                scores = [float(pq @ kc[b, h, j * bk : (j + 1) * bk].mean(0)) for j in range(n_kb)]
                order = sorted(range(n_kb), key=lambda j: -scores[j])
                for j in order[:n_crit]:
                    out[b, h, i, j] = 1
                for j in order[n_kb - n_neg :]:
                    out[b, h, i, j] = -1
    return out


def dense_oracle(q, k, v, w, bias, block_map, bq, bk, linear_on, feature_map, eps=1e-5):
    """O_s + proj(O_l), both written with N x N element masks (float64)."""
    o_s, o_l = dense_sla_oracle(q, k, v, block_map, bq, bk, linear_on, feature_map, eps)
    return o_s + F.linear(o_l, w, bias)


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


def test_block_map_matches_loop():
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 77, 6, dtype=torch.float64), torch.randn(2, 2, 61, 6, dtype=torch.float64)
    for topk, negligible in [(0.3, 0.0), (0.25, 0.4), (0.0, 0.5), (1.0, 0.0)]:
        got = sla_block_map(q, k, topk, negligible, block_size=(16, 8))
        assert torch.equal(got, loop_block_map(q, k, topk, negligible, 16, 8)), (topk, negligible)
    assert (sla_block_map(q, k, 0.25, 0.4, block_size=8) == 1).sum(-1).eq(2).all()  # int(0.25 * 8) per row


VARIANTS = [  # negligible, linear_on, feature_map
    (0.3, "marginal", "softmax"),  # paper: negligible blocks skipped
    (0.0, "marginal", "elu"),  # released SLA-1: every non-critical block linear
    (0.0, "all", "relu"),  # released main: linear over all tokens
    (0.2, "marginal", "relu"),
]


@pytest.mark.parametrize("negligible,linear_on,feature_map", VARIANTS)
def test_matches_dense_oracle_outputs_and_grads(negligible, linear_on, feature_map):
    torch.manual_seed(1)
    bq, bk = 16, 8
    q, k = randn(2, 3, 53, 8), randn(2, 3, 45, 8)
    v = randn(2, 3, 45, 5)
    w, bias = randn(5, 5, scale=0.5), randn(5)
    out = sparse_linear_attention(
        q, k, v, w, bias, topk=0.35, negligible=negligible, linear_on=linear_on, feature_map=feature_map,
        block_size=(bq, bk),
    )
    block_map = sla_block_map(q, k, 0.35, negligible, (bq, bk))
    assert (block_map == 0).any() and (block_map == 1).any()
    ref = dense_oracle(q, k, v, w, bias, block_map, bq, bk, linear_on, feature_map)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # the sparse branch runs in float32
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, w, bias), grad)
    want = torch.autograd.grad(ref, (q, k, v, w, bias), grad)
    for name, g, r in zip(["q", "k", "v", "proj_weight", "proj_bias"], got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_linear_branch_alone_matches_oracle_in_float64():
    """topk = 0: no critical block, O = proj(O_l) computed entirely in float64."""
    torch.manual_seed(2)
    q, k, v = randn(1, 2, 40, 4), randn(1, 2, 40, 4), randn(1, 2, 40, 4)
    w = randn(4, 4)
    out = sparse_linear_attention(q, k, v, w, topk=0.0, negligible=0.5, block_size=8)
    block_map = sla_block_map(q, k, 0.0, 0.5, 8)
    ref = dense_oracle(q, k, v, w, None, block_map, 8, 8, "marginal", "softmax")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    # SLA-1 with nothing critical is the main branch's linear attention over all tokens
    sla1 = sparse_linear_attention(q, k, v, w, topk=0.0, block_size=8)
    main = sparse_linear_attention(q, k, v, w, topk=0.0, linear_on="all", block_size=8)
    torch.testing.assert_close(sla1, main, atol=1e-12, rtol=1e-10)


def test_all_blocks_critical_equals_dense_attention():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 100, 16) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v)
    module = SparseLinearAttention(16, topk=1.0, block_size=(32, 16))
    torch.testing.assert_close(module(q, k, v), dense, atol=2e-6, rtol=1e-5)
    # no marginal block: O_l = 0, so any projection without bias leaves dense attention
    out = sparse_linear_attention(q, k, v, torch.randn(16, 16), topk=1.0, block_size=(32, 16))
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)


def test_module_zero_init_is_pure_sparse_attention_and_projection_learns():
    torch.manual_seed(4)
    module = SparseLinearAttention(8, topk=0.25, block_size=16)
    assert set(module.state_dict()) == {"proj_l.weight", "proj_l.bias"}  # official names
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    block_map = sla_block_map(q, k, 0.25, block_size=16)
    sparse = zoo.ops.block_sparse_attention(q, k, v, block_mask=block_map == 1, block_size=16)
    out = module(q, k, v)
    torch.testing.assert_close(out, sparse)
    out.square().sum().backward()
    assert module.proj_l.weight.grad.abs().sum() > 0 and module.proj_l.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_sequence_half_precision_is_finite(dtype):
    """64k tokens: with phi = elu + 1 the key sum Z over 64k keys is ~1.4e5, past fp16's 65504,
    so a branch that accumulated in the input precision would give inf."""
    torch.manual_seed(5)
    n, d = 65536, 16
    q, k, v = (torch.randn(1, 1, n, d).mul(4).to(dtype) for _ in range(3))
    eye = torch.eye(d)
    block_map = sla_block_map(q, k, topk=1 / 1024)  # one critical block of 64 keys per row
    assert torch.equal(block_map, sla_block_map(q.float(), k.float(), topk=1 / 1024))
    z = (F.elu(k.float()) + 1).sum(2)
    assert z.max() > torch.finfo(torch.float16).max  # the hazard is real at this length
    for linear_on in ("marginal", "all"):  # the same (rounded) inputs in float32 as the reference
        kw = dict(linear_on=linear_on, feature_map="elu", block_map=block_map)
        ref = sparse_linear_attention(q.float(), k.float(), v.float(), eye, **kw)
        out = sparse_linear_attention(q, k, v, eye, **kw)
        assert out.dtype == dtype and torch.isfinite(out).all(), linear_on
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        assert (out.float() - ref).abs().max() < tol * ref.abs().max(), linear_on


def test_flops_count_the_kept_blocks_and_the_linear_products():
    torch.manual_seed(6)
    n, d, bq, bk = 70, 8, 16, 8  # 5 query blocks (last has 6 rows), 9 key blocks (last has 6 keys)
    q, k, v = (torch.randn(1, 2, n, d) for _ in range(3))
    module = SparseLinearAttention(d, topk=0.34, negligible=0.2, block_size=(bq, bk))
    block_map = sla_block_map(q, k, 0.34, 0.2, (bq, bk))
    critical = (block_map == 1).repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :n, :n].sum()
    marginal_blocks = (block_map == 0).sum()
    expected = (
        int(critical) * (d + d)  # QK^T and PV on critical pairs
        + 2 * (5 * 9 * d + n * d * (d + 1) + n * d * (d + 1) + n * d * d)  # scores, S/Z, phi(Q)H/Z, proj
        + int(marginal_blocks) * d * (d + 1)  # H_i, Z_i over marginal blocks
    )
    assert zoo.flops(module, inputs=(q, k, v)) == expected
    main = SparseLinearAttention(d, topk=0.34, linear_on="all", block_size=(bq, bk))
    critical_main = (sla_block_map(q, k, 0.34, 0.0, (bq, bk)) == 1).repeat_interleave(bq, 2)
    critical_main = critical_main.repeat_interleave(bk, 3)[:, :, :n, :n].sum()
    expected_main = expected - int(critical) * 2 * d + int(critical_main) * 2 * d
    expected_main += (2 * 9 - int(marginal_blocks)) * d * (d + 1)  # H, Z: one sum of the 9 key blocks per head
    assert zoo.flops(main, inputs=(q, k, v)) == expected_main
    with counting_flops():
        assert module(q, k, v).shape == q.shape


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(topk=1.5), "topk"),
        (dict(topk=0.6, negligible=0.5), "negligible"),
        (dict(feature_map="hedgehog"), "feature_map"),
        (dict(linear_on="negligible"), "linear_on"),
        (dict(linear_on="all", negligible=0.1), "negligible"),
        (dict(block_size=(16, 0)), "block_size"),
        (dict(proj_weight=torch.zeros(8, 4)), "proj_weight"),
        (dict(proj_bias=torch.zeros(3)), "proj_bias"),
        (dict(q=torch.randn(2, 40, 8)), "q must have rank 4"),
        (dict(k=torch.randn(1, 2, 40, 6)), "head_dim"),
        (dict(v=torch.randn(1, 3, 40, 8)), "disagree"),
        (dict(v=torch.randn(1, 2, 40, 8, dtype=torch.float64)), "dtype"),
        (dict(block_map=torch.zeros(1, 2, 3, 2, dtype=torch.int8)), "block_map"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(q=torch.randn(1, 2, 40, 8), k=torch.randn(1, 2, 40, 8), v=torch.randn(1, 2, 40, 8),
                proj_weight=torch.zeros(8, 8), topk=0.25, block_size=16)
    with pytest.raises(ValueError, match=match):
        sparse_linear_attention(**dict(args, **kwargs))


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="topk"):
        SparseLinearAttention(8, topk=-0.1)
    with pytest.raises(ValueError, match="feature_map"):
        SparseLinearAttention(8, feature_map="hedgehog")
