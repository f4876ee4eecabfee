"""The weight registry: sources, sha256, conversion, and every bad-input case."""
import argparse
import json

import pytest
import torch
import toy_models  # noqa: F401
from safetensors.torch import save_file

import zoo
from zoo import weights
from zoo.weights import WeightsError


def _model(**kw):
    return zoo.create_model("zootest_toynet", **kw)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load"


def _register(name, **cfg):
    weights._WEIGHTS.pop(name, None)
    weights.generate_default_cfgs({name: dict(num_classes=1000, classifier="head", **cfg)})
    return weights.get_weights(name)


def test_local_source_with_sha256_loads_strictly(tmp_path):
    source = _model()
    path = tmp_path / "toy.pth"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(lr=1.0)}, path)
    _register("zootest_toynet.local_a", file=str(path), sha256=weights.sha256_of(path))
    target = _model()
    weights.load_weights(target, "zootest_toynet.local_a")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)


def test_sha256_mismatch_names_file_and_leaves_model_untouched(tmp_path):
    path = tmp_path / "toy.pth"
    torch.save(_model().state_dict(), path)
    _register("zootest_toynet.local_b", file=str(path), sha256="0" * 64)
    target = _model()
    before = _snapshot(target)
    with pytest.raises(WeightsError, match=r"toy\.pth: sha256 mismatch"):
        weights.load_weights(target, "zootest_toynet.local_b")
    _assert_untouched(target, before)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"toy{suffix}"
    state = _model().state_dict()
    torch.save(state, path) if suffix == ".pth" else save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    target = _model()
    before = _snapshot(target)
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        weights.load_weights(target, path)
    _assert_untouched(target, before)


def test_missing_unexpected_and_shape_mismatch_are_listed(tmp_path):
    state = _model().state_dict()
    state.pop("stem.bias")
    state["extra.weight"] = torch.zeros(1)
    state["head.weight"] = torch.zeros(5, 16)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    target = _model()
    before = _snapshot(target)
    with pytest.raises(WeightsError) as err:
        weights.load_weights(target, path)
    text = str(err.value)
    assert "missing keys: stem.bias" in text
    assert "unexpected keys: extra.weight" in text
    assert "head.weight: checkpoint (5, 16) vs model (1000, 16)" in text
    _assert_untouched(target, before)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="no state dict of tensors"):
        weights.load_weights(_model(), path)


def test_offline_url_source_says_where_to_place_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    entry = _register("zootest_toynet.remote", url="https://example.org/weights/toy_remote.pth")
    with pytest.raises(WeightsError) as err:
        weights.load_weights(_model(), "zootest_toynet.remote")
    expected = tmp_path / "cache" / "zootest_toynet.remote" / "toy_remote.pth"
    assert weights.cache_path("zootest_toynet.remote") == expected
    assert str(expected) in str(err.value) and entry.url in str(err.value)
    source = _model()
    expected.parent.mkdir(parents=True, exist_ok=True)
    torch.save(source.state_dict(), expected)  # the user places the file as told
    target = _model()
    weights.load_weights(target, "zootest_toynet.remote")
    assert torch.equal(target.stem.weight, source.stem.weight)


def test_pretrained_true_resolves_tag_and_drops_head_for_other_num_classes(tmp_path):
    source = _model()
    path = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    _register("zootest_toynet.untrained", file=str(path))  # a tag timm knows from default_cfgs
    try:
        target = zoo.create_model("zootest_toynet.untrained", pretrained=True, num_classes=7)
    finally:
        weights._WEIGHTS.pop("zootest_toynet.untrained")
    assert torch.equal(target.stem.weight, source.stem.weight)
    assert target.head.weight.shape == (7, 16)


def test_converter_maps_an_official_layout(tmp_path):
    source = _model()
    official = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "official.pth"
    torch.save(official, path)

    def strip_backbone(state, model):
        return {k.removeprefix("backbone."): v for k, v in state.items()}

    target = _model()
    weights.load_weights(target, path, converter=strip_backbone)
    assert torch.equal(target.stem.weight, source.stem.weight)


def test_lightning_checkpoint_prefix_is_stripped(tmp_path):
    source = _model()
    path = tmp_path / "last.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.6", "global_step": 3,
                "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    target = zoo.create_model("zootest_toynet", checkpoint_path=path)
    assert torch.equal(target.stage.weight, source.stage.weight)


def test_export_round_trip_is_bit_exact(tmp_path):
    source = _model(num_classes=12)
    source.zoo_model_args["attention_kwargs"] = {"topk": 2, "sizes": [1, 2]}  # nested args survive the JSON
    path = weights.export(source, tmp_path / "toy")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["architecture"] == "zootest_toynet" and meta["model_args"]["num_classes"] == 12
    assert meta["model_args"]["attention_kwargs"] == {"topk": 2, "sizes": [1, 2]}
    again = zoo.create_model("zootest_toynet", checkpoint_path=path)
    assert again.num_classes == 12
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.eval()(x), again.eval()(x))


def test_unknown_weights_name():
    with pytest.raises(WeightsError, match="no pretrained weights named"):
        weights.get_weights("zootest_toynet.nope")
    with pytest.raises(WeightsError, match="no pretrained weights named 'zootest_toynet.untrained'; "):
        zoo.create_model("zootest_toynet", pretrained=True)


@pytest.mark.parametrize("name, kwargs", [("zootest_toynet", {}), ("nat_mnist", {})])  # build_classifier, the digit family
@pytest.mark.parametrize("create", ["zoo", "timm"])
def test_pretrained_cfg_overlay_file_is_loaded(tmp_path, name, kwargs, create):
    """timm's `pretrained=True, pretrained_cfg_overlay=dict(file=PATH)` loads PATH (tensors only), not the registry."""
    import timm

    torch.manual_seed(0)
    source = zoo.create_model(name, **kwargs)
    trained = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "trained.safetensors"
    save_file(trained, path)
    factory = zoo.create_model if create == "zoo" else timm.create_model
    model = factory(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize("name, listed", [("nat_mini.bogus", "registered: nat_mini.hf_in1k, nat_mini.in1k"),
                                          ("nat_mnist.bogus", "registered: nat_mnist.mnist"),
                                          ("agent_swin_mnist", "`zoo list --pretrained`")])
def test_unknown_tag_or_no_weights_lists_what_is_registered(name, listed):
    import timm

    for factory in (zoo.create_model, timm.create_model):
        with pytest.raises(WeightsError) as e:
            factory(name, pretrained=True)
        message = str(e.value)
        assert "\n" not in message and name.partition(".")[0] in message and listed in message, message


def test_export_records_only_the_callers_arguments(tmp_path):
    """Entrypoints fill in their variant's arguments; re-creating from the export must not pass them twice."""
    for name in ("nat_mini", "mavit_tiny", "agent_deit_tiny"):
        source = zoo.create_model(name, num_classes=3)
        path = weights.export(source, tmp_path / name)
        assert json.loads(path.with_suffix(".json").read_text())["model_args"] == {"num_classes": 3}
        again = zoo.create_model(name, checkpoint_path=path)
        assert again.num_classes == 3
