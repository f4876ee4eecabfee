"""scripts/bench_tma.py without a GPU: every variant it times runs (under Triton's interpreter, at a small
size) and gives the pointer kernel's output, so the GPU run does not stop on a script error."""
import json
import sys

import torch
from interpreter import run_interpreter
from script_modules import load_script


def test_every_variant_runs_and_matches_the_pointer_kernel():
    rows = run_interpreter(__file__, [])
    assert [r["variant"] for r in rows][0] == "pointer 8w 3s" and len(rows) > 5
    for row in rows:
        assert "error" not in row, row
        assert row["lse_inf_match"] and row["max_abs_diff_lse"] < 1e-4, row
        assert row["max_abs_diff_out"] < 2e-3, row  # float16 rounding of a different summation order (tiles)
    assert any(r["fwd"].get("TMA") for r in rows) and not all(r["fwd"].get("TMA") for r in rows)


if __name__ == "__main__":  # interpreter subprocess: the script's variants at a small size

    bench = load_script("bench_tma")
    from zoo.ops.block_sparse import kernel as bsk

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 300, 128, generator=gen).half() for _ in range(3))
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])  # an empty row, a tail
    results = []
    bench.run("small", mask, q, k, v, 128, bsk, lambda fn, **kw: (fn(), 1.0)[1], results)
    print(json.dumps(results), file=sys.stdout)
