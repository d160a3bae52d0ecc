"""Evaluate a checkpoint (loss, accuracy, BLEU for translation); T5X-style flags.

  python scripts/eval.py --gin_file=models/switch_t5_tiny.gin --gin_file=runs/eval.gin \
      --gin.CHECKPOINT_PATH="'runs/t5_tiny_mt'" [--gin.NAME=VALUE ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import gin_utils, inference  # noqa: E402


def main(argv):
  gin_utils.parse_flags(argv)
  inference.evaluate()


if __name__ == "__main__":
  main(sys.argv[1:])
