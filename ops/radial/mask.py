"""Radial attention (Li et al., NeurIPS 2025): the static block mask, built exactly as the official code.

The mask is built frame pair by frame pair, exactly as `mit-han-lab/radial-attention`
(`radial_attn/attn_mask.py` at 72788d4) builds it, so a mask computed here selects the same
128 x 128 blocks as the official one:

1. Query frame i, key frame j, distance d = |i - j|, band g = bitlen(d) (Python
   `int.bit_length`: 1 -> 1, 2..3 -> 2, 4..7 -> 3, ...).
2. Window w (tokens, along the raster order inside a frame): s (= tokens per frame) when
   d = 0 or d = 1 (Wan with `legacy=True`: s // 2 at d = 1); otherwise
   2**bitlen(s) / 2**g * decay_factor, floored at `block_size`.
3. Diagonal thinning: dl0 = 2**bitlen(s) / 2**g (no decay factor). If dl0 < 128 the whole
   frame pair is kept only when d % int(128 / dl0) == 0 (128 is hard-coded there, whatever
   the block size).
4. Wan's attention sink: every pair with key frame 0 is dense (HunyuanVideo has none).
5. Element (r, c) of the pair is kept iff |c - r| <= w (r, c raster indices in the frames).
6. The pair's token mask sits in a canvas offset by (i*s mod B, j*s mod B), ceil(s/B) blocks
   on each side (content past the canvas is dropped), and is shrunk to B x B blocks: a block is
   kept iff more than 60% of its nonzero columns have column density (true rows / B) > 1/3.
   The pairs' blocks are OR-ed into the global mask at block (i*s // B, j*s // B).
7. Every block row and column from `video_tokens // B` on (text tokens, and a partial last
   video block) is dense.

Faithful: the official code needs `num_frames * tokens_per_frame` (and the text) to be a
multiple of the block size (issue #34); here any length works. The mask then has
ceil(N / B) blocks, the partial last video block is dense in rows and columns (what the
official code did while it still zero-padded q/k/v), and `block_sparse_attention` masks the
tokens past the end instead of letting zero-padded keys into the softmax.
"""
from __future__ import annotations

import functools
import math
import struct

import torch

from .._checks import check_allocation

MODELS = ("wan", "hunyuan")
THINNING_THRESHOLD = 128  # tokens; hard-coded in the official `get_diagonal_split_mask`


def _float32(x: float) -> float:
    """The official code compares integer distances with a Python float inside torch, i.e. in float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def pair_window(
    d: int, tokens_per_frame: int, decay_factor: float, block_size: int, model: str, legacy: bool
) -> int | None:
    """Largest kept |c - r| for a frame pair at distance `d`, or None if the pair is dropped.

    Covers steps 1-3 of the rule (not the sink, which depends on the key frame index).
    """
    s = tokens_per_frame
    band = d.bit_length()
    nominal = 2 ** s.bit_length() / 2**band
    if nominal < THINNING_THRESHOLD and d % int(THINNING_THRESHOLD / nominal) != 0:
        return None
    if d == 0 or (d == 1 and not (model == "wan" and legacy)):
        window = s
    elif d == 1:
        window = s // 2
    else:
        decayed = nominal * decay_factor
        window = max(decayed, block_size)
    return math.floor(_float32(min(window, s)))  # any window >= s keeps the whole pair


@functools.lru_cache(maxsize=256)
def _shrunk_band(s: int, window: int, row_offset: int, col_offset: int, block_size: int) -> torch.Tensor:
    """Blocks kept by the shrink rule for one frame pair's band |c - r| <= window.

    Canvas rows/cols [0, nb*B), content at [offset, offset + s). Instead of building the
    s x s mask we count, for every canvas column x and row block a, the content rows in
    block a within the band: an interval intersection.
    """
    B = block_size
    nb = -(-s // B)
    x = torch.arange(nb * B)
    c = (x - col_offset)[None, :]  # content column index
    a = torch.arange(nb)[:, None]
    lo = torch.maximum(torch.clamp(a * B - row_offset, min=0), c - window)
    hi = torch.minimum(torch.clamp(a * B + B - row_offset, max=s), c + window + 1)
    counts = (hi - lo).clamp_min(0) * ((c >= 0) & (c < s))  # [nb, nb*B]
    counts = counts.view(nb, nb, B)
    nonzero = (counts > 0).sum(-1)
    dense = (3 * counts > B).sum(-1)  # column density > 1/3
    return 5 * dense > 3 * nonzero  # more than 60% of the nonzero columns are dense


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_mask_args(num_frames, tokens_per_frame, decay_factor, block_size, model, text_tokens, legacy) -> None:
    _check_int("num_frames", num_frames, 1)
    _check_int("tokens_per_frame", tokens_per_frame, 1)
    _check_int("block_size", block_size, 1)
    _check_int("text_tokens", text_tokens, 0)
    if not isinstance(decay_factor, (int, float)) or not math.isfinite(decay_factor) or decay_factor < 0:
        raise ValueError(f"decay_factor must be a finite number >= 0, got {decay_factor!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if legacy and model != "wan":
        raise ValueError(f"legacy=True changes only the Wan rule (d = 1 window s // 2); got model={model!r}")
    n_blocks = -(-(num_frames * tokens_per_frame + text_tokens) // block_size)
    check_allocation(f"the radial block mask [{n_blocks}, {n_blocks}] (bool)",
                     n_blocks * n_blocks, "use a larger block_size or fewer frames/tokens")


@functools.lru_cache(maxsize=16)
def _radial_block_mask(*args) -> torch.Tensor:
    with torch.device("cpu"):  # cached and shared: never on the caller's default device (e.g. a meta-device build)
        return _build_radial_block_mask(*args)


def _build_radial_block_mask(num_frames, tokens_per_frame, decay_factor, block_size, model, text_tokens, legacy):
    s, B = tokens_per_frame, block_size
    video = num_frames * s
    n_blocks = -(-(video + text_tokens) // B)
    mask = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    windows = [pair_window(d, s, decay_factor, B, model, legacy) for d in range(num_frames)]
    for i in range(num_frames):
        for j in range(num_frames):
            window = s if j == 0 and model == "wan" else windows[abs(i - j)]  # Wan: key frame 0 is a sink
            if window is None:
                continue
            blocks = _shrunk_band(s, window, i * s % B, j * s % B, B)
            r0, c0 = i * s // B, j * s // B
            mask[r0 : r0 + blocks.shape[0], c0 : c0 + blocks.shape[1]] |= blocks
    mask[video // B :] = True
    mask[:, video // B :] = True
    return mask


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    decay_factor: float,
    block_size: int = 128,
    model: str = "wan",
    text_tokens: int = 0,
    legacy: bool = False,
) -> torch.Tensor:
    """The radial attention block mask, bool `[ceil(N/B), ceil(N/B)]`, N = frames*tokens + text.

    Tokens are frame-major (frame, row, col), video first, then `text_tokens` (HunyuanVideo's
    joint attention). `model='wan'` adds the key-frame-0 sink; `legacy=True` is the Wan rule
    before radial-attention 72788d4 (window s // 2 at frame distance 1). See the module
    docstring for the rule. Cached per argument tuple (a fresh copy is returned).

    Memory: O(ceil(N/B)^2) bools plus O(s^2 / B) per distinct frame-pair canvas; no token-level
    mask is built.
    """
    check_mask_args(num_frames, tokens_per_frame, decay_factor, block_size, model, text_tokens, legacy)
    return _radial_block_mask(
        num_frames, tokens_per_frame, float(decay_factor), block_size, model, text_tokens, bool(legacy)
    ).clone()


@functools.lru_cache(maxsize=16)
def device_mask(args: tuple, device: torch.device) -> torch.Tensor:
    """`[1, 1, nb, nb]` mask of checked `radial_block_mask` arguments on `device` (cached: never modify it)."""
    return _radial_block_mask(*args).to(device)[None, None]
