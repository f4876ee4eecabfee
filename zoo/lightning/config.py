"""Typed training config: YAML files merged with `key=value` overrides and checked.

The schema is a tree of dataclasses (OmegaConf structured config), so an unknown key or a
value of the wrong type fails at load time with the key's full path and a suggestion,
not after the model has been built. Free-form model arguments go under `model.kwargs`.
"""
from __future__ import annotations

import difflib
import importlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASKS = ("classify", "diffusion")
DATA_KINDS = ("npz", "imagefolder", "moving_mnist", "synthetic")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
              "transformer-engine", "transformer-engine-float16")
# keys that existed once and do nothing now: where their job is done instead
REMOVED_KEYS = {
    "diffusion.class_dropout": "label dropout for guidance is the model's own argument: set model.kwargs.class_dropout_prob",
    "diffusion.sample_every_n_steps": "samples are drawn at each validation: set trainer.val_check_interval "
                                      "(and diffusion.sample_steps=0 for none)",
}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelCfg:
    name: str = MISSING  # a zoo or timm model name
    pretrained: bool = False
    checkpoint_path: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to create_model (drop_path_rate, depth, ...)
    grad_checkpointing: bool = False  # recompute each block's activations in backward (fsdp: Lightning's policy)


@dataclass
class DataCfg:
    kind: str = "npz"  # npz | imagefolder | moving_mnist | synthetic
    path: str | None = None  # .npz file (npz, moving_mnist)
    train_dir: str | None = None  # imagefolder
    val_dir: str | None = None
    image_size: int = 32
    channels: int = 1
    num_classes: int = 10
    val_fraction: float = 0.1  # npz / moving_mnist: the last fraction is held out
    batch_size: int = 128
    num_workers: int = 2
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    random_shift: int = 0  # train-time random translation in pixels
    frames: int = 16  # moving_mnist / synthetic video
    digit_size: int = 16  # moving_mnist: digits are resized to this side
    num_videos: int = 20000  # moving_mnist / synthetic: samples per epoch
    length: int = 512  # synthetic: samples per epoch
    video: bool = False  # synthetic: make videos instead of images
    seed: int = 0


@dataclass
class OptimCfg:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of lr
    no_weight_decay: list[str] = field(default_factory=lambda: ["rpb", "relative_position_bias_table", "pos_embed", "cls_token"])


@dataclass
class ClassifyCfg:
    label_smoothing: float = 0.1
    mixup: float = 0.0  # timm Mixup alphas; 0 disables
    cutmix: float = 0.0
    mixup_prob: float = 1.0


@dataclass
class DiffusionCfg:
    objective: str = "auto"  # auto (from the model kind) | ddpm | flow
    ema_decay: float = 0.9999  # 0 disables EMA
    ema_start_step: int = 0
    sample_classes: list[int] = field(default_factory=lambda: list(range(10)))  # drawn at each validation
    sample_steps: int = 50  # 0 disables the samples
    guidance_scale: float = 2.0
    objective_kwargs: dict[str, Any] = field(default_factory=dict)  # scheduler (samples); shift (flow)


@dataclass
class TrainerCfg:
    max_steps: int = 1000
    max_epochs: int | None = None
    max_time: str | None = None  # "DD:HH:MM:SS": stop (and checkpoint) after this long
    precision: str = "bf16-mixed"
    accelerator: str = "auto"
    devices: Any = "auto"  # int, list or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | any Lightning strategy name
    fsdp_wrap: list[str] = field(default_factory=list)  # block class names; empty: the model's repeated blocks
    fsdp_sharding: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 20
    val_check_interval: int | None = None  # in steps; None: once per epoch
    limit_val_batches: float | None = None
    enable_progress_bar: bool = True
    deterministic: bool = False
    compile: bool = False
    log_throughput: bool = False  # log perf/samples_per_s (all processes) and perf/peak_mem_gib (per device)


@dataclass
class CheckpointCfg:
    every_n_train_steps: int | None = 500
    save_top_k: int = 1
    monitor: str | None = None
    mode: str = "max"


@dataclass
class TrainConfig:
    task: str = MISSING  # classify | diffusion
    output_dir: str = "outputs/${task}_${model.name}"
    seed: int = 0
    resume: bool | str = True  # true: continue from output_dir/checkpoints/last.ckpt; false: from scratch; a path: from it
    export: str | None = None  # write the final weights here through zoo.weights.export
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    classify: ClassifyCfg = field(default_factory=ClassifyCfg)
    diffusion: DiffusionCfg = field(default_factory=DiffusionCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)


def _resolve_path(config: str | os.PathLike) -> Path:
    """A file path, or the name of a shipped config (`classify/nat_mnist.yaml`)."""
    path = Path(config)
    if path.is_file():
        return path
    from zoo.configs import config_path, list_configs

    name = str(config)
    try:
        return config_path(name if name.endswith(".yaml") else name + ".yaml")
    except FileNotFoundError:
        raise ConfigError(f"--config {name}: no such file, nor a shipped config; shipped: {', '.join(list_configs())}") from None


def _read_yaml(config: str | os.PathLike) -> DictConfig:
    """The YAML mapping in `config`, or a ConfigError saying where the file stops being one."""
    import yaml

    path = _resolve_path(config)
    try:
        layer = OmegaConf.load(path)
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a text file; give a YAML config (e.g. classify/nat_mnist.yaml)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"--config {path}: holds a YAML {type(layer).__name__.replace('Config', '').lower()}, "
                          "not a mapping of keys (task: ..., model: ..., trainer: ...)")
    return layer


def load_config(config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- YAML file <- `key=value` overrides, validated and resolved.

    Raises ConfigError naming the offending key (with a close match) or value.
    """
    schema = OmegaConf.structured(TrainConfig)
    layers = [_read_yaml(config)] if config is not None else []
    try:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. trainer.max_steps=100)")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    _refuse_removed_keys(layers)
    try:
        cfg = OmegaConf.merge(schema, *layers)
        OmegaConf.resolve(cfg)
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    _check_choices(cfg)
    _check_numbers(cfg)
    _check_trainer(cfg)
    _check_model_args(cfg)
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"config key 'output_dir': {cfg.output_dir} is a file; give a folder for the run "
                          "(config.yaml, checkpoints/, logs)")
    return cfg


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"config key {key!r}: {msg}" if key and not msg.startswith("config key") else msg


def _refuse_removed_keys(layers: list[DictConfig]) -> None:
    for key, instead in REMOVED_KEYS.items():
        if any(OmegaConf.select(layer, key, default=None) is not None for layer in layers):
            raise ConfigError(f"config key {key!r} was removed (it did nothing): {instead}")


def _check_choices(cfg: DictConfig) -> None:
    checks = (("task", cfg.task, TASKS), ("data.kind", cfg.data.kind, DATA_KINDS),
              ("diffusion.objective", cfg.diffusion.objective, ("auto", "ddpm", "flow")),
              ("trainer.accelerator", cfg.trainer.accelerator, ACCELERATORS),
              ("trainer.precision", str(cfg.trainer.precision), PRECISIONS),
              ("checkpoint.mode", cfg.checkpoint.mode, ("min", "max")))
    for key, value, allowed in checks:
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(allowed)}")
    unknown = [name for name in cfg.loggers if name not in ("csv", "tensorboard")]
    if unknown:
        raise ConfigError(f"config key 'loggers': unknown logger(s) {unknown}; use csv and/or tensorboard")


# key -> (lowest, highest, lowest excluded?); None bounds are open. Optional keys may also be null.
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "seed": (0, 2**32 - 1, False),
    "data.image_size": (1, None, False), "data.channels": (1, None, False), "data.num_classes": (1, None, False),
"data.batch_size": (1, None, False), "data.num_workers": (0, None, False),
    "data.random_shift": (0, None, False), "data.frames": (1, None, False), "data.digit_size": (1, None, False),
    "data.num_videos": (1, None, False), "data.length": (1, None, False), "data.seed": (0, 2**32 - 1, False),
    "optim.lr": (0, None, True), "optim.weight_decay": (0, None, False), "optim.warmup_steps": (0, None, False),
    "optim.min_lr_ratio": (0, 1, False),
    "classify.label_smoothing": (0, 1, False), "classify.mixup": (0, None, False), "classify.cutmix": (0, None, False),
    "classify.mixup_prob": (0, 1, False),
    "diffusion.ema_decay": (0, 1, False), "diffusion.ema_start_step": (0, None, False),
    "diffusion.sample_steps": (0, None, False), "diffusion.guidance_scale": (0, None, False),
    "trainer.max_epochs": (1, None, False), "trainer.num_nodes": (1, None, False),
    "trainer.gradient_clip_val": (0, None, False), "trainer.accumulate_grad_batches": (1, None, False),
    "trainer.log_every_n_steps": (1, None, False), "trainer.val_check_interval": (1, None, False),
    "checkpoint.every_n_train_steps": (0, None, False), "checkpoint.save_top_k": (-1, None, False),
}


def _range_text(low: float | None, high: float | None, low_open: bool) -> str:
    parts = ([f"> {low}" if low_open else f">= {low}"] if low is not None else []) + ([f"<= {high}"] if high is not None else [])
    return " and ".join(parts)


def _check_number(key: str, value: Any, low: float | None, high: float | None, low_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value) or low is not None and (value <= low if low_open else value < low) \
            or high is not None and value > high:
        raise ConfigError(f"config key {key!r}: {value!r} is out of range; it must be {_range_text(low, high, low_open)}")


def _check_numbers(cfg: DictConfig) -> None:
    """Every numeric key in its range (and finite): a value outside would train wrong without saying so."""
    for key, bounds in _RANGES.items():
        _check_number(key, OmegaConf.select(cfg, key), *bounds)
    for i, beta in enumerate(cfg.optim.betas):
        _check_number(f"optim.betas[{i}]", beta, 0, 1)
    if len(cfg.optim.betas) != 2 or any(b >= 1 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas': {list(cfg.optim.betas)}; give two values in [0, 1), e.g. [0.9, 0.999]")
    for key in ("data.mean", "data.std"):
        values = list(OmegaConf.select(cfg, key))
        if not values or any(not math.isfinite(v) for v in values) or key == "data.std" and any(v <= 0 for v in values):
            raise ConfigError(f"config key {key!r}: {values}; give 1 or data.channels finite values"
                              + (" > 0" if key == "data.std" else ""))
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"config key 'data.val_fraction': {cfg.data.val_fraction!r}; give the held-out share, > 0 and < 1 (e.g. 0.1)")
    limit = cfg.trainer.limit_val_batches
    if limit is not None and not (0 <= limit <= 1 or limit > 1 and float(limit).is_integer()):
        raise ConfigError(f"config key 'trainer.limit_val_batches': {limit!r}; give a fraction in [0, 1] or a whole number of batches")
    if (cfg.data.kind == "moving_mnist" or cfg.data.kind == "synthetic" and cfg.data.video) and cfg.data.digit_size > cfg.data.image_size:
        raise ConfigError(f"config key 'data.digit_size': {cfg.data.digit_size} exceeds data.image_size={cfg.data.image_size}")


def _check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.max_steps != -1 and t.max_steps < 1:
        raise ConfigError(f"config key 'trainer.max_steps': {t.max_steps}; give a number of steps >= 1 "
                          "(or -1 for no step limit, with trainer.max_epochs or trainer.max_time)")
    if t.max_steps == -1 and t.max_epochs is None and t.max_time is None:
        raise ConfigError("config key 'trainer.max_steps': -1 (no step limit) needs trainer.max_epochs or trainer.max_time")
    if t.max_time is not None and not re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", t.max_time):
        raise ConfigError(f"config key 'trainer.max_time': {t.max_time!r} is not DD:HH:MM:SS (e.g. 00:12:00:00)")
    devices = t.devices
    ok = (devices == "auto" or isinstance(devices, int) and (devices >= 1 or devices == -1)
          or isinstance(devices, str) and re.fullmatch(r"-1|\d+(,\s*\d+)*,?", devices)
          or not isinstance(devices, (str, int)) and len(devices) > 0 and all(isinstance(d, int) and d >= 0 for d in devices))
    if not ok:
        raise ConfigError(f"config key 'trainer.devices': {devices!r}; give auto, a count >= 1, -1 (all), or a list of device ids")
    import torch

    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'trainer.accelerator': {t.accelerator!r} but no CUDA GPU is visible; "
                          "use trainer.accelerator=cpu (or auto)")
    _check_strategy(cfg, on_gpu=torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda"))
    wanted = devices if isinstance(devices, int) else len(devices) if not isinstance(devices, str) else None
    if wanted is not None and wanted > 0 and t.accelerator in ("gpu", "cuda") and wanted > torch.cuda.device_count():
        raise ConfigError(f"config key 'trainer.devices': {devices!r} but {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                          "give at most that many (or -1 for all)")


FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
FSDP_PRECISIONS = ("32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")  # Lightning's FSDPPrecision


def _check_strategy(cfg: DictConfig, on_gpu: bool) -> None:
    """`trainer.strategy` names a Lightning strategy and fits the accelerator and the other keys."""
    t = cfg.trainer
    from ._compat import pl

    known = ["auto", *importlib.import_module(pl.__name__ + ".strategies").StrategyRegistry.available_strategies()]
    if t.strategy not in known:
        close = difflib.get_close_matches(t.strategy, known, n=1)
        raise ConfigError(f"config key 'trainer.strategy': {t.strategy!r} is not a Lightning strategy"
                          + (f"; did you mean {close[0]!r}?" if close else "; use auto, ddp or fsdp"))
    if t.fsdp_sharding not in FSDP_SHARDING:
        raise ConfigError(f"config key 'trainer.fsdp_sharding': {t.fsdp_sharding!r} is not one of {', '.join(FSDP_SHARDING)}")
    if not t.strategy.startswith("fsdp"):
        return
    if not on_gpu:
        raise ConfigError(f"config key 'trainer.strategy': {t.strategy} needs CUDA GPUs (Lightning's FSDP refuses the CPU); "
                          "use trainer.strategy=ddp on CPU (e.g. trainer.accelerator=cpu trainer.devices=2)")
    if str(t.precision) not in FSDP_PRECISIONS:
        raise ConfigError(f"config key 'trainer.precision': {t.precision} with trainer.strategy={t.strategy}, but Lightning's "
                          f"FSDP takes {', '.join(FSDP_PRECISIONS)}; use one of those, or trainer.strategy=ddp")
    if t.compile:
        raise ConfigError("config key 'trainer.compile': true with trainer.strategy=fsdp is not supported here "
                          "(the block classes to shard are looked up before compiling); set trainer.compile=false, or use ddp")
    if cfg.task == "diffusion" and cfg.diffusion.ema_decay > 0:
        raise ConfigError("config key 'diffusion.ema_decay': > 0 with trainer.strategy=fsdp, but Lightning's EMA does not "
                          "support sharded models; set diffusion.ema_decay=0 or use trainer.strategy=ddp")


def _check_model_args(cfg: DictConfig) -> None:
    """`model.kwargs` against the zoo or timm model's constructor, before anything is built or written."""
    import zoo

    zoo.register_all_models()  # before zoo.factory: importing it first re-enters it through timm's import hook
    from zoo.factory import check_model_args, model_class

    if model_class(cfg.model.name) is None:  # a name create_model will refuse with suggestions, or an unannotated entrypoint
        return
    for key, value in OmegaConf.to_container(cfg.model.kwargs, resolve=True).items():
        try:
            check_model_args(cfg.model.name, {key: value})
        except ValueError as e:
            raise ConfigError(f"config key 'model.kwargs.{key}': {e}") from None


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config (what the run actually used), atomically."""
    from zoo.weights import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
    return path
