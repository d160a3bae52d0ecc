"""Metric writers: MODEL_DIR/metrics.jsonl (one JSON object per line), TensorBoard, console."""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any, Mapping

import numpy as np


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
            for i, v in enumerate(array.reshape(-1)):
              self._tf.summary.scalar(f"{name}/{i}", float(v))
      self._summary_writers[split].flush()
    return record

  def close(self):
    for writer in self._summary_writers.values():
      writer.close()


class Progress:
  """Console line: step, loss, tokens/s and ETA."""

  def __init__(self, total_steps: int, first_step: int):
    self.total, self.first, self.start = total_steps, first_step, time.time()

  def line(self, step: int, loss: float, tokens_per_second: float) -> str:
    done = step - self.first
    elapsed = time.time() - self.start
    eta = elapsed / max(done, 1) * (self.total - step)
    return (f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_second:,.0f} tokens/s  "
            f"ETA {datetime.timedelta(seconds=int(eta))}")
