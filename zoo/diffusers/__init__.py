"""diffusers plugins: radial, SLA and 3-D neighborhood attention inside diffusers' video transformers.

    from zoo.diffusers import RadialAttentionConfig, apply_attention, remove_attention
    apply_attention(pipe.transformer, RadialAttentionConfig(decay_factor=0.2, dense_timesteps=12, dense_layers=1))
    video = pipe(prompt, num_frames=81).frames[0]
    print(attention_report(pipe.transformer))  # skipped share, sparse and dense calls
    remove_attention(pipe.transformer)  # the stock model again

Supported: `WanTransformer3DModel`, `HunyuanVideoTransformer3DModel`, `CogVideoXTransformer3DModel`;
AgentSD (`AgentSDConfig`) on Stable Diffusion's `UNet2DConditionModel` (SD 1.5, 2.1, SDXL).

From the command line, on a local pipeline folder (no download):

    zoo generate-video --pipeline ./Wan2.1-T2V-1.3B-Diffusers --prompt "a cat" --attention radial --out cat.mp4
"""
from __future__ import annotations

from zoo.diffusers.agentsd import AgentSDConfig
from zoo.diffusers.config import (
    NeighborhoodAttentionConfig,
    RadialAttentionConfig,
    SLAConfig,
    from_video_dit,
    to_video_dit,
)
from zoo.diffusers.plugin import (
    HOOK_NAME,
    AttentionReport,
    apply_attention,
    attention_report,
    convert_turbowan_sla_keys,
    remove_attention,
)

__all__ = [
    "AgentSDConfig",
    "AttentionReport",
    "HOOK_NAME",
    "NeighborhoodAttentionConfig",
    "RadialAttentionConfig",
    "SLAConfig",
    "apply_attention",
    "attention_report",
    "convert_turbowan_sla_keys",
    "from_video_dit",
    "remove_attention",
    "to_video_dit",
]
