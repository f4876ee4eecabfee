"""scripts/benchmark_na.py on a CPU-only machine: arguments, the exact attended fraction, targets, a quick run."""
import json

import pytest
import torch
from script_modules import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark_na")


def test_parse_args(bench):
    args = bench.parse_args([])
    assert args.rows == list(bench.OP_ROWS) and args.models == list(bench.MODELS) and args.only is None
    assert bench.parse_args(["--quick"]).rows == list(bench.QUICK_ROWS)
    assert bench.parse_args(["--rows", "wan480,na2d_k13", "--only", "ops"]).rows == ["wan480", "na2d_k13"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "na2d_k13", "--quick"])  # not a quick row


def test_attended_fraction_is_exact(bench):
    assert bench.attended_fraction((30, 48, 80), (18, 24, 24), (1, 1, 1)) == pytest.approx(18 / 30 * 24 / 48 * 24 / 80)
    assert bench.attended_fraction((21, 30, 52), (3, 11, 11), (1, 1, 1)) == pytest.approx(3 / 21 * 11 / 30 * 11 / 52)
    assert bench.attended_fraction((56, 56), (7, 7), (8, 8)) == pytest.approx((7 / 56) ** 2)  # 7 keys per query
    assert bench.attended_fraction((13,), (4,), (3,)) == pytest.approx(4 / 13)  # groups of 5, 4, 4: 4 keys each


def test_targets(bench):
    row = {"kind": "NA2D", "times": {"fwd/flex": {"ms": 3.0}, "fwd/zoo": {"ms": 1.0},
                                     "fwdbwd/flex": {"ms": 4.0}, "fwdbwd/zoo": {"error": "x"}}}
    (fwd, bwd) = bench.op_targets(row)
    assert (fwd["value"], fwd["met"], bwd["value"], bwd["met"]) == (3.0, True, None, None)
    row = {"kind": "NA3D", "attended_fraction": 0.09, "times": {"fwd/cudnn": {"ms": 9.0}, "fwd/zoo": {"ms": 1.0}}}
    (t,) = bench.op_targets(row)
    assert t["value"] == 9.0 and t["met"] is False and "10.00x" in t["target"]  # needs 0.9 / 0.09 = 10x
    swin = {"model": "swin_tiny_patch4_window7_224", "infer_img_s": 100.0, "train_img_s": 50.0,
            "times": {"train": {"ms": 1.0, "peak_mib": 1000.0}}}
    nat = {"model": "nat_tiny", "infer_img_s": 120.0, "train_img_s": 40.0, "times": {"train": {"ms": 1.0,
                                                                                               "peak_mib": 900.0}}}
    checks = {t["target"]: (t["value"], t["met"]) for t in bench.model_targets([swin, nat])}
    assert checks["nat_tiny infer img/s >= 1.0x Swin-T"] == (1.2, True)
    assert checks["nat_tiny train img/s >= 0.9x Swin-T"] == (0.8, False)
    assert checks["nat_tiny training peak memory <= Swin-T's"] == (0.9, True)
    assert checks["dinat_tiny infer img/s >= 1.0x Swin-T"] == (None, None)  # not measured: n/a, not a pass


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_quick_cpu_ops_run(bench, tmp_path, capsys):
    """One tiny row end to end on CPU: Flex (eager, forward), dense SDPA and the reference time; failures
    (no Flex backward on CPU, a zoo without backend=) are table entries, not crashes."""
    out = tmp_path / "na.json"
    results = bench.main(["--device", "cpu", "--quick", "--only", "ops", "--rows", "dinat_t_s1", "--json", str(out)])
    (row,) = results["ops"]
    times = row["times"]
    for key in ("fwd/flex", "fwd/cudnn", "fwd/ref", "fwdbwd/cudnn", "fwdbwd/ref"):
        assert times[key]["ms"] > 0, key
    assert "no backward on cpu" in times["fwdbwd/flex"]["error"]
    assert "ms" in times["fwd/zoo"] or "backend" in times["fwd/zoo"]["error"]
    assert row["max_abs_diff_vs"] == "ref" and row["max_abs_diff"]["flex"] < 2e-2  # bf16 outputs
    assert len(row["targets"]) == 2
    assert "fwd/fa4" not in times and "fa4 skipped: flash-attn-4 runs on CUDA only" in row["notes"]
    assert json.loads(out.read_text())["ops"][0]["row"] == "dinat_t_s1"
    printed = capsys.readouterr().out
    assert "TARGET" in printed and "dinat_t_s1" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_main_refuses_cuda_without_gpu(bench):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--only", "ops"])
