"""attnzoo: vision backbones and diffusion generators built on efficient attention.

`import zoo` is cheap: torch, timm and the model modules load on first use of the API.
Classifiers are registered into timm as soon as both are loaded, whichever comes first:
`import zoo; timm.create_model('nat_tiny')` works, and so does importing timm before zoo.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

_LAZY = {
    "create_model": "zoo.factory",
    "model_info": "zoo.factory",
    "list_models": "zoo._registry",
    "list_pretrained": "zoo._registry",
    "register_model": "zoo._registry",
    "flops": "zoo.flop_count",
    "count_params": "zoo.flop_count",
}
_LAZY_MODULES = ("weights", "ops", "backbones", "dit", "configs", "factory", "flop_count", "cli", "lightning")

__all__ = ["create_model", "list_models", "list_pretrained", "model_info", "flops", "count_params", "weights"]

_registered = False


def register_all_models() -> None:
    """Import every model module (which registers it in zoo and, for classifiers, in timm)."""
    global _registered
    if _registered:
        return
    _registered = True
    importlib.import_module("zoo.backbones")
    importlib.import_module("zoo.dit")


def __getattr__(name: str):
    if name in _LAZY:
        register_all_models()
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"zoo.{name}")
    else:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    globals()[name] = value
    return value


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Registers the zoo's classifiers right after timm finishes importing."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            registry = sys.modules.get("zoo._registry")
            if registry is not None and not hasattr(registry, "register_model"):
                return  # zoo._registry itself is importing timm: it registers the models once defined
            register_all_models()

        spec.loader.exec_module = exec_and_register
        return spec


if "timm" in sys.modules:
    register_all_models()
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    import importlib.util

    sys.meta_path.insert(0, _RegisterAfterTimm())
