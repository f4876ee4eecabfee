"""Token mixers shared by the agent / FLatten / InLine families and their four macros.

Each paper's attention is a *core* that holds exactly the official parameters (so keys like
`attn.an_bias`, `attn.scale`, `attn.residual.0.weight` load unchanged) and mixes full-width
q, k, v `[B, N, C]` on an H x W token grid; thin subclasses add the projections of a macro
(`qkv` for Swin/DeiT, `q` + `kv` for PVT, none for CSWin whose block owns `qkv`). The math is
in `zoo.ops`; here are only parameters, reshapes and the resolution rules.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from zoo.ops import (
    agent_attention,
    agent_attention_backend,
    agent_grid,
    build_agent_biases,
    focused_feature_map,
    injective_linear_attention,
    linear_attention,
    pool_agents,
)

from ._common import init_trunc_normal

Size = tuple[int, int]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, heads, N, C/heads]."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def to_grid(x: torch.Tensor, size: Size) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


def from_grid(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def resize_tokens(pos: torch.Tensor, grid: Size, size: Size, mode: str) -> torch.Tensor:
    """Resize a `[1, h*w, C]` table of a `grid` to `size` (bilinear / bicubic, align_corners=False)."""
    if tuple(grid) == tuple(size):
        return pos
    return from_grid(F.interpolate(to_grid(pos, grid), size=size, mode=mode))


class QKV:
    """Mixin: the projection layout of a macro. `fused` = one `qkv` Linear (Swin, DeiT, CSWin);
    `split` = `q` + `kv` Linears (PVT)."""

    def _init_qkv(self, dim: int, qkv_bias: bool, layout: str) -> None:
        if layout == "fused":
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        elif layout == "split":
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        else:
            raise ValueError(f"qkv layout must be 'fused' or 'split', got {layout!r}")
        self.qkv_layout = layout

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_layout == "fused":
            return self.qkv(x).chunk(3, dim=-1)
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.q(x), k, v


# ----------------------------------------------------------------------------- agent attention

def aligned_copy(x: torch.Tensor, dtype: torch.dtype, multiple: int = 16) -> torch.Tensor:
    """`x` in `dtype`, contiguous along the last dim with every other stride a multiple of `multiple` elements:
    SDPA's memory-efficient kernel takes such a bias as it is, where it pads a copy of any other every call."""
    cols = x.shape[-1]
    padded = x.new_empty(*x.shape[:-1], -(-cols // multiple) * multiple, dtype=dtype)
    return padded[..., :cols].copy_(x)


class AgentCore(nn.Module):
    """Agent attention's parameters and math: agents = AdaptiveAvgPool2d of the pre-split Q to a
    sqrt(n) x sqrt(n) grid; biases `an/na_bias (heads, n, 7, 7)` resized to the grid every call,
    row/column biases `ah/aw/ha/wa_bias` sized to the construction `grid` and resized when the
    input grid differs; `ac/ca_bias` for a leading CLS token (DeiT).

    Inference (eval, no gradient, eager) builds the biases once per grid and dtype instead (`_biases`)."""

    def __init__(self, dim: int, num_heads: int, agent_num: int, grid: Size, cls_token: bool = False,
                 attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.agent_num = agent_num
        self.agent_shape = agent_grid(agent_num)
        self.grid = tuple(grid)
        h, w = self.grid
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, h, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, w))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, h, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, w, agent_num))
        if cls_token:
            self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
        self.cls_token = cls_token
        self.attn_drop = attn_drop
        self._bias_cache: tuple | None = None  # (key, key_bias, query_bias), see `_biases`; not in the state_dict
        for p in self._bias_params():
            init_trunc_normal(p)

    def _bias_params(self):
        names = ["an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"] + (["ac_bias", "ca_bias"] if self.cls_token else [])
        return [getattr(self, n) for n in names]

    def _build_biases(self, size: Size) -> tuple[torch.Tensor, torch.Tensor]:
        key_bias, query_bias = build_agent_biases(
            self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias, size, size)
        if self.cls_token:
            key_bias = torch.cat([self.ac_bias, key_bias], dim=-1)
            query_bias = torch.cat([self.ca_bias, query_bias], dim=-2)
        return key_bias, query_bias

    def _biases(self, size: Size, heads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(agent_bias, query_bias) for the grid `size`. Built from the parameters every call when training, when
        a gradient may reach them, or under torch.compile (which fuses the build). Otherwise (inference) built
        once and kept until the grid, the device, the dtype the backend runs (SDPA: q's, else the parameters'),
        inference mode, a bias parameter's storage (a copy of the module, `.to`, an assigning load) or its version counter
        (in-place updates: optimizer steps, EMA, load_state_dict) changes:
        inference then launches none of the ~10 resize/add/cat/cast kernels per block, and the SDPA path gets
        biases aligned for its fused kernels (`aligned_copy`)."""
        params = self._bias_params()
        if self.training or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return self._build_biases(size)
        sdpa = agent_attention_backend(*heads)[0] == "sdpa"
        dtype = heads[0].dtype if sdpa else params[0].dtype
        # inference-mode tensors cannot be saved for a later backward (SDPA saves the bias): keyed on the mode
        key = (tuple(size), dtype, params[0].device, torch.is_inference_mode_enabled(),
               tuple((p.data_ptr(), p._version) for p in params))
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, *(aligned_copy(b, dtype) for b in self._build_biases(size)))
        return self._bias_cache[1], self._bias_cache[2]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Size) -> torch.Tensor:
        """q, k, v `[B, (1+) H*W, C]` -> `[B, (1+) H*W, C]` (no projection, no local term)."""
        patches = q[:, 1:] if self.cls_token else q
        # under autocast pooling may run in float32: keep the projections' dtype
        agents = split_heads(pool_agents(patches, size, self.agent_shape).to(q.dtype), self.num_heads)
        heads = (*(split_heads(t, self.num_heads) for t in (q, k, v)), agents)
        key_bias, query_bias = self._biases(size, heads)
        out = agent_attention(*heads, agent_bias=key_bias, query_bias=query_bias,
                              dropout_p=self.attn_drop if self.training else 0.0)
        return merge_heads(out)


class AgentAttention(AgentCore, QKV):
    """Agent attention with projections and its 3x3 depthwise conv on V (Swin, PVT, DeiT blocks)."""

    def __init__(self, dim: int, num_heads: int, agent_num: int, grid: Size, qkv_layout: str = "fused",
                 qkv_bias: bool = True, cls_token: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, agent_num, grid, cls_token=cls_token, attn_drop=attn_drop)
        self._init_qkv(dim, qkv_bias, qkv_layout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        q, k, v = self._project(x)
        out = self.attend(q, k, v, size)
        start = 1 if self.cls_token else 0
        local = from_grid(self.dwc(to_grid(v[:, start:], size)))
        out = torch.cat([out[:, :start], out[:, start:] + local], dim=1) if start else out + local
        return self.proj_drop(self.proj(out))


# ----------------------------------------------------------------------------- FLatten

class FocusedCore(nn.Module):
    """FLatten's focused linear attention: `k += positional_encoding` (1, h*w, C), the focused map
    (ReLU, softplus temperature `scale` (1, 1, C), power p over the full C), mean-normalised linear
    attention per head, plus a 5x5 depthwise conv on V whose `head_dim` filters are shared by all
    heads (`dwc`: Conv2d(head_dim, head_dim, groups=head_dim))."""

    def __init__(self, dim: int, num_heads: int, grid: Size, focusing_factor: float = 3.0, kernel_size: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.grid = tuple(grid)
        self.focusing_factor = focusing_factor
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size=kernel_size, groups=head_dim, padding=kernel_size // 2)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Size) -> torch.Tensor:
        # q and k through the focused map side by side (each of its ~11 kernels runs once for both); under
        # autocast k + positional_encoding stays float32 as in the official code, the features are rounded once
        k = k + resize_tokens(self.positional_encoding, self.grid, size, "bicubic")
        features = focused_feature_map(torch.stack([q, k], dim=2), self.scale, self.focusing_factor).to(v.dtype)
        q, k = features.unbind(2)
        vh = split_heads(v, self.num_heads)
        out = merge_heads(linear_attention(split_heads(q, self.num_heads), split_heads(k, self.num_heads), vh))
        b, h, n, d = vh.shape
        local = self.dwc(vh.reshape(b * h, *size, d).permute(0, 3, 1, 2))  # the official (B*heads, d, H, W) view
        return out + local.reshape(b, h * d, n).transpose(1, 2)


class FocusedLinearAttention(FocusedCore, QKV):
    def __init__(self, dim: int, num_heads: int, grid: Size, qkv_layout: str = "fused", qkv_bias: bool = True,
                 focusing_factor: float = 3.0, kernel_size: int = 5, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, grid, focusing_factor, kernel_size)
        self._init_qkv(dim, qkv_bias, qkv_layout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        q, k, v = self._project(x)
        return self.proj_drop(self.proj(self.attend(q, k, v, size)))


# ----------------------------------------------------------------------------- InLine

class InLineCore(nn.Module):
    """InLine attention: injective linear attention on identity features plus a per-sample 3x3
    depthwise kernel on V predicted from the token mean of the attention input by
    `residual` = Conv1d(C, C, 1, groups=heads) -> GELU -> Conv1d(C, 9C, 1, groups=heads), no bias
    in the dynamic conv. Leading tokens beyond the H x W grid (DeiT's CLS) join the attention but
    not the local conv."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.residual = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size=1, groups=num_heads), nn.GELU(),
            nn.Conv1d(dim, dim * 9, kernel_size=1, groups=num_heads))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Size, x_mean: torch.Tensor) -> torch.Tensor:
        b, _, c = q.shape
        out = merge_heads(injective_linear_attention(
            split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)))
        if not b:  # no sample: no per-sample kernel (a conv with 0 groups is refused)
            return out
        weight = self.residual(x_mean.unsqueeze(-1)).reshape(b * c, 1, 3, 3)
        patches = v[:, -size[0] * size[1]:]
        local = F.conv2d(to_grid(patches, size).reshape(1, b * c, *size), weight, padding=1, groups=b * c)
        local = local.reshape(b, c, size[0] * size[1]).transpose(1, 2)
        if out.shape[1] == local.shape[1]:
            return out + local
        return torch.cat([out[:, :-local.shape[1]], out[:, -local.shape[1]:] + local], dim=1)


class InLineAttention(InLineCore, QKV):
    def __init__(self, dim: int, num_heads: int, qkv_layout: str = "fused", qkv_bias: bool = True,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads)
        self._init_qkv(dim, qkv_bias, qkv_layout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        q, k, v = self._project(x)
        return self.proj_drop(self.proj(self.attend(q, k, v, size, x.mean(dim=1))))


# ----------------------------------------------------------------------------- softmax

class SoftmaxAttention(nn.Module, QKV):
    """Plain global multi-head softmax attention (DeiT's and PVT's "B" blocks, without reduction)."""

    def __init__(self, dim: int, num_heads: int, qkv_layout: str = "fused", qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self._init_qkv(dim, qkv_bias, qkv_layout)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: Size | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self._project(x))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))
