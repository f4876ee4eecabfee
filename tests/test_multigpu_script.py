"""scripts/multigpu_run.py without GPUs: its parsing of `zoo train` output, its table, its refusals.

(Its runs are `zoo train` commands, tested in test_multigpu.py; the whole script was dry-run on CPU with
`--accelerator cpu --tiny`.)
"""
from __future__ import annotations

import pytest
from script_modules import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("multigpu_run")


def test_summary_reads_the_last_result_line(script):
    out = "noise\n{'val/loss': 0.5, 'global_step': 10, 'resumed_from': None}\nmore noise\n"
    assert script.summary(out) == {"val/loss": 0.5, "global_step": 10, "resumed_from": None}
    assert script.summary("no result") == {}


def test_steady_is_the_median_of_the_second_half(script):
    rows = [{"x": str(v)} for v in (1000, 1, 5, 7, 6, 9)] + [{"x": ""}]
    assert script.steady(rows, "x") == 7  # second half 7, 6, 9: the warm-up values do not count
    assert script.steady(rows, "y") is None
    assert script.last(rows, "x") == 9


def test_table_has_a_row_per_run(script):
    run = dict(name="dit_2dev", devices=2, strategy="ddp", per_device_batch=128, global_step=1000, val_top1=None,
               val_loss=0.03125, samples_per_s=5000.0, step_s=0.0512, peak_mem_gib=3.5, returncode=0)
    lines = script.table([run]).splitlines()
    assert len(lines) == 3 and lines[2] == "| dit_2dev | 2 | ddp | 128 | 1000 |  | 0.0312 | 5000 | 0.051 | 3.50 | 0 |"


def test_bad_arguments_are_one_line(script, tmp_path, capsys):
    assert script.main(["--out", str(tmp_path), "--mnist", str(tmp_path / "none.npz")]) == 2
    assert script.main(["--out", str(tmp_path), "--devices", "3"]) == 2  # 128 is not divisible by 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--mnist" in err[0] and "--classify-batch 128 is not divisible by --devices 3" in err[1]
