"""Metric means and writers: MODEL_DIR/metrics.jsonl (one JSON object per line), TensorBoard,
console."""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def mean_metrics(history: Sequence[Mapping[str, Any]], weight_key: str = "num_tokens"):
  """Token-weighted mean of per-batch metrics (num_tokens itself is summed)."""
  weights = np.array([float(m[weight_key]) for m in history])
  total = max(weights.sum(), 1.0)
  out = {}
  for key in history[0]:
    values = np.stack([np.asarray(m[key], np.float64) for m in history])
    out[key] = values.sum(0) if key == weight_key else np.tensordot(weights, values, 1) / total
  return out


def to_python(value: Any):
  """Scalars -> float, vectors (expert_load) -> list of floats."""
  array = np.asarray(value, dtype=np.float64)
  return float(array) if array.ndim == 0 else array.tolist()


class MetricsWriter:
  """Appends metrics to `<model_dir>/metrics.jsonl` and TensorBoard event files (process 0 only).

  TensorBoard events go to `<model_dir>/tensorboard/{train,eval}`; TensorFlow is imported only
  here, lazily, and only if `tensorboard=True`.
  """

  def __init__(self, model_dir: str, tensorboard: bool = True, enabled: bool = True):
    self.path = os.path.join(model_dir, "metrics.jsonl")
    self.enabled = enabled
    self.tensorboard_dir = os.path.join(model_dir, "tensorboard")
    self._summary_writers = {}
    self._tf = None
    if enabled:
      os.makedirs(model_dir, exist_ok=True)
      if tensorboard:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        self._tf = tf

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict:
    record = {"step": int(step)}
    record.update({f"{prefix}{k}": to_python(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tf is not None:
      split = "eval" if prefix.startswith("eval") else "train"
      if split not in self._summary_writers:
        self._summary_writers[split] = self._tf.summary.create_file_writer(
            os.path.join(self.tensorboard_dir, split))
      with self._summary_writers[split].as_default(step=int(step)):
        for name, value in metrics.items():
          array = np.asarray(value, dtype=np.float64)
          if array.ndim == 0:
            self._tf.summary.scalar(name, float(array))
          else:
            self._write_per_expert(name, array.reshape(-1))
      self._summary_writers[split].flush()
    return record

  def _write_per_expert(self, name: str, values: np.ndarray) -> None:
    """One histogram per layer whose bucket i is expert i, its height the expert's value: one
    TensorBoard card per MoE layer instead of a scalar curve per expert (those stay in
    metrics.jsonl)."""
    from tensorboard.plugins.histogram import metadata  # pylint: disable=g-import-not-at-top
    index = np.arange(len(values), dtype=np.float64)
    buckets = np.stack([index, index + 1, values], axis=1)  # (left edge, right edge, count)
    self._tf.summary.write(name, self._tf.constant(buckets), metadata=(
        metadata.create_summary_metadata(name, "per expert: bucket i = expert i")))

  def close(self):
    for writer in self._summary_writers.values():
      writer.close()


class Progress:
  """Console line: step, loss, tokens/s and ETA (timed from the first logged step: it includes
  compilation)."""

  def __init__(self, total_steps: int, first_step: int):
    self.total, self.first = total_steps, first_step
    self.mark = None  # (step, time) of the first line

  def line(self, step: int, loss: float, tokens_per_second: float) -> str:
    now = time.time()
    head = f"step {step}/{self.total}  loss {loss:.4f}"
    if self.mark is None:
      self.mark = (step, now)
      if step < self.total:
        return f"{head}  (first step, compilation included)"
    mark_step, mark_time = self.mark
    eta = (now - mark_time) / max(step - mark_step, 1) * (self.total - step)
    return (f"{head}  {tokens_per_second:,.0f} tokens/s  "
            f"ETA {datetime.timedelta(seconds=int(eta))}")


def track(items: Sequence[T], what: str, every_s: float = 10.0) -> Iterator[T]:
  """Yields `items`, printing '<what>: batch i/n  ETA ...' after the first, then at most every
  `every_s` seconds, and after the last (process 0; evaluation and inference progress)."""
  start = last = time.time()
  chief = jax.process_index() == 0
  for i, item in enumerate(items):
    yield item
    done, now = i + 1, time.time()
    if chief and (done in (1, len(items)) or now - last >= every_s):
      eta = (now - start) / done * (len(items) - done)
      print(f"{what}: batch {done}/{len(items)}  ETA {datetime.timedelta(seconds=int(eta))}",
            flush=True)
      last = now
