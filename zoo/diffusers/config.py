"""Configs of the diffusers attention plugins: one dataclass per attention, validated on construction."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from zoo.ops import SparseLinearAttention, SparsityPolicy
from zoo.ops.na import normalize_args


def _axes(name: str, value: Any) -> tuple[int, int, int]:
    """An int or three ints (frames, height, width), as a tuple of three."""
    values = (value,) * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (tuple, list)) or len(values) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"{name} must be an int or three ints (frames, height, width), got {value!r}")
    return tuple(values)


@dataclass(frozen=True, kw_only=True)
class _SerializableConfig:
    """`to_dict` / `from_dict` shared by every plugin config."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (tuples become lists); `from_dict` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict got unknown keys {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True, kw_only=True)
class _PluginConfig(_SerializableConfig):
    """Shared by every plugin: the first `dense_layers` blocks and `dense_timesteps` sampler steps stay dense.

    Dense means the model's own processor (diffusers' `dispatch_attention_fn`, so
    `set_attention_backend` picks its kernel). Calls with autograd on in a model in train mode
    (fine-tuning) count as sparse steps.
    """

    kind: ClassVar[str] = ""
    dense_layers: int = 0
    dense_timesteps: int = 0

    def __post_init__(self) -> None:
        SparsityPolicy(dense_layers=self.dense_layers, dense_timesteps=self.dense_timesteps)  # validates both

    @property
    def policy(self) -> SparsityPolicy:
        return SparsityPolicy(dense_layers=self.dense_layers, dense_timesteps=self.dense_timesteps)


@dataclass(frozen=True, kw_only=True)
class RadialAttentionConfig(_PluginConfig):
    """Radial attention (`zoo.ops.radial_block_mask`, the official mask rule).

    `decay_factor` shrinks the window of distant frame pairs; `block_size` is the mask's block
    (the official 128); `legacy` is Wan's rule before radial-attention 72788d4. Wan gets the
    key-frame-0 sink; HunyuanVideo and CogVideoX the rule without it. Text rows and columns
    stay dense.
    """

    kind: ClassVar[str] = "radial"
    decay_factor: float = 1.0
    block_size: int = 128
    legacy: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decay_factor, bool) or not isinstance(self.decay_factor, (int, float)) or not (
            math.isfinite(self.decay_factor) and self.decay_factor >= 0
        ):
            raise ValueError(f"decay_factor must be a finite number >= 0, got {self.decay_factor!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1 (the kernel wants a multiple of 16), got {self.block_size!r}")
        if not isinstance(self.legacy, bool):
            raise ValueError(f"legacy must be a bool, got {self.legacy!r}")


@dataclass(frozen=True, kw_only=True)
class SLAConfig(_PluginConfig):
    """Sparse-linear attention (`zoo.ops.SparseLinearAttention`): top-`topk` blocks exact, the rest linear.

    Each sparse layer gets its own learnable `proj_l` (zero-initialised, so an untrained model
    runs top-k block-sparse attention), saved with the model as
    `<attention>.processor.sla.proj_l.*`; `convert_turbowan_sla_keys` maps TurboWan checkpoints.
    """

    kind: ClassVar[str] = "sla"
    topk: float = 0.05
    negligible: float = 0.0
    linear_on: str = "marginal"
    feature_map: str = "softmax"
    block_size: int | tuple[int, int] = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        self.build(head_dim=1)  # SparseLinearAttention validates topk, negligible, linear_on, feature_map
        block = self.block_size if isinstance(self.block_size, (tuple, list)) else (self.block_size,)
        if not 1 <= len(block) <= 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block):
            raise ValueError(f"block_size must be an int >= 1 or (block_q, block_k), got {self.block_size!r}")

    def build(self, head_dim: int) -> SparseLinearAttention:
        """The per-layer SLA module (its `proj_l` is the layer's learnable projection)."""
        return SparseLinearAttention(head_dim, topk=self.topk, negligible=self.negligible, linear_on=self.linear_on,
                                     feature_map=self.feature_map, block_size=self.block_size)


@dataclass(frozen=True, kw_only=True)
class NeighborhoodAttentionConfig(_PluginConfig):
    """3-D neighborhood attention (`zoo.ops.na3d`) over the (frames, height, width) latent tokens.

    `kernel_size`, `dilation`, `stride` are an int or one per axis (frames, height, width); a
    kernel longer than an axis covers the whole axis (so one config serves every resolution).
    Text tokens (HunyuanVideo, CogVideoX) are extra keys every video query sees; text queries
    stay dense.
    """

    kind: ClassVar[str] = "na"
    kernel_size: int | tuple[int, int, int] = 7
    dilation: int | tuple[int, int, int] = 1
    stride: int | tuple[int, int, int] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "kernel_size", _axes("kernel_size", self.kernel_size))
        object.__setattr__(self, "dilation", _axes("dilation", self.dilation))
        object.__setattr__(self, "stride", _axes("stride", self.stride))
        normalize_args(3, self.kernel_size, self.dilation, self.stride, False)


CONFIGS = (RadialAttentionConfig, SLAConfig, NeighborhoodAttentionConfig)


_BY_KIND = {config.kind: config for config in CONFIGS}  # each kind is also the name of the VideoDiT backend


def to_video_dit(config: _PluginConfig) -> tuple[str, dict[str, Any]]:
    """(`attention`, `attention_kwargs`) that give the zoo's `VideoDiT` the same attention as `config`.

    The VideoDiT backend's `options` (`zoo.dit.get_backend(config.kind)`) say which fields carry
    over; any other field must keep its default (SLA and NA have no dense layers or steps in the
    VideoDiT, radial no legacy rule), else this is an error.
    """
    from zoo.dit import get_backend

    takes = get_backend(config.kind).options
    options = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in takes:
            options[field.name] = value
        elif value != field.default:
            raise ValueError(f"VideoDiT's {config.kind} backend has no {field.name}; set {field.name}={field.default!r}")
    return config.kind, options


def from_video_dit(attention: str, attention_kwargs: dict[str, Any] | None = None) -> _PluginConfig:
    """The plugin config of a VideoDiT's `attention` / `attention_kwargs` (`mask_model` is dropped: the
    plugin takes the mask rule from the diffusers model it is applied to)."""
    if attention not in _BY_KIND:
        raise ValueError(f"attention must be one of {sorted(_BY_KIND)} to become a plugin, got {attention!r}")
    options = {k: v for k, v in (attention_kwargs or {}).items() if k != "mask_model"}
    return _BY_KIND[attention].from_dict(options)
