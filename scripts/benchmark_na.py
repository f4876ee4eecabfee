"""Benchmark zoo's neighborhood attention (issue 16) against FlexAttention, dense cuDNN SDPA and the reference.

Ops (`--only ops`), same run, same GPU, bf16, heads-last `[B, *spatial, heads, D]` inputs:
  zoo      `zoo.ops.na2d/na3d(..., backend=--zoo-backend)` (default "triton")
  fa4      `zoo.ops.na2d/na3d(..., backend="fa4")`: flash-attn-4 block-sparse with the NA mask_mod
           (token permutation and lists built once per shape, cached, not timed); skipped with a note when
           flash-attn-4 is not importable or the run is not on CUDA
  flex     `zoo.ops.na.flex.na_flex`: torch.compile(flex_attention) with the NA mask_mod (same semantics,
           row-major tokens, block mask built once and cached, not timed)
  cudnn    dense SDPA over all tokens, `sdpa_kernel(SDPBackend.CUDNN_ATTENTION)` (heads-first copies)
  ref      the float32 gather reference `zoo.ops.na.naive`, only when B*H*N*K*(D+Dv) <= --reference-max-macs
Each in fwd (no_grad) and fwd+bwd (autograd.grad of q, k, v), `triton.testing.do_bench` medians, and
peak memory (torch.cuda.max_memory_allocated above the inputs, one call).

Targets (issue 16, one H200, bf16), printed as TARGET MET / MISSED:
  NA2D rows: zoo fwd >= 2x Flex, fwd+bwd >= 1.5x Flex;
  NA3D rows: zoo fwd >= 0.9 / f x faster than dense cuDNN, f = attended query-key pairs / N^2 (exact,
  from the per-axis windows).
Models (`--only models`): img/s of `nat_tiny`, `dinat_tiny`, `nat_small` (zoo) and timm
`swin_tiny_patch4_window7_224`, `convnext_tiny`; inference batch 128 (eval, no_grad), training step
batch 64 (forward, cross-entropy, backward, SGD step); bf16 autocast, channels-last inputs and weights
for every model, 224 x 224; peak training memory. Targets: nat/dinat tiny inference >= 1.0x Swin-T,
training >= 0.9x Swin-T, training peak memory <= Swin-T's.

Every measurement is in its own try/except: a failure (OOM, a missing backend) is recorded in the table
and the run goes on. `--quick`: tiny shapes and batches, few repetitions (a smoke run, CPU or GPU;
on CPU Flex runs eagerly and forward only). The final table is compact (the GPU tool keeps 12,000 chars).

Example: python scripts/benchmark_na.py --only ops --json na_ops.json
         python scripts/benchmark_na.py --only models --json na_models.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import pathlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo.ops.block_sparse.fa4 import fa4_interface
from zoo.ops.na import axis_neighbors, neighborhood_attention
from zoo.ops.na.flex import na_flex

from zoo import ops

try:  # GPU timing; CPU runs time with perf_counter
    import triton.testing
except ImportError:
    triton = None

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import benchmark as base  # noqa: E402  (scripts/benchmark.py: peak_memory)

# name: (kind, batch, spatial, heads, head_dim, kernel, dilation)
OP_ROWS = {
    "nat_t_s1": ("NA2D", 64, (56, 56), 2, 32, 7, 1),  # NAT-T stage 1
    "nat_t_s3": ("NA2D", 64, (14, 14), 8, 32, 7, 1),  # NAT-T stage 3
    "na2d_k7": ("NA2D", 4, (128, 128), 8, 64, 7, 1),
    "na2d_k13": ("NA2D", 4, (128, 128), 8, 64, 13, 1),
    "dinat_t_s1": ("NA2D", 64, (56, 56), 2, 32, 7, 8),  # DiNAT-T stage 1, dilation 8
    "wan480": ("NA3D", 1, (21, 30, 52), 12, 128, (3, 11, 11), 1),  # Wan2.1 480p latent
    "hunyuan720": ("NA3D", 1, (30, 48, 80), 24, 128, (18, 24, 24), 1),  # HunyuanVideo 720p latent
}
QUICK_ROWS = {  # same kinds and features, tiny (dilation with unequal groups, even kernel)
    "nat_t_s1": ("NA2D", 2, (10, 11), 2, 16, 3, 1),
    "dinat_t_s1": ("NA2D", 2, (9, 11), 2, 16, 4, 2),
    "wan480": ("NA3D", 1, (4, 5, 6), 2, 16, (2, 3, 3), 1),
}
MODELS = ("nat_tiny", "dinat_tiny", "nat_small", "swin_tiny_patch4_window7_224", "convnext_tiny")
TIMM_MODELS = {"swin_tiny_patch4_window7_224", "convnext_tiny"}
OPS_BY_DIM = {2: ops.na2d, 3: ops.na3d}


def attended_fraction(spatial, kernel, dilation) -> float:
    """Exact fraction of the N^2 query-key pairs NA attends (product of the per-axis valid pairs)."""
    pairs = 1
    for length, k, d in zip(spatial, kernel, dilation):
        pairs *= int(axis_neighbors(length, k, d, 1, False)[2].sum())
    return pairs / math.prod(spatial) ** 2


def time_ms(fn: Callable, device: str, quick: bool) -> float:
    """Median milliseconds: do_bench (CUDA events) on GPU, perf_counter on CPU."""
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_bytes(fn: Callable, device: str) -> int | None:
    """Bytes allocated by `fn()` above what was allocated before it (GPU only)."""
    return base.peak_memory(fn) if device == "cuda" else None


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return text[:160]


def measure(results: dict, key: str, fn: Callable, device: str, quick: bool) -> None:
    """results[key] = {'ms', 'peak_mib'} or {'error'}: never raises (the table records the failure)."""
    try:
        ms = time_ms(fn, device, quick)
        peak = peak_bytes(fn, device)
        results[key] = {"ms": ms, "peak_mib": None if peak is None else peak / 2**20}
    except Exception as err:  # noqa: BLE001 - any failure becomes a table entry
        results[key] = {"error": short_error(err)}
        if device == "cuda":
            torch.cuda.empty_cache()


def zoo_op(na_dim: int, backend: str) -> Callable:
    op = OPS_BY_DIM[na_dim]
    if "backend" not in inspect.signature(op).parameters:
        raise RuntimeError(f"zoo.ops.na{na_dim}d has no backend= argument in this checkout: merge the Triton NA "
                           "kernel (issue 16) first")
    return lambda q, k, v, kernel, dilation: op(q, k, v, kernel, dilation=dilation, backend=backend)


def fa4_skip_reason(device: str) -> str | None:
    """Why the fa4 column is not measured (not a CUDA run, flash-attn-4 not importable), or None."""
    if device != "cuda":
        return "flash-attn-4 runs on CUDA only"
    interface = fa4_interface()
    return interface if isinstance(interface, str) else None


def op_methods(na_dim: int, args, device: str) -> dict[str, Callable]:
    """name -> f(q, k, v, kernel, dilation) on heads-last tensors (fa4 only when `fa4_skip_reason` is None)."""
    try:  # resolved once: no signature inspection inside the timed calls
        zoo = zoo_op(na_dim, args.zoo_backend)
    except RuntimeError as missing:
        def zoo(q, k, v, kernel, dilation, missing=missing):
            raise missing

    def flex(q, k, v, kernel, dilation):
        return na_flex(q, k, v, na_dim, kernel, dilation, compile=device == "cuda")

    def cudnn(q, k, v, kernel, dilation):  # dense over all tokens; the permutes are views, SDPA copies if needed
        batch, *spatial, heads, dim = q.shape
        qh, kh, vh = (t.reshape(batch, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
        if device != "cuda":
            return F.scaled_dot_product_attention(qh, kh, vh)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qh, kh, vh)

    def ref(q, k, v, kernel, dilation):
        return neighborhood_attention(q, k, v, na_dim, kernel, dilation)

    methods = {"zoo": zoo, "flex": flex, "cudnn": cudnn, "ref": ref}
    if fa4_skip_reason(device) is None:
        methods["fa4"] = zoo_op(na_dim, "fa4")
    return methods


def run_op_row(name: str, spec: tuple, args, device: str) -> dict:
    kind, batch, spatial, heads, dim, kernel, dilation = spec
    na_dim = len(spatial)
    kernel_t = (kernel,) * na_dim if isinstance(kernel, int) else tuple(kernel)
    dil_t = (dilation,) * na_dim if isinstance(dilation, int) else tuple(dilation)
    n = math.prod(spatial)
    fraction = attended_fraction(spatial, kernel_t, dil_t)
    row = {"row": name, "kind": kind, "batch": batch, "spatial": list(spatial), "heads": heads, "head_dim": dim,
           "kernel": list(kernel_t), "dilation": list(dil_t), "attended_fraction": fraction, "times": {},
           "notes": []}
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, *spatial, heads, dim)
    q, k, v, do = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    macs = batch * heads * n * math.prod(kernel_t) * 2 * dim
    methods = op_methods(na_dim, args, device)
    if "fa4" not in methods:
        row["notes"].append(f"fa4 skipped: {fa4_skip_reason(device)}")
    if macs > args.reference_max_macs:
        methods.pop("ref")
        row["notes"].append(f"ref skipped: {macs:.2g} MACs > --reference-max-macs {args.reference_max_macs:.2g}")
    outputs = {}
    for method, fn in methods.items():
        try:  # one forward for the agreement check (also compiles / builds the block mask before timing)
            with torch.no_grad():
                out = fn(q, k, v, kernel_t, dil_t)
            outputs[method] = out.transpose(1, 2).reshape(shape) if method == "cudnn" else out
        except Exception as err:  # noqa: BLE001
            row["times"][f"fwd/{method}"] = row["times"][f"fwdbwd/{method}"] = {"error": short_error(err)}
            continue

        def forward(fn=fn):
            with torch.no_grad():
                fn(q, k, v, kernel_t, dil_t)

        grad = do.reshape(batch, n, heads, dim).transpose(1, 2) if method == "cudnn" else do

        def forward_backward(fn=fn, grad=grad):
            torch.autograd.grad(fn(*leaves, kernel_t, dil_t), leaves, grad)

        measure(row["times"], f"fwd/{method}", forward, device, args.quick)
        measure(row["times"], f"fwdbwd/{method}", forward_backward, device, args.quick)
    base = outputs.get("ref", outputs.get("flex"))
    if base is not None:
        row["max_abs_diff_vs"] = "ref" if "ref" in outputs else "flex"
        row["max_abs_diff"] = {m: (o.float() - base.float()).abs().max().item() for m, o in outputs.items()
                               if m != "cudnn" and o is not base}
    del outputs
    row["targets"] = op_targets(row)
    return row


def ratio(times: dict, slow: str, fast: str) -> float | None:
    a, b = times.get(slow, {}).get("ms"), times.get(fast, {}).get("ms")
    return None if a is None or b is None else a / b


def op_targets(row: dict) -> list[dict]:
    t = row["times"]
    if row["kind"] == "NA2D":
        checks = [("fwd: zoo >= 2x FlexAttention", ratio(t, "fwd/flex", "fwd/zoo"), 2.0),
                  ("fwd+bwd: zoo >= 1.5x FlexAttention", ratio(t, "fwdbwd/flex", "fwdbwd/zoo"), 1.5)]
    else:
        need = 0.9 / row["attended_fraction"]
        checks = [(f"fwd: zoo >= 0.9/f = {need:.2f}x dense cuDNN (f = {row['attended_fraction']:.4f})",
                   ratio(t, "fwd/cudnn", "fwd/zoo"), need)]
    return [{"target": text, "value": value, "met": None if value is None else value >= need}
            for text, value, need in checks]


# ---------------------------------------------------------------- models


def build_model(name: str, device: str) -> torch.nn.Module:
    if name in TIMM_MODELS:
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        import zoo

        model = zoo.create_model(name)
    return model.to(device=device, memory_format=torch.channels_last)


def run_model(name: str, args, device: str) -> dict:
    infer_batch, train_batch = (2, 2) if args.quick else (128, 64)
    row = {"model": name, "infer_batch": infer_batch, "train_batch": train_batch, "times": {}}
    try:
        model = build_model(name, device)
    except Exception as err:  # noqa: BLE001
        row["error"] = short_error(err)
        return row
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(infer_batch, 3, 224, 224, device=device, generator=gen).to(memory_format=torch.channels_last)
    train_images = images[:train_batch] if train_batch <= infer_batch else torch.randn(
        train_batch, 3, 224, 224, device=device, generator=gen).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (train_batch,), device=device, generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def infer():
        with torch.no_grad(), autocast:
            model(images)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(train_images), labels)
        loss.backward()
        optimizer.step()

    model.eval()
    measure(row["times"], "infer", infer, device, args.quick)
    model.train()
    measure(row["times"], "train", train_step, device, args.quick)
    for mode, batch in (("infer", infer_batch), ("train", train_batch)):
        ms = row["times"][mode].get("ms")
        row[f"{mode}_img_s"] = None if ms is None else batch / ms * 1e3
    return row


def model_targets(rows: list[dict]) -> list[dict]:
    by_name = {r["model"]: r for r in rows}
    swin = by_name.get("swin_tiny_patch4_window7_224", {})
    swin_mem = swin.get("times", {}).get("train", {}).get("peak_mib")
    targets = []
    for name in ("nat_tiny", "dinat_tiny"):
        r = by_name.get(name, {})
        for mode, need in (("infer", 1.0), ("train", 0.9)):
            a, b = r.get(f"{mode}_img_s"), swin.get(f"{mode}_img_s")
            value = None if a is None or b is None else a / b
            targets.append({"target": f"{name} {mode} img/s >= {need}x Swin-T", "value": value,
                            "met": None if value is None else value >= need})
        mem = r.get("times", {}).get("train", {}).get("peak_mib")
        value = None if mem is None or swin_mem is None else mem / swin_mem
        targets.append({"target": f"{name} training peak memory <= Swin-T's", "value": value,
                        "met": None if value is None else value <= 1.0})
    return targets


# ---------------------------------------------------------------- report


def cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return "ERR"
    mem = entry.get("peak_mib")
    return f"{entry['ms']:.3f}" + ("" if mem is None else f"/{mem:.0f}M")


def target_line(t: dict) -> str:
    status = "n/a   " if t["met"] is None else "MET   " if t["met"] else "MISSED"
    value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
    return f"TARGET {status} {t['target']}: {value}"


def report(op_rows: list[dict], model_rows: list[dict], model_checks: list[dict]) -> str:
    lines = []
    if op_rows:
        methods = ("zoo", "fa4", "flex", "cudnn", "ref")
        lines.append("ops: ms/peak MiB, bf16 | " + "row".ljust(11) + "".join(
            f"{mode}/{m}".rjust(17) for mode in ("fwd", "fwdbwd") for m in methods))
        for r in op_rows:
            lines.append(" " * 21 + r["row"].ljust(11) + "".join(
                cell(r["times"].get(f"{mode}/{m}")).rjust(17) for mode in ("fwd", "fwdbwd") for m in methods))
        for r in op_rows:
            if "error" in r:
                lines.append(f"{r['row']}: ERR {r['error']}")
            for t in r["targets"]:
                lines.append(f"{r['row']}: {target_line(t)}")
            errors = {k: v["error"] for k, v in r["times"].items() if "error" in v}
            for k, e in errors.items():
                lines.append(f"{r['row']}: ERR {k}: {e}")
            for note in r["notes"]:
                lines.append(f"{r['row']}: note {note}")
            if "max_abs_diff" in r:
                lines.append(f"{r['row']}: max |out - {r['max_abs_diff_vs']}| " + ", ".join(
                    f"{m} {d:.3g}" for m, d in r["max_abs_diff"].items()))
    if model_rows:
        lines.append("models (bf16 autocast, channels-last): img/s infer, img/s train, train peak MiB")
        for r in model_rows:
            if "error" in r:
                lines.append(f"  {r['model']:30s} ERR {r['error']}")
                continue
            mem = r["times"].get("train", {}).get("peak_mib")
            fmt = [("-" if r.get(k) is None else f"{r[k]:.4g}") for k in ("infer_img_s", "train_img_s")]
            lines.append(f"  {r['model']:30s} {fmt[0]:>8s} {fmt[1]:>8s} {'-' if mem is None else f'{mem:.0f}':>8s}")
            for k, v in r["times"].items():
                if "error" in v:
                    lines.append(f"  {r['model']}: ERR {k}: {v['error']}")
        lines.extend(target_line(t) for t in model_checks)
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["ops", "models"], help="run one section (default: both)")
    parser.add_argument("--rows", help=f"comma list of op rows (default all): {','.join(OP_ROWS)}")
    parser.add_argument("--models", help=f"comma list of models (default all): {','.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and batches, few repetitions (smoke run)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke runs only")
    parser.add_argument("--zoo-backend", default="triton", help="backend= passed to zoo.ops.na2d/na3d")
    parser.add_argument("--reference-max-macs", type=float, default=1.2e10,
                        help="time the reference only when B*H*N*K*(D+Dv) is at most this (default 1.2e10)")
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args(argv)
    table = QUICK_ROWS if args.quick else OP_ROWS
    args.rows = list(table) if args.rows is None else args.rows.split(",")
    unknown = [r for r in args.rows if r not in table]
    if unknown:
        parser.error(f"--rows {','.join(unknown)} unknown{' with --quick' if args.quick else ''}: "
                     f"choose from {','.join(table)}")
    args.models = list(MODELS) if args.models is None else args.models.split(",")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and (not torch.cuda.is_available() or triton is None):
        raise SystemExit("benchmark_na times CUDA kernels: it needs a CUDA GPU and Triton (or --device cpu --quick)")
    # every row is a new shape for the compiled Flex (fwd, and fwd+bwd): past Dynamo's default limit of 8
    # recompilations it would fall back to eager Flex, which materialises the scores
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; zoo backend {args.zoo_backend!r}; quick {args.quick}")
    table = QUICK_ROWS if args.quick else OP_ROWS
    op_rows, model_rows = [], []
    if args.only in (None, "ops"):
        for row_name in args.rows:
            try:
                op_rows.append(run_op_row(row_name, table[row_name], args, device))
            except Exception as err:  # noqa: BLE001 - e.g. OOM making the inputs
                traceback.print_exc(limit=2)
                op_rows.append({"row": row_name, "kind": table[row_name][0], "times": {}, "notes": [],
                                "targets": [], "error": short_error(err)})
            print(f"  done {row_name}", flush=True)
    if args.only in (None, "models"):
        for model_name in args.models:
            model_rows.append(run_model(model_name, args, device))
            print(f"  done {model_name}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    model_checks = model_targets(model_rows) if model_rows else []
    print(report(op_rows, model_rows, model_checks))
    results = {"device": name, "torch": torch.__version__, "zoo_backend": args.zoo_backend, "quick": args.quick,
               "ops": op_rows, "models": model_rows, "model_targets": model_checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
