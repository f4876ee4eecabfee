"""Pieces shared by the DeiT-, PVT-, Swin- and CSWin-style macros of the agent / FLatten / InLine
families: the per-block attention placement (`stage_blocks`) and the timm classifier API."""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices

MIXERS = ("agent", "focused", "inline", "softmax")


@dataclass(frozen=True)
class Mixed:
    """A stage whose first `first` blocks use `mixer` and the rest softmax (the papers' `M`, e.g. the
    third stage of Agent-Swin-B's `AAMB2` is `Mixed("agent", 2)`)."""

    mixer: str
    first: int


def stage_blocks(stages: Sequence[str | Mixed], depths: Sequence[int]) -> tuple[tuple[str, ...], ...]:
    """One mixer name per block, from one entry per stage: a mixer name for all its blocks, or `Mixed`.

    The papers write these as one letter per stage (A = agent, L = FLatten `focused`, I = InLine,
    B/S = softmax, M = mixed): `AAAB` is `("agent", "agent", "agent", "softmax")`.
    """
    if len(stages) != len(depths):
        raise ValueError(f"need one mixer (or Mixed) per stage for depths {tuple(depths)}, got {tuple(stages)}")
    blocks = []
    for stage, depth in zip(stages, depths):
        if isinstance(stage, Mixed):
            if not 0 <= stage.first <= depth:
                raise ValueError(f"{stage} must mix 0..{depth} blocks in a stage of depth {depth}")
            blocks.append((stage.mixer,) * stage.first + ("softmax",) * (depth - stage.first))
        else:
            blocks.append((stage,) * depth)
    return check_blocks(blocks, depths)


def check_blocks(block_types, depths) -> tuple[tuple[str, ...], ...]:
    block_types = tuple(tuple(stage) for stage in block_types)
    if len(block_types) != len(depths) or any(len(s) != d for s, d in zip(block_types, depths)):
        raise ValueError(f"block_types must list one mixer per block for depths {tuple(depths)}, got {block_types}")
    bad = {m for s in block_types for m in s} - set(MIXERS)
    if bad:
        raise ValueError(f"unknown mixer(s) {sorted(bad)} in block_types; choose from {MIXERS}")
    return block_types


def cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "mit", **kwargs,
    }


TSINGHUA = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"
AGENT = dict(paper_name="Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024)",
             origin_url="https://github.com/LeapLabTHU/Agent-Attention")
FLATTEN = dict(paper_name="FLatten Transformer: Vision Transformer using Focused Linear Attention (ICCV 2023)",
               origin_url="https://github.com/LeapLabTHU/FLatten-Transformer")
INLINE = dict(paper_name="Bridging the Divide: Reconsidering Softmax and Linear Attention (NeurIPS 2024)",
              origin_url="https://github.com/LeapLabTHU/InLine")


def release_cfg(file_id: str, top1: float, params: float | None, flops: float | None, family: dict,
                size: int = 224, **kw) -> dict:
    """A cfg of a LeapLabTHU release: its Tsinghua-cloud file, the README's top-1, params and FLOPs (counts)."""
    extra = dict(input_size=(3, size, size)) if size != 224 else {}
    return cfg(url=TSINGHUA.format(file_id), top1=top1, paper_params=params, paper_flops=flops, **family, **extra, **kw)


def run_blocks(blocks, x: torch.Tensor, *args, checkpointing: bool = False) -> torch.Tensor:
    """`x = block(x, *args)` for each block, recomputed in the backward pass when `checkpointing`
    (timm's grad checkpointing) and gradients are on."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


class ClassifierMixin:
    """timm's classifier API for a model that defines `head`, `head_drop`, `num_features`,
    `feature_info` (one entry per stage), `global_pool` (set with `_check_pool`), and

    - `_stages(x, stop=None)`: yields `(stage_index, x, size)` after each stage, in the model's
      own layout (tokens [B, N, C] or a map), stopping after stage `stop`;
    - `_to_map(x, size)`: that stage output as an NCHW map (the intermediates);
    - `_final(x, size)`: `forward_features`' output from the last stage (after the final norm).

    Optional hooks: `_intermediate` (per-stage norms), `_final_after` (the final output of a run
    stopped early), `_new_head` (a head other than a Linear), `_prune_stages`.
    `output_fmt` says how `forward_features` lays out a 4-D map ('NCHW' or 'NHWC', as timm reads
    it); token outputs are [B, N, C] with `num_prefix_tokens` class tokens in front.
    `set_grad_checkpointing` sets `grad_checkpointing` on the model and on every submodule that has
    one (stages that run their own blocks, e.g. with `run_blocks`).
    """

    grad_checkpointing = False
    output_fmt = "NCHW"
    num_prefix_tokens = 0
    pool_types: tuple[str, ...] = ("avg",)

    def _check_pool(self, global_pool: str, num_classes: int) -> str:
        if global_pool not in ("", *self.pool_types):
            raise ValueError(f"global_pool must be one of {('', *self.pool_types)} ('' = no pooling), got {global_pool!r}")
        if global_pool == "" and num_classes > 0 and self.output_fmt == "NCHW":
            raise ValueError(f"global_pool='' leaves NCHW maps, which a Linear head cannot classify: use num_classes=0 "
                             f"with it (got num_classes={num_classes})")
        return global_pool

    def get_classifier(self) -> nn.Module:
        return self.head

    def _new_head(self, num_classes: int, ref: torch.Tensor) -> nn.Module:
        """The classifier for `num_classes` (> 0), on `ref`'s device and dtype."""
        return nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes` (0: none); `global_pool` '' makes forward return unpooled features."""
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool, num_classes)
        else:
            self._check_pool(self.global_pool, num_classes)
        self.num_classes = num_classes
        ref = self.head.weight if isinstance(getattr(self.head, "weight", None), torch.Tensor) else next(self.parameters())
        self.head = self._new_head(num_classes, ref) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if x.ndim == 3:
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x.flatten(1, 2).mean(dim=1) if self.output_fmt == "NHWC" else x.flatten(2).mean(dim=2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = self._pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _, last, size = deque(self._stages(x), maxlen=1)[0]
        return self._final(last, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _intermediate(self, index: int, x: torch.Tensor, size, norm: bool) -> torch.Tensor:
        """Stage `index`'s output as forward_intermediates returns it (NCHW); `norm` is accepted for
        timm's signature: by default there are no per-stage norms beyond those inside the stages."""
        return self._to_map(x, size)

    def _final_after(self, index: int, x: torch.Tensor, size) -> torch.Tensor:
        """forward_intermediates' final output of a run that ended after stage `index`: `_final`
        after the last stage; the stage output as is before (the final norm fits the last width)."""
        return self._final(x, size) if index == len(self.feature_info) - 1 else x

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs (NCHW, or NHWC with `output_fmt`) and, unless `intermediates_only`, the
        final output of the last stage run (`forward_features` when every stage ran)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates, last = [], None
        for i, feat, size in self._stages(x, stop=max_index if stop_early or intermediates_only else None):
            last = i, feat, size
            if i in take:
                grid = self._intermediate(i, feat, size, norm)
                intermediates.append(grid if output_fmt == "NCHW" else grid.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return self._final_after(*last), intermediates

    def _prune_stages(self, keep: int, prune_norm: bool) -> None:
        """Drop the stages after the first `keep` (and the final norm with `prune_norm`); by default
        nothing is dropped (forward_intermediates still stops after the last stage wanted)."""

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Keep what the stage outputs at `indices` need; returns those indices (timm's contract)."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        self._prune_stages(max_index + 1, prune_norm)
        if prune_head:
            self.reset_classifier(0)
        return take


def build_hierarchical(model_cls: type, variant: str, pretrained: bool, stages: Sequence[str | Mixed], arch: dict, **kwargs):
    """A four-stage variant: its architecture dict, the caller's overrides, and the per-block mixers
    of its per-stage mixers (`stage_blocks`) unless `block_types` is given."""
    from zoo.factory import build_classifier

    args = dict(arch, **kwargs)
    args.setdefault("block_types", stage_blocks(stages, args["depths"]))
    return build_classifier(model_cls, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **args)


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to `rate` over `n` blocks (plain Python, so models
    can be built on the meta device)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def init_trunc_normal(t: torch.Tensor, std: float = 0.02) -> None:
    """timm's trunc_normal_, skipped for meta tensors (shape-only builds for counting)."""
    if not t.is_meta:
        trunc_normal_(t, std=std)


def init_linear_and_norm(m: nn.Module) -> None:
    """The official init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        init_trunc_normal(m.weight)
        if m.bias is not None and not m.bias.is_meta:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and not m.weight.is_meta:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
