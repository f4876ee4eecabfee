"""AgentSD (agent attention + ToMe token merging) in the self-attention of Stable Diffusion UNets.

    from zoo.diffusers import AgentSDConfig, apply_attention, remove_attention
    apply_attention(pipe.unet, AgentSDConfig())  # SD 1.5 / 2.1 / SDXL `UNet2DConditionModel`
    image = pipe(prompt, num_inference_steps=50).images[0]
    remove_attention(pipe.unet)

Inside each selected `attn1` processor (Agent-Attention's `agentsd/`, on diffusers' processors):
the tokens are merged by ToMe's bipartite soft matching (tomesd: one destination per
stride x stride cell, the `merged` most similar sources averaged into their destination); a
much stronger merge of the same matching gives the agent tokens (projected with `to_q`);
attention runs on the merged tokens, through the agents while there are few enough of them
(2 * agents < merged tokens) and plain SDPA otherwise; the output is unmerged (each merged
source takes its destination's output). The similarity metric is the processor's input
(`norm1` of the block input; tomesd measures the block input itself). Cross-attention and
the lower-resolution blocks keep their processors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zoo import ops
from zoo.diffusers.config import _SerializableConfig
from zoo.diffusers.processors import RunState, ZooAttnProcessor


def _check_number(name: str, value, low: float, high: float | None = None, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and value >= low and (
        high is None or value < high)
    if not ok:
        span = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'} {span}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AgentSDConfig(_SerializableConfig):
    """AgentSD's settings; the defaults are the paper's two-phase recipe (agentsd/README.md).

    Steps `0 .. agent_steps-1`: merge `ratio` of the tokens on an `agent_stride` destination grid
    and use agents from merging `agent_ratio` of them (SD 1.5 at 512^2: 4,096 tokens -> 2,458
    merged tokens, 256 agents). Later steps: plain merging (`ratio`) on a `merge_stride` grid
    with softmax attention. The step is counted from timestep changes (SD pipelines give no step
    index); a higher timestep starts a new generation at step 0.

    `query_scale_exponent`: the second softmax's scale is head_dim ** (-0.5 * exponent) (paper
    k_scale2); `value_shortcut`: O += value_shortcut * V (paper k_shortcut). `max_downsample`:
    the blocks whose latent is downsampled at most this much; None = the highest-resolution
    level that has attention (downsample 1 in SD 1.5/2.1 = the paper's setting, 2 in SDXL).
    `random_destinations`: the destination inside each cell is drawn from `seed`, the step and
    the layer on the latent's device (deterministic per device type), else the top-left token;
    odd batches use the top-left (tomesd).
    """

    kind: ClassVar[str] = "agentsd"
    ratio: float = 0.4
    agent_ratio: float = 0.95
    agent_stride: int = 4
    merge_stride: int = 2
    agent_steps: int = 20
    query_scale_exponent: float = 0.3
    value_shortcut: float = 0.075
    max_downsample: int | None = None
    random_destinations: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_number("ratio", self.ratio, 0.0, 1.0)
        _check_number("agent_ratio", self.agent_ratio, 0.0, 1.0)
        _check_number("agent_stride", self.agent_stride, 1, integer=True)
        _check_number("merge_stride", self.merge_stride, 1, integer=True)
        _check_number("agent_steps", self.agent_steps, 0, integer=True)
        _check_number("query_scale_exponent", self.query_scale_exponent, 0.0)
        _check_number("value_shortcut", self.value_shortcut, 0.0)
        if self.max_downsample is not None:
            _check_number("max_downsample (or None: the highest-resolution attention)", self.max_downsample, 1,
                          integer=True)
        if not isinstance(self.random_destinations, bool):
            raise ValueError(f"random_destinations must be a bool, got {self.random_destinations!r}")
        _check_number("seed", self.seed, 0, integer=True)


class TokenMatching:
    """ToMe's bipartite soft matching of `metric` `[B, N, C]` on an (h, w) token grid (tomesd semantics).

    One destination per `stride` x `stride` cell (`choice`: its index inside each cell, `[h//stride,
    w//stride]`); every other token is a source. Each source's most similar destination (cosine)
    is its match; the `merged` sources with the best matches are averaged into their destinations
    (`merge`), the `agent_merged` best ones for the agent tokens (`agents`).
    """

    def __init__(self, metric: torch.Tensor, size: tuple[int, int], stride: int, merged: int, agent_merged: int,
                 choice: torch.Tensor | None = None) -> None:
        batch, n, _ = metric.shape
        h, w = size
        hs, ws = h // stride, w // stride
        self.batch, self.n = batch, n
        with torch.no_grad():
            cells = torch.zeros(hs, ws, stride * stride, dtype=torch.int64, device=metric.device)
            if choice is None:
                choice = torch.zeros(hs, ws, dtype=torch.int64, device=metric.device)
            cells.scatter_(2, choice.to(metric.device).reshape(hs, ws, 1), -1)
            grid = torch.zeros(h, w, dtype=torch.int64, device=metric.device)
            grid[: hs * stride, : ws * stride] = cells.view(hs, ws, stride, stride).transpose(1, 2).reshape(
                hs * stride, ws * stride)
            order = grid.reshape(1, -1, 1).argsort(dim=1, stable=True)  # destinations (-1) first
            self.n_dst = hs * ws
            self.src_index, self.dst_index = order[:, self.n_dst:], order[:, : self.n_dst]
            n_src = n - self.n_dst
            self.merged = min(merged, n_src) if self.n_dst else 0
            agent_merged = min(agent_merged, n_src) if self.n_dst else 0
            self.has_agents = 2 * (n - agent_merged) < n - self.merged and agent_merged > 0
            if self.merged or self.has_agents:
                unit = metric / metric.norm(dim=-1, keepdim=True)
                src, dst = self._split(unit)
                best, self.best_dst = (src @ dst.transpose(-1, -2)).max(dim=-1)
                self.ranking = best.argsort(dim=-1, descending=True, stable=True)[..., None]
            self.agent_merged = agent_merged

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[-1]
        return (x.gather(1, self.src_index.expand(self.batch, -1, c)),
                x.gather(1, self.dst_index.expand(self.batch, -1, c)))

    def _reduce(self, x: torch.Tensor, merged: int) -> torch.Tensor:
        src, dst = self._split(x)
        c = x.shape[-1]
        kept = src.gather(1, self.ranking[:, merged:].expand(-1, -1, c))
        moved = src.gather(1, self.ranking[:, :merged].expand(-1, -1, c))
        into = self.best_dst.gather(1, self.ranking[:, :merged, 0])[..., None].expand(-1, -1, c)
        return torch.cat([kept, dst.scatter_reduce(1, into, moved, reduce="mean")], dim=1)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, N, C]` -> `[B, N - merged, C]` (unmerged sources, then destinations)."""
        return self._reduce(x, self.merged) if self.merged else x

    def agents(self, x: torch.Tensor) -> torch.Tensor | None:
        """The agent tokens `[B, N - agent_merged, C]`, or None when they would not be few enough."""
        return self._reduce(x, self.agent_merged) if self.has_agents else None

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, N - merged, C]` back to `[B, N, C]`: a merged source gets its destination's row."""
        if not self.merged:
            return x
        c, kept = x.shape[-1], self.n - self.n_dst - self.merged
        unmerged, dst = x[:, :kept], x[:, kept:]
        moved = dst.gather(1, self.best_dst.gather(1, self.ranking[:, : self.merged, 0])[..., None].expand(-1, -1, c))
        src_positions = self.src_index.expand(self.batch, -1, 1)
        out = x.new_zeros(self.batch, self.n, c)
        out.scatter_(1, self.dst_index.expand(self.batch, -1, c), dst)
        out.scatter_(1, src_positions.gather(1, self.ranking[:, self.merged:]).expand(-1, -1, c), unmerged)
        out.scatter_(1, src_positions.gather(1, self.ranking[:, : self.merged]).expand(-1, -1, c), moved)
        return out


def _plain_attention(attn) -> bool:
    """An `Attention` whose processor is the bare q/k/v attention AgentSD rewrites (BasicTransformerBlock.attn1)."""
    return (not getattr(attn, "is_cross_attention", True) and attn.spatial_norm is None and attn.group_norm is None
            and not attn.residual_connection and attn.rescale_output_factor == 1.0)


class AgentSDAttnProcessor(ZooAttnProcessor):
    """Merge, attention through agents (or SDPA), unmerge: for a UNet's self-attention `attn1`.

    Accepts every argument diffusers' `Attention.forward` passes: cross-attention, masked and 4-D
    calls go to the stock processor unchanged; other extra arguments (`cross_attention_kwargs`)
    are ignored, as `AttnProcessor2_0` ignores them.
    """

    def __init__(self, stock, config: AgentSDConfig, downsample: int, layer_index: int, state: RunState) -> None:
        # the base keeps the stock processor and its backend attributes; AgentSD has no SparseAttention
        # or SparsityPolicy (`runs_sparse` is unused): its phase comes from `config` and the step
        super().__init__(stock, None, layer_index, None, state)
        self.config, self.downsample = config, downsample

    def matching(self, x: torch.Tensor) -> TokenMatching:
        """This call's matching: the phase from the sampler step, the token grid from the latent."""
        c, (height, width) = self.config, self.state.grid
        size = (math.ceil(height / self.downsample), math.ceil(width / self.downsample))
        if size[0] * size[1] != x.shape[1]:
            raise ValueError(f"the layer got {x.shape[1]} tokens but the latent {height}x{width} downsampled "
                             f"{self.downsample}x has {size[0] * size[1]}: call the UNet, not the block alone")
        agent_phase = self.state.step is None or self.state.step < c.agent_steps
        stride = c.agent_stride if agent_phase else c.merge_stride
        n = x.shape[1]
        choice = None
        if c.random_destinations and x.shape[0] % 2 == 0:
            step = -1 if self.state.step is None else self.state.step
            # drawn on x's device: a host tensor's copy would wait for the GPU
            generator = torch.Generator(x.device).manual_seed(c.seed * 1_000_003 + (step + 1) * 1_009 + self.layer_index)
            choice = torch.randint(stride * stride, (size[0] // stride, size[1] // stride), generator=generator,
                                   device=x.device)
        return TokenMatching(x, size, stride, int(n * c.ratio), int(n * c.agent_ratio) if agent_phase else 0, choice)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor | None) -> torch.Tensor:
        """`[B, heads, n, d]` attention of the merged tokens: through the agents, else SDPA.

        `zoo.ops.agent_attention`: on a GPU two fused SDPA calls (agents over the keys, then the queries
        over the agents: the formula without materialising either map); elsewhere the exact reference.
        """
        if agents is None:
            return F.scaled_dot_product_attention(q, k, v)
        d = q.shape[-1]
        scale, query_scale = d ** -0.5, d ** (-0.5 * self.config.query_scale_exponent)
        out = ops.agent_attention(q, k, v, agents, scale=scale, query_scale=query_scale)
        return out + self.config.value_shortcut * v

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if self.state.grid is None:
            raise RuntimeError("AgentSD processors run inside the UNet's forward (its hook reads the latent size); "
                               "call the UNet, not the block or attention module alone")
        matching = self.matching(hidden_states)
        merged, agents = matching.merge(hidden_states), matching.agents(hidden_states)
        batch, heads = merged.shape[0], attn.heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        query, key, value = split_heads(attn.to_q(merged)), split_heads(attn.to_k(merged)), split_heads(attn.to_v(merged))
        if agents is not None:
            agents = split_heads(attn.to_q(agents))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
            agents = None if agents is None else attn.norm_q(agents)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = self.attend(query, key, value, agents)
        out = out.transpose(1, 2).reshape(batch, -1, heads * query.shape[-1]).to(query.dtype)
        return matching.unmerge(attn.to_out[1](attn.to_out[0](out)))

    __call__ = forward

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, downsample={self.downsample}"


class UNetSpec:
    """How `apply_attention` finds a `UNet2DConditionModel`'s latent and its AgentSD layers."""

    class_name = "UNet2DConditionModel"
    latent_argument = "sample"

    @staticmethod
    def grid(model: nn.Module, sample: torch.Tensor) -> tuple[int, int]:
        """(height, width) of the latent entering the UNet."""
        return tuple(sample.shape[-2:])

    @staticmethod
    def downsamples(model: nn.Module) -> dict[int, int]:
        """id(attn1) -> how much its block's latent is downsampled, for every rewritable self-attention."""
        factors, factor = {}, 1

        def record(blocks) -> None:
            for block in blocks:
                for module in block.modules():
                    if isinstance(getattr(module, "attn1", None), nn.Module) and _plain_attention(module.attn1):
                        factors[id(module.attn1)] = factor

        for block in model.down_blocks:
            record(getattr(block, "attentions", ()))
            factor *= 2 if getattr(block, "downsamplers", None) else 1
        record(getattr(model.mid_block, "attentions", ()) if model.mid_block is not None else ())
        for block in model.up_blocks:
            record(getattr(block, "attentions", ()))
            factor //= 2 if getattr(block, "upsamplers", None) else 1
        return factors

    def processors(self, model: nn.Module, config: AgentSDConfig, state: RunState) -> list[tuple[nn.Module, AgentSDAttnProcessor]]:
        factors = self.downsamples(model)
        if not factors:
            raise ValueError("found no self-attention (attn1) layers in this UNet2DConditionModel")
        limit = min(factors.values()) if config.max_downsample is None else config.max_downsample
        chosen = [(name, m) for name, m in model.named_modules() if factors.get(id(m), limit + 1) <= limit]
        if not chosen:
            raise ValueError(f"no self-attention runs at downsample <= max_downsample={limit} in this UNet (its "
                             f"levels: {sorted(set(factors.values()))}); raise max_downsample or pass None")
        return [(m, AgentSDAttnProcessor(m.processor, config, factors[id(m)], i, state))
                for i, (_, m) in enumerate(chosen)]
