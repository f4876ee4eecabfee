"""Swin-style hierarchical backbone with a per-block attention choice, and the Swin variants of
Agent Attention (ECCV 2024), FLatten (ICCV 2023) and InLine (NeurIPS 2024).

One macro (Liu et al., "Swin Transformer", ICCV 2021; microsoft/Swin-Transformer) with the
official module names, so the released checkpoints of all three papers load unchanged:
`patch_embed.{proj,norm}`, `layers.i.blocks.j.{norm1,attn,norm2,mlp}`, `layers.i.downsample`
(v1 patch merging at the end of stages 1-3), `norm`, `head`.

Placement (the papers' attn_type strings): agent / linear blocks are built with window 56 (72 at
288, 96 at 384), which the window clamp turns into **one global window per stage** (no shift,
no mask; Agent-Attention#47); softmax blocks use window `max(7, window // 8)` with the usual
shifts. We keep every agent / linear block global at any input size and resize its
resolution-tied parameters (agent row/column biases, FLatten's positional encoding) to the
runtime grid, as the official detection/segmentation backbones do; softmax blocks pad to a
multiple of the window (and build the shift mask for the padded grid), as Swin's det code does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, to_2tuple

from zoo._registry import register_model
from zoo.weights import generate_default_cfgs

from ._common import (
    AGENT,
    FLATTEN,
    INLINE,
    ClassifierMixin,
    Mixed,
    build_hierarchical,
    check_blocks,
    drop_path_rates,
    init_linear_and_norm,
    init_trunc_normal,
    release_cfg,
    run_blocks,
    stage_blocks,
)
from ._mixers import (
    QKV,
    AgentAttention,
    FocusedLinearAttention,
    InLineAttention,
    Size,
    from_grid,
    merge_heads,
    split_heads,
    to_grid,
)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B*nW, window*window, C] (H, W multiples of window)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """Swin's (nW, ws*ws, ws*ws) mask: 0 within a region, -100 across regions of the rolled grid."""
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    windows = window_partition(img, window).squeeze(-1)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module, QKV):
    """Swin's window softmax attention with the relative position bias table."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self._init_qkv(dim, qkv_bias, "fused")
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        init_trunc_normal(self.relative_position_bias_table)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self._project(x))
        n = x.shape[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        bias = bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask[None, :, None]).expand(x.shape[0] // nw, -1, -1, -1, -1)
            bias = bias.reshape(x.shape[0], self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))


class SwinBlock(nn.Module):
    """Pre-norm block; `mixer` picks the attention. Non-softmax mixers see the whole stage."""

    def __init__(self, dim: int, num_heads: int, resolution: Size, mixer: str, window: int, shift: int,
                 agent_num: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, focusing_factor: float = 3.0, kernel_size: int = 5):
        super().__init__()
        self.mixer, self.resolution = mixer, tuple(resolution)
        if mixer != "softmax" or min(resolution) <= window:
            # the official clamp: a window as large as the stage means one window, no shift
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        if mixer == "agent":
            self.attn = AgentAttention(dim, num_heads, agent_num, resolution, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                       proj_drop=drop)
        elif mixer == "focused":
            self.attn = FocusedLinearAttention(dim, num_heads, resolution, qkv_bias=qkv_bias,
                                               focusing_factor=focusing_factor, kernel_size=kernel_size, proj_drop=drop)
        elif mixer == "inline":
            self.attn = InLineAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=drop)
        else:
            self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        if mixer == "softmax" and shift > 0:
            self.register_buffer("attn_mask", shift_mask(*resolution, window, shift))
        else:
            self.attn_mask = None

    def _window_attention(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        b, _, c = x.shape
        h, w = size
        ws, shift = self.window, self.shift
        x = x.view(b, h, w, c)
        pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        mask = None
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = self.attn_mask if (hp, wp) == self.resolution else shift_mask(hp, wp, ws, shift).to(x.device)
        out = window_reverse(self.attn(window_partition(x, ws), mask), ws, hp, wp)
        if shift > 0:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out[:, :h, :w].reshape(b, h * w, c)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        y = self.norm1(x)
        y = self._window_attention(y, size) if self.mixer == "softmax" else self.attn(y, size)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Swin v1 merging: concat of the 2x2 neighbours (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        b, _, c = x.shape
        h, w = size
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        size = (x.shape[1], x.shape[2])
        return self.reduction(self.norm(x.reshape(b, size[0] * size[1], 4 * c))), size


class SwinStage(nn.Module):
    def __init__(self, blocks: list[SwinBlock], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Size]:
        x = self.proj(x)
        return self.norm(from_grid(x)), (x.shape[2], x.shape[3])


class SwinStyle(ClassifierMixin, nn.Module):
    """Swin macro with one mixer per block ("agent", "focused", "inline" or "softmax").

    `forward_features` gives the normed last stage as NHWC (`output_fmt`, as timm's Swin);
    `global_pool` 'avg' (default) or '' (forward returns that map).

    Args:
        img_size: construction resolution (sizes the resolution-tied parameters).
        block_types: per stage, one mixer name per block (see `_common.stage_blocks`).
        window_size: the agent / linear window of the config (56, 72, 96); softmax blocks use
            `softmax_window` (default `max(7, window_size // 8)`, the official rule).
        agent_num: agents per stage (perfect squares).
    """

    output_fmt = "NHWC"

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), block_types=None, window_size: int = 56,
                 softmax_window: int | None = None, agent_num: tuple[int, ...] = (9, 16, 49, 49),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, focusing_factor: float = 3.0, kernel_size: int = 5,
                 global_pool: str = "avg"):
        super().__init__()
        block_types = check_blocks(block_types or stage_blocks(("softmax",) * len(depths), depths), depths)
        softmax_window = softmax_window or max(7, window_size // 8)
        img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (len(depths) - 1))
        self.global_pool = self._check_pool(global_pool, num_classes)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        res = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(len(depths)):
            dim = int(embed_dim * 2 ** i)
            blocks = [
                SwinBlock(dim, num_heads[i], res, mixer, softmax_window if mixer == "softmax" else window_size,
                          0 if j % 2 == 0 else softmax_window // 2, agent_num[i], mlp_ratio, qkv_bias, drop_rate,
                          attn_drop_rate, dpr[sum(depths[:i]) + j], focusing_factor, kernel_size)
                for j, mixer in enumerate(block_types[i])
            ]
            self.layers.append(SwinStage(blocks, PatchMerging(dim) if i < len(depths) - 1 else None))
            # features are taken before the merging at the end of the stage (as timm's features_only)
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"layers.{i}"))
            res = (res[0] // 2, res[1] // 2)
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+).downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None), (r"^norm", (99999,))])

    def _stages(self, x: torch.Tensor, stop: int | None = None):
        x, size = self.patch_embed(x)
        x = self.pos_drop(x)
        for i, stage in enumerate(self.layers):
            x = run_blocks(stage.blocks, x, size, checkpointing=self.grad_checkpointing)
            yield i, x, size
            if stop is not None and i >= stop:
                return
            if stage.downsample is not None:
                x, size = stage.downsample(x, size)

    def _to_map(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return to_grid(x, size)

    def _final(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        """The normed last stage, NHWC (timm's Swin layout)."""
        return self.norm(x).reshape(x.shape[0], *size, x.shape[2])


# ----------------------------------------------------------------------------- variants



def _c(file_id: str, top1: float, params: float | None, flops: float | None, family: dict, size: int = 224, **kw) -> dict:
    """A cfg with the README's numbers and the stride-32 output grid (crop 1.0 above 224)."""
    return release_cfg(file_id, top1, params, flops, family, size, pool_size=(size // 32, size // 32),
                       **(dict(crop_pct=1.0) if size != 224 else {}), **kw)


# paper_params / paper_flops: the READMEs' tables, as counts. `official_params`: the official code's
# exact count where the README differs (inline_swin_tiny: 29.22M vs 30M) or has none
# (flatten_swin_base_384). It is our model's count, whose keys and shapes equal the official
# definitions (scripts/check_official_agent_linear.py). InLine-Swin-T's 29,223,544 was counted on the
# official class (tests/test_agent_backbones.py OFFICIAL_PARAMS); FLatten-Swin-B-384 is the checked
# FLatten-Swin class with cfgs/flatten_swin_b_384.yaml's arguments, counted on ours only.
default_cfgs = generate_default_cfgs({
    "agent_swin_tiny.in1k": _c("a2ddc1190c224f768a41", 82.6, 29.0e6, 4.5e9, AGENT),
    "agent_swin_small.in1k": _c("f607172c9fea4d6e99bb", 83.7, 50.0e6, 8.7e9, AGENT),
    "agent_swin_small_288.in1k": _c("09760394e93b4046a25e", 84.1, 50.0e6, 14.6e9, AGENT, size=288),
    "agent_swin_base.in1k": _c("4fcd2d0114bb490483c3", 84.0, 88.0e6, 15.4e9, AGENT),
    "agent_swin_base_384.in1k": _c("bb84ee9058954706a557", 84.9, 88.0e6, 46.3e9, AGENT, size=384),
    # FLatten's README gives no params/FLOPs: these are fvcore counts of the official code
    "flatten_swin_tiny.in1k": _c("e1518e76703e4e57a7f2", 82.1, 29.19e6, 4.50e9, FLATTEN),
    "flatten_swin_small.in1k": _c("94188e52af354bf4a88b", 83.5, 50.51e6, 8.76e9, FLATTEN),
    "flatten_swin_base.in1k": _c("7a9e5186bad04e7fb3a9", 83.8, 88.97e6, 15.46e9, FLATTEN),
    # no published numbers: the count of the official architecture, and fvcore's FLOPs of ours (ours match the
    # official code's fvcore counts above for FLatten-Swin-T/S/B to the 0.01G printed)
    "flatten_swin_base_384.in1k": _c("0d0330cf2e5249f1abb6", 85.0, None, None, FLATTEN, size=384,
                                      official_params=91_433_928, official_flops=46_490_804_224),
    "inline_swin_tiny.in1k": _c("32810869fcc34410966b", 82.4, 30.0e6, 4.5e9, INLINE, official_params=29_223_544),
    "inline_swin_small.in1k": _c("e9657fd247c04c7cb1a1", 83.6, 50.0e6, 8.7e9, INLINE),
    "inline_swin_base.in1k": _c("bf23564bb64c420aafe1", 84.1, 88.0e6, 15.4e9, INLINE),
})

_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


def _swin(variant: str, pretrained: bool, stages: Sequence[str | Mixed], arch: dict, **kwargs) -> SwinStyle:
    return build_hierarchical(SwinStyle, variant, pretrained, stages, arch, **kwargs)


@register_model(paper=AGENT["paper_name"])
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> SwinStyle:
    """Agent-Swin-T: agent attention in stages 1-3 (AAAB), 9-16-49-49 agents."""
    return _swin("agent_swin_tiny", pretrained, ("agent", "agent", "agent", "softmax"), _T, **dict(dict(drop_path_rate=0.2), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_swin_small(pretrained: bool = False, **kwargs) -> SwinStyle:
    """Agent-Swin-S (AABB)."""
    return _swin("agent_swin_small", pretrained, ("agent", "agent", "softmax", "softmax"), _S, **dict(dict(drop_path_rate=0.3), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_swin_small_288(pretrained: bool = False, **kwargs) -> SwinStyle:
    """Agent-Swin-S at 288 (agent window 72, softmax window 72 // 8 = 9)."""
    return _swin("agent_swin_small_288", pretrained, ("agent", "agent", "softmax", "softmax"), _S, **dict(dict(img_size=288, window_size=72, drop_path_rate=0.3), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_swin_base(pretrained: bool = False, **kwargs) -> SwinStyle:
    """Agent-Swin-B (AAMB2: the first 2 blocks of stage 3 are agent blocks)."""
    return _swin("agent_swin_base", pretrained, ("agent", "agent", Mixed("agent", 2), "softmax"), _B, **dict(dict(drop_path_rate=0.5), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_swin_base_384(pretrained: bool = False, **kwargs) -> SwinStyle:
    """Agent-Swin-B at 384 (agent window 96, softmax window 12)."""
    return _swin("agent_swin_base_384", pretrained, ("agent", "agent", Mixed("agent", 2), "softmax"), _B, **dict(dict(img_size=384, window_size=96, drop_path_rate=0.5), **kwargs))


@register_model(paper=FLATTEN["paper_name"])
def flatten_swin_tiny(pretrained: bool = False, **kwargs) -> SwinStyle:
    """FLatten-Swin-T: focused linear attention in stages 1-2 (LLSS), focusing factor 3, 5x5 DWC."""
    return _swin("flatten_swin_tiny", pretrained, ("focused", "focused", "softmax", "softmax"), _T, **dict(dict(softmax_window=7, drop_path_rate=0.2), **kwargs))


@register_model(paper=FLATTEN["paper_name"])
def flatten_swin_small(pretrained: bool = False, **kwargs) -> SwinStyle:
    return _swin("flatten_swin_small", pretrained, ("focused", "focused", "softmax", "softmax"), _S, **dict(dict(softmax_window=7, drop_path_rate=0.3), **kwargs))


@register_model(paper=FLATTEN["paper_name"])
def flatten_swin_base(pretrained: bool = False, **kwargs) -> SwinStyle:
    return _swin("flatten_swin_base", pretrained, ("focused", "focused", "softmax", "softmax"), _B, **dict(dict(softmax_window=7, drop_path_rate=0.5), **kwargs))


@register_model(paper=FLATTEN["paper_name"])
def flatten_swin_base_384(pretrained: bool = False, **kwargs) -> SwinStyle:
    """FLatten-Swin-B at 384 (linear window 96, softmax window 12)."""
    return _swin("flatten_swin_base_384", pretrained, ("focused", "focused", "softmax", "softmax"), _B, **dict(dict(img_size=384, window_size=96, softmax_window=12, drop_path_rate=0.5), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_swin_tiny(pretrained: bool = False, **kwargs) -> SwinStyle:
    """InLine-Swin-T: injective linear attention in stages 1-3 (IIIS)."""
    return _swin("inline_swin_tiny", pretrained, ("inline", "inline", "inline", "softmax"), _T, **dict(dict(drop_path_rate=0.2), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_swin_small(pretrained: bool = False, **kwargs) -> SwinStyle:
    return _swin("inline_swin_small", pretrained, ("inline", "inline", "softmax", "softmax"), _S, **dict(dict(drop_path_rate=0.3), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_swin_base(pretrained: bool = False, **kwargs) -> SwinStyle:
    return _swin("inline_swin_base", pretrained, ("inline", "inline", Mixed("inline", 2), "softmax"), _B, **dict(dict(drop_path_rate=0.5), **kwargs))
