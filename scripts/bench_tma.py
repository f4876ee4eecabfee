"""Time the block-sparse forward through TMA descriptors against the pointer kernel (one H100, bf16).

Shape: Wan2.1 480p self-attention, B 1, H 12, N 32,760 (21 frames x 1560 tokens), head_dim 128, blocks
of 128; masks: the radial mask (`zoo.ops.radial_block_mask(21, 1560, decay_factor=0.2, block_size=128,
model="wan")`) and the dense lists. Each variant is a forward config of `zoo.ops.block_sparse.kernel`
with `triton.testing.do_bench` (median), checked against the pointer kernel's output and logsumexp
(max |diff|), and reported with its compiled registers / spills / warps / shared memory. A variant that
fails to compile or launch is printed and skipped. (Variants with Triton's Hopper warp specialisation
were timed once and dropped: their logsumexp was wrong on the H100, BENCHMARKS.md.) TFLOP/s: 4 x computed query-key pairs x head_dim / time (partial tail blocks by their size).

Run from the repository root with the package installed:  python scripts/bench_tma.py [--out tma.json]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

# (label, fwd config overrides): the pointer kernel (the reference of the diff columns) first
VARIANTS = [
    ("pointer 8w 3s", dict(TMA=False)),
    ("pointer 8w 2s", dict(TMA=False, num_stages=2)),
    ("tma 128x128 8w 3s", dict(TMA=True)),
    ("tma 128x128 8w 2s", dict(TMA=True, num_stages=2)),
    ("tma 128x128 4w 2s", dict(TMA=True, num_warps=4, num_stages=2)),
    ("tma 128x128 4w 3s", dict(TMA=True, num_warps=4, num_stages=3)),
    ("tma 128x64 8w 3s", dict(TMA=True, BLOCK_N=64)),
    ("tma 128x64 4w 3s", dict(TMA=True, BLOCK_N=64, num_warps=4)),
    ("tma 128x64 8w 4s", dict(TMA=True, BLOCK_N=64, num_stages=4)),
]

REPORTS: dict[str, str] = {}  # variant label -> compiled-kernel report


def computed_pairs(mask: torch.Tensor, n: int, block: int) -> int:
    """Query-key pairs the kernel computes (partial tail blocks counted by their real size)."""
    sizes = torch.full((mask.shape[0],), block, device=mask.device, dtype=torch.float64)
    sizes[-1] = n - block * (mask.shape[0] - 1)
    return int((sizes[:, None] * sizes[None, :] * mask).sum().item())


def compiled_kernels(*fns) -> dict:
    """id -> compiled kernel, over every variant these Triton functions compiled so far ({} where the cache
    layout, Triton-internal, is not the one read here)."""
    out = {}
    try:
        for fn in fns:
            for caches in fn.device_caches.values():
                for ck in caches[0].values():
                    out[id(ck)] = ck
    except (AttributeError, IndexError, KeyError, TypeError):
        return {}
    return out


def describe(ck) -> str:
    md = ck.metadata
    return f"regs {ck.n_regs} spills {ck.n_spills} warps {md.num_warps} stages {md.num_stages} smem {md.shared}"


def run(mask_name, mask, q, k, v, block, bsk, do_bench, results):
    """Time every variant of `VARIANTS` on one block mask `[nQb, nKb]`; append a row per variant to `results`."""
    batch, heads, n, dim = q.shape
    layout_start = time.time()
    from zoo.ops import block_sparse_layout

    lay = block_sparse_layout(n, n, block_mask=mask[None, None], block_size=block)
    idx, cnt = lay.indices, lay.counts
    scale = dim**-0.5
    flops = 4 * computed_pairs(mask, n, block) * batch * heads * dim
    base = bsk.default_config(block, block, dim)
    pointer = dict(base, fwd=dict(base["fwd"], TMA=False))
    o_ref, lse_ref = bsk.forward(q, k, v, idx, cnt, block, block, scale, pointer)
    finite = torch.isfinite(lse_ref)
    print(f"\n== {mask_name}: block density {mask.float().mean().item():.3f}, {flops / 1e12:.2f} TFLOP computed "
          f"(layout {time.time() - layout_start:.1f} s); default fwd config {base['fwd']}")
    print(f"  {'variant':24s} {'ms':>8s} {'TFLOP/s':>8s} {'|o-ptr|':>9s} {'|lse-ptr|':>9s}  compiled")
    for label, overrides in VARIANTS:
        cfg = dict(base, fwd=dict(base["fwd"], **overrides))
        before = compiled_kernels(bsk._fwd_kernel, bsk._fwd_kernel_tma)
        row = {"mask": mask_name, "variant": label, "fwd": cfg["fwd"]}
        try:
            o, lse = bsk.forward(q, k, v, idx, cnt, block, block, scale, cfg)
            if q.is_cuda:  # surface a launch failure here, as this variant's
                torch.cuda.synchronize()
            row["max_abs_diff_out"] = (o.float() - o_ref.float()).abs().max().item()
            row["max_abs_diff_lse"] = (lse[finite] - lse_ref[finite]).abs().max().item()
            row["lse_inf_match"] = bool(torch.equal(torch.isfinite(lse), finite))
            row["ms"] = do_bench(lambda cfg=cfg: bsk.forward(q, k, v, idx, cnt, block, block, scale, cfg),
                                 warmup=25, rep=100, return_mode="median")
            row["tflops"] = flops / row["ms"] / 1e9
        except Exception as err:  # compile or launch failure (e.g. shared memory): report and go on
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
            print(f"  {label:24s} FAILED {row['error']}")
            results.append(row)
            continue
        new = [ck for key, ck in compiled_kernels(bsk._fwd_kernel, bsk._fwd_kernel_tma).items() if key not in before]
        try:  # a variant compiled for an earlier mask (same constants) reuses that mask's report
            REPORTS[label] = "; ".join(describe(ck) for ck in new) or REPORTS.get(label, "(no report)")
        except Exception as err:  # compiled-kernel attributes are Triton-internal: report, do not fail
            REPORTS[label] = f"report unavailable: {err}"
        row["compiled"] = REPORTS[label]
        flag = "" if row["lse_inf_match"] else "  LSE -inf ROWS DIFFER"
        print(f"  {label:24s} {row['ms']:8.3f} {row['tflops']:8.1f} {row['max_abs_diff_out']:9.2e} "
              f"{row['max_abs_diff_lse']:9.2e}  {row['compiled']}{flag}")
        results.append(row)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask", action="append", choices=["radial", "dense"], help="repeatable; default both")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_tma times CUDA kernels: it needs a CUDA GPU")
    import triton
    import triton.testing
    from zoo.ops import radial_block_mask
    from zoo.ops.block_sparse import kernel as bsk

    frames, per_frame, heads, dim, block = 21, 1560, 12, 128, 128
    n = frames * per_frame
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
          f"q/k/v {tuple(q.shape)} bf16; TMA strides ok: {bsk.tma_strides_ok(q, k, v)}")
    results = []
    for name in args.mask or ["radial", "dense"]:
        if name == "radial":
            mask = radial_block_mask(frames, per_frame, decay_factor=0.2, block_size=block, model="wan").cuda()
        else:
            mask = torch.ones(math.ceil(n / block), math.ceil(n / block), dtype=torch.bool, device="cuda")
        run(name, mask, q, k, v, block, bsk, triton.testing.do_bench, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
