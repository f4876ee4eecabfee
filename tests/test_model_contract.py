"""timm's model API contract, for every registered classifier: the tests come from the registry.

A new classifier is covered with no new test code (timm's tests/test_models.py does the same).
- Cheap checks run for every variant on the meta device (no memory, no compute): the
  pretrained cfg, the state-dict names it points at, the registered weight sources, the name
  space, and the parameter count against the paper.
- Full checks run for the smallest variant of each model class (one per macro-architecture),
  at its default input size, batch 1: forward_features / forward_head / reset_classifier /
  feature_info / features_only / forward_intermediates / gradient checkpointing /
  no_weight_decay / group_matcher / timm's data config and factory.
Known gaps of models still being worked on are `xfail(strict=True)` with the reason, so the
test documents them and fails once they are fixed (then drop the mark).
"""
from __future__ import annotations

import copy
import fnmatch
import functools

import pytest
import timm
import torch
from grad_checkpointing import assert_checkpointing_takes_effect
from torch import nn

import zoo
from zoo import weights
from zoo._registry import get_entry, timm_own_names

# the zoo's own classifiers (other test modules register toys named zootest_* in the same process)
CLASSIFIERS = [n for n in zoo.list_models(kind="classifier") if not n.startswith("zootest_")]
_CFG_FIELDS = ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "license",
               "num_classes")

# Known contract gaps in files whose authors were still at work: (check, model) -> reason.
# Each is a strict xfail: when the model is fixed the test XPASSes (fails) and the entry must go.
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _param(check: str, names: list[str]) -> list:
    out = []
    for n in names:
        reason = KNOWN_GAPS.get((check, n)) or KNOWN_GAPS.get((check, _family(n)))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(n, marks=marks, id=n))
    return out


@functools.cache
def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return zoo.create_model(name)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _family(name: str) -> str:
    """A macro-architecture: the module and class the variant (`arch` or `arch.tag`) is built from."""
    model = _meta(name.partition(".")[0])
    return f"{type(model).__module__.rsplit('.', 1)[-1]}.{type(model).__name__}"


def _smallest_per_family() -> list[str]:
    best: dict[str, str] = {}
    for name in CLASSIFIERS:
        if not get_entry(name).fn.__module__.startswith("zoo.backbones."):
            continue  # the shipped MNIST models (zoo.pretrained) reuse these classes
        fam = _family(name)
        if fam not in best or _count(_meta(name)) < _count(_meta(best[fam])):
            best[fam] = name
    return sorted(best.values())


SMALLEST = _smallest_per_family()


# ---------------------------------------------------------------- cheap checks, every variant


def _tagged(arch: str) -> list[str]:
    return [f"{arch}.{t}" for t in get_entry(arch).tags] or [arch]


@pytest.mark.parametrize("name", _param("cfg", [n for arch in CLASSIFIERS for n in _tagged(arch)]))
def test_pretrained_cfg(name):
    """Each `arch.tag` cfg (what `create_model('arch.tag')` gets) is complete and names real modules."""
    from timm.models import get_pretrained_cfg

    arch = name.partition(".")[0]
    cfg = get_pretrained_cfg(name).to_dict()
    # the model the tag builds: tags with `model_args` (e.g. other dilations at 384) change the architecture
    model = _meta(name if "model_args" in weights.cfg_extras(name) else arch)
    missing = [k for k in _CFG_FIELDS if cfg.get(k) in (None, "", ())]
    assert not missing, f"{name}: pretrained_cfg lacks {missing}"
    channels = cfg["input_size"][0]
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == len(cfg["std"]) == channels, cfg
    assert 0 < cfg["crop_pct"] <= 1 and cfg["interpolation"] in ("bicubic", "bilinear", "nearest")
    assert cfg["num_classes"] == model.num_classes
    state = model.state_dict()
    for key in ("first_conv", "classifier"):
        modules = cfg[key] if isinstance(cfg[key], (tuple, list)) else (cfg[key],)
        for module in modules:
            assert f"{module}.weight" in state, f"{name}: cfg {key}={module!r} but the state dict has no {module}.weight"
    stem = state[f"{cfg['first_conv']}.weight"]
    assert stem.shape[1] == channels, f"{name}: first_conv takes {stem.shape[1]} channels, input_size says {channels}"


@pytest.mark.parametrize("name", _param("weights", CLASSIFIERS))
def test_registered_weights_have_sources_and_licences(name):
    for w in weights.weights_for_arch(name):
        real = (w.url or "").startswith("https://") or bool(w.hf_hub_id and w.hf_filename) or bool(w.package_file)
        assert real, f"{w.name}: source {w.describe()!r} is neither an https URL, an HF hub id + file nor a shipped file"
        assert w.license, f"{w.name}: no licence"
        assert get_entry(name).tags, f"{name} has weights but no pretrained tags"


def test_names_do_not_collide_with_timm():
    clashes = sorted(set(CLASSIFIERS) & timm_own_names())
    assert not clashes, clashes
    assert set(CLASSIFIERS) <= set(timm.list_models()), "every classifier is registered in timm"


def _published_tolerance(value: float) -> float:
    """Half a unit of the last digit the paper printed (28M -> 0.5M, 12.15M -> 0.005M), at least 0.5%."""
    millions = f"{value / 1e6:.4f}".rstrip("0").rstrip(".")
    decimals = len(millions.partition(".")[2])
    return max(0.005 * value, 0.5 * 10 ** -decimals * 1e6)


def _as_count(value: float) -> float:
    # some families give paper_params in millions (test_paper_numbers_are_absolute flags them); compare anyway
    return value * 1e6 if value < 1e4 else value


def _paper_names() -> list[str]:
    names = []
    for arch in CLASSIFIERS:
        for tag in get_entry(arch).tags:
            if weights.cfg_extras(f"{arch}.{tag}").get("paper_params") is not None:
                names.append(f"{arch}.{tag}")
    return names


PAPER_NAMES = _paper_names()


@pytest.mark.parametrize("name", _param("paper_units", PAPER_NAMES))
def test_paper_numbers_are_absolute(name):
    """paper_params / paper_flops are counts (28e6, 4.5e9), as scripts/model_table.py reads them."""
    extras = weights.cfg_extras(name)
    assert extras["paper_params"] > 1e5, f"{name}: paper_params={extras['paper_params']} looks like millions"
    if "paper_flops" in extras:
        assert extras["paper_flops"] > 1e7, f"{name}: paper_flops={extras['paper_flops']} looks like GFLOPs"


@pytest.mark.parametrize("name", _param("paper_params", PAPER_NAMES))
def test_params_match_paper(name):
    """Within 0.5% of the published count, or within its printed precision (papers round to 0.1M or 1M).

    Where the cfg records `official_params` (the official code's exact count, for variants whose
    published figure does not match the released architecture, e.g. InLine-CSwin's README), ours
    must equal it exactly instead; docs/model_table.md still shows the deviation from the paper.
    """
    arch = name.partition(".")[0]
    extras = weights.cfg_extras(name)
    ours = _count(_meta(name if "model_args" in extras else arch))
    paper = _as_count(extras["paper_params"])
    tolerance = _published_tolerance(paper)
    if "official_params" in extras:
        assert ours == extras["official_params"], f"{name}: {ours} params, the official code has {extras['official_params']}"
        return
    assert abs(ours - paper) <= tolerance, (
        f"{name}: {ours / 1e6:.2f}M params vs paper {paper / 1e6:g}M ({100 * (ours / paper - 1):+.2f}%)")
    assert arch in CLASSIFIERS


@pytest.mark.parametrize("name", _param("paper_numbers", [n for n in CLASSIFIERS if not n.endswith("_mnist")]))
def test_variant_states_paper_numbers(name):
    """Every ImageNet variant has a tag with the paper's params, or the official code's where the paper
    publishes none (FLatten-Swin-B at 384); the MNIST models are ours: none."""
    tags = get_entry(name).tags
    stated = [weights.cfg_extras(f"{name}.{t}") for t in tags]
    assert any(e.get("paper_params") is not None or e.get("official_params") is not None for e in stated), name


def _generator_paper_names() -> list[str]:
    names = []
    for arch in zoo.list_models(kind="generator"):
        for tag in get_entry(arch).tags:
            name = f"{arch}.{tag}" if tag else arch
            if weights.cfg_extras(name).get("paper_params") is not None:
                names.append(name)
    return names


@pytest.mark.parametrize("name", _param("generator_paper", _generator_paper_names()))
def test_generator_paper_numbers(name):
    """Generators' paper numbers are counts too, and their trainable params match within the printed precision
    (frozen Parameters such as DiT's fixed sin-cos pos_embed are not in the papers' counts)."""
    extras = weights.cfg_extras(name)
    assert extras["paper_params"] > 1e5 and extras.get("paper_flops", 1e9) > 1e7, extras
    trainable = sum(p.numel() for p in _meta(name).parameters() if p.requires_grad)
    paper = extras["paper_params"]
    assert abs(trainable - paper) <= _published_tolerance(paper), (
        f"{name}: {trainable / 1e6:.2f}M trainable params vs paper {paper / 1e6:g}M")


# ---------------------------------------------------------------- full checks, smallest per family


@functools.cache
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.create_model(name).eval()


@functools.cache
def _input(name: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, *_model(name).pretrained_cfg["input_size"])


@functools.cache
def _features(name: str) -> torch.Tensor:
    with torch.no_grad():
        return _model(name).forward_features(_input(name))


def _channels(x: torch.Tensor, model: nn.Module) -> int:
    if x.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        return x.shape[-1]
    return x.shape[1] if x.ndim == 4 else x.shape[-1]


@pytest.mark.parametrize("name", _param("forward_features", SMALLEST))
def test_forward_features(name):
    model, x = _model(name), _features(name)
    assert x.shape[0] == 1 and x.ndim in (3, 4), x.shape
    assert _channels(x, model) == model.num_features, f"{name}: features {tuple(x.shape)}, num_features {model.num_features}"
    pool = model.pretrained_cfg.get("pool_size")
    if x.ndim == 4 and pool:
        spatial = tuple(x.shape[1:3] if getattr(model, "output_fmt", "NCHW") == "NHWC" else x.shape[2:])
        assert spatial == tuple(pool), f"{name}: feature map {spatial}, cfg pool_size {pool}"
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", _param("forward_head", SMALLEST))
def test_forward_head(name):
    model, feats = _model(name), _features(name)
    with torch.no_grad():
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        full = model(_input(name))
    assert pre.shape == (1, model.head_hidden_size), f"{name}: pre_logits {tuple(pre.shape)}, head_hidden_size {model.head_hidden_size}"
    assert logits.shape == (1, model.num_classes)
    torch.testing.assert_close(full, logits, msg=f"{name}: forward != forward_head(forward_features)")


@pytest.mark.parametrize("name", _param("reset_classifier", SMALLEST))
def test_reset_classifier(name):
    model = copy.deepcopy(_model(name))
    x = _input(name)
    assert isinstance(model.get_classifier(), nn.Module)
    model.reset_classifier(0)
    assert model.num_classes == 0
    with torch.no_grad():
        pooled = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (1, model.head_hidden_size), f"{name}: reset_classifier(0) gives {tuple(pooled.shape)}"
    torch.testing.assert_close(pooled, pre)
    assert not any(p.numel() for p in model.get_classifier().parameters()), "classifier kept parameters after reset(0)"
    model.reset_classifier(5)
    assert model.num_classes == 5
    with torch.no_grad():
        assert model(x).shape == (1, 5)
    head = model.get_classifier()
    assert getattr(head, "out_features", getattr(head, "out_channels", 5)) == 5


@pytest.mark.parametrize("name", _param("unpooled", SMALLEST))
def test_reset_classifier_unpooled(name):
    """`reset_classifier(0, '')` makes forward return the unpooled map, of the cfg's pool_size."""
    model = copy.deepcopy(_model(name))
    model.reset_classifier(0, "")
    with torch.no_grad():
        out = model(_input(name))
    assert out.ndim in (3, 4), f"{name}: reset_classifier(0, '') still pools: {tuple(out.shape)}"
    pool = model.pretrained_cfg.get("pool_size")
    if out.ndim == 4 and pool:
        spatial = tuple(out.shape[1:3] if getattr(model, "output_fmt", "NCHW") == "NHWC" else out.shape[2:])
        assert spatial == tuple(pool), f"{name}: unpooled {tuple(out.shape)}, cfg pool_size {pool}"


@pytest.mark.parametrize("name", _param("feature_info", SMALLEST))
def test_features_only_matches_feature_info(name):
    model = _model(name)
    info = model.feature_info
    assert info and all({"num_chs", "reduction", "module"} <= set(i) for i in info), info
    assert info[-1]["num_chs"] == model.num_features, f"{name}: last feature_info {info[-1]}, num_features {model.num_features}"
    torch.manual_seed(0)
    feat = zoo.create_model(name, features_only=True).eval()
    x = _input(name)
    with torch.no_grad():
        outs = feat(x)
    picked = [info[i] for i in feat.feature_info.out_indices]
    assert len(outs) == len(picked) > 0
    assert feat.feature_info.channels() == [i["num_chs"] for i in picked]
    assert feat.feature_info.reduction() == [i["reduction"] for i in picked]
    for o, i in zip(outs, picked):
        assert o.ndim == 4 and o.shape[1] == i["num_chs"], f"{name}: {tuple(o.shape)} vs {i}"
        assert x.shape[-1] / o.shape[-1] == i["reduction"], f"{name}: width {o.shape[-1]} of {x.shape[-1]} vs {i}"


@pytest.mark.parametrize("name", _param("forward_intermediates", SMALLEST))
def test_forward_intermediates(name):
    model, x = _model(name), _input(name)
    if not hasattr(model, "forward_intermediates"):
        pytest.fail(f"{name} has no forward_intermediates")
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        only = model.forward_intermediates(x, intermediates_only=True)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(final, _features(name), msg=f"{name}: final != forward_features")
    assert len(inter) == len(model.feature_info)
    for o, i in zip(inter, model.feature_info):
        assert o.shape[1] == i["num_chs"] and x.shape[-1] / o.shape[-1] == i["reduction"], (tuple(o.shape), i)
    assert len(only) == len(inter) and len(last) == 1
    torch.testing.assert_close(last[0], inter[-1])
    assert len(first) == 1
    torch.testing.assert_close(first[0], inter[0], msg=f"{name}: stop_early changed the first intermediate")
    with torch.no_grad():
        _, early = model.forward_intermediates(x, indices=[0], stop_early=True)  # the final output of a stopped run
    torch.testing.assert_close(early[0], inter[0])


@pytest.mark.parametrize("name", _param("prune_intermediate_layers", SMALLEST))
def test_prune_intermediate_layers_keeps_what_the_indices_need(name):
    """timm's contract: it returns the indices asked for, and the pruned model still gives those outputs."""
    model, x = _model(name), _input(name)
    with torch.no_grad():
        wanted = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([1]) == [1]
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=[1], intermediates_only=True)[0], wanted[0])


@pytest.mark.parametrize("name", _param("grad_checkpointing", SMALLEST))
def test_grad_checkpointing(name):
    """Same outputs and gradients, and fewer tensors kept for backward (the flag takes effect)."""
    model = copy.deepcopy(_model(name)).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # batch 1 (a BatchNorm1d on pooled features cannot train on it); the rest trains
    assert_checkpointing_takes_effect(model, _input(name))


@pytest.mark.parametrize("name", _param("no_weight_decay", SMALLEST))
def test_no_weight_decay_names_exist(name):
    model = _model(name)
    names = [n for n, _ in model.named_parameters()]
    patterns = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    assert isinstance(patterns, (set, frozenset, list, tuple))
    dead = [p for p in patterns if not any(fnmatch.fnmatch(n, p) for n in names)]
    assert not dead, f"{name}: no_weight_decay names matching no parameter (timm fnmatches full names): {dead}"


@pytest.mark.parametrize("name", _param("group_matcher", SMALLEST))
def test_group_matcher_covers_every_parameter(name):
    from timm.models import group_parameters

    model = _model(name)
    names = {n for n, _ in model.named_parameters()}
    for coarse in (False, True):
        matcher = model.group_matcher(coarse=coarse)
        assert isinstance(matcher, dict) and "stem" in matcher, matcher
        groups = group_parameters(model, matcher)
        grouped = {n for g in groups.values() for n in g}
        assert grouped == names
        assert len(groups) > 2, f"{name}: group_matcher(coarse={coarse}) gave only {len(groups)} groups"


@pytest.mark.parametrize("name", _param("timm", SMALLEST))
def test_timm_data_config_and_factory(name):
    model = _model(name)
    data = timm.data.resolve_model_data_config(model)
    cfg = model.pretrained_cfg
    assert data["input_size"] == tuple(cfg["input_size"]) and data["crop_pct"] == cfg["crop_pct"]
    assert tuple(data["mean"]) == tuple(cfg["mean"]) and data["interpolation"] == cfg["interpolation"]
    three = timm.create_model(name, num_classes=3).eval()
    assert three.num_classes == 3
    with torch.no_grad():
        assert three(_input(name)).shape == (1, 3)


def test_smallest_covers_every_backbone_file():
    import pathlib

    import zoo.backbones as pkg

    files = {p.stem for p in pathlib.Path(pkg.__file__).parent.glob("*.py") if not p.stem.startswith("_")}
    covered = {type(_meta(n)).__module__.rsplit(".", 1)[-1] for n in SMALLEST}
    assert covered == files, files - covered
