"""MoE -> dense distillation: how much of the MoE's quality gain a distilled dense model keeps.

  python benchmarks/distill.py --teacher_dir=runs/quality/lm/switch_e8/main/seed0 \\
      --dense_dir=runs/quality/lm/dense/main/seed0 [--student_dir=DIR] [--eval_steps=N]
  python benchmarks/distill.py --quick   # trains its own tiny teacher and baseline first

Switch Transformer (Fedus, Zoph & Shazeer 2021, arXiv:2101.03961, sec. 5, table 6): a dense
student initialised from the MoE teacher's non-expert weights and trained on 0.25 * CE(teacher
probabilities) + 0.75 * CE(labels) kept ~30% of the MoE's gain over the dense baseline.

The teacher and the dense baseline are finished runs with the same run settings (e.g. two arms
of benchmarks/quality.py's LM study, same seed). The student is the dense run's recorded
config.gin (architecture, steps, batch, task, optimizer, seed) plus runs/distill.gin's
additions (moe_jax.train.distill), in --student_dir (rerunning resumes it). The three are
evaluated on the same validation batches (the dense run's task, lengths and batch; --eval_steps
batches, default its EVAL_STEPS). Fraction of the gain kept = (dense - student) / (dense -
teacher) on the cross entropy: the MoE's aux losses have no dense counterpart. Unless
--no_control, a fourth model separates the two ingredients (the paper's table 6 ablates them
too): the dense run's config initialised from the teacher's non-expert weights, trained on the
labels only (in --student_dir + "_init_only"). Writes --json
(benchmarks/results/distill.json; distill_quick.json with --quick) and prints a table.
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
SETTINGS = ("mixture_or_task_name", "task_feature_lengths", "batch_size", "train_steps", "seed",
            "eval_steps")
# --quick: CPU-sized runs of the tiny configs (a step well under a second each).
QUICK = ["BATCH_SIZE = 16", "TASK_FEATURE_LENGTHS = {'targets': 64}", "EVAL_PERIOD = 0",
         "LOG_EVERY = 25", "EVAL_STEPS = 8", "MESH_SHAPE = (1, 1, 1)"]


def run_settings(config_path: str) -> dict:
  """train()'s SETTINGS as a recorded config.gin binds them (macros resolved)."""
  import gin  # pylint: disable=g-import-not-at-top
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin([config_path])
  out = {}
  for name in SETTINGS:
    value = gin.query_parameter(f"train.{name}")
    while isinstance(value, gin.config.ConfigurableReference):  # %MACRO
      value = value.scoped_configurable_fn()
    out[name] = value
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher_dir", help="MODEL_DIR of the trained MoE teacher")
  parser.add_argument("--dense_dir", help="MODEL_DIR of the dense baseline (same run settings)")
  parser.add_argument("--student_dir", default=None,
                      help="MODEL_DIR of the distilled student (default: runs/distilled/<the "
                      "dense dir's name>; a temporary directory with --quick)")
  parser.add_argument("--quick", action="store_true",
                      help="train models/switch_tiny.gin and models/dense_tiny.gin for "
                      "--quick_steps first (batch 16 x 64)")
  parser.add_argument("--quick_steps", type=int, default=100)
  parser.add_argument("--eval_steps", type=int, default=None)
  parser.add_argument("--teacher_weight", type=float, default=0.25)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                      help="also train the init-only control (teacher's weights, no soft loss)")
  parser.add_argument("--json", default=None)
  parser.add_argument("--keep_work", action="store_true",
                      help="--quick: keep the temporary runs (printed at the end)")
  args = parser.parse_args()
  if args.quick == bool(args.teacher_dir or args.dense_dir):
    parser.error("give --teacher_dir and --dense_dir, or --quick")
  if not args.quick and not (args.teacher_dir and args.dense_dir):
    parser.error("give both --teacher_dir and --dense_dir")
  out_json = args.json or os.path.join(RESULTS, "distill_quick.json" if args.quick else
                                       "distill.json")

  cli.setup_console()
  cli.import_tensorflow_quietly()
  importlib.import_module("moe_jax.data")  # tasks registered before gin locks its config
  from moe_jax import gin_utils, inference  # pylint: disable=g-import-not-at-top
  from moe_jax.train import trainer  # pylint: disable=g-import-not-at-top

  work = tempfile.mkdtemp(prefix="distill_bench_") if args.quick else None
  seconds = {}

  def train(name, files, bindings):
    start = time.perf_counter()
    gin_utils.parse_gin(files, bindings)
    trainer.train()
    seconds[name] = time.perf_counter() - start

  teacher_dir, dense_dir = args.teacher_dir, args.dense_dir
  if args.quick:
    teacher_dir, dense_dir = os.path.join(work, "teacher"), os.path.join(work, "dense")
    for name, model_dir, model in (("teacher", teacher_dir, "switch_tiny"),
                                   ("dense", dense_dir, "dense_tiny")):
      train(name, [f"models/{model}.gin", "runs/pretrain.gin"],
            QUICK + [f"TRAIN_STEPS = {args.quick_steps}", f"MODEL_DIR = '{model_dir}'"])
  configs = {}
  for name, model_dir in (("teacher", teacher_dir), ("dense", dense_dir)):
    configs[name] = gin_utils.recorded_config(model_dir)
    if configs[name] is None:
      parser.error(f"--{name}_dir {model_dir!r} has no recorded config.gin")
  settings = run_settings(configs["dense"])
  differ = {k: (v, settings[k]) for k, v in run_settings(configs["teacher"]).items()
            if v != settings[k] and k != "eval_steps"}
  if differ:
    print(f"warning: the teacher's and the dense baseline's run settings differ (teacher, "
          f"dense): {differ}", file=sys.stderr)

  student_dir = args.student_dir or (os.path.join(work, "student") if args.quick else
                                     os.path.join("runs", "distilled",
                                                  os.path.basename(dense_dir.rstrip("/"))))
  train("student", [configs["dense"]], [
      f"train.model_dir = '{student_dir}'", f"train.initial_checkpoint_path = '{teacher_dir}'",
      "train.distillation = @Distillation()", f"Distillation.teacher_checkpoint = '{teacher_dir}'",
      f"Distillation.teacher_weight = {args.teacher_weight}",
      f"Distillation.temperature = {args.temperature}"])
  models = [("teacher", teacher_dir), ("dense", dense_dir), ("student", student_dir)]
  if args.control:
    models.append(("init_only", student_dir.rstrip("/") + "_init_only"))
    train("init_only", [configs["dense"]], [f"train.model_dir = '{models[-1][1]}'",
                                            f"train.initial_checkpoint_path = '{teacher_dir}'"])

  eval_steps = args.eval_steps or settings["eval_steps"]
  eval_dir = tempfile.mkdtemp(prefix="distill_eval_")
  rows = {}
  for name, model_dir in models:
    gin_utils.parse_gin([gin_utils.recorded_config(model_dir), "runs/eval.gin"], [
        f"MIXTURE_OR_TASK_NAME = '{settings['mixture_or_task_name']}'",
        f"TASK_FEATURE_LENGTHS = {settings['task_feature_lengths']!r}",
        f"BATCH_SIZE = {settings['batch_size']}", f"EVAL_STEPS = {eval_steps}",
        f"CHECKPOINT_PATH = '{model_dir}'", f"evaluate.output_dir = '{eval_dir}'"])
    metrics = inference.evaluate()
    rows[name] = {"model_dir": os.path.abspath(model_dir),
                  **{k: metrics[k] for k in ("cross_entropy", "loss", "accuracy")}}
  shutil.rmtree(eval_dir, ignore_errors=True)

  ce = {name: row["cross_entropy"] for name, row in rows.items()}
  gain = ce["dense"] - ce["teacher"]
  result = {
      "quick": args.quick, "settings": settings, "eval_batches": eval_steps,
      "teacher_weight": args.teacher_weight, "temperature": args.temperature,
      "models": rows, "train_seconds": seconds,
      "moe_gain": gain,
      # None when the teacher is no better than the baseline: no gain to keep.
      "fraction_of_gain_kept": (ce["dense"] - ce["student"]) / gain if gain > 0 else None,
      "fraction_of_gain_kept_init_only": ((ce["dense"] - ce["init_only"]) / gain
                                          if gain > 0 and "init_only" in ce else None),
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
      "devices": [str(d) for d in jax.devices()],
  }
  os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
  with open(out_json, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nvalidation ({eval_steps} batches of {settings['batch_size']} x "
        f"{settings['task_feature_lengths']}, {settings['mixture_or_task_name']}), "
        f"{settings['train_steps']} training steps each")
  print("| model | cross entropy | loss | accuracy |")
  print("|---|---:|---:|---:|")
  for name, row in rows.items():
    print(f"| {name} | {row['cross_entropy']:.4f} | {row['loss']:.4f} | "
          f"{row['accuracy']:.4f} |")
  percent = lambda f: "n/a" if f is None else f"{100 * f:.1f}%"
  print(f"MoE gain over dense: {gain:.4f} nats; the student keeps "
        f"{percent(result['fraction_of_gain_kept'])} of it (Switch Transformer: ~30%), the "
        f"init-only control {percent(result['fraction_of_gain_kept_init_only'])}")
  if gain <= 0:
    print("warning: the teacher is not better than the dense baseline here: the fraction is "
          "meaningless", file=sys.stderr)
  print(f"written to {out_json}")
  if work and not args.keep_work:
    shutil.rmtree(work, ignore_errors=True)
  elif work:
    print(f"runs kept in {work}")


if __name__ == "__main__":
  main()
