"""Train a model (T5X-style flags).

  python scripts/train.py --gin_file=models/switch_tiny.gin --gin_file=runs/pretrain.gin \
      --gin.MODEL_DIR="'runs/switch_tiny'" --gin.TRAIN_STEPS=200 [--gin.NAME=VALUE ...]

Restarting the same command resumes from MODEL_DIR's newest complete checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import gin_utils  # noqa: E402
from moe_jax.train import trainer  # noqa: E402


def main(argv):
  gin_utils.parse_flags(argv)
  trainer.train()


if __name__ == "__main__":
  main(sys.argv[1:])
