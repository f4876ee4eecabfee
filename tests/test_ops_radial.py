"""Radial attention: the block mask against an element-level construction of the official rule,
the sparsity of radial-attention#61, the attention against a dense float64 oracle, the policy."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo.ops import SparsityPolicy, counting_flops, radial_attention, radial_block_mask

import zoo


def element_level_block_mask(f, s, decay, B, model, text, legacy):
    """The rule written out token by token: each frame pair's s x s mask in its offset canvas,
    then the column-density shrink, OR-ed into the global block mask (float32 like torch does)."""
    n_blocks = math.ceil((f * s + text) / B)
    final = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    idx = torch.arange(s)
    dist = (idx[None, :] - idx[:, None]).abs()
    nb = math.ceil(s / B)
    for i, j in itertools.product(range(f), range(f)):
        d = abs(i - j)
        if model == "wan" and j == 0:
            local = torch.ones(s, s, dtype=torch.bool)
        else:
            if d == 0 or (d == 1 and not (model == "wan" and legacy)):
                w = s
            elif d == 1:
                w = s // 2
            else:
                w = max(2 ** s.bit_length() / 2 ** d.bit_length() * decay, B)
            local = dist <= w  # int tensor vs Python float: compared in float32
            nominal = 2 ** s.bit_length() / 2 ** d.bit_length()
            if nominal < 128 and d % int(128 / nominal) != 0:
                local = torch.zeros(s, s, dtype=torch.bool)
        ri, rj = i * s % B, j * s % B
        canvas = torch.zeros(ri + nb * B, rj + nb * B, dtype=torch.bool)
        canvas[ri : ri + s, rj : rj + s] = local
        cols = canvas[: nb * B, : nb * B].reshape(nb, B, nb, B).sum(1) / B  # [nb, nb, B] column densities
        frac = (cols > 1 / 3).sum(-1) / ((cols > 0).sum(-1) + 1e-9)
        r0, c0 = i * s // B, j * s // B
        final[r0 : r0 + nb, c0 : c0 + nb] |= frac > 0.6
    final[f * s // B :] = True
    final[:, f * s // B :] = True
    return final


CASES = [
    # frames, tokens/frame, decay, block, model, text, legacy
    (8, 256, 0.5, 32, "wan", 0, False),
    (8, 256, 0.5, 32, "wan", 0, True),
    (11, 200, 0.3, 32, "hunyuan", 0, False),
    (9, 100, 1.0, 16, "hunyuan", 37, False),  # text tokens, partial blocks everywhere
    (13, 40, 0.2, 16, "wan", 0, False),  # s < 128: diagonal thinning on every band
    (7, 129, 0.7, 64, "wan", 5, True),
    (12, 96, 0.9, 24, "hunyuan", 0, False),  # block size not a power of two
    (6, 512, 204.99999999 / 256, 16, "wan", 0, False),  # window 204.99999999 rounds to 205 in float32
    (1, 300, 0.5, 128, "wan", 0, False),
    (5, 1, 0.5, 4, "hunyuan", 3, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-f{c[0]}-s{c[1]}-B{c[3]}-t{c[5]}-l{int(c[6])}" for c in CASES])
def test_block_mask_matches_element_level_rule(case):
    f, s, decay, B, model, text, legacy = case
    mask = radial_block_mask(f, s, decay, block_size=B, model=model, text_tokens=text, legacy=legacy)
    assert mask.dtype == torch.bool and mask.shape == (math.ceil((f * s + text) / B),) * 2
    assert torch.equal(mask, element_level_block_mask(f, s, decay, B, model, text, legacy))


@settings(max_examples=40, deadline=None)
@given(
    f=st.integers(1, 9),
    s=st.integers(1, 300),
    decay=st.floats(0.0, 3.0),
    B=st.integers(2, 40),
    model=st.sampled_from(["wan", "hunyuan"]),
    text=st.integers(0, 50),
    legacy=st.booleans(),
)
def test_block_mask_property(f, s, decay, B, model, text, legacy):
    legacy = legacy and model == "wan"
    mask = radial_block_mask(f, s, decay, block_size=B, model=model, text_tokens=text, legacy=legacy)
    assert torch.equal(mask, element_level_block_mask(f, s, decay, B, model, text, legacy))


def test_wan_768x1280x69_sparsity_matches_issue_61():
    """radial-attention#61 prints 0.7366323 for Wan 768x1280x69 at decay 0.2 (the d=1 -> s/2 rule)."""
    legacy = radial_block_mask(18, 3840, 0.2, model="wan", legacy=True)
    assert legacy.shape == (540, 540)
    assert 1 - legacy.float().mean().item() == pytest.approx(0.7366323, abs=5e-7)
    current = radial_block_mask(18, 3840, 0.2, model="wan")  # d = 1 dense since 72788d4: 71.3%
    assert 1 - current.float().mean().item() == pytest.approx(0.713, abs=5e-4)
    assert bool((current | ~legacy).all()), "the current rule keeps a superset of the legacy blocks"


def test_sink_text_and_structure():
    s, B = 256, 64
    wan = radial_block_mask(10, s, 0.2, block_size=B, model="wan")
    hy = radial_block_mask(10, s, 0.2, block_size=B, model="hunyuan", text_tokens=2 * B)
    per = s // B
    assert wan[:, :per].all(), "Wan: key frame 0 is an attention sink"
    assert not hy[9 * per : 10 * per, :per].all(), "HunyuanVideo has no sink"
    assert hy[10 * per :].all() and hy[:, 10 * per :].all(), "text rows and columns are dense"
    assert torch.equal(hy, hy.T), "the rule is symmetric in (i, j)"
    assert torch.equal(wan[per:, per:], wan[per:, per:].T), "... apart from Wan's sink column"
    assert not wan[:per, per:].all()
    assert wan.diagonal().all()


def test_mask_cache_is_keyed_by_resolution_and_returns_copies():
    a = radial_block_mask(4, 64, 0.5, block_size=16)
    a.fill_(False)
    assert radial_block_mask(4, 64, 0.5, block_size=16).any()
    assert radial_block_mask(5, 64, 0.5, block_size=16).shape == (20, 20)


def dense_oracle(q, k, v, element_mask, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~element_mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_mask_built_under_the_meta_device_leaves_the_cache_on_cpu():
    """A model built with `torch.device("meta")` (a size check) once cached a meta mask for every later caller."""
    args = (3, 20, 0.7, 16)  # a resolution no other test caches
    with torch.device("meta"):
        radial_block_mask(*args)
    mask = radial_block_mask(*args)
    assert mask.device.type == "cpu" and mask.any()


@pytest.mark.parametrize("model,text", [("wan", 0), ("hunyuan", 11)])
def test_radial_attention_matches_dense_oracle(model, text):
    torch.manual_seed(0)
    f, s, B = 6, 37, 16  # partial blocks at every frame border and at the end
    n = f * s + text
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = radial_attention(q, k, v, f, s, 0.4, block_size=B, model=model, text_tokens=text)
    mask = radial_block_mask(f, s, 0.4, block_size=B, model=model, text_tokens=text)
    element = mask.repeat_interleave(B, 0).repeat_interleave(B, 1)[:n, :n]
    ref = dense_oracle(q, k, v, element, 8**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)  # block_sparse computes in float32
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_radial_attention_flops_are_density_aware():
    f, s, B = 4, 48, 16
    q = k = v = torch.randn(1, 2, f * s, 8)

    class Wrap(torch.nn.Module):
        def forward(self, q, k, v):
            return radial_attention(q, k, v, f, s, 0.5, block_size=B)

    mask = radial_block_mask(f, s, 0.5, block_size=B)
    pairs = int(mask.repeat_interleave(B, 0).repeat_interleave(B, 1)[: f * s, : f * s].sum())
    assert zoo.flops(Wrap(), inputs=(q, k, v)) == 1 * 2 * pairs * (8 + 8)
    with counting_flops():
        out, lse = radial_attention(q, k, v, f, s, 0.5, block_size=B, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]


def test_sparsity_policy():
    policy = SparsityPolicy(dense_layers=1, dense_timesteps=12)
    assert not policy.use_sparse(0, 30)
    assert not policy.use_sparse(5, 11)
    assert policy.use_sparse(1, 12)
    assert SparsityPolicy().use_sparse(0, 0)
    with pytest.raises(ValueError, match="dense_layers"):
        SparsityPolicy(dense_layers=-1)
    with pytest.raises(ValueError, match="timestep_idx"):
        policy.use_sparse(3, None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(tokens_per_frame=2.5), "tokens_per_frame"),
        (dict(decay_factor=-1.0), "decay_factor"),
        (dict(block_size=0), "block_size"),
        (dict(model="cogvideo"), "model"),
        (dict(text_tokens=-3), "text_tokens"),
        (dict(model="hunyuan", legacy=True), "legacy"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(num_frames=3, tokens_per_frame=32, decay_factor=0.5, block_size=16)
    with pytest.raises(ValueError, match=match):
        radial_block_mask(**dict(args, **kwargs))


def test_bad_sequence_length_names_the_rule():
    q = torch.randn(1, 2, 100, 8)
    with pytest.raises(ValueError, match="num_frames \\* tokens_per_frame"):
        radial_attention(q, q, q, 3, 32, 0.5, block_size=16)
    with pytest.raises(ValueError, match="q must have rank 4"):
        radial_attention(q[0], q, q, 3, 32, 0.5, block_size=16)
