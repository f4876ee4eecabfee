"""The zoo's model registry: one name space for classifiers and generators.

Classifiers are also registered into timm (by `register_model`, when their module is imported;
zoo/__init__.py imports every model module once timm is loaded), so `timm.create_model` finds
them; generators (DiT, video DiT) live only here. A model module defines `default_cfgs` with
`zoo.weights.generate_default_cfgs` before its entrypoints, as timm requires.
"""
from __future__ import annotations

import fnmatch
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from timm import list_models as timm_list_models
from timm.models import register_model as timm_register_model

KINDS = ("classifier", "generator")


@dataclass
class ModelEntry:
    name: str
    fn: Callable
    kind: str
    paper: str = ""
    tags: list[str] = field(default_factory=list)  # pretrained tags, default first


_MODELS: dict[str, ModelEntry] = {}


@functools.cache
def timm_own_names() -> frozenset[str]:
    """timm's model names before any zoo registration (taken at the first registration)."""
    return frozenset(timm_list_models())


def register_model(fn: Callable | None = None, *, kind: str = "classifier", paper: str = ""):
    """Register an entrypoint `fn(pretrained=False, **kwargs) -> nn.Module` under `fn.__name__`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def wrap(fn: Callable) -> Callable:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice ({_MODELS[name].fn.__module__} and {fn.__module__})")
        if name in timm_own_names():
            raise ValueError(f"model name {name!r} is already a timm model: choose a distinct name")
        cfgs = getattr(sys.modules[fn.__module__], "default_cfgs", {})
        tags = list(cfgs[name].tags) if name in cfgs else []
        if kind == "classifier":
            if name not in cfgs:
                raise ValueError(f"{fn.__module__} must define default_cfgs[{name!r}] before registering {name}")
            timm_register_model(fn)
        _MODELS[name] = ModelEntry(name, fn, kind, paper, tags)
        return fn

    return wrap if fn is None else wrap(fn)


def register_derived_models(module: str, classifiers: dict[str, tuple[str, dict]], generators: dict[str, tuple[str, dict]],
                            papers: dict[str, str], attention_args: dict[str, dict[str, dict]] | None = None) -> None:
    """Register each `name -> (base model, arguments)` of `module`: the base built with those arguments, carrying
    `name`'s pretrained cfgs and weights from `module`'s `default_cfgs` (timm reads them there); see
    `zoo.factory.build_derived_classifier` / `build_derived_generator`. `attention_args[name]`: a generator's backend
    settings per `attention=`. Bases are looked up when a model is built: they may still be importing now."""
    def classifier(name: str, base: str, args: dict) -> Callable:
        def entrypoint(pretrained: bool = False, **kwargs):
            from .factory import build_derived_classifier

            return build_derived_classifier(name, base, args, pretrained, kwargs)

        return entrypoint

    def generator(name: str, base: str, args: dict) -> Callable:
        def entrypoint(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs):
            from .factory import build_derived_generator

            return build_derived_generator(name, base, args, (attention_args or {}).get(name, {}), pretrained, pretrained_tag, kwargs)

        return entrypoint

    entrypoints = [(name, "classifier", classifier(name, *spec)) for name, spec in classifiers.items()]
    entrypoints += [(name, "generator", generator(name, *spec)) for name, spec in generators.items()]
    for name, kind, entrypoint in entrypoints:
        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = module
        entrypoint.__doc__ = f"{name}: a {kind} built from its family with the arguments and weights {module} gives it."
        setattr(sys.modules[module], name, entrypoint)  # as a `def` there would be: timm lists it in the module's __all__
        register_model(entrypoint, kind=kind, paper=papers[name])


def split_name(name: str) -> tuple[str, str]:
    arch, _, tag = name.partition(".")
    return arch, tag


def _ensure_registered() -> None:
    import zoo

    zoo.register_all_models()


def get_entry(name: str) -> ModelEntry:
    _ensure_registered()
    arch, _ = split_name(name)
    if arch not in _MODELS:
        close = _closest(arch)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `zoo list` shows every model"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _MODELS[arch]


def _closest(name: str, n: int = 3) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(_MODELS), n=n, cutoff=0.6)


def list_models(filter: str | list[str] = "", pretrained: bool = False, kind: str | None = None) -> list[str]:
    """Model names matching fnmatch `filter` (a pattern or a list); with `pretrained`, `arch.tag` names."""
    _ensure_registered()
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p] or ["*"]
    names = []
    for entry in _MODELS.values():
        if kind is not None and entry.kind != kind:
            continue
        if pretrained:
            from . import weights

            candidates = [f"{entry.name}.{t}" if t else entry.name for t in entry.tags]
            candidates = [c for c in candidates if weights.has_weights(c)]
        else:
            candidates = [entry.name]
        for c in candidates:
            if any(fnmatch.fnmatch(c, p) or fnmatch.fnmatch(split_name(c)[0], p) for p in patterns):
                names.append(c)
    return sorted(names)


def list_pretrained(filter: str | list[str] = "") -> list[str]:
    return list_models(filter, pretrained=True)
