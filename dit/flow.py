"""Flow matching (rectified flow) for the video DiT, with Wan's timestep shift.

Convention (Wan / diffusers' flow-match schedulers): x_sigma = (1 - sigma) x_0 + sigma noise,
the model predicts the velocity `noise - x_0`, and sees the timestep `1000 * sigma`. The shift
s maps a uniform sigma u to `s u / (1 + (s - 1) u)`, spending more steps at high noise.
Sampling goes through diffusers' FlowMatchEulerDiscreteScheduler or UniPCMultistepScheduler
(flow_prediction), imported lazily.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn

FLOW_SCHEDULERS = ("euler", "unipc")


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's shift: `shift * sigma / (1 + (shift - 1) * sigma)`."""
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowMatching:
    """The rectified-flow training objective.

    Args:
        shift: timestep shift applied to uniformly drawn sigmas (Wan: 5.0 for T2V, 3.0 at 480p
            I2V); 1.0 is plain rectified flow.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift, self.num_train_timesteps = shift, num_train_timesteps

    def training_losses(self, model: nn.Module, x_start: torch.Tensor, sigma: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None, **cond) -> dict[str, torch.Tensor]:
        """Per-sample `{"loss"}` `[B]`: MSE between the predicted and true velocity.

        `cond` goes to the model (`y=` labels or `context=` text embeddings).
        """
        b = x_start.shape[0]
        if sigma is None:
            sigma = shift_sigma(torch.rand(b, device=x_start.device, generator=generator), self.shift)
        if noise is None:
            noise = torch.randn(x_start.shape, device=x_start.device, dtype=x_start.dtype, generator=generator)
        s = sigma.reshape(-1, *([1] * (x_start.ndim - 1))).to(x_start.dtype)
        x_t = (1 - s) * x_start + s * noise
        pred = model(x_t, sigma * self.num_train_timesteps, **cond)
        loss = ((pred - (noise - x_start)) ** 2).mean(dim=tuple(range(1, x_start.ndim)))
        return {"loss": loss}


def make_flow_scheduler(name: str, shift: float):
    """diffusers' flow-matching Euler or UniPC (flow_prediction, as Wan's diffusers port) with `shift`."""
    import diffusers

    if name == "euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                                 use_flow_sigmas=True, flow_shift=shift)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(FLOW_SCHEDULERS)} or pass a diffusers scheduler")


@torch.no_grad()
def sample_video(
    model: nn.Module,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    negative_context: torch.Tensor | None = None,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    scheduler: str | object = "unipc",
    shift: float = 5.0,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw latent videos `[B, C, F, H, W]` from a `zoo.dit.VideoDiT` (decode with the matching video VAE).

    Args:
        class_labels: one label per sample (class-conditional models).
        context / negative_context: text embeddings `[B, L, context_dim]` (text models); the
            negative one is the unconditional branch of guidance.
        guidance_scale: classifier-free guidance (1 = none); needs the null class, or
            `negative_context` for text models.
        scheduler: `euler`, `unipc` (Wan's default) or a diffusers scheduler instance.
        shift: Wan's timestep shift (5.0 T2V; 3.0 at 480p).
        batch_size: samples for unconditional models.
        generator: a `torch.Generator` on the model's device, for reproducible samples.
    """
    device = next(model.parameters()).device
    use_cfg = guidance_scale != 1.0
    cond, uncond = {}, {}
    if model.num_classes > 0:
        if class_labels is None:
            raise ValueError("this model is class-conditional: pass class_labels")
        y = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if y.numel() == 0 or y.min() < 0 or y.max() >= model.num_classes:
            raise ValueError(f"class_labels must be ids in [0, {model.num_classes}), got {y.tolist()}")
        if use_cfg and model.null_class is None:
            raise ValueError("guidance_scale != 1 needs a null class, but this model has none (class_dropout_prob=0)")
        cond["y"], b = y, y.shape[0]
        if use_cfg:
            uncond["y"] = torch.full_like(y, model.null_class)
    if model.context_dim:
        if context is None:
            raise ValueError("this model is text-conditional: pass context=[B, L, context_dim] embeddings")
        cond["context"], b = context.to(device), context.shape[0]
        if use_cfg:
            if negative_context is None:
                raise ValueError("guidance_scale != 1 with a text model needs negative_context (the unconditional branch)")
            negative = negative_context.to(device)
            uncond["context"] = negative.expand(b, *negative.shape[1:]) if negative.shape[0] == 1 else negative
    if not cond:
        if use_cfg:
            raise ValueError("guidance needs a conditional model (class labels or text)")
        b = batch_size or 1
    sched = make_flow_scheduler(scheduler, shift) if isinstance(scheduler, str) else scheduler
    sched.set_timesteps(num_steps, device=device)
    shape = (b, model.in_channels, *model.input_size)
    x = torch.randn(shape, generator=generator, device=device) if latents is None else latents.to(device)
    if tuple(x.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(x.shape)}")
    # one batch for both guidance branches when their inputs stack (text lengths may differ)
    batched = use_cfg and all(cond[k].shape == uncond[k].shape for k in cond)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond} if batched else cond
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        for i, t in enumerate(tqdm(sched.timesteps, disable=not progress, desc="video DiT sampling")):
            x_in = torch.cat([x, x]) if batched else x
            out = model(x_in, t.float().expand(x_in.shape[0]).to(device), step_index=i, **both)
            if use_cfg:
                c, u = out.chunk(2) if batched else (out, model(x, t.float().expand(b).to(device), step_index=i, **uncond))
                out = u + guidance_scale * (c - u)
            x = sched.step(out, t, x, **step_kwargs).prev_sample
    finally:
        model.train(was_training)
    return x
