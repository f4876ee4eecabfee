"""Parity of zoo.dit with the official facebookresearch/DiT code (models.py, diffusion/).

Usage: git clone https://github.com/facebookresearch/DiT /tmp/DiT
       python scripts/verify_dit_official.py /tmp/DiT

Builds a small random official DiT, loads its state dict into ours unchanged (strict) and
compares: the forward pass, classifier-free guidance (the official 3-channel rule), the
training losses (mse, vb, loss) at given t and noise, the respaced 250-step timesteps, and
one DDPM step through our diffusers scheduler against the official p_mean_variance.
Last run (ed81ce2, CPU fp32): forward, CFG and losses bit-identical; DDPM step 7e-7.
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("official", help="path to a checkout of facebookresearch/DiT")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.official)
    from diffusion import create_diffusion
    from models import DiT as OfficialDiT
    from zoo.dit import DiT, GaussianDiffusion
    from zoo.dit.diffusion import guide, make_scheduler

    torch.manual_seed(0)
    kw = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=96, depth=3, num_heads=3, num_classes=10)
    official = OfficialDiT(**kw).eval()
    with torch.no_grad():  # leave adaLN-Zero so the outputs are not all 0
        for p in official.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ours = DiT(**kw).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    report = {}
    x, t, y = torch.randn(4, 4, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    report["forward"] = (official(x, t, y) - ours(x, t, y)).abs().max().item()

    pair, labels = torch.cat([x[:2], x[:2]]), torch.tensor([1, 2, 10, 10])
    report["cfg (3 channels)"] = (official.forward_with_cfg(pair, t, labels, 4.0)[:2] - guide(ours(pair, t, labels), 4.0, 3)).abs().max().item()

    x0, noise = torch.randn(4, 4, 16, 16).clamp(-1.2, 1.2), torch.randn(4, 4, 16, 16)
    theirs = create_diffusion(timestep_respacing="").training_losses(official, x0, t, dict(y=y), noise=noise)
    mine = GaussianDiffusion(learn_sigma=True).training_losses(ours, x0, y, t=t, noise=noise)
    for key in ("mse", "vb", "loss"):
        report[f"training {key}"] = (theirs[key] - mine[key]).abs().max().item()

    respaced = create_diffusion("250")
    sched = make_scheduler("ddpm")
    sched.set_timesteps(250)
    report["250-step timesteps differ"] = float(sorted(respaced.timestep_map) != sorted(sched.timesteps.tolist()))
    z, j = torch.randn(2, 4, 16, 16), 120
    out = respaced.p_mean_variance(respaced._wrap_model(official), z, torch.tensor([j, j]), clip_denoised=False, model_kwargs=dict(y=y[:2]))
    t_orig = respaced.timestep_map[j]
    step = sched.step(ours(z, torch.tensor([t_orig, t_orig]), y[:2]), t_orig, z, generator=torch.Generator().manual_seed(0)).prev_sample
    want = out["mean"] + torch.exp(0.5 * out["log_variance"]) * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    report["ddpm step"] = (step - want).abs().max().item()
    for name, value in report.items():
        print(f"{name:28s} max abs diff {value:.3g}")
    return 0 if max(report.values()) < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
