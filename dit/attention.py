"""Attention backends shared by the image and video DiTs, as one registry of backend classes.

A DiT block computes q, k, v `[B, heads, N, head_dim]` with its own projections and hands
them to a backend together with the token grid (`(H, W)` or `(F, H, W)`, tokens in raster
order, frame-major) and the sampler's step index. Backends own no weights of the block, so
switching `attention=` keeps every checkpoint key; only SLA adds its zero-initialised
projection of the linear branch (`...attn.backend.sla.proj_l.*`), which
`fill_backend_keys` supplies when a dense checkpoint is loaded into an SLA model.

Every backend is an `AttentionBackend` subclass registered under its `name`: the DiTs build
theirs with `build_backend`, and the CLI (`zoo generate-video --attention`, `zoo bench model`)
and the sparsity report read the same registry (`attention_backends`, `get_backend`). A
backend of your own becomes `attention="mine"` everywhere once registered::

    @zoo.dit.register_backend
    class Windowed(zoo.dit.AttentionBackend):
        name = "windowed"
        options = ("window",)                       # the attention_kwargs it accepts

        def __init__(self, window: int = 64):      # defaults live here (options are its keywords)
            super().__init__()
            self.window = window

        def forward(self, q, k, v, grid, step_index=None): ...
        def skipped_fraction(self, grid): ...       # share of query-key pairs left out

    zoo.create_model("video_dit_s_2", attention="windowed", attention_kwargs=dict(window=32))

Override `check_options` to refuse bad values before anything is built (one-line
`ValueError` naming the option and the fix) and `from_options` when the constructor needs
the head dim, the grid or the block index.

The sparse backends call `zoo.ops` (radial mask + block-sparse attention, SLA, NA); a
backend whose op this install lacks raises at construction, naming the missing op.
"""
from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn

_BACKENDS: dict[str, type[AttentionBackend]] = {}  # name -> class, in registration order


def _require_op(name: str, backend: str):
    from zoo import ops

    op = getattr(ops, name, None)
    if op is None:
        raise ImportError(f"attention={backend!r} needs zoo.ops.{name}, which this install of zoo lacks; use attention='dense'")
    return op


class AttentionBackend(nn.Module, abc.ABC):
    """The self-attention of one DiT block, chosen by `name` (`attention=`) with `options` (`attention_kwargs`).

    `forward(q, k, v, grid, step_index)` maps `[B, heads, N, head_dim]` tensors of the tokens on
    `grid` to the output of the same shape; `step_index` is the sampler's 0-based step (None in
    training). `skipped_fraction(grid)` is the share of query-key pairs it leaves out there.
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()  # the attention_kwargs it accepts: keywords of its constructor

    @classmethod
    def check_options(cls, options: dict[str, Any], head_dim: int, grid: tuple[int, ...]) -> None:
        """Raise a one-line ValueError naming a bad option and the fix (this base refuses unknown names)."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            takes = f"it takes {', '.join(cls.options)}" if cls.options else "it takes none"
            raise ValueError(f"attention_kwargs {unknown} are not options of this backend ({takes}): drop or rename them")

    @classmethod
    def with_defaults(cls, options: dict[str, Any]) -> dict[str, Any]:
        """`options` completed with the constructor's defaults (for checks that need every value)."""
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: params[k].default for k in cls.options if k in params and params[k].default is not inspect.Parameter.empty}
        return {**defaults, **options}

    @classmethod
    def from_options(cls, *, head_dim: int, grid: tuple[int, ...], layer_index: int, options: dict[str, Any]) -> AttentionBackend:
        """The backend of block `layer_index` (options already checked); by default `cls(**options)`."""
        return cls(**options)

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                step_index: int | None = None) -> torch.Tensor: ...

    @abc.abstractmethod
    def skipped_fraction(self, grid: tuple[int, ...]) -> float:
        """Share of query-key pairs left out for a token `grid` (0 for dense attention)."""


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    """Class decorator: `cls` becomes `attention=cls.name` for every DiT, `zoo generate-video` and `zoo bench model`."""
    if not (isinstance(cls, type) and issubclass(cls, AttentionBackend)):
        raise TypeError(f"register_backend takes an AttentionBackend subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise ValueError(f"{cls.__qualname__}.name must be an identifier such as 'windowed', got {cls.name!r}")
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__qualname__} must define {', '.join(sorted(cls.__abstractmethods__))} to be registered")
    if cls.name in _BACKENDS:
        other = _BACKENDS[cls.name]
        raise ValueError(f"attention backend {cls.name!r} is registered twice ({other.__module__}.{other.__qualname__} "
                         f"and {cls.__module__}.{cls.__qualname__}): choose another name")
    _BACKENDS[cls.name] = cls
    return cls


def attention_backends() -> tuple[str, ...]:
    """The registered backend names, built-in ones first."""
    return tuple(_BACKENDS)


def get_backend(name: str) -> type[AttentionBackend]:
    """The backend class registered as `name`; an unknown name lists the registered ones."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention {name!r}; choose one of {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


@register_backend
class DenseAttention(AttentionBackend):
    """Softmax attention over all tokens (`zoo.ops.dense_attention`: flash-attn-4 on Hopper/Blackwell when
    installed, PyTorch SDPA otherwise)."""

    name = "dense"

    def __init__(self):
        super().__init__()
        self._attend = _require_op("dense_attention", self.name)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        return self._attend(q, k, v)

    def skipped_fraction(self, grid: tuple[int, ...]) -> float:
        """Share of query-key pairs left out for a token `grid`: none."""
        return 0.0


@register_backend
class RadialAttention(AttentionBackend):
    """Radial attention (`zoo.ops.radial_attention`) for a video of `num_frames` x `tokens_per_frame`.

    The mask is fixed by the video size the model was built for (as the official MaskMap
    is); a video of another size is an error instead of a silently wrong mask. Dense layers and
    steps follow `zoo.ops.SparsityPolicy` (first `dense_layers` blocks, first
    `dense_timesteps` sampler steps); training calls (no step index) count as sparse steps.
    """

    name = "radial"
    options = ("decay_factor", "block_size", "dense_layers", "dense_timesteps", "mask_model")

    def __init__(self, num_frames: int, tokens_per_frame: int, layer_index: int = 0, decay_factor: float = 1.0,
                 block_size: int = 128, dense_layers: int = 0, dense_timesteps: int = 0, mask_model: str = "wan"):
        super().__init__()
        self._attend = _require_op("radial_attention", self.name)
        self._dense = _require_op("dense_attention", self.name)  # the policy's dense layers and steps
        self.policy = _require_op("SparsityPolicy", self.name)(dense_layers=dense_layers, dense_timesteps=dense_timesteps)
        self.num_frames, self.tokens_per_frame = int(num_frames), int(tokens_per_frame)
        self.layer_index, self.decay_factor, self.block_size, self.mask_model = layer_index, decay_factor, block_size, mask_model

    @classmethod
    def check_options(cls, options: dict[str, Any], head_dim: int, grid: tuple[int, ...]) -> None:
        if len(grid) != 3:
            raise ValueError("needs video (frames, height, width) tokens; use video_dit_* models")
        super().check_options(options, head_dim, grid)
        values = cls.with_defaults(options)
        _require_op("SparsityPolicy", cls.name)(dense_layers=values["dense_layers"], dense_timesteps=values["dense_timesteps"])
        mask = _require_op("radial_block_mask", cls.name)
        try:  # the op calls the option `model`
            mask(1, 1, 1.0, block_size=1, model=values["mask_model"])
        except ValueError as e:
            raise ValueError(f"mask_model: {e}") from None
        mask(grid[0], grid[1] * grid[2], values["decay_factor"], block_size=values["block_size"], model=values["mask_model"])

    @classmethod
    def from_options(cls, *, head_dim: int, grid: tuple[int, ...], layer_index: int, options: dict[str, Any]) -> RadialAttention:
        return cls(grid[0], grid[1] * grid[2], layer_index=layer_index, **options)

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


@register_backend
class SparseLinearBackend(AttentionBackend):
    """SLA (`zoo.ops.SparseLinearAttention`): top-k blocks exact, the rest through linear attention.

    Its projection `sla.proj_l` is zero-initialised, so a model switched from dense starts as
    pure top-k block-sparse attention. The options are `SparseLinearAttention`'s arguments.
    """

    name = "sla"
    options = ("topk", "negligible", "linear_on", "feature_map", "block_size", "eps")

    def __init__(self, head_dim: int, **sla_kwargs):
        super().__init__()
        self.sla = _require_op("SparseLinearAttention", self.name)(head_dim, **sla_kwargs)

    @classmethod
    def check_options(cls, options: dict[str, Any], head_dim: int, grid: tuple[int, ...]) -> None:
        super().check_options(options, head_dim, grid)
        cls(head_dim, **options)  # SparseLinearAttention checks every value; a head_dim x head_dim projection is cheap

    @classmethod
    def from_options(cls, *, head_dim: int, grid: tuple[int, ...], layer_index: int, options: dict[str, Any]) -> SparseLinearBackend:
        return cls(head_dim, **options)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        return self.sla(q, k, v)

    def skipped_fraction(self, grid: tuple[int, ...]) -> float:
        """Share of key blocks outside the exact top-k branch for a token `grid` (they go through the linear branch)."""
        return self.sla.skipped_fraction(math.prod(grid))


@register_backend
class NeighborhoodBackend(AttentionBackend):
    """Neighborhood attention over the token grid (`zoo.ops.na2d` / `na3d`).

    `kernel_size` (required), `dilation`, `stride` are per axis (an int means every axis);
    stride equal to a tile gives sliding-tile attention; kernel equal to the grid is dense attention.
    """

    name = "na"
    options = ("kernel_size", "dilation", "stride")

    def __init__(self, rank: int, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1, stride: int | Sequence[int] = 1):
        super().__init__()
        if rank not in (2, 3):
            raise ValueError(f"neighborhood attention needs a 2-D or 3-D token grid, got rank {rank}")
        self._op = _require_op(f"na{rank}d", self.name)
        from zoo.ops.na import normalize_args

        self.kernel_size, self.dilation, self.stride, _ = normalize_args(rank, kernel_size, dilation, stride, False)

    @classmethod
    def check_options(cls, options: dict[str, Any], head_dim: int, grid: tuple[int, ...]) -> None:
        super().check_options(options, head_dim, grid)
        if "kernel_size" not in options:
            raise ValueError("needs attention_kwargs=dict(kernel_size=...) (int or one per axis)")
        cls.from_options(head_dim=head_dim, grid=grid, layer_index=0, options=options)  # checks rank and every value

    @classmethod
    def from_options(cls, *, head_dim: int, grid: tuple[int, ...], layer_index: int, options: dict[str, Any]) -> NeighborhoodBackend:
        return cls(len(grid), **options)

    def skipped_fraction(self, grid: tuple[int, ...]) -> float:
        """Share of keys outside an interior query's window for a token `grid` (border queries see as many)."""
        return 1.0 - math.prod(min(k, g) for k, g in zip(self.kernel_size, grid)) / math.prod(grid)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        b, h, n, d = q.shape

        def heads_last(t: torch.Tensor) -> torch.Tensor:  # NATTEN layout [B, *grid, heads, head_dim]
            return t.transpose(1, 2).reshape(b, *grid, h, t.shape[-1])

        out = self._op(heads_last(q), heads_last(k), heads_last(v), kernel_size=self.kernel_size, dilation=self.dilation, stride=self.stride)
        return out.reshape(b, n, h, out.shape[-1]).transpose(1, 2)


def build_backend(attention: str, *, head_dim: int, grid: tuple[int, ...], layer_index: int, options: dict | None = None) -> AttentionBackend:
    """The registered backend `attention` for block `layer_index`, its `options` checked first (one-line errors)."""
    backend = get_backend(attention)
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"attention_kwargs must be a dict of attention={attention!r}'s options, got {type(options).__name__}")
    options = dict(options or {})
    try:
        backend.check_options(options, head_dim, grid)
    except (TypeError, ValueError) as e:
        raise ValueError(f"attention={attention!r}: {e}") from None
    return backend.from_options(head_dim=head_dim, grid=grid, layer_index=layer_index, options=options)


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
