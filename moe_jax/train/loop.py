"""The training loop's host side: input batches whose position checkpoints, evaluation, run
setup, and step metrics that stay on the device until a log step needs them.

The loop never waits for the step it has just dispatched: metrics are fetched one step late
and only on log steps, and the non-finite check runs on the device as a running flag (the first
bad step), fetched at every sync point (log steps, checkpoints, evaluation).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moe_jax.models.summary import summarize
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train.metrics import mean_metrics

NON_FINITE_KEYS = ("loss", "grad_norm", "param_norm")


# ------------------------------------------------------------------------------------------
# Data.


def input_batches(task, feature_lengths, split, batch_size, *, shuffle, seed, num_epochs,
                  skip_batches=0, pack=True, drop_remainder=True):
  """Host numpy batches of this process's shard, as a `CheckpointableIterator` (its position
  is saved with every checkpoint); `skip_batches` drops that many first (exact, given the seed).

  Imports TensorFlow/seqio lazily.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from moe_jax import data  # pylint: disable=g-import-not-at-top
  from moe_jax.data.pipeline import CheckpointableIterator  # pylint: disable=g-import-not-at-top
  local_batch = batch_size // jax.process_count()
  ds = data.get_dataset(task, feature_lengths, split, local_batch, shuffle=shuffle, seed=seed,
                        shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()),
                        pack=pack, num_epochs=num_epochs, drop_remainder=drop_remainder)
  batches = CheckpointableIterator(ds)
  batches.skip(skip_batches)
  return batches


def resume_input(checkpointer: ckpt_lib.Checkpointer, step: int, batches, rebuild: Callable):
  """`batches` moved to where they were at checkpoint `step`: its saved iterator state, or
  (checkpoints without one) `rebuild(skip_batches=batches_consumed)`. Returns the iterator."""
  start = time.time()
  consumed = checkpointer.batches_consumed(step)  # read by every process alike
  try:
    restored = checkpointer.restore_input_iterator(step, batches)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # A damaged file, or a pipeline built differently since (tf.data names the op that no
    # longer matches): replaying needs nothing but the count.
    message = str(e).strip().splitlines()
    logging.warning("The input iterator state of step %d in %s does not restore (%s: %s); "
                    "replaying the %d consumed batches instead.", step, checkpointer.directory,
                    type(e).__name__, message[0][:300] if message else "", consumed)
    restored = None
  if restored:
    how = "restored the input iterator's saved state"
  else:
    batches = rebuild(skip_batches=consumed)
    how = (f"no saved input iterator state: replayed the {consumed} consumed batches"
           if restored is False else f"replayed the {consumed} consumed batches")
  logging.info("Input position of step %d: %s (%.1f s).", step, how, time.time() - start)
  return batches


def check_task(task: str, network=None):
  """(has "inputs", targets vocabulary) of a registered task; with a network, it must read
  the task's features (encoder-decoder for tasks with inputs, decoder-only otherwise)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from moe_jax import data  # pylint: disable=g-import-not-at-top  (registers the tasks)
  data.get_feature_converter(task)  # raises a ValueError naming unknown tasks
  features = seqio.get_mixture_or_task(task).output_features
  has_inputs = "inputs" in features
  if network is not None and has_inputs != ("encoder_input_tokens" in network.example_batch()):
    kind = "decoder-only" if has_inputs else "encoder-decoder"
    raise ValueError(f"MIXTURE_OR_TASK_NAME={task!r} {'has' if has_inputs else 'has no'} "
                     f"'inputs' but the model is {kind}; pick a matching task or model config")
  return has_inputs, features["targets"].vocabulary


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def num_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Non-padding input + target tokens of a host batch (tokens/s counts these)."""
  return int(sum(np.count_nonzero(batch[k]) for k in
                 ("encoder_input_tokens", "decoder_target_tokens") if k in batch))


def evaluate(eval_fn: Callable, params, batches: Iterable[Mapping[str, np.ndarray]],
             to_device: Callable = lambda batch: batch, model_state=None) -> dict:
  """Token-weighted mean of `eval_fn(params, batch, model_state)` over host batches ({} when
  none); `model_state` is TrainState's (None: {}, a model without state collections)."""
  model_state = {} if model_state is None else model_state
  history = [jax.device_get(eval_fn(params, to_device(batch), model_state))
             for batch in batches]
  return mean_metrics(history) if history else {}


# ------------------------------------------------------------------------------------------
# Step metrics, fetched late.


def with_non_finite_flag(step_fn: Callable) -> Callable:
  """`step_fn(state, batch, rng) -> (state, metrics)` that also carries `first_bad` on the
  device: the first step whose loss, grad norm or new params' norm is not finite (0: none)."""
  def step(state, batch, rng, first_bad):
    state, metrics = step_fn(state, batch, rng)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[k])) for k in NON_FINITE_KEYS]))
    return state, metrics, jnp.where((first_bad == 0) & ~finite, state.step, first_bad)
  return step


class StepMetrics:
  """Each dispatched step's metrics, kept as device arrays until a log step's are fetched.

  `add(step n)` fetches step n-1's metrics if n-1 logs: the device already has step n queued,
  so the host never waits for the step it has just dispatched. Every fetch (`sync`) also reads
  the non-finite flag, so a non-finite step stops the run at the next sync point, and since
  the loop syncs before every save, no checkpoint holds a non-finite state. tokens/s: the
  tokens of the steps logged over the time between two fetches (each returns once its last
  step has run).
  """

  def __init__(self, writer, progress, last_checkpoint: Callable[[], Optional[int]],
               chief: bool):
    self._writer, self._progress, self._chief = writer, progress, chief
    self._last_checkpoint = last_checkpoint
    self._unfetched = []  # (step, device metrics, tokens), oldest first
    self._first_bad = None
    self._log_step = None  # a step whose mean metrics are due in metrics.jsonl
    self._clock = time.time()
    self.last = {}  # the last logged means

  def add(self, step: int, metrics, tokens: int, first_bad: jax.Array, log: bool) -> None:
    self._unfetched.append((step, metrics, tokens))
    self._first_bad = first_bad
    if self._log_step is not None:
      self.sync()
    if log:
      self._log_step = step

  def sync(self) -> None:
    """Writes the due log step (unless it went non-finite); raises FloatingPointError naming
    the first non-finite step, if any so far."""
    first_bad = 0 if self._first_bad is None else int(jax.device_get(self._first_bad))
    if self._log_step is not None and not 0 < first_bad <= self._log_step:
      self._write(self._log_step)
    if first_bad:
      raise self._non_finite(first_bad)

  def restart_clock(self) -> None:
    """tokens/s counts training time only: called after an evaluation."""
    self._clock = time.time()

  def _write(self, step: int) -> None:
    entries = [e for e in self._unfetched if e[0] <= step]
    self._unfetched = self._unfetched[len(entries):]
    history = jax.device_get([metrics for _, metrics, _ in entries])
    now = time.time()
    last = mean_metrics(history)
    seconds = max(now - self._clock, 1e-9)
    last["tokens_per_second"] = sum(t for _, _, t in entries) / seconds
    # Training time per step since the last record (evaluation excluded; a record right after
    # a start or resume includes the compilation): curves against wall-clock add these up.
    last["seconds_per_step"] = seconds / len(entries)
    self._clock, self._log_step, self.last = now, None, last
    record = self._writer.write(step, last)
    if self._chief:  # the console's one stream; all else goes through absl logging
      print(self._progress.line(step, record["loss"], record["tokens_per_second"]), flush=True)

  def _non_finite(self, step: int) -> FloatingPointError:
    metrics = next((m for s, m, _ in self._unfetched if s == step), None)
    values = jax.device_get({k: metrics[k] for k in NON_FINITE_KEYS}) if metrics else {}
    loss, grad_norm, param_norm = (values.get(k, "?") for k in NON_FINITE_KEYS)
    return FloatingPointError(
        f"non-finite loss {loss} / grad norm {grad_norm} / norm of the updated params "
        f"{param_norm} at step {step}; stopping without checkpointing this state (last "
        f"checkpoint: {self._last_checkpoint()})")


# ------------------------------------------------------------------------------------------
# Run setup.


def write_gin_config(model_dir: str) -> None:
  """MODEL_DIR/config.gin: the operative config (the values this run uses), as T5X writes it.

  Called once the network, optimizer and schedule are built, so it lists every parameter they
  were built with, defaults included; `gin.config_str()` would list only what files and flags
  bound. Process 0 only.
  """
  if jax.process_index() != 0:
    return
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, "config.gin")
  with open(path, "w") as f:
    f.write(gin.operative_config_str())
  logging.info("Operative gin config written to %s", path)


def log_run_setup(model_dir: str, network, mesh, tensorboard: bool) -> None:
  """Where the run writes, what the model is, and which devices it runs on (absl INFO)."""
  model_dir = os.path.abspath(model_dir)
  logging.info("Model directory %s: checkpoints in %s, metrics in metrics.jsonl%s", model_dir,
               os.path.join(model_dir, ckpt_lib.CHECKPOINT_SUBDIR),
               f", TensorBoard: tensorboard --logdir {os.path.join(model_dir, 'tensorboard')}"
               if tensorboard else "")
  info = summarize(network)
  layers = info["moe_layers"]
  moe = (f"{len(layers)} MoE layers of {layers[0]['num_experts']} experts "
         f"({layers[0]['router']}, {layers[0]['experts_per_token']:g} per token)"
         if layers else "dense")
  logging.info("Model %s: %s parameters, %s active per token, %s", info["network"],
               f"{info['num_params']:,}", f"{info['active_params_per_token']:,}", moe)
  devices = mesh.devices.reshape(-1)
  logging.info("Mesh %s over %d %s device(s) in %d process(es)",
               ", ".join(f"{k} {v}" for k, v in mesh.shape.items()), len(devices),
               devices[0].platform.upper(), jax.process_count())


def warn_if_t5x_step_count(train_steps: int, initial_checkpoint_path: str) -> None:
  """Warns when TRAIN_STEPS looks like T5X's fine-tuning count (initial step + new steps).

  moe_jax fine-tunes for TRAIN_STEPS steps from step 0 (params only, fresh optimizer state
  and schedule); T5X continues the checkpoint's step count up to TRAIN_STEPS.
  """
  _, initial_step = ckpt_lib.resolve_checkpoint_path(initial_checkpoint_path)
  if initial_step < train_steps <= 2 * initial_step:
    logging.warning(
        "TRAIN_STEPS=%d counts fine-tuning steps from 0 in moe_jax; T5X counts them on from "
        "the initial checkpoint's step (%d). This run trains %d steps; if you meant %d more "
        "steps (T5X's reading), set TRAIN_STEPS=%d.", train_steps, initial_step, train_steps,
        train_steps - initial_step, train_steps - initial_step)
