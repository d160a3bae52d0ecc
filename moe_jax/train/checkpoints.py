"""Orbax checkpoints under MODEL_DIR/checkpoints: save, exact resume, restore onto any mesh,
and fine-tuning initialisation (params only, optional dense -> MoE "sparse upcycling").

Each step directory holds two items: "state" (params, optimizer state, step) and "meta" (JSON:
the number of batches the data iterator has consumed, and every parameter's shape, so a
MODEL_DIR holding an incompatible model is refused with a clear message before compilation).
Saves are atomic (orbax renames a finished temporary directory), so a run killed mid-save
leaves a `*.orbax-checkpoint-tmp*` directory that is never picked up and is deleted when the
directory is next opened.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

CHECKPOINT_SUBDIR = "checkpoints"


def shape_table(params) -> dict[str, list[int]]:
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k: list(np.shape(v)) for k, v in sorted(flat.items())}


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


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` (async saves, keep the newest `max_to_keep`)."""

  def __init__(self, model_dir: str, max_to_keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINT_SUBDIR)
    remove_unfinished_saves(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, batches_consumed: int) -> None:
    meta = {"batches_consumed": int(batches_consumed), "param_shapes": shape_table(state.params)}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))

  def _meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def batches_consumed(self, step: int) -> int:
    """How many batches the data iterator had yielded when `step` was saved."""
    return int(self._meta(step)["batches_consumed"])

  def check_compatible(self, step: int, params) -> None:
    """Raise ValueError naming the parameters whose shapes differ from the stored ones.

    `params`: this model's (abstract) params; only names and shapes are read, so the trainer
    calls this before anything is compiled.
    """
    stored_shapes = self._meta(step)["param_shapes"]
    ours = shape_table(params)
    if stored_shapes != ours:
      diff = sorted(k for k in set(stored_shapes) | set(ours)
                    if stored_shapes.get(k) != ours.get(k))
      raise ValueError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model: "
          f"{len(diff)} parameter(s) differ in name or shape, e.g. "
          f"{[(k, stored_shapes.get(k), ours.get(k)) for k in diff[:3]]}. "
          f"Use a new MODEL_DIR, or INITIAL_CHECKPOINT_PATH to fine-tune from it.")

  def restore(self, step: int, abstract_state):
    """The state saved at `step`; arrays land with the shardings of `abstract_state`."""
    self.check_compatible(step, abstract_state.params)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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


def load_params(path: str) -> dict:
  """Params of the checkpoint at `path` (see resolve_checkpoint_path) as host numpy arrays.

  Reads only the params (not the optimizer state), straight into host memory: this works
  whatever devices the checkpoint was saved from (restoring it as jax arrays without target
  shardings fails with orbax's "Topology mismatch" on another device count).
  """
  directory, step = resolve_checkpoint_path(path)
  state_dir = os.path.join(directory, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  item = {"params": checkpointer.metadata(state_dir).item_metadata.tree["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return jax.tree.map(np.asarray, restored["params"])


_EXPERT_KERNEL = re.compile(r"^(.*)/mlp/expert/(wi|wi_\d+|wo)/kernel$")


def init_params_from(target_params, loaded: dict, upcycle: bool = False):
  """Fine-tuning initialisation: copy every loaded param whose path and shape match.

  upcycle=True (sparse upcycling, Komatsuzaki et al. 2022): an expert kernel [E, ...] with no
  match is filled with the dense checkpoint's `<layer>/mlp/<name>/kernel` in every expert. Params
  found nowhere (routers, new layers) keep their fresh initialisation. Returns (params, report).
  """
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
  return traverse_util.unflatten_dict(out, sep="/"), report
