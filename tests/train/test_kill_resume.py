"""scripts/train.py killed with SIGKILL after its first checkpoint, then restarted with the same
command, ends with the losses of an uninterrupted run (same gin config, run in-process)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from moe_jax import gin_utils
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import trainer
from tests.train import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The poll kills the run once its first checkpoint (step 10) is committed, 30+ steps before
# the end (a save commits at the latest when the next one starts, at step 20).
STEPS, PERIOD = 50, 10
GIN_FILES = ["models/switch_tiny.gin", "runs/pretrain.gin"]
BINDINGS = [f"TRAIN_STEPS={STEPS}", f"CHECKPOINT_PERIOD={PERIOD}", "LOG_EVERY=1",
            "EVAL_PERIOD=0", "BATCH_SIZE=8", "TASK_FEATURE_LENGTHS={'targets': 32}",
            "MESH_SHAPE=(1, 1, 1)", "EMBED_DIM=16", "NUM_HEADS=2", "HEAD_DIM=8", "MLP_DIM=32",
            "NUM_DECODER_LAYERS=2", "NUM_DECODER_SPARSE_LAYERS=2", "NUM_EXPERTS=8",
            "MoeLayer.max_group_size=32"]


def _command(model_dir):
  return ([sys.executable, os.path.join(REPO, "scripts", "train.py")]
          + [f"--gin_file={f}" for f in GIN_FILES]
          + [f"--gin.{b}" for b in BINDINGS + [f"MODEL_DIR='{model_dir}'"]])


def test_sigkill_then_restart_matches_uninterrupted_run(tfds_dir, tmp_path):
  del tfds_dir  # sets $MOE_JAX_TFDS_DIR, which the subprocesses inherit
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  gin_utils.parse_gin(GIN_FILES, BINDINGS + [f"MODEL_DIR='{straight}'"])
  trainer.train()
  expected = tiny.losses_by_step(straight)
  # T5X's record of the run: the operative config (what the built model and run used).
  config = (straight / "config.gin").read_text()
  assert f"TRAIN_STEPS = {STEPS}" in config and "MoeLayer.num_experts = %NUM_EXPERTS" in config
  assert sorted(expected) == list(range(1, STEPS + 1))

  first_checkpoint = killed / ckpt_lib.CHECKPOINT_SUBDIR / str(PERIOD)
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(_command(killed), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while not first_checkpoint.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    assert proc.poll() is None, (
        f"the run ended (rc {proc.returncode}) before it could be killed after its first "
        f"checkpoint:\n{(tmp_path / 'killed.log').read_text()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
    log.close()
  assert proc.returncode == -signal.SIGKILL
  before = tiny.losses_by_step(killed)
  assert PERIOD <= max(before) < STEPS  # killed after the first checkpoint, before the end

  restart = subprocess.run(_command(killed), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
  assert restart.returncode == 0, restart.stdout[-3000:] + restart.stderr[-3000:]
  # Our absl INFO lines go to stderr; stdout holds only the progress lines.
  assert all(line.startswith("step ") for line in restart.stdout.splitlines()), restart.stdout
  resumed_at = [line for line in restart.stderr.splitlines() if "] Resumed from" in line]
  assert resumed_at, restart.stderr[-3000:]
  step = int(resumed_at[0].rsplit(" ", 1)[-1].rstrip("."))
  assert "oneDNN" not in restart.stderr and "cuInit" not in restart.stderr
  assert PERIOD <= step <= max(before) and step % PERIOD == 0

  after = tiny.losses_by_step(killed)  # the restart's record of a re-run step wins
  assert sorted(after) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([after[s] for s in range(1, STEPS + 1)],
                             [expected[s] for s in range(1, STEPS + 1)], atol=1e-6, rtol=0)
  kept = sorted(int(d) for d in os.listdir(killed / ckpt_lib.CHECKPOINT_SUBDIR) if d.isdigit())
  assert kept == [STEPS - 2 * PERIOD, STEPS - PERIOD, STEPS]  # pretrain keeps the newest 3
