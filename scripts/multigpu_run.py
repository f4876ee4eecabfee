"""Multi-GPU measurements for TRAINING.md: `zoo train` on 1 and 2 devices, DDP vs FSDP, resumes across device counts.

Every run is the `zoo train` command a user types (Lightning's own DDP / FSDP launcher), read back from its CSV log
(rank 0) and its checkpoints. Stages (all by default, in this order; the JSON is rewritten after each run):

  classify  the MNIST classifier (biformer_mnist) on 1 and on 2 devices at the same global batch: held-out top-1, img/s
  dit       the pixel DiT (dit_s_2_mnist) likewise: validation loss, img/s
  resume    the 2-device DiT checkpoint continued on 1 device, the 1-device classifier checkpoint on 2 devices
  fsdp      DiT-XL/2 on 256 px latents, DDP vs FSDP on 2 GPUs: peak memory per GPU, step time; the FSDP
            checkpoint then resumed by 1 GPU (full state dicts load on any device count)
  video     video DiT-L/2 (4,096 tokens, activation checkpointing), DDP vs FSDP likewise

  python scripts/multigpu_run.py --mnist shared/data/mnist8k.npz --out $OUT/multigpu          # 2 GPUs, ~8 min
  (if that is too long for one call: --stages classify dit resume, then --stages fsdp video with another --out)
  python scripts/multigpu_run.py --accelerator cpu --tiny --out /tmp/mg                       # CPU dry run (gloo)
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("classify", "dit", "resume", "fsdp", "video")
QUIET = ["trainer.enable_progress_bar=false", "loggers=[csv]", "trainer.log_throughput=true", "export=null"]
TINY_CLASSIFIER = ["model.kwargs.embed_dims=[16,32,64,128]", "model.kwargs.depths=[1,1,1,1]", "model.kwargs.head_dim=8"]
TINY_DIT = ["model.kwargs.depth=1", "model.kwargs.hidden_size=32", "model.kwargs.num_heads=2"]


def csv_rows(out: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for f in sorted(out.glob("csv/version_*/metrics.csv")):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def last(rows: list[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key)]
    return values[-1] if values else None


def steady(rows: list[dict[str, str]], key: str) -> float | None:
    """The median of the second half of a per-step series (the first steps pay for warm-up and allocation)."""
    values = [float(r[key]) for r in rows if r.get(key)]
    tail = sorted(values[len(values) // 2:])
    return tail[len(tail) // 2] if tail else None


def summary(stdout: str) -> dict[str, Any]:
    """The result dict `zoo train` prints last (rank 0)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and "global_step" in line:
            return ast.literal_eval(line)
    return {}


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args, self.results = args, {"args": vars(args), "runs": []}
        self.out = Path(args.out)
        self.started = time.perf_counter()

    def train(self, name: str, config: str, devices: int, global_batch: int, strategy: str | None = None,
              *overrides: str) -> dict[str, Any]:
        """One `zoo train` run of `devices` processes at `global_batch` samples per step; its numbers, recorded."""
        out = self.out / name
        strategy = strategy or ("ddp" if devices > 1 else "auto")
        cmd = [sys.executable, "-m", "zoo", "train", "--config", config, f"output_dir={out}", *QUIET,
               f"trainer.accelerator={self.args.accelerator}", f"trainer.devices={devices}", f"trainer.strategy={strategy}",
               f"data.batch_size={global_batch // devices}", f"trainer.max_time=00:00:{self.args.run_minutes:02d}:00",
               *(["trainer.log_every_n_steps=1"] if self.args.tiny else []), *overrides]
        print(f"[{time.perf_counter() - self.started:6.0f} s] {name}: {' '.join(cmd[3:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              timeout=self.args.run_minutes * 60 + 120)
        rows = csv_rows(out)
        result = summary(proc.stdout)
        samples_per_s = steady(rows, "perf/samples_per_s")
        ckpts = sorted(p.name for p in (out / "checkpoints").glob("*")) if (out / "checkpoints").is_dir() else []
        record = dict(name=name, config=config, devices=devices, strategy=strategy, global_batch=global_batch,
                      per_device_batch=global_batch // devices, returncode=proc.returncode,
                      wall_s=round(time.perf_counter() - start, 1), global_step=result.get("global_step"),
                      resumed_from=result.get("resumed_from"), val_top1=last(rows, "val/top1"), val_loss=last(rows, "val/loss"),
                      samples_per_s=samples_per_s, step_s=global_batch / samples_per_s if samples_per_s else None,
                      peak_mem_gib=max((float(r["perf/peak_mem_gib"]) for r in rows if r.get("perf/peak_mem_gib")), default=None),
                      checkpoints=ckpts, export=result.get("export"), partial_files=[p.name for p in out.rglob("*.zoo-partial")], output_dir=str(out))
        if proc.returncode:
            record["error"] = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:500]
            print(proc.stderr[-3000:], file=sys.stderr)
        self.results["runs"].append(record)
        self.save()
        return record

    def save(self) -> None:
        from zoo.weights import atomic_path

        path = self.out / "multigpu.json"
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.results, indent=1))

    # ---------------------------------------------------------------- stages

    def data(self) -> list[str]:
        if self.args.mnist:
            return [f"data.path={Path(self.args.mnist).resolve()}"]
        return ["data.kind=synthetic", "data.length=2048"]  # the dry run: no digits needed

    def classify(self) -> None:
        a = self.args
        common = [*self.data(), f"trainer.max_steps={a.classify_steps}", f"trainer.val_check_interval={a.classify_steps}",
                  f"checkpoint.every_n_train_steps={a.classify_steps}", *(TINY_CLASSIFIER if a.tiny else [])]
        for devices in (1, a.devices):
            self.train(f"classify_{devices}dev", "classify/biformer_mnist.yaml", devices, a.classify_batch, None, *common)

    def dit(self) -> None:
        a = self.args
        common = [*self.data(), f"trainer.max_steps={a.dit_steps}", f"trainer.val_check_interval={a.dit_steps}",
                  f"checkpoint.every_n_train_steps={a.dit_steps}", "diffusion.sample_steps=0", "trainer.limit_val_batches=1.0",
                  *(TINY_DIT if a.tiny else [])]
        for devices in (1, a.devices):
            self.train(f"dit_{devices}dev", "diffusion/dit_s_2_mnist.yaml", devices, a.dit_batch, None, *common)

    def resume(self) -> None:
        a = self.args
        more = max(2, a.dit_steps // 10)
        self.train(f"dit_{a.devices}dev_then_1dev", "diffusion/dit_s_2_mnist.yaml", 1, a.dit_batch, None, *self.data(),
                   f"resume={self.out / f'dit_{a.devices}dev' / 'checkpoints' / 'last.ckpt'}",
                   f"trainer.max_steps={a.dit_steps + more}", f"trainer.val_check_interval={a.dit_steps + more}",
                   "diffusion.sample_steps=0", "trainer.limit_val_batches=1.0", *(TINY_DIT if a.tiny else []))
        more = max(2, a.classify_steps // 10)
        self.train(f"classify_1dev_then_{a.devices}dev", "classify/biformer_mnist.yaml", a.devices, a.classify_batch, None,
                   *self.data(), f"resume={self.out / 'classify_1dev' / 'checkpoints' / 'last.ckpt'}",
                   f"trainer.max_steps={a.classify_steps + more}", f"trainer.val_check_interval={a.classify_steps + more}",
                   *(TINY_CLASSIFIER if a.tiny else []))

    def sharded(self, model: str, config: str, batch: int, steps: int, tiny: list[str]) -> None:
        """`model` with DDP and with FSDP on `devices` GPUs (same global batch), then FSDP's checkpoint on 1 GPU."""
        a = self.args
        # last.ckpt only: a DiT-XL/2 checkpoint (weights and AdamW moments) is ~8 GB
        common = [f"trainer.max_steps={steps}", f"checkpoint.every_n_train_steps={steps}", "checkpoint.save_top_k=0",
                  f"trainer.log_every_n_steps={1 if a.tiny else 5}", *(tiny if a.tiny else [])]
        strategies = ("ddp", "fsdp") if a.accelerator != "cpu" else ("ddp",)  # Lightning's FSDP needs CUDA
        for strategy in strategies:  # the FSDP run also exports: the full weights gathered from the shards
            export = [f"export={self.out / f'{model}_{strategy}' / 'export.safetensors'}"] if strategy == "fsdp" else []
            self.train(f"{model}_{strategy}", config, a.devices, batch * a.devices, strategy, *common, *export)
        if "fsdp" in strategies:
            self.train(f"{model}_fsdp_then_1gpu", config, 1, batch * a.devices, "auto",
                       f"resume={self.out / f'{model}_fsdp' / 'checkpoints' / 'last.ckpt'}", *common[2:],
                       f"trainer.max_steps={steps + 5}", f"checkpoint.every_n_train_steps={steps + 5}")

    def fsdp(self) -> None:
        a = self.args
        self.sharded("dit_xl_2", "diffusion/dit_xl_2_fsdp.yaml", a.xl_batch, a.xl_steps, TINY_DIT)

    def video(self) -> None:
        a = self.args
        tiny = [*TINY_DIT, "model.kwargs.input_size=[4,8,8]", "data.frames=4", "data.image_size=8", "data.digit_size=4"]
        self.sharded("video_dit_l_2", "diffusion/video_dit_l_2_fsdp.yaml", a.video_batch, a.video_steps, tiny)


def table(runs: list[dict[str, Any]]) -> str:
    head = ("run", "dev", "strategy", "batch/dev", "steps", "top-1", "val loss", "img/s", "step s", "peak GiB/dev", "rc")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in runs:
        cells = (r["name"], r["devices"], r["strategy"], r["per_device_batch"], r["global_step"],
                 f"{r['val_top1']:.4f}" if r["val_top1"] is not None else "", f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "",
                 f"{r['samples_per_s']:.0f}" if r["samples_per_s"] else "", f"{r['step_s']:.3f}" if r["step_s"] else "",
                 f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "", r["returncode"])
        lines.append(" | ".join(str(c) for c in cells))
    return "\n".join("| " + line + " |" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs and multigpu.json")
    p.add_argument("--mnist", help="mnist8k.npz (images, labels); without it the classifier and pixel DiT train on synthetic data")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--accelerator", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--devices", type=int, default=2, help="devices of the multi-device runs")
    p.add_argument("--tiny", action="store_true", help="tiny models and few steps: a dry run of the script (CPU)")
    p.add_argument("--classify-steps", type=int, default=300)
    p.add_argument("--classify-batch", type=int, default=128, help="global batch (per device: this / devices)")
    p.add_argument("--dit-steps", type=int, default=600)
    p.add_argument("--dit-batch", type=int, default=256)
    p.add_argument("--xl-steps", type=int, default=30)
    p.add_argument("--xl-batch", type=int, default=32, help="per GPU")
    p.add_argument("--video-steps", type=int, default=20)
    p.add_argument("--video-batch", type=int, default=2, help="per GPU")
    p.add_argument("--run-minutes", type=int, default=2, help="each run stops (and checkpoints) after this long")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.classify_steps, args.dit_steps, args.xl_steps, args.video_steps = 4, 4, 4, 4
        args.classify_batch, args.dit_batch, args.xl_batch, args.video_batch = 8, 8, 2, 1
    if args.mnist and not Path(args.mnist).is_file():
        print(f"multigpu_run.py: error: --mnist {args.mnist}: no such file; give mnist8k.npz or leave it out", file=sys.stderr)
        return 2
    for key in ("classify_batch", "dit_batch"):
        if getattr(args, key) % args.devices:
            print(f"multigpu_run.py: error: --{key.replace('_', '-')} {getattr(args, key)} is not divisible by --devices "
                  f"{args.devices}", file=sys.stderr)
            return 2
    runner = Runner(args)
    for stage in STAGES:
        if stage in args.stages:
            getattr(runner, stage)()
    print(table(runner.results["runs"]))
    print(f"{runner.out / 'multigpu.json'} ({time.perf_counter() - runner.started:.0f} s)")
    return int(any(r["returncode"] for r in runner.results["runs"]))


if __name__ == "__main__":
    sys.exit(main())
