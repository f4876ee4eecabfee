"""attnzoo: vision backbones and diffusion generators built on efficient attention.

`import zoo` registers every classifier into timm as well; diffusers and Lightning are
imported only by the parts that need them.
"""
from . import weights
from ._registry import list_models, list_pretrained, register_model
from .factory import create_model, model_info
from .flops import count_params, flops

from . import backbones as _backbones  # noqa: E402,F401  (registers the classifiers)
from . import dit as _dit  # noqa: E402,F401  (registers the generators)

__version__ = "0.1.0"

__all__ = [
    "create_model",
    "list_models",
    "list_pretrained",
    "model_info",
    "flops",
    "count_params",
    "register_model",
    "weights",
    "__version__",
]
