"""Faults a long run meets: a damaged newest checkpoint, a save that fails (disk full)."""

import glob
import logging
import os
import shutil

import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from moe_jax.train import checkpoints as ckpt_lib
from tests.train import tiny
from tests.train.conftest import BASELINE_STEPS


def _truncate_largest_array_file(step_dir):
  """What disk damage leaves: the step stays committed (orbax lists it), its data is cut."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(baseline_dir, tmp_path,
                                                                   caplog):
  """Baseline checkpoints 5 and 10, step 10's arrays truncated: the restart warns naming step
  10, sets it aside (not deleted), resumes from 5 with step 5's input iterator state and
  reproduces the baseline's steps 6..10."""
  caplog.set_level(logging.INFO, logger="absl")
  checkpoints = tmp_path / ckpt_lib.CHECKPOINT_SUBDIR
  shutil.copytree(os.path.join(baseline_dir, ckpt_lib.CHECKPOINT_SUBDIR), checkpoints)
  _truncate_largest_array_file(checkpoints / str(BASELINE_STEPS))

  tiny.train(tmp_path, BASELINE_STEPS)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(f"step {BASELINE_STEPS} in {checkpoints} is unreadable" in w for w in warnings), (
      warnings)
  assert any("Input position of step 5: restored the input iterator's saved state" in
             r.getMessage() for r in caplog.records)
  resumed = tiny.read_metrics(tmp_path)
  assert [r["step"] for r in resumed] == list(range(6, BASELINE_STEPS + 1))
  straight = tiny.read_metrics(baseline_dir)[5:]
  np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in straight],
                             atol=1e-6, rtol=0)
  # The damaged copy is kept aside; the new step-10 save did not collide with it.
  assert sorted(os.listdir(checkpoints)) == ["10", f"10{ckpt_lib.DAMAGED_SUFFIX}", "5"]
  ckpt_lib.load_params(str(tmp_path))  # the new step 10 reads back


def test_no_readable_checkpoint_stops_naming_the_directory(baseline_dir, tmp_path):
  """Every checkpoint damaged: stop, moving nothing (twice: a rerun must not start from
  scratch either)."""
  checkpoints = tmp_path / ckpt_lib.CHECKPOINT_SUBDIR
  shutil.copytree(os.path.join(baseline_dir, ckpt_lib.CHECKPOINT_SUBDIR), checkpoints)
  for step in (5, BASELINE_STEPS):
    _truncate_largest_array_file(checkpoints / str(step))
  for _ in range(2):
    with pytest.raises(RuntimeError, match=f"No readable checkpoint in {checkpoints}"):
      tiny.train(tmp_path, BASELINE_STEPS + 2)
  assert sorted(os.listdir(checkpoints)) == ["10", "5"]
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_failing_async_save_stops_training_naming_the_step(tfds_dir, tmp_path, monkeypatch):
  """The commit of step 4's (async) save fails as on a full disk: training stops with an error
  naming step 4, step 2's checkpoint stays intact and nothing later is saved."""
  del tfds_dir
  commit = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk_at_step_4(self, *args, **kwargs):
    if self.get_final().name == "4":  # the step directory's commit (rename)
      raise OSError(28, "No space left on device")
    return await commit(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk_at_step_4)
  with pytest.raises(RuntimeError, match=r"checkpoint of step 4 .* failed: OSError: .*No space "
                                         r"left on device.*earlier checkpoints \[2\] are intact"):
    tiny.train(tmp_path, 8, checkpoint_period=2, async_checkpoints=True)
  monkeypatch.undo()
  steps = sorted(int(d) for d in os.listdir(tmp_path / ckpt_lib.CHECKPOINT_SUBDIR) if d.isdigit())
  assert steps == [2]
  assert max(r["step"] for r in tiny.read_metrics(tmp_path)) < 8  # stopped before the end
  ckpt_lib.load_params(str(tmp_path))  # step 2 reads back
