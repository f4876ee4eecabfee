"""Vision backbones. Importing this package registers every family in zoo and timm."""
from . import nat  # noqa: F401
from . import biformer  # noqa: F401,E402
from . import swin_style  # noqa: F401,E402  (agent / FLatten / InLine Swin variants)
from . import rmt_linear  # noqa: F401
