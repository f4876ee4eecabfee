"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023, arXiv:2303.08810).

Official code: rayleizhu/BiFormer @ 1697bbb (MIT): `models/biformer.py` (T/S/B), `models/biformer_stl.py`,
`models/biformer_stl_nchw.py`, `ops/bra_legacy.py`, `ops/bra_nchw.py`, `models/_common.py`. Module names
equal the official ones, so the released checkpoints (weights under `"model"`) load unchanged with
`strict=True`. The attention itself is `zoo.ops.bi_level_routing_attention` (block-sparse, no top-k copy
of K/V).

Faithful quirks of the released models, each reproduced on purpose:
- softmax scale of the routed attention is `dim ** -0.5` over the full width, not `head_dim ** -0.5`
  (`ops/bra_legacy.py`, kept "to be consistent with old models" in `ops/bra_nchw.py`);
- stage 4 is dense attention with 8 heads whatever the head_dim (the configured count is not
  passed), no qkv bias and LePE on the attention input x (T/S/B/STL) but on v (STL-nchw);
- a BatchNorm2d (not LayerNorm) before global pooling; LayerNorm eps 1e-6 in the blocks;
- T/S/B: conv positional encoding (depthwise 3x3, residual) before every block, and an empty
  (Identity) slot in the MLP, which is why its second Linear is `mlp.3`.

Deliberate deviations:
- `padding='masked'` (default) accepts any input size: partial border regions have their missing
  tokens masked (see `zoo.ops.routing`). The official classifiers assert sizes that are multiples
  of 112 (regions must tile every stage); at those sizes both modes equal the official model.
  `padding='legacy'` reproduces the official `auto_pad` of the dense-prediction models (zero-pad
  the block input before the qkv projection, attend to the padding, crop).
- STL-nchw at sizes that are not multiples of 112: the official `bra_nchw` changes the region
  size and pads after the projection without masking; that is not reproduced (masked mode only).

torch.compile works (tested on the routed layer, `aot_eager`); the routing's data-dependent block
lists cause graph breaks, so expect little speed-up from compiling the reference path.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from zoo.ops import bi_level_routing_attention

from zoo._registry import register_model
from zoo.factory import build_classifier
from zoo.weights import generate_default_cfgs

from ._common import ClassifierMixin, run_blocks

__all__ = ["BiFormer", "BiLevelRoutingAttention", "NCHWBiLevelRoutingAttention", "AttentionLePE", "NCHWAttentionLePE"]

LAYOUTS = ("biformer", "stl", "stl_nchw")
PADDINGS = ("masked", "legacy")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --- attention layers -------------------------------------------------------------------------

class _QKV(nn.Module):
    """Holds the fused projection under the official name `qkv.qkv`; output channels `[q | k | v]`."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention layer of the released T/S/B/STL models (`ops/bra_legacy.py`), NHWC.

    Args:
        dim: channels (= qk_dim in every released model).
        num_heads: heads of the token attention (dim / 32 in the released models).
        n_win: regions per side.
        topk: routed regions per region.
        side_dwconv: kernel of the LCE depthwise conv on v (`lepe`).
        padding: 'masked' (any size, partial regions masked) or 'legacy' (official `auto_pad`:
            zero-pad x before the projection to multiples of n_win, unmasked, crop after).
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4, side_dwconv: int = 5,
                 padding: str = "masked"):
        super().__init__()
        _check_choice("padding", padding, PADDINGS)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.n_win, self.topk, self.padding = num_heads, n_win, topk, padding
        self.scale = dim ** -0.5  # Faithful: full-width scale (ops/bra_legacy.py: qk_dim ** -0.5)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv = _QKV(dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[B, H, W, C]` -> `[B, H, W, C]`."""
        height, width = x.shape[1:3]
        if self.padding == "legacy":
            x = F.pad(x, (0, 0, 0, -width % self.n_win, 0, -height % self.n_win))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))  # noqa: E731  channels (head, head_dim)
        out = bi_level_routing_attention(heads(q), heads(k), heads(v), self.n_win, self.topk, scale=self.scale)
        out = out.flatten(-2) + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.wo(out)[:, :height, :width]


class NCHWBiLevelRoutingAttention(nn.Module):
    """The refactored NCHW layer of BiFormer-STL-nchw (`ops/bra_nchw.py`): 1x1-conv projections.

    Same algorithm and full-width scale as `BiLevelRoutingAttention` (the official routing has no
    scale, which does not change the top-k). Masked padding only (see the module docstring).
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4, side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.n_win, self.topk = num_heads, n_win, topk
        self.scale = dim ** -0.5  # Faithful: "to be consistent with old models" (ops/bra_nchw.py)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, 1)
        self.output_linear = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[B, C, H, W]` -> `[B, C, H, W]`."""
        q, k, v = self.qkv_linear(x).chunk(3, dim=1)
        heads = lambda t: t.unflatten(1, (self.num_heads, -1)).permute(0, 3, 4, 1, 2)  # noqa: E731
        out = bi_level_routing_attention(heads(q), heads(k), heads(v), self.n_win, self.topk, scale=self.scale)
        out = out.flatten(-2).permute(0, 3, 1, 2) + self.lepe(v)
        return self.output_linear(out)


class AttentionLePE(nn.Module):
    """Dense stage-4 attention of T/S/B/STL (`models/_common.py: AttentionLePE`), NHWC.

    Faithful: 8 heads (the class default; the model never passes its head count), no qkv bias,
    scale head_dim^-0.5, LePE (depthwise conv) on the attention *input* x, added before `proj`.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[B, H, W, C]` -> `[B, H, W, C]`."""
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h, w, c)
        out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class NCHWAttentionLePE(nn.Module):
    """Dense stage-4 attention of STL-nchw (`models/_common.py: nchwAttentionLePE`), NCHW.

    Faithful: 8 heads, no qkv bias, and unlike `AttentionLePE` the LePE is applied to v.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[B, C, H, W]` -> `[B, C, H, W]`."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        heads = lambda t: t.reshape(b, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        out = out.transpose(-1, -2).reshape(b, c, h, w) + self.lepe(v)
        return self.proj(out)


# --- blocks and stages ------------------------------------------------------------------------

class BiFormerBlock(nn.Module):
    """NHWC block: [CPE] -> x + attn(LN(x)) -> x + MLP(LN(x)) (`models/biformer.py: Block`, STL's block).

    Args:
        cpe: the depthwise 3x3 conv positional encoding before the block (`pos_embed`, T/S/B only).
        mlp_slot: T/S/B keep an Identity slot (for an unused DWConv) inside the MLP: `mlp.0`/`mlp.3`;
            STL has none: `mlp.0`/`mlp.2`.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float = 0.0, cpe: bool = True,
                 mlp_slot: bool = True):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cpe else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # Faithful: eps 1e-6 ("important to avoid attention collapsing")
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        slot = [nn.Identity()] if mlp_slot else []
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), *slot, nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[B, H, W, C]`."""
        if self.pos_embed is not None:
            x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class NCHWBiFormerBlock(nn.Module):
    """NCHW block of STL-nchw: LayerNorm2d (eps 1e-6) and a 1x1-conv MLP, no CPE."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[B, C, H, W]`."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BlockSequence(nn.Sequential):
    """A stage's blocks, NCHW in and out; NHWC blocks get one permute each way per stage."""

    def __init__(self, blocks: list[nn.Module], channels_last: bool):
        super().__init__(*blocks)
        self.channels_last = channels_last
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        x = run_blocks(self, x, checkpointing=self.grad_checkpointing)
        return x.permute(0, 3, 1, 2) if self.channels_last else x


class STLStage(nn.Module):
    """STL stages keep their blocks under `.blocks` (official `BasicLayer`)."""

    def __init__(self, blocks: list[nn.Module], channels_last: bool):
        super().__init__()
        self.blocks = BlockSequence(blocks, channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


# --- model ------------------------------------------------------------------------------------

class BiFormer(ClassifierMixin, nn.Module):
    """BiFormer classifier: 4 stages of routed attention (dense at stage 4), BatchNorm, mean, Linear.

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage.
        mlp_ratio: MLP hidden width / channels (3 for T/S/B, 4 for STL).
        layout: 'biformer' (T/S/B: conv-BN-GELU-conv-BN stem, conv3x3-BN downsampling, CPE),
            'stl' (Swin-Tiny layout: 4x4 patch conv + BN stem, BN + conv2x2 downsampling, no CPE),
            'stl_nchw' (the same layout with the refactored NCHW layers).
        n_win: regions per side in stages 1-3 (7 on ImageNet; 16 / 8 in the official COCO / ADE20K models).
        topks: routed regions per region in stages 1-3; stage 4 is dense attention.
        head_dim: head dim of the routed stages (heads = channels / head_dim).
        padding: 'masked' or 'legacy', see `BiLevelRoutingAttention` ('masked' only for 'stl_nchw').
        side_dwconv: LePE / LCE kernel size.
        extra_norms: add the official dense-prediction backbone's LayerNorm2d on each stage output
            (`extra_norms.{i}`, used by `forward_intermediates` and `features_only=True`).
        drop_path_rate: stochastic depth, linear over all blocks.
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (4, 4, 18, 4),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        mlp_ratio: float = 3.0,
        layout: str = "biformer",
        n_win: int = 7,
        topks: tuple[int, ...] = (1, 4, 16),
        head_dim: int = 32,
        padding: str = "masked",
        side_dwconv: int = 5,
        extra_norms: bool = False,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
    ):
        super().__init__()
        _check_choice("layout", layout, LAYOUTS)
        _check_choice("padding", padding, PADDINGS)
        if len(depths) != 4 or len(embed_dims) != 4 or len(topks) != 3:
            raise ValueError(f"need 4 depths, 4 embed_dims and 3 topks (stage 4 is dense), got "
                             f"depths={depths}, embed_dims={embed_dims}, topks={topks}")
        if layout == "stl_nchw" and padding == "legacy":
            raise ValueError("padding='legacy' is not available for layout='stl_nchw': its official layer pads "
                             "after the projection with another region size, which is not reproduced; use 'masked'")
        self.num_classes, self.layout = num_classes, layout
        self.global_pool = self._check_pool(global_pool, num_classes)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.embed_dims = tuple(embed_dims)

        # 1. stem and downsampling (`downsample_layers.{i}`)
        self.downsample_layers = nn.ModuleList()
        if layout == "biformer":
            c = embed_dims[0]
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(in_chans, c // 2, 3, 2, 1), nn.BatchNorm2d(c // 2), nn.GELU(),
                nn.Conv2d(c // 2, c, 3, 2, 1), nn.BatchNorm2d(c),
            ))
            for i in range(3):
                self.downsample_layers.append(nn.Sequential(
                    nn.Conv2d(embed_dims[i], embed_dims[i + 1], 3, 2, 1), nn.BatchNorm2d(embed_dims[i + 1])))
        else:
            self.downsample_layers.append(nn.Sequential(nn.Conv2d(in_chans, embed_dims[0], 4, 4),
                                                        nn.BatchNorm2d(embed_dims[0])))
            for i in range(3):
                self.downsample_layers.append(nn.Sequential(
                    nn.BatchNorm2d(embed_dims[i]), nn.Conv2d(embed_dims[i], embed_dims[i + 1], 2, 2)))

        # 2. stages (`stages.{i}.{j}` for T/S/B, `stages.{i}.blocks.{j}` for STL)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: builds on the meta device too
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            blocks = []
            for j in range(depth):
                dpr = rates[sum(depths[:i]) + j]
                if layout == "stl_nchw":
                    attn = (NCHWBiLevelRoutingAttention(dim, dim // head_dim, n_win, topks[i], side_dwconv)
                            if i < 3 else NCHWAttentionLePE(dim, side_dwconv=side_dwconv))
                    blocks.append(NCHWBiFormerBlock(dim, attn, mlp_ratio, dpr))
                    continue
                attn = (BiLevelRoutingAttention(dim, dim // head_dim, n_win, topks[i], side_dwconv, padding)
                        if i < 3 else AttentionLePE(dim, side_dwconv=side_dwconv))
                legacy = layout == "biformer"
                blocks.append(BiFormerBlock(dim, attn, mlp_ratio, dpr, cpe=legacy, mlp_slot=legacy))
            channels_last = layout != "stl_nchw"
            self.stages.append(BlockSequence(blocks, channels_last) if layout == "biformer"
                               else STLStage(blocks, channels_last))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
        self.extra_norms = nn.ModuleList(LayerNorm2d(d, eps=1e-6) for d in embed_dims) if extra_norms else None

        # 3. head: Faithful: BatchNorm2d before pooling
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^downsample_layers\.0",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:blocks\.)?(\d+)", None),
                (r"^downsample_layers\.(\d+)", (0,)),
                (r"^(?:norm|extra_norms)", (99999,)),
            ],
        )

    def _stages(self, x: torch.Tensor, stop: int | None = None):
        """Each stage's output (NCHW), after that stage's downsampling layer."""
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = stage(downsample(x))
            yield i, x, None
            if stop is not None and i >= stop:
                return

    def _to_map(self, x: torch.Tensor, size=None) -> torch.Tensor:
        return x

    def _intermediate(self, index: int, x: torch.Tensor, size, norm: bool) -> torch.Tensor:
        """Through `extra_norms` when the model has them; `norm` also applies the head BatchNorm to the
        stage-4 output (the only one it fits)."""
        if norm and index == len(self.feature_info) - 1:
            x = self.norm(x)
        return self.extra_norms[index](x) if self.extra_norms is not None else x

    def _final(self, x: torch.Tensor, size=None) -> torch.Tensor:
        return self.norm(x)

    def _prune_stages(self, keep: int, prune_norm: bool) -> None:
        self.stages = self.stages[:keep]
        self.downsample_layers = self.downsample_layers[:keep]
        if prune_norm:
            self.norm = nn.Identity()


# --- checkpoint converter, pretrained configs and variants ------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: BiFormer) -> dict[str, torch.Tensor]:
    """Official checkpoints load unchanged; only a model built with `extra_norms=True` (dense
    prediction) keeps its own freshly initialised `extra_norms.*`, which the ImageNet files lack."""
    own = model.state_dict()
    return {**{k: v for k, v in own.items() if k.startswith("extra_norms.") and k not in state_dict}, **state_dict}


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        # official eval: resize 256 (bicubic) -> center crop 224, ImageNet mean/std (datasets.py)
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0", "classifier": "head", "license": "mit",
        "paper_name": "BiFormer: Vision Transformer with Bi-Level Routing Attention", "paper_ids": "arXiv:2303.08810",
        "origin_url": "https://github.com/rayleizhu/BiFormer", "converter": checkpoint_filter_fn, **kwargs,
    }


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/{}/root/content"

# top1 / params / FLOPs (fvcore multiply-adds) as published in the official README table
default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(url=_ONEDRIVE.format("s!AkBbczdRlZvChHEOoGkgwgQzEDlM"),
                               file_name="biformer_tiny_in1k.pth", top1=81.4, paper_params=13.1e6, paper_flops=2.2e9),
    "biformer_small.in1k": _cfg(url=_ONEDRIVE.format("s!AkBbczdRlZvChHDyM-x9KWRBZ832"),
                                file_name="biformer_small_in1k.pth", top1=83.8, paper_params=25.5e6,
                                paper_flops=4.5e9),
    "biformer_base.in1k": _cfg(url=_ONEDRIVE.format("s!AkBbczdRlZvChHI_XPhoadjaNxtO"),
                               file_name="biformer_base_in1k.pth", top1=84.3, paper_params=56.8e6, paper_flops=9.8e9),
    "biformer_stl.in1k": _cfg(url=_ONEDRIVE.format("s!AkBbczdRlZvChSf-m7ujkvx9lIQ1"),
                              file_name="biformer_stl_in1k.pth", top1=82.7, paper_params=28.4e6, paper_flops=4.6e9),
    "biformer_stl_nchw.in1k": _cfg(url=_ONEDRIVE.format("s!AkBbczdRlZvChWYrKbWbMgqd2Ai0"),
                                   file_name="biformer_stl_nchw_in1k.pth", top1=82.7, paper_params=28.4e6,
                                   paper_flops=4.6e9),
})


def _create(variant: str, pretrained: bool, **kwargs) -> BiFormer:
    return build_classifier(BiFormer, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


_PAPER = "BiFormer: Vision Transformer with Bi-Level Routing Attention (CVPR 2023)"


@register_model(paper=_PAPER)
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1M params, 2.2 GFLOPs, 81.4% top-1."""
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), mlp_ratio=3.0)
    return _create("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model(paper=_PAPER)
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5M params, 4.5 GFLOPs, 83.8% top-1."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), mlp_ratio=3.0)
    return _create("biformer_small", pretrained, **dict(args, **kwargs))


@register_model(paper=_PAPER)
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: 56.8M params, 9.8 GFLOPs, 84.3% top-1."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), mlp_ratio=3.0)
    return _create("biformer_base", pretrained, **dict(args, **kwargs))


@register_model(paper=_PAPER)
def biformer_stl(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-STL (Swin-Tiny layout, the paper's ablation model): 28.4M params, 4.6 GFLOPs, 82.7% top-1."""
    args = dict(depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratio=4.0, layout="stl")
    return _create("biformer_stl", pretrained, **dict(args, **kwargs))


@register_model(paper=_PAPER)
def biformer_stl_nchw(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-STL with the refactored NCHW layers: 28.4M params, 4.6 GFLOPs, 82.7% top-1."""
    args = dict(depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratio=4.0, layout="stl_nchw")
    return _create("biformer_stl_nchw", pretrained, **dict(args, **kwargs))
