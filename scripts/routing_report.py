"""Routing report of a run: `moe_jax.routing_report` (run with --help for the flags).

  python scripts/routing_report.py MODEL_DIR [--out DIR] [--split validation] [--max_batches N]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import cli  # noqa: E402


@cli.entry_point
def main(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model_dir", help="a training MODEL_DIR (metrics.jsonl, config.gin, "
                      "checkpoints/)")
  parser.add_argument("--out", default=None, help="output directory (MODEL_DIR/routing_report)")
  parser.add_argument("--split", default="validation", help="split of the run's task")
  parser.add_argument("--max_batches", type=int, default=20, help="batches of --batch_size")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument(cli.TRACEBACK_FLAG, action="store_true", help="show errors' tracebacks")
  args = parser.parse_args(argv)
  cli.setup_console()
  cli.import_tensorflow_quietly()
  from moe_jax import routing_report  # pylint: disable=g-import-not-at-top
  result = routing_report.routing_report(args.model_dir, args.out, args.split, args.max_batches,
                                         args.batch_size)
  print(f"routing report: {result['report']}", flush=True)
  return result


if __name__ == "__main__":
  main()
