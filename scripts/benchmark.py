"""Benchmark zoo's block-sparse attention kernel against dense SDPA and FlexAttention on one GPU.

Every row is timed in the same run on the same GPU as its baselines: dense SDPA with the cuDNN
and the flash backends, and FlexAttention (torch.compile) given the same block mask. Times are
medians of `triton.testing.do_bench` (CUDA events), on random bf16 inputs.

Masks (`--mask`):
  radial  Wan2.1 radial mask rebuilt here from the rule in mit-han-lab/radial-attention
          (radial_attn/attn_mask.py; summarised in the project's reference notes): frames |i-j| <= 1
          dense, key frame 0 dense (sink), other frame pairs a raster band of width
          max(2^bitlen(s) / 2^bitlen(|i-j|) * decay, 128) tokens, pairs thinned when that width
          without decay is under 128 (kept iff |i-j| mod floor(128 / width) == 0). Reduction to
          128 x 128 blocks: a block is kept iff more than 60% of its nonzero key columns have
          density > 1/3. APPROXIMATION: the official code reduces each frame pair on its own
          canvas and ORs the pairs; here the reduction runs on the whole token mask, so a block
          that straddles two frames may differ. Replace with `zoo.ops.radial_block_mask` once merged.
  band    a block band |qb - kb| <= w with w set to reach `--density`.
  dense   every block listed (the kernel as a plain flash-attention kernel).

Targets (issue 7, one H100, bf16), checked and printed as MET / MISSED:
  radial forward: >= 0.8 x (1 / block density) faster than dense cuDNN, >= 2x faster than Flex;
  dense lists: effective TFLOP/s >= 85% of FlexAttention dense.

Example: python scripts/benchmark.py --mask radial --mask dense --out results.json
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from zoo.ops import block_mask_to_indices, block_sparse_attention, block_sparse_layout
from zoo.ops.block_sparse import kernel as bsk

SHAPES = {  # name: (batch, heads, frames, tokens per frame, head_dim)
    "wan480": (1, 12, 21, 30 * 52, 128),  # Wan2.1-1.3B 480x832, 81 frames: 32,760 tokens
    "wan720": (1, 12, 21, 45 * 80, 128),  # 720x1280, 81 frames: 75,600 tokens (1.3B head count)
    "hunyuan720": (1, 24, 33, 45 * 80, 128),  # HunyuanVideo 720x1280, 129 frames: 118,800 tokens
}


def wan_radial_block_mask(frames: int, per_frame: int, decay: float, block: int, device, sink: bool = True):
    """Bool [n_blocks, n_blocks] radial block mask (see the module docstring for the rule and the approximation)."""
    n = frames * per_frame
    n_blocks = math.ceil(n / block)
    top = 2 ** per_frame.bit_length()
    dist = torch.arange(frames, device=device)
    g = torch.tensor([d.bit_length() for d in range(frames)], device=device, dtype=torch.float64)
    width_nominal = top / 2.0**g  # without decay
    width = torch.where(width_nominal * decay >= block, width_nominal * decay, torch.full_like(g, block))
    width = torch.where(dist <= 1, torch.full_like(g, per_frame), width)
    thin = torch.clamp(torch.floor(block / width_nominal), min=1).long()
    pair_kept = (width_nominal >= block) | (dist % thin == 0) | (dist <= 1)

    cols = torch.arange(n_blocks * block, device=device)
    col_frame, col_pos, col_valid = cols // per_frame, cols % per_frame, cols < n
    mask = torch.zeros(n_blocks, n_blocks, dtype=torch.bool, device=device)
    for qb in range(n_blocks):
        rows = torch.arange(qb * block, (qb + 1) * block, device=device)
        row_valid = rows < n
        d = (rows[:, None] // per_frame - col_frame[None, :]).abs().clamp_max(frames - 1)
        band = (col_pos[None, :] - rows[:, None] % per_frame).abs() <= width[d]
        tok = band & pair_kept[d]
        if sink:
            tok |= (col_frame == 0)[None, :]
        tok &= row_valid[:, None] & col_valid[None, :]
        density = tok.view(block, n_blocks, block).sum(0).float() / block  # [n_blocks, block] per key column
        nonzero = (density > 0).sum(-1)
        mask[qb] = (density > 1 / 3).sum(-1) > 0.6 * nonzero
    return mask


def band_block_mask(n_blocks: int, density: float, device):
    """Bool [n_blocks, n_blocks] band |qb - kb| <= w, the smallest w reaching `density`."""
    diff = (torch.arange(n_blocks, device=device)[:, None] - torch.arange(n_blocks, device=device)[None, :]).abs()
    for w in range(n_blocks):
        mask = diff <= w
        if mask.float().mean() >= density:
            return mask
    return diff >= 0


def computed_pairs(mask: torch.Tensor, n: int, block: int) -> int:
    """Query-key pairs the kernel computes (partial tail blocks counted by their real size)."""
    sizes = torch.full((mask.shape[0],), block, device=mask.device, dtype=torch.float64)
    sizes[-1] = n - block * (mask.shape[0] - 1)
    return int((sizes[:, None] * sizes[None, :] * mask).sum().item())


def flex_block_mask(mask: torch.Tensor, n: int, block: int) -> BlockMask:
    """The same block mask for FlexAttention: every listed block a full block (no mask_mod), tails by length."""
    n_blocks = mask.shape[0]
    cols = torch.arange(n_blocks, device=mask.device, dtype=torch.int32)
    full = torch.where(mask, cols, cols + n_blocks).sort(-1).values
    full = torch.where(full < n_blocks, full, 0)[None, None].contiguous()
    counts = mask.sum(-1, dtype=torch.int32)[None, None].contiguous()
    empty = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(empty, torch.zeros_like(full), counts, full, BLOCK_SIZE=block, seq_lengths=(n, n))


def bench(fn, warmup=25, rep=100) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def fwd_bwd(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad)
    return run


def run_mask(name, mask, shape, dtype, args, flex, results):
    batch, heads, n, dim = shape
    block = args.block
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(batch, heads, n, dim, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    indices = block_mask_to_indices(mask[None, None])
    pairs = computed_pairs(mask, n, block) * batch * heads
    density = mask.float().mean().item()
    fwd_flops = 4 * pairs * dim
    dense_fwd_flops = 4 * batch * heads * n * n * dim

    layout = block_sparse_layout(n, n, block_indices=indices, block_size=block)

    def ours(a, b, c):  # the public op on a layout checked once (no host sync per call)
        return block_sparse_attention(a, b, c, layout=layout)

    def ours_lists(a, b, c):  # the public op on raw lists: checks them per call (one host sync)
        return block_sparse_attention(a, b, c, block_indices=indices, block_size=block)

    flex_mask = None if name == "dense" else flex_block_mask(mask, n, block)

    def flex_fn(a, b, c):
        return flex(a, b, c, block_mask=flex_mask)

    def sdpa(backend):
        def f(a, b, c):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(a, b, c)
        return f

    fns = {"ours": ours, "ours_lists": ours_lists, "flex": flex_fn, "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
           "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    with torch.no_grad():  # the same function: our output against FlexAttention's
        ref = fns["flex"](q, k, v).float()
        agree = (fns["ours"](q, k, v).float() - ref).abs().max().item()
    print(f"  max |ours - flex| = {agree:.3g} (bf16 outputs)")
    times = {}
    for mode in args.modes:
        for key, fn in fns.items():
            if mode == "fwd":
                with torch.no_grad():
                    t = bench(lambda fn=fn: fn(q, k, v))
            else:
                t = bench(fwd_bwd(fn, leaves, do))
            times[(mode, key)] = t
    row = {"mask": name, "shape": list(shape), "max_abs_diff_vs_flex": agree, "dtype": str(dtype), "block": block,
           "block_density": density,
           "pair_density": pairs / (batch * heads * n * n), "times_ms": {f"{m}/{k}": t for (m, k), t in times.items()}}
    for mode in args.modes:
        mult = 1.0 if mode == "fwd" else 3.5  # backward counted as 2.5x forward (FlashAttention convention)
        t_ours = times[(mode, "ours")]
        row[f"{mode}_tflops_ours"] = mult * fwd_flops / t_ours / 1e9
        flex_flops = fwd_flops if flex_mask is not None else dense_fwd_flops
        row[f"{mode}_tflops_flex"] = mult * flex_flops / times[(mode, "flex")] / 1e9
        for key in ("sdpa_cudnn", "sdpa_flash", "flex", "ours_lists"):
            row[f"{mode}_speedup_vs_{key}"] = times[(mode, key)] / t_ours
    targets = []
    if name == "dense":
        for mode in args.modes:
            ratio = row[f"{mode}_tflops_ours"] / row[f"{mode}_tflops_flex"]
            targets.append((f"{mode}: TFLOP/s >= 0.85 x FlexAttention dense", ratio, ratio >= 0.85))
    elif "fwd" in args.modes:
        need = 0.8 / density
        got = row["fwd_speedup_vs_sdpa_cudnn"]
        targets.append((f"fwd: >= 0.8/density = {need:.2f}x faster than cuDNN dense", got, got >= need))
        got = row["fwd_speedup_vs_flex"]
        targets.append(("fwd: >= 2x faster than FlexAttention, same mask", got, got >= 2.0))
    row["targets"] = [{"target": t, "value": v, "met": m} for t, v, m in targets]
    results.append(row)

    print(f"\n== mask {name}  shape {shape}  block density {density:.4f}  pair density {row['pair_density']:.4f}")
    for mode in args.modes:
        print(f"  {mode:6s} " + "  ".join(f"{k} {times[(mode, k)]:.3f} ms" for k in fns))
        print(f"  {mode:6s} ours {row[f'{mode}_tflops_ours']:.0f} TFLOP/s (computed), "
              f"flex {row[f'{mode}_tflops_flex']:.0f};"
              f" speedup vs cuDNN {row[f'{mode}_speedup_vs_sdpa_cudnn']:.2f}x, vs flash "
              f"{row[f'{mode}_speedup_vs_sdpa_flash']:.2f}x, vs flex {row[f'{mode}_speedup_vs_flex']:.2f}x")
    for t, v, m in targets:
        print(f"  TARGET {'MET   ' if m else 'MISSED'} {t}: {v:.2f}")


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by --sweep; configs that do not divide the block are skipped
FWD_SWEEP = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 4, 3)]
DQ_SWEEP = [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)]
DKDV_SWEEP = [(64, 128, 8, 3, False), (64, 128, 8, 3, True), (64, 128, 8, 2, True), (32, 128, 8, 3, True),
              (64, 128, 4, 3, True), (128, 128, 8, 2, True), (64, 64, 4, 3, True), (64, 64, 4, 3, False)]


def kernel_report(fn) -> list[str]:
    """Registers, spills and shared memory of every compiled variant of a Triton kernel."""
    lines = []
    for caches in fn.device_caches.values():
        for ck in caches[0].values():
            md = ck.metadata
            consts = {k: v for k, v in getattr(ck.src, "constants", {}).items() if "BLOCK" in str(k)}
            lines.append(f"  {fn.__name__}: regs {ck.n_regs} spills {ck.n_spills} warps {md.num_warps} "
                         f"stages {md.num_stages} smem {md.shared} {consts}")
    return lines


def sweep(mask, shape, dtype, block, results):
    """Time each kernel alone over tile / warp / stage settings (prints, and stores, the table)."""
    batch, heads, n, dim = shape
    q, k, v, do = (torch.randn(batch, heads, n, dim, device="cuda", dtype=dtype) for _ in range(4))
    lay = block_sparse_layout(n, n, block_mask=mask[None, None], block_size=block)
    idx, cnt, t_idx, t_cnt = lay.indices, lay.counts, lay.t_indices, lay.t_counts
    scale = dim**-0.5
    base = bsk.default_config(block, block, dim)
    o, lse = bsk.forward(q, k, v, idx, cnt, block, block, scale)
    rows = []
    for bm, bn, w, s in FWD_SWEEP:
        cfg = dict(base, fwd=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s))
        try:
            t = bench(lambda cfg=cfg: bsk.forward(q, k, v, idx, cnt, block, block, scale, cfg))
        except Exception as err:  # a config that does not fit (shared memory): record and go on
            t = float("nan")
            print("  fwd", cfg["fwd"], "failed:", str(err).splitlines()[0][:120])
        rows.append(("fwd", cfg["fwd"], t))
    delta = bsk.launch_delta(do, o, None)
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "KV_AS_B")
    first = {}
    for kind, settings in (("dq", DQ_SWEEP), ("dkdv", DKDV_SWEEP)):
        for setting in settings:
            cfg = dict(zip(keys, setting))
            if kind == "dq":
                fn = lambda cfg=cfg: bsk.launch_dq(do, q, k, v, lse, delta, idx, cnt, block, block, scale, cfg)
            else:
                fn = lambda cfg=cfg: bsk.launch_dkdv(do, q, k, v, lse, delta, t_idx, t_cnt, block, block, scale, cfg)
            report = dict(cfg)
            try:
                out = fn()  # every setting must give the first setting's gradients (up to summation order)
                out = torch.cat([o.flatten().float() for o in (out if isinstance(out, tuple) else (out,))])
                first.setdefault(kind, out)
                report["max_diff_vs_first"] = (out - first[kind]).abs().max().item()
                t = bench(fn)
            except Exception as err:
                t = float("nan")
                print(" ", kind, cfg, "failed:", str(err).splitlines()[0][:120])
            rows.append((kind, report, t))
    rows.append(("delta", {}, bench(lambda: bsk.launch_delta(do, o, None))))
    t_layout = bench(lambda: block_sparse_layout(n, n, block_mask=mask[None, None], block_size=block))
    print(f"\n== sweep ({shape}, block density {mask.float().mean().item():.3f}); building the layout "
          f"{t_layout:.3f} ms")
    for kind, cfg, t in rows:
        print(f"  {kind} {t:8.3f} ms  {cfg}")
    for fn in (bsk._fwd_kernel, bsk._bwd_dq_kernel, bsk._bwd_dkdv_kernel):
        try:
            print("\n".join(kernel_report(fn)))
        except Exception as err:  # the cache layout is Triton-internal: report, do not fail the benchmark
            print("  kernel report unavailable:", err)
    results.append({"sweep": [{"kernel": k, "config": c, "ms": t} for k, c, t in rows], "shape": list(shape)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wan480", choices=sorted(SHAPES))
    parser.add_argument("--mask", action="append", choices=["radial", "band", "dense"],
                        help="repeatable; default: radial and dense")
    parser.add_argument("--decay", type=float, default=0.2, help="radial decay factor")
    parser.add_argument("--density", type=float, default=0.45, help="target block density of --mask band")
    parser.add_argument("--block", type=int, default=128, choices=[64, 128])
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--sweep", action="store_true", help="also time the kernels over launch settings")
    parser.add_argument("--head-dim", type=int, help="override the shape's head_dim (heads scaled to keep the width)")
    parser.add_argument("--sweep-only", action="store_true", help="only the --sweep tables, no baselines")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    batch, heads, frames, per_frame, dim = SHAPES[args.shape]
    if args.head_dim:
        heads, dim = heads * dim // args.head_dim, args.head_dim
    n = frames * per_frame
    shape = (batch, heads, n, dim)
    dtype = torch.bfloat16
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; shape {args.shape} {shape} bf16")
    flex = torch.compile(flex_attention, dynamic=False)
    n_blocks = math.ceil(n / args.block)
    results = []
    for name in args.mask or ["radial", "dense"]:
        if name == "radial":
            mask = wan_radial_block_mask(frames, per_frame, args.decay, args.block, "cuda",
                                         sink=not args.shape.startswith("hunyuan"))
        elif name == "band":
            mask = band_block_mask(n_blocks, args.density, "cuda")
        else:
            mask = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device="cuda")
        if args.sweep or args.sweep_only:
            sweep(mask, shape, dtype, args.block, results)
        if not args.sweep_only:
            run_mask(name, mask, shape, dtype, args, flex, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                       "shape_name": args.shape, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
