"""What DiT and the video DiT share beyond their blocks: checkpointed block loop, init, example inputs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class DiTGeneratorMixin:
    """For an `nn.Module` with DiT's parts: `blocks` (each with `attn.backend` and `adaLN_modulation`),
    `t_embedder`, `y_embedder` (or None), `final_layer`, `patch_embedding` (the patchifying conv),
    `input_size` and `in_channels`; it sets `grad_checkpointing = False` in its `__init__`."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (timm's API) to save activation memory."""
        self.grad_checkpointing = enable

    def run_blocks(self, x: torch.Tensor, *block_args) -> torch.Tensor:
        """`x` through every block (`block(x, *block_args)`), checkpointed when enabled and grads are on."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, *block_args, use_reentrant=False)
            else:
                x = block(x, *block_args)
        return x

    def initialize_weights(self) -> None:
        """DiT's official init: xavier Linears (not the attention backend's own), zero biases, the patch
        conv as a Linear, N(0, .02) embedders, adaLN-Zero and a zero output layer."""
        backend_params = {id(p) for block in self.blocks for p in block.attn.backend.parameters()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in backend_params:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embedding.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embedding.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def example_inputs(self, batch_size: int = 1, input_size: Sequence[int] | None = None) -> tuple[torch.Tensor | None, ...]:
        """(latents, timesteps 500, labels 0 or None) for FLOP counts and smoke tests; `input_size`
        may carry leading channel dims (only its last spatial dims are read)."""
        device = self.final_layer.linear.weight.device
        dims = len(self.input_size)
        size = tuple(input_size[-dims:]) if input_size else tuple(self.input_size)
        x = torch.randn(batch_size, self.in_channels, *size, device=device)
        t = torch.full((batch_size,), 500.0, device=device)
        y = torch.zeros(batch_size, dtype=torch.long, device=device) if self.y_embedder is not None else None
        return x, t, y
