"""trainer.train end to end on tiny Shakespeare: expert parallelism matches one device, exact
resume, non-finite losses stop the run, metrics.jsonl / TensorBoard, incompatible MODEL_DIR."""

import functools
import glob
import logging
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import partitioning, trainer
from tests.train import tiny
from tests.train.conftest import BASELINE_STEPS


def test_expert_parallel_run_matches_single_device(baseline_dir, tmp_path):
  """Mesh (2, 4, 1): each device holds 2 of the 8 experts and 1 of the 8 sequences; same
  groups, same routing, so the first 10 losses equal the one-device run's to 1e-4."""
  tiny.train(tmp_path, BASELINE_STEPS, mesh_shape=(2, 4, 1))
  single, sharded = tiny.read_metrics(baseline_dir), tiny.read_metrics(tmp_path)
  assert [r["step"] for r in sharded] == list(range(1, BASELINE_STEPS + 1))
  losses = np.array([r["loss"] for r in single])
  assert np.ptp(losses) > 1e-2  # training moves the loss: the comparison is not vacuous
  np.testing.assert_allclose([r["loss"] for r in sharded], losses, atol=1e-4, rtol=0)
  for key in ("cross_entropy", "aux_loss", "accuracy", "fraction_dropped"):
    np.testing.assert_allclose([r[key] for r in sharded], [r[key] for r in single],
                               atol=1e-4, rtol=0, err_msg=key)
  for key in (k for k in single[-1] if k.startswith("expert_load/")):
    np.testing.assert_allclose(sharded[-1][key], single[-1][key], atol=1e-4, err_msg=key)


def test_resume_is_exact(baseline_dir, tmp_path, caplog):
  """5 steps, then a new train() to 10 in the same MODEL_DIR, with a leftover temporary
  checkpoint dir of a LATER step that must be ignored: steps 6..10 equal the straight run's,
  the input position restored from step 5's saved iterator state."""
  caplog.set_level(logging.INFO, logger="absl")
  tiny.train(tmp_path, 5)
  checkpoints = tmp_path / ckpt_lib.CHECKPOINT_SUBDIR
  assert sorted(os.listdir(checkpoints)) == ["5"]
  junk = checkpoints / "8.orbax-checkpoint-tmp-1234567"  # what a SIGKILL mid-save leaves
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "garbage").write_text("not a checkpoint")
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  assert checkpointer.latest_step() == 5
  assert not junk.exists()  # deleted on opening, before anything could read it
  checkpointer.close()
  assert ckpt_lib.resolve_checkpoint_path(str(tmp_path)) == (str(checkpoints), 5)

  tiny.train(tmp_path, 10)
  assert any("Input position of step 5: restored the input iterator's saved state" in
             r.getMessage() for r in caplog.records)
  straight, resumed = tiny.read_metrics(baseline_dir), tiny.read_metrics(tmp_path)
  assert [r["step"] for r in resumed] == list(range(1, 11))  # no step logged twice
  np.testing.assert_allclose([r["loss"] for r in resumed[5:]],
                             [r["loss"] for r in straight[5:]], atol=1e-6, rtol=0)
  np.testing.assert_allclose([r["learning_rate"] for r in resumed],
                             [r["learning_rate"] for r in straight], rtol=1e-7)
  assert "10" in os.listdir(checkpoints)


def test_metrics_jsonl_and_tensorboard(baseline_dir):
  records = tiny.read_metrics(baseline_dir)
  assert len(records) == BASELINE_STEPS
  expected = {"step", "loss", "cross_entropy", "aux_loss", "z_loss", "accuracy",
              "learning_rate", "tokens_per_second", "fraction_dropped",
              "expert_load/decoder/layers_0/mlp", "expert_load/decoder/layers_1/mlp"}
  for record in records:
    assert expected <= set(record), expected - set(record)
    loads = [k for k in record if k.startswith("expert_load/")]
    assert len(loads) == 2  # one per MoE layer
    for key in loads:  # fraction of tokens per expert (top-1): E entries summing to 1
      assert len(record[key]) == tiny.EXPERTS
      np.testing.assert_allclose(sum(record[key]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(record["learning_rate"], tiny.LEARNING_RATE, rtol=1e-6)
    assert record["tokens_per_second"] > 0
    assert record["aux_loss"] > 0 and record["z_loss"] > 0
    assert 0 <= record["accuracy"] <= 1 and 0 <= record["fraction_dropped"] <= 1
    # loss = cross entropy + output-logit z-loss + the two (weighted) router losses
    assert record["loss"] >= record["cross_entropy"] + record["aux_loss"] + record["z_loss"]
  (evaluation,) = tiny.read_metrics(baseline_dir, prefix="eval/")
  assert evaluation["step"] == BASELINE_STEPS
  assert {"eval/loss", "eval/cross_entropy", "eval/accuracy", "eval/aux_loss",
          "eval/expert_load/decoder/layers_0/mlp"} <= set(evaluation)
  assert evaluation["eval/num_tokens"] == 2 * tiny.BATCH * tiny.LENGTH  # packed: no padding
  assert np.isfinite(evaluation["eval/loss"]) and 0 <= evaluation["eval/accuracy"] <= 1
  events = glob.glob(os.path.join(baseline_dir, "tensorboard", "train", "events.out.tfevents.*"))
  assert events, os.listdir(baseline_dir)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = [(event.step, value) for event_file in events
            for event in tf.compat.v1.train.summary_iterator(event_file)
            for value in event.summary.value]
  tags = {value.tag for _, value in values}
  assert {"loss", "cross_entropy", "learning_rate"} <= tags
  # Expert load: one histogram per MoE layer (bucket i = expert i), no scalar per expert.
  assert not [t for t in tags if t.startswith("expert_load/") and t.endswith("/0")], tags
  last = {value.tag: value for step, value in values if step == BASELINE_STEPS}
  for layer in ("decoder/layers_0/mlp", "decoder/layers_1/mlp"):
    value = last[f"expert_load/{layer}"]
    assert value.metadata.plugin_data.plugin_name == "histograms"
    buckets = tf.make_ndarray(value.tensor)
    np.testing.assert_array_equal(buckets[:, :2], [[i, i + 1] for i in range(tiny.EXPERTS)])
    np.testing.assert_allclose(buckets[:, 2], records[-1][f"expert_load/{layer}"], rtol=1e-6)
  assert glob.glob(os.path.join(baseline_dir, "tensorboard", "eval", "events.out.tfevents.*"))


def test_non_finite_state_stops_without_checkpoint(tfds_dir, tmp_path):
  """NaN params after step 3 (its own loss, computed before the update, is still finite):
  FloatingPointError at step 3, and no checkpoint holds that state (checkpoint every step)."""
  del tfds_dir
  opt = optax.chain(tiny.optimizer(), tiny.nan_updates_at(3))
  with pytest.raises(FloatingPointError, match="at step 3"):
    tiny.train(tmp_path, 6, opt=opt, checkpoint_period=1)
  checkpoints = tmp_path / ckpt_lib.CHECKPOINT_SUBDIR
  assert sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) == [1, 2]
  params = ckpt_lib.load_params(str(tmp_path))
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
  assert [r["step"] for r in tiny.read_metrics(tmp_path)] == [1, 2]


def test_incompatible_model_dir_fails_before_compiling(baseline_dir, tmp_path, monkeypatch):
  """MODEL_DIR holds a checkpoint of 8-expert layers; this model has 4: a ValueError naming a
  differing parameter, raised before anything is compiled or trained."""
  shutil.copytree(os.path.join(baseline_dir, ckpt_lib.CHECKPOINT_SUBDIR),
                  tmp_path / ckpt_lib.CHECKPOINT_SUBDIR)

  def compiled(*args, **kwargs):
    raise AssertionError("compilation started before the incompatible checkpoint was refused")
  for name in ("state_shardings", "init_state", "abstract_state", "train_step"):
    monkeypatch.setattr(trainer, name, compiled)
  with pytest.raises(ValueError, match=r"decoder/layers_\d/mlp/expert/wi_0/kernel.*\[8, 16, 32\]"
                                       r".*\[4, 16, 32\]"):
    tiny.train(tmp_path, BASELINE_STEPS + 5, net=tiny.network(num_experts=4))
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_microbatches_equal_the_full_batch():
  """Gradient accumulation over 4 microbatches gives the full batch's loss terms, grads and
  params to ~1e-6 (float32, no dropout; plain SGD with rate 1, so new params = params - grads).
  Capacity never binds (factor = E) and each routing group is one sequence (max_group_size =
  length), so microbatching does not change routing; rows have different amounts of padding,
  so the token weighting of the microbatches is exercised."""
  net = tiny.network(capacity_factor=tiny.EXPERTS)
  opt = optax.sgd(1.0)
  batch = tiny.padded_batch()
  mesh = partitioning.make_mesh((1, 1, 1))
  results = {}
  with jax.set_mesh(mesh):
    state = trainer.init_state(net, opt, trainer.state_shardings(net, opt, mesh),
                               jax.random.key(0))
    for m in (1, 4):
      new_state, metrics = jax.jit(functools.partial(
          trainer.train_step, network=net, optimizer=opt, logit_z_loss=1e-4,
          num_microbatches=m))(state, batch, jax.random.key(3))
      grads = jax.tree.map(lambda old, new: old - new, state.params, new_state.params)
      results[m] = jax.device_get((metrics, grads))
  (full_metrics, full_grads), (metrics, grads) = results[1], results[4]
  assert full_metrics["aux_loss"] > 0
  assert 0 < full_metrics["num_tokens"] < tiny.BATCH * tiny.LENGTH
  assert sorted(metrics) == sorted(full_metrics)
  for key in metrics:
    np.testing.assert_allclose(metrics[key], full_metrics[key], atol=1e-6, rtol=1e-6,
                               err_msg=key)
  assert optax.global_norm(full_grads) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), grads,
               full_grads)


def test_t5x_style_finetune_step_count_warns(baseline_dir, caplog):
  """From a step-10 checkpoint, TRAIN_STEPS=15 reads like T5X's 10 + 5: warn; 3 does not."""
  trainer.warn_if_t5x_step_count(3, baseline_dir)
  assert not [r for r in caplog.records if r.levelname == "WARNING"]
  trainer.warn_if_t5x_step_count(15, baseline_dir)
  (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert "TRAIN_STEPS=15 counts fine-tuning steps from 0" in warning
  assert "set TRAIN_STEPS=5" in warning
