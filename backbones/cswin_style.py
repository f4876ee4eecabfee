"""CSWin-style backbone (Dong et al., "CSWin Transformer", CVPR 2022) with a per-block attention
choice, and the CSWin variants of Agent Attention, FLatten and InLine.

Official layout, so the released checkpoints load unchanged: `stage1_conv_embed.{0,2}` (7x7 s4
conv, LayerNorm), `stage{i}.j.{qkv,norm1,proj,attns,mlp,norm2}`, `merge{i}.{conv,norm}` (3x3 s2
conv + LayerNorm), `norm`, `head`; the block owns `qkv`/`proj` and `attns` holds the branches.

Softmax blocks are CSWin's cross-shaped windows: two branches on half the channels and heads,
vertical and horizontal stripes of width `split_size`, each with LePE (3x3 depthwise conv on V
inside the stripe); the last stage (or split = resolution) is one global branch. Agent /
linear blocks are built with split size = stage resolution (`CSWIN_LA_SPLIT_SIZE` 56-28-14-7),
which makes them **one global branch** over all channels with the LePE conv `get_v` as their
local term (agent), or in addition to FLatten's head-shared 5x5 `dwc` / InLine's predicted
3x3 kernel. InLine's kernel is predicted from the token mean of the *un-normalised* block
input in CSWin (the official quirk; Swin/PVT/DeiT use the attention input).

Other input sizes: global branches see the whole grid (biases / positional encodings resized
as in `_mixers`); stripe branches zero-pad the grid to a multiple of the stripe width.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp

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
    release_cfg,
    run_blocks,
    stage_blocks,
)
from ._mixers import AgentCore, FocusedCore, InLineCore, Size, from_grid, merge_heads, split_heads, to_grid


class Tokens(nn.Module):
    """[B, C, H, W] -> [B, H*W, C] (the official `Rearrange`, index 1 of `stage1_conv_embed`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return from_grid(x)


class StripeAttention(nn.Module):
    """One CSWin softmax branch: windows of `h_sp x w_sp` (a full-height / full-width stripe or the
    whole grid), softmax attention per window plus LePE (`get_v`, 3x3 depthwise inside the window)."""

    def __init__(self, dim: int, num_heads: int, idx: int, split_size: int):
        super().__init__()
        self.num_heads, self.idx, self.split_size = num_heads, idx, split_size
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def _windows(self, size: Size) -> Size:
        h, w = size
        return {-1: (h, w), 0: (h, self.split_size), 1: (self.split_size, w)}[self.idx]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Size) -> torch.Tensor:
        b, _, c = q.shape
        h, w = size
        h_sp, w_sp = self._windows(size)
        hp, wp = -(-h // h_sp) * h_sp, -(-w // w_sp) * w_sp

        def windows(t):  # [B, N, C] -> [B * nW, C, h_sp, w_sp]
            g = F.pad(to_grid(t, size), (0, wp - w, 0, hp - h))
            g = g.view(b, c, hp // h_sp, h_sp, wp // w_sp, w_sp).permute(0, 2, 4, 1, 3, 5)
            return g.reshape(-1, c, h_sp, w_sp)

        qw, kw, vw = windows(q), windows(k), windows(v)
        lepe = self.get_v(vw)
        heads = [split_heads(from_grid(t), self.num_heads) for t in (qw, kw, vw)]
        out = merge_heads(F.scaled_dot_product_attention(*heads)) + from_grid(lepe)
        out = out.view(b, hp // h_sp, wp // w_sp, h_sp, w_sp, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return out[:, :h, :w].reshape(b, h * w, c)


class AgentBranch(AgentCore):
    """Agent attention as CSWin's single global branch: its local term is the LePE conv `get_v`."""

    def __init__(self, dim: int, num_heads: int, agent_num: int, grid: Size, attn_drop: float = 0.0):
        super().__init__(dim, num_heads, agent_num, grid, attn_drop=attn_drop)
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, q, k, v, size: Size, x_mean=None) -> torch.Tensor:
        return self.attend(q, k, v, size) + from_grid(self.get_v(to_grid(v, size)))


class FocusedBranch(FocusedCore):
    """FLatten's focused linear attention as a global CSWin branch: `dwc` plus LePE `get_v`."""

    def __init__(self, dim: int, num_heads: int, grid: Size, focusing_factor: float = 3.0, kernel_size: int = 5):
        super().__init__(dim, num_heads, grid, focusing_factor, kernel_size)
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, q, k, v, size: Size, x_mean=None) -> torch.Tensor:
        return self.attend(q, k, v, size) + from_grid(self.get_v(to_grid(v, size)))


class InLineBranch(InLineCore):
    """InLine attention as a global CSWin branch: predicted 3x3 residual plus LePE `get_v`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, q, k, v, size: Size, x_mean=None) -> torch.Tensor:
        return self.attend(q, k, v, size, x_mean) + from_grid(self.get_v(to_grid(v, size)))


class CSWinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, resolution: Size, mixer: str, split_size: int, agent_num: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, last_stage: bool = False, focusing_factor: float = 3.0, kernel_size: int = 5):
        super().__init__()
        self.mixer = mixer
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        if mixer == "agent":
            branches = [AgentBranch(dim, num_heads, agent_num, resolution, attn_drop)]
        elif mixer == "focused":
            branches = [FocusedBranch(dim, num_heads, resolution, focusing_factor, kernel_size)]
        elif mixer == "inline":
            branches = [InLineBranch(dim, num_heads)]
        elif last_stage or max(resolution) == split_size:
            branches = [StripeAttention(dim, num_heads, -1, split_size)]
        else:
            branches = [StripeAttention(dim // 2, num_heads // 2, i, split_size) for i in range(2)]
        self.attns = nn.ModuleList(branches)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        c = x.shape[2]
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x_mean = x.mean(dim=1)  # InLine's kernel input: the block input before norm1 (official)
        if len(self.attns) == 2:
            half = c // 2
            out = torch.cat([self.attns[0](q[..., :half], k[..., :half], v[..., :half], size),
                             self.attns[1](q[..., half:], k[..., half:], v[..., half:], size)], dim=2)
        elif self.mixer == "softmax":
            out = self.attns[0](q, k, v, size)
        else:
            out = self.attns[0](q, k, v, size, x_mean)
        x = x + self.drop_path(self.proj_drop(self.proj(out)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MergeBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        x = self.conv(to_grid(x, size))
        return self.norm(from_grid(x)), (x.shape[2], x.shape[3])


class CSWinStyle(ClassifierMixin, nn.Module):
    """CSWin macro with one mixer per block.

    `forward_features` gives the normed last stage as NHWC (`output_fmt`, as timm's Swin);
    `global_pool` 'avg' (default) or '' (forward returns that map).

    Args:
        split_size: stripe width of the softmax blocks per stage (official [1, 2, 7, 7]; 12 at 384).
    """

    output_fmt = "NHWC"

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depths: tuple[int, ...] = (2, 4, 18, 1), num_heads: tuple[int, ...] = (2, 4, 8, 16), block_types=None,
                 split_size: tuple[int, ...] = (1, 2, 7, 7), agent_num: tuple[int, ...] = (9, 16, 49, 49),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, focusing_factor: float = 3.0, kernel_size: int = 5,
                 global_pool: str = "avg"):
        super().__init__()
        block_types = check_blocks(block_types or stage_blocks(("softmax",) * len(depths), depths), depths)
        self.num_classes = num_classes
        self.global_pool = self._check_pool(global_pool, num_classes)
        self.stage1_conv_embed = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 7, 4, 2), Tokens(), nn.LayerNorm(embed_dim))
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        dim, res = embed_dim, img_size // 4
        self.feature_info = []
        for i in range(len(depths)):
            if i:
                setattr(self, f"merge{i}", MergeBlock(dim, dim * 2))
                dim, res = dim * 2, res // 2
            setattr(self, f"stage{i + 1}", nn.ModuleList([
                CSWinBlock(dim, num_heads[i], (res, res), mixer, split_size[i], agent_num[i], mlp_ratio, qkv_bias,
                           drop_rate, attn_drop_rate, dpr[sum(depths[:i]) + j], i == len(depths) - 1,
                           focusing_factor, kernel_size)
                for j, mixer in enumerate(block_types[i])]))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stage{i + 1}"))
        self.num_stages = len(depths)
        self.num_features = self.head_hidden_size = dim
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Identity()
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stage1_conv_embed", blocks=[(r"^stage(\d+)\.(\d+)", None), (r"^merge(\d+)", (0,)),
                                                         (r"^norm", (99999,))])

    def _stages(self, x: torch.Tensor, stop: int | None = None):
        x = self.stage1_conv_embed[0](x)
        size = (x.shape[2], x.shape[3])
        x = self.stage1_conv_embed[2](self.stage1_conv_embed[1](x))
        for i in range(self.num_stages):
            if i:
                x, size = getattr(self, f"merge{i}")(x, size)
            x = run_blocks(getattr(self, f"stage{i + 1}"), x, size, checkpointing=self.grad_checkpointing)
            yield i, x, size
            if stop is not None and i >= stop:
                return

    def _to_map(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return to_grid(x, size)

    def _final(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        """The normed last stage, NHWC (token-major like Swin, so timm's Swin layout)."""
        return self.norm(x).reshape(x.shape[0], *size, x.shape[2])




def _c(file_id: str, top1: float, params: float | None, flops: float | None, family: dict, size: int = 224, **kw) -> dict:
    """A cfg with the README's numbers and the stride-32 output grid (crop 1.0 above 224)."""
    return release_cfg(file_id, top1, params, flops, family, size, first_conv="stage1_conv_embed.0",
                       pool_size=(size // 32, size // 32), **(dict(crop_pct=1.0) if size != 224 else {}), **kw)


# paper_params / paper_flops: the READMEs' tables, as counts. `official_params`: the official code's
# exact count where the README differs. It is our model's count, whose keys and shapes equal the
# official definitions (scripts/check_official_agent_linear.py: Agent-CSwin-T 20,458,672 and
# InLine-CSwin-T 20,604,520 were counted on the official classes; InLine-CSwin-S/B are the same
# official class with its `inline_cswin_small` / `inline_cswin_base` arguments, counted here).
default_cfgs = generate_default_cfgs({
    "agent_cswin_tiny.in1k": _c("8c562a74441e46d5902b", 83.1, 21.0e6, 4.3e9, AGENT, official_params=20_458_672),
    "agent_cswin_small.in1k": _c("30eb8af675bc4b7a8747", 83.9, 33.0e6, 6.8e9, AGENT),
    "agent_cswin_base.in1k": _c("c8035b0839b2410c8c9f", 84.7, 73.0e6, 14.9e9, AGENT),
    "agent_cswin_base_384.in1k": _c("1239be0df44b47719432", 85.8, 73.0e6, 46.3e9, AGENT, size=384),
    # FLatten's README has no params/FLOPs: fvcore counts of the official code
    "flatten_cswin_tiny.in1k": _c("48ba765ba8b0451d9d5a", 83.1, 21.20e6, 4.34e9, FLATTEN),
    "inline_cswin_tiny.in1k": _c("49fa2ecc543647c4b970", 83.2, 25.0e6, 4.3e9, INLINE, official_params=20_604_520),
    "inline_cswin_small.in1k": _c("59f4e65f776f4052b93c", 83.8, 43.0e6, 6.8e9, INLINE, official_params=33_032_872),
    "inline_cswin_base.in1k": _c("91e17121df284ae38521", 84.5, 96.0e6, 14.9e9, INLINE, official_params=73_413_640),
})

_T = dict(embed_dim=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16))
_S = dict(embed_dim=64, depths=(3, 6, 29, 2), num_heads=(2, 4, 8, 16))  # Agent-CSwin-S: not CSWin-S's [2,4,32,2]
_B = dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32))


def _cswin(variant: str, pretrained: bool, stages: Sequence[str | Mixed], arch: dict, **kwargs) -> CSWinStyle:
    return build_hierarchical(CSWinStyle, variant, pretrained, stages, arch, **kwargs)


@register_model(paper=AGENT["paper_name"])
def agent_cswin_tiny(pretrained: bool = False, **kwargs) -> CSWinStyle:
    """Agent-CSwin-T: global agent branches in stages 1-2 (AABB)."""
    return _cswin("agent_cswin_tiny", pretrained, ("agent", "agent", "softmax", "softmax"), _T, **dict(dict(drop_path_rate=0.2), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_cswin_small(pretrained: bool = False, **kwargs) -> CSWinStyle:
    """Agent-CSwin-S: C 64 with depths [3, 6, 29, 2] (the official `Agent_CSWin_64_36292_small_224`)."""
    return _cswin("agent_cswin_small", pretrained, ("agent", "agent", "softmax", "softmax"), _S, **dict(dict(drop_path_rate=0.4), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_cswin_base(pretrained: bool = False, **kwargs) -> CSWinStyle:
    return _cswin("agent_cswin_base", pretrained, ("agent", "agent", "softmax", "softmax"), _B, **dict(dict(drop_path_rate=0.5), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_cswin_base_384(pretrained: bool = False, **kwargs) -> CSWinStyle:
    """Agent-CSwin-B at 384 (stripe width 12 in stages 3-4)."""
    return _cswin("agent_cswin_base_384", pretrained, ("agent", "agent", "softmax", "softmax"), _B, **dict(dict(img_size=384, split_size=(1, 2, 12, 12), drop_path_rate=0.7), **kwargs))


@register_model(paper=FLATTEN["paper_name"])
def flatten_cswin_tiny(pretrained: bool = False, **kwargs) -> CSWinStyle:
    """FLatten-CSwin-T: focused linear attention in stages 1-2 (LLSS), with both DWC and LePE."""
    return _cswin("flatten_cswin_tiny", pretrained, ("focused", "focused", "softmax", "softmax"), _T, **dict(dict(drop_path_rate=0.2), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_cswin_tiny(pretrained: bool = False, **kwargs) -> CSWinStyle:
    """InLine-CSwin-T: InLine attention in stages 1-2 (IISS)."""
    return _cswin("inline_cswin_tiny", pretrained, ("inline", "inline", "softmax", "softmax"), _T, **dict(dict(drop_path_rate=0.2), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_cswin_small(pretrained: bool = False, **kwargs) -> CSWinStyle:
    return _cswin("inline_cswin_small", pretrained, ("inline", "inline", "softmax", "softmax"), _S, **dict(dict(drop_path_rate=0.4), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_cswin_base(pretrained: bool = False, **kwargs) -> CSWinStyle:
    return _cswin("inline_cswin_base", pretrained, ("inline", "inline", "softmax", "softmax"), _B, **dict(dict(drop_path_rate=0.5), **kwargs))
