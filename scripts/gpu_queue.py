"""The ordered queue of GPU work that the CPU sessions left (BENCHMARKS.md), run step by step inside one
device call's time limit.

A device call runs at most 10 minutes, so this runs the named steps in order, each command under the time
that is left, writes one log per step to `--out` (the device tool's `$OUT` by default), stops before a step
whose estimate does not fit, and ends with a summary that names the step to start from next call:

    source .carry_run/setup.sh && python scripts/gpu_queue.py --from kernels --budget 560

`--list` prints the steps with their estimates and commands. Steps that need flash-attn-4 expect it
installed first (`.fa4/NN/install.sh`, see ../shared/tools/fa4-wheels.sh); `multigpu` needs an
`nvidia-h200-x2`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    name: str
    issue: int
    estimate_s: int  # a guess from the last runs of the same commands; the runner refuses a step that does not fit
    commands: tuple[str, ...]


PYTEST = "python -m pytest -q -p no:cacheprovider"
STEPS = (
    Step("kernels", 16, 300, (f"{PYTEST} -m gpu tests/test_kernels_na.py tests/test_kernels_sla.py "
                              "tests/test_kernels_block_sparse.py tests/test_kernels_routing.py",)),
    Step("kernels_linear", 20, 200, (f"{PYTEST} -m gpu tests/test_kernels_linear.py tests/test_kernels_agent.py "
                                     "tests/test_diffusers_agentsd.py",)),
    Step("models_cuda", 18, 240, (f"{PYTEST} tests/test_rmt_linear.py tests/test_nat.py tests/test_biformer.py "
                                  "tests/test_dit.py tests/test_video_dit.py tests/test_model_contract.py",)),
    Step("fuzz", 14, 420, (f"ZOO_FUZZ_EXAMPLES=1000 {PYTEST} -m gpu tests/test_ops_fuzz.py",)),
    Step("fa4_check", 15, 300, ("python scripts/check_fa4.py", f"{PYTEST} -m gpu tests/test_fa4_backend.py")),
    Step("fa4_bench", 15, 420, ("python scripts/benchmark_fa4.py --shape wan480 --dense-lists",
                                "python scripts/benchmark_fa4.py --shape wan720 --shape hunyuan720",
                                "python scripts/benchmark_fa4.py --shape wan480 --sla",
                                "python scripts/benchmark_na.py --only ops --rows na2d_k7,na2d_k13,wan480,hunyuan720")),
    Step("linear_bench", 20, 480, ("python scripts/count_block_ops.py --device cuda",
                                   "python scripts/benchmark_linear.py --variants ref,zoo")),
    Step("linear_compile", 20, 540, (
        "python scripts/benchmark_linear.py --variants ref+compile,zoo+compile "
        "--models swin_tiny_patch4_window7_224,flatten_swin_tiny,agent_swin_tiny",)),
    Step("linear_large", 20, 420, (
        "python scripts/benchmark_linear.py --sizes 512,1024 --models swin_tiny_patch4_window7_224,"
        "agent_swin_tiny,flatten_swin_tiny,inline_swin_tiny,mavit_tiny,ravlt_tiny",)),
    Step("linear_profile", 20, 240, ("python scripts/benchmark_linear.py --profile flatten_swin_tiny",
                                     "python scripts/benchmark_linear.py --profile agent_deit_small")),
    Step("na_bench", 16, 540, ("python scripts/check_na_gpu.py --sweep", "python scripts/benchmark_na.py --only models")),
    Step("plugins", 17, 540, ("python scripts/benchmark_pipelines.py --rows wan1.3b-480p hunyuan-720p --repeats 2 "
                              "--warmup 1",)),
    Step("agentsd", 19, 420, ("python scripts/benchmark_agentsd.py",)),
    Step("multigpu", 21, 540, ("python scripts/multigpu_run.py --mnist mnist8k.npz --out \"$OUT/multigpu\"",
                               f"{PYTEST} -m multigpu tests/test_multigpu.py")),
)


def select(steps: tuple[Step, ...], only: list[str] | None, start: str | None) -> list[Step]:
    """The steps to run: `only` (in queue order), or every step from `start` on, or all."""
    names = [step.name for step in steps]
    for name in (only or []) + ([start] if start else []):
        if name not in names:
            raise SystemExit(f"gpu_queue: unknown step {name!r}; the steps are {', '.join(names)}")
    if only:
        return [step for step in steps if step.name in only]
    return list(steps[names.index(start):]) if start else list(steps)


def run_command(command: str, log, timeout_s: float) -> int:
    """Run `command` in bash from the repo root, its output appended to `log` and echoed; 124 on timeout
    (the whole process group is killed, so the log keeps what it printed)."""
    log.write(f"$ {command}\n")
    log.flush()
    process = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def copy_output() -> None:
        for line in process.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=copy_output)
    reader.start()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = 124
    reader.join()
    if code == 124:
        log.write(f"\n[gpu_queue] killed after {timeout_s:.0f} s\n")
    return code


def run_queue(steps: list[Step], budget_s: float, out: Path) -> list[tuple[str, str]]:
    """Run `steps` in order within `budget_s`; one log per step under `out`. Returns (step, outcome) pairs."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results = []
    for index, step in enumerate(steps):
        left = budget_s - (time.monotonic() - start)
        if step.estimate_s > left:
            results += [(s.name, f"not started: estimate {s.estimate_s} s, {left:.0f} s left") for s in steps[index:]]
            break
        began = time.monotonic()
        codes = []
        with open(out / f"{step.name}.log", "w") as log:
            for command in step.commands:
                left = budget_s - (time.monotonic() - start)
                codes.append(run_command(command, log, left) if left > 1 else 124)
                if codes[-1] == 124:
                    break
        outcome = "passed" if not any(codes) else f"failed (exit codes {codes})"
        results.append((step.name, f"{outcome} in {time.monotonic() - began:.0f} s"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="start", help="run this step and every later one")
    parser.add_argument("--only", help="comma list of steps to run (in queue order)")
    parser.add_argument("--budget", type=float, default=560, help="seconds for the whole call (default 560)")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_queue_out"), help="folder for the logs")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    args = parser.parse_args()
    if args.budget <= 0:
        parser.error(f"--budget must be positive seconds, got {args.budget}")
    steps = select(STEPS, args.only.split(",") if args.only else None, args.start)
    if args.list:
        for step in steps:
            print(f"{step.name} (issue {step.issue}, ~{step.estimate_s} s)")
            for command in step.commands:
                print(f"    {command}")
        return
    results = run_queue(steps, args.budget, Path(args.out))
    print("\n[gpu_queue] summary")
    for name, outcome in results:
        print(f"  {name}: {outcome}")
    waiting = [name for name, outcome in results if outcome.startswith("not started")]
    if waiting:
        print(f"  next call: python scripts/gpu_queue.py --from {shlex.quote(waiting[0])}")


if __name__ == "__main__":
    main()
