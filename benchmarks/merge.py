"""Expert merging (MoE -> dense): how much of a trained MoE survives averaging its experts.

  python benchmarks/merge.py --moe_dir=runs/quality/lm/switch_e8/main/seed0 \\
      [--dense_gin=models/dense_tiny.gin] [--finetune_steps=200] [--eval_steps=20]
  python benchmarks/merge.py --quick   # trains its own switch_tiny for 100 steps first

On the validation split of --task (--eval_steps batches of --batch_size x --length, the same
batches for every model): the cross entropy and accuracy of (1) the MoE of --moe_dir (its
recorded config.gin), (2) the dense model --dense_gin (the MoE's dense twin) initialised by
merging each layer's experts (moe_jax.train.merging), with uniform and with usage-weighted
averages (usage: the MoE run's metrics.jsonl), without training, (3) each after
--finetune_steps steps of runs/merge.gin's recipe (constant Adafactor 1e-3; the usage-weighted
one through train.merge_experts=True itself, the uniform one from its step-0 checkpoint),
(4) the MoE fine-tuned as many steps by the same recipe (the same extra compute), and (5) the
dense model trained from scratch for as many steps (runs/pretrain.gin's recipe), the
floor that merging should beat. Cross entropy, not the total loss: the MoE's aux losses have no
dense counterpart. Writes --json (benchmarks/results/merge.json; merge_quick.json with --quick)
and prints a table.
"""

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from moe_jax import cli  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--moe_dir", help="MODEL_DIR of a trained MoE (with config.gin and "
                      "metrics.jsonl); not with --quick")
  parser.add_argument("--dense_gin", default="models/dense_tiny.gin")
  parser.add_argument("--quick", action="store_true",
                      help="train models/switch_tiny.gin for --moe_steps first, in a temp dir")
  parser.add_argument("--moe_steps", type=int, default=100, help="--quick's MoE training steps")
  parser.add_argument("--finetune_steps", type=int, default=None,
                      help="fine-tuning (and from-scratch) steps; default 200, 50 with --quick")
  parser.add_argument("--eval_steps", type=int, default=None,
                      help="validation batches; default 20, 8 with --quick")
  parser.add_argument("--task", default="tiny_shakespeare_lm")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--json", default=None)
  parser.add_argument("--keep_work", action="store_true",
                      help="keep the temporary checkpoints (printed at the end)")
  args = parser.parse_args()
  if args.quick == bool(args.moe_dir):
    parser.error("give exactly one of --moe_dir and --quick")
  finetune_steps = args.finetune_steps or (50 if args.quick else 200)
  eval_steps = args.eval_steps or (8 if args.quick else 20)
  out_json = args.json or os.path.join(RESULTS, "merge_quick.json" if args.quick else "merge.json")

  cli.setup_console()
  cli.import_tensorflow_quietly()
  # Tasks and their configurables registered before gin locks its config.
  importlib.import_module("moe_jax.data")
  from moe_jax import gin_utils, inference  # pylint: disable=g-import-not-at-top
  from moe_jax.models import build_network  # pylint: disable=g-import-not-at-top
  from moe_jax.train import merging, trainer  # pylint: disable=g-import-not-at-top

  lengths = f"TASK_FEATURE_LENGTHS = {{'targets': {args.length}}}"
  common = [f"MIXTURE_OR_TASK_NAME = '{args.task}'", lengths, f"BATCH_SIZE = {args.batch_size}"]
  work = tempfile.mkdtemp(prefix="merge_bench_")

  def train(files, model_dir, steps, *bindings):
    gin_utils.parse_gin(files, common + [f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {steps}",
                                         f"CHECKPOINT_PERIOD = {steps}", "EVAL_PERIOD = 0",
                                         f"LOG_EVERY = {max(steps // 5, 1)}", *bindings])
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start

  def evaluate(model_files, checkpoint_path):
    gin_utils.parse_gin(model_files + ["runs/eval.gin"], common + [
        f"CHECKPOINT_PATH = '{checkpoint_path}'", f"EVAL_STEPS = {eval_steps}",
        f"evaluate.output_dir = '{os.path.join(work, 'eval')}'"])
    metrics = inference.evaluate()
    return {k: metrics[k] for k in ("cross_entropy", "accuracy")}

  moe_dir, moe_files = args.moe_dir, None
  if args.quick:
    moe_dir = os.path.join(work, "moe")
    train(["models/switch_tiny.gin", "runs/pretrain.gin"], moe_dir, args.moe_steps)
  recorded = gin_utils.recorded_config(moe_dir)
  if recorded is None:
    parser.error(f"{moe_dir} has no recorded config.gin")
  moe_files = [recorded]
  rows = [{"model": "moe", "weights": None, "steps": 0, **evaluate(moe_files, moe_dir)}]

  gin_utils.parse_gin([args.dense_gin])
  network = build_network()
  usage = merging.expert_usage(moe_dir)
  merged = {}
  for weights, layer_usage in (("uniform", None), ("usage", usage)):
    merged[weights] = os.path.join(work, f"merged_{weights}")
    merging.write_merged_checkpoint(network, moe_dir, merged[weights], layer_usage)
    rows.append({"model": "merged dense", "weights": weights, "steps": 0,
                 **evaluate([args.dense_gin], merged[weights])})

  for weights in ("uniform", "usage"):
    model_dir = os.path.join(work, f"finetuned_{weights}")
    init = ([f"INITIAL_CHECKPOINT_PATH = '{moe_dir}'"] if weights == "usage" else
            [f"INITIAL_CHECKPOINT_PATH = '{merged[weights]}'", "train.merge_experts = False"])
    seconds = train([args.dense_gin, "runs/merge.gin"], model_dir, finetune_steps, *init)
    rows.append({"model": "merged dense, fine-tuned", "weights": weights,
                 "steps": finetune_steps, "train_seconds": seconds,
                 **evaluate([args.dense_gin], model_dir)})
  # The same extra steps for the MoE itself: what the merged model's fine-tuning competes with.
  seconds = train(moe_files + ["runs/merge.gin"], os.path.join(work, "moe_finetuned"),
                  finetune_steps, f"INITIAL_CHECKPOINT_PATH = '{moe_dir}'",
                  "train.merge_experts = False")
  rows.append({"model": "moe, fine-tuned", "weights": None, "steps": finetune_steps,
               "train_seconds": seconds,
               **evaluate(moe_files, os.path.join(work, "moe_finetuned"))})
  scratch = os.path.join(work, "scratch")
  seconds = train([args.dense_gin, "runs/pretrain.gin"], scratch, finetune_steps)
  rows.append({"model": "dense from scratch", "weights": None, "steps": finetune_steps,
               "train_seconds": seconds, **evaluate([args.dense_gin], scratch)})

  result = {
      "moe_dir": None if args.quick else os.path.abspath(moe_dir),
      "moe": (f"models/switch_tiny.gin, {args.moe_steps} steps (--quick)" if args.quick
              else recorded),
      "dense_gin": args.dense_gin, "task": args.task, "batch_size": args.batch_size,
      "length": args.length, "eval_batches": eval_steps, "finetune_steps": finetune_steps,
      "usage": {layer: [round(float(u), 4) for u in fractions]
                for layer, fractions in usage.items()},
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "devices": [str(d) for d in jax.devices()],
      "rows": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
  with open(out_json, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nvalidation cross entropy ({eval_steps} batches of {args.batch_size} x {args.length}, "
        f"{args.task})")
  print("| model | expert weights | steps | cross entropy | accuracy |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['model']} | {r['weights'] or '-'} | {r['steps']} | {r['cross_entropy']:.4f} | "
          f"{r['accuracy']:.4f} |")
  print(f"written to {out_json}")
  if args.keep_work:
    print(f"checkpoints kept in {work}")
  else:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
