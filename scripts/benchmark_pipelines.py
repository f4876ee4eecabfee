#!/usr/bin/env python
"""End-to-end denoising-step benchmark of the zoo.diffusers plugins inside diffusers' own video transformers.

Each row builds a diffusers transformer from its published config with random weights (bf16, on
the GPU), feeds one latent of the row's video size, and times one transformer forward (= one
denoising step with a guidance-distilled or batched-CFG model; Wan's CFG doubles every number):
- stock, on each dense backend that runs here (cuDNN SDPA, SDPA-flash, FA3/FA2 when importable);
  the fastest is the baseline, and the plugins' dense layers use it too;
- each plugin (radial, SLA top 5%, 3-D NA with a kernel of about a quarter of each latent axis)
  on a sparse step (first layer dense, radial's recipe);
- the whole 50-step schedule with radial's recipe (first 12 steps dense) estimated as
  (12 * dense + 38 * sparse) / (50 * dense) from those measured step times;
- one layer's self-attention alone (dense baseline vs each plugin), for the attention share.
When flash-attn-4 is importable, its time for one layer's attention gives an estimated stock step
with it (no diffusers backend runs FA4 without the hub), and the targets are judged against it.
Peak memory is `torch.cuda.max_memory_allocated` of each forward. Every measurement is in its own
try/except (an OOM or a missing kernel prints a row with the error) and a compact table closes the run.

    python scripts/benchmark_pipelines.py --rows wan1.3b-480p          # ~2 min on an H200
    python scripts/benchmark_pipelines.py --rows wan14b-720p           # ~5 min
    python scripts/benchmark_pipelines.py --rows hunyuan-720p          # ~8 min
    python scripts/benchmark_pipelines.py --quick                      # CPU smoke test, tiny models
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pkgutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zoo.weights import atomic_path

# the targets: (row, plugin, what) -> minimum speedup over the fastest dense backend
TARGETS = {
    ("wan14b-720p", "radial", "step"): 2.0,
    ("wan14b-720p", "sla", "step"): 2.5,
    ("wan14b-720p", "na", "step"): 2.0,
    ("wan14b-720p", "radial", "schedule"): 1.7,
}
WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                in_channels=16, out_channels=16, freq_dim=256, patch_size=(1, 2, 2))
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
HUNYUAN = dict()  # the class defaults are HunyuanVideo's published config


@dataclass
class Row:
    name: str
    model: str  # "wan" | "hunyuan"
    config: dict
    frames: int  # video frames, before the VAE's 4x temporal compression
    height: int
    width: int
    text_tokens: int = 512
    results: dict = field(default_factory=dict)

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8


ROWS = {
    "wan1.3b-480p": lambda: Row("wan1.3b-480p", "wan", WAN_1_3B, 81, 480, 832),
    "wan14b-720p": lambda: Row("wan14b-720p", "wan", WAN_14B, 81, 720, 1280),
    "hunyuan-720p": lambda: Row("hunyuan-720p", "hunyuan", HUNYUAN, 129, 720, 1280, text_tokens=256),
}
QUICK_ROWS = {  # tiny configs of the same classes, for the CPU smoke test
    "wan-tiny": lambda: Row("wan-tiny", "wan", dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, ffn_dim=32,
                                                    num_layers=2, text_dim=16, freq_dim=16), 9, 32, 64, 8),
    "hunyuan-tiny": lambda: Row("hunyuan-tiny", "hunyuan",
                                dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
                                     num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
                                     rope_axes_dim=(4, 6, 6)), 9, 32, 64, 8),
}


def na_has_gpu_kernel() -> bool:
    """Whether zoo.ops.na has more than its PyTorch reference (a GPU kernel module beside naive.py)."""
    import zoo.ops.na as na

    return any(m.name != "naive" for m in pkgutil.iter_modules(na.__path__))


def plugin_configs(row: Row, quick: bool, dense_layers: int) -> dict:
    from zoo.diffusers import NeighborhoodAttentionConfig, RadialAttentionConfig, SLAConfig

    kernel = tuple(max(3, round(axis / 4) | 1) for axis in (row.latent[0], row.latent[1] // 2, row.latent[2] // 2))
    block = 16 if quick else 128
    return {
        "radial": RadialAttentionConfig(decay_factor=0.2, block_size=block, dense_layers=dense_layers),
        "sla": SLAConfig(topk=0.05 if not quick else 0.25, block_size=16 if quick else 64, dense_layers=dense_layers),
        "na": NeighborhoodAttentionConfig(kernel_size=kernel, dense_layers=dense_layers),
    }


def build(row: Row, device: torch.device, dtype: torch.dtype):
    """The transformer (random init, directly in `dtype` on `device`) and one step's inputs."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    frames, h, w = row.latent
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            if row.model == "wan":
                model = WanTransformer3DModel(**row.config).eval()
                channels, text_dim = model.config.in_channels, model.config.text_dim
                inputs = dict(hidden_states=torch.randn(1, channels, frames, h, w), timestep=torch.tensor([500]),
                              encoder_hidden_states=torch.randn(1, row.text_tokens, text_dim), return_dict=False)
            else:
                model = HunyuanVideoTransformer3DModel(**row.config).eval()
                cfg = model.config
                mask = torch.ones(1, row.text_tokens, dtype=torch.long)
                mask[:, row.text_tokens * 3 // 4:] = 0  # a padded prompt, as the pipeline makes
                inputs = dict(hidden_states=torch.randn(1, cfg.in_channels, frames, h, w),
                              timestep=torch.tensor([500]),
                              encoder_hidden_states=torch.randn(1, row.text_tokens, cfg.text_embed_dim),
                              encoder_attention_mask=mask, pooled_projections=torch.randn(1, cfg.pooled_projection_dim),
                              guidance=torch.tensor([6000.0]), return_dict=False)
    finally:
        torch.set_default_dtype(previous)
    return model, inputs


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms, peak MiB) of `fn`, after `warmup` untimed calls (Triton compiles, masks build)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def dense_backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["native"]
    # HunyuanVideo passes a key-padding mask, which the flash kernels refuse: "native" (SDPA's own pick) still runs
    backends = ["_native_cudnn", "_native_flash", "native"]
    if importlib.util.find_spec("flash_attn_interface"):
        backends.append("_flash_3")
    if importlib.util.find_spec("flash_attn"):
        backends.append("flash")
    return backends


def attention_alone(row: Row, model, device, dtype, backend, plugins: dict, args) -> dict:
    """One layer's self-attention at the row's shape: the dense backend vs each plugin's sparse attention."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from zoo.diffusers.attention import JointSequence, build_sparse_attention

    attn = model.blocks[0].attn1 if row.model == "wan" else model.single_transformer_blocks[0].attn
    heads, head_dim = attn.heads, attn.to_q.out_features // attn.heads
    n_text = 0 if row.model == "wan" else row.text_tokens
    seq = JointSequence(row.latent[:1] + (row.latent[1] // 2, row.latent[2] // 2), n_text)
    n = seq.n_video + n_text
    q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dtype) for _ in range(3))
    q_t, k_t, v_t = (t.transpose(1, 2) for t in (q, k, v))  # diffusers' [B, S, H, D]
    dense = {"dense": lambda: dispatch_attention_fn(q_t, k_t, v_t, backend=backend)}
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") and importlib.util.find_spec("flash_attn.cute"):
        from flash_attn.cute.interface import flash_attn_func  # flash-attn-4 (no diffusers backend without the hub)

        dense["fa4"] = lambda: flash_attn_func(q_t, k_t, v_t)
    out = {}
    for name, fn in dense.items():
        try:
            out[name] = timed(fn, device, args.warmup, args.repeats)[0]
        except Exception as err:  # noqa: BLE001 - a benchmark row reports its failure and goes on
            out[name] = f"error: {type(err).__name__}: {err}"[:160]
    for name, config in plugins.items():
        try:
            sparse = build_sparse_attention(config, head_dim=head_dim, mask_model=row.model).to(device)
            out[name] = timed(lambda s=sparse: s(q, k, v, seq, backend=backend), device, args.warmup, args.repeats)[0]
        except Exception as err:  # noqa: BLE001
            out[name] = f"error: {type(err).__name__}: {err}"[:160]
    return out


def run_row(row: Row, args, device: torch.device, dtype: torch.dtype) -> None:
    from zoo.diffusers import apply_attention, remove_attention

    res = row.results
    frames, h, w = row.latent
    res["tokens"] = frames * (h // 2) * (w // 2)
    print(f"\n== {row.name}: latent {frames}x{h}x{w} -> {res['tokens']} video tokens, {row.config or 'defaults'}",
          flush=True)
    model, inputs = build(row, device, dtype)

    def step():
        return model(**inputs)

    dense = {}
    for backend in dense_backends(device):
        try:
            model.set_attention_backend(backend)
            dense[backend] = timed(step, device, args.warmup, args.repeats)
            print(f"  stock {backend}: {dense[backend][0]:.1f} ms, peak {dense[backend][1]:.0f} MiB", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"  stock {backend}: error {type(err).__name__}: {str(err)[:200]}", flush=True)
    if not dense:
        res["error"] = "no dense backend ran"
        return
    best = min(dense, key=lambda b: dense[b][0])
    res["dense"] = {b: {"ms": t, "peak_mib": m} for b, (t, m) in dense.items()}
    res["baseline"] = best
    res["schedule"] = {"steps": args.steps, "dense_steps": args.dense_steps}
    model.set_attention_backend(best)  # the plugins' dense layers run on it too
    base_ms = dense[best][0]
    plugins = plugin_configs(row, args.quick, dense_layers=args.dense_layers)
    if device.type == "cuda" and not na_has_gpu_kernel() and not args.force_na:
        plugins.pop("na")
        res["na"] = {"skipped": "zoo.ops.na3d has only its PyTorch reference here (GPU kernel: issue #16); --force-na"}
        print("  na: skipped (no GPU kernel for zoo.ops.na3d in this install; --force-na runs the reference)")
    for name, config in [(n, c) for n, c in plugins.items() if n in args.plugins]:
        try:
            apply_attention(model, config)
            ms, peak = timed(step, device, args.warmup, args.repeats)
            steps, dense_steps = args.steps, args.dense_steps
            schedule = steps * base_ms / (dense_steps * base_ms + (steps - dense_steps) * ms)
            res[name] = {"ms": ms, "peak_mib": peak, "step_speedup": base_ms / ms, "schedule_speedup": schedule,
                         "config": config.to_dict()}
            print(f"  {name}: {ms:.1f} ms/step ({base_ms / ms:.2f}x), {steps}-step schedule with {dense_steps} dense "
                  f"steps {schedule:.2f}x, peak {peak:.0f} MiB", flush=True)
        except Exception as err:  # noqa: BLE001
            res[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            print(f"  {name}: error {res[name]['error']}", flush=True)
        finally:
            if getattr(model, "_diffusers_hook", None) is not None and model._diffusers_hook.get_hook("zoo_attention"):
                remove_attention(model)
    res["attention_ms"] = attention_alone(row, model, device, dtype, best, {n: plugins[n] for n in plugins
                                                                                 if n in args.plugins}, args)
    dense_attention = res["attention_ms"].get("dense")
    if isinstance(dense_attention, float):
        layers = len(model.blocks) if row.model == "wan" else (len(model.transformer_blocks)
                                                                 + len(model.single_transformer_blocks))
        res["attention_share"] = layers * dense_attention / base_ms
        fa4 = res["attention_ms"].get("fa4")
        if isinstance(fa4, float) and fa4 < dense_attention:  # the stock step were its attention flash-attn-4
            res["fa4_step_estimate_ms"] = base_ms - layers * (dense_attention - fa4)
            print(f"  stock with flash-attn-4 (estimated from the attention alone): "
                  f"{res['fa4_step_estimate_ms']:.1f} ms", flush=True)
        print("  self-attention alone per layer: " + ", ".join(
            f"{k} {v:.2f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in res["attention_ms"].items())
            + f"; dense attention share of the step {res['attention_share']:.0%}", flush=True)


def summary(rows: list[Row], args) -> list[str]:
    lines = ["", "| row | tokens | baseline (ms) | plugin | step (ms) | step x | 50-step x | peak MiB | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        res = row.results
        if "baseline" not in res:
            lines.append(f"| {row.name} | {res.get('tokens', '?')} | {res.get('error', 'failed')} |  |  |  |  |  |  |")
            continue
        base = res["dense"][res["baseline"]]
        lines.append(f"| {row.name} | {res['tokens']} | {res['baseline']} {base['ms']:.1f} | stock | {base['ms']:.1f} "
                     f"| 1.00 | 1.00 | {base['peak_mib']:.0f} |  |")
        if "fa4_step_estimate_ms" in res:
            lines.append(f"| {row.name} |  |  | stock, flash-attn-4 (est.) | {res['fa4_step_estimate_ms']:.1f} |  |  |  |"
                         " targets use it |")
        for name in ("radial", "sla", "na"):
            r = res.get(name)
            if r is None:
                continue
            if "ms" not in r:
                lines.append(f"| {row.name} |  |  | {name} | {r.get('error') or r.get('skipped')} |  |  |  |  |")
                continue
            fastest = min(base["ms"], res.get("fa4_step_estimate_ms", base["ms"]))  # the targets' dense baseline
            steps, dense_steps = res["schedule"]["steps"], res["schedule"]["dense_steps"]
            speedups = {"step": fastest / r["ms"],
                        "schedule": steps * fastest / (dense_steps * fastest + (steps - dense_steps) * r["ms"])}
            verdicts = []
            for what, speedup in speedups.items():
                target = TARGETS.get((row.name, name, what))
                if target is not None:
                    verdict = "MET" if speedup >= target else "MISSED"
                    verdicts.append(f"{what} {speedup:.2f}x >= {target}x: TARGET {verdict}")
            lines.append(f"| {row.name} |  |  | {name} | {r['ms']:.1f} | {r['step_speedup']:.2f} | "
                         f"{r['schedule_speedup']:.2f} | {r['peak_mib']:.0f} | {'; '.join(verdicts)} |")
        if "attention_share" in res:
            lines.append(f"| {row.name} |  |  | dense attention share of the step | {res['attention_share']:.0%} |"
                         "  |  |  |  |")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=None, help=f"rows to run (default all): {', '.join(ROWS)}")
    parser.add_argument("--plugins", nargs="+", default=["radial", "sla", "na"], choices=["radial", "sla", "na"])
    parser.add_argument("--steps", type=int, default=50, help="schedule length for the whole-schedule estimate")
    parser.add_argument("--dense-steps", type=int, default=12, help="dense steps of the schedule (radial's recipe)")
    parser.add_argument("--dense-layers", type=int, default=1, help="dense layers of a sparse step (radial's recipe)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--force-na", action="store_true", help="run NA even when zoo.ops.na3d has no GPU kernel")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test on tiny models of the same classes")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    rows = QUICK_ROWS if args.quick else ROWS
    args.rows = args.rows or list(rows)
    unknown = [r for r in args.rows if r not in rows]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {list(rows)}")
    if not 0 <= args.dense_steps <= args.steps:
        parser.error(f"--dense-steps must be in [0, --steps={args.steps}], got {args.dense_steps}")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if args.quick:
        device, dtype = torch.device("cpu"), torch.float32
        args.warmup, args.repeats = 1, 1
    elif not torch.cuda.is_available():
        sys.exit("benchmark_pipelines.py needs a CUDA GPU (use --quick for the CPU smoke test)")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    rows = []
    for name in args.rows:
        row = (QUICK_ROWS if args.quick else ROWS)[name]()
        rows.append(row)
        try:
            run_row(row, args, device, dtype)
        except Exception as err:  # noqa: BLE001 - the next row still runs
            row.results["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(f"  {row.name}: error {row.results['error']}", flush=True)
        finally:
            if device.type == "cuda":  # the row's model is gone: give its memory back before the next row
                torch.cuda.empty_cache()
    print("\n".join(summary(rows, args)), flush=True)
    if args.json:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        report = {"command": " ".join(["python", "scripts/benchmark_pipelines.py", *(argv or sys.argv[1:])]),
                  "device": device_name, "torch": torch.__version__, "rows": {r.name: r.results for r in rows}}
        with atomic_path(args.json) as tmp:  # a killed run leaves the old file or the new one
            tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
