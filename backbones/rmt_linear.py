"""MAViT (MALA) and RAVLT (RALA): the RMT-style hybrid linear-attention backbones of qhfan.

One macro for both families (qhfan/MALA:classfication_release/model.py,
qhfan/RALA:classfication/RALA.py): a four-conv stem to stride 4, four stages of blocks

    x = x + DWConv3x3(x);  x = x + g1 * Attn(LN(x));  x = x + g2 * FFN(LN(x))

with a 3x3-conv + BN downsampling after stages 1-3, then a 1x1 conv to `projection`
channels, BN, Swish, average pool and a 1x1-conv classifier. All tensors stay NCHW.

Every attention is global over the stage's feature map: a 1x1 conv `qkvo` gives q, k, v and
an output gate o; 2-D RoPE rotates q and k; LePE (5x5 depthwise conv on v) is added; the
output is proj((y + LePE(v)) * o). `attn_kinds` picks, per stage (or per block), what y is:
'mala' (magnitude-aware linear attention), 'rala' (rank-augmented linear attention) or
'softmax'. The released models use the linear kind in stages 1-2 and softmax in stages 3-4.

The RoPE table is computed from the runtime feature size (as the official code does), so any
input size that the stride-32 layout accepts works with no interpolation.

Faithful: module and parameter names equal the official ones (`attn.qkvo`, `layers.i.RoPE.angle`,
`norm1.norm`, `gamma_1`, `patch_embed.proj.<i>`, `head` as a 1x1 conv), so official checkpoints
load unchanged; params equal the official models'. FLOPs: `zoo.flops` equals the official
code's fvcore count (the RAVLT README's 2.4/4.6/9.9/16.0G are 6-10 % below that count).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from zoo.ops import mala_attention, rala_attention
from zoo.ops.linear_rmt.naive import rope as apply_rope

from zoo._registry import register_model
from zoo.factory import build_classifier
from zoo.weights import generate_default_cfgs

from ._common import ClassifierMixin, run_blocks

ATTN_KINDS = ("mala", "rala", "softmax")


class RoPE2d(nn.Module):
    """2-D rotary position embedding of the qhfan models.

    The first half of each head's channels rotates with the row index, the second half with
    the column index; frequencies 1/10000^linspace(0, 1, head_dim/4), each used by one
    channel pair. `angle` is a persistent buffer because the official checkpoints hold it.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for 2-D RoPE, got {head_dim}: change dims or heads")
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer("angle", angle.repeat_interleave(2))

    def forward(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """sin, cos `[height*width, head_dim]` in float32 (also for a half-precision model), row-major tokens."""
        angle = self.angle.float()
        rows = torch.arange(height, device=angle.device, dtype=angle.dtype)[:, None] * angle
        cols = torch.arange(width, device=angle.device, dtype=angle.dtype)[:, None] * angle
        half = angle.numel()
        theta = torch.cat([rows[:, None].expand(height, width, half), cols[None].expand(height, width, half)], -1)
        theta = theta.flatten(0, 1)
        return theta.sin(), theta.cos()

    def tables(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed_sin, cos) for `zoo.ops.linear_rmt.naive.rope` and the ops' `rope=`: the sin of even channels
        negated, so the official `x * cos + rotate_every_two(x) * sin` (rotate_every_two(x) = (-x1, x0, ...))
        is x * cos + swap_pairs(x) * signed_sin, the same products (computed once per stage)."""
        sin, cos = self(height, width)
        return torch.stack([-sin[..., ::2], sin[..., 1::2]], dim=-1).flatten(-2), cos


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of NCHW; a wrapper so the keys read `norm1.norm.*` as in the official models."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = _TimmLayerNorm2d(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class RMTAttention(nn.Module):
    """Global attention with a 1x1-conv qkvo projection, 2-D RoPE, LePE and an output gate.

    kind 'mala': phi = ELU + 1 on q, k; z (and MALA's magnitude terms) from phi(q), phi(k)
    before RoPE, the numerator from RoPE'd phi(q), phi(k) (`zoo.ops.mala_attention`).
    kind 'rala': the same features; keys re-weighted by softmax(s mean(q).k) before RoPE
    (`zoo.ops.rala_attention`). kind 'softmax': softmax(s RoPE(q) RoPE(k)^T) v.
    """

    def __init__(self, dim: int, num_heads: int, kind: str):
        super().__init__()
        if kind not in ATTN_KINDS:
            raise ValueError(f"attention kind must be one of {ATTN_KINDS}, got {kind!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.kind = kind
        self.num_heads = num_heads
        self.qkvo = nn.Conv2d(dim, dim * 4, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, signed_sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """x `[B, C, H, W]`; `signed_sin`, `cos`: the stage's `RoPE2d.tables`."""
        b, c, h, w = x.shape
        heads, n = self.num_heads, h * w
        qk, v, o = self.qkvo(x).split([2 * c, c, c], dim=1)  # one split: its backward is one cat
        lepe = self.lepe(v)
        # q and k side by side as 2 * heads heads `[N, d]` (a view of the conv output): each elementwise op
        # below runs once for both
        qk = qk.reshape(b, 2 * heads, c // heads, n).transpose(-1, -2)
        v = v.reshape(b, heads, c // heads, n).transpose(-1, -2)
        if self.kind == "softmax":
            # RoPE in float32 (the tables are), rounded once to v's dtype (autocast would round it the same)
            q, k = apply_rope(qk, signed_sin, cos).to(v.dtype).chunk(2, dim=1)
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            qk = F.elu(qk) + 1
            op = mala_attention if self.kind == "mala" else rala_attention
            # the numerator features RoPE(q), RoPE(k) are made inside the kernel (the reference makes them itself)
            y = op(*qk.chunk(2, dim=1), v, rope=(signed_sin, cos))
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj((y.to(lepe.dtype) + lepe) * o)


class ConvFFN(nn.Module):
    """1x1 conv -> GELU -> (3x3 depthwise conv + identity) -> 1x1 conv."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class RMTBlock(nn.Module):
    """Conv position encoding, then pre-norm attention and FFN with optional layer scale."""

    def __init__(self, dim: int, num_heads: int, kind: str, mlp_ratio: float, drop_path: float, layer_scale: float | None):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.attn = RMTAttention(dim, num_heads, kind)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim)
        self.ffn = ConvFFN(dim, int(mlp_ratio * dim))
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale)))

    def forward(self, x: torch.Tensor, signed_sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        a, f = (self.gamma_1, self.gamma_2) if self.layer_scale else (1.0, 1.0)
        x = x + self.drop_path(a * self.attn(self.norm1(x), signed_sin, cos))
        return x + self.drop_path(f * self.ffn(self.norm2(x)))


class Downsample(nn.Module):
    """3x3 stride-2 conv + BatchNorm between stages (official `PatchMerging`)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))


class RMTStage(nn.Module):
    """The blocks of one resolution; `downsample` (to the next stage) is applied by the model."""

    def __init__(self, dim: int, out_dim: int | None, depth: int, num_heads: int, kinds: Sequence[str],
                 mlp_ratio: float, drop_path: Sequence[float], layer_scale: float | None):
        super().__init__()
        self.RoPE = RoPE2d(dim // num_heads)  # official name, kept for the checkpoint keys
        self.blocks = nn.ModuleList(
            RMTBlock(dim, num_heads, kinds[i], mlp_ratio, drop_path[i], layer_scale) for i in range(depth)
        )
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, x, *self.RoPE.tables(x.shape[2], x.shape[3]), checkpointing=self.grad_checkpointing)


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    """3x3 s2 -> 3x3 -> 3x3 -> 3x3 s2 convs with BN (GELU between); indices match `patch_embed.proj.<i>`."""
    half = dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim),
    )


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = _stem(in_chans, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _stage_kinds(attn_kinds, depths: Sequence[int]) -> list[tuple[str, ...]]:
    if len(attn_kinds) != len(depths):
        raise ValueError(f"attn_kinds needs one entry per stage ({len(depths)}), got {attn_kinds!r}")
    out = []
    for i, (kinds, depth) in enumerate(zip(attn_kinds, depths)):
        kinds = (kinds,) * depth if isinstance(kinds, str) else tuple(kinds)
        if len(kinds) != depth or any(k not in ATTN_KINDS for k in kinds):
            raise ValueError(
                f"attn_kinds[{i}] must be one of {ATTN_KINDS} or {depth} of them (one per block), got {attn_kinds[i]!r}"
            )
        out.append(kinds)
    return out


class RMTLinear(ClassifierMixin, nn.Module):
    """The MAViT / RAVLT classifier (timm model API).

    Args:
        attn_kinds: per stage 'mala' | 'rala' | 'softmax', or a tuple with one kind per block.
        embed_dims, depths, num_heads: per stage.
        mlp_ratio: FFN hidden = int(mlp_ratio * dim).
        projection: channels of the 1x1 conv before pooling (the head's input).
        layer_scale: per-stage initial value of gamma_1/gamma_2, or None for no layer scale.
    """

    def __init__(
        self,
        attn_kinds: Sequence[str | Sequence[str]] = ("rala", "rala", "softmax", "softmax"),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratio: float = 3.5,
        projection: int = 1024,
        layer_scale: Sequence[float] | None = (1.0, 1.0, 1.0, 1.0),
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
    ):
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_heads):
            raise ValueError(f"embed_dims, depths, num_heads need one entry per stage, got {embed_dims}, {depths}, {num_heads}")
        kinds = _stage_kinds(attn_kinds, depths)
        scales = [None] * len(depths) if layer_scale is None else list(layer_scale)
        self.num_classes = num_classes
        self.global_pool = self._check_pool(global_pool, num_classes)
        self.drop_rate = drop_rate
        self.num_features = embed_dims[-1]
        self.head_hidden_size = projection
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            out_dim = embed_dims[i + 1] if i + 1 < len(depths) else None
            start = sum(depths[:i])
            self.layers.append(RMTStage(embed_dims[i], out_dim, depth, num_heads[i], kinds[i], mlp_ratio,
                                        dpr[start:start + depth], scales[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"layers.{i}"))
        self.proj = nn.Conv2d(embed_dims[-1], projection, 1)
        self.norm = nn.BatchNorm2d(projection)
        self.head = nn.Conv2d(projection, num_classes, 1) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
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
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99999,)),
            ],
        )

    def _check_pool(self, global_pool: str, num_classes: int) -> str:
        """'avg' (the official head) or '' (no pooling: the 1x1-conv head classifies every position)."""
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' (the official head) or '' (no pooling), got {global_pool!r}")
        return global_pool

    def _new_head(self, num_classes: int, ref: torch.Tensor) -> nn.Module:
        return nn.Conv2d(self.head_hidden_size, num_classes, 1, device=ref.device, dtype=ref.dtype)

    def _stages(self, x: torch.Tensor, stop: int | None = None):
        """Each stage's output before its downsample (strides 4, 8, 16, 32), NCHW."""
        x = self.patch_embed(x)
        for i, stage in enumerate(self.layers):
            x = stage(x)
            yield i, x, None
            if stop is not None and i >= stop:
                return
            if stage.downsample is not None:
                x = stage.downsample(x)

    def _to_map(self, x: torch.Tensor, size=None) -> torch.Tensor:
        return x

    def _final(self, x: torch.Tensor, size=None) -> torch.Tensor:
        """`[B, embed_dims[-1], H/32, W/32]`: the last stage's output (the head's 1x1 conv and BN follow)."""
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """1x1 conv to `projection`, BN, Swish, average pool, then the 1x1-conv classifier.

        With `global_pool=''` nothing is pooled: `[B, projection | num_classes, H, W]` maps (timm's convention).
        """
        x = F.silu(self.norm(self.proj(x)))
        if self.global_pool:
            x = F.adaptive_avg_pool2d(x, 1)
        x = F.dropout(x, self.drop_rate, self.training)
        x = x if pre_logits else self.head(x)
        return x.flatten(1) if self.global_pool else x

    def _prune_stages(self, keep: int, prune_norm: bool) -> None:
        self.layers = self.layers[:keep]
        self.layers[-1].downsample = None

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True):
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:
            self.proj = self.norm = nn.Identity()  # the head's 1x1 conv and BatchNorm
        return take


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0", "classifier": "head", "license": "unknown",
        **kwargs,
    }


_MALA = dict(paper_name="Rectifying Magnitude Neglect in Linear Attention (ICCV 2025)",
             origin_url="https://github.com/qhfan/MALA")
_RALA = dict(paper_name="Breaking the Low-Rank Dilemma of Linear Attention (CVPR 2025)",
             origin_url="https://github.com/qhfan/RALA")

# official_params / official_flops: the official model definitions, counted with fvcore at 224
# (scripts/check_rmt_official.py). paper_* are the published (rounded) numbers: RAVLT's README,
# MAViT-S from the ICCV abstract, MAViT-T/B/L from the paper's table as quoted by third parties.
# sha256 only where the hub's current file page was read (MAViT_B, MAViT_L).
default_cfgs = generate_default_cfgs({
    # MAViT-T weights are not listed on aldjalkdf/MAViT (only S/B/L classification files were found)
    "mavit_tiny.in1k": _cfg(**_MALA, top1=82.9, paper_params=16e6, paper_flops=2.5e9,
                            official_params=16_449_128, official_flops=2_652_419_584),
    "mavit_small.in1k": _cfg(**_MALA, hf_hub_id="aldjalkdf/MAViT", hf_filename="MAViT_S.pth", top1=84.7,
                             paper_params=27e6, paper_flops=4.6e9, official_params=27_142_568,
                             official_flops=4_924_921_984),
    "mavit_base.in1k": _cfg(**_MALA, hf_hub_id="aldjalkdf/MAViT", hf_filename="MAViT_B.pth", top1=85.7,
                            sha256="b4759f60fadf0f851bbd066a93dd21b371084fe59040f3280d58200251642cf8",
                            paper_params=50e6, paper_flops=9.9e9, official_params=49_792_648,
                            official_flops=10_640_790_016),
    "mavit_large.in1k": _cfg(**_MALA, hf_hub_id="aldjalkdf/MAViT", hf_filename="MAViT_L.pth", top1=86.0,
                             sha256="17ea9be68993e860bad4f5e3548442e77f6d2498e53bd094e5b29dade21fa41f",
                             paper_params=98e6, paper_flops=16.1e9, official_params=97_766_088,
                             official_flops=17_303_276_160),
    "ravlt_tiny.in1k": _cfg(**_RALA, hf_hub_id="aldjalkdf/RAVLT", hf_filename="RAVLT_T.pth", top1=82.8,
                            paper_params=15e6, paper_flops=2.4e9, official_params=14_897_768,
                            official_flops=2_626_157_056),
    "ravlt_small.in1k": _cfg(**_RALA, hf_hub_id="aldjalkdf/RAVLT", hf_filename="RAVLT_S.pth", top1=84.4,
                             paper_params=26e6, paper_flops=4.6e9, official_params=25_591_208,
                             official_flops=4_899_161_216),
    "ravlt_base.in1k": _cfg(**_RALA, hf_hub_id="aldjalkdf/RAVLT", hf_filename="RAVLT_B.pth", top1=85.5,
                            paper_params=48e6, paper_flops=9.9e9, official_params=48_241_288,
                            official_flops=10_616_032_768),
    "ravlt_large.in1k": _cfg(**_RALA, hf_hub_id="aldjalkdf/RAVLT", hf_filename="RAVLT_L.pth", top1=85.8,
                             paper_params=95e6, paper_flops=16.0e9, official_params=95_242_440,
                             official_flops=17_255_603_328),
})

_SIZES = {
    "tiny": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
                 drop_path_rate=0.1, layer_scale=(1.0, 1.0, 1.0, 1.0)),
    "small": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8),
                  drop_path_rate=0.15, layer_scale=(1.0, 1.0, 1.0, 1.0)),
    "base": dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8),
                 drop_path_rate=0.4, layer_scale=(1.0, 1.0, 1e-6, 1e-6)),
    "large": dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10),
                  drop_path_rate=0.55, layer_scale=(1e-6, 1e-6, 1e-6, 1e-6)),
}


def _create(variant: str, kind: str, size: str, projection: int, pretrained: bool, **kwargs) -> RMTLinear:
    # the released models: linear attention in stages 1-2, softmax in stages 3-4
    args = dict(_SIZES[size], attn_kinds=(kind, kind, "softmax", "softmax"), projection=projection)
    return build_classifier(RMTLinear, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)),
                            **dict(args, **kwargs))


_MALA_PAPER, _RALA_PAPER = _MALA["paper_name"], _RALA["paper_name"]


@register_model(paper=_MALA_PAPER)
def mavit_tiny(pretrained: bool = False, **kwargs) -> RMTLinear:
    return _create("mavit_tiny", "mala", "tiny", 2048, pretrained, **kwargs)


@register_model(paper=_MALA_PAPER)
def mavit_small(pretrained: bool = False, **kwargs) -> RMTLinear:
    return _create("mavit_small", "mala", "small", 2048, pretrained, **kwargs)


@register_model(paper=_MALA_PAPER)
def mavit_base(pretrained: bool = False, **kwargs) -> RMTLinear:
    return _create("mavit_base", "mala", "base", 2048, pretrained, **kwargs)


@register_model(paper=_MALA_PAPER)
def mavit_large(pretrained: bool = False, **kwargs) -> RMTLinear:
    return _create("mavit_large", "mala", "large", 2560, pretrained, **kwargs)


@register_model(paper=_RALA_PAPER)
def ravlt_tiny(pretrained: bool = False, **kwargs) -> RMTLinear:
    return _create("ravlt_tiny", "rala", "tiny", 1024, pretrained, **kwargs)


@register_model(paper=_RALA_PAPER)
def ravlt_small(pretrained: bool = False, **kwargs) -> RMTLinear:
    return _create("ravlt_small", "rala", "small", 1024, pretrained, **kwargs)


@register_model(paper=_RALA_PAPER)
def ravlt_base(pretrained: bool = False, **kwargs) -> RMTLinear:
    return _create("ravlt_base", "rala", "base", 1024, pretrained, **kwargs)


@register_model(paper=_RALA_PAPER)
def ravlt_large(pretrained: bool = False, **kwargs) -> RMTLinear:
    return _create("ravlt_large", "rala", "large", 1024, pretrained, **kwargs)
