"""AdamW parameter groups with the papers' no-weight-decay rules, and warmup + cosine."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# levels that wrappers insert into parameter names: FSDP units, activation checkpointing, torch.compile
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's name in the unwrapped model."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_weight_decay_names(model: nn.Module, patterns: Iterable[str] = ()) -> set[str]:
    """Parameters exempt from weight decay.

    Biases, norm weights and any other 1-D parameter; names listed by the model's
    `no_weight_decay()` (timm convention: full names or keywords such as `rpb`); and names
    containing a configured keyword as a dotted component (`rpb`, `pos_embed`, ...). Names are
    `plain_name`s (those of the unwrapped model).
    """
    keywords = set(patterns)
    if hasattr(model, "no_weight_decay"):
        keywords |= set(model.no_weight_decay())
    skip = set()
    for name, p in model.named_parameters():
        name = plain_name(name)
        parts = name.split(".")
        if (p.ndim <= 1 or name.endswith(".bias") or name in keywords or any(part in keywords for part in parts)
                or any(name.startswith(k + ".") for k in keywords)):
            skip.add(name)
    return skip


def param_groups(model: nn.Module, weight_decay: float, patterns: Iterable[str] = (), skip: set[str] | None = None) -> list[dict]:
    """Two AdamW groups: decayed and not (only trainable parameters).

    skip: the no-decay names, decided on the unwrapped model (`no_weight_decay_names`); give them when `model` is
    wrapped by FSDP, whose parameters are flat 1-D shards by the time optimizers are configured.
    """
    skip = no_weight_decay_names(model, patterns) if skip is None else skip
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if plain_name(name) in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """LambdaLR: linear warmup from 0 over `warmup_steps`, then cosine to `min_lr_ratio` at `total_steps` (step it per iteration)."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configure_adamw(module, model: nn.Module, lr: float, weight_decay: float, betas, warmup_steps: int,
                    min_lr_ratio: float, patterns: Iterable[str]) -> dict:
    """`configure_optimizers` result for a LightningModule (`module.trainer` gives the step count; its
    `no_decay_names`, if set, the parameters kept out of weight decay)."""
    # not fused: Lightning cannot clip gradients of a fused AdamW under mixed precision
    skip = getattr(module, "no_decay_names", None)  # recorded at construction, before any FSDP wrapping
    opt = torch.optim.AdamW(param_groups(model, weight_decay, patterns, skip), lr=lr, betas=tuple(betas))
    total = int(module.trainer.estimated_stepping_batches)
    sched = warmup_cosine(opt, warmup_steps, total, min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
