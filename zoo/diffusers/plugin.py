"""`apply_attention` / `remove_attention`: the plugins installed through diffusers' own hooks.

One hook name (`HOOK_NAME`) on the transformer and on every attention module it changes:
- the transformer's hook (stateful, so `cache_context` and `maybe_free_model_hooks` reach it)
  reads the latent grid and the sampler step before each forward;
- each attention module's hook saves the module's processor and installs a zoo processor;
  removing the hook puts the saved processor object back.
Everything lives on the model instance: no class, pipeline or module-level state changes, so two
models (or pipelines) in one process are independent.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from torch import nn

from zoo.diffusers.agentsd import AgentSDConfig, UNetSpec
from zoo.diffusers.attention import build_sparse_attention
from zoo.diffusers.config import CONFIGS, SLAConfig
from zoo.diffusers.processors import (
    CogVideoXSparseAttnProcessor,
    HunyuanVideoSparseAttnProcessor,
    RunState,
    WanSparseAttnProcessor,
    ZooAttnProcessor,
)

HOOK_NAME = "zoo_attention"


@dataclass(frozen=True)
class ModelSpec:
    """How one diffusers transformer lays out its video attention."""

    class_name: str
    attention: str  # regex over named_modules() names; group 1 = block kind, group 2 = block index
    processor: type[ZooAttnProcessor]
    mask_model: str  # radial rule: 'wan' has the frame-0 sink
    latent_argument: str = "hidden_states"

    def grid(self, model: nn.Module, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        """(frames, height, width) tokens after patchify, from the latent entering the transformer."""
        cfg = model.config
        if self.class_name == "WanTransformer3DModel":
            (_, _, f, h, w), (pt, ph, pw) = hidden_states.shape, cfg.patch_size
        elif self.class_name == "HunyuanVideoTransformer3DModel":
            (_, _, f, h, w), pt, ph = hidden_states.shape, cfg.patch_size_t, cfg.patch_size
            pw = ph
        else:  # CogVideoX: [B, F, C, H, W]
            (_, f, _, h, w), pt, ph = hidden_states.shape, cfg.patch_size_t or 1, cfg.patch_size
            pw = ph
        return f // pt, h // ph, w // pw

    def layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, int]]:
        """(name, attention module, block index) of the self-attention layers the plugin replaces.

        HunyuanVideo counts its single-stream blocks after the dual-stream ones.
        """
        offsets = {"single_transformer_blocks": len(getattr(model, "transformer_blocks", ()))}
        for name, module in model.named_modules():
            match = re.fullmatch(self.attention, name)
            if match:
                yield name, module, offsets.get(match.group(1), 0) + int(match.group(2))

    def processors(self, model: nn.Module, config, state: RunState) -> list[tuple[nn.Module, ZooAttnProcessor]]:
        """(attention module, its zoo processor) for every layer `config` changes."""
        policy, sparse, processors = config.policy, None, []
        for _, attn, layer_index in self.layers(model):
            if sparse is None or isinstance(config, SLAConfig):  # radial and NA have no weights: one shared
                sparse = build_sparse_attention(config, head_dim=attn.to_q.out_features // attn.heads,
                                                mask_model=self.mask_model, tally=state.tally).to(attn.to_q.weight.device)
            processors.append((attn, self.processor(attn.processor, sparse, layer_index, policy, state)))
        if not processors:
            raise ValueError(f"found no self-attention layers matching {self.attention!r} in this {self.class_name}")
        return processors


SPECS = (
    ModelSpec("WanTransformer3DModel", r"(blocks)\.(\d+)\.attn1", WanSparseAttnProcessor, "wan"),
    ModelSpec("HunyuanVideoTransformer3DModel", r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn",
              HunyuanVideoSparseAttnProcessor, "hunyuan"),
    ModelSpec("CogVideoXTransformer3DModel", r"(transformer_blocks)\.(\d+)\.attn1", CogVideoXSparseAttnProcessor,
              "hunyuan"),
)


def _spec(module: nn.Module, config) -> ModelSpec | UNetSpec:
    if isinstance(config, AgentSDConfig):
        if any(cls.__name__ == UNetSpec.class_name and cls.__module__.startswith("diffusers.")
               for cls in type(module).__mro__):
            return UNetSpec()
        hint = " (pass pipe.unet)" if hasattr(module, "components") else ""
        raise TypeError(f"AgentSDConfig supports diffusers' UNet2DConditionModel; got {type(module).__name__}{hint}")
    for spec in SPECS:
        if any(cls.__name__ == spec.class_name and cls.__module__.startswith("diffusers.") for cls in type(module).__mro__):
            return spec
    supported = ", ".join(s.class_name for s in SPECS)
    hint = " (pass pipe.transformer, and pipe.transformer_2 for Wan2.2 A14B)" if hasattr(module, "components") else ""
    raise TypeError(f"zoo attention plugins support diffusers' {supported}; got {type(module).__name__}{hint}")


class _NoState(BaseState):
    def reset(self) -> None:
        pass


class _TransformerHook(ModelHook):
    """Before each transformer forward: the latent grid, and the step (cache context or timestep changes)."""

    _is_stateful = True

    def __init__(self, spec: ModelSpec | UNetSpec, config, state: RunState) -> None:
        super().__init__()
        self.spec, self.config, self.state = spec, config, state
        self.contexts = StateManager(_NoState)  # `cache_context` sets the pipeline's CacheContext here
        self.signature: inspect.Signature | None = None

    def initialize_hook(self, module):
        self.signature = inspect.signature(type(module).forward)  # CogVideoX takes timestep third
        return module

    def _context(self) -> CacheContext | None:
        try:
            return self.contexts.context
        except ValueError:  # no cache context: this pipeline (or a direct call) gives none
            return None

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        call = self.signature.bind_partial(module, *args, **kwargs).arguments
        self.state.grid = self.spec.grid(module, call[self.spec.latent_argument])
        timestep, context = call.get("timestep"), self._context()
        if module.training and torch.is_grad_enabled():
            self.state.step = None  # fine-tuning: sparse
        elif context is not None and context.step_index is not None:
            self.state.step = context.step_index
        elif timestep is None:
            raise ValueError(f"{self.spec.class_name} was called without a timestep: the zoo attention plugin "
                             "needs it (or a cache_context with step_index) to know the sampler step")
        else:  # sampling lowers the timestep every step; a higher one starts a new generation
            t = float(torch.as_tensor(timestep).max())
            last = self.state.last_timestep
            self.state.step = 0 if last is None or t > last or self.state.step is None else (
                self.state.step + (t < last))
            self.state.last_timestep = t
        return args, kwargs

    def reset_state(self, module):
        self.state.reset()
        self.contexts.reset()
        return module


class _ProcessorHook(ModelHook):
    """Installs `processor` on an attention module; removing the hook restores the saved one."""

    def __init__(self, processor: ZooAttnProcessor) -> None:
        super().__init__()
        self.processor = processor

    def initialize_hook(self, module):
        module.set_processor(self.processor)
        return module

    def deinitalize_hook(self, module):  # (sic) diffusers' spelling
        module.set_processor(self.processor.stock)
        return module


def apply_attention(module: nn.Module, config) -> None:
    """Run `config`'s attention in the self-attention layers of a diffusers video transformer or SD UNet.

    `module`: a `WanTransformer3DModel` (Wan2.1/2.2, T2V/I2V: only `attn1` changes, cross-attention
    keeps its processor), `HunyuanVideoTransformer3DModel` (video rows sparse, text rows and
    columns dense, token refiner untouched) or `CogVideoXTransformer3DModel`. `config`: a
    `RadialAttentionConfig`, `SLAConfig` or `NeighborhoodAttentionConfig`; or a
    `UNet2DConditionModel` (SD 1.5, 2.1, SDXL) with an `AgentSDConfig`. Fuse QKV projections
    before applying (CogVideoX's `fuse_qkv_projections` replaces every processor). Works before or
    after `enable_parallelism`: Wan's sparse steps then run Ulysses context parallelism.
    `attention_report(module)` says what it skipped.
    """
    configs = (*CONFIGS, AgentSDConfig)
    if not isinstance(config, configs):
        names = ", ".join(c.__name__ for c in configs)
        raise TypeError(f"config must be one of {names}, got {type(config).__name__}")
    spec = _spec(module, config)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ValueError("zoo attention is already applied to this model: call remove_attention(model) first")
    state = RunState()
    processors = spec.processors(module, config, state)
    registry.register_hook(_TransformerHook(spec, config, state), HOOK_NAME)
    for attn, processor in processors:
        HookRegistry.check_if_exists_or_initialize(attn).register_hook(_ProcessorHook(processor), HOOK_NAME)
    registry.invalidate_child_registries_cache()


def remove_attention(module: nn.Module) -> None:
    """Undo `apply_attention`: every replaced attention module gets its original processor object back."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(HOOK_NAME) is None:
        raise ValueError("no zoo attention is applied to this model (apply_attention(model, config) installs one)")
    registry.remove_hook(HOOK_NAME, recurse=True)
    registry.invalidate_child_registries_cache()


@dataclass(frozen=True)
class AttentionReport:
    """What a model's zoo attention did since `apply_attention` (or the last `attention_report(reset=True)`).

    `skipped_fraction`: share of the (query, key) pairs of the sparse calls that the sparse
    attention left out, pair-weighted over those calls (the plain mean when the geometry does not
    change); text rows and text keys count as kept. For SLA these are the pairs outside the exact
    top-k blocks: its linear branch still covers them. `last_skipped_fraction`: the last sparse call's,
    on the token grid `grid` (frames, height, width). Both None before any sparse call. A dense
    call is one the stock processor ran (dense layers and steps). Calls are layer calls (CFG
    branches count apart; gradient checkpointing's recomputations count again).
    """

    kind: str
    dense_calls: int
    sparse_calls: int
    skipped_fraction: float | None
    last_skipped_fraction: float | None
    grid: tuple[int, int, int] | None

    def __str__(self) -> str:
        calls = f"{self.sparse_calls} sparse and {self.dense_calls} dense attention calls"
        if self.skipped_fraction is None:
            return f"{self.kind}: {calls}"
        note = " (its linear branch covers them)" if self.kind == "sla" else ""
        grid = "x".join(map(str, self.grid))
        return (f"{self.kind}: {100 * self.skipped_fraction:.1f}% of query-key pairs skipped{note} over {calls}; "
                f"last grid {grid}: {100 * self.last_skipped_fraction:.1f}%")


def attention_report(module: nn.Module, reset: bool = False) -> AttentionReport:
    """The `AttentionReport` of the radial, SLA or NA plugin on `module` (a transformer `apply_attention` changed).

    `reset=True` starts a new count after reading this one (`remove_attention` drops it).
    """
    registry = getattr(module, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(HOOK_NAME)
    if hook is None:
        raise ValueError("no zoo attention is applied to this model (apply_attention(model, config) installs one)")
    if isinstance(hook.config, AgentSDConfig):
        raise ValueError("attention_report covers the radial, SLA and NA plugins; AgentSD merges tokens instead "
                         "of skipping query-key pairs")
    tally = hook.state.tally
    report = AttentionReport(hook.config.kind, tally.dense_calls, tally.sparse_calls, tally.run.skipped_fraction(),
                             tally.last.skipped_fraction(), tally.grid)
    if reset:
        tally.reset()
    return report


def convert_turbowan_sla_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-format TurboWan state dict with its SLA projections renamed for the SLA plugin.

    `blocks.N.attn1.attn_op.local_attn.proj_l.{weight,bias}` -> `blocks.N.attn1.processor.sparse.sla.proj_l.*`;
    every other key is kept. Load into a model with `apply_attention(model, SLAConfig(...))` applied.
    """
    pattern = re.compile(r"(blocks\.\d+\.attn1)\.attn_op\.local_attn\.(proj_l\.(?:weight|bias))")
    return {pattern.sub(r"\1.processor.sparse.sla.\2", key): value for key, value in state_dict.items()}

