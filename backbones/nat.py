"""Neighborhood Attention Transformers: NAT, DiNAT, DiNAT_s and the isotropic NAT/DiNAT.

Papers: "Neighborhood Attention Transformer" (CVPR 2023, https://arxiv.org/abs/2204.07143) and
"Dilated Neighborhood Attention Transformer" (https://arxiv.org/abs/2209.15001).
Official code and weights: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (MIT).

Module names and shapes equal the official ones, so the official flat `.pth` files load with
strict=True and no converter: NAT/DiNAT keep `levels.i.blocks.j` with the conv tokenizer and
bias-free conv downsampler; DiNAT_s (Swin layout) keeps `layers.i.blocks.j` with patch merging;
the isotropic models keep `layers.j`. HF-transformers checkpoints (`shi-labs/*`) load through
`convert_hf_nat`. Attention is `zoo.ops.na2d` with the relative position bias every official
checkpoint has (NATTEN >= 0.20 no longer offers it).

The models work at any input size whose feature maps are at least kernel * dilation on every
stage; below that NATTEN <= 0.15 zero-padded the attention input (the released detection and
segmentation checkpoints rely on it): pass `legacy_pad=True` for that behaviour.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from zoo.ops import na2d, na_legacy_pad

from zoo._registry import register_model
from zoo.factory import build_classifier
from zoo.weights import generate_default_cfgs

from ._common import ClassifierMixin, run_blocks

__all__ = ["NAT", "NATIsotropic", "NeighborhoodAttention2D", "convert_hf_nat"]


class NeighborhoodAttention2D(nn.Module):
    """NATTEN's legacy `NeighborhoodAttention2D` (qkv Linear, `rpb` [heads, 2k-1, 2k-1], proj) on NHWC input.

    `legacy_pad` reproduces NATTEN <= 0.15: inputs smaller than kernel * dilation are zero-padded
    at the bottom/right before qkv (the pad tokens carry the qkv bias and stay unmasked) and the
    output is cropped back.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, qkv_bias: bool = True,
                 proj_drop: float = 0.0, legacy_pad: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation, self.legacy_pad = kernel_size, dilation, legacy_pad
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        pad = na_legacy_pad((height, width), self.kernel_size, self.dilation) if self.legacy_pad else (0, 0)
        if any(pad):
            x = F.pad(x, (0, 0, 0, pad[1], 0, pad[0]))
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        x = na2d(q, k, v, self.kernel_size, dilation=self.dilation, rpb=self.rpb, scale=self.scale)
        x = self.proj_drop(self.proj(x.flatten(-2)))
        return x[:, :height, :width] if any(pad) else x

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}"


class GlobalAttentionRPB(NeighborhoodAttention2D):
    """ViT-rpb attention: global self attention with a relative position bias over a fixed L x L map.

    This is neighbourhood attention with kernel_size = L on an L x L map: every query sees every
    key, and the official table `rpb` [heads, 2L-1, 2L-1] is indexed by the same key - query
    offset (the official flipped Swin-style index works out to exactly that). The official
    `relative_position_index` buffer is kept only so that the official checkpoints load strictly.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 14, dilation: int = 1, qkv_bias: bool = True,
                 proj_drop: float = 0.0, legacy_pad: bool = False):
        if dilation != 1 or legacy_pad:
            raise ValueError("global attention has no dilation or legacy padding: use dilation=1, legacy_pad=False")
        super().__init__(dim, num_heads, kernel_size, 1, qkv_bias, proj_drop)
        side = kernel_size
        coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + side - 1  # [2, L^2, L^2], query - key
        index = rel[0] * (2 * side - 1) + rel[1]
        self.register_buffer("relative_position_index", index.flip(0, 1), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:3]) != (self.kernel_size,) * 2:
            raise ValueError(
                f"ViT-rpb attends globally with a relative position table for a {self.kernel_size}x{self.kernel_size} "
                f"map, got {x.shape[1]}x{x.shape[2]}: use the training input size (224 for patch 16)"
            )
        return super().forward(x)


_ATTENTION = {"neighborhood": NeighborhoodAttention2D, "global": GlobalAttentionRPB}


class NATLayer(nn.Module):
    """Pre-norm block: x + gamma1 * NA(LN(x)), then x + gamma2 * MLP(LN(x)); gammas only with layer scale."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 legacy_pad: bool = False, attention: str = "neighborhood"):
        super().__init__()
        if attention not in _ATTENTION:
            raise ValueError(f"attention must be one of {tuple(_ATTENTION)}, got {attention!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _ATTENTION[attention](dim, num_heads, kernel_size, dilation, qkv_bias, drop, legacy_pad)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn(self.norm1(x))
        x = x + self.drop_path(self.gamma1 * attn if self.layer_scale else attn)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(self.gamma2 * mlp if self.layer_scale else mlp)


class ConvTokenizer(nn.Module):
    """NAT stem: two 3x3 stride-2 convs with *no* norm or activation between them, then LayerNorm."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchEmbed(nn.Module):
    """Swin-style patch embedding (DiNAT_s, isotropic): input zero-padded to a multiple of the patch."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (height, width) = self.patch_size, x.shape[-2:]
        x = F.pad(x, (0, -width % pw, 0, -height % ph))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """NAT downsampler: 3x3 stride-2 conv *without bias*, then LayerNorm (NHWC in and out)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """DiNAT_s downsampler (Swin): pad odd sides, concat the 2x2 phases, LayerNorm(4C), Linear without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class NATStage(nn.Module):
    """`blocks` at one resolution, then the stage's downsampler (None in the last stage)."""

    def __init__(self, dim: int, depth: int, num_heads: int, kernel_size: int, dilations: Sequence[int],
                 downsample: type[nn.Module] | None, drop_path: Sequence[float], **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            NATLayer(dim, num_heads, kernel_size, dilations[i], drop_path=drop_path[i], **block_kwargs)
            for i in range(depth)
        )
        self.downsample = downsample(dim) if downsample is not None else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, x, checkpointing=self.grad_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def _dilations(dilations, depths: Sequence[int]) -> list[list[int]]:
    if dilations is None:
        return [[1] * d for d in depths]
    dilations = [list(d) for d in dilations]
    if [len(d) for d in dilations] != list(depths):
        raise ValueError(
            f"dilations must give one value per block of each stage (depths {tuple(depths)}), got {dilations}"
        )
    return dilations


class NAT(ClassifierMixin, nn.Module):
    """Hierarchical NAT / DiNAT (`layout='nat'`) and DiNAT_s (`layout='swin'`), NHWC inside.

    Args:
        depths, num_heads: per stage; channels double per stage from `embed_dim`.
        kernel_size: neighbourhood size (7 in every released model, 11 in one DiNAT-L).
        dilations: one list per stage with one dilation per block (None: NAT, all 1).
        layer_scale: init value of gamma1/gamma2 (NAT-S, NAT-B, DiNAT-B use 1e-5), None for none.
        layout: 'nat' = conv tokenizer, `levels`, conv downsampler; 'swin' = 4x4 patch embed,
            `layers`, patch merging (DiNAT_s).
        stage_norms: add `norm0..norm3`, the per-stage LayerNorms of the official detection and
            segmentation backbones, applied to `forward_intermediates` outputs.
        legacy_pad: zero-pad attention inputs smaller than kernel * dilation (NATTEN <= 0.15).
    """

    output_fmt = "NHWC"  # forward_features' layout (timm's attribute; intermediates default to NCHW)

    def __init__(self, depths: Sequence[int] = (3, 4, 18, 5), num_heads: Sequence[int] = (2, 4, 8, 16),
                 embed_dim: int = 64, mlp_ratio: float = 3.0, kernel_size: int = 7, dilations=None,
                 layer_scale: float | None = None, layout: str = "nat", in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", qkv_bias: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, stage_norms: bool = False, legacy_pad: bool = False):
        super().__init__()
        if layout not in ("nat", "swin"):
            raise ValueError(f"layout must be 'nat' or 'swin', got {layout!r}")
        if layout == "swin" and layer_scale is not None:
            raise ValueError("layer_scale is not supported by DiNAT_s (layout='swin') blocks, as in the official code")
        self.num_classes, self.layout = num_classes, layout
        self.global_pool = self._check_pool(global_pool, num_classes)
        self.drop_rate = drop_rate
        num_stages = len(depths)
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        dilations = _dilations(dilations, depths)

        self.patch_embed = ConvTokenizer(in_chans, embed_dim) if layout == "nat" else PatchEmbed(4, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        downsample = ConvDownsampler if layout == "nat" else PatchMerging
        stages = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            stages.append(NATStage(
                dims[i], depths[i], num_heads[i], kernel_size, dilations[i],
                downsample if i < num_stages - 1 else None, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                layer_scale=layer_scale, legacy_pad=legacy_pad,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"{self.stage_attr}.{i}"))
        setattr(self, self.stage_attr, stages)
        if stage_norms:
            for i in range(num_stages):
                self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.stage_norms = stage_norms
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Identity()  # Faithful: no dropout before the head
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @property
    def stage_attr(self) -> str:
        return "levels" if self.layout == "nat" else "layers"

    @property
    def stages(self) -> nn.ModuleList:
        return getattr(self, self.stage_attr)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("rpb")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        prefix = self.stage_attr
        return dict(
            stem=r"^patch_embed",
            blocks=rf"^{prefix}\.(\d+)" if coarse else [
                (rf"^{prefix}\.(\d+)\.downsample", (0,)),
                (rf"^{prefix}\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm\d", (99999,)),
                (r"^norm\.", (99999,)),
            ],
        )

    def _stages(self, x: torch.Tensor, stop: int | None = None):
        """Each stage's output before its downsampler (the dense-prediction features), NHWC."""
        x = self.pos_drop(self.patch_embed(x))
        for i, stage in enumerate(self.stages):
            x = stage.forward_blocks(x)
            yield i, x, None
            if stop is not None and i >= stop:
                return
            if stage.downsample is not None:
                x = stage.downsample(x)

    def _to_map(self, x: torch.Tensor, size=None) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)

    def _intermediate(self, index: int, x: torch.Tensor, size, norm: bool) -> torch.Tensor:
        """With `stage_norms` each output goes through its `norm{i}`; otherwise `norm=True` applies
        the final norm to the last stage's output."""
        if self.stage_norms:
            x = getattr(self, f"norm{index}")(x)
        elif norm and index == len(self.feature_info) - 1:
            x = self.norm(x)
        return self._to_map(x)

    def _final(self, x: torch.Tensor, size=None) -> torch.Tensor:
        """The normalised last-stage map `[B, H/32, W/32, C]` (NHWC)."""
        return self.norm(x)

    def _prune_stages(self, keep: int, prune_norm: bool) -> None:
        setattr(self, self.stage_attr, self.stages[:keep])
        if prune_norm:
            self.norm = nn.Identity()


class NATIsotropic(ClassifierMixin, nn.Module):
    """Isotropic NAT / DiNAT / ViT-rpb: 16x16 patch embed, `depth` blocks at one resolution, LN, mean, head.

    Block i uses dilation 1 when i is even and `dilation` when odd (dilation=1 gives NAT-iso).
    `attention='global'` gives ViT-rpb: global attention with a relative position bias for the
    `img_size // patch_size` map (kernel_size is then that map side).
    """

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 kernel_size: int = 7, dilation: int = 1, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", qkv_bias: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, legacy_pad: bool = False, attention: str = "neighborhood",
                 img_size: int = 224):
        super().__init__()
        if attention == "global":
            kernel_size = img_size // patch_size
        self.num_classes = num_classes
        self.global_pool = self._check_pool(global_pool, num_classes)
        self.num_features = self.head_hidden_size = embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.Sequential(*(
            NATLayer(embed_dim, num_heads, kernel_size, 1 if i % 2 == 0 else dilation, mlp_ratio, qkv_bias,
                     drop_rate, dpr[i], legacy_pad=legacy_pad, attention=attention)
            for i in range(depth)
        ))
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Identity()  # Faithful: no dropout before the head
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"layers.{i}") for i in range(depth)]
        self.apply(_init_weights)

    output_fmt = "NHWC"
    no_weight_decay = NAT.no_weight_decay
    _to_map = NAT._to_map
    _final = NAT._final

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))])

    def _stages(self, x: torch.Tensor, stop: int | None = None):
        """Each block's output (NHWC): the intermediates of an isotropic model."""
        x = self.pos_drop(self.patch_embed(x))
        for i, layer in enumerate(self.layers):
            x = run_blocks((layer,), x, checkpointing=self.grad_checkpointing)
            yield i, x, None
            if stop is not None and i >= stop:
                return

    def _intermediate(self, index: int, x: torch.Tensor, size, norm: bool) -> torch.Tensor:
        """`norm=True` applies the final norm to each block output."""
        return self._to_map(self.norm(x) if norm else x)

    def _final_after(self, index: int, x: torch.Tensor, size) -> torch.Tensor:
        return self.norm(x)  # every block has the final norm's width

    def _prune_stages(self, keep: int, prune_norm: bool) -> None:
        self.layers = self.layers[:keep]
        if prune_norm:
            self.norm = nn.Identity()


def _init_weights(m: nn.Module) -> None:
    """As the official code: trunc-normal(0.02) Linear weights, zero biases, LayerNorm 1/0 (convs: PyTorch default)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# HF-transformers (Nat*/Dinat* models) -> official names; q/k/v and the [2, C] layer scale are handled apart.
_HF_RENAMES = (
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("embeddings.norm.", "patch_embed.norm."),
    ("encoder.levels.", "levels."),
    (".layers.", ".blocks."),
    (".layernorm_before.", ".norm1."),
    (".attention.self.rpb", ".attn.rpb"),
    (".attention.output.dense.", ".attn.proj."),
    (".layernorm_after.", ".norm2."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
    ("layernorm.", "norm."),
)


def convert_hf_nat(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """HF `NatForImageClassification` / `DinatForImageClassification` state dict -> ours (official)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            out["head." + key[len("classifier."):]] = value
            continue
        for prefix in ("nat.", "dinat."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            raise KeyError(f"{key!r} is not a key of an HF-transformers NAT/DiNAT checkpoint")
        for old, new in _HF_RENAMES:
            key = key.replace(old, new)
        if ".attention.self." in key:  # query/key/value -> one qkv Linear, q|k|v stacked as the official qkv
            block, _, rest = key.partition(".attention.self.")
            part, _, kind = rest.partition(".")
            qkv.setdefault(f"{block}.attn.qkv.{kind}", {})[part] = value
        elif key.endswith(".layer_scale_parameters"):
            block = key[: -len(".layer_scale_parameters")]
            out[f"{block}.gamma1"], out[f"{block}.gamma2"] = value[0].clone(), value[1].clone()
        else:
            out[key] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0", "classifier": "head", "license": "mit",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer", **kwargs,
    }


_NAT_PAPER = "Neighborhood Attention Transformer (CVPR 2023)"
_DINAT_PAPER = "Dilated Neighborhood Attention Transformer (arXiv 2209.15001)"
_NAT_CKPT = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_CKPT = "https://shi-labs.com/projects/dinat/checkpoints/"


def _nat(name: str, params: float, flops: float, top1: float, hf: str | None = None) -> dict:
    """Official URL entry (+ the HF-hub mirror) of a NAT model at 224."""
    entries = {f"{name}.in1k": _cfg(url=f"{_NAT_CKPT}{name}.pth", top1=top1, paper_params=params, paper_flops=flops,
                                    paper_name=_NAT_PAPER)}
    if hf:
        entries[f"{name}.hf_in1k"] = _cfg(hf_hub_id=hf, hf_filename="pytorch_model.bin", converter=convert_hf_nat,
                                          top1=top1, paper_name=_NAT_PAPER)
    return entries


_DILATIONS_224 = ([1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5)
_DILATIONS_384 = ([1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5)
_DILATIONS_S_384 = ([1, 13], [1, 6], [1, 3] * 9, [1, 1])
# HF-hub mirrors whose repositories were checked to exist (the others may exist under the same pattern)
_HF_VERIFIED = ("mini", "tiny", "base")
_CFG_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)

default_cfgs = generate_default_cfgs({
    **_nat("nat_mini", 20e6, 2.7e9, 81.8, "shi-labs/nat-mini-in1k-224"),
    **_nat("nat_tiny", 28e6, 4.3e9, 83.2),
    **_nat("nat_small", 51e6, 7.8e9, 83.7),
    **_nat("nat_base", 90e6, 13.7e9, 84.3),
    **{
        f"dinat_{size}.{tag}": _cfg(paper_name=_DINAT_PAPER, **cfg)
        for size, params, flops, top1 in (
            ("mini", 20e6, 2.7e9, 81.8), ("tiny", 28e6, 4.3e9, 82.7), ("small", 51e6, 7.8e9, 83.8),
            ("base", 90e6, 13.7e9, 84.4),
        )
        for tag, cfg in (
            ("in1k", dict(url=f"{_DINAT_CKPT}imagenet1k/dinat_{size}_in1k_224.pth", top1=top1,
                          paper_params=params, paper_flops=flops)),
            ("hf_in1k", dict(hf_hub_id=f"shi-labs/dinat-{size}-in1k-224", hf_filename="pytorch_model.bin",
                             converter=convert_hf_nat, top1=top1)),
        )
        if tag == "in1k" or size in _HF_VERIFIED
    },
    "dinat_large.in22k_ft_in1k": _cfg(
        url=f"{_DINAT_CKPT}imagenet1k/dinat_large_in22k_in1k_224.pth", top1=86.6, paper_params=200e6,
        paper_flops=30.6e9, paper_name=_DINAT_PAPER),
    "dinat_large.in22k_ft_in1k_384": _cfg(
        url=f"{_DINAT_CKPT}imagenet1k/dinat_large_in22k_in1k_384.pth", top1=87.4, paper_params=200e6,
        paper_flops=89.7e9, model_args=dict(dilations=_DILATIONS_384), paper_name=_DINAT_PAPER, **_CFG_384),
    "dinat_large.in22k_ft_in1k_384_11x11": _cfg(
        url=f"{_DINAT_CKPT}imagenet1k/dinat_large_in22k_in1k_384_11x11.pth", top1=87.5, paper_params=200e6,
        paper_flops=92.4e9, model_args=dict(kernel_size=11), paper_name=_DINAT_PAPER, **_CFG_384,
        # the paper prints 200M as for the 7x7 model; the 21x21 rpb tables add 200,736. Our module names and
        # shapes equal the official code's (the checkpoint loads strictly), so this count is the official one.
        official_params=201_144_250),
    "dinat_large.hf_in22k_ft_in1k": _cfg(
        hf_hub_id="shi-labs/dinat-large-in22k-in1k-224", hf_filename="pytorch_model.bin", converter=convert_hf_nat,
        top1=86.6, paper_name=_DINAT_PAPER),
    "dinat_large.hf_in22k_ft_in1k_384": _cfg(
        hf_hub_id="shi-labs/dinat-large-in22k-in1k-384", hf_filename="pytorch_model.bin", converter=convert_hf_nat,
        top1=87.4, model_args=dict(dilations=_DILATIONS_384), paper_name=_DINAT_PAPER, **_CFG_384),
    "dinat_large.hf_in22k_ft_in1k_384_11x11": _cfg(
        hf_hub_id="shi-labs/dinat-large-11x11-in22k-in1k-384", hf_filename="pytorch_model.bin",
        converter=convert_hf_nat, top1=87.5, model_args=dict(kernel_size=11), paper_name=_DINAT_PAPER, **_CFG_384),
    **{
        f"dinat_s_{size}.{'in1k' if size != 'large' else 'in22k_ft_in1k'}": _cfg(
            url=f"{_DINAT_CKPT}imagenet1k/dinat_s_{size}_in1k_224.pth", top1=top1, paper_params=params,
            paper_flops=flops, first_conv="patch_embed.proj", paper_name=_DINAT_PAPER)
        for size, params, flops, top1 in (
            ("tiny", 28e6, 4.5e9, 81.8), ("small", 50e6, 8.7e9, 83.5), ("base", 88e6, 15.4e9, 83.8),
            ("large", 197e6, 34.5e9, 86.5),
        )
    },
    "dinat_s_large.in22k_ft_in1k_384": _cfg(
        url=f"{_DINAT_CKPT}imagenet1k/dinat_s_large_in1k_384.pth", top1=87.4, paper_params=197e6,
        paper_flops=101.5e9, first_conv="patch_embed.proj", model_args=dict(dilations=_DILATIONS_S_384),
        paper_name=_DINAT_PAPER, **_CFG_384),
    **{
        f"{ours}.in1k": _cfg(
            url=f"{_DINAT_CKPT}isotropic/{official}_in1k_224.pth", top1=top1, paper_params=params, paper_flops=flops,
            first_conv="patch_embed.proj", pool_size=(14, 14), paper_name=_DINAT_PAPER,
            **({"official_params": 86_627_080} if ours == "vit_rpb_base" else {}))
        # ViT-rpb-B: the paper prints 86M as for the NA models, but its 24 heads x [27, 27] rpb tables per layer
        # add 0.21M (86.63M, +0.7%). Our module names and shapes equal the official classification/isotropic.py
        # (the checkpoint loads strictly), so this count is the official code's.
        for ours, official, params, flops, top1 in (
            ("nat_iso_small", "nat_isotropic_small", 22e6, 4.3e9, 80.0),
            ("dinat_iso_small", "dinat_isotropic_small", 22e6, 4.3e9, 80.8),
            ("nat_iso_base", "nat_isotropic_base", 86e6, 16.9e9, 81.6),
            ("dinat_iso_base", "dinat_isotropic_base", 86e6, 16.9e9, 82.1),
            ("vit_rpb_small", "vitrpb_small", 22e6, 4.6e9, 81.2),
            ("vit_rpb_base", "vitrpb_base", 86e6, 17.5e9, 82.5),
        )
    },
})


def _create(cls: type, variant: str, pretrained: bool, args: dict, kwargs: dict) -> nn.Module:
    out_indices = (0, 1, 2, 3) if cls is NAT else (2, 5, 8, 11)  # isotropic: every third block
    feature_cfg = dict(out_indices=out_indices)
    return build_classifier(cls, variant, pretrained, feature_cfg=feature_cfg, defaults=args, **kwargs)


_MINI = dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_SMALL = dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2.0, drop_path_rate=0.5)
_LARGE = dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2.0, drop_path_rate=0.35)


@register_model(paper=_NAT_PAPER)
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Mini (20M, 2.7G)."""
    return _create(NAT, "nat_mini", pretrained, _MINI, kwargs)


@register_model(paper=_NAT_PAPER)
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Tiny (28M, 4.3G)."""
    return _create(NAT, "nat_tiny", pretrained, _TINY, kwargs)


@register_model(paper=_NAT_PAPER)
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Small (51M, 7.8G), layer scale 1e-5."""
    return _create(NAT, "nat_small", pretrained, dict(_SMALL, layer_scale=1e-5), kwargs)


@register_model(paper=_NAT_PAPER)
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Base (90M, 13.7G), layer scale 1e-5."""
    return _create(NAT, "nat_base", pretrained, dict(_BASE, layer_scale=1e-5), kwargs)


def _dinat(dilations=_DILATIONS_224, **args) -> dict:
    return dict(args, dilations=[d[:depth] for d, depth in zip(dilations, args["depths"])])


@register_model(paper=_DINAT_PAPER)
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Mini (20M, 2.7G)."""
    return _create(NAT, "dinat_mini", pretrained, _dinat(**_MINI), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Tiny (28M, 4.3G)."""
    return _create(NAT, "dinat_tiny", pretrained, _dinat(**_TINY), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Small (51M, 7.8G): unlike NAT-Small, no layer scale."""
    return _create(NAT, "dinat_small", pretrained, _dinat(**_SMALL), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Base (90M, 13.7G), layer scale 1e-5."""
    return _create(NAT, "dinat_base", pretrained, _dinat(**_BASE, layer_scale=1e-5), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large (200M, 30.6G at 224); the 384 tags set their dilations / 11x11 kernel."""
    return _create(NAT, "dinat_large", pretrained, _dinat(**_LARGE), kwargs)


_DINAT_S_224 = ([1, 8], [1, 4], [1, 2] * 9, [1, 1])


def _dinat_s(depths, num_heads, embed_dim, drop_path_rate) -> dict:
    return dict(layout="swin", depths=depths, num_heads=num_heads, embed_dim=embed_dim, mlp_ratio=4.0,
                drop_path_rate=drop_path_rate, dilations=[d[:n] for d, n in zip(_DINAT_S_224, depths)])


@register_model(paper=_DINAT_PAPER)
def dinat_s_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Tiny (28M, 4.5G): Swin-T layout with NA / dilated NA."""
    return _create(NAT, "dinat_s_tiny", pretrained, _dinat_s((2, 2, 6, 2), (3, 6, 12, 24), 96, 0.2), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_s_small(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Small (50M, 8.7G)."""
    return _create(NAT, "dinat_s_small", pretrained, _dinat_s((2, 2, 18, 2), (3, 6, 12, 24), 96, 0.3), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_s_base(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Base (88M, 15.4G)."""
    return _create(NAT, "dinat_s_base", pretrained, _dinat_s((2, 2, 18, 2), (4, 8, 16, 32), 128, 0.5), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_s_large(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Large (197M, 34.5G at 224; heads 6/12/24/48 as fixed upstream in 4a39ab6)."""
    return _create(NAT, "dinat_s_large", pretrained, _dinat_s((2, 2, 18, 2), (6, 12, 24, 48), 192, 0.35), kwargs)


_ISO_SMALL = dict(embed_dim=384, num_heads=12, drop_path_rate=0.1)
_ISO_BASE = dict(embed_dim=768, num_heads=24, drop_path_rate=0.4)  # head_dim 32, as every NAT


@register_model(paper=_DINAT_PAPER)
def nat_iso_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """Isotropic NAT-S (22M, 4.3G): ViT-S/16 layout with 7x7 NA."""
    return _create(NATIsotropic, "nat_iso_small", pretrained, dict(_ISO_SMALL, dilation=1), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_iso_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """Isotropic DiNAT-S (22M, 4.3G): dilation 1, 2 alternating."""
    return _create(NATIsotropic, "dinat_iso_small", pretrained, dict(_ISO_SMALL, dilation=2), kwargs)


@register_model(paper=_DINAT_PAPER)
def nat_iso_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """Isotropic NAT-B (86M, 16.9G)."""
    return _create(NATIsotropic, "nat_iso_base", pretrained, dict(_ISO_BASE, dilation=1), kwargs)


@register_model(paper=_DINAT_PAPER)
def dinat_iso_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """Isotropic DiNAT-B (86M, 16.9G)."""
    return _create(NATIsotropic, "dinat_iso_base", pretrained, dict(_ISO_BASE, dilation=2), kwargs)


@register_model(paper=_DINAT_PAPER)
def vit_rpb_small(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """ViT-rpb-S (22M, 4.6G): the isotropic baseline with global attention + RPB, 224 only."""
    return _create(NATIsotropic, "vit_rpb_small", pretrained, dict(_ISO_SMALL, attention="global"), kwargs)


@register_model(paper=_DINAT_PAPER)
def vit_rpb_base(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """ViT-rpb-B (86M, 17.5G), 224 only."""
    return _create(NATIsotropic, "vit_rpb_base", pretrained, dict(_ISO_BASE, attention="global"), kwargs)
