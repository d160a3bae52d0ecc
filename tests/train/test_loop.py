"""The loop's overheads: step metrics fetched one step late and only to log, the non-finite
check on the device, and the input position saved as the tf.data iterator's state (with the
replay of consumed batches kept for checkpoints that hold none)."""

import json
import logging
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import loop
from moe_jax.train.metrics import Progress
from moe_jax.train.steps import TrainState
from tests.train import tiny
from tests.train.conftest import BASELINE_STEPS


class _Writer:
  def __init__(self):
    self.records = []

  def write(self, step, metrics, prefix=""):
    self.records.append((step, {k: float(np.asarray(v)) for k, v in metrics.items()}))
    return {"step": step}


def _metrics(loss, tokens):
  return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0),
          "param_norm": jnp.float32(1.0), "num_tokens": jnp.float32(tokens)}


def _counting_device_get(monkeypatch):
  fetches = []
  device_get = jax.device_get

  def counted(x):
    fetches.append(x)
    return device_get(x)
  monkeypatch.setattr(jax, "device_get", counted)
  return fetches


def test_step_metrics_are_fetched_one_step_late_and_only_to_log(monkeypatch):
  """A log step's metrics are fetched when the NEXT step is added (queued), never at its own
  add; non-log steps fetch nothing; a log record is the token-weighted mean of its steps."""
  writer, flag = _Writer(), jnp.zeros((), jnp.int32)
  log = loop.StepMetrics(writer, Progress(4, 0), lambda: None, chief=False)
  fetches = _counting_device_get(monkeypatch)
  log.add(1, _metrics(2.0, 10), 10, flag, log=True)
  assert writer.records == [] and not fetches
  log.add(2, _metrics(4.0, 30), 30, flag, log=False)
  assert [s for s, _ in writer.records] == [1]
  fetched = len(fetches)
  log.add(3, _metrics(8.0, 10), 10, flag, log=True)
  assert len(fetches) == fetched and len(writer.records) == 1  # step 2 logs nothing
  log.sync()
  (_, first), (_, second) = writer.records
  assert first["loss"] == 2.0 and first["num_tokens"] == 10
  assert second["loss"] == (4.0 * 30 + 8.0 * 10) / 40 and second["num_tokens"] == 40
  assert second["tokens_per_second"] > 0 and log.last["loss"] == second["loss"]


def test_records_carry_the_training_seconds_per_step(monkeypatch):
  """seconds_per_step = the time since the previous record (or the start, or the clock's
  restart after an evaluation) over the steps it covers; tokens/s over the same time."""
  clock = iter([100.0, 103.0, 200.0, 209.0])
  monkeypatch.setattr(loop.time, "time", lambda: next(clock))
  writer, flag = _Writer(), jnp.zeros((), jnp.int32)
  log = loop.StepMetrics(writer, Progress(3, 0), lambda: None, chief=False)  # 100
  log.add(1, _metrics(2.0, 10), 10, flag, log=True)
  log.sync()                                                                   # 103
  log.restart_clock()                                                          # 200
  log.add(2, _metrics(4.0, 30), 30, flag, log=False)
  log.add(3, _metrics(8.0, 10), 10, flag, log=True)
  log.sync()                                                                   # 209
  (_, first), (_, second) = writer.records
  assert first["seconds_per_step"] == 3.0 and first["tokens_per_second"] == 10 / 3.0
  assert second["seconds_per_step"] == 4.5 and second["tokens_per_second"] == 40 / 9.0


def test_non_finite_flag_names_the_first_bad_step():
  """The device flag keeps the FIRST non-finite step (NaN loss at 3, inf grad norm at 4, NaN
  param norm at 6 -> 3). A sync writes the due log only if all its steps precede that step,
  then raises naming it."""
  def fake_step(state, batch, rng):
    del rng
    return state.replace(step=state.step + 1), {"loss": batch[0], "grad_norm": batch[1],
                                                "param_norm": batch[2]}
  step = jax.jit(loop.with_non_finite_flag(fake_step))
  state, flag = TrainState(jnp.zeros((), jnp.int32), {}, {}), jnp.zeros((), jnp.int32)
  rows = [(1, 1, 1), (2, 1, 1), (math.nan, 1, 1), (4, math.inf, 1), (5, 1, 1), (6, 1, math.nan)]
  flags, outputs = [], []
  for row in rows:
    state, metrics, flag = step(state, jnp.array(row, jnp.float32), None, flag)
    flags.append(int(flag))
    outputs.append((metrics, flag))
  assert flags == [0, 0, 3, 3, 3, 3]

  for log_steps, written in (((1, 2), [1, 2]), ((1, 4), [1])):
    writer = _Writer()
    log = loop.StepMetrics(writer, Progress(6, 0), lambda: 2, chief=False)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan .* at step 3; stopping "
                                                 r"without checkpointing .*last checkpoint: 2"):
      for done, (metrics, flag) in enumerate(outputs, start=1):
        log.add(done, {**metrics, "num_tokens": jnp.float32(1)}, 1, flag, log=done in log_steps)
      log.sync()
    assert [s for s, _ in writer.records] == written


def test_log_every_writes_the_means_of_the_straight_runs_steps(baseline_dir, tmp_path):
  """LOG_EVERY=3 over 7 steps logs steps 1 (the first), 3, 6 and 7 (the last), each the
  token-weighted mean of the steps since the previous log in the every-step baseline."""
  tiny.train(tmp_path, 7, log_every=3, checkpoint_period=100)
  every = {r["step"]: r for r in tiny.read_metrics(baseline_dir)}
  records = tiny.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 3, 6, 7]
  for record, steps in zip(records, ([1], [2, 3], [4, 5, 6], [7])):
    weights = np.array([every[s]["num_tokens"] for s in steps])
    assert record["num_tokens"] == weights.sum()
    for key in ("loss", "cross_entropy", "aux_loss", "accuracy", "grad_norm"):
      expected = np.dot(weights, [every[s][key] for s in steps]) / weights.sum()
      np.testing.assert_allclose(record[key], expected, rtol=1e-6, err_msg=f"{key} {steps}")
    assert record["tokens_per_second"] > 0


def test_non_finite_between_syncs_is_never_checkpointed(tfds_dir, tmp_path):
  """NaN params after step 3, a step that neither logs nor checkpoints (LOG_EVERY=4,
  CHECKPOINT_PERIOD=2): the sync at step 4 stops the run naming step 3; step 4's state is not
  saved and its log not written."""
  del tfds_dir
  opt = optax.chain(tiny.optimizer(), tiny.nan_updates_at(3))
  with pytest.raises(FloatingPointError, match="at step 3"):
    tiny.train(tmp_path, 8, opt=opt, log_every=4, checkpoint_period=2)
  steps = sorted(int(d) for d in os.listdir(tmp_path / ckpt_lib.CHECKPOINT_SUBDIR) if d.isdigit())
  assert steps == [2]
  assert [r["step"] for r in tiny.read_metrics(tmp_path)] == [1]


def _lm_batches(skip_batches=0):
  return loop.input_batches(tiny.TASK, {"targets": tiny.LENGTH}, "train", tiny.BATCH,
                            shuffle=True, seed=0, num_epochs=None, skip_batches=skip_batches)


def test_restored_iterator_reads_the_uninterrupted_batches(tfds_dir, tmp_path):
  """A checkpoint saved after 7 batches holds this process's iterator state; restored into a
  fresh iterator it yields exactly batches 8..10 of an uninterrupted iterator (as does the
  replay of 7 batches), not the fresh iterator's first ones."""
  del tfds_dir
  straight = [b["decoder_target_tokens"] for b, _ in zip(_lm_batches(), range(10))]
  batches = _lm_batches()
  for _ in range(7):
    next(batches)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
  state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.ones(3)}, {})
  checkpointer.save(7, state, batches_consumed=7, input_iterator=batches)
  next(batches)  # moving on after `save` returns does not change what was saved
  checkpointer.close()
  item = tmp_path / ckpt_lib.CHECKPOINT_SUBDIR / "7" / ckpt_lib.INPUT_ITERATOR_ITEM
  assert (item / "process_0.index").exists()
  size = sum(f.stat().st_size for f in item.iterdir())
  assert 1e5 < size < 1e8, size  # the shuffle buffers are saved (~2 MB here)

  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  restored = _lm_batches()
  assert checkpointer.restore_input_iterator(7, restored)
  checkpointer.close()
  replayed = _lm_batches(skip_batches=7)
  for i in range(3):
    expected = straight[7 + i]
    np.testing.assert_array_equal(next(restored)["decoder_target_tokens"], expected)
    np.testing.assert_array_equal(next(replayed)["decoder_target_tokens"], expected)
  assert not np.array_equal(straight[7], straight[0])


def test_checkpoint_without_iterator_state_resumes_by_replay(baseline_dir, tmp_path, caplog):
  """Step 5's checkpoint as older versions wrote it (no input_iterator item): the restart
  replays its 5 batches and reproduces the baseline's steps 6..10."""
  caplog.set_level(logging.INFO, logger="absl")
  checkpoints = tmp_path / ckpt_lib.CHECKPOINT_SUBDIR
  checkpoints.mkdir()
  shutil.copytree(os.path.join(baseline_dir, ckpt_lib.CHECKPOINT_SUBDIR, "5"), checkpoints / "5")
  shutil.rmtree(checkpoints / "5" / ckpt_lib.INPUT_ITERATOR_ITEM)
  meta_file = checkpoints / "5" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["num_processes"]
  meta_file.write_text(json.dumps(meta))
  tiny.train(tmp_path, BASELINE_STEPS)
  messages = [r.getMessage() for r in caplog.records]
  assert any("Input position of step 5: no saved input iterator state: replayed the 5 "
             "consumed batches" in m for m in messages), messages
  resumed = tiny.read_metrics(tmp_path)
  assert [r["step"] for r in resumed] == list(range(6, BASELINE_STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in resumed],
                             [r["loss"] for r in tiny.read_metrics(baseline_dir)[5:]],
                             atol=1e-6, rtol=0)
  # Its new checkpoint holds the iterator state again.
  assert (checkpoints / "10" / ckpt_lib.INPUT_ITERATOR_ITEM / "process_0.index").exists()


def test_unusable_iterator_state_falls_back_to_replay(tfds_dir, tmp_path, caplog):
  """Saved by 2 processes (meta num_processes 2; each held another shard): not restored, the
  iterator untouched. A damaged state file: resume_input warns naming the step and replays
  the consumed batches instead."""
  del tfds_dir
  batches = _lm_batches()
  next(batches)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(1, TrainState(jnp.zeros((), jnp.int32), {}, {}), 1, input_iterator=batches)
  checkpointer.close()
  straight = [b["decoder_target_tokens"] for b, _ in zip(_lm_batches(), range(2))]
  step_dir = tmp_path / ckpt_lib.CHECKPOINT_SUBDIR / "1"
  meta = step_dir / "meta" / "metadata"
  meta.write_text(meta.read_text().replace('"num_processes": 1', '"num_processes": 2'))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  fresh = _lm_batches()
  assert not checkpointer.restore_input_iterator(1, fresh)
  np.testing.assert_array_equal(next(fresh)["decoder_target_tokens"], straight[0])

  meta.write_text(meta.read_text().replace('"num_processes": 2', '"num_processes": 1'))
  (data_file,) = (step_dir / ckpt_lib.INPUT_ITERATOR_ITEM).glob("process_0.data*")
  data_file.write_bytes(data_file.read_bytes()[:1000])
  resumed = loop.resume_input(checkpointer, 1, _lm_batches(), _lm_batches)
  checkpointer.close()
  assert any(r.levelname == "WARNING" and "input iterator state of step 1" in r.getMessage()
             and "replaying the 1 consumed batches" in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(next(resumed)["decoder_target_tokens"], straight[1])
