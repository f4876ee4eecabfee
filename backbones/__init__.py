"""Vision backbones. Importing this package registers every family in zoo and timm."""
from . import (  # noqa: F401
    biformer,
    cswin_style,  # agent / FLatten / InLine CSWin variants
    deit_style,  # agent / InLine DeiT variants
    nat,
    pvt_style,  # agent / FLatten / InLine PVT variants
    rmt_linear,
    swin_style,  # agent / FLatten / InLine Swin variants
)
