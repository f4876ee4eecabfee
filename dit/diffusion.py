"""DiT's Gaussian diffusion: the training objective (ADM, as facebookresearch/DiT:diffusion uses it)
and sampling through diffusers' schedulers.

Training: 1000 steps, linear betas 1e-4..0.02, epsilon prediction with MSE, plus, when the
model learns sigma, the variational bound term on the learned-range variance with the mean
detached (`frozen_out` in the original); loss type MSE (not rescaled).

Sampling: `sample(...)` runs DDPM (the paper's 250 respaced steps; diffusers' `linspace`
spacing gives exactly ADM's `space_timesteps(1000, "250")`), DDIM or DPM-Solver++, with
classifier-free guidance on the first 3 latent channels (the original, "for exact
reproducibility") or on all of them (the standard, and diffusers'), and decodes through
diffusers' `AutoencoderKL` (`latents / 0.18215`). diffusers is imported only here, lazily.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

VAE_SOURCES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
LATENT_SCALE = 0.18215  # the SD VAE's latent scale, as DiT's train.py / sample.py use it
SCHEDULERS = ("ddpm", "ddim", "dpm")


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM's decoder term at t = 0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """The DiT training diffusion (`create_diffusion(timestep_respacing="")` of the original).

    Args:
        learn_sigma: the model outputs `[eps, v]` (2x channels); v in [-1, 1] interpolates the
            log variance between the clipped posterior variance and beta (LEARNED_RANGE).
        num_timesteps: training steps (betas are scaled by 1000 / num_timesteps, as ADM does).
    """

    def __init__(self, learn_sigma: bool = True, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        scale = 1000 / num_timesteps
        self.learn_sigma, self.num_timesteps = learn_sigma, num_timesteps
        betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)
        acp = torch.cumprod(1.0 - betas, dim=0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.betas, self.alphas_cumprod = betas, acp
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = acp.sqrt(), (1.0 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod = (1.0 / acp).sqrt(), (1.0 / acp - 1).sqrt()
        posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # Faithful: log of the posterior variance with t=0 replaced by t=1 (it is 0 at t=0)
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`table[t]` as float32, broadcastable against `like`."""
        out = table.to(t.device)[t].float()
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        return self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t

    def _vb_bits(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The VLB term in bits per dim `[B]`: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), decoder NLL at t=0."""
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._at(torch.log(self.betas), t, x_t)
        frac = (v + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        model_mean = self.q_posterior_mean(pred_xstart, x_t, t)
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, min_log, model_mean, model_log_variance)) / math.log(2.0)
        decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model: nn.Module, x_start: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses `{"loss", "mse"[, "vb"]}` (each `[B]`); train on `loss.mean()`.

        Args:
            model: called as `model(x_t, t, y)`.
            x_start: clean latents `[B, C, H, W]` (the SD VAE's latents times 0.18215).
            y: class labels `[B]`.
            t: timesteps `[B]` (default: uniform over [0, num_timesteps)).
        """
        b = x_start.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=x_start.device, generator=generator)
        if noise is None:
            noise = torch.randn(x_start.shape, device=x_start.device, dtype=x_start.dtype, generator=generator)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, t, y)
        c = x_start.shape[1]
        if out.shape[1] != (2 * c if self.learn_sigma else c):
            raise ValueError(f"model outputs {out.shape[1]} channels; learn_sigma={self.learn_sigma} needs "
                             f"{2 * c if self.learn_sigma else c} for {c}-channel inputs")
        eps = out[:, :c]
        terms = {"mse": _mean_flat((noise - eps) ** 2)}
        if self.learn_sigma:
            # Faithful: the VLB trains only the variance; the mean (eps) is detached
            terms["vb"] = self._vb_bits(x_start, x_t, t, eps.detach(), out[:, c:])
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms


def make_scheduler(name: str, learn_sigma: bool = True):
    """A diffusers scheduler for DiT's training diffusion (linear betas 1e-4..0.02, 1000 steps).

    `ddpm`: ancestral, learned-range variance when the model learns sigma (else ADM's
    fixed-large), `linspace` spacing = ADM respacing; `ddim`: eta 0, `leading` spacing = ADM's
    `ddimN`; `dpm`: DPM-Solver++ (2nd order multistep). No clipping of x0 (DiT samples with
    clip_denoised=False).
    """
    import diffusers

    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")
    if name == "ddpm":
        return diffusers.DDPMScheduler(**common, variance_type="learned_range" if learn_sigma else "fixed_large",
                                       clip_sample=False, timestep_spacing="linspace")
    if name == "ddim":
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    if name == "dpm":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or pass a diffusers scheduler")


def load_vae(vae: str | nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """`'ema'` / `'mse'` (stabilityai/sd-vae-ft-*, downloaded by diffusers) or an `AutoencoderKL`."""
    if isinstance(vae, str):
        if vae not in VAE_SOURCES:
            raise ValueError(f"unknown vae {vae!r}; choose one of {', '.join(VAE_SOURCES)} or pass an AutoencoderKL")
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(VAE_SOURCES[vae])
    return vae.to(device).eval()


def guide(out: torch.Tensor, guidance_scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance on a `[cond; uncond]` batch: returns the guided cond half.

    The first `channels` output channels become `uncond + s * (cond - uncond)`; the others
    (the rest of eps with the original's 3-channel rule, and the variance) stay the cond half's.
    """
    cond, uncond = out.chunk(2, dim=0)
    guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def _step(scheduler, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    return scheduler.step(model_output, t, x, **kwargs).prev_sample


def _labels(class_labels: Sequence[int] | torch.Tensor, num_classes: int, device) -> torch.Tensor:
    y = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
    if y.numel() == 0 or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"class_labels must be ids in [0, {num_classes}), got {y.tolist()}")
    return y


@torch.no_grad()
def sample(
    model: nn.Module,
    class_labels: Sequence[int] | torch.Tensor,
    num_steps: int = 250,
    guidance_scale: float = 1.0,
    scheduler: str | object = "ddpm",
    vae: str | nn.Module | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    guidance_channels: int | str | None = None,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw samples from a class-conditional DiT.

    Args:
        model: a `zoo.dit.DiT` (any attention backend).
        class_labels: one label per sample.
        num_steps: sampler steps (250 for the paper's DDPM; ~25-50 for DDIM / DPM-Solver++).
        guidance_scale: classifier-free guidance scale (1 = none; the paper: 1.5 for FID, 4 for
            visuals). Needs a model trained with label dropout (a null class).
        scheduler: `ddpm`, `ddim`, `dpm` or a diffusers scheduler instance.
        vae: None (return latents, or pixels for pixel-space models), `'ema'` / `'mse'`
            (stabilityai/sd-vae-ft-*, downloaded by diffusers) or an `AutoencoderKL`.
        generator: a `torch.Generator` on the model's device, for reproducible samples.
        guidance_channels: how many eps channels guidance changes: None = the original DiT's
            first 3 for 4-channel latent models (reproduces the released samples) and all
            channels otherwise; `'all'`; or an int.
        latents: the initial noise `[B, C, H, W]` (default: drawn from `generator`).

    Returns:
        `[B, C, H, W]`: images in [0, 1] when decoded through a VAE, else the final latents.
    """
    device = next(model.parameters()).device
    y = _labels(class_labels, model.num_classes, device)
    b, c = y.shape[0], model.in_channels
    use_cfg = guidance_scale != 1.0
    if use_cfg and model.null_class is None:
        raise ValueError("guidance_scale != 1 needs a null class, but this model has none (class_dropout_prob=0): "
                         "use guidance_scale=1 or a model trained with label dropout")
    if guidance_channels is None:
        guidance_channels = 3 if c == 4 else "all"
    channels = c if guidance_channels == "all" else int(guidance_channels)
    if not 1 <= channels <= c:
        raise ValueError(f"guidance_channels must be 'all' or in [1, {c}], got {guidance_channels!r}")
    sched = make_scheduler(scheduler, model.learn_sigma) if isinstance(scheduler, str) else scheduler
    sched.set_timesteps(num_steps, device=device)
    shape = (b, c, *model.input_size)
    x = torch.randn(shape, generator=generator, device=device) if latents is None else latents.to(device)
    if tuple(x.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(x.shape)}")
    x = x * sched.init_noise_sigma
    learned_variance = model.learn_sigma and getattr(sched.config, "variance_type", None) == "learned_range"
    labels = torch.cat([y, torch.full_like(y, model.null_class)]) if use_cfg else y
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        for i, t in enumerate(tqdm(sched.timesteps, disable=not progress, desc="DiT sampling")):
            x_in = sched.scale_model_input(torch.cat([x, x]) if use_cfg else x, t)
            out = model(x_in, torch.full((x_in.shape[0],), int(t), device=device), labels, step_index=i)
            if use_cfg:
                out = guide(out, guidance_scale, channels)
            x = _step(sched, out if learned_variance else out[:, :c], t, x, generator)
    finally:
        model.train(was_training)
    if vae is None:
        return x
    decoder = load_vae(vae, device)
    images = decoder.decode(x / LATENT_SCALE).sample
    return (images / 2 + 0.5).clamp(0, 1)
