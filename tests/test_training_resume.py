"""Training survives kills: checkpoints are saved atomically (also on a second filesystem), an
unreadable last.ckpt falls back to the newest readable checkpoint, `resume=PATH` works, and an
output_dir holding another model's run is refused before anything is written."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from omegaconf import OmegaConf  # noqa: E402
from test_lightning import TINY_VIT, tiny_classify  # noqa: E402

from zoo.lightning.config import ConfigError  # noqa: E402
from zoo.lightning.train import run  # noqa: E402

# runs `zoo.lightning.train.main`, stopping for good inside the fsync of the KILL_AT_SAVE-th last.ckpt save
KILL_DRIVER = """
import os, sys, time
from pathlib import Path

marker, nth, fsync, saves = Path(os.environ["KILL_MARKER"]), int(os.environ["KILL_AT_SAVE"]), os.fsync, []

def fsync_then_hang(fd):
    target = os.readlink(f"/proc/self/fd/{fd}")
    if ".last.ckpt." in target and target.endswith(".zoo-partial"):
        saves.append(target)
        if len(saves) == nth:
            marker.write_text(target)
            time.sleep(600)
    return fsync(fd)

os.fsync = fsync_then_hang
from zoo.lightning.train import main
sys.exit(main(sys.argv[1:]))
"""


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture
def other_filesystem(tmp_path):
    """A folder on another filesystem than the temp dir: a tmpfs mounted here, else /dev/shm."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], capture_output=True).returncode == 0
    if mounted:
        yield mount
        subprocess.run(["umount", "-l", str(mount)], check=False)
        return
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_dev != Path(tempfile.gettempdir()).stat().st_dev and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(dir=shm))
        yield folder
        subprocess.run(["rm", "-rf", str(folder)], check=False)
        return
    pytest.skip("no second filesystem: cannot mount a tmpfs and /dev/shm is on the temp dir's")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the driver finds the file being saved in /proc")
@pytest.mark.parametrize("where", ["same_filesystem", "other_filesystem"])
def test_kill_during_a_save_then_resume(tmp_path, where, request):
    out = (request.getfixturevalue("other_filesystem") if where == "other_filesystem" else tmp_path) / "run"
    cfg = tiny_classify(out, "trainer.max_steps=6", "checkpoint.every_n_train_steps=2")
    config = tmp_path / "config.yaml"
    OmegaConf.save(cfg, config)
    marker = tmp_path / "killed_during"
    env = {**os.environ, "KILL_MARKER": str(marker), "KILL_AT_SAVE": "2"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, "--config", str(config)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parent)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        assert marker.exists(), "the run never reached its second save"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    folder = out / "checkpoints"
    partial = Path(marker.read_text())
    assert partial.parent == folder and partial.exists()  # the write went beside its target, not to /tmp
    assert _step(folder / "last.ckpt") == 2  # the previous last.ckpt, whole
    assert _step(folder / "step0000004.ckpt") == 4  # saved just before the killed one
    result = run(cfg)
    assert result["resumed_from"] == str(folder / "step0000004.ckpt")  # the newest readable checkpoint
    assert result["global_step"] == 6 and _step(folder / "last.ckpt") == 6
    assert not list(folder.glob(".*.zoo-partial"))  # the killed save's leftover is gone


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_unreadable_last_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    run(tiny_classify(tmp_path, "trainer.max_steps=4", "checkpoint.every_n_train_steps=2"))
    last, step4 = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "step0000004.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])
    os.utime(step4, (time.time() - 60, time.time() - 60))  # last.ckpt is the newest: the one tried first
    with pytest.warns(UserWarning, match="resuming from .*step0000004.ckpt") as record:
        result = run(tiny_classify(tmp_path, "trainer.max_steps=6", "checkpoint.every_n_train_steps=2"))
    message = str(record[0].message)
    assert "\n" not in message and str(last) in message
    assert result["resumed_from"] == str(step4) and result["global_step"] == 6 and _step(last) == 6


def test_resume_from_a_named_checkpoint(tmp_path):
    first = run(tiny_classify(tmp_path / "a", "trainer.max_steps=4", "checkpoint.every_n_train_steps=2"))
    assert first["global_step"] == 4
    source = tmp_path / "a" / "checkpoints" / "last.ckpt"
    result = run(tiny_classify(tmp_path / "b", "trainer.max_steps=6", f"resume={source}"))
    assert result["resumed_from"] == str(source) and result["global_step"] == 6
    with pytest.raises(ConfigError, match="config key 'resume': .*missing.ckpt is not a file") as e:
        run(tiny_classify(tmp_path / "c", f"resume={tmp_path / 'missing.ckpt'}"))
    assert "\n" not in str(e.value) and not (tmp_path / "c").exists()


def test_output_dir_of_another_model_is_refused_before_writing(tmp_path):
    run(tiny_classify(tmp_path, "trainer.max_steps=2", "checkpoint.every_n_train_steps=2"))
    config = (tmp_path / "config.yaml").read_bytes()
    last = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    other_kwargs = [o.replace("embed_dim=32", "embed_dim=48") for o in TINY_VIT]
    for extra in (other_kwargs, ["model.name=resnet18", "model.kwargs={}"], ["data.num_classes=7"],
                  ["resume=false", "model.kwargs.depth=3"]):
        cfg = OmegaConf.merge(tiny_classify(tmp_path), OmegaConf.from_dotlist(extra))
        with pytest.raises(ConfigError, match="holds a run of another model") as e:
            run(cfg)
        assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
        assert (tmp_path / "config.yaml").read_bytes() == config
        assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == last
    other = tmp_path / "other"
    with pytest.raises(ConfigError, match=r"resume=.*last.ckpt holds a run of another model"):
        run(OmegaConf.merge(tiny_classify(other), OmegaConf.from_dotlist([*other_kwargs, f"resume={tmp_path / 'checkpoints' / 'last.ckpt'}"])))
    assert not other.exists()
