"""Bad inputs to the ops and models: each gets a ONE-LINE error that names the argument (and no work is done)."""
from __future__ import annotations

import pytest
import torch

import zoo
from zoo import ops


def r(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def qkv(*shape: int):
    return r(*shape), r(*shape), r(*shape)


def _tiny_dit():
    return zoo.create_model("dit_s_2", input_size=8, in_channels=1, depth=1, hidden_size=32, num_heads=2, num_classes=10)


def _dit_inputs(y: list):
    return r(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor(y)


BAD_INPUTS = {
    "na2d q of wrong rank": (lambda: ops.na2d(r(1, 8, 2, 4), r(1, 8, 2, 4), r(1, 8, 2, 4), 3), "q must have rank 5"),
    "na2d heads not a multiple of kv heads": (
        lambda: ops.na2d(r(1, 6, 6, 3, 4), r(1, 6, 6, 2, 4), r(1, 6, 6, 2, 4), 3), "heads"),
    "na2d q/k head_dim mismatch": (
        lambda: ops.na2d(r(1, 6, 6, 2, 4), r(1, 6, 6, 2, 8), r(1, 6, 6, 2, 8), 3), "head_dim"),
    "na2d kernel_size larger than the axis": (
        lambda: ops.na2d(*qkv(1, 6, 6, 2, 4), kernel_size=7), "kernel_size"),
    "na1d dilation * kernel larger than the axis": (
        lambda: ops.na1d(*qkv(1, 8, 2, 4), kernel_size=3, dilation=3), "dilation"),
    "na1d negative kernel_size": (lambda: ops.na1d(*qkv(1, 8, 2, 4), kernel_size=-3), "kernel_size"),
    "na1d stride above kernel_size": (lambda: ops.na1d(*qkv(1, 8, 2, 4), kernel_size=3, stride=4), "stride"),
    "na2d non-finite scale": (lambda: ops.na2d(*qkv(1, 6, 6, 2, 4), kernel_size=3, scale=float("nan")), "scale"),
    "na2d rpb of wrong shape": (
        lambda: ops.na2d(*qkv(1, 6, 6, 2, 4), kernel_size=3, rpb=r(2, 3, 3)), "rpb"),
    "na1d integer q": (
        lambda: ops.na1d(torch.ones(1, 8, 2, 4, dtype=torch.long), r(1, 8, 2, 4), r(1, 8, 2, 4), 3), "q"),
    "na1d k on another device": (
        lambda: ops.na1d(r(1, 8, 2, 4), r(1, 8, 2, 4).to("meta"), r(1, 8, 2, 4), 3), "k is on meta"),
    "block-sparse block_size 0": (
        lambda: ops.block_sparse_attention(*qkv(1, 2, 8, 4), block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool),
                                           block_size=0), "block_size"),
    "block-sparse fractional block_size": (
        lambda: ops.block_sparse_attention(*qkv(1, 2, 8, 4), block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool),
                                           block_size=(4.5, 4)), "block_size must be a positive int"),
    "sla fractional block_size": (
        lambda: ops.sparse_linear_attention(*qkv(1, 2, 8, 4), r(4, 4), block_size=(4, 4.0)), "block_size"),
    "block-sparse key block out of range": (
        lambda: ops.block_sparse_attention(*qkv(1, 2, 8, 4), block_indices=torch.tensor([[[[0], [5]]]]),
                                           block_size=4), "block_indices"),
    "block-sparse float block_mask": (
        lambda: ops.block_sparse_attention(*qkv(1, 2, 8, 4), block_mask=torch.ones(1, 1, 2, 2), block_size=4),
        "block_mask"),
    "block-sparse block_mask for other lengths": (
        lambda: ops.block_sparse_attention(*qkv(1, 2, 8, 4), block_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool),
                                           block_size=4), "block_mask"),
    "block-sparse infinite scale": (
        lambda: ops.block_sparse_attention(*qkv(1, 2, 8, 4), block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool),
                                           block_size=4, scale=float("inf")), "scale"),
    "block-sparse key_padding_mask of wrong length": (
        lambda: ops.block_sparse_attention(*qkv(1, 2, 8, 4), block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool),
                                           block_size=4, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool)),
        "key_padding_mask"),
    "block-sparse key lists of terabytes": (  # 2^16 query blocks x 64 key blocks of 16384 keys: 1.2 TB of lists
        lambda: ops.block_sparse_attention(*(t.expand(1, 1, 1 << 20, 1) for t in qkv(1, 1, 1, 1)),
                                           block_indices=torch.arange(64).expand(1, 1, 1 << 16, 64),
                                           block_size=(16, 1 << 14)), "block_size"),
    "radial negative num_frames": (lambda: ops.radial_block_mask(-2, 16, 1.0, block_size=8), "num_frames"),
    "radial block mask of 39 TB": (lambda: ops.radial_block_mask(10000, 10000, 1.0, block_size=16), "39.1 TB"),
    "radial q of wrong length": (
        lambda: ops.radial_attention(*qkv(1, 2, 30, 4), num_frames=2, tokens_per_frame=16, decay_factor=1.0,
                                     block_size=8), "N = num_frames * tokens_per_frame"),
    "radial unknown model": (lambda: ops.radial_block_mask(2, 16, 1.0, 8, model="sora"), "model"),
    "SLA topk above 1": (
        lambda: ops.sparse_linear_attention(*qkv(1, 2, 8, 4), r(4, 4), topk=1.5, block_size=4), "topk"),
    "SLA unknown feature_map": (
        lambda: ops.sparse_linear_attention(*qkv(1, 2, 8, 4), r(4, 4), feature_map="tanh", block_size=4),
        "feature_map"),
    "SLA proj_weight of wrong shape": (
        lambda: ops.sparse_linear_attention(*qkv(1, 2, 8, 4), r(4, 3), block_size=4), "proj_weight"),
    "SLA block_map of wrong dtype": (
        lambda: ops.sparse_linear_attention(*qkv(1, 2, 8, 4), r(4, 4), block_size=4,
                                            block_map=torch.ones(1, 2, 2, 2)), "block_map"),
    "SLA module bad linear_on": (lambda: ops.SparseLinearAttention(4, linear_on="some"), "linear_on"),
    "routing topk above the regions": (
        lambda: ops.bi_level_routing_attention(*qkv(1, 6, 6, 2, 4), n_win=2, topk=5), "topk"),
    "routing n_win 0": (lambda: ops.bi_level_routing_attention(*qkv(1, 6, 6, 2, 4), n_win=0, topk=1), "n_win"),
    "routing NaN scale": (
        lambda: ops.bi_level_routing_attention(*qkv(1, 6, 6, 2, 4), n_win=2, topk=1, scale=float("nan")), "scale"),
    "agent agents with another head_dim": (
        lambda: ops.agent_attention(*qkv(1, 2, 8, 4), agents=r(1, 2, 3, 5)), "agents"),
    "agent query_bias of wrong shape": (
        lambda: ops.agent_attention(*qkv(1, 2, 8, 4), agents=r(1, 2, 3, 4), query_bias=r(1, 2, 8, 4)), "query_bias"),
    "pool_agents size that does not match the tokens": (lambda: ops.pool_agents(r(1, 15, 4), (4, 4), (2, 2)), "size"),
    "linear attention without keys": (lambda: ops.linear_attention(r(1, 2, 8, 4), r(1, 2, 0, 4), r(1, 2, 0, 4)), "k"),
    "MALA zero eps": (lambda: ops.mala_attention(*qkv(1, 2, 8, 4), eps=0.0), "eps"),
    "RALA infinite scale": (lambda: ops.rala_attention(*qkv(1, 2, 8, 4), scale=float("inf")), "scale"),
    "InLine negative scale": (lambda: ops.injective_linear_attention(*qkv(1, 2, 8, 4), scale=-1.0), "scale"),
    "flops at 3x8192x8192": (
        lambda: zoo.flops(torch.nn.Identity(), input_size=(3, 8192, 8192)), "input_size 3x8192x8192"),
    "flops with the batch in input_size": (
        lambda: zoo.flops(torch.nn.Identity(), input_size=(2, 3, 8, 8)), "without the batch dimension"),
    "DiT label past its classes": (lambda: _tiny_dit()(*_dit_inputs(y=[1, 11])), "y holds class id 11"),
    "DiT negative label": (lambda: _tiny_dit()(*_dit_inputs(y=[-1, 0])), "y holds class id -1"),
    "DiT float labels": (lambda: _tiny_dit()(*_dit_inputs(y=[1.0, 2.0])), "y must hold integer class ids"),
    "flops of NAT below its kernel (sizes are tensors while tracing)": (
        lambda: zoo.flops(zoo.create_model("nat_mini"), input_size=(3, 64, 64)), "input spatial shape (4, 4)"),
    "flops at a negative size": (lambda: zoo.flops(torch.nn.Identity(), input_size=(3, -5, 8)), "input_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_line_error_naming_the_argument(case):
    call, names = BAD_INPUTS[case]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, f"{case}: multi-line error {message!r}"
    assert names in message, f"{case}: error does not name {names!r}: {message!r}"


def test_allocation_limit_is_configurable(monkeypatch):
    monkeypatch.setenv("ZOO_MAX_ALLOCATION_GB", "0.000001")  # 1 KB: a 64 x 64 block mask (4 KB) is refused
    with pytest.raises(ValueError, match="ZOO_MAX_ALLOCATION_GB") as info:
        ops.radial_block_mask(64, 64, 1.0, block_size=64)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("ZOO_MAX_ALLOCATION_GB", "nan")
    with pytest.raises(ValueError, match="ZOO_MAX_ALLOCATION_GB"):
        ops.radial_block_mask(2, 16, 1.0, block_size=8)
