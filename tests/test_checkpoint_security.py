"""No checkpoint runs code: a pickle whose `__reduce__` creates a file, in every format torch reads and
under every checkpoint name, through every entry point that reads weights; legitimate checkpoints
(zip, legacy, with the allowed containers) still load; registered weights are hash-checked."""
from __future__ import annotations

import argparse
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import toy_models  # noqa: F401  (registers zootest_toynet)

import zoo
from zoo import weights
from zoo.weights import WeightsError


class Payload:
    """Creates `marker` when unpickled by anything that runs pickled calls."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _save(obj, path: Path, fmt: str) -> Path:
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # plain pickle, protocol 2 (GLOBAL opcodes) or 5 (STACK_GLOBAL, frames)
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(fmt[-1]))
    return path


FORMATS = ("zip", "legacy", "pickle2", "pickle5")
NAMES = ("evil.pth", "evil.ckpt", "evil.bin", "evil.pt", "evil.safetensors")


def _evil(tmp_path: Path, fmt: str = "zip", name: str = "evil.pth") -> tuple[Path, Path]:
    marker = tmp_path / f"PWNED_{fmt}_{name}"
    state = {"state_dict": {"w": torch.ones(2)}, "payload": Payload(marker)}
    return _save(state, tmp_path / f"{fmt}_{name}", fmt), marker


def _assert_refused(message: str, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the pickled payload ran"
    assert "\n" not in message.strip(), message
    assert str(path) in message, message


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """The control: the same file does run code under a plain torch.load, so the tests below can fail."""
    path, marker = _evil(tmp_path, "zip")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_zoo_weights_readers_refuse_pickled_code(tmp_path, fmt, name):
    path, marker = _evil(tmp_path, fmt, name)
    for read in (weights.load_tensors_only, weights.read_checkpoint,
                 lambda p: weights.load_weights(zoo.create_model("zootest_toynet"), p)):
        with pytest.raises(WeightsError) as e:
            read(path)
        _assert_refused(str(e.value), path, marker)


@pytest.mark.parametrize("fmt", ("zip", "legacy"))
def test_refusal_names_the_global(tmp_path, fmt):
    path, marker = _evil(tmp_path, fmt)
    with pytest.raises(WeightsError, match=r"(io|builtins)\.open") as e:
        weights.read_checkpoint(path)
    _assert_refused(str(e.value), path, marker)


@pytest.mark.parametrize("fmt", FORMATS)
def test_create_model_checkpoint_path_refuses(tmp_path, fmt):
    path, marker = _evil(tmp_path, fmt, "evil.pth")
    with pytest.raises(WeightsError) as e:
        zoo.create_model("zootest_toynet", checkpoint_path=path)
    _assert_refused(str(e.value), path, marker)


def _cli(argv: list[str], capsys) -> str:
    from zoo.cli import main

    assert main(argv) == 1
    return capsys.readouterr().err


@pytest.mark.parametrize("fmt", ("zip", "legacy", "pickle5"))
def test_cli_checkpoint_flags_refuse(tmp_path, fmt, capsys):
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    for command, extra in (("classify", [str(image)]), ("classify", ["--model", "resnet18", str(image)]),
                           ("generate", ["--out", str(tmp_path / "g.png"), "--steps", "1"]),
                           ("generate-video", ["--out", str(tmp_path / "v.gif"), "--steps", "1"])):
        path, marker = _evil(tmp_path, fmt, f"{command}.ckpt")
        err = _cli([command, "--device", "cpu", "--quiet", "--checkpoint", str(path), *extra], capsys)
        _assert_refused(err, path, marker)
        assert not (tmp_path / "g.png").exists() and not (tmp_path / "v.gif").exists()


def test_registry_cached_download_refuses(tmp_path, monkeypatch):
    """A hub/URL entry (sha256 unknown offline) whose cached file carries a payload."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    for name in ("nat_mini.in1k", "nat_mini.hf_in1k"):
        entry = weights.get_weights(name)
        assert entry.sha256 is None and entry.sha256_status.startswith("unknown")
        cached = weights.cache_path(name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        marker = tmp_path / f"PWNED_{name}"
        _save({"model": {"w": torch.ones(1)}, "payload": Payload(marker)}, cached, "legacy")
        with pytest.raises(WeightsError) as e:
            zoo.create_model(name, pretrained=True)
        _assert_refused(str(e.value), cached, marker)


def test_training_config_and_resume_refuse(tmp_path):
    pytest.importorskip("lightning")
    from test_lightning import tiny_classify

    from zoo.lightning.config import ConfigError
    from zoo.lightning.train import AtomicCheckpointIO, main, run

    out = tmp_path / "run"
    path, marker = _evil(tmp_path, "zip", "init.pth")
    with pytest.raises(WeightsError) as e:
        run(tiny_classify(out, f"model.checkpoint_path={path}"))
    _assert_refused(str(e.value), path, marker)
    assert not out.exists()  # refused before anything was written
    for fmt in ("zip", "legacy", "pickle5"):
        path, marker = _evil(tmp_path, fmt, "resume.ckpt")
        with pytest.raises(ConfigError) as e:
            run(tiny_classify(out, f"resume={path}"))
        _assert_refused(str(e.value), path, marker)
        with pytest.raises(WeightsError) as e:
            AtomicCheckpointIO().load_checkpoint(path)
        _assert_refused(str(e.value), path, marker)
    last = out / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    _, marker = _evil(tmp_path, "zip", "last.ckpt")
    (tmp_path / "zip_last.ckpt").rename(last)
    with pytest.raises(ConfigError) as e:
        run(tiny_classify(out))
    _assert_refused(str(e.value), last, marker)
    assert not (out / "config.yaml").exists()
    assert main(["--config", "classify/vit_mnist.yaml", f"output_dir={out}", f"resume={path}"]) == 2


# ---------------------------------------------------------------- what still loads


def _fake_yacs(monkeypatch):
    """A stand-in for yacs' CfgNode (a dict subclass with attributes), importable while saving only."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = True
            self.__dict__["__deprecated_keys__"] = set()

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


@pytest.mark.parametrize("fmt", ("zip", "legacy"))
def test_legitimate_checkpoints_load(tmp_path, fmt, monkeypatch):
    torch.manual_seed(0)
    model = zoo.create_model("zootest_toynet")
    state = OrderedDict((k, torch.randn_like(v)) for k, v in model.state_dict().items())
    config = _fake_yacs(monkeypatch)({"MODEL": {"TYPE": "toy"}, "TRAIN": {"LR": 1e-3}})
    checkpoint = {"model": state, "args": argparse.Namespace(lr=0.1, sizes=(1, 2)), "config": config,
                  "nested": {"epoch": 3, "history": [0.5, {"top1": 1.0}], "tags": {"a", "b"}}}
    path = _save(checkpoint, tmp_path / f"official_{fmt}.pth", fmt)
    monkeypatch.delitem(sys.modules, "yacs.config")  # yacs is not installed where the file is read
    loaded = weights.load_tensors_only(path)
    assert isinstance(loaded["model"], OrderedDict) and list(loaded["model"]) == list(state)
    assert vars(loaded["args"]) == {"lr": 0.1, "sizes": (1, 2)}
    assert dict(loaded["config"]) == {"MODEL": {"TYPE": "toy"}, "TRAIN": {"LR": 1e-3}}
    assert loaded["nested"] == checkpoint["nested"]
    fresh = zoo.create_model("zootest_toynet")
    weights.load_weights(fresh, path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_plain_pickle_of_tensors_is_not_a_torch_checkpoint(tmp_path):
    """torch.load never read plain pickles; they are refused in one line, not half-read."""
    path = _save({"w": torch.ones(2)}, tmp_path / "plain.pth", "pickle5")
    with pytest.raises(WeightsError, match="plain.pth") as e:
        weights.read_checkpoint(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- registry hashes


def test_every_shipped_file_has_a_matching_sha256_and_others_say_unknown():
    zoo.register_all_models()
    registered = [weights.get_weights(n) for n in zoo.list_pretrained()]
    shipped = [w for w in registered if w.package_file]
    assert len(shipped) >= 7
    for w in shipped:
        assert w.sha256 and weights.sha256_of(weights.fetch(w)) == w.sha256, w.name
    for w in registered:
        assert w.sha256_status == w.sha256 if w.sha256 else w.sha256_status.startswith("unknown offline"), w.name
    assert sum(w.sha256 is None for w in registered) > 0  # the hub/URL files never downloaded here
    info = zoo.model_info("nat_mini", with_flops=False)["pretrained"]  # what `zoo info` prints
    assert info["nat_mini.in1k"]["sha256"].startswith("unknown offline")
    assert zoo.model_info("biformer_mnist", with_flops=False)["pretrained"]["biformer_mnist.mnist"]["sha256"] == \
        weights.get_weights("biformer_mnist.mnist").sha256


def test_hash_unknown_file_is_recorded_on_first_use_and_checked_after(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    model = zoo.create_model("nat_mini")
    cached = weights.cache_path("nat_mini.in1k")
    cached.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, cached)
    zoo.create_model("nat_mini", pretrained=True)
    record = cached.with_name(cached.name + ".sha256")
    assert record.read_text().strip() == weights.sha256_of(cached)
    zoo.create_model("nat_mini", pretrained=True)  # the same file: still loads
    torch.save({"model": {k: v + 1 for k, v in model.state_dict().items()}}, cached)  # replaced afterwards
    with pytest.raises(WeightsError, match="sha256 mismatch") as e:
        zoo.create_model("nat_mini", pretrained=True)
    assert str(cached) in str(e.value) and "\n" not in str(e.value)
