"""Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437, sec. 2.1.2) through training: the
bias update rule, its effect on a skewed router, gradient accumulation, checkpoints, exact
resume, fine-tuning and inference."""

import functools
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from moe_jax import inference
from moe_jax.layers.score_routing import (ROUTER_BIAS, ROUTER_LOAD, BiasLoad, SigmoidRouter,
                                          update_router_bias)
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import partitioning, trainer
from tests.train import tiny

GAMMA = 0.01  # a few steps of it visibly change the routing of the tiny LM


def _net():
  """The tiny LM with one layer, an MoE layer of sigmoid routing (one group per sequence)."""
  return tiny.network(num_layers=1, num_sparse_layers=1, moe=tiny.moe_layer(
      router=SigmoidRouter(k=2, bias_update_rate=GAMMA)))


def _biases(model_state):
  return traverse_util.flatten_dict(jax.device_get(model_state[ROUTER_BIAS]), sep="/")


def test_update_moves_each_bias_by_the_sign_of_its_load_deficit():
  """A router applied twice counts both calls: load [6, 1, 3, 2], mean 3, so expert 0 goes
  down by gamma, 1 and 3 up, 2 stays; routers that sowed nothing keep their bias."""
  state = {ROUTER_BIAS: {"a": {"router": {"bias": jnp.array([0.5, 0.0, 0.0, -1.0])}},
                         "b": {"router": {"bias": jnp.array([1.0, 2.0])}}}, "other": {"x": 1}}
  loads = {"a": {"router": {"bias": (BiasLoad(jnp.array([4.0, 1.0, 3.0, 1.0]), 0.1),
                                     BiasLoad(jnp.array([2.0, 0.0, 0.0, 1.0]), 0.1))}}}
  new = update_router_bias(state, loads)
  np.testing.assert_allclose(new[ROUTER_BIAS]["a"]["router"]["bias"], [0.4, 0.1, 0.0, -0.9])
  np.testing.assert_array_equal(new[ROUTER_BIAS]["b"]["router"]["bias"], [1.0, 2.0])
  assert new["other"] == {"x": 1}
  assert update_router_bias(state, {}) is state


def test_bias_updates_balance_a_skewed_router():
  """A router whose kernel sends every token to expert 0: max / mean expert load starts at
  E / k = 4 and falls as the bias of expert 0 goes down and the others' go up, to a small
  limit cycle (fixed tokens, fixed steps of +-gamma) below 1.5."""
  num_experts, d_model = 8, 16
  router = SigmoidRouter(k=2, bias_update_rate=0.02)
  x = np.random.RandomState(0).normal(0, 1, (4, 32, d_model)).astype(np.float32)
  x[..., 0] = 1.0
  kernel = np.random.RandomState(1).normal(0, 0.3, (d_model, num_experts)).astype(np.float32)
  kernel[0, 0] = 4.0  # +4 on expert 0's logit for every token
  params = {"router_weights": {"w": {"kernel": jnp.asarray(kernel)}}}

  @jax.jit
  def step(model_state):
    _, sown = router.apply({"params": params, **model_state}, jnp.asarray(x),
                           num_experts=num_experts, capacity=32, deterministic=False,
                           mutable=[ROUTER_LOAD])
    (load,) = sown[ROUTER_LOAD]["bias"]
    return update_router_bias(model_state, sown[ROUTER_LOAD]), load.load_E

  model_state = {ROUTER_BIAS: {"bias": jnp.zeros(num_experts)}}
  imbalance = []
  for _ in range(30):
    model_state, load_E = step(model_state)
    imbalance.append(float(load_E.max() / load_E.mean()))
  assert imbalance[0] == 4.0
  assert all(later <= earlier for earlier, later in zip(imbalance[:8], imbalance[1:8]))
  assert max(imbalance[-10:]) < 1.5
  bias = np.asarray(model_state[ROUTER_BIAS]["bias"])
  assert bias[0] < -0.2 and bias[0] == bias.min()


def test_microbatches_update_the_bias_like_the_full_batch():
  """One step, 1 vs 4 microbatches: the same bias update, gamma * sign(mean - load) with the
  load read from the full batch's expert_load metric (routing groups are sequences and no
  jitter, so microbatching does not change any choice)."""
  net, opt = _net(), optax.sgd(0.1)
  batch = tiny.padded_batch()
  mesh = partitioning.make_mesh((1, 1, 1))
  with jax.set_mesh(mesh):
    shardings = trainer.state_shardings(net, opt, mesh)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings.model_state))
    state = trainer.init_state(net, opt, shardings, jax.random.key(0))
    assert all((b == 0).all() for b in _biases(state.model_state).values())
    results = {}
    for m in (1, 4):
      new_state, metrics = jax.jit(functools.partial(
          trainer.train_step, network=net, optimizer=opt, num_microbatches=m))(
              state, batch, jax.random.key(3))
      results[m] = jax.device_get((new_state.model_state, metrics))
  (full, metrics), (micro, _) = results[1], results[4]
  biases = _biases(full)
  assert sorted(biases) == ["decoder/layers_0/mlp/router/bias"]
  for path, bias in biases.items():
    load = metrics[f"expert_load/{path.rsplit('/', 2)[0]}"]
    np.testing.assert_array_equal(bias, GAMMA * np.sign(load.mean() - load).astype(np.float32))
    assert np.abs(bias).max() > 0
  jax.tree.map(np.testing.assert_array_equal, micro, full)


def test_bias_is_checkpointed_resumed_fine_tuned_and_used_for_inference(tfds_dir, tmp_path):
  """A 4-step run (checkpoints at 2 and 4) vs one resumed from its step-2 checkpoint: same
  losses and biases. Fine-tuning from it starts from its biases, and inference loads them."""
  del tfds_dir
  straight, resumed, tuned = tmp_path / "straight", tmp_path / "resumed", tmp_path / "tuned"
  tiny.train(straight, 4, net=_net(), checkpoint_period=2)
  step2 = ckpt_lib.load_model_state(str(straight / ckpt_lib.CHECKPOINT_SUBDIR / "2"))
  final = ckpt_lib.load_model_state(str(straight))
  assert np.abs(np.concatenate(list(_biases(step2).values()))).max() > 0
  assert any(not np.array_equal(final_bias, _biases(step2)[path])
             for path, final_bias in _biases(final).items())

  shutil.copytree(straight / ckpt_lib.CHECKPOINT_SUBDIR / "2",
                  resumed / ckpt_lib.CHECKPOINT_SUBDIR / "2")
  tiny.train(resumed, 4, net=_net(), checkpoint_period=2)
  expected = tiny.losses_by_step(straight)
  assert {s: tiny.losses_by_step(resumed)[s] for s in (3, 4)} == {s: expected[s] for s in (3, 4)}
  jax.tree.map(np.testing.assert_array_equal, ckpt_lib.load_model_state(str(resumed)), final)

  # Fine-tuning: one step from the final biases moves each by 0 or +-gamma; from scratch every
  # bias would be 0 or +-gamma, but the final ones reach +-4 gamma.
  tiny.train(tuned, 1, net=_net(), initial_checkpoint_path=str(straight))
  tuned_biases = _biases(ckpt_lib.load_model_state(str(tuned)))
  assert max(np.abs(b).max() for b in _biases(final).values()) > 1.5 * GAMMA
  for path, bias in _biases(final).items():
    step = np.round((tuned_biases[path] - bias) / GAMMA)
    assert set(np.unique(step)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(tuned_biases[path], bias + step * GAMMA, atol=1e-6)

  loaded = inference.load_model_state_onto_mesh(_net(), str(straight),
                                                partitioning.make_mesh((1, 1, 1)))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), final)
  assert inference.load_model_state_onto_mesh(tiny.network(), str(straight),
                                              partitioning.make_mesh((1, 1, 1))) == {}


def test_scanned_layers_update_each_layers_bias_like_unrolled():
  """With scan_layers the biases stack to [layers, E]: one train step moves each layer's by
  its own load deficit, as the unrolled stack does."""
  from moe_jax.models import scan  # pylint: disable=g-import-not-at-top
  net = tiny.network(num_layers=2, num_sparse_layers=2, moe=tiny.moe_layer(
      router=SigmoidRouter(k=2, bias_update_rate=GAMMA)))
  scanned = net.clone(decoder=net.decoder.clone(scan_layers=True))
  # The biases move outside the optimizer: plain SGD keeps the two compilations small.
  opt, batch = optax.sgd(0.0), tiny.padded_batch()

  def one_step(network, params):
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params),
                               {ROUTER_BIAS: jax.tree.map(
                                   lambda b: jnp.zeros(b.shape, b.dtype), nn.unbox(jax.eval_shape(
                                       network.init, jax.random.key(0),
                                       **network.example_batch()))[ROUTER_BIAS])})
    step = jax.jit(functools.partial(trainer.train_step, network=network, optimizer=opt),
                   compiler_options={"xla_backend_optimization_level": 0})
    return _biases(step(state, batch, jax.random.key(1))[0].model_state)

  init = lambda network: nn.unbox(jax.jit(network.init)(
      jax.random.key(0), **network.example_batch()))["params"]  # eager init: ~10 s each
  params = init(net)
  abstract = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0),
                                     **scanned.example_batch()))["params"]
  want = one_step(net, params)
  got = one_step(scanned, scan.match_layout(params, abstract))
  assert len(want) == 2 and not np.allclose(*want.values())  # each layer's own update
  for path, bias in want.items():  # decoder/layers_<i>/mlp/router/bias
    i = int(path.split("/")[1].split("_")[1])
    stacked = got[path.replace(f"layers_{i}", "layers/layers_0")]
    np.testing.assert_allclose(stacked[i], bias, atol=1e-7)
