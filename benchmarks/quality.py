"""Does MoE buy quality per FLOP here? Dense vs MoE at equal active FLOPs per token, 3+ seeds.

  .venv/bin/python benchmarks/quality.py --study lm      [--stage all|tune|report]
  .venv/bin/python benchmarks/quality.py --study facts   [--seeds 3] [--stop_after_minutes M]
  .venv/bin/python benchmarks/quality.py --study lm --quick   # plumbing check, a few minutes

Every run is `scripts/train.py` in a subprocess (gin files + bindings, its own MODEL_DIR under
`--runs_dir`, default runs/quality/<study>/...): stop the script at any time (Ctrl-C, a kill, or
`--stop_after_minutes`) and rerun the same command to continue every run from its last checkpoint
(the trainer's exact resume); finished runs are skipped. `--stage report` only collects.
`--workers N` trains N runs at a time, each pinned (taskset) to its own share of the CPUs, so that
every run's wall-clock is measured under the same conditions; the summary lists the CPUs per run.

Studies (batch, steps and models are below in STUDIES; the models are configs/models/*.gin with
the bindings listed, expert width = the dense d_ff / experts per token, so that every arm has the
dense baseline's active FLOPs per token):
- lm: byte-level `tiny_shakespeare_lm`, eval cross entropy (settings picked by the total eval
  loss, aux terms in). A tuning stage first, the same budget for
  every arm: TUNE_RUNS short runs (seed 0) each. Learning rate x {0.5, 1, 2} of runs/pretrain.gin's
  (rsqrt, 0.01 for the first 10k steps), then at the best of those: MoE arms try capacity factor
  2.0, aux-loss weight 0.1 and expert dropout 0.1; the dense arm tries learning rate x {0.25, 4}
  and dropout 0.1. Each arm's main runs use its best tuning run's settings. The routing-literature
  routers are screened at their default settings (their lr x1 tuning run) and the two best are
  tuned and run like the others.
- facts: `synthetic_facts` (runs/facts.gin: value-token loss, exact recall at every evaluation).
  No tuning stage; after the main runs, seed-0 probes of why a model falls short (Study.probes:
  more capacity, another learning rate), reported beside the summary.

Outputs (`--results_dir`, default benchmarks/results): quality_<study>.json (settings, tuning
runs, every run's curve as records {study, model, seed, step, metric, value, wall_s}, the summary
table, total seconds of the subprocesses), quality_<study>.png (the metric against steps and
against training seconds, seed mean and min-max band); the summary table goes to stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import queue
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax import curves  # noqa: E402

Bindings = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  model_gin: str
  bindings: Bindings = ()
  moe: bool = True


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  run_gin: str
  bindings: Bindings
  arms: Tuple[Arm, ...]          # always run
  candidates: Tuple[Arm, ...]    # screened; the best `num_picked` join the arms
  num_picked: int
  steps: int
  eval_period: int
  tune_steps: int                # 0: no tuning stage
  metric: str                    # picks the screened and tuned settings
  higher_is_better: bool
  baseline: str = "dense"
  # The table's, plot's and steps-to-baseline's metric (None: `metric`).
  report_metric: Optional[str] = None
  plot_from_step: Optional[int] = None  # the plot's y axis spans the curves from this step on
  extra_metrics: Tuple[str, ...] = ()
  # Diagnostics after the main runs, seed 0 only: (arm, variant, bindings on top of the arm's).
  probes: Tuple[Tuple[str, str, Bindings], ...] = ()

  @property
  def shown_metric(self) -> str:
    return self.report_metric or self.metric


LM_ARMS = (
    Arm("dense", "dense_tiny", moe=False),
    Arm("switch_e8", "switch_tiny"),
    Arm("switch_e32", "switch_tiny", ("NUM_EXPERTS = 32",)),
    Arm("top2_e8", "top2_tiny", ("EXPERT_MLP_DIM = 128",)),
)
LM_CANDIDATES = (
    Arm("noisy_top2_e8", "noisy_topk_tiny", ("EXPERT_MLP_DIM = 128",)),
    Arm("hierarchical_e16", "hierarchical_tiny", ("EXPERT_MLP_DIM = 64",)),  # 2 x 2 per token
    Arm("cosine_e8", "cosine_tiny"),
    Arm("sigmoid_auxfree_e8", "sigmoid_auxfree_tiny", ("EXPERT_MLP_DIM = 128",)),
    Arm("deepseek_e16", "deepseek_tiny", ("EXPERT_MLP_DIM = 64",)),  # 3 routed + 1 shared
)
STUDIES = {
    "lm": Study(
        name="lm", run_gin="runs/pretrain.gin",
        bindings=("BATCH_SIZE = 16", "TASK_FEATURE_LENGTHS = {'targets': 128}",
                  "EVAL_STEPS = 20"),
        arms=LM_ARMS, candidates=LM_CANDIDATES, num_picked=2, steps=2000, eval_period=200,
        # The picks were made by the total eval loss, i.e. with each arm's weighted aux loss
        # in it (0.01-0.02 at aux weight 0.01, ~0.1-0.2 at 0.1), as these runs were done; the
        # quality reported is the cross entropy alone (README: what it would have picked).
        tune_steps=600, metric="eval/loss", higher_is_better=False,
        report_metric="eval/cross_entropy", extra_metrics=("eval/loss", "eval/accuracy", "loss"),
        plot_from_step=600),
    "facts": Study(
        name="facts", run_gin="runs/facts.gin",
        bindings=("BATCH_SIZE = 128", "NUM_FACTS = 10000"),
        arms=(Arm("dense", "dense_tiny", moe=False), Arm("switch_e8", "switch_tiny"),
              Arm("switch_e32", "switch_tiny", ("NUM_EXPERTS = 32",))),
        candidates=(), num_picked=0, steps=4000, eval_period=250, tune_steps=0,
        metric="eval/exact_recall", higher_is_better=True,
        extra_metrics=("eval/loss", "eval/value_token_accuracy", "loss"),
        # Why 8 experts miss 0.5x the steps: token drops (train capacity 1.25 drops ~3%) or
        # the optimiser (the learning rate is pretrain.gin's, untuned here)?
        probes=(("switch_e8", "cf2", ("MoeLayer.train_capacity_factor = 2.0",)),
                ("switch_e8", "lr2", ("rsqrt_schedule.base_learning_rate = 2.0",)),
                ("dense", "lr2", ("rsqrt_schedule.base_learning_rate = 2.0",)))),
}
LR = "rsqrt_schedule.base_learning_rate"
TUNE_LRS = (0.5, 1.0, 2.0)
# After the best of TUNE_LRS: the knobs a practitioner turns (the same number for every arm).
MOE_KNOBS = (("cf2", ("MoeLayer.train_capacity_factor = 2.0",)),
             ("aux0.1", ("moe_loss_terms.aux_loss_factor = 0.1",)),
             ("edrop0.1", ("EXPERT_DROPOUT_RATE = 0.1",)))
DENSE_KNOBS = (("lr0.25", None), ("lr4", None), ("drop0.1", ("DROPOUT_RATE = 0.1",)))
TUNE_RUNS = len(TUNE_LRS) + len(MOE_KNOBS)
assert len(MOE_KNOBS) == len(DENSE_KNOBS)
_MODEL_LINE = re.compile(r"Model \S+: ([\d,]+) parameters, ([\d,]+) active per token")


class Deadline(Exception):
  pass


class Runner:
  """Runs (and resumes) scripts/train.py subprocesses, each until done or the deadline."""

  def __init__(self, study: Study, runs_dir: str, deadline: Optional[float],
               dry: bool = False, workers: int = 1):
    self.study, self.runs_dir, self.deadline, self.dry = study, runs_dir, deadline, dry
    self.workers = workers
    # With several workers each run is pinned to its own share of the CPUs, so that every run
    # of a study trains (and is timed) under the same conditions.
    self.slots: "queue.Queue[Optional[List[int]]]" = queue.Queue()
    cpus = sorted(os.sched_getaffinity(0))
    if workers > len(cpus):
      raise ValueError(f"--workers={workers} exceeds the {len(cpus)} CPUs this process may use")
    for w in range(workers):
      self.slots.put(cpus[w::workers] if workers > 1 else None)

  def map(self, fn: Callable, items: Sequence) -> list:
    """fn over items, `workers` at a time; a Deadline in any of them is raised after all end."""
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      futures = [pool.submit(fn, item) for item in items]
      concurrent.futures.wait(futures)
    errors = [f.exception() for f in futures if f.exception() is not None]
    for error in errors:
      if not isinstance(error, Deadline):
        raise error
    if errors:
      raise Deadline()
    return [f.result() for f in futures]

  def run_dir(self, arm: str, variant: str, seed: int) -> str:
    return os.path.join(self.runs_dir, self.study.name, arm, variant, f"seed{seed}")

  def run(self, arm: Arm, variant: str, bindings: Bindings, seed: int, steps: int) -> str:
    model_dir = self.run_dir(arm.name, variant, seed)
    if self.dry or os.path.isdir(os.path.join(model_dir, "checkpoints", str(steps))):
      return model_dir  # dry (--stage report): whatever the run has logged so far
    if self.deadline is not None and time.time() >= self.deadline:
      raise Deadline()
    os.makedirs(model_dir, exist_ok=True)
    study = self.study
    flags = [f"--gin_file=models/{arm.model_gin}.gin", f"--gin_file={study.run_gin}",
             f"--gin.MODEL_DIR={model_dir!r}", f"--gin.RANDOM_SEED={seed}",
             f"--gin.TRAIN_STEPS={steps}", f"--gin.EVAL_PERIOD={study.eval_period}",
             "--gin.LOG_EVERY=50", f"--gin.CHECKPOINT_PERIOD={study.eval_period}",
             "--gin.train.keep_checkpoints=1", "--gin.train.tensorboard=False"]
    flags += [f"--gin.{b.replace(' ', '')}" for b in study.bindings + arm.bindings + bindings]
    cpus = self.slots.get()
    print(f"[{time.strftime('%H:%M:%S')}] {study.name} {arm.name} {variant} seed {seed}: "
          f"{steps} steps -> {model_dir}" + (f" (CPUs {cpus})" if cpus else ""), flush=True)
    pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus is not None else []
    start = time.time()
    try:
      with open(os.path.join(model_dir, "train.log"), "a") as log:
        proc = subprocess.Popen(
            pin + [sys.executable, os.path.join(ROOT, "scripts", "train.py")] + flags,
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
          left = None if self.deadline is None else max(self.deadline - time.time(), 1.0)
          rc = proc.wait(timeout=left)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
          proc.terminate()  # resumable: the next invocation continues from the last checkpoint
          proc.wait()
          raise Deadline() from None
    finally:
      _add_seconds(model_dir, time.time() - start,
                   len(cpus) if cpus else len(os.sched_getaffinity(0)))
      self.slots.put(cpus)
    if rc != 0:
      raise RuntimeError(f"{model_dir}: scripts/train.py exited with {rc}; see its train.log")
    return model_dir


def _add_seconds(model_dir: str, seconds: float, num_cpus: int) -> None:
  """Adds to the run's subprocess seconds and notes how many CPUs it had (per invocation)."""
  path = os.path.join(model_dir, "subprocess_seconds.json")
  done = json.load(open(path)) if os.path.exists(path) else {"seconds": 0.0}
  with open(path, "w") as f:
    json.dump({"seconds": done["seconds"] + seconds,
               "num_cpus": sorted(set(done.get("num_cpus", [])) | {num_cpus})}, f)


def _final(model_dir: str, metric: str) -> Optional[float]:
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  points = curves.run_curves(curves.read_jsonl(path), [metric])[metric]
  return points[-1][1] if points else None


def _reported(study: Study, model_dir: str) -> dict:
  """{"reported": final report_metric} where the study reports another metric than it picks by."""
  if study.report_metric is None:
    return {}
  return {"reported": _final(model_dir, study.report_metric)}


def _rank(study: Study, value: Optional[float]) -> tuple:
  """Sort key: best first, runs without a value last."""
  return (value is None, 0.0 if value is None else -value if study.higher_is_better else value)


def tune(runner: Runner, arm: Arm) -> Tuple[str, Bindings, List[dict]]:
  """Runs the arm's TUNE_RUNS short runs (seed 0); returns the best (variant, bindings, rows)."""
  study, rows = runner.study, []

  def one(variant: str, bindings: Bindings) -> None:
    model_dir = runner.run(arm, variant, bindings, 0, study.tune_steps)
    rows.append(dict(model=arm.name, variant=variant, bindings=list(bindings),
                     final=_final(model_dir, study.metric),
                     **_reported(study, model_dir)))

  for lr in TUNE_LRS:
    one(f"lr{lr:g}", (f"{LR} = {lr}",))
  best = min(rows, key=lambda r: _rank(study, r["final"]))
  best_lr = tuple(best["bindings"])
  for variant, bindings in (MOE_KNOBS if arm.moe else DENSE_KNOBS):
    if bindings is None:  # the dense arm's extra learning rates
      one(variant, (f"{LR} = {float(variant[2:])}",))
    else:
      one(f"{best['variant']}_{variant}", best_lr + bindings)
  best = min(rows, key=lambda r: _rank(study, r["final"]))
  return best["variant"], tuple(best["bindings"]), rows


def screen(runner: Runner) -> Tuple[List[Arm], List[dict]]:
  """The candidates' default-settings (lr x1) tuning runs; the best `num_picked` of them."""
  study = runner.study
  def one(arm: Arm) -> dict:
    model_dir = runner.run(arm, "lr1", (f"{LR} = 1.0",), 0, study.tune_steps)
    return dict(model=arm.name, final=_final(model_dir, study.metric),
                **_reported(study, model_dir))

  rows = runner.map(one, study.candidates)
  order = sorted(range(len(rows)), key=lambda i: _rank(study, rows[i]["final"]))
  return [study.candidates[i] for i in order[:study.num_picked]], rows


def collect(runner: Runner, chosen: Dict[str, Tuple[str, Bindings]], seeds: Sequence[int],
            tuning: List[dict], screening: List[dict], results_dir: str) -> dict:
  study = runner.study
  shown = study.shown_metric
  metrics = tuple(dict.fromkeys((shown, study.metric) + study.extra_metrics))
  records, seconds, sizes, num_cpus = [], 0.0, {}, {}
  for root, _, files in os.walk(os.path.join(runner.runs_dir, study.name)):
    if "subprocess_seconds.json" in files:
      seconds += json.load(open(os.path.join(root, "subprocess_seconds.json")))["seconds"]
  for name, (variant, _) in chosen.items():
    for seed in seeds:
      model_dir = runner.run_dir(name, "main", seed)
      path = os.path.join(model_dir, "metrics.jsonl")
      if os.path.exists(path):
        records += curves.records(study.name, name, seed, path, metrics)
        match = _MODEL_LINE.search(open(os.path.join(model_dir, "train.log")).read())
        if match:
          sizes[name] = [int(g.replace(",", "")) for g in match.groups()]
        timing = os.path.join(model_dir, "subprocess_seconds.json")
        if os.path.exists(timing):  # runs from before the record of CPUs: none listed
          num_cpus.setdefault(name, set()).update(json.load(open(timing)).get("num_cpus", []))
  models = list(chosen)
  summary = curves.summarize(records, models, shown, study.baseline,
                             study.higher_is_better)
  for row in summary:
    row["params"], row["active_params_per_token"] = sizes.get(row["model"], (None, None))
    row["settings"] = chosen[row["model"]][0]
    row["cpus_per_run"] = sorted(num_cpus.get(row["model"], ()))
  probe_records = []
  for name, variant, _ in study.probes:
    path = os.path.join(runner.run_dir(name, variant, 0), "metrics.jsonl")
    if os.path.exists(path):
      probe_records += curves.records(study.name, f"{name}:{variant}", 0, path, metrics)
  probes = [row for row in curves.summarize(
      records + probe_records, [study.baseline] + [f"{name}:{variant}" for name, variant, _
                                                   in study.probes],
      shown, study.baseline, study.higher_is_better) if row["model"] != study.baseline]
  os.makedirs(results_dir, exist_ok=True)
  out = dict(study=study.name, settings=dataclasses.asdict(study), tuning=tuning,
             screening=screening, chosen={k: list(v[1]) for k, v in chosen.items()},
             summary=summary, probes=probes, subprocess_seconds=seconds,
             records=records + probe_records)
  with open(os.path.join(results_dir, f"quality_{study.name}.json"), "w") as f:
    json.dump(out, f, indent=1)
  if records:
    curves.plot(records, models, shown,
                os.path.join(results_dir, f"quality_{study.name}.png"),
                f"{study.name}: {shown} (seed mean, min-max band)",
                zoom_from_step=study.plot_from_step)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--study", choices=sorted(STUDIES), required=True)
  parser.add_argument("--stage", choices=("all", "tune", "report"), default="all",
                      help="tune: the tuning stage only; report: collect, run nothing")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "quality"))
  parser.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"))
  parser.add_argument("--stop_after_minutes", type=float, default=None,
                      help="stop (resumably) after this long; rerun to continue")
  parser.add_argument("--workers", type=int, default=1,
                      help="runs at a time, each pinned to its own share of the CPUs (the "
                           "wall-clock of every run is then measured on that share)")
  parser.add_argument("--quick", action="store_true",
                      help="plumbing check: the arms only, 1 seed, 30 steps, no tuning; runs "
                           "and results under <runs_dir>/<study>_quick")
  args = parser.parse_args(argv)
  study = STUDIES[args.study]
  if args.quick:
    study = dataclasses.replace(study, name=f"{study.name}_quick", candidates=(), steps=30,
                                eval_period=15, tune_steps=0, probes=())
    args.seeds, args.results_dir = 1, os.path.join(args.runs_dir, study.name)
  deadline = (time.time() + 60 * args.stop_after_minutes
              if args.stop_after_minutes is not None else None)
  runner = Runner(study, args.runs_dir, deadline, dry=args.stage == "report",
                  workers=args.workers)
  seeds = list(range(args.seeds))
  tuning, screening = [], []
  chosen = {arm.name: ("default", ()) for arm in study.arms}
  stopped = False
  try:
    if study.tune_steps:
      picked, screening = screen(runner)
      tuned = list(study.arms) + picked
      for arm, (variant, bindings, rows) in zip(tuned, runner.map(
          lambda arm: tune(runner, arm), tuned)):
        chosen[arm.name], tuning = (variant, bindings), tuning + rows
    if args.stage != "tune":
      arms = {a.name: a for a in study.arms + study.candidates}
      # Seed-major: a stopped study still compares every arm.
      runner.map(lambda job: runner.run(arms[job[1]], "main", chosen[job[1]][1], job[0],
                                        study.steps),
                 [(seed, name) for seed in seeds for name in chosen])
      runner.map(lambda probe: runner.run(arms[probe[0]], probe[1],
                                          chosen[probe[0]][1] + probe[2], 0, study.steps),
                 study.probes)
  except Deadline:
    stopped = True
    print("Stopped at the deadline; rerun the same command to continue.", flush=True)
  out = collect(runner, chosen, seeds, tuning, screening, args.results_dir)
  columns = ["model", "settings", "params", "active_params_per_token", "seeds", "last_step",
             "final_mean", "final_std", "steps_to_baseline_final", "step_ratio_to_baseline",
             "final_wall_s", "cpus_per_run"]
  print(f"\n{study.name}: {study.shown_metric} "
        f"({'higher' if study.higher_is_better else 'lower'} is better; settings picked by "
        f"{study.metric}); subprocess time so far {out['subprocess_seconds'] / 3600:.2f} h")
  print(curves.markdown_table(out["summary"], columns))
  if out["probes"]:
    print(f"\nprobes (seed 0; against {study.baseline}'s seed mean)")
    print(curves.markdown_table(out["probes"], columns[:1] + columns[4:-1]))
  return 1 if stopped else 0


if __name__ == "__main__":
  sys.exit(main())
