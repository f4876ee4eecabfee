"""scripts/gpu_queue.py: its steps name scripts, options and tests that exist, and its runner keeps to the budget."""
from __future__ import annotations

import argparse
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def queue():
    return load_script("gpu_queue")


class _Parsed(Exception):
    """Raised by the patched `parse_args` once a script's command line parsed cleanly."""


def _parse_only(monkeypatch, script: str, argv: list[str]) -> None:
    """Run `script` as __main__ with `argv` up to its `parse_args`: argparse rejects what it does not know."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    with pytest.raises(_Parsed):
        runpy.run_path(str(ROOT / script), run_name="__main__")


def test_every_script_command_parses(queue, monkeypatch, tmp_path):
    commands = [shlex.split(c.replace('"$OUT', f'"{tmp_path}')) for s in queue.STEPS for c in s.commands]
    scripts = [c[1:] for c in commands if c[0] == "python" and c[1].startswith("scripts/")]
    assert len(scripts) >= 10
    for script, *argv in scripts:
        if "argparse" in (ROOT / script).read_text():
            _parse_only(monkeypatch, script, argv)
        else:  # a script without options (check_fa4.py) must be given none
            assert not argv and (ROOT / script).is_file(), script


def test_every_pytest_command_names_existing_tests_and_markers(queue):
    markers = (ROOT / "pyproject.toml").read_text()
    for step in queue.STEPS:
        for command in step.commands:
            words = shlex.split(command)
            if "pytest" not in words:
                continue
            files = [w for w in words if w.startswith("tests/")]
            assert files and all((ROOT / f).is_file() for f in files), command
            marks = [words[i + 1] for i, w in enumerate(words) if w == "-m" and words[i + 1] != "pytest"]
            assert all(f'"{mark}:' in markers for mark in marks), command


def test_runner_logs_each_step_and_stops_before_a_step_that_does_not_fit(queue, tmp_path):
    steps = [queue.Step("first", 0, 1, ("echo one", "exit 3")),
             queue.Step("second", 0, 1, ("sleep 5",)),
             queue.Step("third", 0, 100, ("echo never",))]
    results = dict(queue.run_queue(steps, budget_s=3, out=tmp_path))
    assert results["first"].startswith("failed (exit codes [0, 3])")
    assert results["second"].startswith("failed (exit codes [124])")  # killed when the budget ran out
    assert results["third"].startswith("not started")
    assert (tmp_path / "first.log").read_text().count("one") == 2  # the command line and its output
    assert "killed after" in (tmp_path / "second.log").read_text()
    assert not (tmp_path / "third.log").exists()


def test_select_by_name(queue):
    names = [s.name for s in queue.select(queue.STEPS, None, "fa4_check")]
    assert names[0] == "fa4_check" and "kernels" not in names
    assert [s.name for s in queue.select(queue.STEPS, ["agentsd", "kernels"], None)] == ["kernels", "agentsd"]
    with pytest.raises(SystemExit, match="unknown step 'nope'"):
        queue.select(queue.STEPS, ["nope"], None)
