"""Scoring generated digits with a trained digit classifier (image samples and Moving-MNIST frames).

Generated samples are in the generators' data range [-1, 1]; the classifier gets them with
its own normalisation (`pretrained_cfg` mean/std). For videos every frame is scored: the
digit is found by its intensity centroid, cropped at the size it was rendered at in the
dataset, scaled back to MNIST's 28 px and padded to the classifier's input, so the score
is per-frame digit accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _normalise(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c = pixels.shape[1]
    mean = torch.tensor(cfg.get("mean", (0.5,) * c), dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5,) * c), dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class ids for images `[N, C, H, W]` in [-1, 1] (resized to the classifier's input when needed)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", images.shape[1:]))[-2:]
    device = next(model.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        pixels = (chunk.float().clamp(-1, 1) + 1) / 2
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(model(_normalise(model, pixels.to(device))).argmax(-1).cpu())
    return torch.cat(out)


def crop_digits(frames: torch.Tensor, digit_size: int = 16, out_size: int = 32, mnist_size: int = 28) -> torch.Tensor:
    """Frames `[N, C, H, W]` in [-1, 1] -> the digit in each, as an MNIST-like `[N, C, out, out]` image in [-1, 1]."""
    n, c, h, w = frames.shape
    ink = ((frames.float().clamp(-1, 1) + 1) / 2).mean(1) ** 2  # squared: background noise weighs little
    total = ink.flatten(1).sum(1).clamp_min(1e-6)
    ys = (ink.sum(2) * torch.arange(h)).sum(1) / total
    xs = (ink.sum(1) * torch.arange(w)).sum(1) / total
    crops = []
    for i in range(n):
        y0 = int(round(float(ys[i]) - (digit_size - 1) / 2))
        x0 = int(round(float(xs[i]) - (digit_size - 1) / 2))
        y0, x0 = min(max(y0, 0), h - digit_size), min(max(x0, 0), w - digit_size)
        crops.append(frames[i, :, y0:y0 + digit_size, x0:x0 + digit_size])
    crops = torch.stack(crops).float()
    crops = F.interpolate((crops + 1) / 2, size=(mnist_size, mnist_size), mode="bilinear", align_corners=False)
    m = (out_size - mnist_size) // 2
    return F.pad(crops, (m, out_size - mnist_size - m, m, out_size - mnist_size - m)) * 2 - 1


def image_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images `[N, C, H, W]` the classifier labels as `labels`."""
    return (predict(classifier, images) == labels.cpu()).float().mean().item()


def frame_accuracy(classifier: nn.Module, videos: torch.Tensor, labels: torch.Tensor, digit_size: int = 16) -> float:
    """Per-frame digit accuracy of videos `[N, C, F, H, W]` whose digit should be `labels` `[N]`."""
    n, c, f, h, w = videos.shape
    frames = videos.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)
    return image_accuracy(classifier, crop_digits(frames, digit_size), labels.cpu().repeat_interleave(f))
