"""Time the flash-attn-4 backend against dense cuDNN, dense flash-attn-4, FlexAttention and the zoo's Triton kernel.

Radial masks (`zoo.ops.radial_block_mask`, decay 0.2, 128 x 128 blocks) at Wan2.1 480p and 720p and HunyuanVideo
720p x 129 frames with its 256 text tokens (shapes of scripts/benchmark.py), bf16, forward and forward+backward,
every row in the same run on the same GPU (`triton.testing.do_bench` medians):

  cudnn       dense SDPA, cuDNN backend
  fa4_dense   dense flash-attn-4 (`zoo.ops.dense_attention(backend="fa4")`)
  flex        FlexAttention (torch.compile) with the same blocks as full blocks
  triton      `zoo.ops.block_sparse_attention(layout=..., backend="triton")` (the portable path; kept as a row)
  fa4         `zoo.ops.block_sparse_attention(layout=..., backend="fa4")`
  triton_dense_lists / fa4_dense_lists (`--dense-lists`): every block listed

Targets (issue 15, one H200), printed as TARGET MET / MISSED:
  fa4 fwd >= 1.05 / density x faster than cuDNN dense; fwd+bwd >= 0.9 / density (block density of the mask);
  fa4 >= 1.5x FlexAttention with the same mask, fwd and fwd+bwd;
  dense lists: fa4_dense_lists within 95% of dense flash-attn-4 (time ratio >= 0.95).

SLA (`--sla`, the SLA paper's kernel shape B 2, H 16, N 32,760, head_dim 128, topk 0.05, 128 x 128 blocks, softmax
feature map, linear branch on the marginal blocks): the fused Triton SLA kernel (`zoo.ops.sparse_linear_attention`)
against flash-attn-4 block sparsity on the critical blocks plus the separate PyTorch linear branch and projection
(`sla_fa4`), forward and forward+backward, with the max |difference| of their outputs; keep the faster per GPU.

HunyuanVideo's dense rows take seconds per call: run one shape per command on a time-limited machine.

    source .fa4/01/install.sh
    python scripts/benchmark_fa4.py --shape wan480 --dense-lists --out fa4_wan480.json
    python scripts/benchmark_fa4.py --shape wan720 --out fa4_wan720.json
    python scripts/benchmark_fa4.py --shape hunyuan720 --out fa4_hunyuan720.json
    python scripts/benchmark_fa4.py --sla --out fa4_sla.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention
from zoo.ops import (
    block_sparse_attention,
    block_sparse_layout,
    dense_attention,
    radial_block_mask,
    sla_block_map,
    sparse_linear_attention,
)
from zoo.ops.block_sparse import fa4
from zoo.ops.sla import naive as sla_naive

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchmark as base  # noqa: E402  (scripts/benchmark.py: shapes, Flex block mask, timing helpers)

TEXT_TOKENS = {"hunyuan720": 256}  # HunyuanVideo's joint attention appends its text tokens
BLOCK = 128


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(base.SHAPES),
                        help="repeatable; default wan480")
    parser.add_argument("--decay", type=float, default=0.2, help="radial decay factor")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--dense-lists", action="store_true",
                        help="also time every block listed (zoo Triton and FA4) against dense flash-attn-4")
    parser.add_argument("--sla", action="store_true", help="time SLA: fused Triton kernel vs FA4 + linear branch")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.modes = args.modes.split(",")
    if not set(args.modes) <= {"fwd", "fwdbwd"}:
        parser.error(f"--modes takes a comma list of fwd, fwdbwd; got {','.join(args.modes)!r}")
    args.shape = args.shape or ([] if args.sla else ["wan480"])
    return args


def targets(times: dict, density: float, modes: list[str]) -> list[tuple[str, float, bool]]:
    """(target, value, met) of issue 15 from `times[(mode, row)]` in ms."""
    out = []
    for mode in modes:
        need = (1.05 if mode == "fwd" else 0.9) / density
        got = times[(mode, "cudnn")] / times[(mode, "fa4")]
        out.append((f"{mode}: fa4 >= {need:.2f}x (= {1.05 if mode == 'fwd' else 0.9}/density) faster than cuDNN dense",
                    got, got >= need))
        got = times[(mode, "flex")] / times[(mode, "fa4")]
        out.append((f"{mode}: fa4 >= 1.5x faster than FlexAttention, same mask", got, got >= 1.5))
        if (mode, "fa4_dense_lists") in times:
            got = times[(mode, "fa4_dense")] / times[(mode, "fa4_dense_lists")]
            out.append((f"{mode}: fa4 dense lists within 95% of dense flash-attn-4", got, got >= 0.95))
    return out


def run_shape(name: str, args, flex, results: list) -> None:
    batch, heads, frames, per_frame, dim = base.SHAPES[name]
    text = TEXT_TOKENS.get(name, 0)
    n = frames * per_frame + text
    mask = radial_block_mask(frames, per_frame, decay_factor=args.decay, block_size=BLOCK,
                             model=base.RADIAL_MODEL[name], text_tokens=text).cuda()
    density = mask.float().mean().item()
    pairs = base.computed_pairs(mask, n, BLOCK) * batch * heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    layout = block_sparse_layout(n, n, block_mask=mask[None, None], block_size=BLOCK)
    flex_mask = base.flex_block_mask(mask, n, BLOCK)
    print(f"\n== {name}: shape {(batch, heads, n, dim)} bf16, radial block density {density:.4f}, "
          f"pair density {pairs / (batch * heads * n * n):.4f}", flush=True)
    for backend in ("fa4", "triton"):
        print(f"  {backend}: {fa4.can_run_fa4(q, k, v, BLOCK, BLOCK) if backend == 'fa4' else 'portable path'}")

    def cudnn(a, b, c):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(a, b, c)

    def sparse(backend, lists):
        return lambda a, b, c: block_sparse_attention(a, b, c, layout=lists, backend=backend)

    fns = {"cudnn": cudnn, "fa4_dense": lambda a, b, c: dense_attention(a, b, c, backend="fa4"),
           "flex": lambda a, b, c: flex(a, b, c, block_mask=flex_mask),
           "triton": sparse("triton", layout), "fa4": sparse("fa4", layout)}
    if args.dense_lists:
        full = block_sparse_layout(n, n, block_mask=torch.ones_like(mask)[None, None], block_size=BLOCK)
        fns.update(triton_dense_lists=sparse("triton", full), fa4_dense_lists=sparse("fa4", full))
    with torch.no_grad():
        ref = fns["flex"](q, k, v).float()
        agree = {key: (fns[key](q, k, v).float() - ref).abs().max().item() for key in ("triton", "fa4")}
    print("  max |ours - flex| (bf16 outputs): " + ", ".join(f"{key} {val:.3g}" for key, val in agree.items()))
    times = {}
    for mode in args.modes:
        for key, fn in fns.items():
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        times[(mode, key)] = base.bench(lambda fn=fn: fn(q, k, v))
                else:
                    times[(mode, key)] = base.bench(base.fwd_bwd(fn, leaves, do))
            except Exception as err:  # one failing row (e.g. out of memory) must not lose the others
                print(f"  {mode} {key}: FAILED {type(err).__name__}: {err}")
                times[(mode, key)] = float("nan")
            print(f"  {mode:6s} {key:18s} {times[(mode, key)]:9.3f} ms", flush=True)
    met = targets(times, density, args.modes)
    for target, value, ok in met:
        print(f"  TARGET {'MET   ' if ok else 'MISSED'} {target}: {value:.2f}")
    dense_flops = 4 * batch * heads * n * n * dim
    for mode in args.modes:
        mult = 1.0 if mode == "fwd" else 3.5  # backward counted as 2.5x forward (FlashAttention convention)
        eff = {key: mult * (dense_flops if "dense" in key or key == "cudnn" else 4 * pairs * dim)
               / times[(mode, key)] / 1e9 for key in fns}
        print(f"  {mode:6s} TFLOP/s (computed pairs): " + ", ".join(f"{key} {val:.0f}" for key, val in eff.items()))
    results.append({"shape_name": name, "shape": [batch, heads, n, dim], "text_tokens": text, "decay": args.decay,
                    "block": BLOCK, "block_density": density, "pair_density": pairs / (batch * heads * n * n),
                    "max_abs_diff_vs_flex": agree, "times_ms": {f"{m}/{k}": t for (m, k), t in times.items()},
                    "targets": [{"target": t, "value": v, "met": ok} for t, v, ok in met]})


def sla_fa4(q, k, v, weight, bias, block_map, critical_layout, eps=1e-5, backend="fa4"):
    """SLA as flash-attn-4 on the critical blocks + the reference's linear branch (softmax feature map, marginal
    blocks) and projection: `sparse_linear_attention`'s unfused path with the sparse branch on `backend`."""
    o_s = block_sparse_attention(q, k, v, layout=critical_layout, backend=backend)
    phi, acc = sla_naive.FEATURE_MAPS["softmax"], torch.promote_types(q.dtype, torch.float32)
    block_q, block_k = critical_layout.block_q, critical_layout.block_k
    o_l = sla_naive._linear_branch(phi(q.to(acc)), phi(k.to(acc)), v.to(acc), block_map == sla_naive.MARGINAL,
                                   block_q, block_k, eps)
    return (o_s.to(acc) + F.linear(o_l, weight.to(acc), bias.to(acc))).to(q.dtype)


def run_sla(args, results: list) -> None:
    batch, heads, n, dim, block = 2, 16, 32760, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    weight = torch.randn(dim, dim, device="cuda", generator=gen) * dim**-0.5
    bias = torch.zeros(dim, device="cuda")
    block_map = sla_block_map(q, k, 0.05, 0.0, block)
    critical = block_sparse_layout(n, n, block_mask=block_map == sla_naive.CRITICAL, block_size=block)
    density = (block_map == sla_naive.CRITICAL).float().mean().item()
    print(f"\n== SLA: shape {(batch, heads, n, dim)} bf16, blocks {block}, critical density {density:.4f}", flush=True)
    fns = {"sla_fused": lambda a, b, c: sparse_linear_attention(a, b, c, weight, bias, block_size=block,
                                                                block_map=block_map),
           "sla_fa4": lambda a, b, c: sla_fa4(a, b, c, weight, bias, block_map, critical)}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        diff = (fns["sla_fused"](q, k, v).float() - fns["sla_fa4"](q, k, v).float()).abs().max().item()
    print(f"  max |sla_fused - sla_fa4| (bf16 outputs): {diff:.3g}")
    times = {}
    for mode in args.modes:
        for key, fn in fns.items():
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        times[f"{mode}/{key}"] = base.bench(lambda fn=fn: fn(q, k, v))
                else:
                    times[f"{mode}/{key}"] = base.bench(base.fwd_bwd(fn, leaves, do))
            except Exception as err:
                print(f"  {mode} {key}: FAILED {type(err).__name__}: {err}")
                times[f"{mode}/{key}"] = float("nan")
            print(f"  {mode:6s} {key:10s} {times[f'{mode}/{key}']:9.3f} ms", flush=True)
        faster = "sla_fa4" if times[f"{mode}/sla_fa4"] < times[f"{mode}/sla_fused"] else "sla_fused"
        print(f"  {mode}: faster on this GPU: {faster} "
              f"(fused / fa4 = {times[f'{mode}/sla_fused'] / times[f'{mode}/sla_fa4']:.2f})")
    results.append({"sla": True, "shape": [batch, heads, n, dim], "block": block, "critical_density": density,
                    "max_abs_diff_fused_vs_fa4": diff, "times_ms": times})


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() or base.triton is None:
        raise SystemExit("the benchmark times CUDA kernels: it needs a CUDA GPU and Triton")
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {base.triton.__version__}; "
          f"flash-attn-4 {fa4.fa4_version()}")
    flex = torch.compile(flex_attention, dynamic=False)
    results = []
    for name in args.shape:
        run_shape(name, args, flex, results)
    if args.sla:
        run_sla(args, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "triton": base.triton.__version__,
                       "flash_attn_4": fa4.fa4_version(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
