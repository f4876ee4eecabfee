"""`create_model` and friends: one factory for classifiers and generators."""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import os
import types
import typing
from pathlib import Path
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
    from timm.models._features import FeatureGetterNet, FeatureListNet

    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    feature_cls = kwargs.pop("feature_cls", None)
    tag = resolve_cfg(variant, kwargs).tag
    extras = _weights.cfg_extras(f"{variant}.{tag}" if tag else variant)
    kwargs = {**(defaults or {}), **extras.pop("model_args", {}), **kwargs}
    model = build_model_with_cfg(model_cls, variant, pretrained=False, **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, **extras}
    if pretrained:
        load_classifier_weights(model, variant, model.pretrained_cfg.get("tag"), kwargs.get("pretrained_cfg_overlay"))
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


def resolve_cfg(variant: str, kwargs: dict[str, Any]):
    """timm's pretrained cfg of `variant` for the `pretrained_cfg` (a tag, from `arch.tag`) and `pretrained_cfg_overlay`
    in `kwargs`; an unknown tag is a one-line error listing the registered weights (timm's names no alternative)."""
    from timm.models._builder import resolve_pretrained_cfg

    requested = kwargs.get("pretrained_cfg")
    try:
        return resolve_pretrained_cfg(variant, requested, kwargs.get("pretrained_cfg_overlay"))
    except RuntimeError as e:
        if not isinstance(requested, str):
            raise
        raise _weights.WeightsError(f"unknown pretrained tag {requested!r} for {variant}; {_weights.available_weights(variant)}") from e


def load_classifier_weights(model: torch.nn.Module, arch: str, tag: str | None, overlay: dict | None) -> None:
    """`pretrained=True` for a classifier: the file of timm's `pretrained_cfg_overlay=dict(file=PATH)` when given
    (official layouts through the arch's converters), else the registered weights `arch.tag`."""
    file = (overlay or {}).get("file")
    _weights.load_weights(model, Path(file) if file else _weights.get_weights(f"{arch}.{tag}" if tag else arch), arch=arch)


# arguments timm's `build_model_with_cfg` takes for every classifier, besides the model class's own
_TIMM_BUILDER_ARGS = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "features_only", "out_indices", "feature_cls",
                                "feature_cfg", "pretrained_strict", "scriptable", "exportable", "no_jit", "cache_dir"})


def _entrypoint(model_name: str) -> tuple[Any, str] | None:
    """The entrypoint of a zoo model, else of a timm one, with its kind; None for unknown names."""
    import timm
    from timm.models import model_entrypoint

    arch = split_name(model_name)[0]
    try:
        entry = get_entry(arch)
    except ValueError:
        return (model_entrypoint(arch), "classifier") if timm.is_model(arch) else None
    return entry.fn, entry.kind


def model_class(model_name: str) -> type | None:
    """The class a zoo or timm entrypoint builds (from its return annotation), or None if it does not say."""
    found = _entrypoint(model_name)
    try:
        cls = typing.get_type_hints(found[0]).get("return") if found else None
    except (NameError, TypeError):
        return None
    return cls if inspect.isclass(cls) else None


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (as YAML or Python gives it) can be an argument annotated `hint`; unknown hints accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item_hints = [a for a in args if a is not Ellipsis]
        return not item_hints or all(any(_fits(v, h) for h in item_hints) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if inspect.isclass(hint) and not typing.get_args(hint) else str(hint).replace("collections.abc.", "").replace("typing.", "")


def check_model_args(model_name: str, kwargs: dict[str, Any]) -> None:
    """Refuse, in one line naming the argument, model arguments the model does not take or of the wrong type.

    Names and types come from the model class's `__init__` signature; numbers must be finite, not
    negative where the default is not, and sizes (positive int defaults) at least 1. Entrypoints
    without a class annotation are left to the constructor.
    """
    cls = model_class(model_name)
    if cls is None:
        return
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):
        hints = {}
    extra = _TIMM_BUILDER_ARGS if _entrypoint(model_name)[1] == "classifier" else frozenset()
    for key, value in kwargs.items():
        if key in extra:
            continue
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{model_name}: unknown model argument {key!r}; {hint}{cls.__name__} takes {', '.join(params)}")
        if key in hints and not _fits(value, hints[key]):
            raise ValueError(f"{model_name}: model argument {key}={value!r} must be {_hint_name(hints[key])}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{model_name}: model argument {key}={value!r} must be a finite number")
        default = params[key].default
        if not _is_number(value) or not _is_number(default):
            continue
        # sizes (positive int defaults) must stay positive; num_classes=0 is timm's "no head"
        low = 1 if isinstance(default, int) and default >= 1 and key != "num_classes" else 0 if default >= 0 else None
        if low is not None and value < low:
            raise ValueError(f"{model_name}: model argument {key}={value!r} must be >= {low} (default {default})")


_DATA_CFG_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "num_classes", "label_names")


def _entry_or_timm(model_name: str):
    """The zoo registry entry of `model_name`; None for a model only timm has (`resnet18`: `zoo train` trains
    and exports those too, so `create_model(name, checkpoint_path=export)` rebuilds them)."""
    try:
        return get_entry(model_name)
    except ValueError:
        import timm

        if not timm.is_model(split_name(model_name)[0]):
            raise
        return None


def create_model(
    model_name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Create any zoo model by name (`arch` or `arch.tag`), as `timm.create_model` does.

    Args:
        model_name: a name from `zoo.list_models()`, optionally with a pretrained tag, or one of timm's own
            models (built by timm; the checkpoint and export handling are the zoo's).
        pretrained: load the registered weights (`arch.tag`, or the arch's default tag).
        checkpoint_path: a local checkpoint to load instead, in our layout (e.g. from
            `zoo.weights.export`), an official one, safetensors or a Lightning `.ckpt`.
        **kwargs: model arguments (`num_classes`, `drop_path_rate`, `input_size`, ...);
            None values are dropped, as timm does.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    arch, tag = split_name(model_name)
    entry = _entry_or_timm(model_name)
    exported = _weights.read_export_config(checkpoint_path) if checkpoint_path is not None else None
    if exported and exported.get("architecture") != arch:
        exported = None
    if exported:
        kwargs = {**exported.get("model_args", {}), **kwargs}
    check_model_args(arch, kwargs)
    try:
        if entry is None or entry.kind == "classifier":
            import timm

            model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        else:
            model = entry.fn(pretrained=pretrained, pretrained_tag=tag or None, **kwargs)
    except (TypeError, ZeroDivisionError, IndexError, AssertionError) as e:  # arguments the signature check cannot judge
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its defaults"
        raise ValueError(f"{model_name} cannot be built with {args} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'})") from e
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
        _weights.load_weights(target, Path(checkpoint_path), arch=arch)
    return model


def load_generator_weights(model: torch.nn.Module, arch: str, pretrained: bool, tag: str | None, default_tag: str | None) -> None:
    """`pretrained=True` for a generator (not built through timm): the registered weights `arch.tag`."""
    if not pretrained:
        return
    tag = tag or default_tag
    _weights.load_weights(model, _weights.get_weights(f"{arch}.{tag}" if tag else arch))


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


def default_weights(model_name: str, attention: str | None = None) -> _weights.Weights | None:
    """The registered weights `model_name` loads: its `arch.tag`, else the arch's default tag; with `attention`, the
    tag fine-tuned for it (`<tag>_<attention>`) if one is registered, else one fine-tuned for no backend. None if none."""
    arch, tag = split_name(model_name)
    if tag:
        return _weights.get_weights(model_name) if _weights.has_weights(model_name) else None
    tags = [t for t in get_entry(arch).tags if _weights.has_weights(f"{arch}.{t}")]
    if attention:  # a tag `<data>_<backend>` holds a fine-tune for that attention backend
        from zoo.dit import attention_backends

        fine_tunes = tuple(f"_{name}" for name in attention_backends() if name != "dense")
        tags = [t for t in tags if t.endswith(f"_{attention}")] or [t for t in tags if not t.endswith(fine_tunes)] or tags
    return _weights.get_weights(f"{arch}.{tags[0]}") if tags else None


def build_derived_classifier(name: str, base: str, args: dict[str, Any], pretrained: bool, kwargs: dict[str, Any]):
    """The classifier `base` built with `args` (then `kwargs`), carrying `name`'s pretrained cfg (its class count and
    input channels too) and, with `pretrained`, its weights (`zoo._registry.register_derived_models`)."""
    # timm passes the tag (str), a cfg or nothing; resolve it against this name's default_cfgs
    cfg = resolve_cfg(name, kwargs).to_dict()
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("cache_dir", None)
    defaults = {"num_classes": cfg["num_classes"], "in_chans": cfg["input_size"][0], **args}
    model = get_entry(base).fn(pretrained=False, **{**defaults, **kwargs})
    model.pretrained_cfg = model.default_cfg = {**cfg, "architecture": name}
    model.zoo_architecture, model.zoo_model_args = name, dict(kwargs)
    if pretrained:
        load_classifier_weights(model, name, cfg.get("tag"), overlay)
    return model


def build_derived_generator(name: str, base: str, args: dict[str, Any], attention_args: dict[str, dict[str, Any]],
                            pretrained: bool, pretrained_tag: str | None, kwargs: dict[str, Any]):
    """The generator `base` built with `args` (then `kwargs`); `attention_args` gives, per `attention=`, the backend
    settings used when no `attention_kwargs` are passed (those its fine-tuned weights trained with). With
    `pretrained`: the weights `name.pretrained_tag`, else those fine-tuned for the attention (`default_weights`)."""
    attention = kwargs.get("attention", "dense")
    if attention in attention_args and kwargs.get("attention_kwargs") is None:
        kwargs["attention_kwargs"] = dict(attention_args[attention])
    model = get_entry(base).fn(**{**args, **kwargs})
    if pretrained:
        requested = f"{name}.{pretrained_tag}" if pretrained_tag else name
        _weights.load_weights(model, default_weights(requested, attention) or _weights.get_weights(requested))
    return model
