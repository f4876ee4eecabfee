"""scripts/benchmark_linear.py on a CPU-only machine: arguments, targets, the reference switch and a tiny run."""
import json

import pytest
import torch
from script_modules import load_script

from zoo import ops


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark_linear")


def test_parse_args(bench):
    args = bench.parse_args([])
    assert args.models == list(bench.MODELS) and args.sizes == [224] and args.variants == list(bench.VARIANTS)
    assert bench.parse_args(["--quick"]).models == list(bench.QUICK_MODELS)
    assert bench.parse_args(["--sizes", "512,1024"]).sizes == [512, 1024]
    for bad in (["--models", "swin_huge"], ["--sizes", "500"], ["--variants", "fast"], ["--profile", "nope"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_targets_use_the_same_run_and_the_best_zoo_variant(bench):
    def row(model, size, **rates):
        return {"model": model, "size": size, "times": {k.replace("_", "/", 1).replace("_", "+"): {"img_s": v}
                                                          for k, v in rates.items()}}

    rows = [row("swin_tiny_patch4_window7_224", 224, infer_ref=100.0, train_ref=50.0, infer_ref_compile=120.0),
            row("flatten_swin_tiny", 224, infer_zoo=110.0, infer_zoo_compile=130.0, train_zoo=44.0,
                infer_ref_compile=125.0, train_ref_compile=40.0)]
    checks = {c["target"]: c for c in bench.targets(rows)}
    infer = checks["flatten_swin_tiny@224 infer >= 1.0x swin_tiny_patch4_window7_224"]
    assert infer["value"] == pytest.approx(130 / 120) and infer["met"]  # best of each
    train = checks["flatten_swin_tiny@224 train >= 0.9x swin_tiny_patch4_window7_224"]
    assert train["value"] == pytest.approx(44 / 50) and not train["met"]
    assert checks["flatten_swin_tiny@224 train faster than its ref+compile"]["met"]
    assert bench.targets([row("flatten_swin_tiny", 64, infer_zoo=1.0)]) == []  # smoke sizes have no target


def test_reference_ops_switch_restores(bench):
    q = torch.rand(1, 1, 4, 16)
    before = (ops.linear.KERNEL_DEVICES, ops.agent.SDPA_DEVICES)
    with bench.reference_ops(True):
        assert ops.linear.KERNEL_DEVICES == () and ops.agent.SDPA_DEVICES == ()
        assert ops.linear_attention_backend(q, q, q)[0] == "reference"
    assert (ops.linear.KERNEL_DEVICES, ops.agent.SDPA_DEVICES) == before


def test_quick_cpu_run_writes_json(bench, tmp_path):
    out = tmp_path / "linear.json"
    results = bench.main(["--device", "cpu", "--quick", "--models", "mavit_tiny", "--variants", "zoo", "--sizes", "32",
                          "--json", str(out)])
    row = results["models"][0]
    assert "error" not in row and row["times"]["infer/zoo"]["img_s"] > 0 and row["times"]["train/zoo"]["img_s"] > 0
    assert json.loads(out.read_text())["models"][0]["model"] == "mavit_tiny"
