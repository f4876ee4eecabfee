"""FLOPs in the papers' convention: fvcore's, one multiply-add = one FLOP, attention included.

Plain fvcore drops `aten::scaled_dot_product_attention` (it counts 0); here it gets a handle,
and every zoo op reports its own density-aware count through `zoo::attention_cost`
(see `zoo.ops._cost`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

# The count runs one real forward pass (fvcore traces it), so time and memory grow with the input:
# nat_tiny at 3 x 1024 x 1024 (3.1M values) takes ~15 s and 1.5 GB on 2 CPU cores. 3 x 2048 x 2048 is allowed;
# 3 x 8192 x 8192 (201M values, many minutes and ~100 GB) is refused unless the limit is raised.
MAX_INPUT_ELEMENTS = 3 * 2048 * 2048


def _shape(value) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """B·H·Nq·Nk·(D + Dv) multiply-adds: QK^T plus PV (masks are not treated as sparsity)."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def attention_cost_handle(inputs: list[Any], outputs: list[Any]) -> int:
    return int(inputs[1].toIValue())


HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_handle,
    "zoo::attention_cost": attention_cost_handle,
}


def _check_size(input_size: Sequence[int] | None, inputs: tuple | None, max_input_elements: int) -> None:
    """Refuse, before tracing, an input whose forward pass would take minutes and tens of GB."""
    if input_size is not None:
        if isinstance(input_size, (str, bytes)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in input_size):
            raise ValueError(f"input_size must be positive ints (C H W or H W), got {tuple(input_size)!r}")
        elements = math.prod(input_size) * (3 if len(input_size) == 2 else 1)
    else:
        elements = sum(t.numel() for t in inputs or () if isinstance(t, torch.Tensor))
    if elements > max_input_elements:
        shown = "x".join(map(str, input_size)) if input_size is not None else "the given inputs"
        raise ValueError(
            f"input_size {shown} has {elements:,} input values, above the FLOP-count limit of {max_input_elements:,} "
            f"(the count runs one forward pass: about {elements * 4 * 120 / 1e9:.0f} GB of activations and "
            f"minutes of CPU time at this size): count at a smaller input, or raise max_input_elements "
            "(zoo flops --max-input-elements N)"
        )


def _example_inputs(model: torch.nn.Module, input_size: Sequence[int] | None, batch_size: int):
    if hasattr(model, "example_inputs"):  # generators know their own inputs (latents, t, labels)
        return tuple(model.example_inputs(batch_size=batch_size, input_size=input_size))
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    if len(input_size) not in (2, 3):
        raise ValueError(f"input_size {tuple(input_size)} must be one image's (C, H, W) or (H, W), without the batch "
                         f"dimension: e.g. {tuple(input_size[-3:])}")
    if len(input_size) == 2:
        input_size = (3, *input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    return (torch.randn(batch_size, *input_size, device=device),)


def flop_analysis(model: torch.nn.Module, input_size: Sequence[int] | None = None, inputs: tuple | None = None,
                  max_input_elements: int = MAX_INPUT_ELEMENTS):
    """An fvcore `FlopCountAnalysis` with the zoo's handles installed (inputs above `max_input_elements`
    values are refused: see `MAX_INPUT_ELEMENTS`)."""
    _check_size(input_size, inputs, max_input_elements)
    with warnings.catch_warnings():  # fvcore scripts a loss with torch.jit at import, which torch now deprecates
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    inputs = inputs if inputs is not None else _example_inputs(model, input_size, 1)
    analysis = FlopCountAnalysis(model, inputs)
    for name, handle in HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


def flops(model: torch.nn.Module, input_size: Sequence[int] | None = None, inputs: tuple | None = None,
          max_input_elements: int = MAX_INPUT_ELEMENTS) -> int:
    """Multiply-adds of one forward pass at batch 1 (fvcore convention, attention included).

    `input_size` is `(C, H, W)` or `(H, W)` for classifiers (default: the model's
    pretrained_cfg input size); generators supply their own example inputs. Inputs of more than
    `max_input_elements` values are refused up front (the count runs a real forward pass).
    """
    from zoo.ops import counting_flops

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counting_flops():
            return int(flop_analysis(model, input_size, inputs, max_input_elements).total())
    finally:
        model.train(was_training)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
