"""Attention processors that run a sparse attention in place of a diffusers model's self-attention.

Each processor keeps the processor it replaces (`stock`) and hands it every call it does not
make sparse (dense layers, dense steps), so those stay the stock computation bit for bit, on the
backend `set_attention_backend` chose (`_attention_backend` and `_parallel_config` are the stock
processor's). The sparse path repeats the stock projections, QK norms and RoPE (tested against
the stock processors at float32) and runs the layer's `SparseAttention`.

Under diffusers' context parallelism (`enable_parallelism` with `ulysses_degree` > 1) each rank
holds a shard of the sequence: the Wan processor's sparse path exchanges q, k, v with diffusers'
own Ulysses all-to-all (`SeqAllToAllDim`: full sequence, heads / ranks), runs the sparse
attention on the full latent grid, and exchanges the output back; autograd runs the inverse
exchanges.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import SeqAllToAllDim
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from zoo.diffusers.attention import JointSequence, PairTally, SparseAttention


class RunState:
    """What the transformer's pre-forward hook learns each call: token grid and sampler step.

    `step` is None for a training call (every layer past the dense ones runs sparse). `tally`
    counts the attention calls since the plugin was applied; `reset` (the end of a pipeline call)
    keeps it, so it can be read after the pipeline returns.
    """

    def __init__(self) -> None:
        self.tally = PairTally()
        self.reset()

    def reset(self) -> None:
        self.grid: tuple[int, ...] | None = None  # (frames, height, width); a UNet's (height, width)
        self.step: int | None = None
        self.last_timestep: float | None = None


class ZooAttnProcessor(nn.Module):
    """Base processor: the dense/sparse decision and the stock processor's backend attributes."""

    def __init__(self, stock, sparse: SparseAttention, layer_index: int, policy, state: RunState) -> None:
        super().__init__()
        self._stock = (stock,)  # a tuple, so a stock nn.Module processor is not registered as our child
        self.sparse = sparse
        self.layer_index, self.policy, self.state = layer_index, policy, state

    @property
    def stock(self):
        return self._stock[0]

    # set_attention_backend / enable_parallelism set these on every processor that has them:
    # they belong to the stock processor, which runs the dense calls
    @property
    def _attention_backend(self):
        return getattr(self.stock, "_attention_backend", self.__dict__.get("_zoo_backend"))

    @_attention_backend.setter
    def _attention_backend(self, value) -> None:
        self.__dict__["_zoo_backend"] = value
        if hasattr(self.stock, "_attention_backend"):
            self.stock._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.stock, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value) -> None:
        if hasattr(self.stock, "_parallel_config"):
            self.stock._parallel_config = value

    @torch.compiler.disable  # a per-step decision (and a count): no recompile per step under compile_repeated_blocks
    def runs_sparse(self, supported: bool = True) -> bool:
        """Whether this call runs sparse: a `supported` call on a sparse layer and step; counted in the tally."""
        if self.state.grid is None:
            raise RuntimeError("zoo attention processors run inside the transformer's forward (its hook reads the "
                               "latent grid); call the transformer, not the block or attention module alone")
        step = self.policy.dense_timesteps if self.state.step is None else self.state.step
        sparse = supported and self.policy.use_sparse(self.layer_index, step)
        if not sparse:
            self.state.tally.dense_calls += 1
        return sparse

    def ulysses_group(self, heads: int):
        """The process group of diffusers' Ulysses context parallelism (None without it), once checked that
        the sparse path can run in it: Ulysses only, equal shards, heads divisible by the ranks."""
        config = self._parallel_config
        cp = None if config is None else config.context_parallel_config
        if cp is None:
            return None
        if cp.ring_degree > 1:
            raise ValueError(f"zoo sparse attention runs context parallelism as Ulysses only, got ring_degree="
                             f"{cp.ring_degree}: use ContextParallelConfig(ulysses_degree={cp.ring_degree * cp.ulysses_degree})")
        if cp.ulysses_anything:
            raise ValueError("zoo sparse attention needs equal sequence shards, got ulysses_anything=True: set "
                             "ulysses_anything=False (and a latent whose token count divides by ulysses_degree)")
        if heads % cp.ulysses_degree:
            raise ValueError(f"zoo sparse attention under context parallelism splits the {heads} heads over "
                             f"ulysses_degree={cp.ulysses_degree} ranks: use a ulysses_degree that divides {heads}")
        return cp._ulysses_mesh.get_group()

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seq: JointSequence,
               group=None) -> torch.Tensor:
        """The sparse attention of `[B, S, H, D]` q, k, v; with a Ulysses `group`, S is this rank's shard."""
        if group is not None:  # [B, S / ranks, H, D] -> [B, S, H / ranks, D]
            query, key, value = (SeqAllToAllDim.apply(group, t, 2, 1) for t in (query, key, value))
        out = self.sparse(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), seq,
                          backend=self._attention_backend).transpose(1, 2)
        if group is not None:  # and back
            out = SeqAllToAllDim.apply(group, out.contiguous(), 1, 2)
        return out

    def refuse_context_parallel(self) -> None:
        """HunyuanVideo has no diffusers CP plan: how a user's plan splits the text is unknown here.
        (CogVideoX's stock processor takes no `_parallel_config`: diffusers' CP does not reach it.)"""
        if self._parallel_config is not None and self._parallel_config.context_parallel_config is not None:
            raise ValueError("zoo sparse attention runs context parallelism in Wan only, not in HunyuanVideo: keep "
                             "enable_parallelism off, or make every step dense (dense_timesteps)")

    def _check_tokens(self, n: int) -> JointSequence:
        grid = self.state.grid
        if n != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"the layer got {n} video tokens but the latent grid {grid} has "
                             f"{grid[0] * grid[1] * grid[2]}: the sequence was changed between the transformer's "
                             "input and this attention")
        return JointSequence(grid)

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, stock={type(self.stock).__name__}"


def wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on `[B, S, H, D]`, the arithmetic of `WanAttnProcessor` (for equal outputs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseAttnProcessor(ZooAttnProcessor):
    """For `WanAttention` self-attention (`blocks.N.attn1`); honours fused QKV projections."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                **kwargs):
        if not self.runs_sparse(encoder_hidden_states is None and attention_mask is None and not kwargs):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        group = self.ulysses_group(attn.heads)
        ranks = 1 if group is None else self._parallel_config.context_parallel_config.ulysses_degree
        seq = self._check_tokens(hidden_states.shape[1] * ranks)  # the full latent's grid, also under CP
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = wan_rope(query, *rotary_emb), wan_rope(key, *rotary_emb)
        out = self.attend(query, key, value, seq, group).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    __call__ = forward


class HunyuanVideoSparseAttnProcessor(ZooAttnProcessor):
    """For HunyuanVideo's joint attention (`transformer_blocks.N.attn`, `single_transformer_blocks.N.attn`).

    The sequence is [video, text]; the prompt's key-padding mask hides padded text keys.
    """

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not self.runs_sparse(encoder_hidden_states is not None):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        self.refuse_context_parallel()
        n_text = encoder_hidden_states.shape[1]
        joint = attn.add_q_proj is None  # single-stream blocks: text goes through the same projections
        n_video = hidden_states.shape[1]
        self._check_tokens(n_video)
        if joint:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([apply_rotary_emb(query[:, :n_video], image_rotary_emb, sequence_dim=1), query[:, n_video:]], 1)
            key = torch.cat([apply_rotary_emb(key[:, :n_video], image_rotary_emb, sequence_dim=1), key[:, n_video:]], 1)
        if not joint:
            text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
            query, key, value = (torch.cat([a, b], dim=1) for a, b in zip((query, key, value), text))
        padding = None if attention_mask is None else ~attention_mask.reshape(attention_mask.shape[0], -1)[:, n_video:]
        seq = JointSequence(self.state.grid, n_text, text_first=False, key_padding=padding)
        out = self.attend(query, key, value, seq).flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    __call__ = forward


class CogVideoXSparseAttnProcessor(ZooAttnProcessor):
    """For CogVideoX's joint attention (`transformer_blocks.N.attn1`): the sequence is [text, video]."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not self.runs_sparse(encoder_hidden_states is not None and attention_mask is None):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_text, n_video = encoder_hidden_states.shape[1], hidden_states.shape[1]
        self._check_tokens(n_video)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = hidden_states.shape[0]
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
                             for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :, :n_text], apply_rotary_emb(query[:, :, n_text:], image_rotary_emb)], 2)
            key = torch.cat([key[:, :, :n_text], apply_rotary_emb(key[:, :, n_text:], image_rotary_emb)], 2)
        seq = JointSequence(self.state.grid, n_text, text_first=True)
        out = self.sparse(query, key, value, seq, backend=self._attention_backend)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([n_text, n_video], dim=1)
        return hidden_states, encoder_hidden_states

    __call__ = forward
