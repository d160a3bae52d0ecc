"""Noisy top-k gating and hierarchical MoE (moe_jax.layers.noisy_routing), Shazeer et al. 2017.

References are float64 numpy written from the paper's formulas: the k-th largest logit
excluding i is found by deleting i and sorting (not by the top-(k+1) trick under test), and
Phi(z) = (1 + erf(z / sqrt 2)) / 2 with math.erf.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import dispatch as dispatch_lib
from moe_jax.layers import noisy_routing
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MoeLayer

E, D, S, G = 8, 6, 12, 2
PHI = np.vectorize(lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))))


def _x(seed=1, groups=G, length=S):
  return jnp.asarray(np.random.RandomState(seed).normal(0, 1, (groups, length, D)), jnp.float32)


def _w(seed, shape, scale=0.7):
  return jnp.asarray(np.random.RandomState(seed).normal(0, scale, shape), jnp.float32)


def _noisy_params(seed=0, num_experts=E):
  return {"router_weights": {"w": {"kernel": _w(seed, (D, num_experts))}},
          "noise_weights": {"w": {"kernel": _w(seed + 1, (D, num_experts))}}}


def _hier_params(num_groups, num_experts, seed=0):
  return {f"{level}{kind}": {"w": {"kernel": _w(seed + i, (D, n))}}
          for i, (level, kind, n) in enumerate([
              ("primary_", "weights", num_groups), ("primary_", "noise_weights", num_groups),
              ("secondary_", "weights", num_experts),
              ("secondary_", "noise_weights", num_experts)])}


def _route(router, params, x, num_experts=E, capacity=S, deterministic=True, rngs=None):
  return router.apply({"params": params}, x, num_experts=num_experts, capacity=capacity,
                      deterministic=deterministic, rngs=rngs)


def _gates_GSE(out, length=S):
  """Combine weights scattered back to [G, S, E] (capacity S: no token is dropped)."""
  token, combine, valid = (np.asarray(a) for a in
                           (out.token_index_GEC, out.combine_GEC, out.valid_GEC))
  num_groups, num_experts, _ = token.shape
  gates = np.zeros((num_groups, length, num_experts))
  g, e, _ = np.nonzero(valid)
  np.add.at(gates, (g, token[valid], e), combine[valid])
  return gates


# --- float64 references from the paper ----------------------------------------------------------


def _ref_cv2(v):
  v = np.asarray(v, np.float64).ravel()
  return v.var() / (v.mean()**2 + 1e-10)


def _ref_gates(h_NX, k):
  """Softmax over each row's k largest entries, 0 elsewhere."""
  gates = np.zeros_like(h_NX)
  for n, row in enumerate(h_NX):
    top = np.argsort(-row)[:k]
    gates[n, top] = np.exp(row[top] - row[top].max()) / np.exp(row[top] - row[top].max()).sum()
  return gates


def _ref_load_prob(clean_NX, noisy_NX, std_NX, k):
  """P(x, i) = Phi((clean_i - kth largest of noisy without i) / std_i); 1 when k >= X."""
  if k >= clean_NX.shape[1]:
    return np.ones_like(clean_NX)
  prob = np.zeros_like(clean_NX)
  for n in range(clean_NX.shape[0]):
    for i in range(clean_NX.shape[1]):
      kth = np.sort(np.delete(noisy_NX[n], i))[::-1][k - 1]
      prob[n, i] = PHI((clean_NX[n, i] - kth) / std_NX[n, i])
  return prob


def _ref_logits(x, params, prefix, noise_prefix=None):
  noise_prefix = noise_prefix or f"{prefix}noise_"
  x = np.asarray(x, np.float64).reshape(-1, D)
  clean = x @ np.asarray(params[f"{prefix}weights"]["w"]["kernel"], np.float64)
  raw = x @ np.asarray(params[f"{noise_prefix}weights"]["w"]["kernel"], np.float64)
  return clean, np.log1p(np.exp(raw)) + 1e-2


def _ref_noisy_losses(x, params, k):
  """(L_importance, L_load) of noise-free (eval) noisy top-k gating."""
  clean, std = _ref_logits(x, params, "router_", "noise_")
  return (_ref_cv2(_ref_gates(clean, k).sum(0)),
          _ref_cv2(_ref_load_prob(clean, clean, std, k).sum(0)))


def _ref_hier(x, params, num_groups, k1, k2):
  """Hierarchical gates [N, E] and (L_importance, L_load) (appendix B), noise-free."""
  clean_p, std_p = _ref_logits(x, params, "primary_")
  clean_s, std_s = _ref_logits(x, params, "secondary_")
  per = clean_s.shape[1] // num_groups
  gates_p = _ref_gates(clean_p, k1)
  load_p = _ref_load_prob(clean_p, clean_p, std_p, k1).sum(0)
  gates, load = np.zeros_like(clean_s), np.zeros((num_groups, per))
  for p in range(num_groups):
    cols = slice(p * per, (p + 1) * per)
    gates_s = _ref_gates(clean_s[:, cols], k2)
    gates[:, cols] = gates_p[:, p:p + 1] * gates_s
    members = gates_p[:, p] > 0
    if members.any():
      prob = _ref_load_prob(clean_s[members, cols], clean_s[members, cols],
                            std_s[members, cols], k2)
      load[p] = load_p[p] * prob.sum(0) / members.sum()
  return gates, _ref_cv2(gates.sum(0)), _ref_cv2(load)


# --- noisy top-k --------------------------------------------------------------------------------


def test_cv_squared_uses_population_variance():
  assert float(noisy_routing.cv_squared(jnp.full((E,), 3.0))) == 0.0
  np.testing.assert_allclose(noisy_routing.cv_squared(jax.nn.one_hot(2, E)), E - 1, rtol=1e-6)
  assert float(noisy_routing.cv_squared(jnp.zeros((E,)))) == 0.0  # no 0 / 0


def test_eval_is_noise_free_and_repeatable_training_is_noisy():
  router, params, x = noisy_routing.NoisyTopKRouter(k=2), _noisy_params(), _x()
  first, second = _route(router, params, x), _route(router, params, x)
  np.testing.assert_array_equal(_gates_GSE(first), _gates_GSE(second))
  clean, _ = _ref_logits(x, params, "router_", "noise_")
  np.testing.assert_allclose(_gates_GSE(first).reshape(-1, E), _ref_gates(clean, 2), atol=1e-6)
  train = lambda seed: _gates_GSE(_route(router, params, x, deterministic=False,
                                         rngs={"routing": jax.random.key(seed)}))
  assert not np.allclose(train(0), _gates_GSE(first))
  assert not np.allclose(train(0), train(1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_token_has_k_gates_summing_to_one(k):
  out = _route(noisy_routing.NoisyTopKRouter(k=k), _noisy_params(), _x(), deterministic=False,
               rngs={"routing": jax.random.key(0)})
  gates = _gates_GSE(out)
  assert np.all((gates > 0).sum(-1) == k)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_load_probability_matches_the_paper_with_noise(k):
  rng = np.random.RandomState(3)
  clean, noise, raw = (rng.normal(0, 1, (G, S, E)) for _ in range(3))
  std = np.log1p(np.exp(raw)) + 1e-2
  noisy = clean + noise * std
  gate_GSK, expert_GSK, prob = noisy_routing.noisy_top_k(
      *(jnp.asarray(v, jnp.float32) for v in (clean, noisy, std)), k)
  dense = np.zeros((G * S, E))
  np.put_along_axis(dense, np.asarray(expert_GSK).reshape(-1, k),
                    np.asarray(gate_GSK).reshape(-1, k), axis=-1)
  np.testing.assert_allclose(dense, _ref_gates(noisy.reshape(-1, E), k), atol=1e-6)
  ref = _ref_load_prob(clean.reshape(-1, E), noisy.reshape(-1, E), std.reshape(-1, E), k)
  np.testing.assert_allclose(np.asarray(prob).reshape(-1, E), ref, atol=1e-5)


def test_losses_match_the_paper_and_weights():
  router, params, x = noisy_routing.NoisyTopKRouter(k=2), _noisy_params(), _x()
  importance, load = _ref_noisy_losses(x, params, 2)
  assert importance > 0.01 and load > 0.01
  stats = _route(router, params, x).stats
  np.testing.assert_allclose(stats.load_balancing_loss, 0.1 * importance + 0.1 * load,
                             rtol=1e-5)
  only_load = noisy_routing.NoisyTopKRouter(k=2, importance_weight=0.0, load_weight=1.0)
  np.testing.assert_allclose(_route(only_load, params, x).stats.load_balancing_loss, load,
                             rtol=1e-5)


def test_load_loss_gradient_reaches_both_kernels_and_matches_finite_differences():
  router = noisy_routing.NoisyTopKRouter(k=2, importance_weight=0.0, load_weight=1.0)
  params, x = _noisy_params(), _x()
  loss = lambda p, det, rngs=None: _route(router, p, x, deterministic=det,
                                          rngs=rngs).stats.load_balancing_loss
  train_grads = jax.grad(loss)(params, False, {"routing": jax.random.key(0)})
  for name in ("router_weights", "noise_weights"):
    assert np.abs(np.asarray(train_grads[name]["w"]["kernel"])).max() > 1e-4, name
  grads = jax.grad(loss)(params, True)
  h = 1e-5
  for name, (d, e) in [("router_weights", (0, 3)), ("noise_weights", (2, 5)),
                       ("noise_weights", (4, 0))]:
    shifted = lambda sign: jax.tree.map(np.asarray, params) | {
        name: {"w": {"kernel": np.asarray(params[name]["w"]["kernel"], np.float64)
                     + sign * h * (np.eye(D)[:, [d]] @ np.eye(E)[[e]])}}}
    numeric = (_ref_noisy_losses(x, shifted(1), 2)[1]
               - _ref_noisy_losses(x, shifted(-1), 2)[1]) / (2 * h)
    np.testing.assert_allclose(grads[name]["w"]["kernel"][d, e], numeric, rtol=2e-3, atol=1e-5)


def test_zero_init_has_finite_losses():
  router = noisy_routing.NoisyTopKRouter(k=2)
  variables = router.init(jax.random.key(0), _x(), num_experts=E, capacity=S)
  assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(variables))
  stats = _route(router, variables["params"], _x()).stats
  # Ties go to experts 0 and 1 with gates 1/2: importance one of E - 1 ... a 2-hot: CV^2 = E/2 - 1.
  np.testing.assert_allclose(stats.load_balancing_loss, 0.1 * (E / 2 - 1), rtol=1e-5)


# --- hierarchical -------------------------------------------------------------------------------


@pytest.mark.parametrize("k1, k2", [(1, 2), (2, 2), (2, 1)])
def test_hierarchical_gates_and_losses_match_the_paper(k1, k2):
  num_groups = 4
  router = noisy_routing.HierarchicalRouter(num_groups=num_groups, k_primary=k1,
                                            k_secondary=k2)
  assert router.k == k1 * k2
  params, x = _hier_params(num_groups, E), _x()
  gates, importance, load = _ref_hier(x, params, num_groups, k1, k2)
  out = _route(router, params, x)
  np.testing.assert_allclose(_gates_GSE(out).reshape(-1, E), gates, atol=1e-6)
  np.testing.assert_allclose(out.stats.load_balancing_loss, 0.1 * importance + 0.1 * load,
                             rtol=1e-5)
  noisy = _gates_GSE(_route(router, params, x, deterministic=False,
                            rngs={"routing": jax.random.key(0)}))
  assert np.all((noisy > 0).sum(-1) == k1 * k2)
  np.testing.assert_allclose(noisy.sum(-1), 1.0, rtol=1e-6)


def test_hierarchical_rejects_bad_shapes():
  with pytest.raises(ValueError, match="k_primary=3 exceeds num_groups=2"):
    noisy_routing.HierarchicalRouter(num_groups=2, k_primary=3)
  with pytest.raises(ValueError, match="num_experts=6 must be num_groups=4"):
    _route(noisy_routing.HierarchicalRouter(num_groups=4), _hier_params(4, 6), _x(),
           num_experts=6)


# --- through MoeLayer ---------------------------------------------------------------------------

ROUTERS = {"noisy_top2": (noisy_routing.NoisyTopKRouter(k=2), _noisy_params),
           "hierarchical": (noisy_routing.HierarchicalRouter(num_groups=2, k_primary=2,
                                                             k_secondary=2),
                            lambda seed=0: _hier_params(2, E, seed))}


def _layer(router, **kwargs):
  return MoeLayer(num_experts=E, router=router, max_group_size=S, min_expert_capacity=1,
                  expert=ExpertMlp(intermediate_dim=16, activations=("relu",)), **kwargs)


def _layer_params(layer, router_params, length=S):
  params = layer.init(jax.random.key(5), jnp.ones((2, length, D)))["params"]
  params = jax.tree.map(lambda v: jnp.asarray(
      np.random.RandomState(v.size).normal(0, 0.5, v.shape), jnp.float32), params)
  return {**params, "router": router_params}


@pytest.mark.parametrize("name", ROUTERS)
def test_every_dispatch_backend_gives_the_same_output(name):
  router, router_params = ROUTERS[name]
  x = _x(seed=4).reshape(2, S, D)
  outputs, params = [], _layer_params(_layer(router), router_params())
  for backend in sorted(dispatch_lib.BACKENDS):
    layer = _layer(router, dispatch=backend, eval_capacity_factor=0.5)
    outputs.append(jax.jit(layer.apply)({"params": params}, x))
  assert np.abs(np.asarray(outputs[0])).max() > 0.1
  assert np.any(np.all(np.asarray(outputs[0]) == 0.0, axis=-1))  # capacity binds
  for y in outputs[1:]:
    np.testing.assert_allclose(y, outputs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ROUTERS)
def test_causal_routing_later_tokens_never_change_earlier_outputs(name):
  router, router_params = ROUTERS[name]
  layer = _layer(router.copy(causal=True), sequence_groups=True, expert_capacity=2)
  params = _layer_params(layer, router_params())
  x = _x(seed=6).reshape(2, S, D)
  apply = jax.jit(layer.apply)
  full = np.asarray(apply({"params": params}, x))
  assert np.any(np.all(full == 0.0, axis=-1))  # capacity binds
  for t in (3, 7):
    changed = x.at[:, t:].set(_x(seed=7).reshape(2, S, D)[:, t:])
    np.testing.assert_allclose(apply({"params": params}, changed)[:, :t], full[:, :t],
                               atol=1e-6)
