"""`zoo.weights.load_weights`, the one way weights enter a model: every source kind, the model's own converter
always applied, every converter failure reported, and nothing half-loaded on error."""
import json

import pytest
import torch
import toy_models  # noqa: F401  (registers zootest_toynet)
from safetensors.torch import save_file

import zoo
from zoo import weights
from zoo.weights import WeightsError


def _toy(**kw):
    return zoo.create_model("zootest_toynet", **kw)


def _random_state(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model, expected):
    own = model.state_dict()
    assert set(own) == set(expected)
    for k, v in expected.items():
        assert torch.equal(own[k], v), k


@pytest.fixture
def registered(tmp_path):
    """Register `zootest_toynet.<tag>` for a file; removed again after the test."""
    names = []

    def register(tag, path, **cfg):
        name = f"zootest_toynet.{tag}"
        weights._WEIGHTS.pop(name, None)
        weights.generate_default_cfgs({name: dict(num_classes=1000, classifier="head", file=str(path), **cfg)})
        names.append(name)
        return weights.get_weights(name)

    yield register
    for name in names:
        weights._WEIGHTS.pop(name, None)


def _lightning(path, state, **extra):
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {f"model.{k}": v for k, v in state.items()}, **extra}, path)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pth", "wrapped pth", "lightning ckpt", "str path", "state dict"])
def test_every_local_source_kind_loads(tmp_path, kind):
    state = _random_state(_toy())
    path = tmp_path / ("toy.safetensors" if kind == "safetensors" else "toy.ckpt" if kind == "lightning ckpt" else "toy.pth")
    if kind == "safetensors":
        save_file(state, path)
    elif kind == "lightning ckpt":
        _lightning(path, state)
    else:
        torch.save({"model": state, "epoch": 3} if kind == "wrapped pth" else state, path)
    source = {"str path": str(path), "state dict": state}.get(kind, path)
    target = _toy()
    loaded = weights.load_weights(target, source)
    _assert_state(target, state)
    assert loaded.source == ("the given state dict" if kind == "state dict" else str(path)) and loaded.cfg == {}


def test_registered_name_and_entry_load_and_return_their_cfg(tmp_path, registered):
    state = _random_state(_toy())
    path = tmp_path / "toy.safetensors"
    save_file(state, path)
    entry = registered("load_a", path, sha256=weights.sha256_of(path), flow_shift=2.0)
    for source in (entry.name, entry):
        target = _toy()
        loaded = weights.load_weights(target, source)
        _assert_state(target, state)
        assert loaded.source == f"{entry.name} ({path})"
        assert loaded.cfg["flow_shift"] == 2.0 and loaded.cfg["num_classes"] == 1000


def test_export_and_lightning_checkpoint_return_the_recorded_cfg(tmp_path):
    source = _toy(num_classes=5)
    source.pretrained_cfg = {**source.pretrained_cfg, "flow_shift": 1.5}
    exported = weights.export(source, tmp_path / "toy")
    assert json.loads(exported.with_suffix(".json").read_text())["pretrained_cfg"]["flow_shift"] == 1.5
    assert weights.load_weights(_toy(num_classes=5), exported).cfg["flow_shift"] == 1.5
    ckpt = _lightning(tmp_path / "last.ckpt", source.state_dict(), flow_shift=2.5,
                      hyper_parameters={"model_name": "zootest_toynet", "model_kwargs": {"num_classes": 5}})
    target = _toy(num_classes=5)
    assert weights.load_weights(target, ckpt).cfg == {"flow_shift": 2.5}
    _assert_state(target, source.state_dict())


def test_a_str_is_a_name_unless_it_names_a_file(tmp_path):
    with pytest.raises(WeightsError, match="no pretrained weights named 'zootest_toynet.nope'"):
        weights.load_weights(_toy(), "zootest_toynet.nope")
    with pytest.raises(WeightsError, match=r"nope\.pth: no such file"):
        weights.load_weights(_toy(), str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match=r"^nope\.safetensors: no such file"):
        weights.load_weights(_toy(), "nope.safetensors")


def _renaming_model():
    """A toy whose own converter maps an old key name (`conv.*`) to the current one (`stem.*`), as DiT's fills keys."""
    model = _toy()
    calls = []

    def rename(state, m):
        assert m is model
        calls.append(sorted(state))
        return {k.replace("conv.", "stem.", 1) if k.startswith("conv.") else k: v for k, v in state.items()}

    model.checkpoint_converter = rename
    return model, calls


def _old_layout(state):
    return {k.replace("stem.", "conv.", 1) if k.startswith("stem.") else k: v for k, v in state.items()}


@pytest.mark.parametrize("kind", ["path", "state dict", "registered"])
def test_the_models_own_converter_is_always_applied(tmp_path, registered, kind):
    state = _random_state(_toy())
    path = tmp_path / "old.safetensors"
    save_file(_old_layout(state), path)
    source = {"path": path, "state dict": _old_layout(state), "registered": registered("old", path).name}[kind]
    model, calls = _renaming_model()
    weights.load_weights(model, source)
    assert calls and "conv.weight" in calls[0]
    _assert_state(model, state)


def test_the_models_converter_completes_the_layout_converters_output(tmp_path):
    """The arch's converter maps an official layout; the model's own converter runs on its output."""
    state = _random_state(_toy())
    path = tmp_path / "official.pth"
    torch.save({f"backbone.{k}": v for k, v in _old_layout(state).items()}, path)
    model, calls = _renaming_model()
    weights.load_weights(model, path, converter=lambda s, m: {k.removeprefix("backbone."): v for k, v in s.items()})
    assert any("conv.weight" in keys for keys in calls), calls  # called on the layout converter's output
    _assert_state(model, state)


def test_dense_dit_weights_fill_an_sla_dit_through_create_model(tmp_path):
    """DiT's `checkpoint_converter` (fill_backend_keys) is applied to a checkpoint_path of another attention;
    with every key block kept (topk=1) SLA equals dense, so the dense weights really are the ones loaded."""
    args = dict(input_size=8, in_channels=1, num_classes=4, depth=1, hidden_size=32, num_heads=2, learn_sigma=False)
    dense = zoo.create_model("dit_s_2", **args)
    dense.load_state_dict(_random_state(dense))
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, path)
    sla = zoo.create_model("dit_s_2", checkpoint_path=path, attention="sla", attention_kwargs=dict(topk=1.0, block_size=4), **args)
    extra = set(sla.state_dict()) - set(dense.state_dict())
    assert extra and all(torch.count_nonzero(sla.state_dict()[k]) == 0 for k in extra)  # SLA's own projection, zero
    x, t, y = dense.example_inputs(2)
    torch.testing.assert_close(sla.eval()(x, t, y), dense.eval()(x, t, y), rtol=1e-5, atol=1e-5)


def test_every_failed_converter_is_reported_in_one_line(tmp_path, registered):
    path = tmp_path / "weird.pth"
    torch.save({"weird.weight": torch.ones(2)}, path)

    def first_layout(state, model):
        return {k: state[f"official.{k}"] for k in model.state_dict()}  # KeyError on this file

    def second_layout(state, model):
        return {"stem.weight": state["weird.weight"]}

    target = _toy()
    before = _snapshot(target)
    with pytest.raises(WeightsError) as e:
        weights.load_weights(target, path, converter=first_layout)
    message = str(e.value)  # why the file fits as it is not, then why the converter failed
    assert "\n" not in message and message.startswith(f"{path} does not match ToyNet: missing keys")
    assert "; converters tried: first_layout failed (KeyError: " in message and "official." in message
    for entry in (registered("first", path, converter=first_layout), registered("second", path, converter=second_layout)):
        assert entry.converter is not None
    with pytest.raises(WeightsError) as e:  # the arch's registered converters are tried in turn, after the given one
        weights.load_weights(target, path)
    message = str(e.value)
    assert "\n" not in message and "converters tried: first_layout failed (KeyError: " in message and "second_layout: missing keys" in message
    _assert_state(target, before)


def test_a_registered_converter_that_fails_is_one_line(tmp_path, registered):
    path = tmp_path / "toy.pth"
    torch.save(_toy().state_dict(), path)

    def broken(state, model):
        raise ValueError("not this layout\nsecond line")

    entry = registered("broken", path, converter=broken)
    target = _toy()
    before = _snapshot(target)
    with pytest.raises(WeightsError) as e:
        weights.load_weights(target, entry.name)
    assert str(e.value) == f"{path} (zootest_toynet.broken): converter broken failed (ValueError: not this layout)"
    _assert_state(target, before)


@pytest.mark.parametrize("case", ["shape from the model's converter", "missing key", "sha256", "bad file", "converter raises"])
def test_nothing_is_half_loaded_on_error(tmp_path, registered, case):
    state = _random_state(_toy())
    path = tmp_path / "toy.safetensors"
    save_file(state, path)
    target = _toy()
    before = _snapshot(target)
    source = path
    if case == "shape from the model's converter":  # every key but the last would fit
        target.checkpoint_converter = lambda s, m: {**s, "head.bias": torch.zeros(3)}
    elif case == "missing key":
        source = {k: v for k, v in state.items() if k != "head.bias"}
    elif case == "sha256":
        source = registered("bad_hash", path, sha256="0" * 64)
    elif case == "bad file":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        source = registered("raises", path, converter=lambda s, m: 1 / 0)
    with pytest.raises(WeightsError) as e:
        weights.load_weights(target, source)
    assert "\n" not in str(e.value)
    _assert_state(target, before)


def test_default_weights_prefer_the_attention_fine_tune():
    from zoo.factory import default_weights

    name = "video_dit_s_2_mmnist"
    assert default_weights(name).name == f"{name}.mmnist"
    assert default_weights(name, "sla").name == f"{name}.mmnist_sla"
    assert default_weights(name, "radial").name == f"{name}.mmnist_radial"
    assert default_weights(name, "na").name == f"{name}.mmnist"  # no NA fine-tune: the dense weights
    assert default_weights(f"{name}.mmnist_radial", "sla").name == f"{name}.mmnist_radial"  # a tag is taken as given
    assert default_weights("dit_s_2") is None and default_weights("nat_mnist.bogus") is None


def test_an_unregistered_tag_of_a_derived_generator_is_refused_not_replaced():
    """It once fell back to the dense weights silently; now it lists what is registered."""
    with pytest.raises(WeightsError) as e:
        zoo.create_model("video_dit_s_2_mmnist.mmnist_na", pretrained=True, attention="na", attention_kwargs=dict(kernel_size=3))
    assert "\n" not in str(e.value) and "registered: video_dit_s_2_mmnist.mmnist, " in str(e.value)


def test_timm_architecture_export_rebuilds_through_create_model(tmp_path):
    """`zoo train` trains timm's own models (model.name=resnet18); TRAINING.md promises create_model rebuilds the export."""
    from zoo.lightning.classification import create_classifier

    trained = create_classifier("resnet18", num_classes=7, in_chans=1)
    with torch.no_grad():
        for p in trained.parameters():
            p.normal_()
    path = zoo.weights.export(trained, tmp_path / "resnet18_digits.safetensors")
    rebuilt = zoo.create_model("resnet18", checkpoint_path=path)
    assert rebuilt.fc.out_features == 7 and rebuilt.conv1.in_channels == 1
    for key, value in trained.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    with pytest.raises(ValueError, match="unknown model 'resnet_eighteen'"):
        zoo.create_model("resnet_eighteen")
