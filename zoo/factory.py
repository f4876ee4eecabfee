"""`create_model` and friends: one factory for classifiers and generators."""
from __future__ import annotations

import os
from typing import Any

import torch

from . import weights as _weights
from ._registry import get_entry, split_name


def build_classifier(model_cls: type, variant: str, pretrained: bool = False, feature_cfg: dict | None = None,
                     defaults: dict | None = None, **kwargs):
    """Build a registered classifier the timm way, but load pretrained weights through zoo.weights.

    timm's `build_model_with_cfg` resolves the pretrained cfg (from `arch.tag`), fills
    num_classes/in_chans and records it; we then fetch/verify/convert the weights ourselves
    and finally wrap for `features_only`. Model arguments resolve as: the variant's `defaults`,
    then the `model_args` its pretrained tag implies (e.g. dilations at 384), then `kwargs`.
    """
    from timm.models import build_model_with_cfg
    from timm.models._builder import resolve_pretrained_cfg
    from timm.models._features import FeatureGetterNet, FeatureListNet

    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    feature_cls = kwargs.pop("feature_cls", None)
    tag = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")).tag
    extras = _weights.cfg_extras(f"{variant}.{tag}" if tag else variant)
    kwargs = {**(defaults or {}), **extras.pop("model_args", {}), **kwargs}
    model = build_model_with_cfg(model_cls, variant, pretrained=False, **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, **extras}
    if pretrained:
        tag = model.pretrained_cfg.get("tag")
        name = f"{variant}.{tag}" if tag else variant
        if not _weights.has_weights(name):
            available = [w.name for w in _weights.weights_for_arch(variant)]
            raise _weights.WeightsError(
                f"{name} has no pretrained weights" + (f"; available: {', '.join(available)}" if available else "")
            )
        _weights.load_pretrained(model, name)
    if features_only:
        feature_cfg = dict(feature_cfg or {})
        if out_indices is not None:
            feature_cfg["out_indices"] = out_indices
        feature_cfg.setdefault("out_indices", tuple(range(len(getattr(model, "feature_info", ())))))
        kind = feature_cls or feature_cfg.pop("feature_cls", "getter" if hasattr(model, "forward_intermediates") else "list")
        cfg = model.pretrained_cfg
        wrapper = {"getter": FeatureGetterNet, "list": FeatureListNet}.get(kind)
        if wrapper is None:
            raise ValueError(f"feature_cls must be 'getter' or 'list', got {kind!r}")
        model = wrapper(model, **feature_cfg)
        model.pretrained_cfg = model.default_cfg = cfg
    return model


_DATA_CFG_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "num_classes", "label_names")


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Create any zoo model by name (`arch` or `arch.tag`), as `timm.create_model` does.

    Args:
        model_name: a name from `zoo.list_models()`, optionally with a pretrained tag.
        pretrained: load the registered weights (`arch.tag`, or the arch's default tag).
        checkpoint_path: a local checkpoint to load instead, in our layout (e.g. from
            `zoo.weights.export`), an official one, safetensors or a Lightning `.ckpt`.
        **kwargs: model arguments (`num_classes`, `drop_path_rate`, `input_size`, ...);
            None values are dropped, as timm does.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    entry = get_entry(model_name)
    arch, tag = split_name(model_name)
    exported = _weights.read_export_config(checkpoint_path) if checkpoint_path is not None else None
    if exported and exported.get("architecture") != arch:
        exported = None
    if exported:
        kwargs = {**exported.get("model_args", {}), **kwargs}
    if entry.kind == "classifier":
        import timm

        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    else:
        model = entry.fn(pretrained=pretrained, pretrained_tag=tag or None, **kwargs)
    # what the caller asked for, not what the entrypoint filled in: `export` records it, and a
    # re-creation passes it back to the same entrypoint
    model.zoo_model_args = dict(kwargs)
    if not hasattr(model, "zoo_architecture"):
        model.zoo_architecture = arch
    if exported and hasattr(model, "pretrained_cfg"):
        # the preprocessing the weights were trained with (e.g. 1x32x32 digits), for timm's resolve_model_data_config
        data = {k: v for k, v in exported.get("pretrained_cfg", {}).items() if k in _DATA_CFG_KEYS}
        model.pretrained_cfg = {**model.pretrained_cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}}
    if checkpoint_path is not None:
        target = getattr(model, "model", model) if kwargs.get("features_only") else model
        _weights.load_checkpoint(target, checkpoint_path, arch=arch)
    return model


def load_generator_weights(model: torch.nn.Module, arch: str, pretrained: bool, tag: str | None, default_tag: str | None) -> None:
    """Pretrained loading for generators (not built through timm)."""
    if not pretrained:
        return
    tag = tag or default_tag
    _weights.load_pretrained(model, f"{arch}.{tag}" if tag else arch)


def model_info(model_name: str, with_flops: bool = True) -> dict[str, Any]:
    """Params, FLOPs at the default input size, pretrained sources and paper of a model."""
    from ._registry import list_pretrained
    from .flop_count import count_params, flops

    entry = get_entry(model_name)
    model = create_model(split_name(model_name)[0])
    info: dict[str, Any] = {
        "name": entry.name,
        "kind": entry.kind,
        "paper": entry.paper,
        "params": count_params(model),
        "class": type(model).__name__,
    }
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if entry.kind == "classifier":
        info["input_size"] = tuple(cfg.get("input_size", (3, 224, 224)))
    if with_flops:
        info["flops"] = flops(model)
    info["pretrained"] = {
        n: {"source": _weights.get_weights(n).describe(), "license": _weights.get_weights(n).license,
            "sha256": _weights.get_weights(n).sha256_status,
            **{k: v for k, v in _weights.get_weights(n).cfg.items() if k in ("top1", "input_size", "description")}}
        for n in list_pretrained(entry.name)
    }
    return info
