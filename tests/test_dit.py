"""Image DiT: official layout and numerics, paper params/FLOPs, diffusers parity, diffusion, sampling.

(`import zoo` not importing diffusers is checked by tests/test_registry.py.)
"""
import math

import numpy as np
import pytest
import torch
from grad_checkpointing import assert_checkpointing_takes_effect
from zoo.dit import DiT, GaussianDiffusion, diffusers_to_dit, dit_to_diffusers, sample
from zoo.dit.dit import sincos_2d, timestep_embedding

import zoo

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)

ARCHS = [f"dit_{s}_{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)]


def _paper(name):
    """(params M, Gflops) from the model's cfg (DiT Table 4 as recomputed in the reference notes)."""
    extras = zoo.weights.cfg_extras(name if name != "dit_xl_2" else "dit_xl_2.in1k_256")
    return extras["paper_params"] / 1e6, extras["paper_flops"] / 1e9


def _randomize(model, seed=0):
    """Non-zero weights everywhere (adaLN-Zero would make every output 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()  # no label dropout


def _official_keys(depth, hidden, patch, in_ch, num_classes, tokens, learn_sigma=True):
    """The key -> shape list of facebookresearch/DiT's state dict (reference section 1.4)."""
    out = in_ch * 2 if learn_sigma else in_ch
    keys = {"pos_embed": (1, tokens, hidden), "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
            "x_embedder.proj.bias": (hidden,), "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
            "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
            "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
            "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden), "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
            "final_layer.linear.weight": (patch * patch * out, hidden), "final_layer.linear.bias": (patch * patch * out,)}
    for n in range(depth):
        b = f"blocks.{n}."
        keys.update({b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
                     b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
                     b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
                     b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
                     b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,)})
    return keys


def test_xl2_has_the_official_292_key_layout():
    with torch.device("meta"):
        model = zoo.create_model("dit_xl_2")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == 292
    assert ours == _official_keys(28, 1152, 2, 4, 1000, 256)
    with torch.device("meta"):
        model512 = zoo.create_model("dit_xl_2.in1k_512")
    assert tuple(model512.pos_embed.shape) == (1, 1024, 1152)


@pytest.mark.parametrize("name", ARCHS)
def test_params_match_the_paper(name):
    with torch.device("meta"):
        model = zoo.create_model(name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(trainable / 1e6 - _paper(name)[0]) < 0.06
    assert zoo.count_params(model) == trainable + model.pos_embed.numel()  # pos_embed: frozen Parameter, as the original


@pytest.mark.parametrize("name", ["dit_s_2", "dit_s_8", "dit_b_4"])
def test_flops_match_the_paper(name):
    gflops = zoo.flops(zoo.create_model(name)) / 1e9
    assert abs(gflops - _paper(name)[1]) / _paper(name)[1] < 0.02


def test_registered_official_sources():
    urls = {w.name: w.url for w in zoo.weights.weights_for_arch("dit_xl_2")}
    assert urls == {"dit_xl_2.in1k_256": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
                    "dit_xl_2.in1k_512": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"}


def test_zoo_info_dit_xl_2(capsys):
    from zoo.cli import main

    assert main(["info", "dit_xl_2"]) == 0
    out = capsys.readouterr().out
    assert "675.13M" in out and "118.69G" in out  # params incl. the frozen pos_embed; fvcore Gflops incl. LayerNorm
    assert "DiT-XL-2-256x256.pt" in out and "DiT-XL-2-512x512.pt" in out


def test_numerics_follow_the_original():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 256)
    freqs = np.exp(-math.log(10000) * np.arange(128, dtype=np.float32) / 128).astype(np.float32)  # / 128, not 127
    args = (t.numpy()[:, None] * freqs).astype(np.float64)  # float32 arguments, as the original
    want = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(emb.numpy(), want, rtol=0, atol=2e-4)
    freqs127 = np.exp(-math.log(10000) * np.arange(128) / 127)  # diffusers' downscale_freq_shift=1
    assert np.abs(emb.numpy()[:, 128:] - np.sin(t.numpy()[:, None] * freqs127)).max() > 1e-2

    # MAE 2-D sin-cos, written with numpy as the original: meshgrid(w, h), grid[0] first
    dim, gs = 16, 4
    grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float32), np.arange(gs, dtype=np.float32)), 0).reshape(2, -1)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one(pos):
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    np.testing.assert_allclose(sincos_2d(dim, gs, gs).numpy(), np.concatenate([one(grid[0]), one(grid[1])], 1), atol=1e-6)

    model = DiT(**TINY)
    assert all(m.eps == 1e-6 and not m.elementwise_affine for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    x, t, y = model.example_inputs(2)
    assert torch.count_nonzero(model(x, t, y)) == 0  # adaLN-Zero: the output layer starts at zero
    assert model.null_class == 10 and model.y_embedder.embedding_table.num_embeddings == 11


def test_official_layout_file_loads_unchanged(tmp_path):
    model = _randomize(DiT(**TINY))
    state = model.state_dict()
    assert set(state) == set(_official_keys(2, 32, 2, 4, 10, 16))
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state, path)
    other = DiT(**TINY).eval()
    zoo.weights.load_weights(other, path)
    x, t, y = model.example_inputs(2)
    torch.testing.assert_close(other(x, t, y), model(x, t, y), rtol=0, atol=0)


def _diffusers_pair():
    from diffusers import DiTTransformer2DModel

    theirs = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                                   sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    _randomize(theirs, seed=1)
    for block in theirs.transformer_blocks:  # the per-block embedder copies of a converted checkpoint are equal
        block.norm1.emb.load_state_dict(theirs.transformer_blocks[0].norm1.emb.state_dict())
    ours = DiT(**TINY).eval()
    ours.load_state_dict(diffusers_to_dit(theirs.state_dict(), ours), strict=True)
    return theirs, ours


def test_diffusers_conversion_round_trip_and_outputs():
    theirs, ours = _diffusers_pair()
    back = dit_to_diffusers(ours.state_dict())
    assert set(back) == set(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)

    x = torch.randn(3, 4, 8, 8)
    t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    ref_plain = theirs(x, timestep=t, class_labels=y).sample
    # diffusers differs from the original in two numerics; with them set to DiT's, outputs agree
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # exponent / 128 as DiT
        block.norm3.eps = 1e-6  # DiT's pre-MLP LayerNorm eps
    ref = theirs(x, timestep=t, class_labels=y).sample
    out = ours(x, t, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - ref_plain).abs().max() > 1e-4  # the documented difference is real

    rebuilt = zoo.dit.to_diffusers(ours).eval()
    assert rebuilt.config.num_embeds_ada_norm == 10 and rebuilt.config.sample_size == 8
    torch.testing.assert_close(rebuilt(x, timestep=t, class_labels=y).sample, ref_plain, rtol=0, atol=0)


def test_diffusers_checkpoint_file_loads_through_the_registered_converter(tmp_path):
    from safetensors.torch import save_file

    theirs, ours = _diffusers_pair()
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(path))
    model = zoo.create_model("dit_xl_2", checkpoint_path=path, **{k: v for k, v in TINY.items() if k != "patch_size"}).eval()
    x, t, y = model.example_inputs(2)
    torch.testing.assert_close(model(x, t, y), ours(x, t, y), rtol=0, atol=0)


def test_diffusers_conversion_refuses_drifted_embedders():
    theirs, ours = _diffusers_pair()
    state = theirs.state_dict()
    state["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] += 1
    with pytest.raises(ValueError, match="per-block copies"):
        diffusers_to_dit(state, ours)


def test_image_dit_sla_topk_1_equals_dense():
    dense = _randomize(DiT(**TINY))
    sla = DiT(**TINY, attention="sla", attention_kwargs=dict(topk=1.0, block_size=4)).eval()
    zoo.weights.load_weights(sla, dense.state_dict())
    x, t, y = dense.example_inputs(2)
    torch.testing.assert_close(sla(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)


def test_image_dit_na_kernel_equal_to_the_grid_equals_dense():
    dense = _randomize(DiT(**TINY))
    na = DiT(**TINY, attention="na", attention_kwargs=dict(kernel_size=4)).eval()  # 4x4 token grid
    na.load_state_dict(dense.state_dict())
    x, t, y = dense.example_inputs(2)
    torch.testing.assert_close(na(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)
    local = DiT(**TINY, attention="na", attention_kwargs=dict(kernel_size=3)).eval()
    local.load_state_dict(dense.state_dict())
    assert not torch.allclose(local(x, t, y), dense(x, t, y), atol=1e-4)


def test_small_pixel_space_config_for_mnist():
    model = zoo.create_model("dit_s_2", input_size=32, in_channels=1, num_classes=10, depth=6, hidden_size=256, learn_sigma=False)
    assert model.blocks[0].attn.num_heads == 4 and len(model.blocks) == 6
    x, t, y = model.example_inputs(2)
    assert model(x, t, y).shape == (2, 1, 32, 32)
    # guidance covers the one channel (the 3-channel rule is only for 4-channel latents)
    assert sample(model, [1, 2], num_steps=2, guidance_scale=2.0, scheduler="ddim", progress=False).shape == (2, 1, 32, 32)


def test_grad_checkpointing_takes_effect():
    """Same output and gradients (label dropout included), fewer tensors saved for backward."""
    model = _randomize(DiT(**TINY)).train()
    x = torch.randn(2, 4, 8, 8)
    assert_checkpointing_takes_effect(model, x, torch.tensor([10, 900]), torch.tensor([3, 10]))


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiT(**{**TINY, "input_size": 10, "patch_size": 4})
    model = DiT(**TINY)
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(1, 4, 12, 12), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        DiT(**TINY, attention="flash")
    with pytest.raises(ValueError, match="radial"):
        DiT(**TINY, attention="radial")
    with pytest.raises(ValueError, match="head dim"):
        zoo.create_model("dit_s_2", hidden_size=100)


def test_training_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DiT(**TINY)
    diffusion = GaussianDiffusion(learn_sigma=True)
    x0 = torch.randn(8, 4, 8, 8).clamp(-1, 1)
    y, t, noise = torch.randint(0, 10, (8,)), torch.tensor([0, 1, 10, 100, 300, 500, 700, 999]), torch.randn(8, 4, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        terms = diffusion.training_losses(model, x0, y, t=t, noise=noise)
        assert set(terms) == {"loss", "mse", "vb"}
        opt.zero_grad()
        terms["loss"].mean().backward()
        opt.step()
        losses.append(terms["loss"].mean().item())
    assert losses[-1] < 0.7 * losses[0]


def test_vlb_vanishes_for_the_true_posterior():
    """With the true eps and v = -1 (the posterior variance), the KL term is 0 for t > 0."""
    diffusion = GaussianDiffusion(learn_sigma=True)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 2, 3, 5])
    perfect = lambda x_t, tt, y: torch.cat([noise, -torch.ones_like(noise)], dim=1)  # noqa: E731
    terms = diffusion.training_losses(perfect, x0, torch.zeros(4, dtype=torch.long), t=t, noise=noise)
    assert terms["mse"].abs().max() == 0
    assert terms["vb"].abs().max() < 1e-4
    worse = lambda x_t, tt, y: torch.cat([noise, torch.ones_like(noise)], dim=1)  # noqa: E731
    assert (diffusion.training_losses(worse, x0, torch.zeros(4, dtype=torch.long), t=t, noise=noise)["vb"] > 1e-3).all()


def test_ddpm_250_is_adm_respacing():
    from zoo.dit.diffusion import make_scheduler

    sched = make_scheduler("ddpm")
    sched.set_timesteps(250)
    stride = (1000 - 1) / (250 - 1)  # ADM space_timesteps(1000, "250")
    assert sorted(sched.timesteps.tolist()) == sorted({round(i * stride) for i in range(250)})


def test_ddpm_step_is_adm_p_sample_with_learned_range_variance():
    """One diffusers step with our config = ADM's respaced p_sample (float64, written from its formulas)."""
    from zoo.dit.diffusion import make_scheduler

    sched = make_scheduler("ddpm", learn_sigma=True)
    sched.set_timesteps(250)
    used = sorted(sched.timesteps.tolist())
    acp_all = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    acp = acp_all[used]
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    betas = 1 - acp / acp_prev
    post_var = betas * (1 - acp_prev) / (1 - acp)
    log_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    x, eps, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8) * 2 - 1
    for j in (1, 100, 249):
        t = used[j]
        x0 = (1 / acp[j]).sqrt() * x.double() - (1 / acp[j] - 1).sqrt() * eps.double()
        mean = betas[j] * acp_prev[j].sqrt() / (1 - acp[j]) * x0 + (1 - acp_prev[j]) * (1 - betas[j]).sqrt() / (1 - acp[j]) * x.double()
        frac = (v.double() + 1) / 2
        log_var = frac * torch.log(betas[j]) + (1 - frac) * log_clipped[j]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(j))
        want = mean + torch.exp(0.5 * log_var) * noise.double()
        got = sched.step(torch.cat([eps, v], 1), t, x, generator=torch.Generator().manual_seed(j)).prev_sample
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_sampling_is_reproducible_from_a_seed(scheduler):
    model = _randomize(DiT(**TINY))
    a = sample(model, [1, 2], num_steps=4, guidance_scale=2.0, scheduler=scheduler, generator=torch.Generator().manual_seed(0), progress=False)
    b = sample(model, [1, 2], num_steps=4, guidance_scale=2.0, scheduler=scheduler, generator=torch.Generator().manual_seed(0), progress=False)
    c = sample(model, [1, 2], num_steps=4, guidance_scale=2.0, scheduler=scheduler, generator=torch.Generator().manual_seed(1), progress=False)
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_guidance_channels_first_three_or_all():
    from zoo.dit.diffusion import guide

    cond, uncond = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    three = guide(torch.cat([cond, uncond]), 4.0, 3)
    torch.testing.assert_close(three[:, :3], uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(three[:, 3:], cond[:, 3:])  # 4th eps channel and variance: the cond branch's
    every = guide(torch.cat([cond, uncond]), 4.0, 4)
    torch.testing.assert_close(every[:, :4], uncond[:, :4] + 4 * (cond[:, :4] - uncond[:, :4]))

    model = _randomize(DiT(**TINY))
    kw = dict(num_steps=3, guidance_scale=4.0, scheduler="ddim", progress=False)
    a = sample(model, [1], generator=torch.Generator().manual_seed(0), **kw)
    b = sample(model, [1], generator=torch.Generator().manual_seed(0), guidance_channels="all", **kw)
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_guidance_needs_a_null_class():
    model = DiT(**TINY, class_dropout_prob=0.0)
    assert model.null_class is None
    with pytest.raises(ValueError, match="null class"):
        sample(model, [1], num_steps=2, guidance_scale=4.0, progress=False)
    assert sample(model, [1], num_steps=2, guidance_scale=1.0, progress=False).shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="class_labels"):
        sample(model, [10], num_steps=2, progress=False)
    with pytest.raises(ValueError, match="unknown scheduler"):
        sample(model, [1], num_steps=2, scheduler="euler", progress=False)


def test_sampling_decodes_through_an_autoencoder():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=4)  # tiny, random, offline
    model = _randomize(DiT(**TINY))
    images = sample(model, [0, 1], num_steps=2, scheduler="ddim", vae=vae, generator=torch.Generator().manual_seed(0), progress=False)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="unknown vae"):
        sample(model, [0], num_steps=1, scheduler="ddim", vae="sdxl", progress=False)
