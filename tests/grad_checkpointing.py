"""Gradient checkpointing must change what autograd keeps for backward, never what it computes.

An output-only comparison passes when `set_grad_checkpointing` does nothing, so the check also
counts the tensors saved for backward (`torch.autograd.graph.saved_tensors_hooks`): recomputing
blocks in the backward pass keeps fewer.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def run_counting_saved_tensors(model: nn.Module, *inputs: torch.Tensor | None) -> tuple[torch.Tensor, list, int]:
    """Output, parameter gradients of `sum(output**2)`, and the number of tensors saved for backward."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    torch.manual_seed(2)  # the same dropout / drop-path / label-dropout draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    out.square().sum().backward()
    return out.detach(), [p.grad for p in model.parameters()], count


def assert_checkpointing_takes_effect(model: nn.Module, *inputs: torch.Tensor | None, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Copies of `model` with and without `set_grad_checkpointing(True)` give the same outputs and
    gradients, and the checkpointed one saves fewer tensors for backward."""
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    out0, grads0, saved0 = run_counting_saved_tensors(plain, *inputs)
    out1, grads1, saved1 = run_counting_saved_tensors(ckpt, *inputs)
    torch.testing.assert_close(out1, out0)
    assert len(grads0) == len(grads1)
    for g0, g1 in zip(grads0, grads1):
        if g0 is None:
            assert g1 is None
        else:
            torch.testing.assert_close(g1, g0, rtol=rtol, atol=atol)
    name = type(model).__name__
    assert saved1 < saved0, f"{name}: set_grad_checkpointing(True) saved {saved1} tensors for backward, without it {saved0}"
