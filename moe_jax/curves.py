"""Learning curves from runs' metrics.jsonl: records, seed statistics, plots (benchmarks/quality.py).

A record is `{study, model, seed, step, metric, value, wall_s}`: `metric` is a metrics.jsonl key
(e.g. "eval/loss", "eval/exact_recall", "loss"), `wall_s` the run's training seconds up to that
step. Training seconds add up the train records' `seconds_per_step` times the steps each record
covers (evaluation excluded; the first record after a start or resume includes compilation).

metrics.jsonl is appended to by every start of a run: after a resume, the steps between the last
checkpoint and the interruption appear twice. The last occurrence of each step wins (it is the
state the run continued from), and the time spent on the discarded ones is not counted.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

Record = Dict[str, object]


def read_jsonl(path: str) -> List[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_per_step(rows: Iterable[dict]) -> Dict[int, dict]:
  """step -> the last row of that step; rows of a step before a later row of an EARLIER step
  (a resume rewound past them) are dropped."""
  kept: Dict[int, dict] = {}
  for row in rows:
    step = int(row["step"])
    for stale in [s for s in kept if s >= step]:  # rewound: those steps were redone
      del kept[stale]
    kept[step] = row
  return kept


def run_curves(rows: Sequence[dict], metrics: Sequence[str]) -> Dict[str, List[tuple]]:
  """{metric: [(step, value, wall_s), ...]} of one run's metrics.jsonl rows, steps ascending.

  Train rows are those without an "eval/" key; eval rows carry only "eval/..." keys.
  """
  train = last_per_step(r for r in rows if not any(k.startswith("eval/") for k in r))
  evals = last_per_step(r for r in rows if any(k.startswith("eval/") for k in r))
  wall_at, total, previous = {}, 0.0, 0
  for step in sorted(train):
    seconds = train[step].get("seconds_per_step")
    if seconds is None:
      raise ValueError(f"metrics.jsonl row of step {step} has no seconds_per_step (written "
                       f"before the trainer logged it): wall-clock curves need it")
    total += float(seconds) * (step - previous)
    wall_at[step], previous = total, step
  logged = sorted(wall_at)

  def wall(step: int) -> float:
    """Training seconds at `step`: the latest train record at or before it."""
    index = int(np.searchsorted(logged, step, side="right")) - 1
    return wall_at[logged[index]] if index >= 0 else 0.0

  curves = {}
  for metric in metrics:
    source = evals if metric.startswith("eval/") else train
    curves[metric] = [(step, float(source[step][metric]), wall(step))
                      for step in sorted(source) if metric in source[step]]
  return curves


def records(study: str, model: str, seed: int, metrics_path: str,
            metrics: Sequence[str]) -> List[Record]:
  """The JSON records of one run (see the module docstring)."""
  curves = run_curves(read_jsonl(metrics_path), metrics)
  return [dict(study=study, model=model, seed=seed, step=step, metric=metric, value=value,
               wall_s=wall_s)
          for metric, points in curves.items() for step, value, wall_s in points]


def seed_stats(recs: Sequence[Record], model: str, metric: str) -> Dict[str, np.ndarray]:
  """Per step logged by EVERY seed of `model`: mean, min, max of `metric` and mean wall_s."""
  by_seed: Dict[int, Dict[int, Record]] = {}
  for r in recs:
    if r["model"] == model and r["metric"] == metric:
      by_seed.setdefault(int(r["seed"]), {})[int(r["step"])] = r
  if not by_seed:
    return {}
  steps = sorted(set.intersection(*(set(s) for s in by_seed.values())))
  values = np.array([[by_seed[seed][step]["value"] for step in steps] for seed in by_seed])
  walls = np.array([[by_seed[seed][step]["wall_s"] for step in steps] for seed in by_seed])
  return dict(step=np.array(steps), mean=values.mean(0), min=values.min(0),
              max=values.max(0), std=values.std(0), wall_s=walls.mean(0),
              num_seeds=np.array(len(by_seed)))


def first_step_reaching(steps: Sequence[int], values: Sequence[float], target: float,
                        higher_is_better: bool) -> Optional[int]:
  """The first logged step whose value is at least as good as `target` (None: never)."""
  for step, value in zip(steps, values):
    if (value >= target) if higher_is_better else (value <= target):
      return int(step)
  return None


def summarize(recs: Sequence[Record], models: Sequence[str], metric: str, baseline: str,
              higher_is_better: bool) -> List[dict]:
  """One row per model: final mean/std over seeds of `metric` (at the last step every seed
  logged), and the step (and seconds) at which its seed-mean curve first reaches the baseline's
  final mean, with that step's ratio to the baseline's last step."""
  stats = {m: seed_stats(recs, m, metric) for m in models}
  base = stats.get(baseline) or {}
  rows = []
  for model in models:
    s = stats[model]
    if not s:
      continue
    row = dict(model=model, seeds=int(s["num_seeds"]), last_step=int(s["step"][-1]),
               final_mean=float(s["mean"][-1]), final_std=float(s["std"][-1]),
               final_wall_s=float(s["wall_s"][-1]))
    if base:
      target = float(base["mean"][-1])
      reach = first_step_reaching(s["step"], s["mean"], target, higher_is_better)
      row["steps_to_baseline_final"] = reach
      row["step_ratio_to_baseline"] = (reach / float(base["step"][-1])
                                       if reach is not None else None)
      row["wall_s_to_baseline_final"] = (float(s["wall_s"][list(s["step"]).index(reach)])
                                         if reach is not None else None)
    rows.append(row)
  return rows


def y_limits(recs: Sequence[Record], models: Sequence[str], metric: str,
             from_step: int) -> Optional[tuple]:
  """(low, high) spanning every model's seed band at steps >= from_step, 5% margin each side;
  None when no model logged such a step."""
  lows, highs = [], []
  for model in models:
    s = seed_stats(recs, model, metric)
    keep = s["step"] >= from_step if s else None
    if s and keep.any():
      lows.append(s["min"][keep].min())
      highs.append(s["max"][keep].max())
  if not lows:
    return None
  low, high = float(min(lows)), float(max(highs))
  margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
  return low - margin, high + margin


def plot(recs: Sequence[Record], models: Sequence[str], metric: str, path: str,
         title: str, ylabel: Optional[str] = None, zoom_from_step: Optional[int] = None) -> str:
  """PNG: `metric` against steps (left) and training seconds (right), the seed mean as a line
  and the min-max over seeds as a band. `zoom_from_step`: the y axis spans only what the
  models log from that step on (`y_limits`), so small late differences stay visible; earlier
  points leave the frame. Returns the path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (by_step, by_wall) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for model in models:
    s = seed_stats(recs, model, metric)
    if not s:
      continue
    label = f"{model} ({int(s['num_seeds'])} seed{'s' if s['num_seeds'] > 1 else ''})"
    for ax, x in ((by_step, s["step"]), (by_wall, s["wall_s"])):
      (line,) = ax.plot(x, s["mean"], label=label)
      ax.fill_between(x, s["min"], s["max"], color=line.get_color(), alpha=0.2)
  by_step.set_xlabel("step")
  by_wall.set_xlabel("training seconds (this machine)")
  by_step.set_ylabel(ylabel or metric)
  for ax in (by_step, by_wall):
    ax.grid(alpha=0.3)
  by_step.legend(fontsize=8)
  limits = None if zoom_from_step is None else y_limits(recs, models, metric, zoom_from_step)
  if limits:
    by_step.set_ylim(*limits)  # shared with by_wall
    title += f"; y axis from step {zoom_from_step} on"
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
  def cell(value):
    if value is None:
      return "-"
    if isinstance(value, float):
      return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)
