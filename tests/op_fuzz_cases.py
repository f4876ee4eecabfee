"""Property-generated configurations for every zoo.ops function, each with a float64 oracle.

`CASES[name](rng, kernel=False)` draws one configuration from the seeded `random.Random` and returns a
`Case`: the op as a function of its differentiable inputs, fresh random float64 inputs (never zeros) and,
where one exists, an independent dense float64 oracle written from the op's documented formula (not
its code). `kernel=True` draws only configurations the CUDA kernels run (head_dim 32/64/128, blocks
that are multiples of 16). Shared by tests/test_ops_fuzz.py (CPU and GPU variants).
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoo import ops


@dataclass
class Case:
    op: Callable[..., torch.Tensor]
    inputs: list[torch.Tensor]
    oracle: Callable[..., torch.Tensor] | None = None
    # for ops that select regions from their inputs: the selection, which low precision may break at near-ties
    selection: Callable[..., torch.Tensor] | None = None


def randn(rng: random.Random, *shape: int, positive: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return t.abs() + 0.1 if positive else t


def masked_softmax_attention(q, k, v, allowed, scale, bias=None):
    """Dense float64 softmax attention over `allowed` [.., Nq, Nk]; rows with no key give 0 (as the ops)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v


def token_mask(block_mask: torch.Tensor, n_q: int, n_k: int, block_q: int, block_k: int) -> torch.Tensor:
    return block_mask.repeat_interleave(block_q, -2)[..., :n_q, :].repeat_interleave(block_k, -1)[..., :n_k]


def _head_dim(rng, kernel):
    return rng.choice((32, 64)) if kernel else rng.choice((1, 3, 4, 8, 16))


def _qkv(rng, batch, heads, n_q, n_k, dim, dim_v):
    return [randn(rng, batch, heads, n_q, dim), randn(rng, batch, heads, n_k, dim), randn(rng, batch, heads, n_k, dim_v)]


def block_sparse_case(rng, kernel=False):
    batch, heads = rng.randint(1, 3), rng.randint(1, 3)
    block_q = rng.choice((16, 32)) if kernel else rng.randint(1, 9)
    block_k = rng.choice((16, 32)) if kernel else rng.randint(1, 9)
    n_q, n_k = rng.randint(1, 5 * block_q), rng.randint(1, 5 * block_k)
    dim = _head_dim(rng, kernel)
    dim_v = dim if kernel else rng.choice((dim, rng.randint(1, 9)))
    n_qb, n_kb = math.ceil(n_q / block_q), math.ceil(n_k / block_k)
    gen = torch.Generator().manual_seed(rng.getrandbits(31))
    mask = torch.rand(rng.choice((1, batch)), rng.choice((1, heads)), n_qb, n_kb, generator=gen) < rng.random()
    scale = rng.choice((None, rng.uniform(0.05, 2.0)))
    full_scale = dim ** -0.5 if scale is None else scale

    def op(q, k, v):
        return ops.block_sparse_attention(q, k, v, block_mask=mask.to(q.device), block_size=(block_q, block_k),
                                          scale=scale)

    def oracle(q, k, v):
        return masked_softmax_attention(q, k, v, token_mask(mask, n_q, n_k, block_q, block_k), full_scale)

    return Case(op, _qkv(rng, batch, heads, n_q, n_k, dim, dim_v), oracle)


def radial_case(rng, kernel=False):
    frames, per_frame = rng.randint(1, 6), rng.randint(1, 24)
    block = rng.choice((16, 32)) if kernel else rng.randint(2, 12)
    text = rng.choice((0, rng.randint(1, 7)))
    model = rng.choice(("wan", "hunyuan"))
    decay = rng.uniform(0.2, 2.0)
    n = frames * per_frame + text
    dim = _head_dim(rng, kernel)
    mask = ops.radial_block_mask(frames, per_frame, decay, block, model, text)

    def op(q, k, v):
        return ops.radial_attention(q, k, v, frames, per_frame, decay, block, model, text)

    def oracle(q, k, v):
        return masked_softmax_attention(q, k, v, token_mask(mask, n, n, block, block), dim ** -0.5)

    return Case(op, _qkv(rng, rng.randint(1, 3), rng.randint(1, 3), n, n, dim, dim), oracle)


def sla_case(rng, kernel=False):
    batch, heads = rng.randint(1, 2), rng.randint(1, 3)
    block_q = rng.choice((16, 32)) if kernel else rng.randint(1, 8)
    block_k = rng.choice((16, 32)) if kernel else rng.randint(1, 8)
    n_q, n_k = rng.randint(1, 4 * block_q), rng.randint(1, 4 * block_k)
    dim = _head_dim(rng, kernel)
    dim_v = dim if kernel else rng.choice((dim, rng.randint(1, 8)))
    linear_on = rng.choice(("marginal", "all"))
    negligible = 0.0 if linear_on == "all" else rng.choice((0.0, 0.25))
    topk = rng.uniform(0.0, 1.0 - negligible)
    feature = rng.choice(("softmax", "elu", "relu"))
    eps = 1e-5
    q, k, v = _qkv(rng, batch, heads, n_q, n_k, dim, dim_v)
    block_map = ops.sla_block_map(q, k, topk, negligible, (block_q, block_k))  # fixed: low precision may rank ties apart
    weight, bias = randn(rng, dim_v, dim_v), randn(rng, dim_v)

    def op(q, k, v, weight, bias):
        return ops.sparse_linear_attention(q, k, v, weight, bias, linear_on=linear_on, feature_map=feature,
                                           block_size=(block_q, block_k), eps=eps, block_map=block_map.to(q.device))

    def oracle(q, k, v, weight, bias):
        critical = token_mask(block_map == 1, n_q, n_k, block_q, block_k)
        o_s = masked_softmax_attention(q, k, v, critical, dim ** -0.5)
        phi = {"softmax": lambda x: x.softmax(-1), "elu": lambda x: F.elu(x) + 1, "relu": F.relu}[feature]
        linear = torch.ones_like(critical) if linear_on == "all" else token_mask(block_map == 0, n_q, n_k, block_q,
                                                                                  block_k)
        a = (phi(q) @ phi(k).transpose(-1, -2)) * linear
        den = a.sum(-1, keepdim=True) + eps
        o_l = torch.where(den > 0, (a @ v) / den.clamp_min(1e-300), 0.0)
        return o_s + o_l @ weight.T + bias

    return Case(op, [q, k, v, weight, bias], oracle)


def routing_case(rng, kernel=False):
    n_h, n_w = rng.randint(1, 3), rng.randint(1, 3)
    height, width = rng.randint(max(1, n_h), 3 * n_h + 2), rng.randint(max(1, n_w), 3 * n_w + 2)
    topk = rng.randint(1, n_h * n_w)
    batch, heads = rng.randint(1, 2), rng.randint(1, 3)
    dim = _head_dim(rng, kernel)
    dim_v = dim if kernel else rng.choice((dim, rng.randint(1, 8)))
    inputs = [randn(rng, batch, height, width, heads, dim), randn(rng, batch, height, width, heads, dim),
              randn(rng, batch, height, width, heads, dim_v)]
    _, _, region_h, region_w = ops.routing.region_geometry(height, width, (n_h, n_w))

    def op(q, k, v):
        return ops.bi_level_routing_attention(q, k, v, (n_h, n_w), topk)

    def oracle(q, k, v):
        routing = ops.bra_routing(q, k, (n_h, n_w), topk)  # [B, regions, topk], -1 = none
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        region = ((ys // region_h) * n_w + xs // region_w).flatten()  # region of each token
        listed = torch.zeros(batch, n_h * n_w, n_h * n_w + 1, dtype=torch.bool)
        listed.scatter_(-1, torch.where(routing >= 0, routing, n_h * n_w), True)
        allowed = listed[:, region][:, :, region][:, None]  # [B, 1, N, N]
        flat = [t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)]
        out = masked_softmax_attention(*flat, allowed, dim ** -0.5)
        return out.transpose(1, 2).reshape(batch, height, width, heads, dim_v)

    return Case(op, inputs, oracle, lambda q, k, v: ops.bra_routing(q, k, (n_h, n_w), topk))


def _na_axis_mask(length, kernel, dilation, stride, causal):
    """NATTEN's per-axis rule as documented in zoo.ops.na.naive: allowed [L, L] and rpb index [L, L]."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    rel = torch.zeros(length, length, dtype=torch.long)
    for i in range(length):
        group, inner = i % dilation, i // dilation
        group_len = length // dilation + (group < length % dilation)
        for j in range(group, length, dilation):
            key = j // dilation
            if causal:
                leader = min((inner // stride) * stride + stride - 1, group_len - 1)
                ok = leader - kernel < key <= inner
            else:
                leader = min((inner // stride) * stride + stride // 2, group_len - 1)
                start = min(max(leader - kernel // 2, 0), group_len - kernel)
                ok = start <= key < start + kernel
            allowed[i, j] = ok
            rel[i, j] = min(max(key - inner + kernel - 1, 0), 2 * kernel - 2)  # outside the window: masked
    return allowed, rel


def na_case(rng, kernel=False, na_dim=None):
    na_dim = na_dim or rng.randint(1, 3)
    spatial, kernels, dilations, strides, causal = [], [], [], [], []
    for _ in range(na_dim):
        k = rng.randint(2, 4 if na_dim == 3 else 5)
        d = rng.choice((1, 1, 2))
        spatial.append(rng.randint(k * d, k * d + (3 if na_dim == 3 else 6)))
        kernels.append(k)
        dilations.append(d)
        strides.append(rng.randint(1, k))
        causal.append(rng.random() < 0.25)
    heads_kv = rng.randint(1, 2)
    heads = heads_kv * rng.randint(1, 2)
    batch, dim = rng.randint(1, 2), _head_dim(rng, kernel)
    dim_v = rng.choice((dim, rng.randint(1, 6)))
    use_rpb = rng.random() < 0.5
    inputs = [randn(rng, batch, *spatial, heads, dim), randn(rng, batch, *spatial, heads_kv, dim),
              randn(rng, batch, *spatial, heads_kv, dim_v)]
    if use_rpb:
        inputs.append(randn(rng, heads, *(2 * k - 1 for k in kernels)))
    fn = (ops.na1d, ops.na2d, ops.na3d)[na_dim - 1]

    def op(q, k, v, rpb=None):
        return fn(q, k, v, tuple(kernels), tuple(dilations), tuple(strides), tuple(causal), rpb=rpb)

    def oracle(q, k, v, rpb=None):
        allowed, bias = None, None
        for axis in range(na_dim):
            a, r = _na_axis_mask(spatial[axis], kernels[axis], dilations[axis], strides[axis], causal[axis])
            allowed = a if allowed is None else (allowed[:, None, :, None] & a[None, :, None, :]).flatten(0, 1).flatten(1)
            bias = r[None] if bias is None else torch.cat([
                bias[:, :, None, :, None].expand(-1, -1, spatial[axis], -1, spatial[axis]).flatten(1, 2).flatten(2),
                r[None, None, :, None, :].expand(-1, bias.shape[1], -1, bias.shape[2], -1).flatten(1, 2).flatten(2),
            ])
        n = math.prod(spatial)
        flat = [t.reshape(batch, n, t.shape[-2], t.shape[-1]).transpose(1, 2) for t in (q, k, v)]
        flat[1], flat[2] = (t.repeat_interleave(heads // heads_kv, 1) for t in flat[1:])
        rpb_bias = None
        if rpb is not None:  # bias[a] [N, N] index into axis a of rpb
            rpb_bias = rpb[(slice(None), *bias.clamp(0, None))]
        out = masked_softmax_attention(*flat, allowed, dim ** -0.5, rpb_bias)
        return out.transpose(1, 2).reshape(batch, *spatial, heads, dim_v)

    return Case(op, inputs, oracle)


def agent_case(rng, kernel=False):
    batch, heads, n_q, n_k, n_a = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 20), rng.randint(1, 20), \
        rng.randint(1, 6)
    dim, dim_v = rng.randint(1, 8), rng.randint(1, 8)
    inputs = [randn(rng, batch, heads, n_q, dim), randn(rng, batch, heads, n_k, dim), randn(rng, batch, heads, n_k, dim_v),
              randn(rng, batch, heads, n_a, dim), randn(rng, 1, heads, n_a, n_k), randn(rng, batch, 1, n_q, n_a)]

    def op(q, k, v, agents, agent_bias, query_bias):
        return ops.agent_attention(q, k, v, agents, agent_bias, query_bias)

    def oracle(q, k, v, agents, agent_bias, query_bias):
        s = dim ** -0.5
        agent_v = torch.softmax(agents @ k.transpose(-1, -2) * s + agent_bias, -1) @ v
        return torch.softmax(q @ agents.transpose(-1, -2) * s + query_bias, -1) @ agent_v

    return Case(op, inputs, oracle)


def _linear_inputs(rng, positive):
    batch, heads, n_q, n_k, dim, dim_v = (rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 24), rng.randint(1, 24),
                                          rng.randint(1, 8), rng.randint(1, 8))
    return [randn(rng, batch, heads, n_q, dim, positive=positive), randn(rng, batch, heads, n_k, dim, positive=positive),
            randn(rng, batch, heads, n_k, dim_v)]


def linear_case(rng, kernel=False):
    eps = 1e-6

    def oracle(q, k, v):
        a = q @ k.transpose(-1, -2)
        return (a @ v) / (a.sum(-1, keepdim=True) + k.shape[2] * eps)

    return Case(lambda q, k, v: ops.linear_attention(q, k, v, eps=eps), _linear_inputs(rng, True), oracle)


def decoupled_case(rng, kernel=False):
    q, k, v = _linear_inputs(rng, True)
    inputs = [q, k, randn(rng, *q.shape), randn(rng, *k.shape), v]

    def oracle(q, k, q_num, k_num, v):
        n = k.shape[2]
        return (q_num @ k_num.transpose(-1, -2) @ v / n) / ((q @ k.transpose(-1, -2)).mean(-1, keepdim=True) + 1e-6)

    return Case(ops.decoupled_linear_attention, inputs, oracle)


def injective_case(rng, kernel=False):
    def oracle(q, k, v):
        a = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return ((a - a.mean(-1, keepdim=True) + 1) / k.shape[2]) @ v

    return Case(ops.injective_linear_attention, _linear_inputs(rng, False), oracle)


def mala_case(rng, kernel=False):
    def oracle(q, k, v):
        s, n = q.shape[-1] ** -0.5, k.shape[2]
        z = s * (q @ k.transpose(-1, -2)).mean(-1, keepdim=True)
        return (s / n) * (q @ k.transpose(-1, -2)) @ v * (1 + 1 / (z + 1e-6)) - z * v.mean(2, keepdim=True)

    return Case(ops.mala_attention, _linear_inputs(rng, True), oracle)


def rala_case(rng, kernel=False):
    def oracle(q, k, v):
        e = torch.softmax(q.shape[-1] ** -0.5 * q.mean(2, keepdim=True) @ k.transpose(-1, -2), -1)
        a = (q @ k.transpose(-1, -2)) * e
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    return Case(ops.rala_attention, _linear_inputs(rng, True), oracle)


def focused_case(rng, kernel=False):
    shape = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))] + [rng.randint(1, 12)]
    p = rng.uniform(1.5, 4.0)

    def oracle(x, scale):
        y = (F.relu(x) + 1e-6) / F.softplus(scale)
        return y ** p / (y ** p).norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True)

    return Case(lambda x, scale: ops.focused_feature_map(x, scale, p), [randn(rng, *shape), randn(rng, shape[-1])],
                oracle)


def pool_agents_case(rng, kernel=False):
    h, w, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 6)
    agent_shape = (rng.randint(1, h), rng.randint(1, w))

    def oracle(x):  # adaptive pooling: bin i covers [floor(i H / h), ceil((i + 1) H / h))
        grid = x.reshape(x.shape[0], h, w, c)
        rows = [grid[:, i * h // agent_shape[0]: -(-(i + 1) * h // agent_shape[0])] for i in range(agent_shape[0])]
        return torch.stack([r[:, :, j * w // agent_shape[1]: -(-(j + 1) * w // agent_shape[1])].mean((1, 2))
                            for r in rows for j in range(agent_shape[1])], 1)

    return Case(lambda x: ops.pool_agents(x, (h, w), agent_shape), [randn(rng, rng.randint(1, 3), h * w, c)], oracle)


CASES: dict[str, Callable[..., Case]] = {
    "block_sparse_attention": block_sparse_case,
    "radial_attention": radial_case,
    "sparse_linear_attention": sla_case,
    "bi_level_routing_attention": routing_case,
    "na1d": lambda rng, kernel=False: na_case(rng, kernel, 1),
    "na2d": lambda rng, kernel=False: na_case(rng, kernel, 2),
    "na3d": lambda rng, kernel=False: na_case(rng, kernel, 3),
    "agent_attention": agent_case,
    "linear_attention": linear_case,
    "decoupled_linear_attention": decoupled_case,
    "injective_linear_attention": injective_case,
    "mala_attention": mala_case,
    "rala_attention": rala_case,
    "focused_feature_map": focused_case,
    "pool_agents": pool_agents_case,
}
KERNEL_OPS = ("block_sparse_attention", "radial_attention", "sparse_linear_attention", "bi_level_routing_attention")
