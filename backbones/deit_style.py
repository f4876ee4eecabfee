"""DeiT-style isotropic ViT (Touvron et al., "Training data-efficient image transformers", ICML
2021) with a per-block attention choice, and the DeiT variants of Agent Attention and InLine.

Official (timm 0.4.12 VisionTransformer) layout: `patch_embed.proj`, `cls_token`, `pos_embed`
(1, 1 + h*w, C), `blocks.i.{norm1,attn,norm2,mlp}`, `norm`, `head`; LayerNorm eps 1e-6; the
output is the normed CLS token.

CLS handling (Agent-Attention#17): the CLS token is a query and a key like any token, but the
agents are pooled from the *patch* queries only, its biases are `ac_bias` (CLS as key) and
`ca_bias` (CLS as query), and the 3x3 DWC (agent) / predicted 3x3 residual (InLine) act on
the patch tokens only. Other input sizes: the pos_embed grid is resized bicubically (the DeiT
/ timm fine-tuning rule), agent row/column biases as in `_mixers`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, to_2tuple

from zoo._registry import register_model
from zoo.factory import build_classifier
from zoo.weights import generate_default_cfgs

from ._common import (
    AGENT,
    INLINE,
    ClassifierMixin,
    check_blocks,
    drop_path_rates,
    init_linear_and_norm,
    init_trunc_normal,
    release_cfg,
    run_blocks,
)
from ._mixers import AgentAttention, InLineAttention, Size, SoftmaxAttention, from_grid, resize_tokens, to_grid


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Size]:
        x = self.proj(x)
        return from_grid(x), (x.shape[2], x.shape[3])


class DeiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: Size, mixer: str, agent_num: int, mlp_ratio: float = 4.0,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if mixer == "agent":
            self.attn = AgentAttention(dim, num_heads, agent_num, grid, cls_token=True, attn_drop=attn_drop,
                                       proj_drop=drop)
        elif mixer == "inline":
            self.attn = InLineAttention(dim, num_heads, proj_drop=drop)
        elif mixer == "softmax":
            self.attn = SoftmaxAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        else:
            raise ValueError(f"DeiT-style blocks support 'agent', 'inline' or 'softmax', got {mixer!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DeiTStyle(ClassifierMixin, nn.Module):
    """DeiT macro; `block_types` is one tuple of mixer names (one per block).

    `forward_features` gives the normed tokens [B, 1 + h*w, C]; `global_pool` 'token' (the CLS
    token, default and official), 'avg' (mean of the patch tokens) or '' (forward returns tokens).
    """

    output_fmt = "NLC"
    num_prefix_tokens = 1
    pool_types = ("token", "avg")

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 block_types=None, agent_num: int = 49, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "token"):
        super().__init__()
        (block_types,) = check_blocks((block_types or ("softmax",) * depth,), (depth,))
        img_size = to_2tuple(img_size)
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.global_pool = self._check_pool(global_pool, num_classes)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            DeiTBlock(embed_dim, num_heads, self.grid, mixer, agent_num, mlp_ratio, drop_rate, attn_drop_rate, dpr[i])
            for i, mixer in enumerate(block_types)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        init_trunc_normal(self.pos_embed)
        init_trunc_normal(self.cls_token)
        self.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _stages(self, x: torch.Tensor, stop: int | None = None):
        x, size = self.patch_embed(x)
        pos = torch.cat([self.pos_embed[:, :1], resize_tokens(self.pos_embed[:, 1:], self.grid, size, "bicubic")], 1)
        x = self.pos_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos)
        for i, blk in enumerate(self.blocks):
            x = run_blocks((blk,), x, size, checkpointing=self.grad_checkpointing)
            yield i, x, size
            if stop is not None and i >= stop:
                return

    def _to_map(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return to_grid(x[:, self.num_prefix_tokens:], size)

    def _final(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        """All tokens (CLS first), normed: [B, 1 + h*w, C] (timm's ViT)."""
        return self.norm(x)




def _c(file_id: str, top1: float, params: float, flops: float, family: dict, size: int = 224, **kw) -> dict:
    """A cfg with the README's numbers (crop 1.0 above 224)."""
    return release_cfg(file_id, top1, params, flops, family, size, **(dict(crop_pct=1.0) if size != 224 else {}), **kw)


default_cfgs = generate_default_cfgs({
    "agent_deit_tiny.in1k": _c("57e0904221824ee7b7af", 74.9, 6.0e6, 1.2e9, AGENT),
    "agent_deit_small.in1k": _c("fdd43304372541db8ea7", 80.5, 22.7e6, 4.4e9, AGENT),
    "agent_deit_small_448.in1k": _c("a228f86241c445f1969b", 83.1, 23.1e6, 17.7e9, AGENT, size=448),
    "agent_deit_base.in1k": _c("5115f15fdd7e4ab58fbc", 82.0, 87.2e6, 17.6e9, AGENT),
    "inline_deit_tiny.in1k": _c("1d6b8191ad6d4114b291", 74.5, 6.5e6, 1.1e9, INLINE),
    "inline_deit_small.in1k": _c("2f3898b07e9247f3beb3", 80.2, 16.7e6, 5.0e9, INLINE, size=288),
    "inline_deit_base.in1k": _c("10bdd726d4b0435eb34e", 82.3, 23.8e6, 17.2e9, INLINE, size=448),
})


def _deit(variant: str, pretrained: bool, family_blocks: int, mixer: str, **kwargs) -> DeiTStyle:
    depth = kwargs.get("depth", 12)
    family_blocks = min(family_blocks, depth)
    kwargs.setdefault("block_types", (mixer,) * family_blocks + ("softmax",) * (depth - family_blocks))
    return build_classifier(DeiTStyle, variant, pretrained, feature_cfg=dict(out_indices=(9, 10, 11)), **kwargs)


@register_model(paper=AGENT["paper_name"])
def agent_deit_tiny(pretrained: bool = False, **kwargs) -> DeiTStyle:
    """Agent-DeiT-T: agent attention (49 agents) in all 12 blocks."""
    return _deit("agent_deit_tiny", pretrained, 12, "agent", **dict(dict(embed_dim=192, num_heads=3), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_deit_small(pretrained: bool = False, **kwargs) -> DeiTStyle:
    return _deit("agent_deit_small", pretrained, 12, "agent",
                 **dict(dict(embed_dim=384, num_heads=6, drop_path_rate=0.1), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_deit_small_448(pretrained: bool = False, **kwargs) -> DeiTStyle:
    """Agent-DeiT-S at 448 (28x28 patch grid, 49 agents)."""
    return _deit("agent_deit_small_448", pretrained, 12, "agent",
                 **dict(dict(img_size=448, embed_dim=384, num_heads=6, drop_path_rate=0.1), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_deit_base(pretrained: bool = False, **kwargs) -> DeiTStyle:
    """Agent-DeiT-B: agent attention (81 agents) in the first 4 blocks only, softmax after."""
    return _deit("agent_deit_base", pretrained, 4, "agent",
                 **dict(dict(embed_dim=768, num_heads=12, agent_num=81, drop_path_rate=0.3), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_deit_tiny(pretrained: bool = False, **kwargs) -> DeiTStyle:
    """InLine-DeiT-T: C 192 with 6 heads (head_dim 32), InLine attention in all blocks."""
    return _deit("inline_deit_tiny", pretrained, 12, "inline", **dict(dict(embed_dim=192, num_heads=6), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_deit_small(pretrained: bool = False, **kwargs) -> DeiTStyle:
    """InLine-DeiT-S: a narrow (C 320, 10 heads) model at 288, not DeiT-S's width."""
    return _deit("inline_deit_small", pretrained, 12, "inline",
                 **dict(dict(img_size=288, embed_dim=320, num_heads=10), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_deit_base(pretrained: bool = False, **kwargs) -> DeiTStyle:
    """InLine-DeiT-B: C 384, 12 heads, at 448."""
    return _deit("inline_deit_base", pretrained, 12, "inline",
                 **dict(dict(img_size=448, embed_dim=384, num_heads=12), **kwargs))
