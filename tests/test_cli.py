"""Bad input to scripts/train.py fails at start-up, non-zero, with a message naming the culprit."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--gin_file=models/switch_tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.MESH_SHAPE=(1, 1, 1)"]


@pytest.mark.parametrize("flags,message", [
    (["--gin.MoeLayer.num_expertz=4"], "num_expertz"),
    (["--gin_file=models/switch_tinyy.gin"], "models/switch_tinyy.gin"),
    (["--gin.MIXTURE_OR_TASK_NAME='no_such_task'"], "Unknown task or mixture 'no_such_task'"),
    (["--gin.MESH_SHAPE=(3, 1, 1)"], "MESH_SHAPE (3, 1, 1) needs 3 devices"),
    (["--gin.MIXTURE_OR_TASK_NAME='multi30k_en_de'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}"],
     "'multi30k_en_de' has 'inputs' but the model is decoder-only"),
    (["--gin.INITIAL_CHECKPOINT_PATH='/nonexistent/ckpt'"], "'/nonexistent/ckpt' does not exist"),
    ([], "TFDS dataset 'tiny_shakespeare' is not prepared"),
])
def test_train_script_rejects_bad_input(tmp_path, flags, message):
  env = dict(os.environ, MOE_JAX_TFDS_DIR=str(tmp_path / "empty_tfds"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "train.py"), *BASE,
       f"--gin.MODEL_DIR='{tmp_path / 'run'}'", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")
