"""The training issue's real-data runs, end to end, in one process.

1. Digit classifiers (NAT, BiFormer, MAViT, Agent-Swin) on mnist8k.npz; held-out top-1 of
   the *exported* weights reloaded through `zoo.create_model(..., checkpoint_path=)`.
2. A class-conditional pixel DiT on the digits; 200 samples (20 per class) scored by the
   first classifier.
3. A video DiT on Moving-MNIST (16 x 32 x 32): dense, then fine-tuned from dense with radial
   and with SLA attention; per-frame digit accuracy of 20 videos each (and of real videos,
   the metric's ceiling).

Writes `summary.json`, sample grids and one `.tar.gz` per model (fp16 safetensors + JSON)
into --out. `--quick` shrinks everything for a CPU smoke test.

  python scripts/mnist_suite.py --data mnist8k.npz --out runs/ --stages classify dit video
"""
from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import torch

QUICK = {
    "classify": ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.batch_size=16", "trainer.precision=32-true",
                 "data.num_workers=0"],
    "dit": ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.batch_size=8", "model.kwargs.depth=1",
            "model.kwargs.hidden_size=32", "model.kwargs.num_heads=2", "diffusion.sample_steps=2", "trainer.precision=32-true",
            "data.num_workers=0"],
    "video": ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=2", "data.num_videos=8",
              "model.kwargs.depth=2", "model.kwargs.hidden_size=32", "model.kwargs.num_heads=2", "data.frames=4", "model.kwargs.input_size=[4,32,32]",
              "diffusion.sample_steps=2", "diffusion.sample_classes=[0,1]", "trainer.precision=32-true", "data.num_workers=0"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(config: str, overrides: list[str]) -> dict:
    from zoo.lightning.config import load_config
    from zoo.lightning.train import run

    cfg = load_config(config, overrides)
    log(f"train {config} {' '.join(overrides)}")
    result = run(cfg)
    log(f"done {config}: step {result['global_step']} in {result['seconds']:.0f} s")
    return result


def pack(export: str | Path, out: Path, name: str) -> Path:
    """fp16 copy of an export (+ its JSON) as out/name.tar.gz."""
    from safetensors.torch import load_file, save_file

    export = Path(export)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(export)).items()}
    tmp = out / f"{name}.safetensors"
    save_file(state, str(tmp), metadata={"format": "pt"})
    with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
        tar.add(tmp, arcname=f"{name}.safetensors")
        tar.add(export.with_suffix(".json"), arcname=f"{name}.json")
    tmp.unlink()
    return out / f"{name}.tar.gz"


def val_images(data: str, cfg_name: str):
    from zoo.lightning.config import load_config
    from zoo.lightning.data import NpzDataModule

    cfg = load_config(cfg_name, [f"data.path={data}"])
    dm = NpzDataModule(cfg.data)
    dm.setup("validate")
    x, y = dm.val_set.images, dm.val_set.labels
    return x * 2 - 1, y  # [-1, 1] pixels, as generators produce


def stage_classify(args, root: Path, summary: dict) -> torch.nn.Module:
    import zoo
    from zoo import digits

    x, y = val_images(args.data, "classify/nat_mnist.yaml")
    first = None
    for name in args.classifiers:
        res = train(f"classify/{name}.yaml", [f"data.path={args.data}", f"output_dir={root / name}", *args.quick_classify])
        exported = json.loads(Path(res["export"]).with_suffix(".json").read_text())
        model = zoo.create_model(exported["architecture"], checkpoint_path=res["export"]).to(args.device).eval()
        top1 = digits.image_accuracy(model, x, y)
        params = sum(p.numel() for p in model.parameters())
        summary["classify"][name] = {"arch": exported["architecture"], "params": params, "heldout_top1": top1,
                                     "val_top1_during_training": res.get("val/top1"), "steps": res["global_step"],
                                     "train_seconds": res["seconds"]}
        log(f"{name}: held-out top-1 {top1:.4f} ({len(y)} digits), {params / 1e6:.2f} M params")
        pack(res["export"], args.out, name)
        first = first or model
    return first


def stage_dit(args, root: Path, summary: dict, classifier) -> None:
    import zoo
    from zoo import digits, dit, media

    init = [f"model.checkpoint_path={args.dit_init}"] if args.dit_init else []
    res = train("diffusion/dit_s_2_mnist.yaml", [f"data.path={args.data}", f"output_dir={root / 'dit'}", *init, *args.quick_dit])
    model = zoo.create_model("dit_s_2", checkpoint_path=res["export"]).to(args.device).eval()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    out = {"steps": res["global_step"], "train_seconds": res["seconds"], "init": args.dit_init,
           "params": sum(p.numel() for p in model.parameters())}
    for guidance in (1.0, 2.0, 4.0):
        g = torch.Generator(device=args.device).manual_seed(0)
        start = time.perf_counter()
        x = dit.sample(model, labels.tolist(), num_steps=args.sample_steps, guidance_scale=guidance, scheduler="ddim",
                       generator=g, progress=False, guidance_channels="all").float().cpu()
        acc = digits.image_accuracy(classifier, x, labels) if classifier is not None else float('nan')
        out[f"accuracy_guidance_{guidance}"] = acc
        out[f"sample_seconds_guidance_{guidance}"] = time.perf_counter() - start
        log(f"dit: {len(labels)} samples, guidance {guidance}: {acc:.3f} classified as requested")
        if guidance == 4.0:
            media.save_grid(x.view(10, args.per_class, *x.shape[1:])[:, :10].reshape(-1, *x.shape[1:]), args.out / "dit_samples.png",
                            nrow=min(10, args.per_class))
    summary["dit"] = out
    pack(res["export"], args.out, "dit_s_2_mnist")


def score_video(args, cfg, attention: str, export: str, classifier) -> dict:
    """Per-frame digit accuracy of `--videos-per-class` videos per class drawn from `export` (+ a GIF)."""
    import zoo
    from zoo import digits, dit, media, weights

    model = zoo.create_model("video_dit_s_2", checkpoint_path=export).to(args.device).eval()
    shift = weights.read_export_config(export)["pretrained_cfg"]["flow_shift"]  # as `zoo generate-video --checkpoint` samples it
    labels = torch.arange(10).repeat_interleave(args.videos_per_class)
    g = torch.Generator(device=args.device).manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
        v = dit.sample_video(model, labels.tolist(), num_steps=args.video_sample_steps, guidance_scale=args.video_guidance,
                             scheduler="euler", shift=shift, generator=g, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    v = v.float().cpu()
    acc = digits.frame_accuracy(classifier, v, labels, cfg.data.digit_size) if classifier is not None else float('nan')
    log(f"video {attention}: per-frame digit accuracy {acc:.3f} over {len(labels)} videos; sampling {seconds:.1f} s")
    media.save_video(media.video_grid(v[:: args.videos_per_class], nrow=10), args.out / f"video_{attention}.gif")
    return {"frame_accuracy": acc, "sample_seconds": seconds, "videos": len(labels)}


def stage_video(args, root: Path, summary: dict, classifier) -> None:
    """Dense (optionally warm-started on single frames), then radial / SLA fine-tuned from the dense weights.

    `--video-init` starts every run from that export instead (continuing a dense run, or fine-tuning
    from it when dense is not in `--video-attention`).
    """
    from zoo import digits
    from zoo.lightning.config import load_config
    from zoo.lightning.data import MovingMNISTDataModule

    base = [f"data.path={args.data}", *args.quick_video]
    cfg = load_config("diffusion/video_dit_s_2_mmnist.yaml", base)
    dm = MovingMNISTDataModule(cfg.data)
    dm.setup("validate")
    real = torch.stack([dm.val_set[i][0] for i in range(args.real_videos)])
    real_y = torch.stack([dm.val_set[i][1] for i in range(args.real_videos)])
    video = summary.setdefault("video", {})
    video["real_frame_accuracy"] = digits.frame_accuracy(classifier, real, real_y, cfg.data.digit_size) if classifier is not None else float("nan")
    log(f"video: per-frame accuracy of real Moving-MNIST videos (metric ceiling) {video['real_frame_accuracy']:.3f}")
    init = args.video_init
    if args.video_pretrain_steps and "dense" in args.video_attention and not init:
        # single frames first (Wan's image-then-video order): digit shapes are learnt on cheap 256-token inputs
        res = train("diffusion/video_dit_s_2_mmnist.yaml", base + [
            f"output_dir={root / 'video_frames'}", "data.frames=1", "model.kwargs.input_size=[1,32,32]",
            f"trainer.max_steps={args.video_pretrain_steps}", *args.video_pretrain])
        video["frames_pretrain"] = {"steps": res["global_step"], "train_seconds": res["seconds"]}
        init = res["export"]
    for attention in args.video_attention:
        start_from = init
        overrides = base + [f"output_dir={root / ('video_' + attention)}", f"model.kwargs.attention={attention}",
                            *(args.video_dense if attention == "dense" else getattr(args, attention))]
        if init:
            overrides.append(f"model.checkpoint_path={init}")
        res = train("diffusion/video_dit_s_2_mmnist.yaml", overrides)
        if attention == "dense" and not args.video_init:
            init = res["export"]
        video[attention] = {"steps": res["global_step"], "train_seconds": res["seconds"], "init": str(start_from) if start_from else None,
                            **score_video(args, cfg, attention, res["export"], classifier)}
        pack(res["export"], args.out, f"video_dit_s_2_mmnist_{attention}")


def guarded(stage: str, summary: dict, fn, *args):
    """Run a stage; a failure is logged and recorded, and the next stage still runs."""
    import traceback

    try:
        return fn(*args)
    except Exception as e:  # one broken stage must not cost the others' device time
        traceback.print_exc()
        summary.setdefault("errors", {})[stage] = f"{type(e).__name__}: {e}"
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="mnist8k.npz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("outputs/mnist_suite"), help="checkpoints and logs")
    p.add_argument("--stages", nargs="+", default=["classify", "dit", "video"], choices=["classify", "dit", "video"])
    p.add_argument("--classifiers", nargs="+", default=["nat_mnist", "biformer_mnist", "mavit_mnist", "agent_swin_mnist"])
    p.add_argument("--classifier-export", default=None, help="score with this exported classifier (a path, or a registered name such as biformer_mnist) instead of training one")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--dit-init", default=None, help="start the pixel DiT from these weights (e.g. the shipped ones)")
    p.add_argument("--video-attention", nargs="+", default=["dense", "radial", "sla"], choices=["dense", "radial", "sla"])
    p.add_argument("--video-init", default=None, help="start every video run from this export")
    p.add_argument("--video-pretrain-steps", type=int, default=0, help="single-frame warm start of the dense run")
    p.add_argument("--video-guidance", type=float, default=2.0)
    p.add_argument("--videos-per-class", type=int, default=2)
    p.add_argument("--video-sample-steps", type=int, default=30)
    p.add_argument("--real-videos", type=int, default=200)
    p.add_argument("--video-pretrain", nargs="*", default=[], help="extra overrides for the single-frame warm start")
    p.add_argument("--video-dense", nargs="*", default=[], help="extra overrides for the dense video run")
    p.add_argument("--radial", nargs="*", default=[], help="extra overrides for the radial fine-tune")
    p.add_argument("--sla", nargs="*", default=[], help="extra overrides for the SLA fine-tune")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    p.add_argument("--set-classify", nargs="*", default=[], help="overrides for the classifier runs")
    p.add_argument("--set-dit", nargs="*", default=[], help="overrides for the DiT run")
    p.add_argument("--set-video", nargs="*", default=[], help="overrides for the video runs")
    p.add_argument("--quick", action="store_true", help="tiny settings for a CPU smoke test")
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for stage in QUICK:
        setattr(args, f"quick_{stage}", (QUICK[stage] if args.quick else []) + args.set + getattr(args, f"set_{stage}"))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "classify": {}}
    start = time.perf_counter()
    try:
        classifier = None
        if "classify" in args.stages:
            classifier = guarded("classify", summary, stage_classify, args, args.work, summary)
        if args.classifier_export:
            import zoo

            if Path(args.classifier_export).is_file():
                meta = json.loads(Path(args.classifier_export).with_suffix(".json").read_text())
                classifier = zoo.create_model(meta["architecture"], checkpoint_path=args.classifier_export)
            else:  # a registered model with weights, e.g. the shipped biformer_mnist
                classifier = zoo.create_model(args.classifier_export, pretrained=True)
            classifier = classifier.to(args.device).eval()
        for stage, fn in (("dit", stage_dit), ("video", stage_video)):
            if stage in args.stages:
                guarded(stage, summary, fn, args, args.work, summary, classifier)
    finally:
        summary["total_seconds"] = time.perf_counter() - start
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
