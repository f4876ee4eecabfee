"""`zoo bench op ...` (the kernel table of scripts/benchmark.py) and `zoo bench model ...` (attention backends in a model)."""
from __future__ import annotations

import argparse
import runpy
import sys
import time
from pathlib import Path

from . import CliError


def benchmark_script() -> Path:
    """scripts/benchmark.py of the source checkout this zoo is installed from."""
    import zoo

    path = Path(zoo.__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    if not path.is_file():
        raise CliError(f"zoo bench op needs scripts/benchmark.py from a source checkout (looked at {path}); "
                       "install attnzoo from its git repository with `pip install -e .`")
    return path


def bench_op(rest: list[str]) -> int:
    script = benchmark_script()
    argv = sys.argv
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own refusal (e.g. no CUDA GPU) is a message: pass it on
        if isinstance(e.code, str):
            raise CliError(e.code) from None
        return 0 if e.code is None else e.code
    finally:
        sys.argv = argv
    return 0


def bench_model(rest: list[str]) -> int:
    """Median forward time of one generator with each attention backend, and the ratio to dense."""
    import torch

    import zoo
    from zoo.dit import attention_backends

    from . import ArgumentParser
    from ._common import check_model_name, check_na_kernel, device_of, number

    p = ArgumentParser(prog="zoo bench model", description=bench_model.__doc__)
    p.add_argument("--model", default="video_dit_s_2", help="a generator (video_dit_* for radial)")
    p.add_argument("--attention", nargs="+", default=["dense", "radial", "sla"], choices=attention_backends(),
                   help="backends (zoo.dit.attention_backends()); the first is the baseline")
    p.add_argument("--input-size", type=number(int, 1), nargs="+", default=None, help="model input_size: frames height width of a video DiT (e.g. 16 32 32), or one size of an image DiT")
    p.add_argument("--batch-size", type=number(int, 1), default=1)
    p.add_argument("--repeats", type=number(int, 1), default=10)
    p.add_argument("--na-kernel", type=number(int, 1), nargs="+", default=[7], metavar="K",
                   help="kernel_size of na: one for every axis, or one per axis (default: 7)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    args = p.parse_args(rest)
    check_model_name(args.model, kind="generator")
    device = device_of(args)
    kwargs = {"input_size": args.input_size[0] if len(args.input_size) == 1 else tuple(args.input_size)} if args.input_size else {}
    na_kernel = args.na_kernel[0] if len(args.na_kernel) == 1 else tuple(args.na_kernel)
    models = {}
    for attention in args.attention:  # every backend built (and refused) before any is timed
        options = {"attention_kwargs": {"kernel_size": na_kernel}} if attention == "na" else {}
        try:
            models[attention] = zoo.create_model(args.model, attention=attention, **options, **kwargs).eval()
        except (ImportError, ValueError, TypeError) as e:
            raise CliError(f"--attention {attention}: {e}" + (" (--na-kernel sets it)" if attention == "na" else "")) from None
        if attention == "na":
            check_na_kernel(models[attention], args.na_kernel, args.model)
    base = None
    print(f"{args.model} batch {args.batch_size} on {device} (median of {args.repeats}, bf16 autocast on CUDA)")
    for attention in args.attention:
        model = models.pop(attention).to(device)
        inputs = tuple(t.to(device) if t is not None else None for t in model.example_inputs(args.batch_size))
        times = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for i in range(args.repeats + 2):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(*inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:  # warm-up
                    times.append(time.perf_counter() - start)
        median = sorted(times)[len(times) // 2]
        base = base or median
        print(f"  {attention:8s} {median * 1e3:9.2f} ms   {base / median:5.2f}x vs {args.attention[0]}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return bench_op(args.rest) if args.what == "op" else bench_model(args.rest)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ._common import HelpFormatter

    p = sub.add_parser("bench", help="benchmark kernels or models on GPU (ratios against baselines)",
                       description="`op` runs scripts/benchmark.py (the block-sparse kernel against SDPA and FlexAttention; "
                       "its flags follow). `model` times a generator's forward with each attention backend and prints the "
                       "ratio to the first one.",
                       epilog="""examples:
  zoo bench op --mask radial --mask dense --out results.json
  zoo bench op --help
  zoo bench model --model video_dit_s_2 --attention dense radial sla --input-size 16 32 32
  zoo bench model --help""", formatter_class=HelpFormatter)
    p.add_argument("what", choices=["op", "model"], help="what to benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=cmd_bench)
