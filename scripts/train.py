"""Train a model (T5X-style flags).

  python scripts/train.py --gin_file=models/switch_tiny.gin --gin_file=runs/pretrain.gin \
      --gin.MODEL_DIR="'runs/switch_tiny'" --gin.TRAIN_STEPS=200 [--gin.NAME=VALUE ...]

Restarting the same command resumes from MODEL_DIR's newest complete checkpoint.

Multi-host (one process per host, all running the same command): `--multiprocess` lets
`jax.distributed.initialize()` find the cluster (TPU pods, SLURM, ...); or name it with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from moe_jax import gin_utils  # noqa: E402
from moe_jax.train import trainer  # noqa: E402


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--multiprocess", action="store_true",
                      help="call jax.distributed.initialize() (cluster auto-detection)")
  parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args, _ = gin_utils.parse_flags(argv, parser)  # gin errors surface before any device work
  if args.multiprocess or args.coordinator_address:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  trainer.train()


if __name__ == "__main__":
  main(sys.argv[1:])
