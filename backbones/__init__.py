"""Vision backbones. Importing this package registers every family in zoo and timm."""
from . import biformer  # noqa: F401,E402
