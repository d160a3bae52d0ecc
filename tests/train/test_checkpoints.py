"""moe_jax.train.checkpoints: restore onto other meshes and device counts, fine-tuning
initialisation (INITIAL_CHECKPOINT_PATH, freezing), sparse upcycling."""

import functools
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from moe_jax.layers import routing
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import partitioning, trainer
from tests.conftest import xla_flags
from tests.train import tiny
from tests.train.conftest import BASELINE_STEPS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WI = ("decoder", "layers_1", "mlp", "expert", "wi_0", "kernel")


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def test_restore_onto_other_meshes(tmp_path):
  """Saved from mesh (2, 4, 1) (experts split 4 ways); restored on (1, 4, 1), (1, 1, 1), and
  as host arrays in a process with ONE device: every value equal, new shardings applied."""
  net, opt = tiny.network(), tiny.optimizer()
  mesh = partitioning.make_mesh((2, 4, 1))
  with jax.set_mesh(mesh):
    state = trainer.init_state(net, opt, trainer.state_shardings(net, opt, mesh),
                               jax.random.key(7))
  assert _get(state.params, WI).sharding.shard_shape((8, 16, 32)) == (2, 16, 32)
  expected = jax.device_get(state)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  checkpointer.save(1, state, batches_consumed=1)
  checkpointer.close()

  for shape in [(1, 4, 1), (1, 1, 1)]:
    target = partitioning.make_mesh(shape)
    shardings = trainer.state_shardings(net, opt, target)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
    restored = checkpointer.restore(1, trainer.abstract_state(net, opt, shardings))
    checkpointer.close()
    wi = _get(restored.params, WI)
    assert wi.sharding == _get(shardings.params, WI)
    assert len(wi.sharding.device_set) == int(np.prod(shape))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)

  # Fine-tuning / inference on another device count reads the params as host arrays.
  out = tmp_path / "params.npz"
  script = textwrap.dedent(f"""
      import numpy as np
      from flax import traverse_util
      from moe_jax.train import checkpoints
      params = checkpoints.load_params({str(tmp_path)!r})
      np.savez({str(out)!r}, **traverse_util.flatten_dict(params, sep="/"))
  """)
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = np.load(out)
  flat = _flat(expected.params)
  assert sorted(loaded.files) == sorted(flat)
  for path, value in flat.items():
    np.testing.assert_array_equal(loaded[path], value, err_msg=path)


def test_initial_checkpoint_path_forms(baseline_dir, tmp_path):
  """A MODEL_DIR or its checkpoints/ dir mean its newest step; a step dir means that step."""
  checkpoints = os.path.join(baseline_dir, ckpt_lib.CHECKPOINT_SUBDIR)
  (tmp_path / "junk").mkdir()
  assert ckpt_lib.resolve_checkpoint_path(baseline_dir) == (checkpoints, BASELINE_STEPS)
  assert ckpt_lib.resolve_checkpoint_path(checkpoints) == (checkpoints, BASELINE_STEPS)
  assert ckpt_lib.resolve_checkpoint_path(os.path.join(checkpoints, "5")) == (checkpoints, 5)
  newest = ckpt_lib.load_params(baseline_dir)
  jax.tree.map(np.testing.assert_array_equal, ckpt_lib.load_params(checkpoints), newest)
  step5 = ckpt_lib.load_params(os.path.join(checkpoints, "5"))
  assert not np.array_equal(_get(step5, WI), _get(newest, WI))
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match=missing):
    ckpt_lib.load_params(missing)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    ckpt_lib.load_params(str(tmp_path / "junk"))


def test_train_with_missing_initial_checkpoint_fails_naming_it(tfds_dir, tmp_path):
  del tfds_dir
  missing = str(tmp_path / "pretrained" / "nowhere")
  with pytest.raises(FileNotFoundError, match=missing):
    tiny.train(tmp_path / "run", 3, initial_checkpoint_path=missing)


FROZEN = ("/self_attention/", "^token_embedder/", "_norm/")


def test_finetune_loads_params_only_and_freezes(baseline_dir, tmp_path):
  """From the baseline's step-10 checkpoint, 3 steps with attention, embeddings and norms
  frozen: those stay bit-identical to the checkpoint, the rest moves; steps restart at 0 with a
  fresh optimizer state (counts 3, not 13)."""
  loaded = _flat(ckpt_lib.load_params(baseline_dir))
  opt = tiny.optimizer(frozen_patterns=FROZEN)
  tiny.train(tmp_path, 3, opt=opt, checkpoint_period=3,
             initial_checkpoint_path=os.path.join(baseline_dir, ckpt_lib.CHECKPOINT_SUBDIR))
  records = tiny.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3]
  # Step 1 sees the same first batch as the baseline's step 1, with trained params.
  baseline_first = tiny.read_metrics(baseline_dir)[0]["loss"]
  assert records[0]["loss"] < baseline_first - 0.1
  assert os.listdir(tmp_path / ckpt_lib.CHECKPOINT_SUBDIR) == ["3"]

  tuned = _flat(ckpt_lib.load_params(str(tmp_path)))
  assert sorted(tuned) == sorted(loaded)
  frozen = [p for p in tuned if any(re.search(f, p) for f in FROZEN)]
  assert len(frozen) >= 8 and len(frozen) < len(tuned)
  for path, value in tuned.items():
    if path in frozen:
      np.testing.assert_array_equal(value, loaded[path], err_msg=path)
    else:
      assert not np.array_equal(value, loaded[path]), f"{path} did not train"

  state_dir = str(tmp_path / ckpt_lib.CHECKPOINT_SUBDIR / "3" / "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  state = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  assert int(state["step"]) == 3
  counts = [int(leaf) for path, leaf in _flat_any(state["opt_state"]) if path.endswith("count")]
  assert counts and set(counts) == {3}


def _flat_any(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [("/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path), leaf)
          for path, leaf in leaves]


def test_init_params_from_refuses_a_different_shape():
  def zeros(net):
    shapes = jax.eval_shape(lambda: tiny.unbox_init(net, jax.random.key(0)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  small, wide = zeros(tiny.network()), zeros(tiny.network(embed=24))
  with pytest.raises(ValueError, match=r"INITIAL_CHECKPOINT_PATH: decoder/decoder_norm/scale "
                                       r"has shape \(24,\) in the checkpoint but \(16,\)"):
    ckpt_lib.init_params_from(small, wide)


def test_sparse_upcycling_reproduces_the_dense_model():
  """Dense -> MoE with every expert a copy of the layer's dense MLP and a zero router: each
  token goes to expert 0 (ties) with gate 1 (k=1, renormalised), capacity = group size
  (cf = E): the MoE model computes exactly the dense model's function."""
  E = 4
  dense = tiny.network(num_sparse_layers=0)
  moe = tiny.network(num_sparse_layers=2, num_experts=E, capacity_factor=E, router=(
      routing.TopKRouter(k=1, renormalize=True,
                         kernel_init=jax.nn.initializers.zeros)))
  init = lambda net, seed: jax.device_get(jax.jit(functools.partial(tiny.unbox_init, net))(
      jax.random.key(seed)))
  dense_params, fresh = init(dense, 0), init(moe, 1)
  params, report = ckpt_lib.init_params_from(fresh, dense_params, upcycle=True)

  flat, flat_dense = _flat(params), _flat(dense_params)
  assert sorted(report["upcycled"]) == sorted(
      f"decoder/layers_{i}/mlp/expert/{w}/kernel" for i in (0, 1) for w in ("wi_0", "wi_1", "wo"))
  assert sorted(report["fresh"]) == [f"decoder/layers_{i}/mlp/router/router_weights/w/kernel"
                                     for i in (0, 1)]
  assert sorted(report["copied"]) == sorted(set(flat_dense) - {
      f"decoder/layers_{i}/mlp/{w}/kernel" for i in (0, 1) for w in ("wi_0", "wi_1", "wo")})
  for path in report["upcycled"]:
    dense_kernel = flat_dense[path.replace("/expert/", "/")]
    assert flat[path].shape == (E,) + dense_kernel.shape
    for e in range(E):
      np.testing.assert_array_equal(flat[path][e], dense_kernel, err_msg=f"{path}[{e}]")
  for path in report["copied"]:
    np.testing.assert_array_equal(flat[path], flat_dense[path], err_msg=path)

  tokens = jax.random.randint(jax.random.key(2), (2, tiny.LENGTH), 3, 384)
  y_dense = jax.jit(dense.apply)({"params": dense_params}, tokens)
  y_moe = jax.jit(moe.apply)({"params": params}, tokens)
  assert np.abs(np.asarray(y_dense)).max() > 0.1
  np.testing.assert_allclose(y_moe, y_dense, atol=1e-5, rtol=1e-5)
