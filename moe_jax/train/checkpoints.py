"""Orbax checkpoints under MODEL_DIR/checkpoints: save, exact resume, restore onto any mesh,
and fine-tuning initialisation (params and model state, optional dense -> MoE "sparse
upcycling").

Each step directory holds up to three items: "state" (TrainState: step, params, optimizer
state, model state such as router biases), "meta" (JSON: the number of batches the data iterator
has consumed, and every parameter's shape, so a MODEL_DIR holding an incompatible model is
refused with a clear message before compilation) and "input_iterator" (each process's tf.data
iterator state, `process_<i>.*`; absent in checkpoints of older versions, which resume by
skipping `batches_consumed` batches instead).
Saves are atomic (orbax renames a finished temporary directory), so a run killed mid-save
leaves a `*.orbax-checkpoint-tmp*` directory that is never picked up and is deleted when the
directory is next opened. A committed checkpoint that cannot be read back (disk damage) is
renamed aside to `<step>.damaged` (never deleted) and the next older one is restored instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUFFIX = ".damaged"
INPUT_ITERATOR_ITEM = "input_iterator"


def _iterator_prefix(item_dir) -> str:
  return os.path.join(os.fspath(item_dir), f"process_{jax.process_index()}")


class InputIteratorHandler(ocp.CheckpointHandler):
  """Saves this process's input iterator (anything with `save(prefix)` / `restore(prefix)`,
  e.g. `moe_jax.data.pipeline.CheckpointableIterator`) as `<item dir>/process_<i>`.

  Synchronous (T5X's `DatasetCheckpointHandler` design): the position is written before
  `save` returns, i.e. before the loop draws the next batch, into orbax's temporary step
  directory, so it commits atomically with the state it belongs to.
  """

  def save(self, directory: epath.Path, args: InputIteratorSave):
    args.iterator.save(_iterator_prefix(directory))

  def restore(self, directory: epath.Path, args: InputIteratorRestore):
    args.iterator.restore(_iterator_prefix(directory))
    return args.iterator


@ocp.args.register_with_handler(InputIteratorHandler, for_save=True)
@dataclasses.dataclass
class InputIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(InputIteratorHandler, for_restore=True)
@dataclasses.dataclass
class InputIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be saved or read back; the message says what to do."""


def shape_table(params) -> dict[str, list[int]]:
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k: list(np.shape(v)) for k, v in sorted(flat.items())}


def check_same_shapes(stored: dict[str, list[int]], ours: dict[str, list[int]],
                      source: str, hint: str) -> None:
  """ValueError naming the first parameters whose shapes differ (stored shape, then ours)."""
  if stored == ours:
    return
  diff = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
  shown = "; ".join(f"{k}: {stored.get(k, 'absent')} in the checkpoint, "
                    f"{ours.get(k, 'absent')} in this model" for k in diff[:3])
  from moe_jax.models import scan  # pylint: disable=g-import-not-at-top  (models stay optional)
  raise ValueError(f"{source} does not hold this model's parameters: {len(diff)} differ in name "
                   f"or shape, first {shown}. {scan.layout_hint(stored, ours)}{hint}")


def remove_unfinished_saves(directory: str) -> None:
  """Deletes what killed saves left (`<step>.orbax-checkpoint-tmp*`), on the primary process.

  Done here, synchronously, rather than by orbax's `cleanup_tmp_directories`, whose background
  deletion races with a second manager opened on the same directory.
  """
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` (async saves, keep the newest `max_to_keep`).

  A failed save (disk full, no permission) raises a CheckpointError naming its step, from `save`,
  `raise_if_save_failed` or `close` (an async save's error surfaces after it was started);
  orbax deletes older checkpoints only after a save has committed, so they stay intact.
  """

  def __init__(self, model_dir: str, max_to_keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINT_SUBDIR)
    remove_unfinished_saves(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._pending_step = None  # the step of a save that may still run in the background

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def damaged(self) -> list[str]:
    """Checkpoints set aside as unreadable (`<step>.damaged*`)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(n for n in os.listdir(self.directory) if DAMAGED_SUFFIX in n)

  # --- Saving. ------------------------------------------------------------------------------

  def _save_failed(self, step, error: Exception) -> CheckpointError:
    kept = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit() and int(n) != step)
    return CheckpointError(
        f"Saving the checkpoint of step {step} to {self.directory} failed: "
        f"{type(error).__name__}: {error}. Stopping; the earlier checkpoints {kept} are intact "
        f"(free space or fix permissions, then rerun the same command to resume).")

  def _wait(self) -> None:
    step, self._pending_step = self._pending_step, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_failed(step, e) from e
    if step is not None:
      logging.info("Checkpoint saved at step %d: %s", step, os.path.join(self.directory, str(step)))

  def save(self, step: int, state, batches_consumed: int, input_iterator=None) -> None:
    """Starts saving `state` (async); `input_iterator`'s position is written before returning."""
    self._wait()  # the previous async save's error, if any, names that save's step
    meta = {"batches_consumed": int(batches_consumed), "param_shapes": shape_table(state.params),
            "num_processes": jax.process_count()}
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if input_iterator is not None:
      items[INPUT_ITERATOR_ITEM] = InputIteratorSave(input_iterator)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_failed(step, e) from e
    self._pending_step = step

  def raise_if_save_failed(self) -> None:
    """Raises at once (without waiting) if a finished background save failed."""
    if self._pending_step is not None and not self.manager.is_saving_in_progress():
      self._wait()

  def close(self) -> None:
    try:
      self._wait()
    except CheckpointError:
      with contextlib.suppress(Exception):  # the same save error again: raised just below
        self.manager.close()
      raise
    self.manager.close()

  # --- Restoring. ---------------------------------------------------------------------------

  def _meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def batches_consumed(self, step: int) -> int:
    """How many batches the data iterator had yielded when `step` was saved."""
    return int(self._meta(step)["batches_consumed"])

  def restore_input_iterator(self, step: int, iterator) -> bool:
    """Moves `iterator` to where it was when `step` was saved; False (iterator untouched) when
    the checkpoint holds no position for this process: saved by an older version (skip
    `batches_consumed(step)` batches instead), or by another number of processes (each held
    another shard)."""
    prefix = _iterator_prefix(os.path.join(self.directory, str(step), INPUT_ITERATOR_ITEM))
    saved_by = self._meta(step).get("num_processes", jax.process_count())
    if saved_by != jax.process_count() or not os.path.exists(prefix + ".index"):
      return False
    # Read directly, not through the manager: per process, no collective to wait on.
    iterator.restore(prefix)
    return True

  def _check_shapes(self, step: int, meta: dict, params) -> None:
    recorded = os.path.join(os.path.dirname(self.directory), "config.gin")
    where = f" The run there recorded its config in {recorded}." if os.path.isfile(
        recorded) else ""
    check_same_shapes(meta["param_shapes"], shape_table(params),
                      f"{self.directory} (step {step})",
                      f"Use a new MODEL_DIR, or INITIAL_CHECKPOINT_PATH to fine-tune from it."
                      f"{where}")

  def check_compatible(self, params) -> Optional[int]:
    """The newest step whose metadata reads, after checking its parameter shapes; or None.

    `params`: this model's (abstract) params; only names and shapes are read, so the trainer
    calls this before anything is compiled. Unreadable checkpoints are left to `restore_latest`.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self._meta(step)
      except Exception:  # pylint: disable=broad-exception-caught
        continue
      self._check_shapes(step, meta, params)
      return step
    return None

  def restore(self, step: int, abstract_state):
    """The state saved at `step`; arrays land with the shardings of `abstract_state`."""
    self._check_shapes(step, self._meta(step), abstract_state.params)
    return self._restore_state(step, abstract_state)

  def _restore_state(self, step: int, abstract_state):
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]

  def restore_latest(self, abstract_state) -> Optional[tuple[int, Any, int]]:
    """(step, state, batches_consumed) of the newest checkpoint that reads back, or None.

    A checkpoint whose metadata or arrays fail to read (truncated files, as disk damage leaves
    them; orbax still lists it) is passed over for the next older one. Only once an older one
    restores into the same target are the unreadable newer ones renamed aside (with a
    warning): when every checkpoint fails alike, the cause is not damage (another optimizer,
    memory), so nothing is renamed and the first error is raised, naming the directory.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self._meta(step)
      except Exception as e:  # pylint: disable=broad-exception-caught
        failed.append((step, e))
        continue
      self._check_shapes(step, meta, abstract_state.params)  # another model: not damage
      try:
        state = self._restore_state(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-exception-caught
        failed.append((step, e))
        continue
      for bad_step, error in failed:
        self._set_aside(bad_step, error)
      return step, state, int(meta["batches_consumed"])
    if failed:
      step, error = failed[0]
      raise CheckpointError(
          f"No readable checkpoint in {self.directory}: steps {[s for s, _ in failed]} all "
          f"failed to restore; the newest (step {step}) with {type(error).__name__}: "
          f"{str(error).strip()[:500]}. Nothing was moved or deleted. If the files are "
          f"damaged, move a good copy of a checkpoint there, or use a new MODEL_DIR to start "
          f"from scratch.") from error
    if self.damaged():
      raise CheckpointError(
          f"No readable checkpoint in {self.directory}: only {self.damaged()}, set aside "
          f"earlier as unreadable. Move a good copy of a checkpoint there, or use a new "
          f"MODEL_DIR to start from scratch.")
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Renames an unreadable step directory to `<step>.damaged[.N]`, which orbax ignores."""
    source = os.path.join(self.directory, str(step))
    target = source + DAMAGED_SUFFIX
    n = 1
    while os.path.exists(target):
      n += 1
      target = f"{source}{DAMAGED_SUFFIX}.{n}"
    message = str(error).strip().splitlines()
    logging.warning("Checkpoint of step %d in %s is unreadable (%s: %s); renaming it to %s "
                    "and falling back to the previous checkpoint.", step, self.directory,
                    type(error).__name__, message[0][:300] if message else "", target)
    _sync(f"moe_jax_set_aside_{step}_start")
    if jax.process_index() == 0:
      os.rename(source, target)
    _sync(f"moe_jax_set_aside_{step}_done")
    self.manager.reload()


def resolve_checkpoint_path(path: str) -> tuple[str, int]:
  """(checkpoints dir, step) from a MODEL_DIR, its checkpoints/ dir, or one step directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"INITIAL_CHECKPOINT_PATH {path!r} does not exist")
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  for directory in (os.path.join(path, CHECKPOINT_SUBDIR), path):
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(
        directory) else []
    if steps:
      return directory, max(steps)
  raise FileNotFoundError(f"INITIAL_CHECKPOINT_PATH {path!r} holds no complete checkpoint "
                          f"(expected <dir>/checkpoints/<step>/state or <dir>/<step>/state)")


def _load_host(path: str, name: str, required: bool) -> dict:
  """The `name` subtree ("params", "model_state") of a checkpoint's state as host arrays.

  Reads only that subtree (not the optimizer state), straight into host memory: this works
  whatever devices the checkpoint was saved from (restoring it as jax arrays without target
  shardings fails with orbax's "Topology mismatch" on another device count).
  """
  directory, step = resolve_checkpoint_path(path)
  state_dir = os.path.join(directory, str(step), "state")
  try:
    # The item's tree metadata, read from the handler: `PyTreeCheckpointer.metadata` would also
    # look for step metadata (`_CHECKPOINT_METADATA`) inside the item directory, where orbax
    # never writes it (it lies one level up), and warn that it does not exist.
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree
    if not required and not tree.get(name):
      return {}
    item = {name: tree[name]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointError(f"checkpoint {os.path.join(directory, str(step))} is unreadable "
                       f"(damaged or incomplete?): {type(e).__name__}: {e}") from e
  return jax.tree.map(np.asarray, restored[name])


def load_params(path: str) -> dict:
  """Params of the checkpoint at `path` (see resolve_checkpoint_path) as host numpy arrays."""
  return _load_host(path, "params", required=True)


def load_model_state(path: str) -> dict:
  """TrainState.model_state (e.g. router biases) of the checkpoint at `path` as host numpy
  arrays; {} when it holds none (models without state collections, converted checkpoints)."""
  return _load_host(path, "model_state", required=False)


_EXPERT_KERNEL = re.compile(r"^(.*)/mlp/expert/(wi|wi_\d+|wo)/kernel$")


def init_params_from(target_params, loaded: dict, upcycle: bool = False):
  """Fine-tuning initialisation: copy every loaded param whose path and shape match.

  upcycle=True (sparse upcycling, Komatsuzaki et al. 2022): an expert kernel [E, ...] with no
  match is filled with the dense checkpoint's `<layer>/mlp/<name>/kernel` in every expert. Params
  found nowhere (routers, new layers) keep their fresh initialisation. Returns (params, report).
  Scanned stacks (`scan_layers`, moe_jax.models.scan) on either side are matched layer by layer
  in the unrolled layout (report paths name `layers_<i>`), and the result has the target's.
  """
  from moe_jax.models import scan  # pylint: disable=g-import-not-at-top  (models stay optional)
  periods = scan.scan_periods(target_params)
  loaded, target_params = scan.unstack_layers(loaded), scan.unstack_layers(target_params)
  flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
  flat_target = traverse_util.flatten_dict(target_params, sep="/")
  out, copied, upcycled, fresh = {}, [], [], []
  for path, value in flat_target.items():
    source = flat_loaded.get(path)
    if source is not None and np.shape(source) == value.shape:
      out[path] = source.astype(value.dtype)
      copied.append(path)
      continue
    match = _EXPERT_KERNEL.match(path) if upcycle else None
    dense = flat_loaded.get(f"{match.group(1)}/mlp/{match.group(2)}/kernel") if match else None
    if dense is not None and tuple(np.shape(dense)) == value.shape[1:]:
      out[path] = np.broadcast_to(dense, value.shape).astype(value.dtype)
      upcycled.append(path)
    else:
      if source is not None:
        raise ValueError(f"INITIAL_CHECKPOINT_PATH: {path} has shape {np.shape(source)} in the "
                         f"checkpoint but {value.shape} in this model")
      out[path] = value
      fresh.append(path)
  report = {"copied": copied, "upcycled": upcycled, "fresh": fresh}
  return scan.stack_layers(traverse_util.unflatten_dict(out, sep="/"), periods), report
