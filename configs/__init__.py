"""YAML configs shipped with the package; read them with `load_config`."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def config_path(name: str) -> Path:
    """Path of a shipped config, e.g. `config_path('classify/nat_mnist.yaml')`."""
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {name!r}; available: {', '.join(list_configs())}")
    return path


def list_configs() -> list[str]:
    root = Path(str(resources.files(__name__)))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
