"""`zoo bench op|model ...`: the kernel/model benchmark table (scripts/benchmark.py) from the `zoo` command."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from . import CliError


def benchmark_script() -> Path:
    """scripts/benchmark.py of the source checkout this zoo is installed from."""
    import zoo

    path = Path(zoo.__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    if not path.is_file():
        raise CliError(f"zoo bench needs scripts/benchmark.py from a source checkout (looked at {path}); "
                       "install attnzoo from its git repository with `pip install -e .`")
    return path


def cmd_bench(args: argparse.Namespace) -> int:
    script = benchmark_script()
    argv = sys.argv
    sys.argv = [str(script), args.what, *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = argv
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ._common import HelpFormatter

    p = sub.add_parser("bench", help="benchmark ops or models on GPU (ratios against baselines)",
                       description="Run the benchmark table of scripts/benchmark.py: `op` times the attention kernels "
                       "against SDPA / FlexAttention, `model` times whole models. Arguments after op/model go to the script "
                       "(`zoo bench op --help` lists them).",
                       epilog="""examples:
  zoo bench op --help
  zoo bench op
  zoo bench model""", formatter_class=HelpFormatter)
    p.add_argument("what", choices=["op", "model"], help="what to benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for scripts/benchmark.py")
    p.set_defaults(func=cmd_bench)
