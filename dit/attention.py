"""Attention backends shared by the image and video DiTs.

A DiT block computes q, k, v `[B, heads, N, head_dim]` with its own projections and hands
them to a backend together with the token grid (`(H, W)` or `(F, H, W)`, tokens in raster
order, frame-major) and the sampler's step index. Backends own no weights of the block, so
switching `attention=` keeps every checkpoint key; only SLA adds its zero-initialised
projection of the linear branch (`...attn.backend.sla.proj_l.*`), which
`fill_backend_keys` supplies when a dense checkpoint is loaded into an SLA model.

The sparse backends call `zoo.ops` (radial mask + block-sparse attention, SLA, NA); a
backend whose op this install lacks raises at construction, naming the missing op.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

ATTENTION_BACKENDS = ("dense", "radial", "sla", "na")


def _require_op(name: str, backend: str):
    from zoo import ops

    op = getattr(ops, name, None)
    if op is None:
        raise ImportError(f"attention={backend!r} needs zoo.ops.{name}, which this install of zoo lacks; use attention='dense'")
    return op


def _per_axis(name: str, value: int | Sequence[int], rank: int) -> tuple[int, ...]:
    values = (value,) * rank if isinstance(value, int) else tuple(value)
    if len(values) != rank:
        raise ValueError(f"{name} needs one value per token-grid axis ({rank}), got {value!r}")
    return values


class DenseAttention(nn.Module):
    """Softmax attention over all tokens (`zoo.ops.dense_attention`: flash-attn-4 on Hopper/Blackwell when
    installed, PyTorch SDPA otherwise)."""

    name = "dense"

    def __init__(self):
        super().__init__()
        self._attend = _require_op("dense_attention", "dense")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        return self._attend(q, k, v)

    def skipped_fraction(self, grid: tuple[int, ...]) -> float:
        """Share of query-key pairs left out for a token `grid`: none."""
        return 0.0


class RadialAttention(nn.Module):
    """Radial attention (`zoo.ops.radial_attention`) for a video of `num_frames` x `tokens_per_frame`.

    The mask is fixed by the video size the model was built for (as the official MaskMap
    is); a video of another size is an error instead of a silently wrong mask. Dense layers and
    steps follow `zoo.ops.SparsityPolicy` (first `dense_layers` blocks, first
    `dense_timesteps` sampler steps); training calls (no step index) count as sparse steps.
    """

    name = "radial"

    def __init__(self, num_frames: int, tokens_per_frame: int, layer_index: int = 0, decay_factor: float = 1.0,
                 block_size: int = 128, dense_layers: int = 0, dense_timesteps: int = 0, mask_model: str = "wan"):
        super().__init__()
        self._attend = _require_op("radial_attention", "radial")
        self._dense = _require_op("dense_attention", "radial")  # the policy's dense layers and steps
        self.policy = _require_op("SparsityPolicy", "radial")(dense_layers=dense_layers, dense_timesteps=dense_timesteps)
        self.num_frames, self.tokens_per_frame = int(num_frames), int(tokens_per_frame)
        self.layer_index, self.decay_factor, self.block_size, self.mask_model = layer_index, decay_factor, block_size, mask_model
        _require_op("radial_block_mask", "radial")(self.num_frames, self.tokens_per_frame, decay_factor,
                                                   block_size=block_size, model=mask_model)  # bad settings fail here

    def _check_grid(self, grid: tuple[int, ...]) -> None:
        frames, per_frame = grid[0], grid[1] * grid[2]
        if (frames, per_frame) != (self.num_frames, self.tokens_per_frame):
            raise ValueError(
                f"the radial mask was built for {self.num_frames} latent frames x {self.tokens_per_frame} tokens per "
                f"frame, but the input has {frames} frames x {per_frame} tokens: create the model with the input's "
                "latent size (input_size=(frames, height, width))")

    def skipped_fraction(self, grid: tuple[int, ...]) -> float:
        """Share of query-key token pairs outside the radial mask at a sparse step (0 for the policy's dense layers)."""
        self._check_grid(grid)
        if self.layer_index < self.policy.dense_layers:
            return 0.0
        from zoo.ops.radial import block_mask_pairs, radial_block_mask

        n = self.num_frames * self.tokens_per_frame
        mask = radial_block_mask(self.num_frames, self.tokens_per_frame, self.decay_factor, block_size=self.block_size,
                                 model=self.mask_model)
        kept = block_mask_pairs(mask, n, n, self.block_size, self.block_size)
        return 1.0 - kept / n**2

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        self._check_grid(grid)
        step = self.policy.dense_timesteps if step_index is None else step_index  # training: a sparse step
        if not self.policy.use_sparse(self.layer_index, step):
            return self._dense(q, k, v)
        return self._attend(q, k, v, self.num_frames, self.tokens_per_frame, self.decay_factor,
                            block_size=self.block_size, model=self.mask_model)


class SparseLinearBackend(nn.Module):
    """SLA (`zoo.ops.SparseLinearAttention`): top-k blocks exact, the rest through linear attention.

    Its projection `sla.proj_l` is zero-initialised, so a model switched from dense starts as
    pure top-k block-sparse attention.
    """

    name = "sla"

    def __init__(self, head_dim: int, **sla_kwargs):
        super().__init__()
        self.sla = _require_op("SparseLinearAttention", "sla")(head_dim, **sla_kwargs)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        return self.sla(q, k, v)

    def skipped_fraction(self, grid: tuple[int, ...]) -> float:
        """Share of key blocks outside the exact top-k branch for a token `grid` (they go through the linear branch)."""
        return self.sla.skipped_fraction(math.prod(grid))


class NeighborhoodBackend(nn.Module):
    """Neighborhood attention over the token grid (`zoo.ops.na2d` / `na3d`).

    `kernel_size`, `dilation`, `stride` are per axis (an int means every axis); stride equal
    to a tile gives sliding-tile attention; kernel equal to the grid is dense attention.
    """

    name = "na"

    def __init__(self, rank: int, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1, stride: int | Sequence[int] = 1):
        super().__init__()
        if rank not in (2, 3):
            raise ValueError(f"neighborhood attention needs a 2-D or 3-D token grid, got rank {rank}")
        self._op = _require_op(f"na{rank}d", "na")
        self.kernel_size = _per_axis("kernel_size", kernel_size, rank)
        self.dilation = _per_axis("dilation", dilation, rank)
        self.stride = _per_axis("stride", stride, rank)

    def skipped_fraction(self, grid: tuple[int, ...]) -> float:
        """Share of keys outside an interior query's window for a token `grid` (border queries see as many)."""
        return 1.0 - math.prod(min(k, g) for k, g in zip(self.kernel_size, grid)) / math.prod(grid)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        b, h, n, d = q.shape

        def heads_last(t: torch.Tensor) -> torch.Tensor:  # NATTEN layout [B, *grid, heads, head_dim]
            return t.transpose(1, 2).reshape(b, *grid, h, t.shape[-1])

        out = self._op(heads_last(q), heads_last(k), heads_last(v), kernel_size=self.kernel_size, dilation=self.dilation, stride=self.stride)
        return out.reshape(b, n, h, out.shape[-1]).transpose(1, 2)


def build_backend(attention: str, *, head_dim: int, grid: tuple[int, ...], layer_index: int, options: dict | None = None) -> nn.Module:
    """The backend module `attention` for one block; `options` are that backend's arguments.

    radial: decay_factor, block_size, dense_layers, dense_timesteps, mask_model (video only);
    sla: topk and the other `SparseLinearAttention` arguments; na: kernel_size (required),
    dilation, stride.
    """
    options = dict(options or {})
    try:
        if attention == "dense":
            if options:
                raise TypeError(f"unexpected options {sorted(options)}")
            return DenseAttention()
        if attention == "radial":
            if len(grid) != 3:
                raise ValueError("attention='radial' needs video (frames, height, width) tokens; use video_dit_* models")
            return RadialAttention(grid[0], grid[1] * grid[2], layer_index=layer_index, **options)
        if attention == "sla":
            return SparseLinearBackend(head_dim, **options)
        if attention == "na":
            if "kernel_size" not in options:
                raise ValueError("attention='na' needs attention_kwargs=dict(kernel_size=...) (int or one per axis)")
            return NeighborhoodBackend(len(grid), **options)
    except TypeError as e:
        raise ValueError(f"bad attention_kwargs for attention={attention!r}: {e}") from e
    raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")


def fill_backend_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint of this architecture trained with any attention, completed for `model`'s backends.

    Keys that exist only in `model`'s attention backends (SLA's `proj_l`) and are absent from
    `state` take the model's own initial values (zero for SLA, so outputs start as the sparse
    part alone). Every other key must still match: load the result with `strict=True`.
    """
    own = model.state_dict()
    filled = dict(state)
    for key, value in own.items():
        if ".backend." in key and key not in filled:
            filled[key] = value
    return filled
