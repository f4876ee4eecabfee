"""attnzoo: vision backbones and diffusion generators built on efficient attention.

`import zoo` is cheap: torch, timm and the model modules load on first use of the API.
Classifiers are registered into timm as soon as both are loaded, whichever comes first:
`import zoo; import timm; timm.create_model('nat_tiny')` works, and so does importing timm
before zoo or any zoo module first (`_RegisterWhenTimmLoaded` says how).
"""
from __future__ import annotations

import functools
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
    importlib.import_module("zoo.pretrained")  # the small MNIST-trained defaults (after the families they build on)


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


class _RegisterWhenTimmLoaded(importlib.abc.MetaPathFinder):
    """Registers the zoo's models into timm once timm is loaded and no zoo or timm import is under way.

    timm has no plugin mechanism (no entry points: only `timm.models.register_model`, a decorator
    that fills its registry when a model module runs), so `import zoo; import timm;
    timm.create_model('nat_tiny')` works only if something imports zoo's model modules once timm
    is loaded. Each model module registers itself (zoo._registry.register_model also calls timm's
    decorator) when imported; this hook only makes sure they all get imported.

    It must not import them while another zoo module is half-executed: `import zoo.backbones.nat`
    loads timm from inside backbones/biformer.py, and importing every model module at that moment
    would read names not defined yet. So the hook wraps the execution of every `zoo.*` module and of
    timm, counts those under way, and calls `register_all_models` when the outermost one finishes
    with timm loaded; then it leaves `sys.meta_path`. Modules found by the finders after it are
    unchanged except for that wrapper around their loader's `exec_module`.
    """

    def __init__(self) -> None:
        self.executing = 0  # zoo or timm modules whose code is running now (nested imports)

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" and not fullname.startswith("zoo."):
            return None
        spec = None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = functools.partial(self._exec_then_register, spec.loader.exec_module)
        return spec

    def _exec_then_register(self, exec_module, module) -> None:
        self.executing += 1
        try:
            exec_module(module)
        finally:
            self.executing -= 1
        if not self.executing and "timm" in sys.modules and self in sys.meta_path:
            sys.meta_path.remove(self)
            register_all_models()


if "timm" in sys.modules:
    register_all_models()
elif not any(isinstance(f, _RegisterWhenTimmLoaded) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoaded())
