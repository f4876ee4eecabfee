"""Compare the zoo's agent / FLatten / InLine backbones with the official model definitions.

For each variant: build the official model from a local checkout of the official repository,
build ours, compare parameter counts, load the official state_dict into ours with strict=True
and compare the logits on a random batch. Needs the three repositories checked out
(LeapLabTHU/Agent-Attention, LeapLabTHU/FLatten-Transformer, LeapLabTHU/InLine) and `einops`.

    python scripts/check_official_agent_linear.py --agent ~/Agent-Attention \\
        --flatten ~/FLatten-Transformer --inline ~/InLine [variant ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

A = dict(agent_num=[9, 16, 49, 49])
S = dict(depths=[2, 2, 18, 2])
B = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])

# variant -> (repository, module file, constructor, kwargs, input size)
OFFICIAL = {
    "agent_swin_tiny": ("agent", "agent_swin", "AgentSwinTransformer", dict(depths=[2, 2, 6, 2], window_size=56, attn_type="AAAB", **A), 224),
    "agent_swin_small": ("agent", "agent_swin", "AgentSwinTransformer", dict(window_size=56, attn_type="AABB", **S, **A), 224),
    "agent_swin_small_288": ("agent", "agent_swin", "AgentSwinTransformer", dict(img_size=288, window_size=72, attn_type="AABB", **S, **A), 288),
    "agent_swin_base": ("agent", "agent_swin", "AgentSwinTransformer", dict(window_size=56, attn_type="AAMB2", **B, **A), 224),
    "agent_pvt_tiny": ("agent", "agent_pvt", "agent_pvt_tiny", dict(attn_type="AAAA", agent_sr_ratios="1111", **A), 224),
    "agent_pvt_medium_256": ("agent", "agent_pvt", "agent_pvt_medium", dict(img_size=256, attn_type="AAAA", agent_sr_ratios="1111", **A), 256),
    "agent_deit_tiny": ("agent", "agent_deit", "VisionTransformer", dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=[49] * 4), 224),
    "agent_deit_base": ("agent", "agent_deit", "VisionTransformer", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_layer=4, agent_num=[81] * 4), 224),
    "agent_cswin_tiny": ("agent", "agent_cswin", "Agent_CSWin_64_24181_tiny_224", dict(attn_type="AABB", la_split_size="56-28-14-7", **A), 224),
    "flatten_swin_tiny": ("flatten", "flatten_swin", "FLattenSwinTransformer", dict(depths=[2, 2, 6, 2], window_size=56, attn_type="LLSS"), 224),
    "flatten_pvt_tiny": ("flatten", "flatten_pvt", "flatten_pvt_tiny", dict(attn_type="LLLL", la_sr_ratios="1111"), 224),
    "flatten_pvt_v2_b0": ("flatten", "flatten_pvt_v2", "flatten_pvt_v2_b0", dict(attn_type="LLLL", la_sr_ratios="1111"), 224),
    "flatten_cswin_tiny": ("flatten", "flatten_cswin", "FLatten_CSWin_64_24181_tiny_224", dict(attn_type="LLSS", la_split_size="56-28-14-7"), 224),
    "inline_swin_tiny": ("inline", "inline_swin", "InLineSwin", dict(depths=[2, 2, 6, 2], window_size=56, attn_type="IIIS"), 224),
    "inline_pvt_tiny": ("inline", "inline_pvt", "inline_pvt_tiny", dict(attn_type="IIII", la_sr_ratios="1111"), 224),
    "inline_deit_tiny": ("inline", "inline_deit", "VisionTransformer", dict(patch_size=16, embed_dim=192, depth=12, num_heads=6), 224),
    "inline_cswin_tiny": ("inline", "inline_cswin", "inline_cswin_tiny", dict(attn_type="IISS", la_split_size="56-28-14-7"), 224),
}
MODEL_DIRS = {"agent": "agent_transformer/models", "flatten": "models", "inline": "models"}


def _load_module(repo: Path, family: str, name: str):
    folder = repo / MODEL_DIRS[family]
    package = f"_official_{family}"
    if package not in sys.modules:  # a package, so the files' relative imports (`from .deit import`) work
        spec = importlib.util.spec_from_file_location(package, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
    return importlib.import_module(f"{package}.{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for family in MODEL_DIRS:
        parser.add_argument(f"--{family}", type=Path, required=True, help=f"checkout of the official {family} repository")
    parser.add_argument("variants", nargs="*", default=list(OFFICIAL))
    args = parser.parse_args()

    import zoo

    zoo.list_models()  # register ours before the official files register theirs in timm
    import timm.models
    import timm.models._registry
    import timm.models.registry

    for module in (timm.models, timm.models._registry, timm.models.registry):
        module.register_model = lambda fn: fn  # the official files register names that are ours now
    failures = 0
    for variant in args.variants:
        family, file, ctor, kwargs, size = OFFICIAL[variant]
        module = _load_module(getattr(args, family), family, file)
        torch.manual_seed(0)
        official = getattr(module, ctor)(**kwargs).eval()
        ours = zoo.create_model(variant).eval()
        n_off, n_ours = (sum(p.numel() for p in m.parameters()) for m in (official, ours))
        ours.load_state_dict(official.state_dict(), strict=True)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            diff = float((official(x) - ours(x)).abs().max())
        ok = n_off == n_ours and diff < 1e-4
        failures += not ok
        print(f"{variant:24s} params official {n_off:,} ours {n_ours:,}  strict load ok  max|logit diff| {diff:.1e}"
              f"  {'OK' if ok else 'MISMATCH'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
