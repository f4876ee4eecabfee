"""Build the module, data and Trainer from a `TrainConfig`, fit, resume, export.

Layout of `output_dir`: `config.yaml` (the resolved config), `checkpoints/last.ckpt` and
`checkpoints/step*.ckpt`, `csv/version_N/metrics.csv`, `tb/` (TensorBoard), `samples/`
(diffusion grids and videos) and, with `export=`, the safetensors + JSON written by
`zoo.weights.export`. Re-running the same command resumes from `last.ckpt` (or, if that is
unreadable, the newest readable checkpoint); `resume=PATH` resumes from another checkpoint.
Checkpoints are written atomically (`AtomicCheckpointIO`) and read as tensors only.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from zoo import weights
from zoo.factory import _entry_or_timm

from ._compat import pl
from .config import ConfigError, load_config, save_config
from .data import build_datamodule

_plugins = importlib.import_module(pl.__name__ + ".plugins")
_callbacks = importlib.import_module(pl.__name__ + ".callbacks")


class AtomicCheckpointIO(_plugins.TorchCheckpointIO):
    """Lightning's checkpoint IO, writing each checkpoint beside its target and renaming it into place
    (`zoo.weights.atomic_path`), so a kill mid-save never leaves a partial `last.ckpt`, and reading
    checkpoints as tensors only (`zoo.weights.load_tensors_only`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        with weights.atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return weights.load_tensors_only(path)


def build_module(cfg: DictConfig) -> pl.LightningModule:
    """The LightningModule for `cfg.task`."""
    o, m = cfg.optim, cfg.model
    common = dict(model_name=m.name, pretrained=m.pretrained, checkpoint_path=m.checkpoint_path,
                  model_kwargs=OmegaConf.to_container(m.kwargs, resolve=True), lr=o.lr, weight_decay=o.weight_decay,
                  betas=list(o.betas), warmup_steps=o.warmup_steps, min_lr_ratio=o.min_lr_ratio,
                  no_weight_decay=list(o.no_weight_decay))
    if cfg.task == "classify":
        from .classification import ClassificationModule

        c = cfg.classify
        return ClassificationModule(num_classes=cfg.data.num_classes, in_chans=cfg.data.channels,
                                    label_smoothing=c.label_smoothing, mixup=c.mixup, cutmix=c.cutmix,
                                    mixup_prob=c.mixup_prob, **common)
    from .diffusion import DiffusionModule

    d = cfg.diffusion
    return DiffusionModule(objective=d.objective, sample_classes=list(d.sample_classes), sample_steps=d.sample_steps,
                           guidance_scale=d.guidance_scale, objective_kwargs=OmegaConf.to_container(d.objective_kwargs),
                           sample_dir=str(Path(cfg.output_dir) / "samples"), **common)


def block_classes(model: torch.nn.Module, names: list[str]) -> set[type]:
    """The transformer-block classes of `model`: one FSDP unit (and one activation-checkpointing unit) each.

    Those named in `names` (`trainer.fsdp_wrap`), else every class named `*Block` or `*Layer` whose
    instances are repeated items of an `nn.ModuleList` / `nn.Sequential`: DiTBlock, VideoDiTBlock,
    NATLayer, BiFormerBlock, SwinBlock, CSWinBlock, PVTBlock, DeiTBlock, RMTBlock, timm's Block. Stages
    (which hold blocks), one-off modules (CSWin's MergeBlock, DiT's FinalLayer) and torch.nn layers stay
    in their parent's unit.
    """
    if names:
        found = {type(m) for m in model.modules() if type(m).__name__ in names}
    else:
        found = {type(child) for parent in model.modules() if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential))
                 for child in parent.children()
                 if type(child).__name__.endswith(("Block", "Layer")) and not type(child).__module__.startswith("torch.nn")}
    if not found:
        raise ConfigError(f"trainer.fsdp_wrap: no module class of {type(model).__name__} matches "
                          f"{names or 'the repeated *Block / *Layer classes'}; name its transformer block class "
                          "(e.g. trainer.fsdp_wrap=[DiTBlock])")
    return found


def build_strategy(cfg: DictConfig, module: pl.LightningModule) -> Any:
    """`trainer.strategy` as Lightning takes it; `fsdp` becomes an `FSDPStrategy` sharding block by block.

    FSDP checkpoints hold full state dicts (gathered on rank 0, written once by `AtomicCheckpointIO`):
    one file, read tensors-only before resuming like every other checkpoint, and loadable on any device
    count and strategy (fsdp, ddp, one device, `zoo generate --checkpoint`). Sharded checkpoints (a folder of
    files per rank) would skip both checks and pin resumes to FSDP.
    """
    t = cfg.trainer
    if not t.strategy.startswith("fsdp"):
        return t.strategy
    strategies = importlib.import_module(pl.__name__ + ".strategies")
    blocks = block_classes(module.model, list(t.fsdp_wrap))
    return strategies.FSDPStrategy(auto_wrap_policy=blocks, activation_checkpointing_policy=blocks if cfg.model.grad_checkpointing else None,
                                   sharding_strategy=t.fsdp_sharding, state_dict_type="full",
                                   cpu_offload=t.strategy == "fsdp_cpu_offload")


def enable_grad_checkpointing(cfg: DictConfig, model: torch.nn.Module) -> None:
    """`model.grad_checkpointing` outside FSDP: the model's own `set_grad_checkpointing` (timm's convention)."""
    if not cfg.model.grad_checkpointing or cfg.trainer.strategy.startswith("fsdp"):
        return  # FSDP checkpoints the same blocks through Lightning's activation_checkpointing_policy
    if not hasattr(model, "set_grad_checkpointing"):
        raise ConfigError(f"config key 'model.grad_checkpointing': {cfg.model.name} has no set_grad_checkpointing; "
                          "set model.grad_checkpointing=false (or use trainer.strategy=fsdp, which checkpoints its blocks)")
    model.set_grad_checkpointing(True)


class RankSeed(_callbacks.Callback):
    """Process r of a multi-process run draws its own random numbers (noise, timesteps, drop-path, shifts)
    from seed + r: with one seed for all, every process would draw the same noise for its samples.
    Process 0 keeps the seed of a one-process run."""

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            pl.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)


class ThroughputLog(_callbacks.Callback):
    """`perf/samples_per_s` (training samples per second over all processes, over the last `log_every_n_steps`
    steps, validation excluded) and `perf/peak_mem_gib` (this device's peak allocated memory so far), every step.

    Each step is timed to its end on the device (a CUDA sync per step: on only with `trainer.log_throughput`).
    """

    def __init__(self) -> None:
        self.last: float | None = None
        self.window: collections.deque[tuple[float, int]] = collections.deque()

    def _now(self, pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.last is None:  # the first step, or the first after a validation: time from here
            self.last = self._now(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = self._now(pl_module)
        self.window.append((now - self.last, len(batch[0]) * trainer.world_size))
        self.last = now
        while len(self.window) > trainer.log_every_n_steps:
            self.window.popleft()
        seconds, samples = sum(s for s, _ in self.window), sum(n for _, n in self.window)
        pl_module.log("perf/samples_per_s", samples / max(seconds, 1e-9), on_step=True, on_epoch=False)
        if pl_module.device.type == "cuda":
            pl_module.log("perf/peak_mem_gib", torch.cuda.max_memory_allocated(pl_module.device) / 2**30, on_step=True, on_epoch=False)


class StepProgressBar(_callbacks.TQDMProgressBar):
    """The train bar of a step-limited run counts optimizer steps out of `max_steps`, across epochs.

    Lightning's bars count the batches of the current epoch, and its Rich bar prints the epoch
    total as `max_epochs - 1`, i.e. "Epoch 1/-2" when only `max_steps` limits the run.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.total = trainer.max_steps
        self.train_progress_bar.n = trainer.global_step  # resumed runs and later epochs start where the last left off
        self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(step, trainer.max_steps):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


def build_callbacks(cfg: DictConfig) -> list:
    ck = cfg.checkpoint
    callbacks = [
        _callbacks.ModelCheckpoint(dirpath=str(Path(cfg.output_dir) / "checkpoints"), filename="step{step:07d}",
                           auto_insert_metric_name=False, every_n_train_steps=ck.every_n_train_steps,
                           save_last=True, save_top_k=ck.save_top_k, monitor=ck.monitor, mode=ck.mode),
        _callbacks.LearningRateMonitor(logging_interval="step"),
        RankSeed(cfg.seed),
    ]
    if cfg.task == "diffusion" and cfg.diffusion.ema_decay > 0:  # (refused with fsdp by load_config)
        callbacks.append(_callbacks.EMAWeightAveraging(decay=cfg.diffusion.ema_decay,
                                               update_starting_at_step=cfg.diffusion.ema_start_step or None))
    t = cfg.trainer
    if t.log_throughput:
        callbacks.append(ThroughputLog())
    if t.enable_progress_bar and t.max_steps > 0 and t.max_epochs in (None, -1):
        callbacks.append(StepProgressBar())
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    loggers_mod = importlib.import_module(pl.__name__ + ".loggers")
    out = []
    if "csv" in cfg.loggers:
        out.append(loggers_mod.CSVLogger(save_dir=cfg.output_dir, name="csv"))
    if "tensorboard" in cfg.loggers:
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            out.append(loggers_mod.TensorBoardLogger(save_dir=cfg.output_dir, name="tb"))
        else:
            warnings.warn("tensorboard is not installed: logging to CSV only (pip install tensorboard)", stacklevel=2)
    return out


def build_trainer(cfg: DictConfig, module: pl.LightningModule) -> pl.Trainer:
    t = cfg.trainer
    kwargs: dict[str, Any] = dict(
        max_steps=t.max_steps, max_epochs=t.max_epochs if t.max_epochs is not None else -1, precision=t.precision,
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(cfg, module),
        gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.enable_progress_bar, deterministic=t.deterministic,
        callbacks=build_callbacks(cfg), logger=build_loggers(cfg) or False, default_root_dir=cfg.output_dir,
        plugins=[AtomicCheckpointIO()],
    )
    if t.val_check_interval is not None:  # in optimizer steps, across epoch boundaries
        kwargs.update(val_check_interval=t.val_check_interval * t.accumulate_grad_batches, check_val_every_n_epoch=None)
    if t.max_time is not None:
        kwargs["max_time"] = t.max_time
    if t.limit_val_batches is not None:
        kwargs["limit_val_batches"] = t.limit_val_batches
    return pl.Trainer(**kwargs)


def _model_identity(cfg: DictConfig) -> dict[str, Any]:
    """The hyper-parameters that fix the network's state dict, as the LightningModule records them."""
    identity = {"model_name": cfg.model.name, "model_kwargs": OmegaConf.to_container(cfg.model.kwargs, resolve=True)}
    if cfg.task == "classify":
        identity.update(num_classes=cfg.data.num_classes, in_chans=cfg.data.channels)
    return identity


def _check_same_model(checkpoint: dict[str, Any], cfg: DictConfig, where: str, fix: str) -> None:
    """Refuse a checkpoint of another network before anything is written (a state-dict error would come later)."""
    saved = checkpoint.get("hyper_parameters") or {}
    differs = {k: saved.get(k) for k, v in _model_identity(cfg).items() if saved.get(k) != v}
    if differs:
        ours = {k: v for k, v in _model_identity(cfg).items() if k in differs}
        raise ConfigError(f"{where} holds a run of another model ({differs}; this config: {ours}): {fix}")


def _readable(path: Path) -> dict[str, Any] | str:
    """The checkpoint at `path`, or why it cannot be read (empty, truncated, not a checkpoint)."""
    try:
        checkpoint = weights.load_tensors_only(path, mmap=True)
    except weights.WeightsError as e:
        return str(e)
    return checkpoint if isinstance(checkpoint, dict) and "state_dict" in checkpoint else f"{path}: not a Lightning checkpoint"


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint `run` continues from, checked before anything is written.

    `resume=PATH`: that file. `resume=true`: the newest checkpoint in `checkpoints/` (normally
    `last.ckpt`); one that is unreadable (a copy cut short by a kill on another filesystem, a full
    disk) is skipped with a warning. `resume=false`: none. A folder or file holding a run of another
    model is refused, whatever `resume` says, so it is never overwritten.
    """
    folder = Path(cfg.output_dir) / "checkpoints"
    # newest first (a kill between a step file and last.ckpt leaves the step file newer); last.ckpt wins ties
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: (-p.stat().st_mtime, p.name != "last.ckpt"))
    unreadable, newest = [], None
    for path in candidates:
        checkpoint = _readable(path)
        if isinstance(checkpoint, dict):
            newest = (path, checkpoint)
            break
        unreadable.append(checkpoint)
    if newest:
        _check_same_model(newest[1], cfg, f"output_dir {cfg.output_dir}", f"choose another output_dir, or delete {folder}")
    if isinstance(cfg.resume, str):
        path = Path(cfg.resume)
        if not path.is_file():
            raise ConfigError(f"config key 'resume': {path} is not a file; give a checkpoint, true (continue in output_dir) or false")
        checkpoint = _readable(path)
        if isinstance(checkpoint, str):
            raise ConfigError(f"config key 'resume': {checkpoint}")
        _check_same_model(checkpoint, cfg, f"resume={path}", "resume from a checkpoint of this model")
        return path
    if not cfg.resume:
        return None
    if unreadable and newest:
        warnings.warn(f"resuming from {newest[0]}, the newest readable checkpoint: {unreadable[0]}", stacklevel=2)
    elif unreadable:
        raise ConfigError(f"no readable checkpoint in {folder} ({unreadable[0]}): delete them to start over, or set resume=false")
    return newest[0] if newest else None


def export_model(cfg: DictConfig, module: pl.LightningModule, path: str | Path) -> Path:
    """Write the trained network through `zoo.weights.export`, its pretrained_cfg carrying the data's preprocessing
    (and, for flow models, the `flow_shift` they trained with)."""
    from zoo import weights

    model = module.model
    d = cfg.data
    cfg_dict = dict(getattr(model, "pretrained_cfg", None) or {})
    size = (d.image_size, d.image_size)
    if len(getattr(model, "input_size", ())) == 3:  # video models: (C, frames, H, W), as the registered mmnist cfgs
        size = (d.frames, *size)
    cfg_dict.update(input_size=(d.channels, *size), mean=tuple(d.mean) * (d.channels if len(d.mean) == 1 else 1),
                    std=tuple(d.std) * (d.channels if len(d.std) == 1 else 1), num_classes=d.num_classes)
    if cfg.task == "classify":
        cfg_dict.update(crop_pct=1.0, crop_mode="center")  # digits fill the frame: no centre crop
    if getattr(module, "flow_shift", None) is not None:  # the sampling schedule must match the trained one
        cfg_dict["flow_shift"] = module.flow_shift
    model.pretrained_cfg = cfg_dict
    return weights.export(model, path, architecture=getattr(model, "zoo_architecture", None) or cfg.model.name.partition(".")[0])


def check_model_name(cfg: DictConfig) -> None:
    """`model.name` is a zoo or timm model: a misspelt one gets the closest names, before an output_dir of another
    model or a missing data file is blamed."""
    try:
        _entry_or_timm(cfg.model.name)
    except ValueError as e:
        raise ConfigError(f"config key 'model.name': {e}") from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit `cfg` (resuming as `resume_checkpoint` says); returns final metrics and paths."""
    check_model_name(cfg)
    out = Path(cfg.output_dir)
    ckpt = resume_checkpoint(cfg)  # what is refused (another model's run, a bad checkpoint) is refused before any write
    pl.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    module = build_module(cfg)
    enable_grad_checkpointing(cfg, module.model)
    data = build_datamodule(cfg.data)
    if _launch_rank() == 0:  # every process of a multi-process run runs this; the files are written once
        save_config(cfg, out / "config.yaml")
        weights.remove_partial_files(out / "checkpoints")
    if cfg.trainer.compile:
        module.model = torch.compile(module.model)
    trainer = build_trainer(cfg, module)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    result: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    result.update(global_step=trainer.global_step, seconds=time.perf_counter() - start, resumed_from=str(ckpt) if ckpt else None,
                  output_dir=str(out), world_size=trainer.world_size)
    if cfg.export:
        exported = _unsharded_module(cfg, trainer, module)  # under FSDP a collective: every process calls it
        if trainer.is_global_zero:
            result["export"] = str(export_model(cfg, exported, cfg.export))
    return result


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun, SLURM, Lightning's own), before the Trainer exists."""
    return getattr(importlib.import_module(pl.__name__ + ".utilities.rank_zero").rank_zero_only, "rank", 0) or 0


def _unsharded_module(cfg: DictConfig, trainer: pl.Trainer, module: pl.LightningModule) -> pl.LightningModule:
    """The trained module with plain (unsharded, uncompiled) weights, for the export."""
    if cfg.trainer.compile:
        module.model = module.model._orig_mod
    if not cfg.trainer.strategy.startswith("fsdp"):
        return module
    state = trainer.strategy.lightning_module_state_dict()  # the full state dict, gathered on rank 0 (empty elsewhere)
    if not trainer.is_global_zero:
        return module
    plain = build_module(cfg)
    plain.load_state_dict(state)
    return plain


EPILOG = """examples:
  python scripts/train.py --config classify/nat_mnist.yaml data.path=mnist8k.npz
  python scripts/train.py --config configs/classify/nat_mnist.yaml trainer.max_steps=100 model.name=nat_tiny
  torchrun --nproc_per_node 8 scripts/train.py --config diffusion/dit_s_2_mnist.yaml trainer.devices=8 trainer.strategy=ddp

A config is a file path or the name of a shipped one (zoo.configs.list_configs()).
Overrides are OmegaConf dotlists; unknown keys and wrong types are refused.
Running the same command again resumes from <output_dir>/checkpoints/last.ckpt
(resume=PATH: from that checkpoint; resume=false: from scratch)."""


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="train.py", description="Train a zoo model with Lightning.",
                                               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", required=True, help="YAML config (path or shipped name, e.g. classify/nat_mnist.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. trainer.max_steps=100")
    return parser


def main(argv: list[str] | None = None, prog: str = "train.py", verbose: bool = False) -> int:
    """scripts/train.py; `zoo train` calls it with its own `prog`, the name its one-line errors start with, and
    `verbose` (`zoo --verbose train ...`): raise the errors with their tracebacks instead of one line."""
    args = build_arg_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        if verbose:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    try:
        result = run(cfg)
    except (ConfigError, weights.WeightsError) as e:
        if verbose:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if _launch_rank() == 0:  # one summary, not one per process
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()})
    return 0
