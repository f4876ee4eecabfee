"""`DiffusionModule`: train an image DiT (DDPM objective) or a video DiT (flow matching).

The objective and the sampler come from the generators (`zoo.dit`); they can also be
passed in (`loss_fn(model, x, y) -> loss`, `sample_fn(model, labels, num_steps,
guidance_scale, generator) -> samples in [-1, 1]`). EMA is Lightning's
`EMAWeightAveraging` callback (see `zoo.lightning.train`), which swaps the averaged
weights in for validation, so the periodic samples drawn there use the EMA weights.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import media
from ._compat import pl
from .optim import configure_adamw, no_weight_decay_names

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
SampleFn = Callable[..., torch.Tensor]

OBJECTIVES = ("ddpm", "flow")
DEFAULT_FLOW_SHIFT = 3.0  # flow's `shift` when objective_kwargs give none (`zoo generate-video`'s fallback too)


def _auto(objective: str, model: nn.Module) -> str:
    """`auto` -> flow for video models (5-D inputs), ddpm otherwise."""
    if objective != "auto":
        return objective
    return "flow" if len(getattr(model, "input_size", ())) == 3 else "ddpm"


def resolve_objective(objective: str, model: nn.Module, options: dict | None = None) -> tuple[LossFn, SampleFn]:
    """The generators' loss and sampler: `ddpm` (`zoo.dit.GaussianDiffusion`, sampled with
    `zoo.dit.sample`) or `flow` (`zoo.dit.FlowMatching`, `zoo.dit.sample_video`); `auto` picks
    flow for video models (5-D inputs) and ddpm otherwise.

    options: `scheduler` (sampler: ddim/ddpm/dpm or euler/unipc); ddpm: `guidance_channels`
    (default all); flow: `shift`.
    """
    from zoo import dit
    from zoo.dit.diffusion import SCHEDULERS
    from zoo.dit.flow import FLOW_SCHEDULERS

    options = dict(options or {})
    objective = _auto(objective, model)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; use one of auto, {', '.join(OBJECTIVES)}")
    if objective == "ddpm":
        unknown = set(options) - {"scheduler", "guidance_channels"}
        if unknown:
            raise ValueError(f"unknown ddpm options {sorted(unknown)}; known: scheduler, guidance_channels")
        diffusion = dit.GaussianDiffusion(learn_sigma=getattr(model, "learn_sigma", False))
        scheduler, channels = options.get("scheduler", "ddim"), options.get("guidance_channels", "all")
        _check_scheduler(scheduler, SCHEDULERS)

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return diffusion.training_losses(m, x, y)["loss"].mean()

        def sample_fn(m, labels, num_steps, guidance_scale, generator):
            return dit.sample(m, labels, num_steps=num_steps, guidance_scale=guidance_scale, scheduler=scheduler,
                              guidance_channels=channels, generator=generator, progress=False)

        return loss_fn, sample_fn
    unknown = set(options) - {"scheduler", "shift"}
    if unknown:
        raise ValueError(f"unknown flow options {sorted(unknown)}; known: scheduler, shift")
    shift, scheduler = options.get("shift", DEFAULT_FLOW_SHIFT), options.get("scheduler", "euler")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
        raise ValueError(f"diffusion.objective_kwargs.shift={shift!r}: the flow timestep shift must be a finite number > 0 (e.g. 3.0)")
    shift = float(shift)
    _check_scheduler(scheduler, FLOW_SCHEDULERS)
    flow = dit.FlowMatching(shift=shift)

    def flow_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return flow.training_losses(m, x, y=y)["loss"].mean()

    def flow_sample(m, labels, num_steps, guidance_scale, generator):
        return dit.sample_video(m, labels, num_steps=num_steps, guidance_scale=guidance_scale, scheduler=scheduler,
                                shift=shift, generator=generator, progress=False)

    return flow_loss, flow_sample


def _check_scheduler(name: str, known: tuple[str, ...]) -> None:
    """Samples are drawn at the first validation: a wrong sampler name must fail before training, not then."""
    if isinstance(name, str) and name not in known:  # (a diffusers scheduler instance is taken as given)
        raise ValueError(f"diffusion.objective_kwargs.scheduler={name!r}: use one of {', '.join(known)}")


class DiffusionModule(pl.LightningModule):
    """Train a class-conditional generator named `model_name` (or a given `model`).

    Args:
        model_name, model_kwargs: `zoo.create_model(model_name, **model_kwargs)`.
        objective: `auto`, `ddpm` (image DiT) or `flow` (video DiT); or give loss_fn/sample_fn.
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW and its per-step schedule.
        sample_classes, sample_steps, guidance_scale: the periodic sample grid (0 steps: none; classes
            default to the model's first 10).
        objective_kwargs: the objective's options (`scheduler` for samples; `shift` for flow).
        sample_dir: where grids (PNG) and videos (GIF) are written, besides the loggers.
    """

    def __init__(self, model_name: str, model_kwargs: dict | None = None, pretrained: bool = False,
                 checkpoint_path: str | None = None, objective: str = "auto", lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999), warmup_steps: int = 0,
                 min_lr_ratio: float = 1.0, no_weight_decay: Sequence[str] = ("pos_embed",),
                 sample_classes: Sequence[int] | None = None, sample_steps: int = 50, guidance_scale: float = 2.0,
                 objective_kwargs: dict | None = None, sample_dir: str | None = None, model: nn.Module | None = None,
                 loss_fn: LossFn | None = None, sample_fn: SampleFn | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "loss_fn", "sample_fn"])
        if model is None:
            import zoo

            # an export's recorded arguments apply, `model_kwargs` over them (e.g. attention='sla' over a dense run's);
            # weights of another attention backend load too (dense -> radial / SLA fine-tuning)
            model = zoo.create_model(model_name, pretrained=pretrained, checkpoint_path=checkpoint_path or None,
                                     **dict(model_kwargs or {}))
        self.model = model
        # decided here, on the unwrapped network: under FSDP the parameters are flat shards when optimizers are made
        self.no_decay_names = no_weight_decay_names(self.model, no_weight_decay)
        self.sample_classes = _sample_classes(sample_classes, getattr(model, "num_classes", None))
        # the shift our flow loss trains with (None for DDPM or a given loss_fn): exports record it as `flow_shift`,
        # so `zoo generate-video --checkpoint` samples with the schedule the weights learnt
        self.flow_shift: float | None = None
        if loss_fn is None and _auto(objective, model) == "flow":
            self.flow_shift = float(dict(objective_kwargs or {}).get("shift", DEFAULT_FLOW_SHIFT))
        if loss_fn is None or sample_fn is None:
            default_loss, default_sample = resolve_objective(objective, model, objective_kwargs)
            loss_fn, sample_fn = loss_fn or default_loss, sample_fn or default_sample
        self.loss_fn, self.sample_fn = loss_fn, sample_fn

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning checkpoints record `flow_shift` too, so `zoo generate-video --checkpoint last.ckpt` samples with it."""
        if self.flow_shift is not None:
            checkpoint["flow_shift"] = self.flow_shift

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.model, x, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        loss = self.loss_fn(self.model, x, y)
        self.log("val/loss", loss, batch_size=x.shape[0], prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def generate(self, labels: Sequence[int], seed: int = 0, num_steps: int | None = None) -> torch.Tensor:
        """Samples for `labels` in [-1, 1] (the current weights: EMA ones during validation)."""
        h = self.hparams
        y = torch.as_tensor(list(labels), device=self.device, dtype=torch.long)
        g = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            return self.sample_fn(self.model, y, num_steps=num_steps or h.sample_steps, guidance_scale=h.guidance_scale, generator=g)
        finally:
            self.model.train(was_training)

    def on_validation_epoch_end(self) -> None:
        h = self.hparams
        if self.trainer.sanity_checking or not h.sample_steps or not self.sample_classes or not self.trainer.is_global_zero:
            return
        samples = self.generate(self.sample_classes).float()
        step = self.global_step
        frames = media.video_grid(samples) if samples.ndim == 5 else None
        grid = media.make_grid(samples if frames is None else samples[:, :, 0], nrow=len(self.sample_classes))
        if h.sample_dir:
            out = Path(h.sample_dir)
            media.save_image(grid, out / f"step{step:07d}.png")
            if frames is not None:
                media.save_video(frames, out / f"step{step:07d}.gif")
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples", (grid.clamp(-1, 1) + 1) / 2, step)
            if frames is not None and hasattr(experiment, "add_video"):
                _add_video(experiment, frames, step)

    def configure_optimizers(self):
        h = self.hparams
        return configure_adamw(self, self.model, h.lr, h.weight_decay, h.betas, h.warmup_steps, h.min_lr_ratio, h.no_weight_decay)


def _sample_classes(classes: Sequence[int] | None, num_classes: int | None) -> list[int]:
    """The labels of the periodic samples: given ones checked now (not at the first validation), else the first 10."""
    if classes is None:
        return list(range(min(10, num_classes))) if num_classes else []
    classes = list(classes)
    bad = [c for c in classes if num_classes is not None and not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"diffusion.sample_classes {bad}: the model has classes 0..{num_classes - 1}; "
                         f"sample those (e.g. diffusion.sample_classes=[0,1])")
    return classes


def _add_video(experiment: Any, frames: torch.Tensor, step: int) -> None:
    """TensorBoard videos need moviepy; without it the GIF in sample_dir is the record."""
    try:
        import moviepy  # noqa: F401
    except ModuleNotFoundError:
        return
    experiment.add_video("samples_video", ((frames.clamp(-1, 1) + 1) / 2)[None], step, fps=8)
