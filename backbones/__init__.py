"""Vision backbones. Importing this package registers every family in zoo and timm."""
from . import rmt_linear  # noqa: F401
