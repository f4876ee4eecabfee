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


@pytest.mark.parametrize("first", ["zoo", "timm", "zoo.pretrained", "zoo.dit"])  # the MNIST models derive from both
def test_every_model_is_registered_whatever_the_import_order(first):
    out = _python(f"""
        import {first}, timm, zoo
        names = zoo.list_models(kind="classifier")
        missing = [n for n in names if not timm.is_model(n)]
        print(len(names), missing, "nat_mnist" in names and "video_dit_s_2_mmnist" in zoo.list_models(kind="generator"))
    """)
    count, missing, derived = out.split(" ", 2)
    assert missing == "[]" and derived == "True"


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
