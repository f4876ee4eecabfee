"""Video DiT: RoPE, conditioning, flow matching, sampling, and the attention backends."""
import pytest
import torch
from grad_checkpointing import assert_checkpointing_takes_effect
from zoo.dit import FlowMatching, VideoDiT, sample_video
from zoo.dit.video_dit import apply_rope, rope_angles, rope_axis_dims

import zoo
from zoo import ops

TINY = dict(input_size=(4, 8, 8), in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".backend." not in name:  # backend weights (SLA proj_l) keep their zero init
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()  # no label dropout


def _inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, *model.input_size, generator=g)
    return x, torch.tensor([100.0, 800.0][:batch]), torch.tensor([1, 7][:batch])


def _pair(attention, attention_kwargs, **kw):
    """A random dense model and the same weights under another attention backend."""
    dense = _randomize(VideoDiT(**{**TINY, **kw}))
    other = VideoDiT(**{**TINY, **kw}, attention=attention, attention_kwargs=attention_kwargs).eval()
    zoo.weights.load_weights(other, dense.state_dict())
    return dense, other


def test_registered_sizes_and_rope_split():
    assert rope_axis_dims(128) == (44, 42, 42)  # Wan2.1's split
    assert rope_axis_dims(64) == (24, 20, 20)
    for name, (depth, width) in {"video_dit_s_2": (12, 384), "video_dit_b_2": (12, 768), "video_dit_l_2": (24, 1024)}.items():
        with torch.device("meta"):
            model = zoo.create_model(name)
        assert (len(model.blocks), model.blocks[0].attn.qkv.in_features, model.patch_size) == (depth, width, (1, 2, 2))


def test_rope_is_relative_per_axis():
    grid, d = (3, 4, 5), 24
    angles = rope_angles(grid, d)
    q, k = torch.randn(1, 1, 1, d, dtype=torch.float64), torch.randn(1, 1, 1, d, dtype=torch.float64)
    n = 3 * 4 * 5
    qr, kr = apply_rope(q.expand(1, 1, n, d), angles)[0, 0], apply_rope(k.expand(1, 1, n, d), angles)[0, 0]
    index = lambda f, h, w: (f * 4 + h) * 5 + w  # noqa: E731  frame-major tokens
    for (a, b), (c, e) in [((index(0, 0, 0), index(1, 2, 3)), (index(1, 1, 1), index(2, 3, 4))),  # same offsets
                           ((index(1, 0, 4), index(0, 2, 1)), (index(2, 1, 3), index(1, 3, 0)))]:
        torch.testing.assert_close(qr[a] @ kr[b], qr[c] @ kr[e])
    assert not torch.allclose(qr[index(0, 0, 0)] @ kr[index(0, 0, 1)], qr[index(0, 0, 0)] @ kr[index(0, 0, 2)])


def test_rope_equals_wans():
    """Our 3-D RoPE = diffusers' WanRotaryPosEmbed + Wan's interleaved rotation (written out here)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim, grid = 40, (3, 4, 5)
    cos, sin = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)(torch.zeros(1, 4, 3, 8, 10))  # [1, N, 1, D]
    x = torch.randn(2, 3, 60, head_dim, dtype=torch.float64)  # [B, heads, N, D]
    cos, sin = cos[0, :, 0].double(), sin[0, :, 0].double()
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    want = torch.stack([x1 * cos[:, 0::2] - x2 * sin[:, 1::2], x1 * sin[:, 1::2] + x2 * cos[:, 0::2]], -1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, rope_angles(grid, head_dim)), want, rtol=0, atol=1e-6)  # theirs: fp32 tables


def test_forward_backward_class_and_text():
    model = _randomize(VideoDiT(**TINY))
    x, t, y = _inputs(model)
    out = model(x, t, y)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())

    text = _randomize(VideoDiT(**{**TINY, "num_classes": 0, "context_dim": 12}))
    context = torch.randn(2, 5, 12)
    out = text(x, t, context=context)
    assert out.shape == x.shape
    assert not torch.allclose(out, text(x, t, context=torch.randn(2, 5, 12)))  # cross-attention is used


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_grad_checkpointing_takes_effect(conditioning):
    """Same output and gradients (label dropout included), fewer tensors saved for backward."""
    kw = dict(num_classes=0, context_dim=12) if conditioning == "text" else {}
    model = _randomize(VideoDiT(**{**TINY, **kw})).train()
    x, t, y = _inputs(model)
    inputs = (x, t, None, torch.randn(2, 5, 12)) if conditioning == "text" else (x, t, y)
    assert_checkpointing_takes_effect(model, *inputs, rtol=1e-5, atol=1e-6)


def test_zero_init_output():
    model = VideoDiT(**TINY).eval()
    x, t, y = _inputs(model)
    assert torch.count_nonzero(model(x, t, y)) == 0  # adaLN-Zero and a zero output layer


def test_flow_matching_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = VideoDiT(**TINY)
    flow = FlowMatching(shift=3.0)
    x0, noise = torch.randn(4, 4, 4, 8, 8), torch.randn(4, 4, 4, 8, 8)
    sigma, y = torch.tensor([0.1, 0.4, 0.7, 0.95]), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = flow.training_losses(model, x0, sigma=sigma, noise=noise, y=y)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_flow_matching_target_is_noise_minus_data():
    x0, noise, sigma = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 4, 4, 8, 8), torch.tensor([0.25, 0.5])
    seen = {}

    def oracle(x_t, t, **cond):
        seen["x_t"], seen["t"] = x_t, t
        return noise - x0

    loss = FlowMatching().training_losses(oracle, x0, sigma=sigma, noise=noise)["loss"]
    assert loss.abs().max() == 0
    torch.testing.assert_close(seen["x_t"][1], 0.5 * x0[1] + 0.5 * noise[1])
    torch.testing.assert_close(seen["t"], torch.tensor([250.0, 500.0]))


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_sampling_is_reproducible_from_a_seed(scheduler):
    model = _randomize(VideoDiT(**TINY))
    kw = dict(num_steps=3, guidance_scale=3.0, scheduler=scheduler, progress=False)
    a = sample_video(model, [1, 2], generator=torch.Generator().manual_seed(0), **kw)
    b = sample_video(model, [1, 2], generator=torch.Generator().manual_seed(0), **kw)
    c = sample_video(model, [1, 2], generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 4, 4, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_sampling_text_model_with_negative_context():
    model = _randomize(VideoDiT(**{**TINY, "num_classes": 0, "context_dim": 12}))
    context, negative = torch.randn(1, 5, 12), torch.zeros(1, 3, 12)
    out = sample_video(model, context=context, negative_context=negative, num_steps=2, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0), progress=False)
    assert out.shape == (1, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="negative_context"):
        sample_video(model, context=context, num_steps=2, guidance_scale=5.0, progress=False)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        VideoDiT(**{**TINY, "input_size": (4, 9, 8)})
    model = VideoDiT(**TINY)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 4, 4, 8, 7), torch.tensor([1.0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown attention 'sparse'"):
        VideoDiT(**TINY, attention="sparse")
    with pytest.raises(ValueError, match="kernel_size"):
        VideoDiT(**TINY, attention="na")
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 4, 4, 8, 8), torch.tensor([1.0]))
    no_null = VideoDiT(**TINY, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null class"):
        sample_video(no_null, [1], num_steps=2, guidance_scale=4.0, progress=False)


# ---- attention backends ------------------------------------------------------------------------


def test_radial_with_all_blocks_equals_dense():
    # 2 latent frames of 16x16 tokens: Wan's rule keeps every 128-block (adjacent frames dense)
    kw = dict(input_size=(2, 32, 32))
    assert ops.radial_block_mask(2, 256, 1.0).all()
    dense, radial = _pair("radial", dict(decay_factor=1.0), **kw)
    x, t, y = _inputs(dense)
    torch.testing.assert_close(radial(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)


def test_radial_sparse_mask_and_dense_policy():
    kw = dict(input_size=(8, 8, 8))  # 8 frames x 16 tokens, blocks of 16
    options = dict(decay_factor=1.0, block_size=16, dense_layers=1, dense_timesteps=2)
    assert not ops.radial_block_mask(8, 16, 1.0, block_size=16).all()
    dense, radial = _pair("radial", options, **kw)
    x, t, y = _inputs(dense)
    ref = dense(x, t, y)
    torch.testing.assert_close(radial(x, t, y, step_index=1), ref, rtol=1e-5, atol=1e-5)  # a dense step
    assert not torch.allclose(radial(x, t, y, step_index=2), ref, atol=1e-4)  # sparse from step 2
    assert not torch.allclose(radial(x, t, y), ref, atol=1e-4)  # training: sparse
    # layer 0 stays dense at every step: only layer 1 differs
    block_calls = []

    def record(module, inputs, out):
        block_calls.append(torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(*inputs[:3]), atol=1e-6))

    for block in radial.blocks:
        block.attn.backend.register_forward_hook(record)
    radial(x, t, y, step_index=5)
    assert block_calls == [True, False]
    assert zoo.flops(radial) < zoo.flops(dense)  # counts only the kept blocks


def test_radial_frames_mismatch_is_an_error():
    model = VideoDiT(**{**TINY, "input_size": (8, 8, 8)}, attention="radial", attention_kwargs=dict(block_size=16))
    with pytest.raises(ValueError, match="radial mask was built for 8 latent frames"):
        model(torch.randn(1, 4, 6, 8, 8), torch.tensor([1.0]), torch.tensor([1]))


def test_sla_topk_1_equals_dense_and_dense_checkpoints_load():
    dense, sla = _pair("sla", dict(topk=1.0, block_size=16))
    extra = set(sla.state_dict()) - set(dense.state_dict())
    assert extra and all(k.endswith(("sla.proj_l.weight", "sla.proj_l.bias")) for k in extra)
    assert set(dense.state_dict()) <= set(sla.state_dict())
    assert all(torch.count_nonzero(sla.state_dict()[k]) == 0 for k in extra)  # zero-initialised
    x, t, y = _inputs(dense)
    torch.testing.assert_close(sla(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)
    sparse = VideoDiT(**TINY, attention="sla", attention_kwargs=dict(topk=0.25, block_size=16)).eval()
    zoo.weights.load_weights(sparse, dense.state_dict())
    assert not torch.allclose(sparse(x, t, y), dense(x, t, y), atol=1e-4)
    sparse(x, t, y).square().mean().backward()
    assert sparse.blocks[0].attn.backend.sla.proj_l.weight.grad is not None  # trainable projection


def test_na_kernel_equal_to_the_grid_equals_dense():
    dense, na = _pair("na", dict(kernel_size=(4, 4, 4)))  # token grid (4, 4, 4)
    x, t, y = _inputs(dense)
    torch.testing.assert_close(na(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)
    local = VideoDiT(**TINY, attention="na", attention_kwargs=dict(kernel_size=(3, 3, 3), dilation=1, stride=(1, 1, 1))).eval()
    local.load_state_dict(dense.state_dict())
    assert not torch.allclose(local(x, t, y), dense(x, t, y), atol=1e-4)
    assert zoo.flops(local) < zoo.flops(dense)
    # sliding-tile attention: stride = tile = kernel (2, 2, 2): every query in a tile shares its keys
    tile = VideoDiT(**TINY, attention="na", attention_kwargs=dict(kernel_size=2, stride=2)).eval()
    tile.load_state_dict(dense.state_dict())
    out = tile(x, t, y)
    assert torch.isfinite(out).all() and zoo.flops(tile) < zoo.flops(local)


def test_switching_attention_keeps_every_weight():
    names = {"dense": None, "na": dict(kernel_size=3)}
    if hasattr(ops, "radial_attention"):
        names["radial"] = dict(block_size=16)
    keys = {name: set(VideoDiT(**TINY, attention=name, attention_kwargs=o).state_dict()) for name, o in names.items()}
    assert all(k == keys["dense"] for k in keys.values())


def test_dense_checkpoint_loads_into_sla_through_create_model(tmp_path):
    import zoo

    dense = zoo.create_model("video_dit_tiny")
    path = zoo.weights.export(dense, tmp_path / "dense")
    sla = zoo.create_model("video_dit_tiny", checkpoint_path=path, attention="sla",
                           attention_kwargs=dict(topk=1.0, block_size=16))
    x, t, y = _inputs(dense)
    torch.testing.assert_close(sla.eval()(x, t, y), dense.eval()(x, t, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,shape", [("video_dit_s_2", (4, 8, 8)), ("dit_s_2", (16, 16))])
def test_whole_model_in_bf16_runs_and_matches_float32(name, shape):
    """`model.to(torch.bfloat16)` with float timesteps works (the sinusoid is cast, as diffusers does)."""
    torch.manual_seed(0)
    model = zoo.create_model(name, input_size=shape if len(shape) == 3 else shape[0]).eval()
    for p in model.parameters():  # the zero-initialised output layer would make the outputs all zero
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, model.in_channels, *shape)
    t, y = torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    ref = model(x, t, y)
    out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 2e-3), accumulated over a dozen layers
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_to_diffusers_on_a_video_dit_is_a_clear_error():
    with pytest.raises(TypeError, match="no diffusers counterpart"):
        zoo.dit.to_diffusers(VideoDiT(**TINY))
