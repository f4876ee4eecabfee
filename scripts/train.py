"""Train a zoo model: `python scripts/train.py --config classify/nat_mnist.yaml trainer.max_steps=100`.

Same as `zoo train`; see `python scripts/train.py --help`.
"""
import sys

from zoo.lightning.train import main

if __name__ == "__main__":
    sys.exit(main())
