"""DiT: class-conditional diffusion transformer (Peebles & Xie, "Scalable Diffusion Models with
Transformers", ICCV 2023), faithful to facebookresearch/DiT:models.py.

Module names equal the official ones, so the released `DiT-XL-2-{256,512}.pt` load unchanged
(292 tensors, fixed sin-cos `pos_embed` stored as a frozen Parameter as in the original).
`dit_to_diffusers` / `diffusers_to_dit` map to and from diffusers' `DiTTransformer2DModel`.

Faithful: forward, CFG and training losses are bit-identical to the official code
(scripts/verify_dit_official.py). Where diffusers' definition differs we follow the original:
timestep sinusoid exponent divided by 128 (diffusers: 127), the pre-MLP LayerNorm eps 1e-6
(diffusers `norm3`: 1e-5), one shared t/y embedder (diffusers: one copy per block; the
converter copies it out and refuses copies that drifted apart), `pos_embed` stored (diffusers:
a non-persistent buffer, recomputed on conversion), and classifier-free guidance on the first
3 of 4 latent channels by default (diffusers: all; `zoo.dit.sample(guidance_channels='all')`).
Deviation: `zoo.dit.sample` draws noise for the B samples only (the original draws it for the
doubled CFG batch), so a seed does not reproduce the original's images bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import Mlp, to_2tuple

from zoo._registry import register_model
from zoo.factory import load_generator_weights
from zoo.weights import generate_default_cfgs, get_weights, has_weights

from ._common import DiTGeneratorMixin
from .attention import build_backend, fill_backend_keys


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x * (1 + scale) + shift`, per sample (`shift`, `scale`: `[B, D]`, `x`: `[B, N, D]`)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT sinusoid `[cos, sin]` with frequencies `exp(-ln(max_period) * i / (dim/2))`, `[B, dim]`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE 1-D sin-cos table `[len(positions), dim]`: `[sin(p*w), cos(p*w)]`, `w_i = 10000^(-i/(dim/2))`."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """MAE/DiT fixed 2-D table `[height*width, dim]` for raster-ordered tokens.

    Faithful: the first half encodes the column (the official meshgrid puts w first), the
    second half the row.
    """
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patchify `[B, C, H, W]` -> raster tokens `[B, H/p * W/p, D]` (timm's PatchEmbed keys, no size asserts)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) -> Linear -> SiLU -> Linear.

    The float32 sinusoid is cast to the weights' dtype (as diffusers does), so a model moved to
    bf16/fp16 as a whole runs; under autocast the weights stay float32 and nothing changes."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (id `num_classes`) for the null label when dropout > 0.

    Training drops each label with probability `dropout_prob` (classifier-free guidance).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.dropout_prob > 0 else None

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        self._check_labels(labels)
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)

    def _check_labels(self, labels: torch.Tensor) -> None:
        """Out-of-range ids would be an index error deep in the embedding. Checked for CPU labels only: on an
        accelerator the check would cost a host sync every forward (there PyTorch's device-side assert stands,
        and the CLI and the training data are checked before they reach the model); skipped while tracing or
        compiling."""
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"y must hold integer class ids, got dtype {labels.dtype}")
        if (labels.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or labels.numel() == 0):
            return
        top = self.num_classes if self.null_class is not None else self.num_classes - 1
        low, high = labels.aminmax()
        if low < 0 or high > top:
            null = f" and {top} (the null class)" if self.null_class is not None else ""
            raise ValueError(f"y holds class id {int(low if low < 0 else high)}; this model knows classes "
                             f"0..{self.num_classes - 1}{null}")


class Attention(nn.Module):
    """Multi-head self-attention with the official fused `qkv` / `proj` layout; the attention
    itself is the pluggable backend (a registered `zoo.dit.AttentionBackend`)."""

    def __init__(self, dim: int, num_heads: int, backend: nn.Module, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = self.backend(q, k, v, grid, step_index)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * Attn(modulate(LN(x))); x += gate * MLP(modulate(LN(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, backend: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, ...], step_index: int | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), grid, step_index)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LN, adaLN (shift, scale), Linear to `patch_elements * out_channels` per token
    (patch_elements: p*p for images, pt*ph*pw for video)."""

    def __init__(self, hidden_size: int, patch_elements: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_elements * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(DiTGeneratorMixin, nn.Module):
    """Class-conditional DiT over latents (or pixels) `[B, in_channels, H, W]`.

    Args:
        input_size: latent side (or `(H, W)`); 32 for 256 px images through the SD VAE.
        patch_size: token patch side (2, 4, 8).
        in_channels: latent channels (4 for the SD VAE; 1 or 3 for pixel-space models).
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP ratio.
        class_dropout_prob: label dropout for classifier-free guidance; > 0 adds the null
            class `num_classes` (0 means no null class and no guidance).
        num_classes: number of class labels.
        learn_sigma: also predict the variance interpolation (out channels = 2 * in).
        attention: a registered backend (`zoo.dit.attention_backends()`): `dense` (SDPA), `sla`, `na`
            or one's own (`zoo.dit.register_backend`); `radial` needs video tokens.
        attention_kwargs: that backend's options (checked before the model is built).
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attention: str = "dense",
        attention_kwargs: dict | None = None,
    ):
        super().__init__()
        self.input_size = to_2tuple(input_size)
        for side in self.input_size:
            if side % patch_size:
                raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {patch_size}: "
                                 "choose a latent size that is a multiple of the patch")
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes, self.attention = num_classes, attention
        self.grid = (self.input_size[0] // patch_size, self.input_size[1] // patch_size)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Faithful: a frozen Parameter, as the original, so `pos_embed` is in the state dict
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio,
                     build_backend(attention, head_dim=hidden_size // num_heads, grid=self.grid, layer_index=i, options=attention_kwargs))
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size, self.out_channels)
        self.grad_checkpointing = False
        self.initialize_weights()

    @property
    def null_class(self) -> int | None:
        """The label id of the unconditional class, or None if the model has none."""
        return self.y_embedder.null_class

    @property
    def patch_embedding(self) -> nn.Conv2d:
        return self.x_embedder.proj

    def initialize_weights(self) -> None:
        """The official init (DiTGeneratorMixin) and the fixed sin-cos `pos_embed`."""
        super().initialize_weights()
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[-1], *self.grid).unsqueeze(0))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, p*p*C]` -> `[B, C, H, W]`."""
        p, c = self.patch_size, self.out_channels
        h, w = self.grid
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W] latents, got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.input_size:
            extra = "" if all(s % self.patch_size == 0 for s in x.shape[-2:]) else f" (and not divisible by patch_size {self.patch_size})"
            raise ValueError(f"x has spatial size {tuple(x.shape[-2:])}{extra} but the model was built for input_size "
                             f"{self.input_size}: create it with input_size={tuple(x.shape[-2:])}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must be [B] = [{x.shape[0]}], got {tuple(t.shape)} and {tuple(y.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, step_index: int | None = None) -> torch.Tensor:
        """Noise (and variance) prediction `[B, out_channels, H, W]`.

        Args:
            x: noisy latents `[B, in_channels, H, W]`.
            t: diffusion timesteps `[B]` in [0, 1000).
            y: class labels `[B]` (the null class id for unconditional).
            step_index: the sampler's step index (for step-dependent attention policies).
        """
        self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        x = self.run_blocks(x, c, self.grid, step_index)
        return self.unpatchify(self.final_layer(x, c))

    # zoo.weights.load_weights applies this to every source, so weights trained with any attention load
    # (`create_model(..., checkpoint_path=dense_ckpt, attention="sla")` fills the backend-only keys)
    checkpoint_converter = staticmethod(fill_backend_keys)


# ---- diffusers DiTTransformer2DModel layout ------------------------------------------------

_DIFFUSERS_BLOCK = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_DIFFUSERS_EMBED = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}
_DIFFUSERS_TOP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1", "final_layer.linear": "proj_out_2"}


def _depth_of(state: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if ids != set(range(len(ids))) or not ids:
        raise ValueError(f"state dict has no contiguous {prefix}N blocks (found {sorted(ids)[:5]}...)")
    return len(ids)


def dit_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original/zoo DiT state dict -> diffusers `DiTTransformer2DModel` state dict.

    Splits the fused qkv into to_q/to_k/to_v, copies the t/y embedders into every block (as
    diffusers' conversion does) and drops `pos_embed` (a non-persistent buffer there).
    """
    depth = _depth_of(state, "blocks.")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _DIFFUSERS_TOP.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
    for n in range(depth):
        src, dst = f"blocks.{n}.", f"transformer_blocks.{n}."
        for p in ("weight", "bias"):
            for name, chunk in zip(("to_q", "to_k", "to_v"), state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"{dst}attn1.{name}.{p}"] = chunk.clone()
            for ours, theirs in _DIFFUSERS_BLOCK.items():
                out[f"{dst}{theirs}.{p}"] = state[f"{src}{ours}.{p}"]
        for ours, theirs in _DIFFUSERS_EMBED.items():
            for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
                out[f"{dst}{theirs}.{p}"] = state[f"{ours}.{p}"].clone()
    return out


def diffusers_to_dit(state: dict[str, torch.Tensor], model: DiT | None) -> dict[str, torch.Tensor]:
    """diffusers `DiTTransformer2DModel` state dict -> ours (a `zoo.weights` converter).

    The per-block embedder copies must be equal (true for converted checkpoints; a model
    trained in diffusers lets them drift, and DiT has one embedder, so that is an error).
    `pos_embed` is recomputed (diffusers does not store it).
    """
    if "pos_embed.proj.weight" not in state or not any(k.startswith("transformer_blocks.") for k in state):
        raise ValueError("not a diffusers DiTTransformer2DModel state dict (no pos_embed.proj / transformer_blocks keys)")
    depth = _depth_of(state, "transformer_blocks.")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _DIFFUSERS_TOP.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = state[f"{theirs}.{p}"]
    for ours, theirs in _DIFFUSERS_EMBED.items():
        for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
            copies = [state[f"transformer_blocks.{n}.{theirs}.{p}"] for n in range(depth)]
            if any(not torch.equal(copies[0], c) for c in copies[1:]):
                raise ValueError(f"the per-block copies of {theirs}.{p} differ; DiT shares one embedder, so this "
                                 "checkpoint cannot be converted exactly")
            out[f"{ours}.{p}"] = copies[0]
    for n in range(depth):
        src, dst = f"transformer_blocks.{n}.", f"blocks.{n}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat([state[f"{src}attn1.to_{x}.{p}"] for x in "qkv"], dim=0)
            for ours, theirs in _DIFFUSERS_BLOCK.items():
                out[f"{dst}{ours}.{p}"] = state[f"{src}{theirs}.{p}"]
    if model is None:
        raise ValueError("diffusers_to_dit needs the target model (its input size fixes pos_embed)")
    out["pos_embed"] = sincos_2d(out["x_embedder.proj.weight"].shape[0], *model.grid).unsqueeze(0)
    return fill_backend_keys(out, model)


def to_diffusers(model: DiT):
    """A diffusers `DiTTransformer2DModel` with `model`'s weights (e.g. for `DiTPipeline`).

    Its outputs differ slightly from ours by diffusers' own numerics (timestep exponent / 127,
    pre-MLP LayerNorm eps 1e-5); see the module docstring.
    """
    from diffusers import DiTTransformer2DModel

    if not isinstance(model, DiT):
        raise TypeError(f"to_diffusers converts the image DiT (zoo.dit.DiT) to DiTTransformer2DModel; got "
                        f"{type(model).__name__}, which has no diffusers counterpart: export it with zoo.weights.export")
    hidden = model.pos_embed.shape[-1]
    if (model.attention != "dense" or model.input_size[0] != model.input_size[1] or model.null_class is None
            or model.blocks[0].mlp.fc1.out_features != 4 * hidden):
        raise ValueError("to_diffusers needs what DiTTransformer2DModel can express: dense attention, a square "
                         "input_size, mlp_ratio 4 and a null class (class_dropout_prob > 0)")
    theirs = DiTTransformer2DModel(
        num_attention_heads=model.num_heads, attention_head_dim=hidden // model.num_heads, in_channels=model.in_channels,
        out_channels=model.out_channels, num_layers=len(model.blocks), sample_size=model.input_size[0],
        patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes)
    theirs.load_state_dict(dit_to_diffusers(model.state_dict()), strict=True)
    return theirs


def convert_checkpoint(state: dict[str, torch.Tensor], model: DiT) -> dict[str, torch.Tensor]:
    """The registered converter: the official layout passes unchanged, a diffusers one is mapped."""
    if any(k.startswith("transformer_blocks.") for k in state):
        return diffusers_to_dit(state, model)
    return fill_backend_keys(state, model)


# ---- registered variants --------------------------------------------------------------------

_VAE_NOTE = ("latent model: decode with diffusers AutoencoderKL stabilityai/sd-vae-ft-ema or stabilityai/sd-vae-ft-mse "
             "(latents / 0.18215); zoo.dit.sample(vae='ema'|'mse')")


def _cfg(**kw):
    return {"num_classes": 1000, "license": "cc-by-nc-4.0", "converter": convert_checkpoint,
            "paper_name": "Scalable Diffusion Models with Transformers",
            "paper_ids": "arXiv:2212.09748", "origin_url": "https://github.com/facebookresearch/DiT", "description": _VAE_NOTE, **kw}


# (params, Gflops at 256 px) of DiT's Table 4, as recomputed from the layer shapes in the reference
# notes (within 0.05 Gflops of the paper; params without the frozen pos_embed)
_PAPER_NUMBERS = {
    "dit_s_2": (32.9e6, 6.06e9), "dit_s_4": (32.9e6, 1.41e9), "dit_s_8": (33.1e6, 0.36e9),
    "dit_b_2": (130.3e6, 23.01e9), "dit_b_4": (130.4e6, 5.57e9), "dit_b_8": (130.9e6, 1.42e9),
    "dit_l_2": (457.8e6, 80.70e9), "dit_l_4": (458.0e6, 19.70e9), "dit_l_8": (458.6e6, 5.01e9),
    "dit_xl_2": (674.8e6, 118.62e9), "dit_xl_4": (675.0e6, 29.04e9), "dit_xl_8": (675.7e6, 7.39e9),
}

default_cfgs = generate_default_cfgs({
    "dit_xl_2.in1k_256": _cfg(url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", input_size=(4, 32, 32),
                              notes="FID-50K 2.27, IS 278.24 (cfg 1.5, 250 DDPM steps)",
                              paper_params=_PAPER_NUMBERS["dit_xl_2"][0], paper_flops=_PAPER_NUMBERS["dit_xl_2"][1]),
    "dit_xl_2.in1k_512": _cfg(url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", input_size=(4, 64, 64),
                              notes="FID-50K 3.04, IS 240.82 (cfg 1.5, 250 DDPM steps)",
                              paper_params=_PAPER_NUMBERS["dit_xl_2"][0], paper_flops=525e9),
    **{arch: _cfg(input_size=(4, 32, 32), paper_params=params, paper_flops=flops)
       for arch, (params, flops) in _PAPER_NUMBERS.items() if arch != "dit_xl_2"},
})

_SIZES = {"s": dict(depth=12, hidden_size=384, num_heads=6), "b": dict(depth=12, hidden_size=768, num_heads=12),
          "l": dict(depth=24, hidden_size=1024, num_heads=16), "xl": dict(depth=28, hidden_size=1152, num_heads=16)}
_PAPER = "Scalable Diffusion Models with Transformers (ICCV 2023)"


def _create(arch: str, size: str, patch: int, pretrained: bool, pretrained_tag: str | None, **kwargs) -> DiT:
    default_tag = "in1k_256" if arch == "dit_xl_2" else None
    tag = pretrained_tag or default_tag
    if tag and has_weights(f"{arch}.{tag}"):  # the 512 px checkpoint needs 64x64 latents
        kwargs.setdefault("input_size", get_weights(f"{arch}.{tag}").cfg["input_size"][-1])
    preset = dict(_SIZES[size])
    if "hidden_size" in kwargs and "num_heads" not in kwargs:  # keep the preset's head dim (64; 72 for XL)
        head_dim = preset["hidden_size"] // preset["num_heads"]
        if kwargs["hidden_size"] % head_dim:
            raise ValueError(f"hidden_size={kwargs['hidden_size']} is not a multiple of {arch}'s head dim {head_dim}: pass num_heads too")
        kwargs["num_heads"] = kwargs["hidden_size"] // head_dim
    model = DiT(patch_size=patch, **{**preset, **kwargs})
    # timm-style record of the inputs (no `architecture`: wrappers such as dit_s_2_mnist name themselves)
    cfg = {k: v for k, v in default_cfgs[arch].default.to_dict().items() if k not in ("architecture", "tag")}
    model.pretrained_cfg = {**cfg, "input_size": (model.in_channels, *model.input_size), "num_classes": model.num_classes}
    load_generator_weights(model, arch, pretrained, pretrained_tag, default_tag)
    return model


@register_model(kind="generator", paper=_PAPER)
def dit_s_2(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    """DiT-S/2; small pixel-space configs too, e.g. `input_size=32, in_channels=1, num_classes=10, depth=6`."""
    return _create("dit_s_2", "s", 2, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_s_4(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_s_4", "s", 4, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_s_8(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_s_8", "s", 8, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_b_2(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_b_2", "b", 2, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_b_4(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_b_4", "b", 4, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_b_8(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_b_8", "b", 8, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_l_2(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_l_2", "l", 2, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_l_4(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_l_4", "l", 4, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_l_8(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_l_8", "l", 8, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_xl_2(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    """DiT-XL/2; `pretrained_tag='in1k_256'` (default) or `'in1k_512'` (input_size 64)."""
    return _create("dit_xl_2", "xl", 2, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_xl_4(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_xl_4", "xl", 4, pretrained, pretrained_tag, **kwargs)


@register_model(kind="generator", paper=_PAPER)
def dit_xl_8(pretrained: bool = False, pretrained_tag: str | None = None, **kwargs) -> DiT:
    return _create("dit_xl_8", "xl", 8, pretrained, pretrained_tag, **kwargs)
