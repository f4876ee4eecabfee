"""MAViT / RAVLT: official layout, params, FLOPs, attention semantics, resolutions, API."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from zoo.backbones.rmt_linear import RMTAttention, RMTLinear, RoPE2d

import zoo
from zoo import weights

DATA = os.path.join(os.path.dirname(__file__), "data", "rmt_official_keys.json")
VARIANTS = [f"{f}_{s}" for f in ("mavit", "ravlt") for s in ("tiny", "small", "base", "large")]
# counted on the official model definitions (qhfan/MALA@7114e63, qhfan/RALA@a86314f) with fvcore at 224
OFFICIAL = {
    "mavit_tiny": (16_449_128, 2_652_419_584), "mavit_small": (27_142_568, 4_924_921_984),
    "mavit_base": (49_792_648, 10_640_790_016), "mavit_large": (97_766_088, 17_303_276_160),
    "ravlt_tiny": (14_897_768, 2_626_157_056), "ravlt_small": (25_591_208, 4_899_161_216),
    "ravlt_base": (48_241_288, 10_616_032_768), "ravlt_large": (95_242_440, 17_255_603_328),
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return {name: zoo.create_model(name).eval() for name in ("mavit_tiny", "ravlt_tiny")}


@pytest.mark.parametrize("name", VARIANTS)
def test_params_equal_official_and_cfg_fields(name):
    with torch.device("meta"):
        model = zoo.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL[name][0]
    cfg = model.pretrained_cfg
    for field in ("top1", "paper_params", "paper_flops"):
        assert cfg[field] > 0
    # the published params round the official count; the published FLOPs are below fvcore's (see module doc)
    assert abs(cfg["paper_params"] - OFFICIAL[name][0]) / OFFICIAL[name][0] < 0.05
    assert cfg["official_flops"] == OFFICIAL[name][1]


@pytest.mark.parametrize("name", ["mavit_tiny", "ravlt_tiny"])
def test_flops_match_official_fvcore(name, tiny):
    assert abs(zoo.flops(tiny[name]) - OFFICIAL[name][1]) / OFFICIAL[name][1] < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", [v for v in VARIANTS if not v.endswith("tiny")])
def test_flops_match_official_fvcore_larger(name):
    flops = zoo.flops(zoo.create_model(name))
    assert abs(flops - OFFICIAL[name][1]) / OFFICIAL[name][1] < 0.02


def _official_state(arch: str) -> dict[str, torch.Tensor]:
    keys = json.load(open(DATA))[arch]
    g = torch.Generator().manual_seed(1)
    state = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = 0.05 * torch.randn(shape, generator=g)
    return state


def test_official_checkpoint_loads_strict(tmp_path):
    state = _official_state("MALA_T")
    path = tmp_path / "MAViT_T.pth"
    torch.save({"model": state, "epoch": 3}, path)
    model = zoo.create_model("mavit_tiny")
    weights.load_weights(model, path)
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(own[k], v.to(own[k].dtype))


def test_registered_weights_load_through_registry(tmp_path, monkeypatch):
    state = _official_state("RAVLT_T")
    path = tmp_path / "RAVLT_T.pth"
    torch.save({"model": state}, path)
    entry = weights.get_weights("ravlt_tiny.in1k")
    assert (entry.hf_hub_id, entry.hf_filename) == ("aldjalkdf/RAVLT", "RAVLT_T.pth")
    monkeypatch.setitem(weights._WEIGHTS, "ravlt_tiny.in1k", dataclasses.replace(entry, hf_hub_id=None, file=str(path)))
    model = zoo.create_model("ravlt_tiny", pretrained=True)
    torch.testing.assert_close(model.layers[1].blocks[0].attn.qkvo.weight, state["layers.1.blocks.0.attn.qkvo.weight"])
    torch.testing.assert_close(model.layers[0].RoPE.angle, state["layers.0.RoPE.angle"])
    wrong = dict(state)
    wrong["layers.0.blocks.0.attn.qkvo.weight"] = torch.zeros(3, 64, 1, 1)
    torch.save({"model": wrong}, path)
    with pytest.raises(weights.WeightsError, match="qkvo"):
        zoo.create_model("ravlt_tiny", pretrained=True)


def test_hub_sources_registered():
    for name in VARIANTS:
        tags = zoo.list_pretrained(name)
        if name == "mavit_tiny":
            assert tags == []  # no MAViT-T classification file was found on the hub
            continue
        source = weights.get_weights(f"{name}.in1k")
        repo = "aldjalkdf/MAViT" if name.startswith("mavit") else "aldjalkdf/RAVLT"
        assert source.hf_hub_id == repo and source.hf_filename.endswith(".pth")


def _rope_table(h: int, w: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element: channel 2p/2p+1 of token (i, j) turns by i*f_p (p < D/4) or j*f_(p-D/4)."""
    quarter = head_dim // 4
    freqs = [1.0 / 10000 ** (p / (quarter - 1)) if quarter > 1 else 1.0 for p in range(quarter)]
    theta = torch.zeros(h * w, head_dim, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for p in range(head_dim // 2):
                angle = i * freqs[p] if p < quarter else j * freqs[p - quarter]
                theta[i * w + j, 2 * p] = theta[i * w + j, 2 * p + 1] = angle
    return theta.sin(), theta.cos()


def test_rope_table():
    sin, cos = RoPE2d(16)(5, 7)
    ref_sin, ref_cos = _rope_table(5, 7, 16)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-5, rtol=0)
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-5, rtol=0)


def _reference_attention(attn: RMTAttention, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The official order of operations, written out in float64 with a dense score matrix."""
    attn = attn.double()
    x = x.double()
    b, c, h, w = x.shape
    heads, d, n = attn.num_heads, c // attn.num_heads, h * w
    qkvo = attn.qkvo(x)
    o, v_map = qkvo[:, 3 * c:], qkvo[:, 2 * c:3 * c]
    q, k, v = qkvo[:, :3 * c].reshape(b, 3, heads, d, n).permute(1, 0, 2, 4, 3)
    sin, cos = _rope_table(h, w, d)

    def rope(t):
        pairs = torch.stack([-t[..., 1::2], t[..., ::2]], -1).flatten(-2)
        return t * cos + pairs * sin

    s = d**-0.5
    if kind == "softmax":
        scores = s * rope(q) @ rope(k).transpose(-1, -2)
    else:
        q, k = F.elu(q) + 1, F.elu(k) + 1
        if kind == "mala":
            z = s * (q @ k.transpose(-1, -2)).mean(-1, keepdim=True)  # before RoPE
            scores = (1 + 1 / (z + 1e-6)) * (s / n) * (rope(q) @ rope(k).transpose(-1, -2)) - z / n
        else:
            e = torch.softmax(s * q.mean(2, keepdim=True) @ k.transpose(-1, -2), -1)  # key weights [b, h, 1, n]
            k_w = k * e.transpose(-1, -2) * n
            z = 1 / (q @ k_w.mean(2, keepdim=True).transpose(-1, -2) + 1e-6)
            scores = (rope(q) @ rope(k_w).transpose(-1, -2)) / n * z
    if kind == "softmax":
        scores = scores.softmax(-1)
    y = (scores @ v).transpose(-1, -2).reshape(b, c, h, w)
    return attn.proj((y + attn.lepe(v_map)) * o)


@pytest.mark.parametrize("kind", ["mala", "rala", "softmax"])
def test_attention_matches_official_order(kind):
    torch.manual_seed(0)
    attn = RMTAttention(24, 2, kind)
    for p in attn.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 24, 5, 7)
    out = attn(x, *RoPE2d(12).tables(5, 7))
    torch.testing.assert_close(out.double(), _reference_attention(attn, x, kind), rtol=1e-4, atol=1e-5)


def test_features_only_and_intermediates(tiny):
    feats = zoo.create_model("mavit_tiny", features_only=True).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        outs = feats(x)
        final, inter = tiny["mavit_tiny"].forward_intermediates(x)
        ref = tiny["mavit_tiny"].forward_features(x)
    assert [tuple(o.shape) for o in outs] == [(1, 64, 24, 40), (1, 128, 12, 20), (1, 256, 6, 10), (1, 512, 3, 5)]
    assert feats.feature_info.channels() == [64, 128, 256, 512] and feats.feature_info.reduction() == [4, 8, 16, 32]
    torch.testing.assert_close(final, ref)
    assert len(inter) == 4 and inter[-1].shape == ref.shape


@pytest.mark.parametrize("size", [(288, 288), (160, 224)])
def test_other_resolutions(size, tiny):
    with torch.no_grad():
        out = tiny["ravlt_tiny"](torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mavit_tiny", "ravlt_tiny"])
def test_bf16_autocast_512(name, tiny):
    model = tiny[name]
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_autocast_512_cuda(dtype):
    model = zoo.create_model("mavit_small").cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        out = model(torch.randn(2, 3, 512, 512, device="cuda"))
    assert torch.isfinite(out).all()


def test_train_step_and_grad_checkpointing():
    torch.manual_seed(0)
    model = zoo.create_model("ravlt_tiny", num_classes=5, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    model(x).logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == sum(1 for _ in model.parameters()) and all(torch.isfinite(g).all() for g in grads.values())
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_timm_api(tiny):
    model = timm.create_model("ravlt_tiny", num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 1024) and model.head_hidden_size == 1024 and model.num_features == 512
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier().out_channels == 7
    assert tiny["mavit_tiny"].forward_head(tiny["mavit_tiny"].forward_features(x), pre_logits=True).shape == (2, 2048)
    groups = tiny["ravlt_tiny"].group_matcher()
    assert groups["stem"] == r"^patch_embed"
    assert model.pretrained_cfg["first_conv"] == "patch_embed.proj.0"


def test_bad_config():
    with pytest.raises(ValueError, match="attn_kinds needs one entry per stage"):
        RMTLinear(attn_kinds=("mala", "softmax"))
    with pytest.raises(ValueError, match=r"attn_kinds\[1\]"):
        RMTLinear(attn_kinds=("mala", "linear", "softmax", "softmax"))
    with pytest.raises(ValueError, match=r"attn_kinds\[0\]"):
        RMTLinear(attn_kinds=(("mala",), "mala", "softmax", "softmax"))  # stage 0 has 2 blocks
    with pytest.raises(ValueError, match="multiple of 4"):
        RMTLinear(embed_dims=(60, 128, 256, 512), num_heads=(2, 2, 4, 8))
    with pytest.raises(ValueError, match="global_pool"):
        RMTLinear(depths=(1, 1, 1, 1)).reset_classifier(3, global_pool="max")


def test_per_block_kinds():
    model = RMTLinear(attn_kinds=(("mala", "rala"), "softmax", "rala", "mala"), depths=(2, 1, 1, 1))
    kinds = [[b.attn.kind for b in stage.blocks] for stage in model.layers]
    assert kinds == [["mala", "rala"], ["softmax"], ["rala"], ["mala"]]
    assert math.isfinite(model(torch.randn(1, 3, 64, 64)).sum().item())
