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

import math

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
    dv = v.shape[3]
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


def pool_agents(x: torch.Tensor, size: tuple[int, int], agent_shape: tuple[int, int]) -> torch.Tensor:
    """Agent tokens: adaptive average pooling of tokens `[B, H*W, C]` (row-major grid `size`)
    to `agent_shape`, returned as `[B, n, C]`. Pool the full-width Q (all heads together), then
    split heads, as the official models do."""
    check_tensor("x", x, 3, "[batch, height*width, channels]")
    hh, ww = size
    if x.shape[1] != hh * ww:
        raise ValueError(f"x has {x.shape[1]} tokens but size={tuple(size)} needs {hh * ww}: pass the token grid")
    _check_agent_shape(agent_shape)
    grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hh, ww)
    return F.adaptive_avg_pool2d(grid, agent_shape).flatten(2).transpose(1, 2)


def _check_agent_shape(agent_shape) -> None:
    if len(agent_shape) != 2 or min(agent_shape) < 1:
        raise ValueError(f"agent_shape must be (rows, cols) of positive ints, got {agent_shape}")


def agent_grid(agent_num: int) -> tuple[int, int]:
    """The square agent grid of `agent_num` agents (the official models require a square)."""
    side = math.isqrt(agent_num) if agent_num > 0 else 0
    if side * side != agent_num or agent_num < 1:
        raise ValueError(f"agent_num must be a positive perfect square (pooled to a sqrt x sqrt grid), got {agent_num}")
    return side, side


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of `[..., h, w]` (align_corners=False), skipped when the size matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    return F.interpolate(x.reshape(-1, *x.shape[-3:]) if x.ndim > 3 else x.unsqueeze(0), size=size,
                         mode="bilinear").reshape(*lead, *size)


def build_agent_biases(
    an_bias: torch.Tensor,
    na_bias: torch.Tensor,
    ah_bias: torch.Tensor,
    aw_bias: torch.Tensor,
    ha_bias: torch.Tensor,
    wa_bias: torch.Tensor,
    key_size: tuple[int, int],
    query_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official agent position biases for a key grid and a query grid.

    `an_bias`/`na_bias` `(heads, n, 7, 7)` are block biases, bilinearly resized to the grid at
    every call; `ah/aw_bias` `(1, heads, n, h0, 1)`/`(1, heads, n, 1, w0)` and `ha/wa_bias`
    `(1, heads, h0, 1, n)`/`(1, heads, 1, w0, n)` are row/column biases of the construction grid,
    bilinearly resized when the runtime grid differs (the official dense-prediction rule;
    equal to the fine-tuning code's 1-D linear resize of each).

    Returns:
        agent_bias `[1, heads, n, Hk*Wk]` and query_bias `[1, heads, Hq*Wq, n]`.
    """
    heads, n = an_bias.shape[:2]
    key_bias = _resize(an_bias, key_size) + _resize((ah_bias + aw_bias)[0], key_size)
    query_rc = (ha_bias + wa_bias)[0].permute(0, 3, 1, 2)  # heads, n, h0, w0
    query_bias = _resize(na_bias, query_size) + _resize(query_rc, query_size)
    return key_bias.reshape(1, heads, n, -1), query_bias.reshape(1, heads, n, -1).transpose(-2, -1)
