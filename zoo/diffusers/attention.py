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
from zoo.ops._cost import block_mask_pairs
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


class PairCounts:
    """(query, key) pairs of some sparse calls: all that dense attention computes, and the video-video ones kept.

    Text rows and text keys are always kept (dense), so the skipped pairs are the video-video
    pairs outside the mask. SLA's kept block masks are summed on their device (no host sync per
    call) and counted once, when the fraction is read.
    """

    def __init__(self) -> None:
        self.pairs = 0  # (query, valid key) pairs, summed over batch elements and heads
        self.video_pairs = 0  # of which video query x video key
        self.kept_video_pairs = 0
        self.kept_blocks: dict[tuple[int, int, int], torch.Tensor] = {}  # (n_video, block_q, block_k) -> summed mask

    def keep_blocks(self, key: tuple[int, int, int], blocks: torch.Tensor) -> None:
        self.kept_blocks[key] = blocks + self.kept_blocks[key] if key in self.kept_blocks else blocks

    def skipped_fraction(self) -> float | None:
        """Share of the pairs left out (None before any call)."""
        if not self.pairs:
            return None
        kept = self.kept_video_pairs + sum(block_mask_pairs(blocks, n, n, bq, bk)
                                           for (n, bq, bk), blocks in self.kept_blocks.items())
        return (self.video_pairs - kept) / self.pairs


class PairTally:
    """A model's attention calls since the plugin was applied (or `reset`): dense and sparse calls, and the
    pairs of the sparse ones (`run`: all of them; `last`: the latest, on the token grid `grid`).

    Under context parallelism each rank counts its own heads: the fractions are the same on every rank.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.dense_calls = self.sparse_calls = 0
        self.run, self.last = PairCounts(), PairCounts()
        self.grid: tuple[int, int, int] | None = None

    def start_sparse_call(self, seq: JointSequence, batch: int, heads: int) -> None:
        """A sparse call on `seq`: its pairs; the sparse attention then adds the video pairs it keeps."""
        self.sparse_calls += 1
        self.grid, self.last = seq.grid, PairCounts()
        text_keys = batch * seq.n_text if seq.key_padding is None else int((~seq.key_padding).sum())
        pairs = heads * (seq.n_video + seq.n_text) * (batch * seq.n_video + text_keys)
        for counts in (self.run, self.last):
            counts.pairs += pairs
            counts.video_pairs += heads * batch * seq.n_video**2

    def keep_video_pairs(self, pairs: int) -> None:
        for counts in (self.run, self.last):
            counts.kept_video_pairs += pairs

    def keep_video_blocks(self, block_mask: torch.Tensor, n_video: int, block_q: int, block_k: int) -> None:
        """Kept blocks `[B, H, query blocks, key blocks]` of the video rows (key blocks past the video are cut)."""
        blocks = block_mask[..., : -(-n_video // block_k)].sum((0, 1), dtype=torch.int64)
        for counts in (self.run, self.last):
            counts.keep_blocks((n_video, block_q, block_k), blocks)


class SparseAttention(nn.Module):
    """Base: splits video and text rows, runs `video_rows` for the video and dense attention for the text.

    Each call's (query, key) pairs go to `tally` (the model's, shared by its layers).
    """

    def __init__(self, tally: PairTally | None = None) -> None:
        super().__init__()
        self.tally = PairTally() if tally is None else tally

    @torch.compiler.disable  # the zoo kernels and the per-geometry mask caches run eagerly
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: JointSequence,
                backend=None) -> torch.Tensor:
        self.tally.start_sparse_call(seq, q.shape[0], q.shape[1])
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

    The checked layouts (with the video-video pairs their mask keeps) are cached on this instance,
    keyed by geometry, text length, block size, device and the mask parameters; a new resolution
    builds a new one.
    """

    def __init__(self, config: RadialAttentionConfig, mask_model: str, tally: PairTally | None = None) -> None:
        super().__init__(tally)
        self.config, self.mask_model = config, mask_model
        self._layouts: dict[tuple, tuple[ops.BlockSparseLayout, int]] = {}

    def layout(self, seq: JointSequence, device: torch.device) -> tuple[ops.BlockSparseLayout, int]:
        """The layout of the video rows, and the video-video pairs it keeps (per batch element and head)."""
        c = self.config
        key = (seq.grid, seq.n_text, c.block_size, str(device), c.decay_factor, self.mask_model, c.legacy)
        if key not in self._layouts:
            frames, height, width = seq.grid
            mask = ops.radial_block_mask(frames, height * width, c.decay_factor, block_size=c.block_size,
                                         model=self.mask_model, text_tokens=seq.n_text, legacy=c.legacy)
            rows = mask[: -(-seq.n_video // c.block_size)]  # video query blocks; text rows run dense
            layout = ops.block_sparse_layout(seq.n_video, seq.n_video + seq.n_text, block_mask=rows[None, None],
                                             block_size=c.block_size, device=device)
            video_blocks = rows[:, : rows.shape[0]]  # video rows and video key blocks: the same count
            kept = block_mask_pairs(video_blocks, seq.n_video, seq.n_video, c.block_size, c.block_size)
            self._layouts[key] = layout, kept
        return self._layouts[key]

    def video_rows(self, q, k, v, seq):
        padding = None
        if seq.key_padding is not None:
            padding = torch.cat([torch.zeros(q.shape[0], seq.n_video, dtype=torch.bool, device=q.device),
                                 seq.key_padding.to(q.device)], dim=1)
        layout, kept = self.layout(seq, q.device)
        self.tally.keep_video_pairs(kept * q.shape[0] * q.shape[1])
        return ops.block_sparse_attention(q, k, v, layout=layout, key_padding_mask=padding)


class SLASparseAttention(SparseAttention):
    """SLA with this layer's learnable projection (`self.sla.proj_l`); text key blocks are always critical.

    The pairs it counts as kept are the critical blocks' (exact softmax); the linear branch still
    covers the marginal rest (and `negligible` drops the lowest blocks).
    """

    def __init__(self, config: SLAConfig, head_dim: int, tally: PairTally | None = None) -> None:
        super().__init__(tally)
        self.sla = config.build(head_dim)

    def video_rows(self, q, k, v, seq):
        return self._per_batch_valid_text(lambda *qkv: self._attend(*qkv, seq.n_video), q, k, v, seq)

    def _attend(self, q, k, v, n_video):
        sla = self.sla
        block_q, block_k = sla.block_size
        block_map = ops.sla_block_map(q, k, sla.topk, sla.negligible, sla.block_size)
        if k.shape[2] > n_video:
            block_map[..., n_video // block_k:] = CRITICAL  # text keys (and the block they share with video)
        self.tally.keep_video_blocks(block_map == CRITICAL, n_video, block_q, block_k)
        return ops.sparse_linear_attention(
            q, k, v, sla.proj_l.weight, sla.proj_l.bias, linear_on=sla.linear_on, feature_map=sla.feature_map,
            block_size=sla.block_size, eps=sla.eps, block_map=block_map,
        )


class NeighborhoodSparseAttention(SparseAttention):
    """3-D neighborhood attention (`zoo.ops.na3d`); text keys are NATTEN's `additional_keys/values`.

    Per axis the kernel is clamped to the axis (kernel * dilation <= length), and axes of length
    1 (a single latent frame) are dropped (`na2d`/`na1d`), so any resolution runs. Every query
    sees exactly the kernel's volume of video keys (windows shift inward at the borders).
    """

    def __init__(self, config: NeighborhoodAttentionConfig, tally: PairTally | None = None) -> None:
        super().__init__(tally)
        self.config = config

    def window(self, grid: tuple[int, int, int]) -> tuple[list[int], list[int], list[int], list[int]]:
        """(axes longer than 1, kernel, dilation, stride per such axis) that `grid` runs with."""
        c = self.config
        axes = [a for a, length in enumerate(grid) if length > 1]
        kernel = [max(2, min(c.kernel_size[a], grid[a] // c.dilation[a])) for a in axes]
        dilation = [c.dilation[a] if kernel[i] * c.dilation[a] <= grid[a] else 1 for i, a in enumerate(axes)]
        stride = [min(c.stride[a], kernel[i]) for i, a in enumerate(axes)]
        return axes, kernel, dilation, stride

    def video_rows(self, q, k, v, seq):
        axes, kernel, dilation, stride = self.window(seq.grid)
        self.tally.keep_video_pairs(q.shape[0] * q.shape[1] * seq.n_video * math.prod(kernel))
        return self._per_batch_valid_text(lambda *qkv: self._attend(*qkv, seq, axes, kernel, dilation, stride),
                                          q, k, v, seq)

    def _attend(self, q, k, v, seq, axes, kernel, dilation, stride):
        batch, heads = q.shape[:2]
        if not axes:  # one token: nothing to restrict
            return nn.functional.scaled_dot_product_attention(q, k, v)
        grid = [seq.grid[a] for a in axes]

        def heads_last(t: torch.Tensor) -> torch.Tensor:  # [B, H, n, D] -> [B, *grid, H, D]
            return t.transpose(1, 2).reshape(batch, *grid, heads, t.shape[-1])

        n_video = seq.n_video
        extra_k = k[:, :, n_video:].transpose(1, 2) if k.shape[2] > n_video else None
        extra_v = v[:, :, n_video:].transpose(1, 2) if k.shape[2] > n_video else None
        op = getattr(ops, f"na{len(axes)}d")
        out = op(heads_last(q), heads_last(k[:, :, :n_video]), heads_last(v[:, :, :n_video]), kernel_size=kernel,
                 dilation=dilation, stride=stride, additional_keys=extra_k, additional_values=extra_v)
        return out.reshape(batch, n_video, heads, -1).transpose(1, 2)


def build_sparse_attention(config, *, head_dim: int, mask_model: str, tally: PairTally | None = None) -> SparseAttention:
    """The sparse attention of one layer for `config`, counting its calls in `tally` (its own when None)."""
    if isinstance(config, RadialAttentionConfig):
        return RadialSparseAttention(config, mask_model, tally)
    if isinstance(config, SLAConfig):
        return SLASparseAttention(config, head_dim, tally)
    if isinstance(config, NeighborhoodAttentionConfig):
        return NeighborhoodSparseAttention(config, tally)
    raise TypeError(
        f"config must be a RadialAttentionConfig, SLAConfig or NeighborhoodAttentionConfig, got {type(config).__name__}"
    )
