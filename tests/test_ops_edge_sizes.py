"""Batch 0 and empty sequences: every op and model returns an empty output of the right shape and dtype
whose backward runs (as F.scaled_dot_product_attention does), or a one-line error where empty is meaningless."""
from __future__ import annotations

import pytest
import torch

import zoo
from zoo import ops


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def bsa(q, k, v, n_q, n_k, block=4):
    mask = torch.ones(1, 1, -(-n_q // block), -(-n_k // block), dtype=torch.bool)
    return ops.block_sparse_attention(q, k, v, block_mask=mask, block_size=block)


EMPTY_CALLS = {  # name: (inputs, call, expected output shape)
    "na1d batch 0": ([r(0, 8, 2, 4)] * 3, lambda q, k, v: ops.na1d(q, k, v, 3), (0, 8, 2, 4)),
    "na2d batch 0": ([r(0, 5, 6, 2, 4)] * 3, lambda q, k, v: ops.na2d(q, k, v, 3, rpb=None), (0, 5, 6, 2, 4)),
    "na3d batch 0": ([r(0, 4, 4, 4, 2, 4)] * 3, lambda q, k, v: ops.na3d(q, k, v, 3), (0, 4, 4, 4, 2, 4)),
    "block-sparse batch 0": ([r(0, 2, 10, 4)] * 3, lambda q, k, v: bsa(q, k, v, 10, 10), (0, 2, 10, 4)),
    "block-sparse no queries": ([r(1, 2, 0, 4), r(1, 2, 8, 4), r(1, 2, 8, 4)], lambda q, k, v: bsa(q, k, v, 0, 8),
                                (1, 2, 0, 4)),
    "block-sparse no keys": ([r(1, 2, 5, 4), r(1, 2, 0, 4), r(1, 2, 0, 4)], lambda q, k, v: bsa(q, k, v, 5, 0),
                             (1, 2, 5, 4)),
    "radial batch 0": ([r(0, 2, 12, 4)] * 3, lambda q, k, v: ops.radial_attention(q, k, v, 3, 4, 1.0, block_size=4),
                       (0, 2, 12, 4)),
    "SLA batch 0": ([r(0, 2, 10, 4)] * 3, lambda q, k, v: ops.sparse_linear_attention(
        q, k, v, torch.eye(4, dtype=q.dtype), topk=0.5, block_size=4), (0, 2, 10, 4)),
    "SLA no queries": ([r(1, 2, 0, 4), r(1, 2, 8, 4), r(1, 2, 8, 4)], lambda q, k, v: ops.sparse_linear_attention(
        q, k, v, torch.eye(4, dtype=q.dtype), topk=0.5, block_size=4), (1, 2, 0, 4)),
    "SLA module batch 0": ([r(0, 2, 10, 4)] * 3, lambda q, k, v: ops.SparseLinearAttention(4, 0.5, block_size=4).double()(
        q, k, v), (0, 2, 10, 4)),
    "routing batch 0": ([r(0, 6, 6, 2, 4)] * 3, lambda q, k, v: ops.bi_level_routing_attention(q, k, v, 2, 2),
                        (0, 6, 6, 2, 4)),
    "agent batch 0": ([r(0, 2, 10, 4)] * 3 + [r(0, 2, 3, 4)], ops.agent_attention, (0, 2, 10, 4)),
    "linear batch 0": ([r(0, 2, 10, 4)] * 3, ops.linear_attention, (0, 2, 10, 4)),
    "InLine batch 0": ([r(0, 2, 10, 4)] * 3, ops.injective_linear_attention, (0, 2, 10, 4)),
    "decoupled batch 0": ([r(0, 2, 10, 4)] * 5, ops.decoupled_linear_attention, (0, 2, 10, 4)),
    "MALA batch 0": ([r(0, 2, 10, 4)] * 3, ops.mala_attention, (0, 2, 10, 4)),
    "RALA batch 0": ([r(0, 2, 10, 4)] * 3, ops.rala_attention, (0, 2, 10, 4)),
    "focused map batch 0": ([r(0, 10, 4)], ops.focused_feature_map, (0, 10, 4)),
    "pool_agents batch 0": ([r(0, 16, 4)], lambda x: ops.pool_agents(x, (4, 4), (2, 2)), (0, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CALLS))
def test_empty_input_gives_empty_differentiable_output(name):
    inputs, call, shape = EMPTY_CALLS[name]
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = call(*inputs)
    assert tuple(out.shape) == shape and out.dtype == torch.float64
    if out.numel():  # queries without keys see nothing: zeros, as SDPA
        assert not out.abs().max()
    out.sum().backward()
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.abs().sum()


def test_empty_spatial_axis_is_a_one_line_error():
    with pytest.raises(ValueError, match="kernel_size") as info:
        ops.na2d(*[r(1, 0, 6, 2, 4)] * 3, kernel_size=3)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="empty spatial axis") as info:
        ops.bi_level_routing_attention(*[r(1, 0, 6, 2, 4)] * 3, n_win=2, topk=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["nat_mnist", "biformer_mnist", "agent_swin_mnist", "mavit_mnist", "inline_deit_tiny",
                                  "flatten_swin_tiny"])
def test_classifier_batch_0(name):
    model = zoo.create_model(name)
    x = torch.randn(0, *model.pretrained_cfg.get("input_size", (3, 224, 224)), requires_grad=True)
    out = model(x)
    assert out.shape[0] == 0
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", ["dit_s_2_mnist", "video_dit_tiny"])
def test_generator_batch_0(name):
    model = zoo.create_model(name).eval()
    inputs = [t[:0] if isinstance(t, torch.Tensor) and t.ndim else t for t in model.example_inputs(batch_size=1)]
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape[0] == 0 and out.shape[1:] == model(*model.example_inputs(batch_size=1)).shape[1:]
