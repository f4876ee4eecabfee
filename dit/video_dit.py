"""Video DiT: a latent video diffusion transformer in the Wan2.1 mould, built on `zoo.ops`.

Latent video `[B, C, F, H, W]` -> patches (1, 2, 2) -> DiT blocks -> velocity (flow matching,
`zoo.dit.flow`). Wan's parts: 3-D RoPE on self-attention q/k with the per-head dim split into
temporal `d - 4*(d//6)`, height and width `2*(d//6)` each (interleaved pairs, theta 10000),
RMSNorm on q and k over the full width, an ungated cross-attention to text embeddings after
an affine LayerNorm, GELU(tanh) MLP. Conditioning follows DiT: adaLN-Zero from the timestep
plus a class label (with a null class for guidance), or, for text models, cross-attention.

There is no official checkpoint of this model; the S/B/L sizes are DiT's (depth/width/heads),
class-conditional on 101 labels (UCF-101) by default. The RoPE equals diffusers'
WanRotaryPosEmbed (tested). Deviations from Wan: DiT's per-block adaLN Linear instead of Wan's
shared time projection plus per-block table, modulation in the model's dtype (Wan: fp32), a
fused qkv Linear, and no image (I2V) branch.
`attention=` picks the self-attention backend (`dense`, `radial`, `sla`, `na`, or one registered
with `zoo.dit.register_backend`; see `zoo.dit.attention`); cross-attention is always dense, as in the radial and SLA ports of Wan.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from zoo._registry import register_model
from zoo.factory import load_generator_weights

from ._common import DiTGeneratorMixin
from .attention import build_backend, fill_backend_keys
from .dit import FinalLayer, LabelEmbedder, TimestepEmbedder, modulate


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of the per-head dim into (temporal, height, width) rotary dims."""
    if head_dim % 2:
        raise ValueError(f"3-D RoPE needs an even head_dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation angles `[F*H*W, head_dim/2]` for frame-major tokens: per axis a, pair j of that
    axis turns by `pos_a / theta^(2j / dim_a)`."""
    angles = []
    positions = torch.meshgrid(*(torch.arange(n, dtype=torch.float64, device=device) for n in grid), indexing="ij")
    for pos, dim in zip(positions, rope_axis_dims(head_dim)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        angles.append(pos.reshape(-1, 1) * freqs)
    return torch.cat(angles, dim=1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs `(x[2j], x[2j+1])` of `x` `[B, heads, N, D]` by `angles` `[N, D/2]`.

    Computed in float32 at least (as Wan, which rotates in float64 complex), cast back to x's dtype.
    """
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    cos, sin = angles.cos().to(pairs.dtype), angles.sin().to(pairs.dtype)
    x0, x1 = pairs.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    """Fused qkv, RMSNorm on q/k, 3-D RoPE, pluggable backend, output projection."""

    def __init__(self, dim: int, num_heads: int, backend: nn.Module, qk_norm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x: torch.Tensor, angles: torch.Tensor, grid: tuple[int, ...], step_index: int | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v))
        out = self.backend(apply_rope(q, angles), apply_rope(k, angles), v, grid, step_index)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Dense attention from video tokens to (embedded) text tokens, RMSNorm on q/k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        k, v = self.kv(context).chunk(2, dim=-1)
        q, k = self.q_norm(self.q(x)), self.k_norm(k)
        q, k, v = (t.reshape(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class VideoDiTBlock(nn.Module):
    """adaLN-Zero self-attention and MLP; between them, for text models, ungated cross-attention (Wan)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: nn.Module, cross_attention: bool, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, backend, qk_norm)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=_gelu_tanh)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None, angles: torch.Tensor,
                grid: tuple[int, ...], step_index: int | None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), angles, grid, step_index)
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class VideoDiT(DiTGeneratorMixin, nn.Module):
    """Latent video DiT predicting the flow-matching velocity `[B, C, F, H, W]`.

    Args:
        input_size: latent `(frames, height, width)` for FLOP counts, sampling and the radial
            mask; other sizes run with every backend except radial (its mask is per size).
        patch_size: `(t, h, w)` patch, (1, 2, 2) as Wan.
        in_channels: latent channels (16 for Wan's VAE).
        hidden_size, depth, num_heads, mlp_ratio: transformer size.
        num_classes: class-conditional with this many labels (0: none).
        class_dropout_prob: label dropout (> 0 adds the null class for guidance).
        context_dim: text-embedding width for cross-attention (e.g. 4096 for umT5; None: no text).
        qk_norm: RMSNorm on q and k (Wan).
        rope_theta: RoPE base.
        attention / attention_kwargs: the self-attention backend (`zoo.dit.attention_backends()`) and its options.
    """

    def __init__(
        self,
        input_size: Sequence[int] = (16, 32, 32),
        patch_size: Sequence[int] = (1, 2, 2),
        in_channels: int = 16,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 101,
        class_dropout_prob: float = 0.1,
        context_dim: int | None = None,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        attention: str = "dense",
        attention_kwargs: dict | None = None,
    ):
        super().__init__()
        self.input_size, self.patch_size = tuple(input_size), tuple(patch_size)
        if len(self.input_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"input_size and patch_size must be (frames, height, width), got {input_size} and {patch_size}")
        self._check_divisible(self.input_size)
        self.in_channels = self.out_channels = in_channels
        self.num_heads, self.head_dim, self.rope_theta = num_heads, hidden_size // num_heads, rope_theta
        self.num_classes, self.context_dim, self.attention = num_classes, context_dim, attention
        grid = tuple(s // p for s, p in zip(self.input_size, self.patch_size))

        self.x_embedder = nn.Conv3d(in_channels, hidden_size, self.patch_size, stride=self.patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.context_embedder = Mlp(context_dim, hidden_size, hidden_size, act_layer=_gelu_tanh) if context_dim else None
        self.blocks = nn.ModuleList([
            VideoDiTBlock(hidden_size, num_heads, mlp_ratio,
                          build_backend(attention, head_dim=self.head_dim, grid=grid, layer_index=i, options=attention_kwargs),
                          cross_attention=bool(context_dim), qk_norm=qk_norm)
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, self.patch_size[0] * self.patch_size[1] * self.patch_size[2], in_channels)
        self._angles: dict[tuple, torch.Tensor] = {}
        self.grad_checkpointing = False
        self.initialize_weights()

    @property
    def null_class(self) -> int | None:
        return self.y_embedder.null_class if self.y_embedder is not None else None

    def _check_divisible(self, size: Sequence[int]) -> None:
        if any(s % p for s, p in zip(size, self.patch_size)):
            raise ValueError(f"latent size (frames, height, width) = {tuple(size)} is not divisible by patch_size "
                             f"{self.patch_size}: crop or pad the latents to a multiple of the patch")

    @property
    def patch_embedding(self) -> nn.Conv3d:
        return self.x_embedder

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        key = (grid, device)
        if key not in self._angles:
            self._angles[key] = rope_angles(grid, self.head_dim, self.rope_theta, device=device)
        return self._angles[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, context: torch.Tensor | None = None,
                step_index: int | None = None) -> torch.Tensor:
        """Velocity `[B, C, F, H, W]`.

        Args:
            x: noisy latents `[B, in_channels, F, H, W]`.
            t: timesteps `[B]`, 1000 * sigma.
            y: class labels `[B]` (class-conditional models; the null class id for unconditional).
            context: text embeddings `[B, L, context_dim]` (text models).
            step_index: the sampler's 0-based step (radial attention's dense_timesteps).
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be latent video [B, {self.in_channels}, F, H, W], got shape {tuple(x.shape)}")
        self._check_divisible(x.shape[2:])
        b = x.shape[0]
        c = self.t_embedder(t.reshape(-1).expand(b) if t.numel() == 1 else t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass y=[B] labels (the null class for unconditional)")
            c = c + self.y_embedder(y, self.training)
        if self.context_embedder is not None:
            if context is None:
                raise ValueError(f"this model is text-conditional: pass context=[B, L, {self.context_dim}]")
            context = self.context_embedder(context)
        x = self.x_embedder(x)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # frame-major tokens
        angles = self._rope(grid, x.device)
        x = self.run_blocks(x, c, context, angles, grid, step_index)
        return self.unpatchify(self.final_layer(x, c), grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, N, pt*ph*pw*C]` -> `[B, C, F, H, W]`."""
        (f, h, w), (pt, ph, pw), c = grid, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def example_inputs(self, batch_size: int = 1, input_size: Sequence[int] | None = None) -> tuple:
        """(latents, timesteps, labels or None, text context or None) for FLOP counts and smoke tests."""
        x, t, y = super().example_inputs(batch_size, input_size)
        context = torch.randn(batch_size, 16, self.context_dim, device=x.device) if self.context_dim else None
        return x, t, y, context

    # zoo.weights.load_weights applies this to every source, so weights trained with any attention load
    # (`create_model(..., checkpoint_path=dense_ckpt, attention="sla")` fills the backend-only keys)
    checkpoint_converter = staticmethod(fill_backend_keys)


_SIZES = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=2, input_size=(4, 8, 8), in_channels=4, num_classes=10),
    "s": dict(depth=12, hidden_size=384, num_heads=6),
    "b": dict(depth=12, hidden_size=768, num_heads=12),
    "l": dict(depth=24, hidden_size=1024, num_heads=16),
}
_PAPER = "zoo video DiT (DiT sizes, Wan2.1-style 3-D RoPE / cross-attention, flow matching)"


def _create(arch: str, size: str, pretrained: bool, pretrained_tag: str | None, **kwargs) -> VideoDiT:
    model = VideoDiT(**{**_SIZES[size], **kwargs})
    load_generator_weights(model, arch, pretrained, pretrained_tag, None)
    return model


@register_model(kind="generator", paper=_PAPER)
def video_dit_tiny(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> VideoDiT:
    """2 blocks, width 64: for tests and quick experiments."""
    return _create("video_dit_tiny", "tiny", pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def video_dit_s_2(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> VideoDiT:
    return _create("video_dit_s_2", "s", pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def video_dit_b_2(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> VideoDiT:
    return _create("video_dit_b_2", "b", pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def video_dit_l_2(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> VideoDiT:
    return _create("video_dit_l_2", "l", pretrained, pretrained_tag, **kwargs)
