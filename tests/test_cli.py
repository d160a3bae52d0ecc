"""Command lines: bad input to scripts/train.py fails at start-up, non-zero, with a message
naming the culprit; T5X's flags are accepted; TensorFlow's start-up notices stay off the console."""

import os
import subprocess
import sys

import argparse

import pytest

from moe_jax import cli, gin_utils

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
    # Unprepared TFDS data is built from the local copy; a missing copy is named.
    ([], "tiny Shakespeare source file not found: '/nonexistent/tinyshakespeare.txt'"),
])
def test_train_script_rejects_bad_input(tmp_path, flags, message):
  env = dict(os.environ, MOE_JAX_TFDS_DIR=str(tmp_path / "empty_tfds"),
             MOE_JAX_TINY_SHAKESPEARE="/nonexistent/tinyshakespeare.txt",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "train.py"), *BASE,
       f"--gin.MODEL_DIR='{tmp_path / 'run'}'", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")


def test_t5x_gin_bindings_and_process_flags():
  """--gin_bindings is --gin.NAME=VALUE (a later binding wins), and T5X's process flags fill
  the same settings as ours."""
  parser = argparse.ArgumentParser()
  cli.add_process_flags(parser)
  args, bindings = gin_utils.parse_flags(
      ["--gin_file=models/switch_tiny.gin", "--gin_bindings=NUM_EXPERTS = 4",
       "--gin.NUM_EXPERTS=6", "--gin_bindings", "EMBED_DIM = 24", "--multiprocess_gpu",
       "--coordinator_address=10.0.0.1:1234", "--process_count=2", "--process_index=1"], parser)
  assert bindings == ["NUM_EXPERTS = 4", "NUM_EXPERTS=6", "EMBED_DIM = 24"]
  import gin  # pylint: disable=g-import-not-at-top
  assert gin.query_parameter("%NUM_EXPERTS") == 6 and gin.query_parameter("%EMBED_DIM") == 24
  assert (args.multiprocess, args.coordinator_address, args.num_processes,
          args.process_id) == (True, "10.0.0.1:1234", 2, 1)
  ours = parser.parse_known_args(["--multiprocess", "--num_processes=3", "--process_id=0"])[0]
  assert (ours.multiprocess, ours.num_processes, ours.process_id) == (True, 3, 0)
  with pytest.raises(SystemExit):
    gin_utils.parse_flags(["--gin_file=models/switch_tiny.gin", "--gin_bindingz=X = 1"])


def test_tensorflow_start_up_notices_are_dropped_but_errors_kept():
  script = ("import os\n"
            "from moe_jax import cli\n"
            "with cli._without_lines(cli._TF_START_UP_NOISE):\n"
            "  os.write(2, b'E0000 real_error.cc:1] something broke\\n')\n"
            "cli.import_tensorflow_quietly()\n"
            "import tensorflow as tf\n"
            "print(tf.reduce_sum(tf.constant([1, 2])).numpy())\n")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "3"
  assert "something broke" in result.stderr
  for noise in cli._TF_START_UP_NOISE:
    assert noise not in result.stderr, result.stderr
