"""Compare zoo's MAViT / RAVLT with the official model definitions (a one-off check, not a test).

Needs the official files (qhfan/MALA:classfication_release/model.py, qhfan/RALA:classfication/RALA.py)
and their imports (einops, fvcore, timm). For every variant: the official state dict loads into
ours with strict=True, logits agree at 224 and at a non-square size, params are equal, and
`zoo.flops` is compared with fvcore on the official model.

    python scripts/check_rmt_official.py --mala path/to/model.py --rala path/to/RALA.py [--variants ravlt_tiny ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings

import torch
from fvcore.nn import FlopCountAnalysis

import zoo

OFFICIAL = {
    "mavit_tiny": ("mala", "MALA_T"), "mavit_small": ("mala", "MALA_S"),
    "mavit_base": ("mala", "MALA_B"), "mavit_large": ("mala", "MALA_L"),
    "ravlt_tiny": ("rala", "RAVLT_T"), "ravlt_small": ("rala", "RAVLT_S"),
    "ravlt_base": ("rala", "RAVLT_B"), "ravlt_large": ("rala", "RAVLT_L"),
}


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the official files register their models in timm
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mala", required=True)
    parser.add_argument("--rala", required=True)
    parser.add_argument("--variants", nargs="*", default=list(OFFICIAL))
    parser.add_argument("--no-flops", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    modules = {"mala": _load(args.mala, "official_mala"), "rala": _load(args.rala, "official_rala")}
    torch.manual_seed(0)
    for variant in args.variants:
        family, fn = OFFICIAL[variant]
        official = getattr(modules[family], fn)().eval()
        for p in official.parameters():  # layer scale / BN stats away from their init, so errors show
            p.data.add_(0.02 * torch.randn_like(p))
        for m in official.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        ours = zoo.create_model(variant).eval()
        ours.load_state_dict(official.state_dict(), strict=True)
        line = [variant]
        for size in ((224, 224), (256, 320)):
            x = torch.randn(2, 3, *size)
            with torch.no_grad():
                ref, out = official(x), ours(x)
            line.append(f"{size[0]}x{size[1]} max|diff| {(ref - out).abs().max().item():.2e} (max|logit| {ref.abs().max().item():.2e})")
        params = (sum(p.numel() for p in official.parameters()), sum(p.numel() for p in ours.parameters()))
        line.append(f"params official {params[0]} ours {params[1]}")
        if not args.no_flops:
            with torch.no_grad():
                analysis = FlopCountAnalysis(official, torch.randn(1, 3, 224, 224))
                analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                ref_flops = analysis.total()
            our_flops = zoo.flops(ours)
            line.append(f"flops official(fvcore) {ref_flops} ours {our_flops} ratio {our_flops / ref_flops:.5f}")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
