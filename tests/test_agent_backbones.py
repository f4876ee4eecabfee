"""Agent / FLatten / InLine backbones: official architecture (params, keys), FLOPs, placement,
resolution handling, features_only, checkpoint loading. No downloads."""
import sys
import types

import pytest
import torch

import zoo

zoo.list_models()  # registers the models before zoo.weights is imported by name (import order)
from zoo.weights import WeightsError, get_weights, load_weights  # noqa: E402

# Parameter counts of the official model definitions (LeapLabTHU/Agent-Attention@207ce3e,
# FLatten-Transformer@abdb115, InLine@e463a6f) instantiated with the released configs; for these
# and every other registered variant the official state_dict keys and shapes were checked equal
# to ours (and logits equal after a strict load: scripts/check_official_agent_linear.py).
OFFICIAL_PARAMS = {
    "agent_swin_tiny": 28_902_964,
    "agent_swin_base": 88_095_096,
    "agent_pvt_tiny": 11_570_352,
    "agent_pvt_medium_256": 36_083_682,
    "agent_deit_tiny": 6_015_640,
    "agent_deit_base": 87_204_904,
    "agent_cswin_tiny": 20_458_672,
    "agent_cswin_small": 32_814_100,
    "flatten_swin_tiny": 29_192_384,
    "flatten_pvt_tiny": 12_150_504,
    "flatten_pvt_v2_b0": 3_594_824,
    "flatten_cswin_tiny": 21_201_768,
    "inline_swin_tiny": 29_223_544,
    "inline_pvt_tiny": 12_032_232,
    "inline_pvt_large": 51_154_280,
    "inline_deit_tiny": 6_477_736,
    "inline_cswin_tiny": 20_604_520,
}

FAMILIES = ("agent_*", "flatten_*", "inline_*")


def _meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return zoo.create_model(name, **kw)


def _nparams(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_params_equal_official_code(name):
    assert _nparams(_meta(name)) == OFFICIAL_PARAMS[name]


def test_every_variant_registered_with_paper_numbers_and_url():
    names = zoo.list_models(list(FAMILIES))
    expected = {
        "agent_swin_tiny", "agent_swin_small", "agent_swin_small_288", "agent_swin_base", "agent_swin_base_384",
        "agent_pvt_tiny", "agent_pvt_small", "agent_pvt_medium", "agent_pvt_medium_256", "agent_pvt_large",
        "agent_deit_tiny", "agent_deit_small", "agent_deit_small_448", "agent_deit_base",
        "agent_cswin_tiny", "agent_cswin_small", "agent_cswin_base", "agent_cswin_base_384",
        "flatten_pvt_tiny", "flatten_pvt_v2_b0", "flatten_swin_tiny", "flatten_swin_small", "flatten_swin_base", "flatten_cswin_tiny",
        "inline_deit_tiny", "inline_pvt_tiny", "inline_pvt_small", "inline_pvt_medium", "inline_pvt_large",
        "inline_swin_tiny", "inline_swin_small", "inline_swin_base",
        "inline_cswin_tiny", "inline_cswin_small", "inline_cswin_base",
    }
    assert expected <= set(names)
    for name in expected:
        w = get_weights(f"{name}.in1k")
        assert w.url.startswith("https://cloud.tsinghua.edu.cn/f/") and w.url.endswith("/?dl=1")
        assert w.filename == f"{name}.in1k.pth"
        assert isinstance(w.cfg["top1"], float)
        assert "paper_params" in w.cfg and "paper_flops" in w.cfg


@pytest.mark.parametrize("name", ["agent_swin_tiny", "agent_pvt_tiny", "agent_deit_tiny", "flatten_pvt_v2_b0"])
def test_flops_within_2_percent_of_paper(name):
    model = zoo.create_model(name)
    flops = zoo.flops(model) / 1e9
    paper = model.pretrained_cfg["paper_flops"] / 1e9
    # tables give one decimal: Agent-DeiT-T's 1.2G is fvcore's 1.18G for the official code
    assert abs(flops - paper) / paper < 0.02 or round(flops, 1) == paper, (flops, paper)


def test_official_key_layout_and_shapes():
    """Keys and shapes the reference lists for the official checkpoints."""
    sd = _meta("agent_swin_tiny").state_dict()
    expect = {
        "layers.0.blocks.0.attn.an_bias": (3, 9, 7, 7), "layers.0.blocks.0.attn.na_bias": (3, 9, 7, 7),
        "layers.0.blocks.0.attn.ah_bias": (1, 3, 9, 56, 1), "layers.0.blocks.0.attn.aw_bias": (1, 3, 9, 1, 56),
        "layers.0.blocks.0.attn.ha_bias": (1, 3, 56, 1, 9), "layers.0.blocks.0.attn.wa_bias": (1, 3, 1, 56, 9),
        "layers.0.blocks.0.attn.qkv.weight": (288, 96), "layers.0.blocks.0.attn.dwc.weight": (96, 1, 3, 3),
        "layers.2.blocks.0.attn.an_bias": (12, 49, 7, 7), "layers.2.blocks.0.attn.ah_bias": (1, 12, 49, 14, 1),
        "layers.3.blocks.0.attn.relative_position_bias_table": (169, 24),
        "layers.0.downsample.reduction.weight": (192, 384), "patch_embed.proj.weight": (96, 3, 4, 4),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("attn_mask" in k or "relative" in k for k in sd if k.startswith("layers.0."))
    deit = _meta("agent_deit_tiny").state_dict()
    assert tuple(deit["blocks.0.attn.ac_bias"].shape) == (1, 3, 49, 1)
    assert tuple(deit["blocks.0.attn.ca_bias"].shape) == (1, 3, 1, 49)
    pvt = _meta("agent_pvt_tiny").state_dict()
    assert tuple(pvt["block1.0.attn.q.weight"].shape) == (64, 64) and tuple(pvt["block1.0.attn.kv.weight"].shape) == (128, 64)
    assert tuple(pvt["pos_embed1"].shape) == (1, 3136, 64) and "norm.weight" not in pvt  # no final norm
    assert "norm.weight" in _meta("flatten_pvt_tiny").state_dict()  # present but unused in FLatten-PVT
    v2 = _meta("flatten_pvt_v2_b0").state_dict()
    assert tuple(v2["block1.0.mlp.dwconv.dwconv.weight"].shape) == (256, 1, 3, 3) and "norm4.weight" in v2
    assert tuple(v2["patch_embed1.proj.weight"].shape) == (32, 3, 7, 7) and "pos_embed1" not in v2
    cswin = _meta("agent_cswin_tiny").state_dict()
    assert tuple(cswin["stage1.0.attns.0.an_bias"].shape) == (2, 9, 7, 7)
    assert tuple(cswin["stage1.0.attns.0.ah_bias"].shape) == (1, 2, 9, 56, 1)
    assert "stage1.0.attns.1.get_v.weight" not in cswin  # agent blocks: one global branch
    assert "stage3.0.attns.1.get_v.weight" in cswin  # softmax blocks: two stripe branches
    flat = _meta("flatten_swin_tiny").state_dict()
    assert tuple(flat["layers.0.blocks.0.attn.scale"].shape) == (1, 1, 96)
    assert tuple(flat["layers.0.blocks.0.attn.positional_encoding"].shape) == (1, 3136, 96)
    assert tuple(flat["layers.0.blocks.0.attn.dwc.weight"].shape) == (32, 1, 5, 5)  # head-shared 5x5 DWC
    inline = _meta("inline_swin_tiny").state_dict()
    assert tuple(inline["layers.0.blocks.0.attn.residual.2.weight"].shape) == (864, 32, 1)


def test_placement_per_block():
    from zoo.backbones._mixers import AgentAttention
    from zoo.backbones.swin_style import WindowAttention

    m = _meta("agent_swin_base")
    stage3 = [type(b.attn) for b in m.layers[2].blocks]
    assert stage3[:2] == [AgentAttention] * 2 and set(stage3[2:]) == {WindowAttention}
    assert all(b.window == 56 and b.shift == 0 for b in m.layers[0].blocks)  # one global window
    assert [b.shift for b in m.layers[2].blocks[2:4]] == [0, 3] and m.layers[2].blocks[2].window == 7
    m288 = _meta("agent_swin_small_288")
    assert m288.layers[2].blocks[0].window == 9  # softmax window max(7, 72 // 8)
    deit_b = _meta("agent_deit_base")
    assert [type(b.attn).__name__ for b in deit_b.blocks].count("AgentAttention") == 4
    assert isinstance(deit_b.blocks[3].attn, AgentAttention) and not isinstance(deit_b.blocks[4].attn, AgentAttention)


def test_stage_blocks_expands_per_stage_mixers():
    """Agent-Swin-B's `AAMB2`: two agent stages, a stage of 2 agent blocks then softmax, a softmax stage."""
    from zoo.backbones._common import Mixed, stage_blocks

    assert stage_blocks(("agent", "agent", Mixed("agent", 2), "softmax"), (1, 1, 4, 2)) == (
        ("agent",), ("agent",), ("agent", "agent", "softmax", "softmax"), ("softmax", "softmax"))
    with pytest.raises(ValueError, match="one mixer"):
        stage_blocks(("agent",) * 3, (2, 2, 2, 2))
    with pytest.raises(ValueError, match="unknown mixer"):
        stage_blocks(("agnet",) * 4, (2, 2, 2, 2))
    with pytest.raises(ValueError, match="must mix"):
        stage_blocks(("agent",) * 3 + (Mixed("agent", 3),), (2, 2, 2, 2))


def _fake_module(monkeypatch, name: str):
    """A class `name` importable while saving (e.g. yacs' CfgNode, absent here), gone when loading."""
    module_name, cls_name = name.rsplit(".", 1)
    module = types.ModuleType(module_name)
    cls = type(cls_name, (dict,), {"__module__": module_name})
    setattr(module, cls_name, cls)
    monkeypatch.setitem(sys.modules, module_name, module)
    return cls


def test_checkpoint_in_official_layout_loads_strictly(tmp_path, monkeypatch):
    model = zoo.create_model("agent_pvt_tiny")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "agent_pvt_tiny.pth"
    # the official training scripts' container, with their pickled yacs config
    config = _fake_module(monkeypatch, "yacs.config.CfgNode")({"MODEL": {"TYPE": "agent_pvt_tiny"}})
    torch.save({"model": state, "config": config, "epoch": 299}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")
    fresh = zoo.create_model("agent_pvt_tiny")
    load_weights(fresh, path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path, monkeypatch):
    evil = _fake_module(monkeypatch, "evil.Payload")
    path = tmp_path / "bad.pth"
    torch.save({"model": {"w": torch.ones(1)}, "config": evil(a=1)}, path)
    monkeypatch.delitem(sys.modules, "evil")
    with pytest.raises(WeightsError, match="pickled objects other than tensors"):
        zoo.weights.read_checkpoint(path)


def test_other_resolutions_and_features_only():
    torch.manual_seed(0)
    """The 224 models at other (also non-square) sizes: bias / pos-embed resizing, window padding."""
    for name, kw, size in (("agent_swin_tiny", {}, (288, 288)),
                           ("inline_swin_tiny", dict(depths=(1, 1, 2, 2)), (160, 224)),
                           ("agent_deit_tiny", dict(depth=2), (288, 224)),
                           ("agent_cswin_tiny", dict(depths=(1, 1, 1, 1)), (256, 256)),
                           ("flatten_cswin_tiny", dict(depths=(1, 1, 2, 1)), (256, 192))):
        with torch.no_grad():
            out = zoo.create_model(name, **kw).eval()(torch.randn(1, 3, *size))
        assert out.shape == (1, 1000) and torch.isfinite(out).all(), name
    feats = zoo.create_model("agent_pvt_tiny", features_only=True).eval()
    with torch.no_grad():
        outs = feats(torch.randn(1, 3, 256, 192))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 64, 48), (1, 128, 32, 24), (1, 320, 16, 12), (1, 512, 8, 6)]


def test_runtime_bias_resize_matches_finetune_interpolation():
    """A 224 Agent-PVT run at 256 equals the 256 model loaded with the official fine-tune resize."""
    torch.manual_seed(0)
    small = zoo.create_model("agent_pvt_tiny", depths=(1, 1, 1, 1)).eval()
    big = zoo.create_model("agent_pvt_tiny", depths=(1, 1, 1, 1), img_size=256).eval()
    state = small.state_dict()
    big_state = big.state_dict()
    f = torch.nn.functional
    for k, v in state.items():
        if big_state[k].shape == v.shape:
            big_state[k] = v
            continue
        if k.startswith("pos_embed"):
            n, c = v.shape[1], v.shape[2]
            g, g2 = int(n ** 0.5), int(big_state[k].shape[1] ** 0.5)
            grid = v.transpose(1, 2).reshape(1, c, g, g)
            big_state[k] = f.interpolate(grid, size=(g2, g2), mode="bilinear").flatten(2).transpose(1, 2)
        else:  # utils.load_pretrained: 1-D linear resize of ah/aw/ha/wa biases
            dims = [d for d in range(5) if v.shape[d] != big_state[k].shape[d]]
            moved = v.movedim(dims[0], -1)
            flat = moved.reshape(-1, 1, moved.shape[-1])
            res = f.interpolate(flat, size=big_state[k].shape[dims[0]], mode="linear")
            big_state[k] = res.reshape(*moved.shape[:-1], -1).movedim(-1, dims[0])
    big.load_state_dict(big_state)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(small(x), big(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["flatten_swin_tiny", "inline_cswin_tiny", "inline_deit_tiny"])
def test_forward_backward_small(name):
    torch.manual_seed(0)
    kw = dict(depths=(1, 1, 1, 1)) if "deit" not in name else dict(depth=2)
    model = zoo.create_model(name, num_classes=10, **kw)
    out = model(torch.randn(2, 3, 224, 224) if "swin" in name or "cswin" in name else torch.randn(2, 3, 64, 96))
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert out.shape == (2, 10) and not missing, missing


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "flatten_pvt_tiny", "inline_pvt_tiny"])
def test_bfloat16_autocast_at_512_has_no_nan(name):
    """Mean-normalised linear attention: no overflow with 16k tokens in stage 1 (narrow model)."""
    torch.manual_seed(0)
    model = zoo.create_model(name, depths=(1, 1, 1, 1), embed_dims=(32, 32, 32, 32), num_heads=(1, 1, 1, 1),
                             mlp_ratios=(1, 1, 1, 1)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 512, 512) * 3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


TINY = ("agent_swin_tiny", "flatten_swin_tiny", "inline_swin_tiny", "agent_pvt_tiny", "flatten_pvt_tiny",
        "flatten_pvt_v2_b0", "inline_pvt_tiny", "agent_deit_tiny", "inline_deit_tiny", "agent_cswin_tiny",
        "flatten_cswin_tiny", "inline_cswin_tiny")


def test_every_variant_takes_model_kwargs():
    """Arguments the variant also sets (drop_path_rate, img_size, ...) override it, for every variant."""
    for name in zoo.list_models(list(FAMILIES)):
        if name.endswith("_mnist"):
            continue
        model = _meta(name, drop_path_rate=0.1, num_classes=10)
        assert model.num_classes == 10, name
        dpr = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
        assert dpr and max(dpr) == pytest.approx(0.1), name


@pytest.mark.parametrize("name", TINY)
def test_tiny_with_drop_path_trains(name):
    torch.manual_seed(0)
    model = zoo.create_model(name, drop_path_rate=0.1, num_classes=10).train()
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_unpooled_features_and_pooling_choices():
    """forward_features is unpooled (NHWC Swin / CSWin, NCHW PVT, tokens DeiT); the head pools."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    cases = (("inline_swin_tiny", dict(depths=(1, 1, 1, 1)), (1, 7, 7, 768)),
             ("agent_cswin_tiny", dict(depths=(1, 1, 1, 1)), (1, 7, 7, 512)),
             ("agent_pvt_tiny", dict(depths=(1, 1, 1, 1)), (1, 512, 7, 7)),
             ("agent_deit_tiny", dict(depth=2), (1, 197, 192)))
    for name, kw, shape in cases:
        model = zoo.create_model(name, **kw).eval()
        with torch.no_grad():
            feats = model.forward_features(x)
            pooled = model.forward_head(feats, pre_logits=True)
            assert tuple(feats.shape) == shape, name
            dims = {"NHWC": (1, 2), "NCHW": (2, 3)}.get(model.output_fmt)
            want = feats[:, 0] if dims is None else feats.mean(dim=dims)
            torch.testing.assert_close(pooled, want, msg=name)
            torch.testing.assert_close(model(x), model.head(pooled), msg=name)
            model.reset_classifier(0, "")
            assert model.global_pool == "" and torch.equal(model(x), feats), name
    deit = zoo.create_model("agent_deit_tiny", depth=2, global_pool="avg").eval()
    with torch.no_grad():
        torch.testing.assert_close(deit.forward_head(deit.forward_features(x), pre_logits=True),
                                   deit.forward_features(x)[:, 1:].mean(1))
    with pytest.raises(ValueError, match="global_pool must be one of"):
        _meta("agent_swin_tiny", global_pool="token")
    with pytest.raises(ValueError, match="num_classes=0"):
        _meta("agent_pvt_tiny").reset_classifier(5, "")


def _agent_attention(**kw):
    from zoo.backbones._mixers import AgentAttention

    torch.manual_seed(0)
    return AgentAttention(32, 2, 4, (6, 6), **kw).eval()


@pytest.mark.parametrize("cls_token", [False, True])
def test_inference_reuses_agent_biases_until_they_change(cls_token):
    """Eval without gradients builds the biases once per grid (aligned rows) and rebuilds them when a bias
    parameter changes in place (load_state_dict, an optimizer step) or the grid changes; outputs equal a fresh
    build's (the path with gradients on, which never caches)."""
    attn = _agent_attention(cls_token=cls_token)
    lead = int(cls_token)

    def run(size, cached: bool):
        x = torch.randn(2, lead + size[0] * size[1], 32, generator=torch.Generator().manual_seed(1))
        with torch.set_grad_enabled(not cached):
            return attn(x, size).detach()

    first = run((6, 6), True)
    key, agent_bias, query_bias = attn._bias_cache
    for bias in (agent_bias, query_bias):
        assert bias.stride(-1) == 1 and all(s % 16 == 0 for s in bias.stride()[:-1]), bias.stride()
    assert torch.equal(run((6, 6), True), first) and attn._bias_cache[1] is agent_bias  # reused, not rebuilt
    torch.testing.assert_close(first, run((6, 6), False), rtol=0, atol=1e-6)
    state = {k: v + 0.5 if k.endswith("_bias") and "proj" not in k else v for k, v in attn.state_dict().items()}
    attn.load_state_dict(state)
    changed = run((6, 6), True)
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, run((6, 6), False), rtol=0, atol=1e-6)
    with torch.no_grad():
        attn.na_bias.mul_(2.0)  # an in-place update, as an optimizer step
    torch.testing.assert_close(run((6, 6), True), run((6, 6), False), rtol=0, atol=1e-6)
    torch.testing.assert_close(run((4, 9), True), run((4, 9), False), rtol=0, atol=1e-6)  # another grid
    copy = __import__("copy").deepcopy(attn)  # fresh parameters (version 0) holding the cache of the original
    with torch.no_grad():
        for mine, theirs in zip(copy._bias_params(), attn._bias_params()):
            while mine._version < theirs._version:
                mine.add_(0.25)  # as an EMA copy updated in place as often as the original was
    attn = copy
    torch.testing.assert_close(run((4, 9), True), run((4, 9), False), rtol=0, atol=1e-6)


def test_agent_biases_get_gradients_in_training_and_eval_with_grad():
    attn = _agent_attention(cls_token=True)
    for training in (True, False):
        attn.train(training).zero_grad()
        attn(torch.randn(2, 37, 32), (6, 6)).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn._bias_params()), training
    assert attn._bias_cache is None


def test_cached_agent_biases_in_the_sdpa_dtype(monkeypatch):
    """On the SDPA path under autocast the biases are kept in the autocast dtype, and the output equals SDPA's
    with biases built and cast every call."""
    import zoo.ops.agent as agent_ops

    monkeypatch.setattr(agent_ops, "SDPA_DEVICES", ("cpu",))
    attn = _agent_attention(cls_token=True)
    x = torch.randn(2, 37, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        cached = attn(x, (6, 6))
        fresh = attn.train()(x, (6, 6))  # training builds them (no dropout here: the same math)
    assert attn._bias_cache[1].dtype == torch.bfloat16 and cached.dtype == torch.bfloat16
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)


def test_focused_attention_maps_q_and_k_as_the_official_code():
    """FLatten's attend (q and k through the focused map side by side) against the official order in float64:
    k + positional encoding, the focused map of q and of k separately, linear attention per head, shared DWC."""
    from zoo.backbones._mixers import FocusedLinearAttention, merge_heads, split_heads
    from zoo.ops.linear import naive

    torch.manual_seed(0)
    attn = FocusedLinearAttention(24, 2, (4, 5)).double()
    with torch.no_grad():
        attn.scale.normal_(0, 0.5)
        attn.positional_encoding.normal_(0, 0.5)
    q, k, v = (torch.randn(2, 20, 24, dtype=torch.float64) for _ in range(3))
    fq = naive.focused_feature_map(q, attn.scale, 3.0)
    fk = naive.focused_feature_map(k + attn.positional_encoding, attn.scale, 3.0)
    vh = split_heads(v, 2)
    expected = merge_heads(naive.linear_attention(split_heads(fq, 2), split_heads(fk, 2), vh))
    local = attn.dwc(vh.reshape(4, 4, 5, 12).permute(0, 3, 1, 2)).reshape(2, 24, 20).transpose(1, 2)
    torch.testing.assert_close(attn.attend(q, k, v, (4, 5)), expected + local, rtol=1e-12, atol=1e-12)


def test_biases_cached_in_inference_mode_serve_a_frozen_model_with_input_gradients(monkeypatch):
    """A frozen eval model first run under torch.inference_mode (validation), then with gradients to its input
    (a perceptual loss, saliency): the SDPA path saves the bias for backward, which an inference tensor cannot be."""
    import zoo.ops.agent as agent_ops

    monkeypatch.setattr(agent_ops, "SDPA_DEVICES", ("cpu",))
    attn = _agent_attention().requires_grad_(False)
    x = torch.randn(2, 36, 32)
    with torch.inference_mode():
        attn(x, (6, 6))
    x.requires_grad_()
    attn(x, (6, 6)).square().sum().backward()
    assert x.grad.abs().sum() > 0
