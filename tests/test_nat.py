"""NAT / DiNAT / DiNAT_s / isotropic: official layout, quirks, params, FLOPs, sizes, features, dtypes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from grad_checkpointing import assert_checkpointing_takes_effect
from script_modules import load_script
from timm.models import get_pretrained_cfg
from zoo.backbones.nat import NeighborhoodAttention2D, convert_hf_nat
from zoo.ops import na2d

import zoo
from zoo import weights

NAT_NAMES = ["nat_mini", "nat_tiny", "nat_small", "nat_base"]
DINAT_NAMES = ["dinat_mini", "dinat_tiny", "dinat_small", "dinat_base", "dinat_large"]
DINAT_S_NAMES = ["dinat_s_tiny", "dinat_s_small", "dinat_s_base", "dinat_s_large"]
ISO_NAMES = ["nat_iso_small", "nat_iso_base", "dinat_iso_small", "dinat_iso_base", "vit_rpb_small", "vit_rpb_base"]
ALL = NAT_NAMES + DINAT_NAMES + DINAT_S_NAMES + ISO_NAMES

# a small NAT-layout config: stage maps at 96 px are 24, 12, 6, 3 (>= kernel * dilation everywhere)
TINY = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3,
            dilations=[[2], [1], [1, 2], [1]], drop_path_rate=0.1)
TINY_S = dict(TINY, layout="swin")
TINY_ISO = dict(embed_dim=64, depth=3, num_heads=2, kernel_size=3, dilation=2)


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return zoo.create_model(name, **kwargs)


def _n(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# ---------------------------------------------------------------- parameters and FLOPs

# recomputed from the official module shapes (reference table, to 0.01M)
EXACT_PARAMS = {
    "nat_mini": 19.98, "nat_tiny": 27.90, "nat_small": 50.74, "nat_base": 89.77,
    "dinat_mini": 19.98, "dinat_tiny": 27.90, "dinat_base": 89.77, "dinat_large": 200.94,
    "dinat_large.in22k_ft_in1k_384_11x11": 201.14,
    "dinat_s_tiny": 28.29, "dinat_s_small": 49.61, "dinat_s_base": 87.77, "dinat_s_large": 196.53,
}


@pytest.mark.parametrize("name", ALL + ["dinat_large.in22k_ft_in1k_384_11x11", "dinat_s_large.in22k_ft_in1k_384"])
def test_param_count(name):
    model = _meta(name)
    ours = _n(model)
    if name in EXACT_PARAMS:
        assert round(ours, 2) == EXACT_PARAMS[name]
    paper = model.pretrained_cfg["paper_params"] / 1e6  # the paper's rounded value
    assert abs(ours - paper) <= 0.5 + 0.005 * paper, (ours, paper)  # papers print whole millions


def test_dinat_small_has_no_layer_scale_so_it_is_smaller_than_nat_small():
    gammas = 2 * sum(c * d for c, d in zip((96, 192, 384, 768), (3, 4, 18, 5)))
    assert round((_n(_meta("nat_small")) - _n(_meta("dinat_small"))) * 1e6) == gammas


@pytest.mark.parametrize("name", ["nat_mini", "dinat_s_tiny", "nat_iso_small", "vit_rpb_small", "dinat_large"])
def test_flops_match_paper(name):
    """fvcore FLOPs within 2% of the paper (the 384 models: scripts/model_table.py, docs/model_table.md)."""
    model = zoo.create_model(name)
    paper = model.pretrained_cfg["paper_flops"]
    assert abs(zoo.flops(model) / paper - 1) < 0.02


# ---------------------------------------------------------------- official layout and checkpoints

def _official_nat_keys(c, depths, heads, mlp, k, layer_scale, layout="nat"):
    """Key -> shape of the official classification checkpoints (reference §1.3), built from the rules."""
    keys = {}
    stage = "levels" if layout == "nat" else "layers"
    if layout == "nat":
        keys.update({"patch_embed.proj.0.weight": (c // 2, 3, 3, 3), "patch_embed.proj.0.bias": (c // 2,),
                     "patch_embed.proj.1.weight": (c, c // 2, 3, 3), "patch_embed.proj.1.bias": (c,)})
    else:
        keys.update({"patch_embed.proj.weight": (c, 3, 4, 4), "patch_embed.proj.bias": (c,)})
    keys.update({"patch_embed.norm.weight": (c,), "patch_embed.norm.bias": (c,)})
    for i, (d, h) in enumerate(zip(depths, heads)):
        dim = c * 2 ** i
        for j in range(d):
            p = f"{stage}.{i}.blocks.{j}."
            hidden = int(dim * mlp)
            keys.update({
                p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                p + "attn.rpb": (h, 2 * k - 1, 2 * k - 1),
                p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,),
                p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,),
            })
            if layer_scale:
                keys.update({p + "gamma1": (dim,), p + "gamma2": (dim,)})
        if i < len(depths) - 1:
            p = f"{stage}.{i}.downsample."
            if layout == "nat":
                keys.update({p + "reduction.weight": (2 * dim, dim, 3, 3), p + "norm.weight": (2 * dim,),
                             p + "norm.bias": (2 * dim,)})
            else:
                keys.update({p + "reduction.weight": (2 * dim, 4 * dim), p + "norm.weight": (4 * dim,),
                             p + "norm.bias": (4 * dim,)})
    last = c * 2 ** (len(depths) - 1)
    keys.update({"norm.weight": (last,), "norm.bias": (last,), "head.weight": (1000, last), "head.bias": (1000,)})
    return keys


@pytest.mark.parametrize("name,expected", [
    ("nat_small", _official_nat_keys(96, (3, 4, 18, 5), (3, 6, 12, 24), 2, 7, True)),
    ("dinat_tiny", _official_nat_keys(64, (3, 4, 18, 5), (2, 4, 8, 16), 3, 7, False)),
    ("dinat_large.in22k_ft_in1k_384_11x11", _official_nat_keys(192, (3, 4, 18, 5), (6, 12, 24, 48), 2, 11, False)),
    ("dinat_s_large", _official_nat_keys(192, (2, 2, 18, 2), (6, 12, 24, 48), 4, 7, False, "swin")),
])
def test_state_dict_equals_official_layout(name, expected):
    got = {k: tuple(v.shape) for k, v in _meta(name).state_dict().items()}
    assert got == expected


def test_isotropic_state_dict_equals_official_layout():
    got = {k: tuple(v.shape) for k, v in _meta("dinat_iso_base").state_dict().items()}
    assert got["patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert got["layers.11.attn.rpb"] == (24, 13, 13)
    assert got["layers.0.mlp.fc1.weight"] == (3072, 768)
    assert {k.split(".")[0] for k in got} == {"patch_embed", "layers", "norm", "head"}
    assert len(got) == 4 + 12 * 13 + 4


def test_official_flat_checkpoint_loads_strict_through_the_registry(tmp_path, monkeypatch):
    official = zoo.create_model("dinat_s_tiny", depths=(1, 1, 1, 1), dilations=[[1]] * 4)
    path = tmp_path / "dinat_s_tiny_in1k_224.pth"
    torch.save(official.state_dict(), path)  # the official files are flat state dicts
    entry = weights.get_weights("dinat_s_tiny.in1k")
    monkeypatch.setitem(weights._WEIGHTS, "dinat_s_tiny.in1k", dataclasses.replace(entry, url=None, file=str(path)))
    model = zoo.create_model("dinat_s_tiny", pretrained=True, depths=(1, 1, 1, 1), dilations=[[1]] * 4)
    for key, value in official.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert entry.url == "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_s_tiny_in1k_224.pth"


def _to_hf(state: dict, prefix: str) -> dict:
    """Our (official) keys -> the HF-transformers layout of the reference (§1.3.4)."""
    out = {}
    for key, v in state.items():
        if key.startswith("head."):
            out["classifier." + key[5:]] = v
            continue
        k = key.replace("patch_embed.proj.", "embeddings.patch_embeddings.projection.")
        k = k.replace("patch_embed.norm.", "embeddings.norm.").replace("levels.", "encoder.levels.")
        k = k.replace(".blocks.", ".layers.").replace(".norm1.", ".layernorm_before.")
        k = k.replace(".norm2.", ".layernorm_after.").replace(".attn.rpb", ".attention.self.rpb")
        k = k.replace(".attn.proj.", ".attention.output.dense.").replace(".mlp.fc1.", ".intermediate.dense.")
        k = k.replace(".mlp.fc2.", ".output.dense.")
        if k.startswith("norm."):
            k = "layernorm." + k[5:]
        if ".attn.qkv." in k:
            for name, part in zip(("query", "key", "value"), v.chunk(3, 0)):
                out[prefix + k.replace(".attn.qkv.", f".attention.self.{name}.")] = part.clone()
        elif k.endswith(".gamma1"):
            out[prefix + k.replace(".gamma1", ".layer_scale_parameters")] = torch.stack([v, state[key[:-1] + "2"]])
        elif not k.endswith(".gamma2"):
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("arch,prefix", [("nat_mini", "nat."), ("dinat_base", "dinat.")])
def test_hf_transformers_layout_loads_through_the_converter(tmp_path, arch, prefix):
    kw = dict(TINY, embed_dim=24, num_heads=(1, 2, 4, 8), layer_scale=1e-5)
    source = zoo.create_model(arch, **kw)
    for p in source.parameters():  # distinct values everywhere, gammas included
        nn.init.normal_(p)
    hf = _to_hf(source.state_dict(), prefix)
    assert f"{prefix}encoder.levels.0.layers.0.attention.self.query.weight" in hf
    assert hf[f"{prefix}encoder.levels.2.layers.1.layer_scale_parameters"].shape == (2, 96)
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf, path)
    model = zoo.create_model(arch, **kw)
    weights.load_weights(model, path, arch=arch)  # finds convert_hf_nat among the arch's registered entries
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert weights.get_weights(f"{arch}.hf_in1k").converter is convert_hf_nat


def test_converter_accepts_the_real_transformers_dinat_state_dict(monkeypatch):
    """The key set of transformers' own DinatForImageClassification (built without natten) loads strictly."""
    modeling = pytest.importorskip("transformers.models.dinat.modeling_dinat")
    from transformers import DinatConfig

    monkeypatch.setattr(modeling, "requires_backends", lambda *args, **kwargs: None)  # construction needs no kernels
    kw = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=3, mlp_ratio=3.0)
    hf = modeling.DinatForImageClassification(DinatConfig(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
        dilations=[[2], [1], [1, 2], [1]], layer_scale_init_value=1e-5, num_labels=1000,
    ))
    model = zoo.create_model("dinat_base", **kw, dilations=[[2], [1], [1, 2], [1]], layer_scale=1e-5)
    state = convert_hf_nat(hf.state_dict(), model)
    model.load_state_dict(state, strict=True)
    torch.testing.assert_close(model.levels[2].blocks[1].attn.qkv.weight[128:256],  # stage 2: C = 128
                               hf.dinat.encoder.levels[2].layers[1].attention.self.key.weight)
    torch.testing.assert_close(model.levels[0].blocks[0].gamma2,
                               hf.dinat.encoder.levels[0].layers[0].layer_scale_parameters[1])


# ---------------------------------------------------------------- quirks

def test_nat_stem_has_no_activation_or_norm_between_its_convs():
    stem = zoo.create_model("nat_mini", **TINY).patch_embed
    assert [type(m) for m in stem.proj] == [nn.Conv2d, nn.Conv2d]
    x = torch.randn(1, 3, 16, 16)
    ref = stem.norm(stem.proj[1](stem.proj[0](x)).permute(0, 2, 3, 1))
    torch.testing.assert_close(stem(x), ref)


def test_downsamplers_have_no_bias():
    nat = zoo.create_model("nat_mini", **TINY)
    assert nat.levels[0].downsample.reduction.bias is None
    assert isinstance(nat.levels[0].downsample.reduction, nn.Conv2d)
    swin = zoo.create_model("dinat_s_tiny", **TINY_S)
    assert swin.layers[0].downsample.reduction.bias is None
    assert swin.layers[0].downsample.norm.normalized_shape == (4 * 32,)  # norm before the reduction


def test_patch_merging_phase_order():
    merge = zoo.create_model("dinat_s_tiny", **TINY_S).layers[0].downsample
    seen = []
    merge.norm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.arange(2 * 4 * 4 * 1, dtype=torch.float).reshape(2, 4, 4, 1).expand(2, 4, 4, 32)
    merge(x)
    cat = seen[0]
    for phase, (r, c) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        assert torch.equal(cat[..., phase * 32:(phase + 1) * 32], x[:, r::2, c::2])


@pytest.mark.parametrize("name", NAT_NAMES + DINAT_NAMES)
def test_layer_scale_only_where_the_official_variant_has_it(name):
    block = _meta(name).levels[0].blocks[0]
    expected = name in ("nat_small", "nat_base", "dinat_base")
    assert hasattr(block, "gamma1") == expected and hasattr(block, "gamma2") == expected
    if expected:
        assert block.layer_scale


def test_layer_scale_value():
    block = zoo.create_model("nat_small", **dict(TINY, layer_scale=1e-5)).levels[0].blocks[0]
    assert torch.all(block.gamma1 == 1e-5) and torch.all(block.gamma2 == 1e-5)


def _dilations(model):
    return [[b.attn.dilation for b in stage.blocks] for stage in model.stages]


@pytest.mark.parametrize("name,expected", [
    ("nat_tiny", [[1] * 3, [1] * 4, [1] * 18, [1] * 5]),
    ("dinat_mini", [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5]),
    ("dinat_tiny", [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]),
    ("dinat_large.in22k_ft_in1k_384", [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]),
    ("dinat_large.in22k_ft_in1k_384_11x11", [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]),
    ("dinat_s_tiny", [[1, 8], [1, 4], [1, 2] * 3, [1, 1]]),
    ("dinat_s_large.in22k_ft_in1k_384", [[1, 13], [1, 6], [1, 3] * 9, [1, 1]]),
])
def test_per_block_dilations(name, expected):
    assert _dilations(_meta(name)) == expected


def test_isotropic_dilation_alternates_and_heads():
    assert [b.attn.dilation for b in _meta("dinat_iso_small").layers] == [1, 2] * 6
    assert [b.attn.dilation for b in _meta("nat_iso_base").layers] == [1] * 12
    assert _meta("dinat_iso_base").layers[0].attn.num_heads == 24  # head_dim 32


def test_vit_rpb_is_global_attention_with_the_official_flipped_index():
    from zoo.backbones.nat import GlobalAttentionRPB

    attn = GlobalAttentionRPB(8, 2, kernel_size=5)
    x = torch.randn(2, 5, 5, 8)
    q, k, v = attn.qkv(x).reshape(2, 25, 3, 2, 4).permute(2, 0, 3, 1, 4)
    logits = (q * 4 ** -0.5) @ k.transpose(-1, -2)
    bias = attn.rpb.permute(1, 2, 0).flatten(0, 1)[attn.relative_position_index.view(-1)].view(25, 25, 2)
    out = (torch.softmax(logits + bias.permute(2, 0, 1), -1) @ v).transpose(1, 2).reshape(2, 5, 5, 8)
    torch.testing.assert_close(attn(x), attn.proj(out))
    with pytest.raises(ValueError, match="5x5 map"):
        attn(torch.randn(1, 6, 5, 8))
    state = _meta("vit_rpb_small").state_dict()
    assert state["layers.0.attn.rpb"].shape == (12, 27, 27)
    assert state["layers.0.attn.relative_position_index"].shape == (196, 196)


def test_variant_hyperparameters():
    large = _meta("dinat_s_large")
    assert [s.blocks[0].attn.num_heads for s in large.stages] == [6, 12, 24, 48]  # upstream fix 4a39ab6
    assert large.stages[0].blocks[0].mlp.fc1.out_features == 4 * 192
    assert _meta("nat_tiny").levels[0].blocks[0].mlp.fc1.out_features == 3 * 64
    assert _meta("dinat_large").levels[0].blocks[0].mlp.fc1.out_features == 2 * 192
    assert _meta("dinat_large.in22k_ft_in1k_384_11x11").levels[0].blocks[0].attn.rpb.shape == (6, 21, 21)


def test_attention_packs_qkv_as_3_heads_headdim_and_adds_rpb_after_scaling():
    attn = NeighborhoodAttention2D(8, 2, kernel_size=3, dilation=2)
    x = torch.randn(2, 7, 6, 8)
    qkv = attn.qkv(x).reshape(2, 7, 6, 3, 2, 4)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    ref = attn.proj(na2d(q, k, v, 3, dilation=2, rpb=attn.rpb, scale=4 ** -0.5).reshape(2, 7, 6, 8))
    torch.testing.assert_close(attn(x), ref)
    with torch.no_grad():  # a huge bias at offset (0, 0) (index k - 1): every query attends to itself
        attn.rpb.zero_()
        attn.rpb[:, 2, 2] = 1e4
    own = attn.proj(v.reshape(2, 7, 6, 8))
    torch.testing.assert_close(attn(x), own)


@pytest.mark.parametrize("kernel", [3, 5])
def test_attention_matches_the_official_legacy_pytorch_na(kernel):
    """Golden outputs of the NAT repo's own pure-PyTorch NA with RPB (`LegacyNeighborhoodAttention`,
    SHI-Labs/Neighborhood-Attention-Transformer@4c01844 classification/natten/nattentorch.py, unfold + pad),
    float64, odd map sizes 9x11 (k=3) and 8x7 (k=5): checks the RPB offset direction and the border shift."""
    from pathlib import Path

    from safetensors.torch import load_file

    data = load_file(str(Path(__file__).parent / "data" / "nat_legacy_na_reference.safetensors"))
    case = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(f"k{kernel}.")}
    attn = NeighborhoodAttention2D(8, 2, kernel_size=kernel).double()
    attn.load_state_dict({k: v for k, v in case.items() if k not in ("x", "y")})
    torch.testing.assert_close(attn(case["x"]), case["y"])


def test_head_is_norm_then_token_mean_then_linear():
    model = zoo.create_model("nat_mini", **TINY).eval()
    x = torch.randn(1, 3, 96, 96)
    feats = model.forward_features(x)
    assert feats.shape == (1, 3, 3, 256)
    torch.testing.assert_close(model(x), model.head(model.norm(_last_stage(model, x)).mean((1, 2))))


def _last_stage(model, x):
    x = model.patch_embed(x)
    for stage in model.stages:
        x = stage(x)
    return x


# ---------------------------------------------------------------- input sizes and legacy padding

def test_any_size_at_least_kernel_times_dilation_and_clear_error_below():
    model = zoo.create_model("nat_mini", **TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 136)).shape == (1, 1000)
        with pytest.raises(ValueError, match="legacy_pad=True"):
            model(torch.randn(1, 3, 64, 96))


def test_legacy_pad_pads_before_qkv_and_crops():
    attn = NeighborhoodAttention2D(8, 2, kernel_size=3, dilation=2, legacy_pad=True)
    x = torch.randn(1, 4, 9, 8)  # 4 < 3 * 2: pad rows to 6 (columns already >= 6)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 2))
    attn_plain = NeighborhoodAttention2D(8, 2, kernel_size=3, dilation=2)
    attn_plain.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x), attn_plain(padded)[:, :4])
    model = zoo.create_model("nat_mini", **TINY, legacy_pad=True).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 40))).all()


def test_dinat_s_accepts_sizes_not_multiple_of_32():
    model = zoo.create_model("dinat_s_tiny", **TINY_S).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 99, 101)).shape == (1, 1000)


# ---------------------------------------------------------------- features

@pytest.mark.parametrize("name,kw", [("nat_mini", TINY), ("dinat_s_tiny", TINY_S)])
def test_features_only_gives_four_nchw_stage_outputs(name, kw):
    model = zoo.create_model(name, features_only=True, **kw).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(1, 32 * 2 ** i, 24 // 2 ** i, 32 // 2 ** i) for i in range(4)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]


def test_stage_norms_of_the_dense_prediction_backbones():
    model = zoo.create_model("nat_mini", stage_norms=True, **TINY).eval()
    assert all(f"norm{i}.weight" in model.state_dict() for i in range(4))
    with torch.no_grad():
        for i in range(4):
            nn.init.normal_(getattr(model, f"norm{i}").bias)
        x = torch.randn(1, 3, 96, 96)
        feats = model.forward_intermediates(x, intermediates_only=True)
        stage0 = model.levels[0].forward_blocks(model.patch_embed(x))
    torch.testing.assert_close(feats[0], model.norm0(stage0).permute(0, 3, 1, 2))
    features = zoo.create_model("nat_mini", features_only=True, stage_norms=True, **TINY)
    assert any(n.endswith("norm3.weight") for n, _ in features.named_parameters())


def test_isotropic_features_and_forward():
    model = zoo.create_model("dinat_iso_small", features_only=True, out_indices=(0, 2), **TINY_ISO).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 112))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 6, 7)] * 2


# ---------------------------------------------------------------- pretrained cfgs

OFFICIAL_PRETRAINED = [n for n in zoo.list_pretrained(["*nat_*", "vit_rpb_*"]) if not n.endswith(".mnist")]  # not ours


@pytest.mark.parametrize("name", OFFICIAL_PRETRAINED)
def test_pretrained_cfg_has_official_eval_transform_and_top1(name):
    cfg, extras = get_pretrained_cfg(name), weights.cfg_extras(name)
    assert cfg.interpolation == "bicubic"
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    assert cfg.crop_pct == (1.0 if cfg.input_size[-1] == 384 else 0.875)
    assert 80 <= extras["top1"] < 88
    assert (cfg.url or "").startswith("https://shi-labs.com/") or (cfg.hf_hub_id or "").startswith("shi-labs/")


def test_every_variant_is_registered_with_weights():
    pretrained = zoo.list_pretrained(["*nat*", "vit_rpb_*"])
    for name in ALL:
        assert any(p.startswith(name + ".") for p in pretrained), name
    for tag in ("dinat_large.in22k_ft_in1k_384", "dinat_large.in22k_ft_in1k_384_11x11",
                "dinat_s_large.in22k_ft_in1k_384"):
        assert tag in pretrained


# ---------------------------------------------------------------- training behaviour

@pytest.mark.parametrize("name,kw,size", [("dinat_base", dict(TINY, layer_scale=1e-5), 96),
                                          ("dinat_s_tiny", TINY_S, 96), ("dinat_iso_small", TINY_ISO, 96),
                                          ("vit_rpb_small", dict(embed_dim=64, depth=2, num_heads=2, img_size=96), 96)])
def test_forward_backward_and_bf16(name, kw, size):
    model = zoo.create_model(name, **kw)
    x = torch.randn(2, 3, size, size)
    model(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x)).all()


def test_bf16_autocast_training_step_is_close_to_float32():
    """Under CPU bf16 autocast (Lightning's bf16-mixed) the float32 `rpb` meets bf16 q/k: forward and backward
    run, are finite, and the logits and gradients stay close to float32 (the parameters are never cast)."""
    torch.manual_seed(0)
    model = zoo.create_model("nat_mini", num_classes=10, **dict(TINY, drop_path_rate=0.0))
    x = torch.randn(2, 3, 96, 96)
    ref = model(x)
    ref.logsumexp(-1).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().logsumexp(-1).mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.02)
    diff = total = 0.0
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        err, norm = (p.grad - ref_grads[name]).norm(), ref_grads[name].norm()
        assert err <= 0.15 * norm, f"{name}: bf16 gradient off by {err / norm:.1%}"  # measured <= 5%
        diff, total = diff + err ** 2, total + norm ** 2
    assert diff ** 0.5 <= 0.03 * total ** 0.5  # measured 0.75%


def test_grad_checkpointing_takes_effect():
    """Same output and gradients (drop path included), fewer tensors saved for backward."""
    model = zoo.create_model("nat_mini", **dict(TINY, drop_path_rate=0.1)).train()
    assert_checkpointing_takes_effect(model, torch.randn(1, 3, 96, 96))


def test_torch_compile_fullgraph():
    """torch.compile traces the whole model without graph breaks (NA's indexing is static)."""
    model = zoo.create_model("nat_mini", **dict(TINY, depths=(1, 1, 1, 1), dilations=None)).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), model(x))


def test_model_table_reads_paper_numbers_from_the_cfgs():

    table = load_script("model_table")
    assert table.rows_for(["dinat_large"]) == [
        "dinat_large.in22k_ft_in1k", "dinat_large.in22k_ft_in1k_384", "dinat_large.in22k_ft_in1k_384_11x11"]
    rows = [r for r in table.rows_for(["nat_*", "dinat_*", "vit_rpb_*"]) if not r.startswith("nat_mnist")]  # ours
    assert len(rows) == len(ALL) + 3  # HF mirrors carry no paper numbers
    row = dict(name="x.y", params=20.1e6, input_size=(3, 224, 224), paper_params=20e6, paper_flops=2.7e9,
               flops=2.727e9, top1=81.8, paper="p", units_scaled=False)
    assert "| `x.y` | 224 | 20.10 | 20 | +0.5% | 2.73 | 2.7 | +1.0% | 81.8 |" in table.markdown([row])
