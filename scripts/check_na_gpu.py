"""Time the Triton neighborhood-attention kernels on the issue's cases (forward, forward+backward), and with
`--sweep` try a few tile shapes per case (the numbers that `ops/na/kernel.py:default_config` is tuned from).

Correctness is tests/test_kernels_na.py (`pytest -m gpu tests/test_kernels_na.py`); the FlexAttention and SDPA
comparison is scripts/benchmark_na.py. Usage: `python scripts/check_na_gpu.py [--sweep] [--case NAME]`.
"""
from __future__ import annotations

import argparse
import itertools

import torch
from zoo.ops.na import kernel as nak

CASES = {  # name: (batch, spatial, heads, dim, kernel, dilation, rpb)
    "nat_t_stage1": (64, (56, 56), 2, 32, 7, 1, True),
    "nat_t_stage3": (64, (14, 14), 8, 32, 7, 1, True),
    "dinat_t_stage1_dil8": (64, (56, 56), 2, 32, 7, 8, True),
    "na2d_128_k7": (4, (128, 128), 8, 64, 7, 1, False),
    "na2d_128_k13": (4, (128, 128), 8, 64, 13, 1, False),
    "na3d_wan480p": (1, (21, 30, 52), 12, 128, (3, 11, 11), 1, False),
}
SWEEP = {  # candidate (query tile, key tile) per na_dim
    1: [((1, 1, 64), (1, 1, 64)), ((1, 1, 128), (1, 1, 64)), ((1, 1, 128), (1, 1, 128))],
    2: [((1, 8, 8), (1, 8, 8)), ((1, 8, 16), (1, 8, 8)), ((1, 16, 8), (1, 8, 8)), ((1, 8, 16), (1, 8, 16)),
        ((1, 4, 16), (1, 4, 16)), ((1, 16, 16), (1, 8, 8))],
    3: [((2, 4, 8), (2, 4, 8)), ((1, 8, 8), (1, 8, 8)), ((4, 4, 8), (2, 4, 8)), ((2, 8, 8), (2, 4, 8)),
        ((1, 8, 16), (1, 8, 8))],
}


def timed(fn, reps: int = 10) -> float:
    """Median milliseconds of `fn` (after a warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def run_case(name: str, config: dict | None) -> tuple[float, float]:
    batch, spatial, heads, dim, kernel, dilation, with_rpb = CASES[name]
    na_dim = len(spatial)
    pad = 3 - na_dim
    kernel = (kernel,) * na_dim if isinstance(kernel, int) else kernel
    dilation = (dilation,) * na_dim if isinstance(dilation, int) else dilation
    geometry = ((1,) * pad + kernel, (1,) * pad + dilation, (1,) * 3, (False,) * 3)
    q, k, v = (torch.randn(batch, *(1,) * pad, *spatial, heads, dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    rpb = torch.randn(heads, *(2 * kk - 1 for kk in kernel), device="cuda") if with_rpb else None
    scale = dim ** -0.5
    args = (rpb, None, None, *geometry, scale, na_dim)
    fwd = timed(lambda: nak.forward(q, k, v, *args, config=config))
    out, lse = nak.forward(q, k, v, *args, config=config)
    do = torch.randn_like(out)
    bwd = timed(lambda: nak.backward(do, None, q, k, v, out, lse, *args, config=config))
    return fwd, fwd + bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="try the SWEEP tile shapes (forward and backward)")
    parser.add_argument("--case", choices=list(CASES), action="append", help="only these cases")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "bf16")
    for name in args.case or CASES:
        na_dim = len(CASES[name][1])
        fwd, total = run_case(name, None)
        print(f"{name:22s} default   fwd {fwd:8.3f} ms  fwd+bwd {total:8.3f} ms", flush=True)
        if not args.sweep:
            continue
        base = nak.default_config(na_dim, CASES[name][3])
        for (tq, tk), warps in itertools.product(SWEEP[na_dim], (4, 8)):
            tiles = dict(TQ=tq, TK=tk, num_warps=warps, num_stages=2)
            config = dict(base, fwd=tiles, dq=tiles, dkdv=dict(tiles, TQ=tk, TK=tq))
            try:
                fwd, total = run_case(name, config)
            except Exception as err:  # a tile the compiler rejects (shared memory): report, go on
                print(f"{name:22s} {tq} {tk} w{warps}: {type(err).__name__}")
                continue
            print(f"{name:22s} {tq} {tk} w{warps}  fwd {fwd:8.3f} ms  fwd+bwd {total:8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
