"""Multi-host training: two local processes (jax.distributed over 127.0.0.1, 4 CPU devices each)
train on a (2, 4, 1) mesh and reach the losses of one process fed the same global batches."""

import functools
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio

from moe_jax import data, gin_utils
from moe_jax.models import build_network
from moe_jax.train import partitioning, trainer
from moe_jax.train.optimizers import build_optimizer, rsqrt_schedule
from tests.conftest import xla_flags
from tests.train import tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, BATCH, LENGTH = 3, 8, 32
# Two layers, both MoE (switch_tiny has four): three compilations of the sharded step, so small.
BINDINGS = ["EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8", "NUM_EXPERTS=8",
            "NUM_DECODER_LAYERS=2", "NUM_DECODER_SPARSE_LAYERS=2",
            f"MoeLayer.max_group_size={LENGTH}", f"BATCH_SIZE={BATCH}",
            f"TASK_FEATURE_LENGTHS={{'targets': {LENGTH}}}", f"TRAIN_STEPS={STEPS}",
            "LOG_EVERY=1", f"CHECKPOINT_PERIOD={STEPS}", "EVAL_PERIOD=0",
            "MESH_SHAPE=(2, 4, 1)", "train.tensorboard=False"]
FILES = ["models/switch_tiny.gin", "runs/pretrain.gin"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path, tfds_dir):
  model_dir = str(tmp_path / "mp")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             MOE_JAX_TFDS_DIR=tfds_dir, PYTHONUNBUFFERED="1")
  command = [sys.executable, os.path.join(REPO, "scripts", "train.py"),
             *[f"--gin_file={f}" for f in FILES], *[f"--gin.{b}" for b in BINDINGS],
             f"--gin.MODEL_DIR='{model_dir}'", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2"]
  procs = [subprocess.Popen(command + [f"--process_id={i}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  # Each process saved its own input iterator state (its shard's position).
  iterator_dir = os.path.join(model_dir, "checkpoints", str(STEPS), "input_iterator")
  assert sorted(f for f in os.listdir(iterator_dir) if f.endswith(".index")) == [
      "process_0.index", "process_1.index"]
  losses = tiny.losses_by_step(model_dir)  # written by process 0 only: one line per step
  assert sorted(losses) == list(range(1, STEPS + 1))

  # One process, 8 devices, the same (2, 4, 1) mesh, fed each step with the two processes'
  # shards side by side: the global batch the two processes built together.
  gin_utils.parse_gin(FILES, BINDINGS + [f"MODEL_DIR='{tmp_path / 'unused'}'"])
  network, optimizer, schedule = build_network(), build_optimizer(), rsqrt_schedule()
  shards = [data.get_dataset("tiny_shakespeare_lm", {"targets": LENGTH}, "train", BATCH // 2,
                             shuffle=True, seed=0, shard_info=seqio.ShardInfo(i, 2))
            .as_numpy_iterator() for i in range(2)]
  mesh = partitioning.make_mesh((2, 4, 1))
  with jax.set_mesh(mesh):
    shardings = trainer.state_shardings(network, optimizer, mesh)
    state = trainer.init_state(network, optimizer, shardings, jax.random.key(0))
    step = jax.jit(functools.partial(trainer.train_step, network=network, optimizer=optimizer,
                                     schedule=schedule, logit_z_loss=1e-4))
    for i in range(1, STEPS + 1):
      parts = [next(s) for s in shards]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, metrics = step(state, trainer.to_global(batch, partitioning.batch_sharding(mesh)),
                            jax.random.key(0))
      np.testing.assert_allclose(losses[i], float(metrics["loss"]), rtol=1e-5)
