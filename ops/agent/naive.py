"""Agent attention (Han et al., ECCV 2024) in PyTorch: the exact reference.

With n agent tokens A (pooled from the queries), per head:

    agent_v = softmax(scale * A K^T + agent_bias) V             # n x Dv   (agent aggregation)
    out     = softmax(query_scale * Q A^T + query_bias) agent_v  # N x Dv   (agent broadcast)

i.e. a generalised linear attention whose feature maps are the two softmax maps: cost
O(N n D) and memory O(N n) per head; no N x N matrix exists. The agent tokens and the
biases are inputs, so the same function serves the backbones (agents pooled from Q, the
official position biases, `build_agent_biases`) and a diffusers processor (agents from token
merging, no bias, AgentSD's second scale `d ** (-0.5 * 0.3)`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_same, check_scale, check_tensor
from .._cost import cost_placeholder, is_counting_flops

LAYOUT = "[batch, heads, seq_len, head_dim]"


def _check_bias(name: str, bias: torch.Tensor | None, shape: tuple[int, int, int, int], like: torch.Tensor) -> None:
    if bias is None:
        return
    b, h, rows, cols = shape
    if not isinstance(bias, torch.Tensor) or bias.ndim != 4 or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, h) \
            or tuple(bias.shape[2:]) != (rows, cols):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{name} must have shape [{b}|1, {h}|1, {rows}, {cols}], got {got}")
    if bias.device != like.device:
        raise ValueError(f"{name} is on {bias.device} but q is on {like.device}: move it to one device")


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
) -> torch.Tensor:
    """Two-stage softmax attention through n agent tokens.

    Args:
        q: queries `[B, H, N, D]`; k, v: keys/values `[B, H, Nk, D]`, `[B, H, Nk, Dv]`.
        agents: agent tokens `[B, H, n, D]` (e.g. `pool_agents` of the pre-split Q).
        agent_bias: added to the agent->key logits, `[B|1, H|1, n, Nk]`.
        query_bias: added to the query->agent logits, `[B|1, H|1, N, n]`.
        scale: first-stage logit scale (default D^-1/2); query_scale: second stage (default `scale`).
        dropout_p: dropout on both softmax maps (pass 0 in eval, as `F.scaled_dot_product_attention`).

    Returns:
        `[B, H, N, Dv]` in q's dtype (the softmaxes run in float32 for half inputs).
    """
    check_agent_inputs(q, k, v, agents, agent_bias, query_bias, scale, query_scale, dropout_p)
    b, h, n_q, d = q.shape
    n_k, n_a, dv = k.shape[2], agents.shape[2], v.shape[3]
    if is_counting_flops():
        # the four matmuls: A K^T, P_a V, Q A^T, P_q agent_v
        return cost_placeholder(q.new_empty(b, h, n_q, dv), b * h * n_a * (n_k + n_q) * (d + dv))

    scale = d ** -0.5 if scale is None else scale
    query_scale = scale if query_scale is None else query_scale
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc, kc, ac = q.to(compute), k.to(compute), agents.to(compute)
    logits = (ac * scale) @ kc.transpose(-2, -1)
    if agent_bias is not None:
        logits = logits + agent_bias.to(compute)
    agent_attn = F.dropout(logits.softmax(dim=-1), p=dropout_p) if dropout_p else logits.softmax(dim=-1)
    agent_v = agent_attn @ v.to(compute)
    logits = (qc * query_scale) @ ac.transpose(-2, -1)
    if query_bias is not None:
        logits = logits + query_bias.to(compute)
    query_attn = F.dropout(logits.softmax(dim=-1), p=dropout_p) if dropout_p else logits.softmax(dim=-1)
    return (query_attn @ agent_v).to(q.dtype)


def check_agent_inputs(q, k, v, agents, agent_bias, query_bias, scale, query_scale, dropout_p) -> None:
    """`agent_attention`'s argument checks (shared with the dispatcher in `__init__`)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("agents", agents)):
        check_tensor(name, t, 4, LAYOUT)
    check_same(("q", "k", "v", "agents"), (q, k, v, agents))
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or agents.shape[:2] != (b, h):
        raise ValueError(
            f"q, k, v and agents must share batch and heads, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, agents {tuple(agents.shape)}"
        )
    if k.shape[3] != d or agents.shape[3] != d:
        raise ValueError(f"k and agents must have head_dim {d} like q, got k {k.shape[3]} and agents {agents.shape[3]}")
    if v.shape[2] != n_k:
        raise ValueError(f"v has {v.shape[2]} tokens but k has {n_k}: keys and values must pair up")
    n_a = agents.shape[2]
    if n_a < 1:
        raise ValueError("agents must hold at least one agent token, got 0")
    _check_bias("agent_bias", agent_bias, (b, h, n_a, n_k), q)
    _check_bias("query_bias", query_bias, (b, h, n_q, n_a), q)
    check_scale("scale", scale)
    check_scale("query_scale", query_scale)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
