"""Describe a configured model without allocating it.

  python scripts/model_info.py --gin_file=configs/models/switch_base.gin [--gin.NAME=VALUE ...] [--json]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import gin_utils  # noqa: E402
from moe_jax.models import build_network  # noqa: E402
from moe_jax.models.summary import format_summary, summarize  # noqa: E402


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args, _ = gin_utils.parse_flags(argv, parser)
  info = summarize(build_network())
  print(json.dumps(info) if args.json else format_summary(info))


if __name__ == "__main__":
  main(sys.argv[1:])
