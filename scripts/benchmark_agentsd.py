#!/usr/bin/env python
"""UNet step time of AgentSD (zoo.diffusers.AgentSDConfig) against diffusers' SDPA UNet and merging alone.

Each row builds a `UNet2DConditionModel` from SD 1.5's or SDXL's published config with random
weights (bf16, on the GPU) and times one UNet forward on a batch of 2 (batched CFG = one step):
- sdpa: the stock UNet (`AttnProcessor2_0`, torch SDPA);
- merge: tomesd-style merging alone (ratio 0.4, 2x2 destination grid, SDPA on the merged
  tokens) = AgentSD's late phase, `AgentSDConfig(agent_steps=0)`;
- agents: AgentSD's early phase (4x4 grid, 0.95 agent ratio: agent attention on merged tokens);
- agentsd: the paper's 50-step schedule, (20 * agents + 30 * merge) / 50 from those step times.
All three rewrite the same layers (the highest-resolution self-attention). Each measurement is
in its own try/except (an OOM prints an error and the next runs), and a table with the issue's
targets closes the run.

    python scripts/benchmark_agentsd.py                 # all rows, ~3 min on an H200
    python scripts/benchmark_agentsd.py --rows sd15-1024 sdxl-2048
    python scripts/benchmark_agentsd.py --quick         # CPU smoke test, tiny UNet
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from zoo.diffusers import AgentSDConfig, apply_attention, remove_attention
from zoo.weights import atomic_path

SD15 = dict(cross_attention_dim=768, attention_head_dim=8)  # the other class defaults are SD 1.5's
SDXL = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
TINY = dict(block_out_channels=(32, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
            norm_num_groups=8)
# name -> (UNet config, latent side = pixels / 8, text tokens)
ROWS = {
    "sd15-512": (SD15, 64, 77), "sd15-1024": (SD15, 128, 77), "sd15-2048": (SD15, 256, 77),
    "sdxl-1024": (SDXL, 128, 77), "sdxl-2048": (SDXL, 256, 77),
}
QUICK_ROWS = {"tiny": (TINY, 16, 7)}
METHODS = {"merge": AgentSDConfig(agent_steps=0), "agents": AgentSDConfig(agent_steps=10**9)}
SCHEDULE = (20, 50)  # agent steps, total steps (the paper's)
TARGETS = {"1024": 1.3, "2048": 1.8}  # AgentSD schedule vs SDPA, per pixel size


def inputs(config: dict, side: int, text: int, device, dtype) -> dict:
    args = dict(sample=torch.randn(2, 4, side, side, device=device, dtype=dtype), timestep=torch.tensor(500, device=device),
                encoder_hidden_states=torch.randn(2, text, config.get("cross_attention_dim", 1280), device=device,
                                                  dtype=dtype), return_dict=False)
    if config.get("addition_embed_type") == "text_time":
        args["added_cond_kwargs"] = dict(text_embeds=torch.randn(2, 1280, device=device, dtype=dtype),
                                         time_ids=torch.randn(2, 6, device=device, dtype=dtype))
    return args


def time_step(unet, args: dict, warmup: int, repeats: int) -> dict:
    """Median ms of one UNet forward, and its peak memory on CUDA."""
    cuda = args["sample"].is_cuda
    with torch.inference_mode():
        for _ in range(warmup):
            unet(**args)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            unet(**args)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    result = {"ms": sorted(times)[len(times) // 2]}
    if cuda:
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_row(name: str, spec: tuple, args, device, dtype) -> dict:
    from diffusers import UNet2DConditionModel

    config, side, text = spec
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    call = inputs(config, side, text, device, dtype)
    row = {"name": name, "latent": side}
    for method in ("sdpa", *METHODS):
        try:
            if method != "sdpa":
                apply_attention(unet, METHODS[method])
                processors = [m.processor for m in unet.modules() if type(getattr(m, "processor", None)).__name__
                              == "AgentSDAttnProcessor"]
                row["tokens"] = (-(-side // processors[0].downsample)) ** 2
                row["layers"] = len(processors)
            row[method] = time_step(unet, call, args.warmup, args.repeats)
        except Exception as err:  # noqa: BLE001 - the next method still runs
            row[method] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        finally:
            if method != "sdpa" and getattr(unet, "_diffusers_hook", None) is not None and \
                    unet._diffusers_hook.get_hook("zoo_attention") is not None:
                remove_attention(unet)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {name} {method}: {row[method]}", flush=True)
    if "ms" in row["merge"] and "ms" in row["agents"]:
        agent_steps, steps = SCHEDULE
        row["agentsd"] = {"ms": (agent_steps * row["agents"]["ms"] + (steps - agent_steps) * row["merge"]["ms"]) / steps}
    return row


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets: AgentSD faster than merging alone everywhere; >= 1.3x / 1.8x SDPA at 1024 / 2048."""
    lines = []
    for row in rows:
        if "ms" not in row.get("agentsd", {}) or "ms" not in row.get("sdpa", {}):
            lines.append(f"{row['name']}: not measured: TARGET MISSED")
            continue
        agentsd, merge, sdpa = row["agentsd"]["ms"], row["merge"]["ms"], row["sdpa"]["ms"]
        met = agentsd < merge
        lines.append(f"{row['name']}: AgentSD faster than merging alone: {'TARGET MET' if met else 'TARGET MISSED'} "
                     f"({agentsd:.1f} vs {merge:.1f} ms)")
        speedup = sdpa / agentsd
        size = row["name"].rsplit("-", 1)[-1]
        if size in TARGETS:
            goal = TARGETS[size]
            met = round(speedup, 2) >= goal
            lines.append(f"{row['name']}: {speedup:.2f}x >= {goal}x vs SDPA: {'TARGET MET' if met else 'TARGET MISSED'}")
        else:
            lines.append(f"{row['name']}: {speedup:.2f}x vs SDPA (no target; the paper's 1.84x at 512^2 was vs einsum)")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| row | tokens | layers | SDPA ms | merge ms | agents ms | AgentSD ms | merge x | AgentSD x |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ms = {m: row.get(m, {}).get("ms") for m in ("sdpa", "merge", "agents", "agentsd")}
        cells = [f"{v:.1f}" if v else "err" for v in ms.values()]
        ratios = [f"{ms['sdpa'] / ms[m]:.2f}" if ms["sdpa"] and ms[m] else "" for m in ("merge", "agentsd")]
        lines.append(f"| {row['name']} | {row.get('tokens', '')} | {row.get('layers', '')} | {' | '.join(cells)} | "
                     f"{' | '.join(ratios)} |")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="rows to run (default all)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test on a tiny UNet")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.quick:
        device, dtype, rows_spec = torch.device("cpu"), torch.float32, QUICK_ROWS
        args.warmup, args.repeats = 1, 1
    elif not torch.cuda.is_available():
        sys.exit("benchmark_agentsd.py needs a CUDA GPU (use --quick for the CPU smoke test)")
    else:
        device, dtype, rows_spec = torch.device("cuda"), torch.bfloat16, ROWS
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    names = list(rows_spec) if args.quick or not args.rows else args.rows
    rows = [run_row(name, rows_spec[name], args, device, dtype) for name in names]
    print("\n".join(table(rows) + verdicts(rows)), flush=True)
    if args.json:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        report = {"command": " ".join(["python", "scripts/benchmark_agentsd.py", *(argv or sys.argv[1:])]),
                  "device": device_name, "torch": torch.__version__, "schedule": SCHEDULE, "rows": rows}
        with atomic_path(args.json) as tmp:  # a killed run leaves the old file or the new one
            tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
