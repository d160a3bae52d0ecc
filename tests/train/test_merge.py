"""moe_jax.train.merging: MoE -> dense expert merging (kernels, exact invariance, usage from a
real training log, the trainer and the step-0 checkpoint paths, refusals)."""

import functools
import json
import os

import gin
import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from moe_jax import gin_utils, inference
from moe_jax.layers import routing
from moe_jax.layers.dense import MlpBlock
from moe_jax.models import scan
from moe_jax.models.decoder_only import SparseDecoderOnly
from moe_jax.models.t5 import SparseDecoder
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import merging, partitioning
from tests.train import tiny
from tests.train.conftest import BASELINE_STEPS

E = 4
LAYERS = ("decoder/layers_0/mlp", "decoder/layers_1/mlp")
KERNELS = ("wi_0", "wi_1", "wo")


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def _init(net, seed):
  return jax.device_get(jax.jit(functools.partial(tiny.unbox_init, net))(jax.random.key(seed)))


def _dense(mlp_dim=tiny.MLP):
  """tiny.network's dense twin with FFN hidden size `mlp_dim`."""
  return SparseDecoderOnly(
      vocab_size=384, embed_dim=tiny.EMBED,
      decoder=SparseDecoder(num_layers=2, num_sparse_layers=0, num_heads=2, head_dim=8,
                            mlp=MlpBlock(intermediate_dim=mlp_dim, activations=tiny.ACTIVATIONS),
                            moe=None))


@pytest.fixture(scope="module")
def moe_and_dense_params():
  return _init(tiny.network(num_experts=E), 0), _init(_dense(), 1)


def test_merged_kernels_are_the_usage_weighted_average(moe_and_dense_params):
  moe, dense = moe_and_dense_params
  raw = np.array([0.5, 2.0, 1.0, 0.5])  # unnormalised on purpose: weights are raw / 4
  usage = {LAYERS[0]: raw, LAYERS[1]: np.array([0.0, 0.0, 3.0, 0.0])}
  params, report = merging.merge_experts(dense, moe, usage)
  flat, flat_moe = _flat(params), _flat(moe)
  assert sorted(report["merged"]) == sorted(f"{l}/{k}/kernel" for l in LAYERS for k in KERNELS)
  assert report["fresh"] == []
  assert sorted(report["copied"]) == sorted(set(_flat(dense)) - set(report["merged"]))
  for path in report["copied"]:
    np.testing.assert_array_equal(flat[path], flat_moe[path], err_msg=path)
  for k in KERNELS:
    expert = flat_moe[f"{LAYERS[0]}/expert/{k}/kernel"].astype(np.float64)
    expected = sum(w / raw.sum() * expert[e] for e, w in enumerate(raw))
    np.testing.assert_allclose(flat[f"{LAYERS[0]}/{k}/kernel"], expected, rtol=1e-6, atol=1e-7)
    # One-hot usage: exactly that expert.
    np.testing.assert_array_equal(flat[f"{LAYERS[1]}/{k}/kernel"],
                                  flat_moe[f"{LAYERS[1]}/expert/{k}/kernel"][2])
  np.testing.assert_allclose(report["weights"][LAYERS[0]], [0.125, 0.5, 0.25, 0.125])

  uniform, report = merging.merge_experts(dense, moe, None)
  assert report["weights"][LAYERS[1]] == [0.25] * 4
  np.testing.assert_allclose(_flat(uniform)[f"{LAYERS[1]}/wo/kernel"],
                             flat_moe[f"{LAYERS[1]}/expert/wo/kernel"].astype(np.float64).mean(0),
                             rtol=1e-6, atol=1e-7)

  # A scanned MoE checkpoint (one block of one layer, repeated twice) merges alike.
  scanned = scan.stack_layers(moe, {("decoder",): 1})
  assert "layers" in scanned["decoder"]
  jax.tree.map(np.testing.assert_array_equal, merging.merge_experts(dense, scanned, usage)[0],
               params)


@pytest.mark.parametrize("shared", [0, 1])
def test_identical_experts_and_normalised_top2_gates_merge_exactly(moe_and_dense_params, shared):
  """Identical experts, top-2 gates renormalised to sum to 1, capacity 2 * group size (nothing
  dropped): each token's MoE output is g1 FFN(x) + g2 FFN(x) = FFN(x), so the merged dense model
  (every weighting gives the common expert) computes the MoE's logits. Shared experts ride along
  exactly in a dense FFN of hidden F + F (an FFN of concatenated hidden units is the sum of the
  two FFNs). The same params under top-1 Switch routing output p * FFN(x) with p < 1: the gate
  scale that merging cannot keep, so those logits differ."""
  router = routing.TopKRouter(k=2, renormalize=True)
  moe_net = tiny.network(num_experts=E, capacity_factor=E, router=router,
                         num_shared_experts=shared)
  dense_net = _dense(tiny.MLP * (1 + shared))
  # Without shared experts, the fixture's Switch params have the top-2 model's shapes.
  moe, dense = moe_and_dense_params if not shared else (_init(moe_net, 2), _init(dense_net, 3))
  moe = _flat(moe)
  for key in [k for k in moe if "/expert/" in k]:
    moe[key] = np.broadcast_to(moe[key][:1], moe[key].shape).copy()
  moe = traverse_util.unflatten_dict(moe, sep="/")
  usage = {layer: np.array([0.1, 0.2, 0.3, 0.4]) for layer in LAYERS}
  params, _ = merging.merge_experts(dense, moe, usage)

  tokens = jax.random.randint(jax.random.key(4), (2, tiny.LENGTH), 3, 384)
  y_moe = jax.jit(moe_net.apply)({"params": moe}, tokens)
  y_dense = jax.jit(dense_net.apply)({"params": params}, tokens)
  assert np.abs(np.asarray(y_dense)).max() > 0.1
  np.testing.assert_allclose(y_dense, y_moe, atol=2e-5, rtol=2e-5)
  if not shared:
    switch_net = tiny.network(num_experts=E, capacity_factor=E)
    y_switch = jax.jit(switch_net.apply)({"params": moe}, tokens)
    assert np.abs(np.asarray(y_switch) - np.asarray(y_dense)).max() > 1e-2
  else:  # the shared experts need their hidden units in the dense FFN
    with pytest.raises(ValueError, match=r"decoder/layers_0/mlp/wi_0/kernel has shape \(16, 32\) "
                                         r"in this model but the merged experts' \(16, 32\) \+ "
                                         r"the shared experts' \(16, 32\) = \(16, 64\)"):
      merging.merge_experts(moe_and_dense_params[1], moe, usage)


def test_expert_usage_of_a_real_training_log(baseline_dir):
  """The baseline run (2 MoE layers of 8 experts, 10 steps logged every step, an evaluation at
  step 10 whose eval/expert_load must not count)."""
  usage = merging.expert_usage(baseline_dir)
  assert sorted(usage) == list(LAYERS)
  records = [r for r in tiny.read_metrics(baseline_dir) if f"expert_load/{LAYERS[0]}" in r]
  assert [r["step"] for r in records] == list(range(1, BASELINE_STEPS + 1))
  for layer, fractions in usage.items():
    assert fractions.shape == (tiny.EXPERTS,) and np.all(fractions >= 0)
    np.testing.assert_allclose(fractions.sum(), 1.0, rtol=1e-12)
    loads = np.array([r[f"expert_load/{layer}"] for r in records])
    tokens = np.array([r["num_tokens"] for r in records])
    np.testing.assert_allclose(fractions, tokens @ loads / tokens.sum() / (
        tokens @ loads / tokens.sum()).sum(), rtol=1e-12)
    last = np.array(records[-1][f"expert_load/{layer}"])
    np.testing.assert_allclose(merging.expert_usage(baseline_dir, last_steps=1)[layer],
                               last / last.sum(), rtol=1e-12)


def test_expert_usage_weights_tokens_and_lets_the_last_record_of_a_step_win(tmp_path):
  key = f"expert_load/{LAYERS[0]}"
  lines = [{"step": 5, "num_tokens": 100.0, key: [1.0, 0.0]},
           {"step": 10, "num_tokens": 300.0, key: [0.0, 1.0]},
           {"step": 10, "eval/num_tokens": 50.0, f"eval/{key}": [0.9, 0.1]},
           {"step": 10, "num_tokens": 300.0, key: [0.5, 0.5]}]  # resumed: step 10 again
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  np.testing.assert_allclose(merging.expert_usage(str(tmp_path), last_steps=10)[LAYERS[0]],
                             [0.625, 0.375])  # (100 [1, 0] + 300 [.5, .5]) / 400
  np.testing.assert_allclose(merging.expert_usage(str(tmp_path), last_steps=5)[LAYERS[0]],
                             [0.5, 0.5])


def test_trainer_and_step0_checkpoint_merge_alike(baseline_dir, tmp_path):
  """train(merge_experts=True) with zero updates keeps the merged params: those of
  merge_experts with the baseline run's usage, and of the step-0 checkpoint that
  write_merged_checkpoint writes (which loads onto a mesh as evaluation loads it)."""
  dense_net = _dense()
  tiny.train(tmp_path / "ft", 1, net=dense_net, opt=optax.set_to_zero(),
             initial_checkpoint_path=baseline_dir, merge_experts=True)
  trained = ckpt_lib.load_params(str(tmp_path / "ft"))
  usage = merging.expert_usage(baseline_dir)
  expected, _ = merging.merge_experts(_init(dense_net, 5), ckpt_lib.load_params(baseline_dir),
                                      usage)
  jax.tree.map(np.testing.assert_array_equal, trained, expected)

  report = merging.write_merged_checkpoint(dense_net, baseline_dir, str(tmp_path / "m"), usage)
  assert len(report["merged"]) == 6 and not report["uniform"]
  assert os.path.isfile(tmp_path / "m" / "merge.json")
  mesh = partitioning.make_mesh((1, 1, 1))
  with jax.set_mesh(mesh):
    loaded = inference.load_params_onto_mesh(dense_net, str(tmp_path / "m"), mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), expected)
  with pytest.raises(ValueError, match="already exists: choose a new output directory"):
    merging.write_merged_checkpoint(dense_net, baseline_dir, str(tmp_path / "m"), usage)


def test_merge_gin_parses():
  gin_utils.parse_gin(["models/dense_tiny.gin", "runs/merge.gin"],
                      ["INITIAL_CHECKPOINT_PATH = 'moe'", "MODEL_DIR = 'out'"])
  assert gin.query_parameter("train.merge_experts") is True
  assert gin.query_parameter("train.expert_usage_from") is None


@pytest.mark.parametrize("usage,message", [
    ({LAYERS[0]: [1.0, 1.0, 1.0], LAYERS[1]: [1.0] * E},
     r"usage\['decoder/layers_0/mlp'\] has shape \(3,\), but the layer has 4 experts"),
    ({LAYERS[0]: [1.0, -0.5, 1.0, 1.0], LAYERS[1]: [1.0] * E},
     r"usage\['decoder/layers_0/mlp'\] must be finite and non-negative"),
    ({LAYERS[0]: [1.0, np.nan, 1.0, 1.0], LAYERS[1]: [1.0] * E}, "must be finite"),
    ({LAYERS[0]: [1.0] * E, LAYERS[1]: [0.0] * E},
     r"usage\['decoder/layers_1/mlp'\] is all zero"),
    ({LAYERS[0]: [1.0] * E}, r"usage has no entry for MoE layer 'decoder/layers_1/mlp'"),
    ([1.0] * E, "usage must be a mapping"),
])
def test_refuses_bad_usage(moe_and_dense_params, usage, message):
  moe, dense = moe_and_dense_params
  with pytest.raises(ValueError, match=message):
    merging.merge_experts(dense, moe, usage)


def test_refuses_what_cannot_merge(moe_and_dense_params, tmp_path):
  moe, dense = moe_and_dense_params
  with pytest.raises(ValueError, match="no dense FFN kernel of this model"):
    merging.merge_experts(dense, dense)  # dense -> dense: nothing to merge
  wide = jax.eval_shape(lambda: tiny.unbox_init(_dense(2 * tiny.MLP), jax.random.key(0)))
  wide = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), wide)
  with pytest.raises(ValueError, match=r"wi_0/kernel has shape \(16, 64\) in this model but the "
                                       r"merged experts' \(16, 32\) in the checkpoint"):
    merging.merge_experts(wide, moe)
  with pytest.raises(ValueError, match="expert_usage.last_steps must be a positive integer"):
    merging.expert_usage(str(tmp_path), last_steps=0)
  with pytest.raises(FileNotFoundError, match="metrics.jsonl' not found"):
    merging.expert_usage(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
  with pytest.raises(ValueError, match="holds no training record with expert_load/"):
    merging.expert_usage(str(tmp_path))
  # The trainer's options, refused before any work.
  for kwargs, message in [
      ({"merge_experts": True}, "train.merge_experts=True needs INITIAL_CHECKPOINT_PATH"),
      ({"merge_experts": True, "upcycle": True, "initial_checkpoint_path": "x"},
       "exclude each other"),
      ({"expert_usage_from": "x"}, "only read with train.merge_experts=True")]:
    with pytest.raises(ValueError, match=message):
      tiny.train(tmp_path / "run", 1, **kwargs)
  assert not os.path.exists(tmp_path / "run")
