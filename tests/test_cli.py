"""Command lines: bad input to scripts/train.py fails at start-up, non-zero, with one message
naming the culprit (and a close match) and no traceback; what train / eval / infer print; eval
and infer read a run's recorded config; T5X's flags are accepted; TensorFlow's start-up notices
stay off the console."""

import json
import os
import re
import subprocess
import sys

import argparse

import pytest

from moe_jax import cli, gin_utils
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--gin_file=models/switch_tiny.gin", "--gin_file=runs/pretrain.gin",
        "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.MESH_SHAPE=(1, 1, 1)"]


@pytest.mark.parametrize("flags,message", [
    (["--gin.MoeLayer.num_expertz=4"], "'num_expertz'. (did you mean 'num_experts'"),
    (["--gin.TRAIN_STEP=4"], "no gin file reads the macro TRAIN_STEP (did you mean 'TRAIN_STEPS'"),
    (["--gin.MESH_SHAPE=(1, 1"], "gin cannot parse binding 'MESH_SHAPE=(1, 1'"),
    (["--gin_file=models/switch_tinyy.gin"],
     "'models/switch_tinyy.gin' not found (did you mean 'models/switch_tiny.gin'"),
    (["--gin.MIXTURE_OR_TASK_NAME='tiny_shakespeare_lmm'"],
     "Unknown task or mixture 'tiny_shakespeare_lmm'. Did you mean 'tiny_shakespeare_lm'?"),
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
             XLA_FLAGS=xla_flags(1))
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "train.py"), *BASE,
       f"--gin.MODEL_DIR='{tmp_path / 'run'}'", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and result.stderr.count(" error: ") == 1
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")


def _run(script, *flags, env=None, cwd=REPO):
  result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *flags],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  return result.returncode, result.stdout + result.stderr


def _model_compiles(out):
  """Programs compiled (JAX_LOG_COMPILES=1) beyond the one-op ones that restoring arrays and
  making the seed's key take."""
  return [name for name in re.findall(r"Compiling jit\((\w+)\)", out) if name not in
          ("convert_element_type", "broadcast_in_dim", "_threefry_seed", "stage")]


def test_train_eval_infer_console_and_recorded_config(tmp_path, tfds_dir):
  """A 3-step run with LOG_EVERY=50 says where it writes, what it trains, on which devices, logs
  its first and last step and its checkpoint, without seqio's packing warning; rerun, it has
  nothing to do. Eval without a model --gin_file reads the run's config.gin (its run-file
  bindings winning); with another model it names the differing params and that config.gin;
  infer with a decoder-only model on this translation task fails before any compilation."""
  env = dict(os.environ, MOE_JAX_TFDS_DIR=tfds_dir, JAX_LOG_COMPILES="1",
             XLA_FLAGS=xla_flags(1))
  run = tmp_path / "run"
  # One layer per stack, each sparse: the 2 MoE layers the console names, half the compiling.
  tiny = ["--gin.EMBED_DIM=16", "--gin.MLP_DIM=32", "--gin.NUM_HEADS=2", "--gin.HEAD_DIM=8",
          "--gin.NUM_ENCODER_LAYERS=1", "--gin.NUM_DECODER_LAYERS=1"]
  lengths = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}"
  train = ["--gin_file=models/switch_t5_tiny.gin", "--gin_file=runs/pretrain.gin", *tiny,
           f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=2",
           "--gin.MIXTURE_OR_TASK_NAME='multi30k_en_de'", lengths, "--gin.EVAL_PERIOD=0"]
  code, out = _run("train.py", *train, env=env)
  assert code == 0, out[-3000:]
  for expected in (f"Model directory {run}", f"checkpoints in {run / 'checkpoints'}",
                   f"tensorboard --logdir {run / 'tensorboard'}",
                   "Model SparseEncoderDecoder: ", "2 MoE layers of 8 experts",
                   "Mesh data 1, expert 1, model 1 over 1 CPU device(s)", "step 1/3  loss",
                   "step 3/3  loss", f"Checkpoint saved at step 3: {run / 'checkpoints' / '3'}"):
    assert expected in out, (expected, out[-3000:])
  assert "step 2/3" not in out and "Features not in" not in out
  code, out = _run("train.py", *train, env=env)
  assert code == 0 and "Nothing left to do" in out, out[-3000:]
  assert not _model_compiles(out), out[-3000:]

  evaluate = ["--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH='{run}'", lengths,
              "--gin.EVAL_STEPS=1"]
  code, out = _run("eval.py", *evaluate, env=env)
  assert code == 0, out[-3000:]
  assert f"recorded config {run / 'config.gin'}" in out
  assert "eval loss: batch 1/1" in out and "eval decode: batch 1/1" in out
  with open(run / "eval_multi30k_en_de_validation.json") as f:  # eval.gin's BATCH_SIZE=32 won
    assert json.load(f)["num_tokens"] > 2 * 16  # over the recorded BATCH_SIZE=2

  code, out = _run("eval.py", "--gin_file=models/switch_t5_tiny.gin", *evaluate, env=env)
  assert code == 1 and "Traceback" not in out, out[-3000:]
  assert "decoder/decoder_norm/scale: [16] in the checkpoint, [64] in this model" in out, out
  assert f"recorded its config in {run / 'config.gin'}" in out

  code, out = _run("infer.py", "--gin_file=models/switch_tiny.gin", "--gin_file=runs/infer.gin",
                   f"--gin.CHECKPOINT_PATH='{run}'", lengths, env=env)
  assert code == 1 and "Traceback" not in out, out[-3000:]
  assert "'multi30k_en_de' has 'inputs' but the model is decoder-only" in out
  assert not _model_compiles(out) and not os.path.exists(run / "inference")


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
  ours = parser.parse_known_args(["--multiprocess", "--num_processes=3", "--process_id=0",
                                   "--local_device_ids=0,1,2"])[0]
  assert (ours.multiprocess, ours.num_processes, ours.process_id,
          ours.local_device_ids) == (True, 3, 0, [0, 1, 2])
  with pytest.raises(SystemExit):  # argparse names the flag and the bad value
    parser.parse_known_args(["--local_device_ids=0,gpu1"])
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
