"""MoeLayer (moe_jax.layers.moe): grouping, dropped tokens, backends, dense limit, dtypes, metrics.

Inputs are x [B=2, L=16, D=8] with max_group_size=16, so G=2 groups of S=16 tokens (one per
sequence). Expected values come from the math, recomputed from the parameters in numpy.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import dispatch as dispatch_lib
from moe_jax.layers import moe, routing
from moe_jax.layers.experts import ExpertMlp
from moe_jax.train import partitioning
from tests.layers.compiler import HAS_COMPILER, NEEDS_COMPILER, OPENBLAS, without_compiler

E, D, F, B, L = 4, 8, 16, 2, 16
S = L  # max_group_size = L: one group per sequence


def _layer(router=None, **kwargs):
  kwargs = {"num_experts": E, "router": router or routing.SwitchRouter(),
            "expert": ExpertMlp(intermediate_dim=F), "max_group_size": S,
            "min_expert_capacity": 0, **kwargs}
  return moe.MoeLayer(**kwargs)


def _x(seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.RandomState(seed).normal(0, 1, (B, L, D)), dtype)


def _params(seed=0, activations=("relu",), router_scale=1.0):
  """MoeLayer params by hand (the names and shapes `init` gives; checked in the bf16 test)."""
  rng = np.random.RandomState(seed)
  normal = lambda scale, *shape: jnp.asarray(rng.normal(0, scale, shape), jnp.float32)
  wi = ["wi"] if len(activations) == 1 else [f"wi_{i}" for i in range(len(activations))]
  return {
      "router": {"router_weights": {"w": {"kernel": normal(router_scale, D, E)}}},
      "expert": {**{n: {"kernel": normal(D**-0.5, E, D, F)} for n in wi},
                 "wo": {"kernel": normal(F**-0.5, E, F, D)}},
  }


def _run(layer, params, x, mask=None, deterministic=True, rngs=None):
  """-> (y_BLD, sown RouterStats, the layer's RouterOutput)."""
  y, state = layer.apply(
      {"params": params}, x, mask, deterministic, rngs=rngs,
      capture_intermediates=lambda mdl, name: isinstance(mdl, routing.Router),
      mutable=[moe.MOE_STATS, "intermediates"])
  (stats,) = state[moe.MOE_STATS]["router_stats"]
  (routes,) = state["intermediates"]["router"]["__call__"]
  return y, stats, routes


def _jit_run(layer, params, x, deterministic=True):
  """_run compiled once (op by op, a new layer shape costs seconds of dispatch compiles)."""
  return jax.jit(lambda p, x: _run(layer, p, x, deterministic=deterministic))(params, x)


def _router_kernel(params):
  return np.asarray(params["router"]["router_weights"]["w"]["kernel"], np.float64)


def _probs_GSE(params, x):
  logits = np.asarray(x, np.float64).reshape(-1, S, D) @ _router_kernel(params)
  logits -= logits.max(-1, keepdims=True)
  return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _expert_ffn(params, x_ND, e, activations):
  """Expert e's FFN by hand (float64)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["expert"])
  acts = {"relu": lambda h: np.maximum(h, 0), "gelu": _gelu, "linear": lambda h: h}
  names = ["wi"] if len(activations) == 1 else [f"wi_{i}" for i in range(len(activations))]
  hidden = np.prod([acts[a](x_ND @ p[n]["kernel"][e]) for n, a in zip(names, activations)], 0)
  return hidden @ p["wo"]["kernel"][e]


def _kept_GS(routes):
  """[G, S] bool: the token holds at least one valid slot."""
  tokens, valid = np.asarray(routes.token_index_GEC), np.asarray(routes.valid_GEC)
  kept = np.zeros((tokens.shape[0], S), bool)
  for g in range(tokens.shape[0]):
    kept[g, tokens[g][valid[g]]] = True
  return kept


def _reference_kept_top1(probs_GSE, capacity, mask_GS=None):
  """Sequence-order top-1 routing by hand: which tokens keep a slot."""
  mask_GS = np.ones(probs_GSE.shape[:2], bool) if mask_GS is None else np.asarray(mask_GS)
  kept = np.zeros(probs_GSE.shape[:2], bool)
  for g, probs_SE in enumerate(probs_GSE):
    used = [0] * E
    for s, e in enumerate(probs_SE.argmax(-1)):
      if mask_GS[g, s] and used[e] < capacity:
        used[e] += 1
        kept[g, s] = True
  return kept


# --- grouping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, max_group_size, multiple, expected", [
    (64, 16, 1, 4),    # 4 groups of 16
    (60, 16, 1, 4),    # ceil(60 / 16) = 4 divides 60: 4 groups of 15
    (70, 16, 1, 5),    # 5 groups of 14
    (68, 16, 1, 17),   # 5, 6, 7 ... do not divide 68; 17 groups of 4
    (7, 4, 1, 7),      # prime token count: groups of 1
    (16, 32, 1, 1),    # fits in one group
    (64, 16, 8, 8),    # 4 groups would straddle 8 batch shards: 8 groups of 8
    (96, 16, 4, 8),    # ceil(96 / 16) = 6 -> next multiple of 4 is 8, divides 96
    (16, 32, 4, 4),    # one group would do, but 4 shards need 4
    (60, 16, 8, 4),    # 60 is not a multiple of 8: the shard constraint is dropped
])
def test_num_groups(num_tokens, max_group_size, multiple, expected):
  groups = moe.num_groups(num_tokens, max_group_size, multiple)
  assert groups == expected
  assert num_tokens % groups == 0 and num_tokens // groups <= max_group_size


# --- invalid configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"router": routing.TopKRouter(k=5)}, r"TopKRouter\.k"),
    ({"train_capacity_factor": 0.0}, "train_capacity_factor"),
    ({"train_capacity_factor": -1.0}, "train_capacity_factor"),
    ({"eval_capacity_factor": 0.0}, "eval_capacity_factor"),
    ({"eval_capacity_factor": -0.5}, "eval_capacity_factor"),
    ({"dispatch": "scatter"}, r"MoeLayer\.dispatch"),
    ({"num_experts": 0}, "num_experts"),
    ({"max_group_size": 0}, "max_group_size"),
    ({"min_expert_capacity": -1}, "min_expert_capacity"),
    ({"buffer_matmul": "einsum"}, r"MoeLayer\.buffer_matmul"),
])
def test_invalid_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    _layer(**kwargs)


def test_capacity_uses_train_and_eval_factors():
  layer = _layer(routing.TopKRouter(k=2), train_capacity_factor=1.25, eval_capacity_factor=0.25,
                 min_expert_capacity=3)
  assert layer.capacity(S, deterministic=False) == 10  # ceil(1.25 * 2 * 16 / 4)
  assert layer.capacity(S, deterministic=True) == 3    # ceil(2) = 2 < floor 3


# --- uniform routing ---------------------------------------------------------------------------


@pytest.mark.parametrize("router, k", [(routing.SwitchRouter(), 1), (routing.TopKRouter(k=2), 2)])
def test_uniform_routing_losses(router, k):
  layer = _layer(router)
  _, stats, _ = _run(layer, _params(router_scale=0.0), _x())
  # Equal probabilities 1/E: balance loss E * sum_e f_e / E = sum_e f_e = k.
  assert float(stats.load_balancing_loss) == k
  np.testing.assert_allclose(stats.z_loss, math.log(E)**2, rtol=1e-6)
  np.testing.assert_allclose(stats.router_confidence, 1.0 / E, rtol=1e-6)
  # top_k breaks ties towards the lower index: experts 0..k-1 get every choice.
  np.testing.assert_allclose(stats.expert_load_E, [1.0 / k] * k + [0.0] * (E - k))


# --- dropped tokens and metrics ----------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_dropped_token_output_is_exactly_zero(dispatch):
  layer = _layer(dispatch=dispatch, eval_capacity_factor=0.01)  # C = ceil(0.04) = 1
  assert layer.capacity(S, deterministic=True) == 1
  x = _x()
  params = _params()
  y, stats, routes = _run(layer, params, x)
  probs = _probs_GSE(params, x)
  kept = _kept_GS(routes)
  np.testing.assert_array_equal(kept, _reference_kept_top1(probs, capacity=1))
  # With C = 1, each group keeps one token per expert that anyone chose.
  assert kept.sum() == sum(len(set(p.argmax(-1))) for p in probs)
  y_GSD = np.asarray(y).reshape(-1, S, D)
  assert np.all(y_GSD[~kept] == 0.0)
  assert np.all(np.any(y_GSD[kept] != 0.0, axis=-1))
  # Kept token: its probability times its expert's FFN.
  for g, s in zip(*np.nonzero(kept)):
    e = probs[g, s].argmax()
    np.testing.assert_allclose(
        y_GSD[g, s], probs[g, s, e] * _expert_ffn(params, np.asarray(x).reshape(-1, S, D)[g, s],
                                                  e, ("relu",)), rtol=1e-4, atol=1e-5)
  # Metrics: hand-counted fraction of dropped tokens; expert load = share of top-1 choices.
  np.testing.assert_allclose(stats.fraction_dropped, 1.0 - kept.sum() / (B * L), rtol=1e-6)
  counts = np.bincount(probs.argmax(-1).ravel(), minlength=E)
  np.testing.assert_allclose(stats.expert_load_E, counts / (B * L), rtol=1e-6)
  np.testing.assert_allclose(np.sum(stats.expert_load_E), 1.0, rtol=1e-6)


def test_top2_metrics():
  layer = _layer(routing.TopKRouter(k=2), eval_capacity_factor=0.25)  # C = ceil(2) = 2
  x = _x(seed=1)
  params = _params()
  y, stats, routes = _run(layer, params, x)
  kept = _kept_GS(routes)
  assert 0 < kept.sum() < B * L
  assert np.all(np.asarray(y).reshape(-1, S, D)[~kept] == 0.0)
  np.testing.assert_allclose(stats.fraction_dropped, 1.0 - kept.sum() / (B * L), rtol=1e-6)
  top2 = np.argsort(-_probs_GSE(params, x), -1)[..., :2]
  counts = np.bincount(top2.ravel(), minlength=E)
  np.testing.assert_allclose(stats.expert_load_E, counts / (2 * B * L), rtol=1e-6)
  np.testing.assert_allclose(np.sum(stats.expert_load_E), 1.0, rtol=1e-6)


def test_metrics_count_real_tokens_when_a_group_is_all_padding():
  # Group 1 (the second sequence) is all padding, as in an eval batch padded with empty examples.
  layer = _layer(eval_capacity_factor=0.01)  # C = 1
  x = _x()
  params = _params()
  mask = jnp.asarray(np.arange(B)[:, None] == 0).repeat(L, 1)
  _, stats, routes = _run(layer, params, x, mask)
  kept = _kept_GS(routes)
  assert not kept[1].any()
  # Fractions over the 16 real tokens: the loads of the real tokens' choices sum to 1.
  np.testing.assert_allclose(np.sum(stats.expert_load_E), 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats.fraction_dropped, 1.0 - kept[0].sum() / S, rtol=1e-6)


# --- padding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_padding_tokens_output_zero_use_no_capacity_and_skip_losses(dispatch):
  layer = _layer(dispatch=dispatch, eval_capacity_factor=0.5)  # C = 2
  x = _x(seed=2)
  params = _params()
  # 4 padding tokens per group, at the front of group 0 and the back of group 1.
  mask_np = np.ones((B, L), bool)
  mask_np[0, :4] = False
  mask_np[1, -4:] = False
  y, stats, routes = _run(layer, params, x, jnp.asarray(mask_np))
  y_GSD = np.asarray(y).reshape(-1, S, D)
  probs = _probs_GSE(params, x)
  kept = _kept_GS(routes)
  np.testing.assert_array_equal(kept, _reference_kept_top1(probs, 2, mask_np))
  assert np.all(y_GSD[~mask_np] == 0.0)
  assert np.all(y_GSD[~kept] == 0.0)

  # Losses over the 12 real tokens of each group, averaged over groups.
  chosen = np.eye(E)[probs.argmax(-1)]
  f = np.stack([chosen[g][mask_np[g]].mean(0) for g in range(B)])
  p = np.stack([probs[g][mask_np[g]].mean(0) for g in range(B)])
  np.testing.assert_allclose(stats.load_balancing_loss, E * np.mean(np.sum(f * p, -1)), rtol=1e-5)
  logits = np.asarray(x, np.float64) @ _router_kernel(params)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(stats.z_loss, np.mean([np.mean(lse[g][mask_np[g]]**2)
                                                    for g in range(B)]), rtol=1e-5)
  np.testing.assert_allclose(stats.fraction_dropped,
                             1.0 - kept.sum() / mask_np.sum(), rtol=1e-6)
  np.testing.assert_allclose(np.sum(stats.expert_load_E), 1.0, rtol=1e-6)


# --- dispatch backends -------------------------------------------------------------------------


@pytest.mark.parametrize("router", [
    routing.SwitchRouter(), routing.TopKRouter(k=2), routing.ExpertChoiceRouter()],
    ids=["switch", "top2", "expert_choice"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("buffer_matmul", ["xla", OPENBLAS])
def test_einsum_and_gather_backends_agree(router, padded, buffer_matmul):
  x = _x(seed=3)
  mask = jnp.asarray(np.arange(L)[None, :] < np.array([[11], [16]])) if padded else None
  einsum_layer = _layer(router, dispatch="einsum", eval_capacity_factor=0.5)
  gather_layer = _layer(router, dispatch="gather", eval_capacity_factor=0.5,
                        buffer_matmul=buffer_matmul)
  params = _params()
  y_einsum, _, routes = _run(einsum_layer, params, x, mask)
  y_gather, _, _ = _run(gather_layer, params, x, mask)
  kept = _kept_GS(routes)
  if not isinstance(router, routing.ExpertChoiceRouter):
    assert 0 < kept.sum() < B * L  # some tokens dropped, some kept
  assert np.abs(np.asarray(y_einsum)).max() > 0.1
  np.testing.assert_allclose(y_gather, y_einsum, atol=1e-5, rtol=1e-5)
  # Tokens in no slot (dropped, padding, or chosen by no expert) get exactly 0 from both.
  for y in (y_einsum, y_gather):
    assert np.all(np.asarray(y).reshape(-1, S, D)[~kept] == 0.0)


# --- the dense limit ---------------------------------------------------------------------------


@pytest.mark.parametrize("activations, deterministic", [
    (("relu",), True), (("gelu", "linear"), False)])  # eval and train capacity factors
def test_top_e_routing_without_capacity_limit_is_the_dense_mixture(activations, deterministic):
  layer = _layer(routing.TopKRouter(k=E), expert=ExpertMlp(intermediate_dim=F,
                                                           activations=activations),
                 train_capacity_factor=1.0, eval_capacity_factor=1.0)
  assert layer.capacity(S, deterministic) == S  # ceil(1 * E * S / E) = S
  x = _x(seed=4)
  params = _params(seed=4, activations=activations, router_scale=0.5)
  y, stats, _ = _run(layer, params, x, deterministic=deterministic)
  x_ND = np.asarray(x, np.float64).reshape(-1, D)
  probs_NE = _probs_GSE(params, x).reshape(-1, E)
  expected = sum(probs_NE[:, e:e + 1] * _expert_ffn(params, x_ND, e, activations)
                 for e in range(E))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), expected, rtol=1e-4, atol=1e-5)
  assert float(stats.fraction_dropped) == 0.0
  # Every token picks every expert: f_e = 1, so the balance loss is E * sum_e P_e = E.
  np.testing.assert_allclose(stats.load_balancing_loss, E, rtol=1e-6)


# --- batch-prioritized routing -----------------------------------------------------------------


@pytest.mark.parametrize("router", [
    routing.SwitchRouter(batch_prioritized_routing=True),
    routing.TopKRouter(k=2, batch_prioritized_routing=True)], ids=["switch", "top2"])
def test_batch_prioritized_routing_output_is_invariant_to_token_order(router):
  layer = _layer(router, eval_capacity_factor=0.25)  # C = 1 (top-1) or 2 (top-2)
  x = _x(seed=5)
  params = _params()
  perm = np.random.RandomState(6).permutation(L)
  inverse = np.argsort(perm)
  y, _, routes = _run(layer, params, x)
  y_perm, _, routes_perm = _run(layer, params, x[:, perm])
  kept = _kept_GS(routes)
  assert 0 < kept.sum() < B * L
  np.testing.assert_array_equal(_kept_GS(routes_perm)[:, inverse], kept)
  np.testing.assert_allclose(np.asarray(y_perm)[:, inverse], y, rtol=1e-6, atol=1e-7)
  # Kept tokens are the ones with the highest top-1 probability among those sharing a choice.
  if router.k == 1:
    probs = _probs_GSE(params, x)
    for g in range(B):
      for e in range(E):
        mine = probs[g].argmax(-1) == e
        if (mine & kept[g]).any() and (mine & ~kept[g]).any():
          assert probs[g, mine & kept[g], e].min() > probs[g, mine & ~kept[g], e].max()


# --- dtypes and gradients ----------------------------------------------------------------------


def test_bfloat16_model_keeps_router_in_float32():
  layer = _layer(dtype=jnp.bfloat16, expert=ExpertMlp(intermediate_dim=F, dtype=jnp.bfloat16))
  x = _x(dtype=jnp.bfloat16)
  params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
  # init gives the parameter tree that the other tests build by hand.
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(_params())
  assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(jnp.shape, _params())
  y, state = layer.apply({"params": params}, x, capture_intermediates=True,
                         mutable=[moe.MOE_STATS, "intermediates"])
  inter = state["intermediates"]
  assert y.dtype == jnp.bfloat16
  assert params["router"]["router_weights"]["w"]["kernel"].dtype == jnp.float32
  assert inter["router"]["router_weights"]["__call__"][0].dtype == jnp.float32  # logits
  routes = inter["router"]["__call__"][0]
  assert routes.combine_GEC.dtype == jnp.float32
  for leaf in jax.tree_util.tree_leaves(state[moe.MOE_STATS]):
    assert leaf.dtype == jnp.float32
  # The experts compute in bfloat16 from float32 parameters.
  assert inter["expert"]["wi"]["__call__"][0].dtype == jnp.bfloat16
  assert params["expert"]["wi"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_router_gradient_through_combine_weights(dispatch):
  layer = _layer(dispatch=dispatch, eval_capacity_factor=0.5)  # C = 2: some tokens dropped
  x = _x(seed=7)
  params = _params(router_scale=0.5)
  r_BLD = jnp.asarray(np.random.RandomState(8).normal(0, 1, (B, L, D)), jnp.float32)
  loss = lambda p: jnp.sum(layer.apply({"params": p}, x) * r_BLD)
  grad = jax.jit(jax.grad(loss))(params)["router"]["router_weights"]["w"]["kernel"]
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0

  # By hand: y_s = p_e(s) FFN_e(x_s) for a kept token, so with c_s = r_s . FFN_e(x_s),
  # dL/dW[:, j] = sum_kept c_s p_e (delta_ej - p_j) x_s.
  _, _, routes = _run(layer, params, x)
  kept = _kept_GS(routes).ravel()
  probs = _probs_GSE(params, x).reshape(-1, E)
  x_ND = np.asarray(x, np.float64).reshape(-1, D)
  r_ND = np.asarray(r_BLD, np.float64).reshape(-1, D)
  expected = np.zeros((D, E))
  for n in np.nonzero(kept)[0]:
    e = probs[n].argmax()
    c = r_ND[n] @ _expert_ffn(params, x_ND[n], e, ("relu",))
    expected += np.outer(x_ND[n], c * probs[n, e] * (np.eye(E)[e] - probs[n]))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


# --- the experts over the filled slots only (buffer_matmul="openblas") -------------------------


def test_filled_slots_extend_to_the_last_valid_slot():
  valid_GEC = np.array([[[True, True, False, False], [False, False, False, False]],
                        [[True, False, True, False], [True, True, True, True]]])
  routes = routing.RouterOutput(jnp.zeros(valid_GEC.shape, jnp.int32),
                                jnp.zeros(valid_GEC.shape), jnp.asarray(valid_GEC), None)
  extent_EG = dispatch_lib.filled_slots(routes).extent_EG
  # [E, G]: expert 0 fills 2 slots in group 0 and up to slot 2 in group 1 (slot 1 a hole,
  # computed with the rest); expert 1 none, then all 4.
  np.testing.assert_array_equal(extent_EG, [[2, 3], [0, 4]])


@NEEDS_COMPILER
@pytest.mark.parametrize("router", [
    routing.SwitchRouter(), routing.TopKRouter(k=2), routing.ExpertChoiceRouter()],
    ids=["switch", "top2", "expert_choice"])
def test_gather_over_filled_slots_equals_every_slot(router):
  """Outputs and gradients (params, x) of gather whose experts skip the empty slots equal
  XLA's einsum over every slot: 2 groups (an expert's dW sums two buffers), padding, drops."""
  x = _x(seed=4)
  mask = jnp.asarray(np.arange(L)[None, :] < np.array([[13], [16]]))
  r_BLD = jnp.asarray(np.random.RandomState(5).normal(0, 1, (B, L, D)), jnp.float32)
  params = _params(seed=4, activations=("gelu", "linear"))
  results = {}
  for kernel in ("xla", "openblas"):
    layer = _layer(router, dispatch="gather", eval_capacity_factor=0.75, buffer_matmul=kernel,
                   expert=ExpertMlp(intermediate_dim=F, activations=("gelu", "linear")))
    loss = lambda p, x, layer=layer: jnp.sum(_run(layer, p, x, mask)[0] * r_BLD)
    results[kernel] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  (want, want_grads), (got, got_grads) = results["xla"], results["openblas"]
  assert abs(float(want)) > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert np.abs(w).max() > 0
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())


def test_buffer_matmul_default_and_refusals(monkeypatch, tmp_path):
  """openblas by default for gather on one CPU device (where the kernel builds), xla for the
  einsum reference and on a mesh of several devices, where asking for openblas is refused
  by name; without a compiler it is refused by name and xla is the default."""
  assert dispatch_lib.default_buffer_matmul("einsum") == "xla"
  assert dispatch_lib.default_buffer_matmul("gather") == ("openblas" if HAS_COMPILER else "xla")
  mesh = partitioning.make_mesh((2, 4, 1))
  with jax.set_mesh(mesh), partitioning.axis_rules():
    assert dispatch_lib.default_buffer_matmul("gather") == "xla"
    if HAS_COMPILER:
      layer = _layer(dispatch="gather", buffer_matmul="openblas", max_group_size=4)
      with pytest.raises(ValueError, match=r"MoeLayer\.buffer_matmul='openblas'.*8"):
        jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((8, 4, D)))
  with without_compiler(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"MoeLayer\.buffer_matmul='openblas'.*no-such-compiler"):
      _layer(dispatch="gather", buffer_matmul="openblas")
    assert dispatch_lib.default_buffer_matmul("gather") == "xla"


# --- gather combine: empty slots add nothing ---------------------------------------------------


def test_gather_combine_ignores_empty_slots_even_when_their_outputs_are_nan():
  """Empty slots point at token 0 with weight 0; their expert outputs are garbage (here NaN,
  as an expert may produce for an all-zero input in low precision). They must not reach any
  token: 0 * NaN would poison token 0 if they were added with weight 0."""
  groups, experts, capacity, group_size, d = 2, 3, 2, 4, 5
  token = np.array([[[2, 0], [1, 3], [0, 0]],    # expert 0 holds token 2; expert 2 is empty
                    [[0, 1], [3, 0], [0, 0]]])   # group 1: token 0 only in expert 0, slot 0
  valid = np.array([[[True, False], [True, True], [False, False]],
                    [[True, True], [True, False], [False, False]]])
  weight = np.where(valid, np.random.RandomState(0).uniform(0.1, 1.0, valid.shape), 0.0)
  routes = routing.RouterOutput(
      jnp.asarray(token, jnp.int32), jnp.asarray(weight, jnp.float32), jnp.asarray(valid),
      stats=None)
  y_EGCD = np.random.RandomState(1).normal(0, 1, (experts, groups, capacity, d))
  y_EGCD[~valid.transpose(1, 0, 2)] = np.nan
  got = np.asarray(dispatch_lib.gather_combine(jnp.asarray(y_EGCD, jnp.float32), routes,
                                               group_size))
  expected = np.zeros((groups, group_size, d))
  for g, e, c in zip(*np.nonzero(valid)):
    expected[g, token[g, e, c]] += weight[g, e, c] * y_EGCD[e, g, c]
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  # Group 0's token 0 sits in no slot at all (only empty slots point at it): exactly 0.
  assert np.all(got[0, 0] == 0.0)


# --- per-sequence groups and a fixed capacity --------------------------------------------------


def test_sequence_groups_route_each_row_alone():
  # With sequence_groups, max_group_size is ignored: one group per row (S = L), C from S.
  top2 = lambda **kw: _layer(routing.TopKRouter(k=2), eval_capacity_factor=0.25, **kw)
  layer = top2(max_group_size=4, sequence_groups=True)
  x = _x(seed=9)
  params = _params()

  def run_all(params, x):
    rows = jax.vmap(lambda x_LD: _run(top2(max_group_size=L), params, x_LD[None]))(x)
    return _run(layer, params, x), rows, _run(top2(max_group_size=B * L), params, x)

  (y, stats, routes), (y_rows, _, routes_rows), (y_whole, _, routes_whole) = jax.jit(run_all)(
      params, x)
  assert routes.valid_GEC.shape == (B, E, 2)  # G = B rows, C = ceil(0.25 * 2 * 16 / 4) = 2
  np.testing.assert_array_equal(y, y_rows[:, 0])
  for field in ("token_index_GEC", "combine_GEC", "valid_GEC"):
    np.testing.assert_array_equal(getattr(routes, field), getattr(routes_rows, field)[:, 0])
  kept = _kept_GS(routes)
  assert 0 < kept.sum() < B * L
  np.testing.assert_allclose(stats.fraction_dropped, 1 - kept.mean(), rtol=1e-6)
  # Not what one group over the whole batch gives (C = 4, the rows compete for it).
  assert routes_whole.valid_GEC.shape == (1, E, 4)
  assert not np.allclose(y_whole, y)


def test_expert_capacity_fixes_slots_whatever_the_length():
  layer = _layer(expert_capacity=3, sequence_groups=True, train_capacity_factor=8.0,
                 eval_capacity_factor=0.01, min_expert_capacity=5)
  # Neither capacity factor nor min_expert_capacity counts; only the group size caps C.
  for deterministic in (True, False):
    assert [layer.capacity(s, deterministic) for s in (2, 3, 8, 16, 4096)] == [2, 3, 3, 3, 3]
  params = _params()
  for length, deterministic in ((8, False), (16, True)):
    x = _x(seed=10)[:, :length]
    y, stats, routes = _jit_run(layer, params, x, deterministic=deterministic)
    assert routes.valid_GEC.shape == (B, E, 3)
    logits = np.asarray(x, np.float64) @ _router_kernel(params)  # rows are the groups
    kept = np.zeros((B, length), bool)
    for b in range(B):
      kept[b, np.asarray(routes.token_index_GEC[b])[np.asarray(routes.valid_GEC[b])]] = True
    np.testing.assert_array_equal(kept, _reference_kept_top1(logits, 3))  # argmax of logits
    assert 0 < kept.sum() < B * length
    np.testing.assert_allclose(stats.fraction_dropped, 1 - kept.mean(), rtol=1e-6)
    assert np.all(np.asarray(y)[~kept] == 0.0)


def test_expert_capacity_must_be_positive():
  with pytest.raises(ValueError, match=r"MoeLayer\.expert_capacity"):
    _layer(expert_capacity=0)


# --- groups follow the batch sharding named by the logical-axis rules --------------------------


@pytest.mark.parametrize("rules, shards", [
    (partitioning.LOGICAL_AXIS_RULES, 8),          # batch over ('data', 'expert') = 2 x 4
    ((("batch", "data"),), 2),                     # other rules: batch over 'data' only
    ((("batch", None),), 1),                       # batch replicated
    ((), 1),                                       # no rule for 'batch'
])
def test_groups_align_with_the_batch_shards_the_rules_name(rules, shards):
  layer = _layer(max_group_size=L)  # alone: G = 2 groups of 16
  mesh = partitioning.make_mesh((2, 4, 1))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert moe._batch_shards() == shards  # pylint: disable=protected-access
    _, state = jax.eval_shape(lambda x: layer.init_with_output(
        jax.random.key(0), x, capture_intermediates=lambda m, _: isinstance(m, routing.Router)),
        _x())
  (routes,) = state["intermediates"]["router"]["__call__"]
  # Fewest groups of <= 16 tokens that split evenly over the shards: max(2, shards).
  assert routes.valid_GEC.shape[0] == max(2, shards)
  assert moe._batch_shards() == 1  # pylint: disable=protected-access  (no mesh)
