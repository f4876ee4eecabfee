"""`zoo train`: the Lightning training script (zoo.lightning.train) from the `zoo` command."""
from __future__ import annotations

import argparse


def cmd_train(args: argparse.Namespace) -> int:
    from zoo.lightning.config import load_config
    from zoo.lightning.data import check_paths
    from zoo.lightning.train import check_model_name, main

    cfg = load_config(args.config, args.overrides)  # bad configs and missing data files: one line, before anything runs
    if not args.print_config:
        check_model_name(cfg)
        check_paths(cfg.data)
    return main(["--config", args.config, *(["--print-config"] if args.print_config else []), *args.overrides], prog="zoo train",
                verbose=args.verbose)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ._common import HelpFormatter

    p = sub.add_parser("train", help="train or fine-tune with Lightning from a YAML config",
                       description="Train with a config (a path, or a shipped name such as classify/vit_mnist.yaml) and "
                       "key=value overrides. Re-running the same command resumes from the last checkpoint.",
                       epilog="""examples:
  zoo train --config classify/vit_mnist.yaml data.path=mnist8k.npz trainer.max_steps=100
  zoo train --config diffusion/dit_s_2_mnist.yaml data.path=mnist8k.npz trainer.devices=2 trainer.strategy=ddp
  zoo train --config diffusion/video_dit_s_2_mmnist.yaml model.kwargs.attention=sla model.checkpoint_path=dense.safetensors
  zoo train --config classify/vit_mnist.yaml --print-config""", formatter_class=HelpFormatter)
    p.add_argument("--config", "-c", required=True, help="YAML config: a path or a shipped name")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (OmegaConf dotlist)")
    p.set_defaults(func=cmd_train)
