"""block_sparse_attention against a dense oracle with an element-level mask (float64)."""
import math

import pytest
import torch
from zoo.ops import block_indices_to_mask, block_mask_to_indices, block_sparse_attention


def oracle(q, k, v, block_mask, bq, bk, scale=None):
    """Dense attention with the element mask built position by position from the block rule."""
    nq, nk = q.shape[2], k.shape[2]
    allowed = torch.zeros(block_mask.shape[0], block_mask.shape[1], nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            allowed[:, :, i, j] = block_mask[:, :, i // bq, j // bk]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)
    return probs @ v, lse


@pytest.mark.parametrize("nq,nk,bq,bk,d,dv", [(37, 29, 8, 8, 5, 7), (16, 16, 4, 4, 4, 4), (23, 41, 5, 6, 8, 3)])
def test_matches_oracle_with_grads(nq, nk, bq, bk, d, dv):
    torch.manual_seed(nq * nk)
    b, h = 2, 3
    q = torch.randn(b, h, nq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, nk, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, nk, dv, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(b, h, math.ceil(nq / bq), math.ceil(nk / bk)) < 0.5
    mask[0, 0, 0] = False  # a query block with no keys at all
    out, lse = block_sparse_attention(q, k, v, block_mask=mask, block_size=(bq, bk), return_lse=True, scale=0.3)
    ref, ref_lse = oracle(q, k, v, mask, bq, bk, scale=0.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.all(out[0, 0, :bq] == 0) and torch.all(torch.isneginf(lse[0, 0, :bq]))
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_indices_and_mask_are_equivalent_and_broadcast():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 30, 8, dtype=torch.float64)
    mask = torch.rand(1, 4, 4, 4) < 0.6
    idx = block_mask_to_indices(mask)
    assert torch.equal(block_indices_to_mask(idx, 4), mask)
    a = block_sparse_attention(q, q, q, block_mask=mask, block_size=8)
    b = block_sparse_attention(q, q, q, block_indices=idx, block_size=8)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, oracle(q, q, q, mask.expand(2, -1, -1, -1), 8, 8)[0])


def test_chunking_does_not_change_the_result():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 50, 4, dtype=torch.float64)
    mask = torch.rand(1, 2, 7, 7) < 0.5
    full = block_sparse_attention(q, q, q, block_mask=mask, block_size=8)
    from zoo.ops.block_sparse.naive import block_sparse_attention_reference

    tiny = block_sparse_attention_reference(q, q, q, block_mask=mask, block_size=8, chunk_elements=1)
    torch.testing.assert_close(full, tiny)


def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 2, 16, 8)
    good = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="q must have rank 4"):
        block_sparse_attention(q[0], q, q, block_mask=good, block_size=8)
    with pytest.raises(ValueError, match="block_mask must have shape"):
        block_sparse_attention(q, q, q, block_mask=torch.ones(1, 2, 3, 2, dtype=torch.bool), block_size=8)
    with pytest.raises(ValueError, match="exactly one of block_mask or block_indices"):
        block_sparse_attention(q, q, q, block_size=8)
    with pytest.raises(ValueError, match="k has dtype"):
        block_sparse_attention(q, q.double(), q, block_mask=good, block_size=8)
    with pytest.raises(ValueError, match="twice"):
        block_sparse_attention(q, q, q, block_indices=torch.tensor([[[[0, 0], [1, -1]]]]), block_size=8)
    with pytest.raises(ValueError, match="lists key block 5"):
        block_sparse_attention(q, q, q, block_indices=torch.tensor([[[[5], [1]]]]), block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, q, q, block_mask=good, block_size=0)


def test_autocast_casts_inputs_like_sdpa():
    """Inside autocast, fp32 q/k (norms, RoPE) with a bf16 v run in bf16, as SDPA would."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 2, 16, 8).unbind(0)
    v = torch.randn(1, 2, 16, 8).bfloat16()
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="dtype"):  # outside autocast mixed dtypes are an error
        block_sparse_attention(q, k, v, block_mask=mask, block_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block_sparse_attention(q, k, v, block_mask=mask, block_size=8)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_layout_builds_transposed_lists_on_demand():
    from zoo.ops.block_sparse.layout import BlockSparseLayout

    torch.manual_seed(1)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(10)]).view(2, 1, 5, 3)
    idx[0, 0, 1, 2] = -1
    eager = BlockSparseLayout.from_checked(idx, 16, 16, 80, 96)
    lazy = BlockSparseLayout.from_checked(idx, 16, 16, 80, 96, transpose=False)
    assert lazy.t_indices is None and lazy.t_counts is None
    for got, want in zip(lazy.transposed(), (eager.t_indices, eager.t_counts)):
        assert torch.equal(got, want)
    assert lazy.transposed()[0] is lazy.t_indices  # built once
    mask = block_indices_to_mask(idx, 6)
    assert torch.equal(eager.t_counts, mask.sum(-2, dtype=torch.int32))  # query blocks listing each key block
