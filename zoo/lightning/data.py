"""Datasets and Lightning DataModules: `.npz` images, ImageFolder, Moving-MNIST, synthetic.

Images come out as float `[C, H, W]` normalised with the config's mean/std, videos as
`[C, F, H, W]`; every item is `(tensor, label)`. Moving-MNIST videos are rendered on the
fly from digit images, each item a pure function of `(seed, index)`, so a dataset is
reproducible and costs no memory beyond the digits.
"""
from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ._compat import pl


def fit_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[N, C, h, w]` -> `[N, C, size, size]`: zero-pad when the margin is even (MNIST 28 -> 32), else resize."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h == w and size > h and (size - h) % 2 == 0:
        m = (size - h) // 2
        return F.pad(images, (m, m, m, m))
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`images` (N, H, W[, C]) uint8 and `labels` (N,) from an `.npz` -> float `[N, C, H, W]` in [0, 1], long labels."""
    with np.load(path) as f:
        missing = [k for k in ("images", "labels") if k not in f]
        if missing:
            raise ValueError(f"{path}: needs arrays 'images' and 'labels'; missing {missing} (has {list(f.keys())})")
        images, labels = f["images"], f["labels"]
    x = torch.from_numpy(images)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if images.dtype == np.uint8 else x.float()
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def split(n: int, val_fraction: float, stage: str) -> slice:
    """Train = the first `1 - val_fraction`, val = the rest (the `.npz` is assumed shuffled); both non-empty."""
    n_val = int(round(n * val_fraction))
    if not 0 < n_val < n:
        raise ValueError(f"data.val_fraction={val_fraction} holds out {n_val} of {n} samples, leaving "
                         f"{'no validation' if n_val <= 0 else 'no training'} data; give a fraction that keeps both non-empty")
    return slice(0, n - n_val) if stage == "train" else slice(n - n_val, n)


class TensorImages(Dataset):
    """In-memory images `[N, C, H, W]` in [0, 1] with labels; normalises and optionally shifts."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float], random_shift: int = 0):
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        self.images, self.labels, self.random_shift = images, labels, random_shift
        c = images.shape[1]
        self.mean = torch.tensor(_per_channel(mean, c)).view(c, 1, 1)
        self.std = torch.tensor(_per_channel(std, c)).view(c, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.random_shift:
            s = self.random_shift
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = F.pad(x, (s, s, s, s))[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
        return (x - self.mean) / self.std, self.labels[i]


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    values = list(values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"mean/std have {len(values)} values for {channels} channels; give 1 or {channels}")
    return values


def _bounce(p: float, v: float, span: float) -> tuple[float, float]:
    """Reflect a position that left [0, span] back inside, reversing the velocity (as often as it takes: a step
    of up to 3 px can cross a span narrower than that; a digit that fills the frame stays put)."""
    if span <= 0:
        return 0.0, v
    while not 0 <= p <= span:
        p, v = (-p, -v) if p < 0 else (2 * span - p, -v)
    return p, v


class MovingDigits(Dataset):
    """Moving-MNIST: one digit bouncing off the borders of a `size` x `size` frame.

    Each item is rendered from `(seed, index)`: a digit drawn from `digits`, a start position
    and a velocity (1 to 3 px per frame, any direction); the label is the digit's class, so
    videos can be generated class-conditionally and scored per frame by a digit classifier.
    Returns `[C, frames, size, size]` normalised with mean/std, and the label.
    """

    def __init__(self, digits: torch.Tensor, labels: torch.Tensor, num_videos: int, frames: int = 16, size: int = 32,
                 digit_size: int = 16, seed: int = 0, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)):
        if digit_size > size:
            raise ValueError(f"digit_size={digit_size} must not exceed the frame size {size}")
        self.digits = fit_size(digits, digit_size) if digits.shape[-1] != digit_size else digits
        self.labels, self.num_videos, self.frames, self.size, self.seed = labels, num_videos, frames, size, seed
        c = digits.shape[1]
        self.mean = torch.tensor(_per_channel(mean, c)).view(c, 1, 1, 1)
        self.std = torch.tensor(_per_channel(std, c)).view(c, 1, 1, 1)

    def __len__(self) -> int:
        return self.num_videos

    def trajectory(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        span = self.size - self.digits.shape[-1]
        y, x = rng.uniform(0, span, size=2)
        angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(1.0, 3.0)
        vy, vx = speed * math.sin(angle), speed * math.cos(angle)
        out = []
        for _ in range(self.frames):
            out.append((int(round(y)), int(round(x))))
            y, vy = _bounce(y + vy, vy, span)
            x, vx = _bounce(x + vx, vx, span)
        return out

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, i))
        j = int(rng.integers(len(self.digits)))
        digit, d = self.digits[j], self.digits.shape[-1]
        video = torch.zeros(digit.shape[0], self.frames, self.size, self.size)
        for f, (y, x) in enumerate(self.trajectory(rng)):
            video[:, f, y:y + d, x:x + d] = digit
        return (video - self.mean) / self.std, self.labels[j]


def synthetic_images(num_classes: int, channels: int, size: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable toy data: one smooth random template per class plus noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(num_classes, channels, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.arange(length) % num_classes
    noise = 0.15 * torch.randn(length, channels, size, size, generator=g)
    return (templates[labels] + noise).clamp(0, 1), labels


def _npz_shape(path: str | Path, key: str) -> tuple[int, ...]:
    """The shape of array `key` in an `.npz`, read from its header (the array itself is not loaded)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return header(f)[0]


def check_npz(cfg) -> None:
    """`data.path`'s arrays fit the config: `images` (N, H, W[, C]) with `data.channels` channels last, one label
    per image, labels in [0, data.num_classes) (a channels-first array or an 11th class fails here, not mid-training)."""
    try:
        with np.load(cfg.path) as f:
            missing = [k for k in ("images", "labels") if k not in f]
            labels = f["labels"] if not missing else None
    except (OSError, ValueError, zipfile.BadZipFile):
        raise ValueError(f"data.path={cfg.path}: not an .npz NumPy can read; save one with "
                         "np.savez(path, images=..., labels=...)") from None
    if missing:
        raise ValueError(f"data.path={cfg.path}: needs arrays 'images' and 'labels'; missing {missing}")
    shape = _npz_shape(cfg.path, "images")
    channels = shape[3] if len(shape) == 4 else 1
    where = f"data.path={cfg.path}: 'images' has shape {shape}"
    if len(shape) not in (3, 4):
        raise ValueError(f"{where}; give (N, H, W) or channels-last (N, H, W, C)")
    if channels != cfg.channels:
        fix = ("save it channels-last: np.moveaxis(images, 1, -1)" if len(shape) == 4 and shape[1] == cfg.channels
               else f"set data.channels={channels}")
        raise ValueError(f"{where}, read as channels-last (N, H, W, C): {channels} channels, but data.channels={cfg.channels}; {fix}")
    if labels.shape != (shape[0],):
        raise ValueError(f"data.path={cfg.path}: 'labels' has shape {labels.shape} for {shape[0]} images; give one label per image")
    if labels.size and labels.min() < 0:
        raise ValueError(f"data.path={cfg.path}: 'labels' holds {labels.min()}; give 0-based class ids 0..{cfg.num_classes - 1}")
    if labels.size and labels.max() >= cfg.num_classes:
        raise ValueError(f"data.path={cfg.path}: 'labels' holds {labels.max()}, beyond the classes 0..{cfg.num_classes - 1} of "
                         f"data.num_classes={cfg.num_classes}; set data.num_classes={labels.max() + 1}")


def check_paths(cfg) -> None:
    """The files `cfg.kind` reads exist (a missing `data.path` is named before any model is built or trained)."""
    if cfg.kind in ("npz", "moving_mnist"):
        what = "an .npz with 'images' and 'labels'" + (" (digits, e.g. mnist8k.npz)" if cfg.kind == "moving_mnist" else "")
        if not cfg.path:
            raise ValueError(f"data.path is not set: data.kind={cfg.kind} needs data.path=FILE, {what}")
        if not Path(cfg.path).is_file():
            raise FileNotFoundError(f"data.path={cfg.path}: no such file; give {what}")
        check_npz(cfg)
    if cfg.kind == "imagefolder":
        for key in ("train_dir", "val_dir"):
            if not cfg[key] or not Path(cfg[key]).is_dir():
                raise ValueError(f"data.{key}={cfg[key]!r} is not a folder (ImageFolder layout: <dir>/<class>/<image>)")


class ZooDataModule(pl.LightningDataModule):
    """Common loaders; subclasses build `self.train_set` / `self.val_set` in `setup`."""

    def __init__(self, cfg):
        super().__init__()
        check_paths(cfg)  # at construction: a missing file is named before the model trains
        self.cfg = cfg
        self.train_set = self.val_set = None

    def _loader(self, dataset, train: bool) -> DataLoader:
        sampler = self.train_sampler(dataset) if train else None
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, drop_last=train,
                          num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_sampler(self, dataset: Dataset) -> DistributedSampler:
        """The same training order on any number of processes: one permutation per epoch (seeded by `data.seed`
        and the epoch, which Lightning sets), of which process r of W takes every W-th index.

        So W processes at `batch_size` b see, step for step, the samples one process sees at batch W*b (a
        DDP run matches a one-device run at the same global batch, and resumes on another device count
        continue the same order). Lightning leaves a `DistributedSampler` in place.
        """
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.cfg.seed, drop_last=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)


class NpzDataModule(ZooDataModule):
    """Images and labels from an `.npz` (e.g. MNIST digits); the last `val_fraction` is held out."""

    def setup(self, stage: str | None = None) -> None:
        c = self.cfg
        images, labels = load_npz(c.path)
        images = fit_size(images, c.image_size)
        tr, va = split(len(images), c.val_fraction, "train"), split(len(images), c.val_fraction, "val")
        self.train_set = TensorImages(images[tr], labels[tr], c.mean, c.std, c.random_shift)
        self.val_set = TensorImages(images[va], labels[va], c.mean, c.std)


class ImageFolderDataModule(ZooDataModule):
    """`train_dir` / `val_dir` laid out as torchvision's ImageFolder (one folder per class)."""

    def setup(self, stage: str | None = None) -> None:
        from torchvision import datasets, transforms

        c = self.cfg
        base = [transforms.Grayscale(1)] if c.channels == 1 else [transforms.Lambda(lambda im: im.convert("RGB"))]
        base += [transforms.Resize(c.image_size), transforms.CenterCrop(c.image_size)]
        tail = [transforms.ToTensor(), transforms.Normalize(_per_channel(c.mean, c.channels), _per_channel(c.std, c.channels))]
        shift = [transforms.RandomCrop(c.image_size, padding=c.random_shift)] if c.random_shift else []
        self.train_set = datasets.ImageFolder(c.train_dir, transforms.Compose(base + shift + tail))
        self.val_set = datasets.ImageFolder(c.val_dir, transforms.Compose(base + tail))


class MovingMNISTDataModule(ZooDataModule):
    """Moving-MNIST videos from an `.npz` of digits; validation videos use held-out digits."""

    def setup(self, stage: str | None = None) -> None:
        c = self.cfg
        digits, labels = load_npz(c.path)
        tr, va = split(len(digits), c.val_fraction, "train"), split(len(digits), c.val_fraction, "val")
        kw = dict(frames=c.frames, size=c.image_size, digit_size=c.digit_size, mean=c.mean, std=c.std)
        self.train_set = MovingDigits(digits[tr], labels[tr], c.num_videos, seed=c.seed, **kw)
        self.val_set = MovingDigits(digits[va], labels[va], max(c.batch_size, c.num_videos // 20), seed=c.seed + 1, **kw)


class SyntheticDataModule(ZooDataModule):
    """Class templates plus noise (images, or moving templates with `video=True`): for smoke tests."""

    def setup(self, stage: str | None = None) -> None:
        c = self.cfg
        if c.video:
            templates, labels = synthetic_images(c.num_classes, c.channels, c.digit_size, c.num_classes, c.seed)
            kw = dict(frames=c.frames, size=c.image_size, digit_size=c.digit_size, mean=c.mean, std=c.std)
            self.train_set = MovingDigits(templates, labels, c.length, seed=c.seed, **kw)
            self.val_set = MovingDigits(templates, labels, max(c.batch_size, c.length // 8), seed=c.seed + 1, **kw)
            return
        images, labels = synthetic_images(c.num_classes, c.channels, c.image_size, c.length + max(c.batch_size, c.length // 8), c.seed)
        self.train_set = TensorImages(images[:c.length], labels[:c.length], c.mean, c.std, c.random_shift)
        self.val_set = TensorImages(images[c.length:], labels[c.length:], c.mean, c.std)


DATAMODULES = {"npz": NpzDataModule, "imagefolder": ImageFolderDataModule,
               "moving_mnist": MovingMNISTDataModule, "synthetic": SyntheticDataModule}


def build_datamodule(cfg) -> ZooDataModule:
    """The DataModule for `cfg.kind` (a `DataCfg`)."""
    return DATAMODULES[cfg.kind](cfg)
