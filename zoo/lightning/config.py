"""Typed training config: YAML files merged with `key=value` overrides and checked.

The schema is a tree of dataclasses (OmegaConf structured config), so an unknown key or a
value of the wrong type fails at load time with the key's full path and a suggestion,
not after the model has been built. Free-form model arguments go under `model.kwargs`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASKS = ("classify", "diffusion")
DATA_KINDS = ("npz", "imagefolder", "moving_mnist", "synthetic")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelCfg:
    name: str = MISSING  # a zoo or timm model name
    pretrained: bool = False
    checkpoint_path: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to create_model (drop_path_rate, depth, ...)


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
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    ema_decay: float = 0.9999  # 0 disables EMA
    ema_start_step: int = 0
    sample_every_n_steps: int = 1000  # 0 disables periodic samples
    sample_classes: list[int] = field(default_factory=lambda: list(range(10)))
    sample_steps: int = 50
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
    fsdp_wrap: list[str] = field(default_factory=list)  # block class names; empty: every *Block class
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 20
    val_check_interval: int | None = None  # in steps; None: once per epoch
    limit_val_batches: float | None = None
    enable_progress_bar: bool = True
    deterministic: bool = False
    compile: bool = False


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
    from zoo.configs import config_path

    name = str(config)
    return config_path(name if name.endswith(".yaml") else name + ".yaml")


def load_config(config: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- YAML file <- `key=value` overrides, validated and resolved.

    Raises ConfigError naming the offending key (with a close match) or value.
    """
    schema = OmegaConf.structured(TrainConfig)
    try:
        layers = [OmegaConf.load(_resolve_path(config))] if config is not None else []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. trainer.max_steps=100)")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(schema, *layers)
        OmegaConf.resolve(cfg)
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    _check_choices(cfg)
    return cfg


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"config key {key!r}: {msg}" if key and key not in msg else msg


def _check_choices(cfg: DictConfig) -> None:
    checks = (("task", cfg.task, TASKS), ("data.kind", cfg.data.kind, DATA_KINDS),
              ("diffusion.objective", cfg.diffusion.objective, ("auto", "ddpm", "flow")))
    for key, value, allowed in checks:
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(allowed)}")
    unknown = [name for name in cfg.loggers if name not in ("csv", "tensorboard")]
    if unknown:
        raise ConfigError(f"config key 'loggers': unknown logger(s) {unknown}; use csv and/or tensorboard")


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config (what the run actually used), atomically."""
    from zoo.weights import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
    return path
