"""The model registry, the timm registration and the lazy import."""
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import toy_models  # noqa: F401  (registers zootest_toynet / zootest_toygen)

import zoo


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_cheap_and_lazy():
    out = _python("""
        import sys, time
        t = time.perf_counter(); import zoo; dt = time.perf_counter() - t
        heavy = [m for m in ("torch", "timm", "diffusers", "lightning") if m in sys.modules]
        print(dt, heavy)
    """)
    seconds, heavy = out.split(" ", 1)
    assert float(seconds) < 2.0
    assert heavy == "[]"


# what a fresh interpreter has registered after each statement: zoo's registry and timm's share of it
_REGISTRY_COUNTS = """
    import json, sys
    registry = sys.modules.get("zoo._registry")
    zoo_models = registry._MODELS if registry else {}
    timm_models = sys.modules["timm"].list_models() if "timm" in sys.modules else []
    from_zoo = [n for n in timm_models if sys.modules["timm"].models.model_entrypoint(n).__module__.startswith("zoo.")]
    print(json.dumps({"zoo": len(zoo_models), "classifiers": sum(e.kind == "classifier" for e in zoo_models.values()),
                      "timm": len(from_zoo), "timm_loaded": "timm" in sys.modules}))
"""


@pytest.mark.parametrize("statement", [
    "import zoo.backbones.nat",  # timm is first imported from inside a half-imported zoo.backbones
    "import zoo.backbones",
    "import zoo.dit",
    "import zoo.pretrained",  # reads its families' timm cfgs while importing
    "import zoo.factory",  # the model modules import it back
    "from zoo._registry import list_models",
    "import timm; import zoo",
    "import zoo; import timm; timm.create_model('nat_mini')",
    "import zoo; zoo.create_model('nat_mnist')",
])
def test_every_model_is_registered_whatever_the_import_order(statement):
    """Once timm and any zoo module are loaded, every zoo model is in zoo's registry and every classifier in timm's."""
    import json

    counts = json.loads(_python(statement + "\n" + textwrap.dedent(_REGISTRY_COUNTS)))
    names = [n for n in zoo.list_models() if not n.startswith("zootest_")]
    classifiers = [n for n in zoo.list_models(kind="classifier") if not n.startswith("zootest_")]
    assert len(classifiers) > 50 and len(names) > len(classifiers)
    assert counts == {"zoo": len(names), "classifiers": len(classifiers), "timm": len(classifiers), "timm_loaded": True}


@pytest.mark.parametrize("statement", ["import zoo", "import zoo.ops", "import zoo.weights", "import zoo.cli"])
def test_light_imports_register_nothing(statement):
    """Modules that need neither timm nor the models load neither (the registry fills on first use)."""
    import json

    counts = json.loads(_python(statement + "\n" + textwrap.dedent(_REGISTRY_COUNTS)))
    assert counts == {"zoo": 0, "classifiers": 0, "timm": 0, "timm_loaded": False}


def test_zoo_names_never_shadow_timm_names():
    ours = set(zoo.list_models())
    theirs = set(zoo._registry.timm_own_names())
    assert not ours & theirs
    def resnet50(pretrained=False, **kwargs):  # noqa: E306
        return None
    with pytest.raises(ValueError, match="already a timm model"):
        zoo.register_model(resnet50)


def test_classifier_through_zoo_and_timm():
    a = zoo.create_model("zootest_toynet", num_classes=10, drop_rate=None)
    b = timm.create_model("zootest_toynet", num_classes=10)
    assert type(a) is type(b) and a.num_classes == b.num_classes == 10
    assert a(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert a.pretrained_cfg["architecture"] == "zootest_toynet"


def test_features_only():
    model = zoo.create_model("zootest_toynet", features_only=True)
    feats = model(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [8, 16]
    assert model.feature_info.channels() == [8, 16]


def test_generator_lives_only_in_zoo():
    gen = zoo.create_model("zootest_toygen", channels=3)
    assert gen.channels == 3
    assert not timm.is_model("zootest_toygen")
    assert "zootest_toygen" in zoo.list_models(kind="generator")
    assert "zootest_toygen" not in zoo.list_models(kind="classifier")


def test_list_models_wildcards_and_unknown_names():
    assert zoo.list_models("zootest_toy*") == ["zootest_toygen", "zootest_toynet"]
    assert zoo.list_models(["zootest_toyn*", "nothing*"]) == ["zootest_toynet"]
    assert zoo.list_models("zootest_*", pretrained=True) == []  # no weights registered for the toys
    with pytest.raises(ValueError, match="did you mean zootest_toynet"):
        zoo.create_model("zootest_toynt")


def test_model_info_counts_params_and_flops():
    info = zoo.model_info("zootest_toynet")
    model = zoo.create_model("zootest_toynet")
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["flops"] == zoo.flops(model) > 0
    assert info["pretrained"] == {}
