"""BiFormer: official layout and checkpoints, every quirk, padding modes, params/FLOPs, model API."""
import argparse
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_ops_routing import brute_force, official_bra
from timm.layers import LayerNorm2d
from zoo.backbones.biformer import AttentionLePE, BiLevelRoutingAttention, NCHWAttentionLePE

import zoo

VARIANTS = ["biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw"]
# params recomputed from the official module shapes (reference notes, to 0.01M)
REFERENCE_PARAMS_M = {"biformer_tiny": 13.14, "biformer_small": 25.54, "biformer_base": 56.80,
                      "biformer_stl": 28.37, "biformer_stl_nchw": 28.37}
ARCH = {  # layout, depths, dims, mlp ratio of the official entrypoints
    "biformer_tiny": ("biformer", (2, 2, 8, 2), (64, 128, 256, 512), 3),
    "biformer_small": ("biformer", (4, 4, 18, 4), (64, 128, 256, 512), 3),
    "biformer_base": ("biformer", (4, 4, 18, 4), (96, 192, 384, 768), 3),
    "biformer_stl": ("stl", (2, 2, 6, 2), (96, 192, 384, 768), 4),
    "biformer_stl_nchw": ("stl_nchw", (2, 2, 6, 2), (96, 192, 384, 768), 4),
}


def official_shapes(layout, depths, dims, mlp_ratio):
    """The official state dict's keys and shapes, written from the official module tree
    (models/biformer.py, biformer_stl.py, biformer_stl_nchw.py, ops/bra_*.py, models/_common.py)."""
    shapes = {}

    def conv(name, c_out, c_in, k, bias=True):
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        if bias:
            shapes[f"{name}.bias"] = (c_out,)

    def linear(name, c_out, c_in, bias=True):
        shapes[f"{name}.weight"] = (c_out, c_in)
        if bias:
            shapes[f"{name}.bias"] = (c_out,)

    def bn(name, c):
        shapes.update({f"{name}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{name}.num_batches_tracked"] = ()

    def ln(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    if layout == "biformer":
        conv("downsample_layers.0.0", dims[0] // 2, 3, 3)
        bn("downsample_layers.0.1", dims[0] // 2)
        conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3)
        bn("downsample_layers.0.4", dims[0])
        for i in range(1, 4):
            conv(f"downsample_layers.{i}.0", dims[i], dims[i - 1], 3)
            bn(f"downsample_layers.{i}.1", dims[i])
    else:
        conv("downsample_layers.0.0", dims[0], 3, 4)
        bn("downsample_layers.0.1", dims[0])
        for i in range(1, 4):
            bn(f"downsample_layers.{i}.0", dims[i - 1])
            conv(f"downsample_layers.{i}.1", dims[i], dims[i - 1], 2)
    for i, (depth, c) in enumerate(zip(depths, dims)):
        hidden = int(mlp_ratio * c)
        for j in range(depth):
            p = f"stages.{i}.{j}" if layout == "biformer" else f"stages.{i}.blocks.{j}"
            ln(f"{p}.norm1", c)
            ln(f"{p}.norm2", c)
            conv(f"{p}.attn.lepe", c, 1, 5)
            if layout == "stl_nchw":
                conv(f"{p}.mlp.0", hidden, c, 1)
                conv(f"{p}.mlp.2", c, hidden, 1)
                if i < 3:
                    conv(f"{p}.attn.qkv_linear", 3 * c, c, 1)
                    conv(f"{p}.attn.output_linear", c, c, 1)
                else:
                    conv(f"{p}.attn.qkv", 3 * c, c, 1, bias=False)
                    conv(f"{p}.attn.proj", c, c, 1)
                continue
            if layout == "biformer":
                conv(f"{p}.pos_embed", c, 1, 3)
            linear(f"{p}.mlp.0", hidden, c)
            linear(f"{p}.mlp.{3 if layout == 'biformer' else 2}", c, hidden)
            if i < 3:
                linear(f"{p}.attn.qkv.qkv", 3 * c, c)
                linear(f"{p}.attn.wo", c, c)
            else:
                linear(f"{p}.attn.qkv", 3 * c, c, bias=False)
                linear(f"{p}.attn.proj", c, c)
    bn("norm", dims[-1])
    linear("head", 1000, dims[-1])
    return shapes


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return zoo.create_model("biformer_tiny").eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_params_flops_keys_and_cfg_match_the_official_model(name):
    model = zoo.create_model(name)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_shapes(*ARCH[name])
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == REFERENCE_PARAMS_M[name]
    cfg = model.pretrained_cfg
    flops = zoo.flops(model)
    assert abs(flops / cfg["paper_flops"] - 1) < 0.02, (flops, cfg["paper_flops"])
    assert abs(REFERENCE_PARAMS_M[name] * 1e6 / cfg["paper_params"] - 1) < 0.005
    assert cfg["url"].startswith("https://api.onedrive.com/") and cfg["top1"] > 80
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["input_size"]) == ("bicubic", 0.875, (3, 224, 224))
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == timm.data.IMAGENET_DEFAULT_STD


def test_documented_small_shapes():
    shapes = {k: tuple(v.shape) for k, v in zoo.create_model("biformer_small").state_dict().items()}
    assert shapes["stages.0.0.attn.qkv.qkv.weight"] == (192, 64)
    assert shapes["stages.3.0.attn.qkv.weight"] == (1536, 512) and "stages.3.0.attn.qkv.bias" not in shapes
    assert shapes["stages.3.0.attn.lepe.weight"] == (512, 1, 5, 5)
    assert shapes["norm.running_var"] == (512,)


def test_official_checkpoint_loads_through_the_registry(tiny, tmp_path):
    """An official-layout file (weights under "model", argparse args beside) at the registered file name."""
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    cached = zoo.weights.cache_path("biformer_tiny.in1k")
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "args": argparse.Namespace(model="biformer_tiny"), "epoch": 299},
               cached)
    loaded = zoo.create_model("biformer_tiny", pretrained=True).eval()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), tiny(x))
    dense = zoo.create_model("biformer_tiny", pretrained=True, features_only=True, extra_norms=True)
    assert torch.equal(dense.model.stages[0][0].attn.wo.weight, state["stages.0.0.attn.wo.weight"])
    assert torch.equal(dense.model.extra_norms[0].weight, torch.ones(64))  # fresh, as the official mm backbone
    broken = dict(state)
    broken.pop("stages.3.0.attn.proj.bias")
    other = tmp_path / "broken.pth"
    torch.save({"model": broken}, other)
    with pytest.raises(zoo.weights.WeightsError, match="missing keys: stages.3.0.attn.proj.bias"):
        zoo.weights.load_weights(loaded, other)


def _bra_by_hand(layer, x, scale, pad_first):
    """The official layer (ops/bra_legacy.py) around the gather-based official algorithm."""
    height, width = x.shape[1:3]
    if pad_first:
        x = F.pad(x, (0, 0, 0, -width % layer.n_win, 0, -height % layer.n_win))
    q, k, v = layer.qkv.qkv(x).chunk(3, -1)
    heads = lambda t: t.unflatten(-1, (layer.num_heads, -1))  # noqa: E731
    out = official_bra(heads(q), heads(k), heads(v), layer.n_win, layer.topk, scale)[0].flatten(-2)
    out = out + layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return layer.wo(out)[:, :height, :width]


def test_routed_attention_uses_the_full_width_scale():
    torch.manual_seed(1)
    layer = BiLevelRoutingAttention(64, num_heads=2, n_win=2, topk=2).double()
    x = torch.randn(2, 6, 6, 64, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, _bra_by_hand(layer, x, 64 ** -0.5, False))
        assert not torch.allclose(out, _bra_by_hand(layer, x, 32 ** -0.5, False), atol=1e-4)


def test_legacy_padding_is_the_official_auto_pad():
    torch.manual_seed(2)
    layer = BiLevelRoutingAttention(32, num_heads=2, n_win=3, topk=2, padding="legacy").double()
    layer.qkv.qkv.bias.data.normal_()  # padded tokens carry the bias: they matter
    x = torch.randn(1, 7, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, _bra_by_hand(layer, x, 32 ** -0.5, True))
        layer.padding = "masked"
        assert not torch.allclose(layer(x), out, atol=1e-4)


def test_masked_padding_matches_the_token_oracle():
    torch.manual_seed(3)
    layer = BiLevelRoutingAttention(32, num_heads=2, n_win=3, topk=2).double()
    x = torch.randn(1, 7, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = layer.qkv.qkv(x).chunk(3, -1)
        heads = lambda t: t.unflatten(-1, (2, -1))  # noqa: E731
        att = brute_force(heads(q), heads(k), heads(v), 3, 2, 32 ** -0.5)[0].flatten(-2)
        expected = layer.wo(att + layer.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        torch.testing.assert_close(layer(x), expected)


def _dense_by_hand(attn, x_nhwc, lepe_on_value):
    b, h, w, c = x_nhwc.shape
    if isinstance(attn, NCHWAttentionLePE):
        qkv = torch.einsum("bhwc,oc->bhwo", x_nhwc, attn.qkv.weight[:, :, 0, 0])
    else:
        qkv = x_nhwc @ attn.qkv.weight.T
    q, k, v = qkv.reshape(b, h * w, 3, 8, c // 8).permute(2, 0, 3, 1, 4)  # 8 heads, no bias
    out = ((q @ k.transpose(-1, -2)) * (c // 8) ** -0.5).softmax(-1) @ v
    out = out.transpose(1, 2).reshape(b, h, w, c)
    lepe_in = qkv[..., 2 * c:] if lepe_on_value else x_nhwc
    out = out + attn.lepe(lepe_in.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    if isinstance(attn, NCHWAttentionLePE):
        return torch.einsum("bhwc,oc->bhwo", out, attn.proj.weight[:, :, 0, 0]) + attn.proj.bias
    return attn.proj(out)


@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_stl", "biformer_stl_nchw"])
def test_stage4_is_dense_8_head_attention_with_lepe(name):
    model = zoo.create_model(name, depths=(1, 1, 1, 1))
    stage = model.stages[3]
    attn = (stage[0] if name == "biformer_tiny" else stage.blocks[0]).attn
    nchw = name == "biformer_stl_nchw"
    assert isinstance(attn, NCHWAttentionLePE if nchw else AttentionLePE)
    c = model.embed_dims[3]
    x = torch.randn(1, 3, 4, c)
    with torch.no_grad():
        out = attn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) if nchw else attn(x)
        # Faithful: LePE on the input x for the legacy models, on v for STL-nchw
        torch.testing.assert_close(out, _dense_by_hand(attn, x, lepe_on_value=nchw), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out, _dense_by_hand(attn, x, lepe_on_value=not nchw), atol=1e-3)


def test_head_norm_is_batchnorm_block_norms_use_eps_1e6_and_heads_are_width_over_32():
    for name in ("biformer_tiny", "biformer_stl", "biformer_stl_nchw"):
        model = zoo.create_model(name, depths=(1, 1, 1, 1))
        assert type(model.norm) is nn.BatchNorm2d
        norms = [m for m in model.stages.modules() if isinstance(m, (nn.LayerNorm, LayerNorm2d))]
        assert len(norms) == 8 and all(m.eps == 1e-6 for m in norms)
        assert isinstance(norms[0], LayerNorm2d) == (name == "biformer_stl_nchw")
    for name, heads in (("biformer_tiny", [2, 4, 8]), ("biformer_base", [3, 6, 12]), ("biformer_stl", [3, 6, 12])):
        model = zoo.create_model(name, depths=(1, 1, 1, 1))
        attns = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
        assert [a.num_heads for a in attns] == heads and [a.topk for a in attns] == [1, 4, 16]
        assert [a.n_win for a in attns] == [7, 7, 7]
    stem = zoo.create_model("biformer_tiny", depths=(1, 1, 1, 1)).downsample_layers[0]
    assert [type(m) for m in stem] == [nn.Conv2d, nn.BatchNorm2d, nn.GELU, nn.Conv2d, nn.BatchNorm2d]


def test_cpe_runs_before_each_block(tiny):
    block = tiny.stages[0][0]
    x = torch.randn(1, 8, 8, 64)
    with torch.no_grad():
        base = block(x)
        block.pos_embed.bias.add_(1.0)
        changed = block(x)
        block.pos_embed.bias.sub_(1.0)
    assert not torch.allclose(base, changed)


def test_any_input_size_in_masked_mode_and_modes_agree_on_multiples_of_112(tiny):
    x = torch.randn(1, 3, 200, 168)
    with torch.no_grad():
        out = tiny(x)
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
        legacy = zoo.create_model("biformer_tiny", padding="legacy").eval()
        legacy.load_state_dict(tiny.state_dict())
        x = torch.randn(1, 3, 112, 112)
        torch.testing.assert_close(legacy(x), tiny(x))
        assert torch.isfinite(legacy(torch.randn(1, 3, 200, 168))).all()
    with pytest.raises(ValueError, match="padding='legacy' is not available for layout='stl_nchw'"):
        zoo.create_model("biformer_stl_nchw", padding="legacy")
    with pytest.raises(ValueError, match="padding must be one of"):
        zoo.create_model("biformer_tiny", padding="zeros")
    with pytest.raises(ValueError, match="global_pool='' leaves NCHW maps"):  # a Linear head on a map
        zoo.create_model("biformer_mnist", global_pool="")
    unpooled = zoo.create_model("biformer_mnist", global_pool="", num_classes=0).eval()
    assert unpooled(torch.randn(1, 1, 32, 32)).shape == (1, 256, 1, 1)


def test_features_only_and_extra_norms():
    torch.manual_seed(4)
    feats = zoo.create_model("biformer_tiny", features_only=True).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        outs = feats(x)
    assert [tuple(o.shape) for o in outs] == [(2, 64, 28, 28), (2, 128, 14, 14), (2, 256, 7, 7), (2, 512, 4, 4)]
    assert feats.feature_info.channels() == [64, 128, 256, 512]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]

    normed = zoo.create_model("biformer_tiny", features_only=True, extra_norms=True).eval()
    assert all(isinstance(m, LayerNorm2d) for m in normed.model.extra_norms)
    for m in normed.model.extra_norms:
        m.weight.data.normal_()
    state = {k: v for k, v in normed.model.state_dict().items() if not k.startswith("extra_norms")}
    feats.model.load_state_dict(state)
    with torch.no_grad():
        plain, with_norms = feats(x), normed(x)
    for i, (p, n) in enumerate(zip(plain, with_norms)):
        torch.testing.assert_close(n, normed.model.extra_norms[i](p))


def test_forward_backward_and_grad_checkpointing(tiny):
    model = zoo.create_model("biformer_tiny", depths=(1, 1, 2, 1), num_classes=10)
    x = torch.randn(2, 3, 112, 112)
    out = model(x)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    torch.testing.assert_close(out2, out)
    out2.square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_has_no_nan(tiny):
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.no_grad():
        ref = tiny(x)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_routed_layer_compiles():
    layer = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4).eval()
    x = torch.randn(1, 15, 14, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, backend="aot_eager")(x), layer(x))


def test_timm_api(tiny):
    model = timm.create_model("biformer_tiny", num_classes=7, drop_path_rate=0.1)
    x = torch.randn(1, 3, 112, 112)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 7)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 512)
        final, inter = model.forward_intermediates(x)
        assert final.shape == (1, 512, 4, 4) and len(inter) == 4
    model.reset_classifier(0)
    assert model.get_classifier().__class__ is nn.Identity and model.num_features == 512
    assert {"stem", "blocks"} <= set(model.group_matcher())
    assert math.isclose(model.stages[3][-1].drop_path.drop_prob, 0.1, rel_tol=1e-6)
