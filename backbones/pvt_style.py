"""PVT-style pyramid backbone (Wang et al., "Pyramid Vision Transformer", ICCV 2021) with a
per-stage attention choice, and the PVT variants of Agent Attention, FLatten and InLine.

Official layout, so the released checkpoints load unchanged: `patch_embed{i}.{proj,norm}`
(stride-p conv + LayerNorm), `pos_embed{i}` (1, h*w, C), `block{i}.j.{norm1,attn,norm2,mlp}`
with `attn.q` + `attn.kv`, and `head`. All released agent / linear configs use no spatial
reduction (`PVT_LA_SR_RATIOS=1111`), which is the only form built here. The output is the
token mean of stage 4: Agent-PVT and InLine-PVT have **no final norm**; FLatten-PVT defines a
`norm` whose use is commented out in the official code, kept here as an unused module so its
checkpoint loads (`unused_final_norm=True`).

Other input sizes: `pos_embed{i}` are bilinearly resized to the runtime grid (the official
`_get_pos_embed`), agent row/column biases and FLatten's positional encodings as in
`_mixers`.
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
    FLATTEN,
    INLINE,
    ClassifierMixin,
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
    AgentAttention,
    FocusedLinearAttention,
    InLineAttention,
    Size,
    SoftmaxAttention,
    from_grid,
    resize_tokens,
    to_grid,
)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Size]:
        x = self.proj(x)
        return self.norm(from_grid(x)), (x.shape[2], x.shape[3])


class OverlapPatchEmbed(nn.Module):
    """PVTv2's overlapping patch embedding: conv (k 7 s 4 / k 3 s 2, padding k//2) + LayerNorm."""

    def __init__(self, kernel: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Size]:
        x = self.proj(x)
        return self.norm(from_grid(x)), (x.shape[2], x.shape[3])


class DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return from_grid(self.dwconv(to_grid(x, size)))


class ConvMlp(nn.Module):
    """PVTv2's MLP: fc1 -> 3x3 depthwise conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), size)))
        return self.drop(self.fc2(x))


class PVTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid: Size, mixer: str, agent_num: int, mlp_ratio: float,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, focusing_factor: float = 3.0,
                 kernel_size: int = 5, conv_mlp: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if mixer == "agent":
            self.attn = AgentAttention(dim, num_heads, agent_num, grid, qkv_layout="split", attn_drop=attn_drop,
                                       proj_drop=drop)
        elif mixer == "focused":
            self.attn = FocusedLinearAttention(dim, num_heads, grid, qkv_layout="split", focusing_factor=focusing_factor,
                                               kernel_size=kernel_size, proj_drop=drop)
        elif mixer == "inline":
            self.attn = InLineAttention(dim, num_heads, qkv_layout="split", proj_drop=drop)
        else:
            self.attn = SoftmaxAttention(dim, num_heads, qkv_layout="split", attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.conv_mlp = conv_mlp
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop) if conv_mlp else Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        y = self.norm2(x)
        return x + self.drop_path(self.mlp(y, size) if self.conv_mlp else self.mlp(y))


class PVTStyle(ClassifierMixin, nn.Module):
    """PVT macro with one mixer per block ("agent", "focused", "inline", "softmax" without SR).

    `version=1`: PVTv1 (stride-p patch embeddings, learned `pos_embed{i}`, plain MLP);
    `version=2`: PVTv2 (overlapping patch embeddings, no pos_embed, MLP with a 3x3 depthwise
    conv, a LayerNorm `norm{i}` closing every stage).
    `forward_features` gives the last stage's NCHW map (timm's PVTv2 layout); `global_pool`
    'avg' (default) or '' (forward returns that map; then num_classes must be 0).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 num_heads: tuple[int, ...] = (1, 2, 5, 8), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 depths: tuple[int, ...] = (2, 2, 2, 2), block_types=None, agent_num: tuple[int, ...] = (9, 16, 49, 49),
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 focusing_factor: float = 3.0, kernel_size: int = 5, unused_final_norm: bool = False,
                 version: int = 1, global_pool: str = "avg"):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (PVTv1) or 2 (PVTv2), got {version}")
        self.version = version
        block_types = check_blocks(block_types or stage_blocks(("agent",) * len(depths), depths), depths)
        img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.num_stages = len(depths)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.global_pool = self._check_pool(global_pool, num_classes)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.grids = []
        self.feature_info = []
        for i in range(len(depths)):
            if i:
                grid = (grid[0] // 2, grid[1] // 2)
            self.grids.append(grid)
            in_dim = in_chans if i == 0 else embed_dims[i - 1]
            if version == 1:
                setattr(self, f"patch_embed{i + 1}", PatchEmbed(patch_size if i == 0 else 2, in_dim, embed_dims[i]))
                pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dims[i]))
                init_trunc_normal(pos)
                setattr(self, f"pos_embed{i + 1}", pos)
                setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
            else:
                setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(7 if i == 0 else 3, 4 if i == 0 else 2, in_dim,
                                                                       embed_dims[i]))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                PVTBlock(embed_dims[i], num_heads[i], grid, mixer, agent_num[i], mlp_ratios[i], drop_rate,
                         attn_drop_rate, dpr[sum(depths[:i]) + j], focusing_factor, kernel_size, conv_mlp=version == 2)
                for j, mixer in enumerate(block_types[i])]))
            if version == 2:
                setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i, module=f"block{i + 1}"))
        if unused_final_norm:
            self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)  # in FLatten-PVT's checkpoints, never applied
        self.head_drop = nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_norm)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"pos_embed{i + 1}" for i in range(self.num_stages)} if self.version == 1 else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed1|^pos_embed1", blocks=[(r"^block(\d+)\.(\d+)", None),
                                                              (r"^(?:patch_embed|pos_embed)(\d+)", (0,))])

    def _stages(self, x: torch.Tensor, stop: int | None = None):
        for i in range(self.num_stages):
            x, size = getattr(self, f"patch_embed{i + 1}")(x)
            if self.version == 1:
                pos = resize_tokens(getattr(self, f"pos_embed{i + 1}"), self.grids[i], size, "bilinear")
                x = getattr(self, f"pos_drop{i + 1}")(x + pos)
            x = run_blocks(getattr(self, f"block{i + 1}"), x, size, checkpointing=self.grad_checkpointing)
            if self.version == 2:
                x = getattr(self, f"norm{i + 1}")(x)
            x = to_grid(x, size)
            yield i, x, size
            if stop is not None and i >= stop:
                return

    def _to_map(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return x

    def _final(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        """The last stage's NCHW map as it is (no final norm in these models, see the module doc)."""
        return x




def _c(file_id: str, top1: float, params: float | None, flops: float | None, family: dict, size: int = 224, **kw) -> dict:
    """A cfg with the README's numbers and the stride-32 output grid."""
    return release_cfg(file_id, top1, params, flops, family, size, first_conv="patch_embed1.proj",
                       pool_size=(size // 32, size // 32), **kw)


# paper_params / paper_flops: the READMEs' tables, as counts. `official_params`: the official code's
# exact count where the README differs (inline_pvt_large: 51.15M vs 50.2M): the official definition
# instantiated with the released config (tests/test_agent_backbones.py OFFICIAL_PARAMS), equal to ours.
default_cfgs = generate_default_cfgs({
    "agent_pvt_tiny.in1k": _c("13fdf0e0a7c5498c934f", 78.4, 11.6e6, 2.0e9, AGENT),
    "agent_pvt_small.in1k": _c("36b8be9a8863456685a3", 82.2, 20.6e6, 4.0e9, AGENT),
    "agent_pvt_medium.in1k": _c("4d00ecacf18b45f9b88c", 83.4, 35.9e6, 7.0e9, AGENT),
    "agent_pvt_medium_256.in1k": _c("654df734121643b19c52", 83.8, 36.1e6, 9.2e9, AGENT, size=256),
    "agent_pvt_large.in1k": _c("040cfe0cfbbe4762ad09", 83.7, 48.7e6, 10.4e9, AGENT),
    # FLatten's README has no params/FLOPs: fvcore counts of the official code
    "flatten_pvt_tiny.in1k": _c("3ab1d773f19d45648690", 77.8, 12.15e6, 2.05e9, FLATTEN),
    "flatten_pvt_v2_b0.in1k": _c("5d1f01532b104da28e7b", 71.1, 3.59e6, 0.59e9, FLATTEN),
    "inline_pvt_tiny.in1k": _c("90ac52b1555b401eb5e6", 78.2, 12.0e6, 2.0e9, INLINE),
    "inline_pvt_small.in1k": _c("1ab953b2479d433080a3", 82.0, 21.6e6, 3.9e9, INLINE),
    "inline_pvt_medium.in1k": _c("a72aec31e6084bc0a280", 83.2, 37.6e6, 6.9e9, INLINE),
    "inline_pvt_large.in1k": _c("efd91318ba964f01b288", 83.6, 50.2e6, 10.2e9, INLINE, official_params=51_154_280),
})

_INLINE_HEADS = (2, 4, 10, 16)  # InLine-PVT doubles PVT's heads (head_dim 32)
_DEPTHS = {"tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}


def _pvt(variant: str, pretrained: bool, mixer: str, size: str, **kwargs) -> PVTStyle:
    """Every block of a PVT release uses the family's `mixer` (the papers' AAAA / LLLL / IIII)."""
    base = dict(depths=_DEPTHS[size], num_heads=_INLINE_HEADS if mixer == "inline" else (1, 2, 5, 8))
    return build_hierarchical(PVTStyle, variant, pretrained, (mixer,) * 4, base, **kwargs)


@register_model(paper=AGENT["paper_name"])
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> PVTStyle:
    """Agent-PVT-T: agent attention in every block (AAAA), 9-16-49-49 agents, no SR."""
    return _pvt("agent_pvt_tiny", pretrained, "agent", "tiny", **kwargs)


@register_model(paper=AGENT["paper_name"])
def agent_pvt_small(pretrained: bool = False, **kwargs) -> PVTStyle:
    return _pvt("agent_pvt_small", pretrained, "agent", "small", **kwargs)


@register_model(paper=AGENT["paper_name"])
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> PVTStyle:
    return _pvt("agent_pvt_medium", pretrained, "agent", "medium", **dict(dict(drop_path_rate=0.3), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_pvt_medium_256(pretrained: bool = False, **kwargs) -> PVTStyle:
    """Agent-PVT-M trained at 256 (pos_embeds and biases sized for 64x64 ... 8x8 grids)."""
    return _pvt("agent_pvt_medium_256", pretrained, "agent", "medium", **dict(dict(img_size=256, drop_path_rate=0.3), **kwargs))


@register_model(paper=AGENT["paper_name"])
def agent_pvt_large(pretrained: bool = False, **kwargs) -> PVTStyle:
    return _pvt("agent_pvt_large", pretrained, "agent", "large", **dict(dict(drop_path_rate=0.3), **kwargs))


@register_model(paper=FLATTEN["paper_name"])
def flatten_pvt_tiny(pretrained: bool = False, **kwargs) -> PVTStyle:
    """FLatten-PVT-T: focused linear attention in every block (LLLL), no SR."""
    return _pvt("flatten_pvt_tiny", pretrained, "focused", "tiny", **dict(dict(unused_final_norm=True), **kwargs))


@register_model(paper=FLATTEN["paper_name"])
def flatten_pvt_v2_b0(pretrained: bool = False, **kwargs) -> PVTStyle:
    """FLatten-PVTv2-B0: PVTv2-b0 (C 32-64-160-256) with focused linear attention everywhere, no SR."""
    args = dict(version=2, embed_dims=(32, 64, 160, 256), block_types=stage_blocks(("focused",) * 4, (2, 2, 2, 2)))
    return build_classifier(PVTStyle, "flatten_pvt_v2_b0", pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)),
                            **dict(args, **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_pvt_tiny(pretrained: bool = False, **kwargs) -> PVTStyle:
    """InLine-PVT-T: injective linear attention in every block (IIII), heads 2-4-10-16, no SR."""
    return _pvt("inline_pvt_tiny", pretrained, "inline", "tiny", **kwargs)


@register_model(paper=INLINE["paper_name"])
def inline_pvt_small(pretrained: bool = False, **kwargs) -> PVTStyle:
    return _pvt("inline_pvt_small", pretrained, "inline", "small", **kwargs)


@register_model(paper=INLINE["paper_name"])
def inline_pvt_medium(pretrained: bool = False, **kwargs) -> PVTStyle:
    return _pvt("inline_pvt_medium", pretrained, "inline", "medium", **dict(dict(drop_path_rate=0.3), **kwargs))


@register_model(paper=INLINE["paper_name"])
def inline_pvt_large(pretrained: bool = False, **kwargs) -> PVTStyle:
    return _pvt("inline_pvt_large", pretrained, "inline", "large", **dict(dict(drop_path_rate=0.3), **kwargs))
