"""Bad-input battery, checkpoints: every bad file or name gets ONE line that names the file or argument,
and the model is left as it was (nothing half-loaded)."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import toy_models  # noqa: F401  (registers zootest_toynet)
from safetensors.torch import save_file
from test_checkpoint_security import Payload

import zoo
from zoo import weights
from zoo.weights import WeightsError


def _toy():
    torch.manual_seed(0)
    return zoo.create_model("zootest_toynet")


def _state(**changes):
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in _toy().state_dict().items()}
    return {**state, **changes}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _torch_file(path: Path, obj, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _cut(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    return _write(path, data[: int(len(data) * fraction)])


# name -> build(tmp_path) -> (path or argument the message must name, what to call, a phrase the message must hold)
CASES = {
    "random bytes .pth": lambda t: (p := _write(t / "x.pth", os.urandom(4096)), p, "not a readable torch checkpoint"),
    "random bytes .safetensors": lambda t: (p := _write(t / "x.safetensors", os.urandom(4096)), p, "not a readable safetensors"),
    "empty file": lambda t: (p := _write(t / "x.ckpt", b""), p, "is empty"),
    "truncated safetensors": lambda t: (p := _cut(_st(t / "x.safetensors")), p, "truncated or corrupt"),
    "truncated zip": lambda t: (p := _cut(_torch_file(t / "x.pth", _state())), p, "truncated or corrupt"),
    "truncated legacy": lambda t: (p := _cut(_torch_file(t / "x.pth", _state(), legacy=True), 0.9), p, "truncated or corrupt"),
    "plain pickle payload": lambda t: (p := _write(t / "x.bin", pickle.dumps({"w": torch.ones(1), "f": Payload(t / "ran")})), p,
                                       "pickled objects other than tensors"),
    "a zip that is not torch's": lambda t: (p := _zip(t / "x.pth"), p, "not a readable torch checkpoint"),
    "no tensors inside": lambda t: (p := _torch_file(t / "x.pth", {"epoch": 3, "lr": 0.1}), p, "holds no state dict of tensors"),
    "wrong model's state dict": lambda t: (p := _torch_file(t / "x.pth", {"conv.weight": torch.ones(1)}), p, "missing keys"),
    "mis-shaped keys": lambda t: (p := _torch_file(t / "x.pth", _state(**{"head.weight": torch.ones(3, 16)})), p,
                                  "head.weight: checkpoint (3, 16) vs model (1000, 16)"),
    "nonexistent path": lambda t: (t / "missing.pth", t / "missing.pth", "no such file"),
    "directory instead of file": lambda t: ((t / "dir.pth").mkdir() or t / "dir.pth", t / "dir.pth", "is a directory"),
    "unreadable export JSON": lambda t: (p := _export_with_bad_json(t), p.with_suffix(".json"), "JSON is unreadable"),
}


def _st(path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in _state().items()}, str(path))
    return path


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not weights")
    return path


def _export_with_bad_json(tmp_path: Path) -> Path:
    path = weights.export(_toy(), tmp_path / "toy.safetensors", architecture="zootest_toynet")
    path.with_suffix(".json").write_text("{not json")
    return path


def _one_line(message: str, names: str | os.PathLike, phrase: str) -> None:
    assert "\n" not in message, message
    assert str(names) in message, message
    assert phrase in message, message


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_one_line_and_leaves_the_model_alone(tmp_path, case):
    path, names, phrase = CASES[case](tmp_path)
    model = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as e:
        if case == "unreadable export JSON":
            zoo.create_model("zootest_toynet", checkpoint_path=path)
        else:
            weights.load_weights(model, path)
    _one_line(str(e.value), names, phrase)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sha256_mismatch(tmp_path):
    path = _torch_file(tmp_path / "x.pth", _state())
    with pytest.raises(WeightsError) as e:
        weights.verify_sha256(path, "0" * 64)
    _one_line(str(e.value), path, "sha256 mismatch")


def test_unknown_tag_and_name():
    with pytest.raises(WeightsError) as e:
        weights.get_weights("nat_mini.bogus")
    _one_line(str(e.value), "nat_mini.bogus", "registered: nat_mini.hf_in1k, nat_mini.in1k")
    with pytest.raises(RuntimeError) as e:  # timm resolves the tag first
        zoo.create_model("nat_mini.bogus", pretrained=True)
    _one_line(str(e.value), "bogus", "nat_mini")


def test_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(WeightsError) as e:
        zoo.create_model("nat_mini", pretrained=True)
    _one_line(str(e.value), weights.cache_path("nat_mini.in1k"), "download https://shi-labs.com")


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(WeightsError) as e:
        weights.read_checkpoint(path)
    _one_line(str(e.value), path, "pickled objects other than tensors (__torch__.")


def test_cli_checkpoint_argument(tmp_path, capsys):
    from zoo.cli import main

    for command, out in (("generate", "g.png"), ("generate-video", "v.gif"), ("classify", None)):
        image = [] if out else [str(_digit(tmp_path))]
        outs = ["--out", str(tmp_path / out)] if out else []
        assert main([command, "--device", "cpu", "--quiet", "--checkpoint", str(tmp_path / "nope.pth"), *outs, *image]) == 1
        err = capsys.readouterr().err.strip()
        _one_line(err, f"--checkpoint {tmp_path / 'nope.pth'}", "no such")


def _digit(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    return tmp_path / "digit.png"


def test_classify_refuses_a_training_checkpoint_for_its_export(tmp_path, capsys):
    """A Lightning checkpoint of a classifier has no preprocessing (mean, std, size): classifying with it could be silently wrong."""
    from zoo.cli import main

    path = _torch_file(tmp_path / "last.ckpt", {"state_dict": {}, "hyper_parameters": {"model_name": "nat_mini", "model_kwargs": {}}})
    assert main(["classify", "--quiet", "--checkpoint", str(path), str(_digit(tmp_path))]) == 1
    _one_line(capsys.readouterr().err.strip(), f"--checkpoint {path}", "classify with the run's export")
