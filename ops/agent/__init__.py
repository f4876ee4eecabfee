"""Agent attention: softmax attention routed through a few agent tokens (linear in N).

Backends: "sdpa" (the two softmax stages as two `F.scaled_dot_product_attention` calls with the biases as
additive masks: PyTorch's fused flash/memory-efficient kernels, forward and backward, bias gradients
included; neither n x N nor N x n map is stored) and "reference" (`naive.py`, exact, the oracle).
`backend="auto"` takes SDPA on CUDA and the reference elsewhere; `agent_attention_backend` says which one
runs and why. The SDPA path keeps the agents' values in the inputs' dtype between the stages (the
reference keeps them in float32), which the GPU tests bound.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import autocast_cast
from .._cost import is_counting_flops
from . import naive
from .tokens import agent_grid, build_agent_biases, pool_agents

SDPA_DEVICES = ("cuda",)  # where "auto" takes SDPA (on CPU its math path is no faster than the reference)
BACKENDS = ("sdpa", "reference")  # in "auto" order


def _sdpa_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    if is_counting_flops():
        return "FLOP counting runs the reference's cost model"
    if not q.numel() or not k.numel():
        return "empty input (nothing to launch)"
    return None


def _select(q: torch.Tensor, k: torch.Tensor, backend: str) -> tuple[str, str]:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference", "asked for (backend='reference')"
    reason = _sdpa_reason(q, k)
    if backend == "sdpa":
        if reason:
            raise ValueError(f"backend='sdpa' cannot run this call: {reason}; use backend='auto' or 'reference'")
        return "sdpa", "two fused SDPA calls (asked for)"
    if reason is None and q.device.type not in SDPA_DEVICES:
        reason = f"tensors are on {q.device.type} (SDPA's fused kernels run on CUDA)"
    return ("sdpa", "two fused SDPA calls") if reason is None else ("reference", f"sdpa: {reason}")


def agent_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
                            backend: str = "auto") -> tuple[str, str]:
    """(backend that `agent_attention` would run for these tensors, why)."""
    naive.check_agent_inputs(q, k, v, agents, None, None, None, None, 0.0)
    return _select(q, k, backend)


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    scale: float | None = None,
    query_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Two-stage softmax attention through n agent tokens (the math: `naive.agent_attention`):

        agent_v = softmax(scale * A K^T + agent_bias) V;   out = softmax(query_scale * Q A^T + query_bias) agent_v

    Args:
        q `[B, H, N, D]`; k, v `[B, H, Nk, D]`, `[B, H, Nk, Dv]`; agents `[B, H, n, D]`.
        agent_bias `[B|1, H|1, n, Nk]`, query_bias `[B|1, H|1, N, n]`: additive logit biases.
        scale (default D^-1/2), query_scale (default `scale`), dropout_p: on both softmax maps.
        backend: "auto" (SDPA on CUDA, else the reference), "sdpa" or "reference". Inside autocast the SDPA
            path runs every tensor, biases included, in the autocast dtype.

    Returns:
        `[B, H, N, Dv]` in q's dtype (the autocast dtype on the SDPA path under autocast).
    """
    naive.check_agent_inputs(q, k, v, agents, agent_bias, query_bias, scale, query_scale, dropout_p)
    if _select(q, k, backend)[0] == "reference":
        return naive.agent_attention(q, k, v, agents, agent_bias, query_bias, scale, query_scale, dropout_p)
    q, k, v, agents = autocast_cast(q, k, v, agents)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    query_scale = scale if query_scale is None else query_scale
    agent_bias, query_bias = (None if b is None else b.to(q.dtype) for b in (agent_bias, query_bias))
    agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=agent_bias, dropout_p=dropout_p, scale=scale)
    return F.scaled_dot_product_attention(q, agents, agent_v.to(q.dtype), attn_mask=query_bias, dropout_p=dropout_p,
                                          scale=query_scale)


__all__ = ["agent_attention", "agent_attention_backend", "pool_agents", "agent_grid", "build_agent_biases"]
