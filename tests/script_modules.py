"""The scripts under scripts/ imported as modules, for the tests that exercise them (one loader for all)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """A fresh import of scripts/<name>.py as module `attnzoo_script_<name>`.

    It is registered in `sys.modules` (dataclasses look their module up there), and scripts/ is on `sys.path`
    while it runs (a script may import a sibling, e.g. benchmark_fa4 imports benchmark).
    """
    module_name = f"attnzoo_script_{name}"
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(str(SCRIPTS))
    return module
