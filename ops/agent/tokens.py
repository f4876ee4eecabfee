"""Agent tokens and the official agent position biases: the inputs `agent_attention` takes from a backbone."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_tensor


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
