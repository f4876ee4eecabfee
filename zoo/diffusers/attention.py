"""The sparse attentions the plugins run, on one layer's q, k, v `[B, heads, S, head_dim]`.

A sequence is the video tokens (frame-major, `grid` = (frames, height, width) after patchify)
plus `n_text` text tokens before (CogVideoX) or after (HunyuanVideo) them. Video queries get the
sparse attention over video keys plus every valid text key; text queries attend densely to every
valid key through diffusers' `dispatch_attention_fn` (the layer's own backend). `key_padding`
(bool `[B, n_text]`, True = padded prompt token) hides padded text keys from both.
"""
from __future__ import annotations

import math

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from zoo import ops
from zoo.diffusers.config import NeighborhoodAttentionConfig, RadialAttentionConfig, SLAConfig
from zoo.ops.sla import CRITICAL


class JointSequence:
    """Where the video and text tokens of a layer's sequence are."""

    def __init__(self, grid: tuple[int, int, int], n_text: int = 0, text_first: bool = False,
                 key_padding: torch.Tensor | None = None) -> None:
        self.grid, self.n_text, self.text_first = grid, n_text, text_first
        self.n_video = math.prod(grid)
        if key_padding is not None and not bool(key_padding.any()):
            key_padding = None  # nothing padded: one call for the whole batch
        self.key_padding = key_padding

    def video(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, :, self.n_text:] if self.text_first else t[:, :, : self.n_video]

    def text(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, :, : self.n_text] if self.text_first else t[:, :, self.n_video:]

    def video_then_text(self, t: torch.Tensor) -> torch.Tensor:
        """Keys in the order the video attention takes them: video, then text (a view when text is last)."""
        return torch.cat([self.video(t), self.text(t)], dim=2) if self.text_first and self.n_text else t

    def valid_text(self, b: int) -> torch.Tensor | None:
        """Indices of batch element b's unpadded text tokens (None: all of them)."""
        return None if self.key_padding is None else (~self.key_padding[b]).nonzero().squeeze(1)


class SparseAttention(nn.Module):
    """Base: splits video and text rows, runs `video_rows` for the video and dense attention for the text."""

    @torch.compiler.disable  # the zoo kernels and the per-geometry mask caches run eagerly
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: JointSequence,
                backend=None) -> torch.Tensor:
        out_video = self.video_rows(seq.video(q), seq.video_then_text(k), seq.video_then_text(v), seq)
        if not seq.n_text:
            return out_video
        mask = None if seq.key_padding is None else self._dense_key_mask(seq, q)
        out_text = dispatch_attention_fn(
            seq.text(q).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, backend=backend,
        ).transpose(1, 2).to(out_video.dtype)
        parts = (out_text, out_video) if seq.text_first else (out_video, out_text)
        return torch.cat(parts, dim=2)

    @staticmethod
    def _dense_key_mask(seq: JointSequence, q: torch.Tensor) -> torch.Tensor:
        """bool `[B, 1, 1, S]`, True = attend, in the sequence's own token order."""
        video = torch.ones(q.shape[0], seq.n_video, dtype=torch.bool, device=q.device)
        parts = (~seq.key_padding, video) if seq.text_first else (video, ~seq.key_padding)
        return torch.cat(parts, dim=1)[:, None, None]

    def video_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: JointSequence) -> torch.Tensor:
        """Video queries `[B, H, n_video, D]` over keys `[B, H, n_video + n_text, D]` (video first)."""
        raise NotImplementedError

    def _per_batch_valid_text(self, fn, q, k, v, seq: JointSequence) -> torch.Tensor:
        """`fn(q, k, v)` with each batch element's padded text keys dropped (one call when none is padded)."""
        if seq.key_padding is None:
            return fn(q, k, v)
        outs = []
        for b in range(q.shape[0]):
            keys = torch.cat([torch.arange(seq.n_video, device=q.device), seq.n_video + seq.valid_text(b)])
            outs.append(fn(q[b : b + 1], k[b : b + 1, :, keys], v[b : b + 1, :, keys]))
        return torch.cat(outs)


class RadialSparseAttention(SparseAttention):
    """Radial attention: the official block mask (`zoo.ops.radial_block_mask`) on `block_sparse_attention`.

    The checked layouts are cached on this instance, keyed by geometry, text length, block size,
    device and the mask parameters; a new resolution builds a new one.
    """

    def __init__(self, config: RadialAttentionConfig, mask_model: str) -> None:
        super().__init__()
        self.config, self.mask_model = config, mask_model
        self._layouts: dict[tuple, ops.BlockSparseLayout] = {}

    def layout(self, seq: JointSequence, device: torch.device) -> ops.BlockSparseLayout:
        c = self.config
        key = (seq.grid, seq.n_text, c.block_size, str(device), c.decay_factor, self.mask_model, c.legacy)
        if key not in self._layouts:
            frames, height, width = seq.grid
            mask = ops.radial_block_mask(frames, height * width, c.decay_factor, block_size=c.block_size,
                                         model=self.mask_model, text_tokens=seq.n_text, legacy=c.legacy)
            rows = mask[: -(-seq.n_video // c.block_size)]  # video query blocks; text rows run dense
            self._layouts[key] = ops.block_sparse_layout(seq.n_video, seq.n_video + seq.n_text,
                                                         block_mask=rows[None, None], block_size=c.block_size,
                                                         device=device)
        return self._layouts[key]

    def video_rows(self, q, k, v, seq):
        padding = None
        if seq.key_padding is not None:
            padding = torch.cat([torch.zeros(q.shape[0], seq.n_video, dtype=torch.bool, device=q.device),
                                 seq.key_padding.to(q.device)], dim=1)
        return ops.block_sparse_attention(q, k, v, layout=self.layout(seq, q.device), key_padding_mask=padding)


class SLASparseAttention(SparseAttention):
    """SLA with this layer's learnable projection (`self.sla.proj_l`); text key blocks are always critical."""

    def __init__(self, config: SLAConfig, head_dim: int) -> None:
        super().__init__()
        self.sla = config.build(head_dim)

    def video_rows(self, q, k, v, seq):
        if not seq.n_text:
            return self.sla(q, k, v)
        return self._per_batch_valid_text(lambda *qkv: self._with_text(*qkv, seq.n_video), q, k, v, seq)

    def _with_text(self, q, k, v, n_video):
        sla = self.sla
        block_k = sla.block_size[1]
        block_map = ops.sla_block_map(q, k, sla.topk, sla.negligible, sla.block_size)
        block_map[..., n_video // block_k:] = CRITICAL  # text keys (and the block they share with video)
        return ops.sparse_linear_attention(
            q, k, v, sla.proj_l.weight, sla.proj_l.bias, linear_on=sla.linear_on, feature_map=sla.feature_map,
            block_size=sla.block_size, eps=sla.eps, block_map=block_map,
        )


class NeighborhoodSparseAttention(SparseAttention):
    """3-D neighborhood attention (`zoo.ops.na3d`); text keys are NATTEN's `additional_keys/values`.

    Per axis the kernel is clamped to the axis (kernel * dilation <= length), and axes of length
    1 (a single latent frame) are dropped (`na2d`/`na1d`), so any resolution runs.
    """

    def __init__(self, config: NeighborhoodAttentionConfig) -> None:
        super().__init__()
        self.config = config

    def video_rows(self, q, k, v, seq):
        return self._per_batch_valid_text(lambda *qkv: self._attend(*qkv, seq), q, k, v, seq)

    def _attend(self, q, k, v, seq):
        c = self.config
        axes = [a for a, length in enumerate(seq.grid) if length > 1]
        batch, heads, _, dim = q.shape
        if not axes:  # one token: nothing to restrict
            return nn.functional.scaled_dot_product_attention(q, k, v)
        grid = [seq.grid[a] for a in axes]
        kernel = [max(2, min(c.kernel_size[a], seq.grid[a] // c.dilation[a])) for a in axes]
        dilation = [c.dilation[a] if kernel[i] * c.dilation[a] <= grid[i] else 1 for i, a in enumerate(axes)]
        stride = [min(c.stride[a], kernel[i]) for i, a in enumerate(axes)]

        def heads_last(t: torch.Tensor) -> torch.Tensor:  # [B, H, n, D] -> [B, *grid, H, D]
            return t.transpose(1, 2).reshape(batch, *grid, heads, t.shape[-1])

        n_video = seq.n_video
        extra_k = k[:, :, n_video:].transpose(1, 2) if k.shape[2] > n_video else None
        extra_v = v[:, :, n_video:].transpose(1, 2) if k.shape[2] > n_video else None
        op = getattr(ops, f"na{len(axes)}d")
        out = op(heads_last(q), heads_last(k[:, :, :n_video]), heads_last(v[:, :, :n_video]), kernel_size=kernel,
                 dilation=dilation, stride=stride, additional_keys=extra_k, additional_values=extra_v)
        return out.reshape(batch, n_video, heads, -1).transpose(1, 2)


def build_sparse_attention(config, *, head_dim: int, mask_model: str) -> SparseAttention:
    """The sparse attention of one layer for `config`."""
    if isinstance(config, RadialAttentionConfig):
        return RadialSparseAttention(config, mask_model)
    if isinstance(config, SLAConfig):
        return SLASparseAttention(config, head_dim)
    if isinstance(config, NeighborhoodAttentionConfig):
        return NeighborhoodSparseAttention(config)
    raise TypeError(
        f"config must be a RadialAttentionConfig, SLAConfig or NeighborhoodAttentionConfig, got {type(config).__name__}"
    )
