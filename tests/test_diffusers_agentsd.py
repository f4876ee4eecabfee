"""AgentSD plugin (zoo.diffusers.AgentSDConfig) on tiny random UNet2DConditionModels (CPU, no download)."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from script_modules import load_script  # noqa: E402

from zoo.diffusers import HOOK_NAME, AgentSDConfig, RadialAttentionConfig, apply_attention, remove_attention  # noqa: E402
from zoo.diffusers.agentsd import AgentSDAttnProcessor, TokenMatching  # noqa: E402
from zoo.diffusers.processors import RunState  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-5)  # float32: a different summation order than the stock SDPA call


def tiny_unet(sdxl_like: bool = False, seed: int = 0) -> UNet2DConditionModel:
    """SD-like: attention at full resolution; SDXL-like: the first level has none (as SDXL's 128^2 level)."""
    torch.manual_seed(seed)
    down = ("DownBlock2D", "CrossAttnDownBlock2D") if sdxl_like else ("CrossAttnDownBlock2D", "DownBlock2D")
    up = ("CrossAttnUpBlock2D", "UpBlock2D") if sdxl_like else ("UpBlock2D", "CrossAttnUpBlock2D")
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                layers_per_block=1, down_block_types=down, up_block_types=up, cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=8).eval()


def unet_inputs(t: int = 500, batch: int = 2, size: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(t),
                encoder_hidden_states=torch.randn(batch, 7, 16, generator=g), return_dict=False)


def run(model, args) -> torch.Tensor:
    with torch.no_grad():
        return model(**args)[0]


def agentsd_processors(model) -> list[AgentSDAttnProcessor]:
    return [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), AgentSDAttnProcessor)]


# ---------------------------------------------------------------- config and errors


def test_config_defaults_validate_and_round_trip():
    config = AgentSDConfig()
    assert (config.ratio, config.agent_ratio, config.agent_stride, config.merge_stride, config.agent_steps,
            config.query_scale_exponent, config.value_shortcut) == (0.4, 0.95, 4, 2, 20, 0.3, 0.075)
    assert AgentSDConfig.from_dict(config.to_dict()) == config
    for kwargs, field in (({"ratio": 1.0}, "ratio"), ({"agent_ratio": -0.1}, "agent_ratio"),
                          ({"agent_stride": 0}, "agent_stride"), ({"agent_steps": 2.5}, "agent_steps"),
                          ({"max_downsample": 0}, "max_downsample"), ({"random_destinations": 1}, "random_destinations"),
                          ({"value_shortcut": float("nan")}, "value_shortcut")):
        with pytest.raises(ValueError, match=field) as err:
            AgentSDConfig(**kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown keys"):
        AgentSDConfig.from_dict({"k_scale2": 0.3})


def test_unsupported_modules_are_one_line_errors():
    from diffusers import WanTransformer3DModel

    for module in (torch.nn.Linear(2, 2), WanTransformer3DModel(num_attention_heads=1, attention_head_dim=8,
                                                                 in_channels=4, out_channels=4, text_dim=8, freq_dim=8,
                                                                 ffn_dim=8, num_layers=1)):
        with pytest.raises(TypeError, match="AgentSDConfig supports diffusers' UNet2DConditionModel") as err:
            apply_attention(module, AgentSDConfig())
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_attention(tiny_unet(), RadialAttentionConfig())
    model = tiny_unet(sdxl_like=True)
    with pytest.raises(ValueError, match="max_downsample=1.*levels: \\[2\\]"):
        apply_attention(model, AgentSDConfig(max_downsample=1))
    assert HOOK_NAME not in model._diffusers_hook.hooks  # nothing half-installed
    apply_attention(model, AgentSDConfig())
    with pytest.raises(ValueError, match="already applied"):
        apply_attention(model, AgentSDConfig())


# ---------------------------------------------------------------- token merging


def test_merge_unmerge_identity_at_ratio_zero_and_shapes_otherwise():
    x = torch.randn(2, 64, 8, dtype=torch.float64)
    matching = TokenMatching(x, (8, 8), 2, 0, 0)
    assert matching.merge(x) is x and torch.equal(matching.unmerge(x), x) and matching.agents(x) is None
    matching = TokenMatching(x, (8, 8), 2, 20, 0, choice=torch.randint(4, (4, 4)))
    merged = matching.merge(x)
    assert merged.shape == (2, 44, 8) and matching.unmerge(merged).shape == x.shape
    matching = TokenMatching(x, (8, 8), 4, 25, 60)  # 4 destinations, 60 sources: at most 60 merged
    assert matching.agents(x).shape == (2, 4, 8) and matching.merge(x).shape == (2, 39, 8)
    assert TokenMatching(x, (8, 8), 2, 20, 30).agents(x) is None  # 34 agents are not < 44 / 2


def test_merge_groups_equal_a_brute_force_bipartite_matching():
    """tomesd semantics, written out: destinations are each 2x2 cell's chosen token; the `r` sources
    most similar (cosine) to their best destination are averaged into it; unmerge copies back."""
    torch.manual_seed(0)
    h = w = 6
    x = torch.randn(1, h * w, 5, dtype=torch.float64)
    choice = torch.randint(4, (3, 3))
    r = 11
    dst = sorted((2 * i + int(choice[i, j]) // 2) * w + 2 * j + int(choice[i, j]) % 2 for i in range(3) for j in range(3))
    src = [p for p in range(h * w) if p not in dst]
    unit = x[0] / x[0].norm(dim=-1, keepdim=True)
    best = {s: max(dst, key=lambda d: float(unit[s] @ unit[d])) for s in src}
    merged_src = sorted(src, key=lambda s: -float(unit[s] @ unit[best[s]]))[:r]
    group = {p: [p] for p in range(h * w)}
    for s in merged_src:
        group[best[s]].append(s)
    representative = {p: p for p in range(h * w)}
    representative.update({s: best[s] for s in merged_src})
    expected_rows = {p: torch.stack([x[0, q] for q in group[representative[p]]]).mean(0) for p in range(h * w)}

    matching = TokenMatching(x, (h, w), 2, r, 0, choice=choice)
    merged = matching.merge(x)
    assert merged.shape[1] == h * w - r
    back = matching.unmerge(merged)[0]
    for p in range(h * w):
        torch.testing.assert_close(back[p], expected_rows[p])


# ---------------------------------------------------------------- processors vs references


def test_ratio_zero_without_agents_equals_stock_and_remove_restores_exactly():
    model = tiny_unet()
    args = unet_inputs()
    stock = run(model, args)
    stock_processors = {name: p for name, p in model.attn_processors.items()}
    apply_attention(model, AgentSDConfig(ratio=0.0, agent_ratio=0.0))
    processors = agentsd_processors(model)
    # the full-resolution self-attention only: down_blocks.0 (1 layer) and up_blocks.1 (2 layers)
    assert len(processors) == 3 and all(p.downsample == 1 for p in processors)
    assert all(not name.endswith("attn2.processor") or model.attn_processors[name] is stock_processors[name]
               for name in stock_processors)  # cross-attention untouched
    torch.testing.assert_close(run(model, args), stock, **TOL)
    remove_attention(model)
    assert torch.equal(run(model, args), stock)
    assert all(model.attn_processors[name] is p for name, p in stock_processors.items())
    apply_attention(model, AgentSDConfig(ratio=0.5))
    merged = run(model, args)
    assert not torch.allclose(merged, stock, atol=1e-4)  # merging changes the output
    # cross_attention_kwargs reach every processor: what AttnProcessor2_0 ignores, AgentSD ignores too
    assert torch.equal(run(model, {**args, "cross_attention_kwargs": {"extra": 1}}), merged)
    remove_attention(model)
    assert torch.equal(run(model, args), stock)


def test_agent_attention_on_merged_tokens_equals_an_independent_reference():
    torch.manual_seed(0)
    model = tiny_unet().double()
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    config = AgentSDConfig(ratio=0.3, agent_ratio=0.95, seed=3)
    state = RunState()
    state.grid, state.step = (16, 16), 0
    processor = AgentSDAttnProcessor(attn.processor, config, downsample=1, layer_index=0, state=state)
    x = torch.randn(2, 256, 32, dtype=torch.float64)
    out = processor(attn, x)

    matching = processor.matching(x)  # same seed, step and layer: the same destinations
    merged, agent_tokens = matching.merge(x), matching.agents(x)
    assert merged.shape[1] == 256 - 76 and agent_tokens.shape[1] == 16  # capped at the 16 destinations of the 4x4 grid
    heads, d = attn.heads, 32 // attn.heads

    def split(t):
        return t.view(2, -1, heads, d).transpose(1, 2)

    q, k, v, a = split(attn.to_q(merged)), split(attn.to_k(merged)), split(attn.to_v(merged)), split(attn.to_q(agent_tokens))
    agent_values = torch.softmax(a @ k.transpose(-1, -2) * d ** -0.5, dim=-1) @ v  # agents gather from the keys
    attended = torch.softmax(q @ a.transpose(-1, -2) * d ** (-0.5 * 0.3), dim=-1) @ agent_values  # queries read the agents
    attended = attended + 0.075 * v
    expected = matching.unmerge(attn.to_out[0](attended.transpose(1, 2).reshape(2, -1, heads * d)))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_path_in_bf16_and_a_unet_on_gpu():
    from zoo import ops

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 2458, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    agents = torch.randn(2, 8, 256, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    scale, query_scale = 64 ** -0.5, 64 ** -0.15
    torch.testing.assert_close(ops.agent_attention(q, k, v, agents, scale=scale, query_scale=query_scale, backend="sdpa"),
                               ops.agent_attention(q, k, v, agents, scale=scale, query_scale=query_scale, backend="reference"),
                               atol=2e-2, rtol=2e-2)  # bf16 outputs, float32 softmax in both
    model = tiny_unet().cuda()
    stock = run(model, {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in unet_inputs().items()})
    apply_attention(model, AgentSDConfig())
    out = run(model, {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in unet_inputs().items()})
    assert out.shape == stock.shape and torch.isfinite(out).all()


def test_two_phase_schedule_switches_at_agent_steps_and_restarts():
    model = tiny_unet()
    apply_attention(model, AgentSDConfig(agent_steps=2))
    calls: dict[tuple[int, bool], int] = {}
    for processor in agentsd_processors(model):
        def counting(q, k, v, agents, inner=processor.attend, state=processor.state):
            key = (state.step, agents is not None)
            calls[key] = calls.get(key, 0) + 1
            return inner(q, k, v, agents)

        processor.attend = counting
    for t in (999, 750, 500, 250):  # CFG is batched: one UNet call per step
        run(model, unet_inputs(t))
    assert calls == {(0, True): 3, (1, True): 3, (2, False): 3, (3, False): 3}
    run(model, unet_inputs(999))  # a new generation starts with agents again
    assert calls[(0, True)] == 6


def test_sdxl_like_unet_uses_its_highest_resolution_attention_and_odd_sizes():
    model = tiny_unet(sdxl_like=True)
    stock = run(model, unet_inputs(size=18))
    apply_attention(model, AgentSDConfig())
    processors = agentsd_processors(model)
    # down_blocks.1, the mid block (no downsampler after the last level) and up_blocks.0's two layers
    assert len(processors) == 4 and all(p.downsample == 2 for p in processors)
    out = run(model, unet_inputs(size=18))  # 9x9 tokens: the stride grid leaves a border of sources
    assert out.shape == stock.shape and torch.isfinite(out).all()


def test_destinations_are_deterministic_under_the_seed():
    args = unet_inputs()
    outs = []
    for seed in (0, 0, 1):
        model = tiny_unet()
        apply_attention(model, AgentSDConfig(seed=seed))
        outs.append(run(model, args))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    model = tiny_unet()
    apply_attention(model, AgentSDConfig(random_destinations=False))
    odd, fixed = unet_inputs(batch=1), AgentSDConfig(seed=5)
    other = tiny_unet()
    apply_attention(other, fixed)
    assert torch.equal(run(model, odd), run(other, odd))  # odd batch: top-left destinations (tomesd)


# ---------------------------------------------------------------- a tiny StableDiffusionPipeline end to end


def tiny_sd_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<|endoftext|>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a cat dog on the beach".split())}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<|endoftext|>",
                                        unk_token="<unk>", model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=8, eos_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stable_diffusion_pipeline_end_to_end():
    pipe = tiny_sd_pipeline()
    call = dict(prompt="a cat on the beach", negative_prompt="dog", height=32, width=32, num_inference_steps=4,
                output_type="pt")

    def generate():
        return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    stock = generate()
    apply_attention(pipe.unet, AgentSDConfig(agent_steps=2))
    phases = []
    for processor in agentsd_processors(pipe.unet)[:1]:
        def recording(q, k, v, agents, inner=processor.attend, state=processor.state):
            phases.append((state.step, agents is not None))
            return inner(q, k, v, agents)

        processor.attend = recording
    image = generate()
    assert image.shape == stock.shape and torch.isfinite(image).all() and not torch.equal(image, stock)
    assert phases == [(0, True), (1, True), (2, False), (3, False)]
    assert torch.equal(generate(), image)  # the next generation restarts at step 0: same image
    remove_attention(pipe.unet)
    assert torch.equal(generate(), stock)


# ---------------------------------------------------------------- the benchmark script


def test_benchmark_script_quick_mode(tmp_path, monkeypatch):
    import json

    bench = load_script("benchmark_agentsd")
    rows = bench.main(["--quick", "--json", str(tmp_path / "out.json")])
    assert [row["name"] for row in rows] == ["tiny"]
    assert all(rows[0][method]["ms"] > 0 for method in ("sdpa", "merge", "agentsd"))
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["device"] == "cpu" and report["rows"][0]["tokens"] == 256
    verdicts = bench.verdicts([{"name": "sd15-1024", "sdpa": {"ms": 130.0}, "merge": {"ms": 110.0},
                                "agentsd": {"ms": 100.0}}])
    assert "AgentSD faster than merging alone: TARGET MET" in verdicts[0]
    assert "1.30x >= 1.3x vs SDPA: TARGET MET" in verdicts[1]
