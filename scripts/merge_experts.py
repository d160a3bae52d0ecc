"""Merge a trained MoE's experts into a dense model, without training: a step-0 checkpoint.

  python scripts/merge_experts.py --from=runs/switch_tiny --gin_file=models/dense_tiny.gin \\
      --out=runs/switch_tiny_merged [--uniform] [--usage_from=MODEL_DIR] [--last_steps=200]

The --gin_file model must be the MoE's dense twin (same non-expert shapes, MLP_DIM = the
experts' hidden size, plus the shared experts' if any). Each MoE layer's experts are averaged,
weighted by their usage over the last --last_steps training steps of --usage_from's (default:
--from's) metrics.jsonl, or uniformly with --uniform (moe_jax.train.merging). Then:

  python scripts/eval.py --gin_file=runs/eval.gin \\
      --gin.CHECKPOINT_PATH="'runs/switch_tiny_merged'" \\
      --gin.MIXTURE_OR_TASK_NAME="'tiny_shakespeare_lm'" \\
      --gin.TASK_FEATURE_LENGTHS="{'targets': 128}"
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import cli, gin_utils  # noqa: E402


@cli.entry_point
def main(argv):
  from moe_jax.models import build_network  # pylint: disable=g-import-not-at-top
  from moe_jax.train import merging  # pylint: disable=g-import-not-at-top
  cli.setup_console()
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(cli.TRACEBACK_FLAG, action="store_true", help="show error tracebacks")
  parser.add_argument("--from", dest="source", required=True,
                      help="the MoE: a MODEL_DIR, its checkpoints/ dir or one step directory")
  parser.add_argument("--out", required=True, help="new directory for the merged checkpoint")
  parser.add_argument("--uniform", action="store_true", help="equal weights for every expert")
  parser.add_argument("--usage_from", default=None,
                      help="MODEL_DIR whose metrics.jsonl gives the usage (default: --from's run)")
  parser.add_argument("--last_steps", type=int, default=200,
                      help="usage averaged over the last N training steps logged")
  args, _ = gin_utils.parse_flags(argv, parser)
  usage = None
  if not args.uniform:
    usage_dir = args.usage_from or merging.run_dir(args.source)
    usage = merging.expert_usage(usage_dir, last_steps=args.last_steps)
  report = merging.write_merged_checkpoint(build_network(), args.source, args.out, usage)
  print(f"merged {len(report['merged'])} kernels ({'uniform' if usage is None else 'usage'} "
        f"weights), copied {len(report['copied'])}, fresh {len(report['fresh'])}: "
        f"{os.path.abspath(args.out)}")
  return report


if __name__ == "__main__":
  main()
