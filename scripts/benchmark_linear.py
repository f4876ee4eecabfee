"""Benchmark the linear / agent attention backbones (issue 20) against the window-attention models they replace.

Per model, in the same run on the same GPU, bf16 autocast, channels-last, img/s of inference (eval, no_grad,
batch 128 at 224) and of a training step (forward, cross-entropy, backward, SGD; batch 64 at 224), batches
scaled by (224 / size)^2 at larger sizes, in four variants:
  ref           eager, zoo's ops forced onto their PyTorch references (the models before issue 20)
  ref+compile   torch.compile of that model (the second baseline the issue asks for)
  zoo           eager with the dispatched backends (Triton linear-attention kernel, SDPA agent path)
  zoo+compile   torch.compile with them (the kernels are opaque custom ops: no graph break)
timm's Swin-T/S and DeiT-S run eager and compiled (their `ref`/`zoo` rows are the same model). Every ratio
is taken against the baseline measured in this run. Targets (one H200, bf16), printed as TARGET MET/MISSED:
  Swin-style agent/FLatten/InLine and MAViT/RAVLT tiny/small, best zoo variant: >= 1.0x timm Swin of the same
  size in inference, >= 0.9x in training, and faster than their own ref+compile;
  agent_deit_small >= 0.8x timm DeiT-S; at 512 and 1024 (`--sizes 512,1024`): >= 1.5x Swin.
`--profile MODEL`: torch.profiler of one inference batch of MODEL (zoo variant), the top kernels by device time
and the time inside each block type's attention (record_function ranges opened by module hooks).

What each family's attention block runs (the op inventory behind the kernels; `[B, N, C]` tokens, h heads):
  agent (Swin/PVT/DeiT)  qkv Linear -> chunk (strided views) -> pool_agents: AdaptiveAvgPool2d of q on the grid
      (transpose + reshape + pool + transpose) -> build_agent_biases: 2 bilinear resizes of the 7x7 block biases
      + row/col broadcasts, every training call (inference: built once per grid, aligned) -> split_heads views -> two softmax stages (reference: float32 copies
      and [B, h, n, N] / [B, h, N, n] maps; SDPA path: two fused calls) -> merge_heads copy -> 3x3 depthwise
      conv on v (to_grid transpose copy, conv, back) -> add -> proj Linear.
  FLatten                qkv Linear -> k += bicubic-resized positional encoding -> focused map on q and k stacked,
      over all C (ReLU, softplus temperature, row max, cube, two norms; float32; closed-form backward) -> views -> linear
      attention (kernel: state pass over k, v + query pass; reference: float32 copies, means, two matmuls)
      -> merge_heads (free: the kernel writes token-major) -> 5x5 depthwise conv shared by heads on v viewed
      (B*h, d, H, W) (permute copy) -> add -> proj.
  InLine                 qkv Linear -> injective linear attention on identity features -> token mean of x ->
      two grouped 1x1 Conv1d (+GELU) predicting a 3x3 kernel per sample and channel -> grouped conv2d with
      B*C groups on v -> add -> proj.
  MAViT / RAVLT (NCHW)   1x1 conv qkvo -> split -> 5x5 LePE on v -> [B, h, N, d] views of the channel-major
      maps -> ELU+1 on q and k together -> 2-D RoPE in float32 (numerator features, rounded once) -> MALA / RALA (kernel: the same two passes,
      RALA's softmax key weights computed first in float32) -> transpose back to NCHW -> (y + LePE) * o -> proj.
The fused kernel covers the attention op itself in every family; feature maps, RoPE and the depthwise convs
are elementwise/conv work left to cuDNN and torch.compile (the `zoo+compile` variant fuses them).

The script imports and parses arguments without a GPU; `--device cpu --quick` is a smoke run (tiny batches,
few repetitions). Example:
    python scripts/benchmark_linear.py --json linear.json
    python scripts/benchmark_linear.py --sizes 512,1024 --models swin_tiny_patch4_window7_224,agent_swin_tiny
    python scripts/benchmark_linear.py --profile flatten_swin_tiny
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import zoo.ops.agent as agent_ops
import zoo.ops.linear as linear_ops

from zoo.weights import atomic_path

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from benchmark_na import measure, short_error, target_line  # noqa: E402  (timing, failures as table entries)

SWIN = {"tiny": "swin_tiny_patch4_window7_224", "small": "swin_small_patch4_window7_224"}
DEIT_S = "deit_small_patch16_224"
TIMM_MODELS = (*SWIN.values(), DEIT_S)
# zoo model -> the timm baseline it must outrun and the ratios (inference, training) it needs at 224
ZOO_MODELS = {
    **{f"{family}_{size}": (SWIN[size], 1.0, 0.9) for family in ("agent_swin", "flatten_swin", "inline_swin", "mavit",
                                                                   "ravlt") for size in ("tiny", "small")},
    "agent_deit_small": (DEIT_S, 0.8, 0.8),
    "biformer_tiny": (SWIN["tiny"], None, None),  # in the table; no target (block-sparse, not linear)
}
MODELS = (*TIMM_MODELS, *ZOO_MODELS)
QUICK_MODELS = ("swin_tiny_patch4_window7_224", "flatten_swin_tiny", "agent_swin_tiny", "mavit_tiny")
VARIANTS = ("ref", "ref+compile", "zoo", "zoo+compile")
LARGE_SIZES, LARGE_SIZE_RATIO = (512, 1024), 1.5  # at 512 and 1024 every Swin-style model vs Swin


@contextlib.contextmanager
def reference_ops(active: bool) -> Iterator[None]:
    """Within: zoo's linear and agent ops take their PyTorch references (the kernels' device lists emptied)."""
    saved = linear_ops.KERNEL_DEVICES, agent_ops.SDPA_DEVICES
    if active:
        linear_ops.KERNEL_DEVICES, agent_ops.SDPA_DEVICES = (), ()
    try:
        yield
    finally:
        linear_ops.KERNEL_DEVICES, agent_ops.SDPA_DEVICES = saved


def build_model(name: str, size: int, device: str) -> torch.nn.Module:
    if name in TIMM_MODELS:
        import timm

        model = timm.create_model(name, pretrained=False, img_size=size)
    else:
        import zoo

        model = zoo.create_model(name, **({} if size == 224 or name.startswith(("mavit", "ravlt"))
                                          else {"img_size": size}))
    model = model.to(device)
    try:
        return model.to(memory_format=torch.channels_last)
    except RuntimeError:  # rank-5 parameters (the agent row/column biases) refuse channels_last: keep them as built
        return model


def batches(size: int, quick: bool) -> tuple[int, int]:
    """(inference, training) batch: 128 / 64 at 224, scaled by pixels at larger sizes."""
    if quick:
        return 2, 2
    scale = (224 / size) ** 2
    return max(1, round(128 * scale)), max(1, round(64 * scale))


def run_model(name: str, size: int, args, device: str) -> dict:
    infer_batch, train_batch = batches(size, args.quick)
    row = {"model": name, "size": size, "infer_batch": infer_batch, "train_batch": train_batch, "times": {}}
    try:
        model = build_model(name, size, device)
    except Exception as err:  # noqa: BLE001 - a failure is a table entry
        row["error"] = short_error(err)
        return row
    row["channels_last"] = next((p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()
                                 if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1), True)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(max(infer_batch, train_batch), 3, size, size, device=device, generator=gen)
    images = images.to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (train_batch,), device=device, generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    variants = [v for v in args.variants if name not in TIMM_MODELS or v.startswith("ref")]
    for variant in variants:
        net = torch.compile(model) if variant.endswith("+compile") else model

        def infer(net=net):
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
                net(images[:infer_batch])

        def train_step(net=net):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = F.cross_entropy(net(images[:train_batch]), labels)
            loss.backward()
            optimizer.step()

        with reference_ops(variant.startswith("ref")):
            model.eval()
            measure(row["times"], f"infer/{variant}", infer, device, args.quick)
            model.train()
            measure(row["times"], f"train/{variant}", train_step, device, args.quick)
        torch._dynamo.reset()  # the next variant compiles against its own backends
    for key, entry in row["times"].items():
        if "ms" in entry:
            entry["img_s"] = (infer_batch if key.startswith("infer") else train_batch) / entry["ms"] * 1e3
    return row


def best(row: dict, mode: str, variants=VARIANTS) -> float | None:
    rates = [row["times"].get(f"{mode}/{v}", {}).get("img_s") for v in variants]
    rates = [r for r in rates if r is not None]
    return max(rates) if rates else None


def targets(rows: list[dict]) -> list[dict]:
    """Each zoo model's best zoo variant vs its timm baseline (same size, same run) and vs its own ref+compile."""
    by_key = {(r["model"], r["size"]): r for r in rows}
    checks = []
    for r in rows:
        spec = ZOO_MODELS.get(r["model"])
        if spec is None or spec[1] is None:
            continue
        baseline, need_infer, need_train = spec
        base_row = by_key.get((baseline, r["size"]), {"times": {}})
        if r["size"] == 224:
            needs = (("infer", need_infer), ("train", need_train))
        elif r["size"] in LARGE_SIZES and r["model"] != "agent_deit_small":
            needs = (("infer", LARGE_SIZE_RATIO), ("train", LARGE_SIZE_RATIO))
        else:
            continue
        for mode, need in needs:
            ours, theirs = best(r, mode, ("zoo", "zoo+compile")), best(base_row, mode)
            value = None if ours is None or theirs is None else ours / theirs
            checks.append({"target": f"{r['model']}@{r['size']} {mode} >= {need}x {baseline}", "value": value,
                           "met": None if value is None else value >= need})
            compiled = r["times"].get(f"{mode}/ref+compile", {}).get("img_s")
            value = None if ours is None or compiled is None else ours / compiled
            checks.append({"target": f"{r['model']}@{r['size']} {mode} faster than its ref+compile", "value": value,
                           "met": None if value is None else value > 1.0})
    return checks


def report(rows: list[dict], checks: list[dict]) -> str:
    lines = ["img/s, bf16 autocast, channels-last* | model@size".ljust(48) + "".join(
        f"{mode}/{v}".rjust(19) for mode in ("infer", "train") for v in VARIANTS)]
    for r in rows:
        label = f"  {r['model']}@{r['size']}".ljust(48)
        if "error" in r:
            lines.append(f"{label} ERR {r['error']}")
            continue
        cells = []
        for mode in ("infer", "train"):
            for v in VARIANTS:
                entry = r["times"].get(f"{mode}/{v}")
                cells.append("-" if entry is None else "ERR" if "error" in entry else f"{entry['img_s']:.4g}")
        lines.append(label + "".join(c.rjust(19) for c in cells) + ("" if r.get("channels_last", True) else " *"))
        lines.extend(f"  {r['model']}@{r['size']}: ERR {k}: {v['error']}" for k, v in r["times"].items() if "error" in v)
    if any(not r.get("channels_last", True) for r in rows):
        lines.append("* weights left as built: the model has parameters channels_last refuses (inputs channels-last)")
    lines.extend(target_line(t) for t in checks)
    return "\n".join(lines)


# ---------------------------------------------------------------- profile


ATTENTION_MODULES = ("AgentAttention", "FocusedLinearAttention", "InLineAttention", "RMTAttention", "WindowAttention",
                     "SoftmaxAttention", "Attention")  # ours and timm's


def profile(name: str, args, device: str) -> str:
    """Top kernels of one inference batch and the time inside each attention module type."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    size = args.sizes[0]
    model = build_model(name, size, device).eval()
    images = torch.randn(batches(size, args.quick)[0], 3, size, size, device=device).to(
        memory_format=torch.channels_last)
    ranges: list = []

    def enter(module, _inputs):
        ranges.append(record_function(f"attn::{type(module).__name__}"))
        ranges[-1].__enter__()

    def leave(_module, _inputs, _output):
        ranges.pop().__exit__(None, None, None)

    hooks = []
    for module in model.modules():
        if type(module).__name__ in ATTENTION_MODULES:
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        model(images)  # warm-up (Triton compiles, cuDNN picks algorithms)
        with torch_profile(activities=activities) as prof:
            model(images)
    for hook in hooks:
        hook.remove()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    blocks = [e for e in events if e.key.startswith("attn::")]
    lines = [f"profile {name}@{size} batch {images.shape[0]} ({device})",
             events.table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=60)]
    total = "device_time_total" if device == "cuda" else "cpu_time_total"
    lines += [f"  {e.key:40s} {getattr(e, total) / 1e3:9.3f} ms over {e.count} calls" for e in blocks]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma list (default all): {','.join(MODELS)}")
    parser.add_argument("--sizes", default="224", help="comma list of input sides (default 224; e.g. 224,512,1024)")
    parser.add_argument("--quick", action="store_true", help="tiny batches, few repetitions, a few models (smoke run)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke runs only")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list (default all): {','.join(VARIANTS)}")
    parser.add_argument("--profile", metavar="MODEL", help="profile one inference batch of MODEL instead")
    parser.add_argument("--profile-rows", type=int, default=15, help="kernels listed by --profile (default 15)")
    parser.add_argument("--json", help="write the results as JSON here (atomically)")
    args = parser.parse_args(argv)
    args.models = list(QUICK_MODELS if args.quick else MODELS) if args.models is None else args.models.split(",")
    unknown = [m for m in args.models + ([args.profile] if args.profile else []) if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {','.join(unknown)}: choose from {','.join(MODELS)}")
    args.variants = args.variants.split(",")
    if not set(args.variants) <= set(VARIANTS):
        parser.error(f"--variants must be among {','.join(VARIANTS)}, got {','.join(args.variants)}")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be a comma list of ints, got {args.sizes!r}")
    if any(s % 32 or s < 32 for s in args.sizes):
        parser.error(f"--sizes must be positive multiples of 32 (the backbones' stride), got {args.sizes}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark_linear times CUDA kernels: it needs a CUDA GPU (or --device cpu --quick)")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; quick {args.quick}")
    if args.profile:
        text = profile(args.profile, args, device)
        print(text)
        return {"profile": text}
    rows = []
    for size in args.sizes:
        for model_name in args.models:
            rows.append(run_model(model_name, size, args, device))
            print(f"  done {model_name}@{size}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    checks = targets(rows)
    print(report(rows, checks))
    results = {"device": name, "torch": torch.__version__, "quick": args.quick, "models": rows, "targets": checks}
    if args.json:
        with atomic_path(args.json) as tmp:  # a killed run leaves the old file or the new one
            tmp.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
