"""FLOPs in the papers' convention: fvcore's, one multiply-add = one FLOP, attention included.

Plain fvcore drops `aten::scaled_dot_product_attention` (it counts 0); here it gets a handle,
and every zoo op reports its own density-aware count through `zoo::attention_cost`
(see `zoo.ops._cost`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


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


def _example_inputs(model: torch.nn.Module, input_size: Sequence[int] | None, batch_size: int):
    if hasattr(model, "example_inputs"):  # generators know their own inputs (latents, t, labels)
        return tuple(model.example_inputs(batch_size=batch_size, input_size=input_size))
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    if len(input_size) == 2:
        input_size = (3, *input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    return (torch.randn(batch_size, *input_size, device=device),)


def flop_analysis(model: torch.nn.Module, input_size: Sequence[int] | None = None, inputs: tuple | None = None):
    """An fvcore `FlopCountAnalysis` with the zoo's handles installed."""
    from fvcore.nn import FlopCountAnalysis

    inputs = inputs if inputs is not None else _example_inputs(model, input_size, 1)
    analysis = FlopCountAnalysis(model, inputs)
    for name, handle in HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


def flops(model: torch.nn.Module, input_size: Sequence[int] | None = None, inputs: tuple | None = None) -> int:
    """Multiply-adds of one forward pass at batch 1 (fvcore convention, attention included).

    `input_size` is `(C, H, W)` or `(H, W)` for classifiers (default: the model's
    pretrained_cfg input size); generators supply their own example inputs.
    """
    from zoo.ops import counting_flops

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counting_flops():
            return int(flop_analysis(model, input_size, inputs).total())
    finally:
        model.train(was_training)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
