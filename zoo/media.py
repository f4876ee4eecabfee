"""Writing generated images and videos: PNG grids, one file per sample, MP4 and GIF.

Tensors are in the model's data range [-1, 1]; images `[N, C, H, W]`, videos `[N, C, F, H, W]`.
MP4 goes through imageio-ffmpeg (the `video` extra); GIF needs only Pillow.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] `[..., C, H, W]` -> uint8 `[..., H, W, C]`."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile `[N, C, H, W]` into one `[C, H', W']` image, `nrow` images per row (default: about square)."""
    n, c, h, w = images.shape
    if nrow is not None and nrow < 1:
        raise ValueError(f"nrow must be >= 1 (images per grid row), got {nrow}")
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = images.new_full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), -1.0)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def _writable(path: Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the folder for {path}: {e.strerror}") from None
    if path.is_dir():
        raise OSError(f"{path} is a folder; give a file name")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OSError(f"cannot write {path}: permission denied")
    return path


def check_writable(path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    """Fail before any work if `path` has the wrong suffix or cannot be written."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"output {path} must end in {' or '.join(suffixes)}")
    return _writable(path)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """One `[C, H, W]` image in [-1, 1] as PNG."""
    from PIL import Image

    path = _writable(Path(path))
    arr = to_uint8(image)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
    return path


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """`[N, C, H, W]` as one PNG grid."""
    return save_image(make_grid(images, nrow), path)


def video_grid(videos: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """`[N, C, F, H, W]` -> `[F, C, H', W']`: each frame a grid of the N videos."""
    return torch.stack([make_grid(videos[:, :, f], nrow) for f in range(videos.shape[2])])


def save_video(frames: torch.Tensor, path: str | os.PathLike, fps: int = 8) -> Path:
    """`[F, C, H, W]` in [-1, 1] as `.mp4` (imageio-ffmpeg, H.264) or `.gif` (Pillow)."""
    if not 0 < fps <= 1000:  # a GIF frame lasts a whole number of milliseconds
        raise ValueError(f"fps must be > 0 and <= 1000, got {fps}")
    path = _writable(Path(path))
    arr = to_uint8(frames)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(a) for a in arr]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    try:
        import imageio.v2 as imageio
    except ModuleNotFoundError:
        raise ModuleNotFoundError("writing MP4 needs imageio[ffmpeg]: pip install 'attnzoo[video]', or write a .gif") from None
    # H.264 wants even sides; pad to a multiple of 16 to avoid ffmpeg's resize warning
    h, w = arr.shape[1:3]
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)))
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=16) as writer:
        for a in arr:
            writer.append_data(a)
    return path


def count_frames(path: str | os.PathLike) -> int:
    """Frames in an MP4 or GIF written by `save_video`."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image

        with Image.open(path) as im:
            return im.n_frames
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:
        return sum(1 for _ in reader)
