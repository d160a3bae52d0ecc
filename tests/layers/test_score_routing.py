"""Cosine (X-MoE) and sigmoid (DeepSeek-V3) routers (moe_jax.layers.score_routing).

References are float64 numpy written from the papers' formulas; routing is read back from the
buffers with capacity S, so no token is dropped and each token's gates are its k choices.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import score_routing
from moe_jax.layers.score_routing import ROUTER_BIAS, ROUTER_LOAD, CosineRouter, SigmoidRouter

E, D, S, G, P = 8, 12, 10, 3, 4


def _x(seed=1):
  return jnp.asarray(np.random.RandomState(seed).normal(0, 1, (G, S, D)), jnp.float32)


def _w(seed, shape, scale=1.0):
  return jnp.asarray(np.random.RandomState(seed).normal(0, scale, shape), jnp.float32)


def _mask():
  mask = np.ones((G, S), bool)
  mask[1, 6:] = False  # padding at the end of group 1
  return jnp.asarray(mask)


def _gates_GSE(out):
  """Combine weights scattered back to [G, S, E] (capacity S: no token is dropped)."""
  token, combine, valid = (np.asarray(a) for a in
                           (out.token_index_GEC, out.combine_GEC, out.valid_GEC))
  gates = np.zeros((token.shape[0], S, token.shape[1]))
  g, e, _ = np.nonzero(valid)
  np.add.at(gates, (g, token[valid], e), combine[valid])
  return gates


def _route(router, variables, x, mask=None, deterministic=True, rngs=None, mutable=False):
  return router.apply(variables, x, num_experts=E, capacity=S, padding_mask_GS=mask,
                      deterministic=deterministic, rngs=rngs, mutable=mutable)


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _ref_switch_loss(probs_GSE, chosen_GSE, mask_GS):
  """Switch balance loss E * sum_e f_e P_e per group (f_e: fraction of the real tokens whose
  choices include e), groups weighted by their real tokens."""
  losses, tokens = [], []
  for probs, chosen, mask in zip(probs_GSE, chosen_GSE, mask_GS):
    n = mask.sum()
    f = chosen[mask].sum(0) / max(n, 1)
    p = probs[mask].sum(0) / max(n, 1)
    losses.append(E * (f * p).sum())
    tokens.append(n)
  return np.dot(losses, tokens) / sum(tokens)


# --- cosine router ------------------------------------------------------------------------------

COSINE = CosineRouter(k=2, projection_dim=P)


def _cosine_params(log_tau=math.log(0.07)):
  return {"projection": {"w": {"kernel": _w(2, (D, P))}}, "expert_embeddings": _w(3, (E, P)),
          "log_temperature": jnp.asarray(log_tau, jnp.float32)}


def _ref_cosine_logits(x, params, tau):
  h = np.asarray(x, np.float64) @ np.asarray(params["projection"]["w"]["kernel"], np.float64)
  w = np.asarray(params["expert_embeddings"], np.float64)
  h /= np.linalg.norm(h, axis=-1, keepdims=True)
  w /= np.linalg.norm(w, axis=-1, keepdims=True)
  return h @ w.T / tau


def test_cosine_routing_matches_the_paper():
  params, x, mask = _cosine_params(), _x(), _mask()
  logits = _ref_cosine_logits(x, params, 0.07)
  probs = _softmax(logits)
  top2 = np.argsort(-probs, axis=-1)[..., :2]
  expected = np.zeros_like(probs)
  np.put_along_axis(expected, top2, np.take_along_axis(probs, top2, -1), -1)
  out = _route(COSINE, {"params": params}, x, mask)
  np.testing.assert_allclose(_gates_GSE(out), expected * np.asarray(mask)[..., None], atol=1e-5)
  chosen = np.zeros_like(probs)
  np.put_along_axis(chosen, top2, 1.0, -1)
  np.testing.assert_allclose(out.stats.load_balancing_loss,
                             _ref_switch_loss(probs, chosen, np.asarray(mask)), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(out.stats.z_loss, (lse**2)[np.asarray(mask)].mean(), rtol=1e-5)


def test_cosine_init_shapes_axes_and_temperature():
  variables = COSINE.init(jax.random.key(0), _x(), num_experts=E, capacity=S)
  params = variables["params"]
  assert params["projection"]["w"]["kernel"].names == ("embed", "unmodeled")
  assert params["expert_embeddings"].value.shape == (E, P)
  assert params["expert_embeddings"].names == (None, "unmodeled")  # replicated
  np.testing.assert_allclose(params["log_temperature"].value, math.log(0.07), rtol=1e-6)


@pytest.mark.parametrize("scale", [3.7, 2.0**20])
def test_cosine_routing_is_invariant_to_input_scale(scale):
  """cos(a x W, w_e) = cos(x W, w_e) for a > 0: same choices, gates and losses, also with
  (multiplicative) jitter under the same rng."""
  params, x, mask = _cosine_params(), _x(), _mask()
  jittery = CosineRouter(k=2, projection_dim=P, jitter_noise=0.1)
  for router, deterministic in [(COSINE, True), (jittery, False)]:
    rngs = {"routing": jax.random.key(4)}
    base, scaled = (_route(router, {"params": params}, a * x, mask, deterministic, rngs)
                    for a in (1.0, scale))
    np.testing.assert_array_equal(scaled.token_index_GEC, base.token_index_GEC)
    np.testing.assert_array_equal(scaled.valid_GEC, base.valid_GEC)
    np.testing.assert_allclose(scaled.combine_GEC, base.combine_GEC, rtol=1e-5, atol=1e-7)
    for name in ("load_balancing_loss", "z_loss", "router_confidence"):
      np.testing.assert_allclose(getattr(scaled.stats, name), getattr(base.stats, name),
                                 rtol=1e-5, err_msg=name)
  assert not np.allclose(_gates_GSE(_route(jittery, {"params": params}, x, mask, False,
                                           {"routing": jax.random.key(4)})),
                         _gates_GSE(_route(COSINE, {"params": params}, x, mask)))


@pytest.mark.parametrize("log_tau, tau", [(math.log(1e-5), 0.01), (math.log(50.0), 1.0),
                                          (math.log(0.2), 0.2)])
def test_cosine_temperature_is_clamped(log_tau, tau):
  """tau = exp(clip(log_tau, log 0.01, log 1)); log_tau has no gradient outside the range."""
  params, x = _cosine_params(log_tau), _x()
  logits = _ref_cosine_logits(x, params, tau)
  out = _route(COSINE, {"params": params}, x)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  np.testing.assert_allclose(out.stats.z_loss, (lse**2).mean(), rtol=1e-5)
  grad = jax.grad(lambda p: _route(COSINE, {"params": p}, x).stats.z_loss)(params)
  assert (float(grad["log_temperature"]) == 0.0) == (tau != 0.2)


def test_zero_token_routes_uniformly_without_nans():
  """A zero token projects to 0; the eps in the L2 norm makes its cosines 0, not NaN."""
  params, x = _cosine_params(), _x().at[0, 3].set(0.0)
  gates = _gates_GSE(_route(COSINE, {"params": params}, x))[0, 3]
  np.testing.assert_allclose(gates[gates > 0], [1.0 / E, 1.0 / E], rtol=1e-6)
  grad = jax.grad(lambda p: _route(COSINE, {"params": p}, x).stats.z_loss)(params)
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(grad))


def test_cosine_rejects_bad_fields():
  with pytest.raises(ValueError, match="CosineRouter.initial_temperature=2.0 is outside"):
    CosineRouter(initial_temperature=2.0)
  with pytest.raises(ValueError, match="CosineRouter needs 0 < min_temperature"):
    CosineRouter(min_temperature=0.0)
  with pytest.raises(ValueError, match="CosineRouter.projection_dim"):
    CosineRouter(projection_dim=0)


# --- sigmoid router -----------------------------------------------------------------------------


def _sigmoid_vars(bias=None):
  return {"params": {"router_weights": {"w": {"kernel": _w(5, (D, E))}}},
          ROUTER_BIAS: {"bias": jnp.zeros((E,)) if bias is None else jnp.asarray(bias)}}


def _ref_scores(x, variables):
  logits = np.asarray(x, np.float64) @ np.asarray(
      variables["params"]["router_weights"]["w"]["kernel"], np.float64)
  return 1.0 / (1.0 + np.exp(-logits))


def _ref_sigmoid_gates(scores, bias, k, renormalize, scale):
  """Top-k of s + b chooses; the gates are the chosen s (renormalised), times scale."""
  chosen = np.argsort(-(scores + bias), axis=-1, kind="stable")[..., :k]
  picked = np.take_along_axis(scores, chosen, -1)
  if renormalize:
    picked = picked / picked.sum(-1, keepdims=True)
  gates = np.zeros_like(scores)
  np.put_along_axis(gates, chosen, picked * scale, -1)
  return gates, chosen


@pytest.mark.parametrize("renormalize, scale", [(True, 1.0), (False, 2.5)])
def test_sigmoid_gates_are_the_chosen_scores(renormalize, scale):
  router = SigmoidRouter(k=2, renormalize=renormalize, route_scale=scale)
  variables, x = _sigmoid_vars(), _x()
  expected, _ = _ref_sigmoid_gates(_ref_scores(x, variables), 0.0, 2, renormalize, scale)
  np.testing.assert_allclose(_gates_GSE(_route(router, variables, x)), expected, atol=1e-6)


def test_bias_changes_the_choice_but_not_the_weights():
  """A hand-set bias moves tokens onto expert 6 and off the busiest expert; each chosen
  expert's gate is still its sigmoid score over the sum of the chosen scores."""
  router, x = SigmoidRouter(k=2), _x()
  scores = _ref_scores(x, _sigmoid_vars())
  busiest = np.bincount(np.argmax(scores, -1).ravel(), minlength=E).argmax()
  assert busiest != 6
  bias = np.zeros(E)
  bias[6], bias[busiest] = 0.3, -0.3
  unbiased = _gates_GSE(_route(router, _sigmoid_vars(), x))
  biased = _gates_GSE(_route(router, _sigmoid_vars(bias), x))
  expected, chosen = _ref_sigmoid_gates(scores, bias, 2, True, 1.0)
  np.testing.assert_allclose(biased, expected, atol=1e-6)
  assert not np.array_equal(biased > 0, unbiased > 0)  # the chosen sets changed
  assert (biased[..., 6] > 0).sum() > (unbiased[..., 6] > 0).sum()
  picked = np.take_along_axis(scores, chosen, -1)
  np.testing.assert_allclose(np.take_along_axis(biased, chosen, -1),
                             picked / picked.sum(-1, keepdims=True), atol=1e-6)


def _ref_sequence_loss(scores, chosen, mask, k):
  """DeepSeek-V3 eq. 17-20 per group, groups weighted by their real tokens."""
  losses, tokens = [], []
  for g in range(scores.shape[0]):
    real = np.nonzero(mask[g])[0]
    t = len(real)
    count = np.zeros(E)
    for s in real:
      for e in chosen[g, s]:
        count[e] += 1
    f = E / (k * t) * count
    p = sum(scores[g, s] / scores[g, s].sum() for s in real) / t
    losses.append(float(f @ p))
    tokens.append(t)
  return np.dot(losses, tokens) / sum(tokens)


def test_sequence_balance_loss_matches_the_paper():
  k = 1
  router, variables, x, mask = SigmoidRouter(k=k), _sigmoid_vars(), _x(), _mask()
  variables[ROUTER_BIAS]["bias"] = _w(9, (E,), 0.2)  # the counts follow the biased choice
  scores = _ref_scores(x, variables)
  _, chosen = _ref_sigmoid_gates(scores, np.asarray(variables[ROUTER_BIAS]["bias"]), k, True,
                                 1.0)
  out = _route(router, variables, x, mask)
  expected = _ref_sequence_loss(scores, chosen, np.asarray(mask), k)
  assert abs(expected - 1.0) > 0.05  # not balanced: the check has something to see
  np.testing.assert_allclose(out.stats.load_balancing_loss, expected, rtol=1e-5)
  assert float(out.stats.z_loss) == 0.0
  # Perfect balance is 1: equal scores, and each expert chosen by k/E of the tokens (k = 3).
  even_GSE = jnp.full((1, E, E), 0.5)
  expert_GSK = (jnp.arange(E)[:, None] + jnp.arange(3)[None]) % E
  np.testing.assert_allclose(score_routing.sequence_balance_loss(
      even_GSE, expert_GSK[None], jnp.ones((1, E), bool)), 1.0, rtol=1e-6)


def test_training_sows_the_load_of_real_tokens_only():
  router, variables, x, mask = SigmoidRouter(k=2), _sigmoid_vars(), _x(), _mask()
  _, chosen = _ref_sigmoid_gates(_ref_scores(x, variables), 0.0, 2, True, 1.0)
  expected = np.bincount(chosen[np.asarray(mask)].ravel(), minlength=E)
  _, state = _route(router, variables, x, mask, deterministic=False, mutable=[ROUTER_LOAD])
  (load,) = state[ROUTER_LOAD]["bias"]
  np.testing.assert_array_equal(load.load_E, expected)
  assert load.rate == router.bias_update_rate
  _, state = _route(router, variables, x, mask, deterministic=True, mutable=[ROUTER_LOAD])
  assert ROUTER_LOAD not in state


def test_bias_collection_is_required_unless_balancing_is_off():
  variables, x = _sigmoid_vars(), _x()
  with pytest.raises(ValueError, match="reads its expert bias from the 'router_bias'"):
    _route(SigmoidRouter(), {"params": variables["params"]}, x)
  off = SigmoidRouter(bias_update_rate=0.0)
  assert ROUTER_BIAS not in off.init(jax.random.key(0), x, num_experts=E, capacity=S)
  init = SigmoidRouter().init(jax.random.key(0), x, num_experts=E, capacity=S)
  assert init[ROUTER_BIAS]["bias"].names == ("unmodeled",)
  np.testing.assert_array_equal(init[ROUTER_BIAS]["bias"].value, np.zeros(E))
  np.testing.assert_allclose(_gates_GSE(_route(off, {"params": variables["params"]}, x)),
                             _gates_GSE(_route(SigmoidRouter(), variables, x)))


def test_sigmoid_rejects_bad_fields():
  with pytest.raises(ValueError, match="SigmoidRouter.route_scale"):
    SigmoidRouter(route_scale=0.0)
  with pytest.raises(ValueError, match="SigmoidRouter.bias_update_rate"):
    SigmoidRouter(bias_update_rate=-1e-3)
  with pytest.raises(ValueError, match="SigmoidRouter.second_expert_policy"):
    SigmoidRouter(second_expert_policy="random")


def test_sigmoid_causal_routing_later_tokens_never_change_earlier_gates():
  """Capacity 2 binds; with causal=True a token's gates depend on it and earlier tokens only."""
  router = SigmoidRouter(k=2, causal=True)
  variables, x = _sigmoid_vars(_w(9, (E,), 0.2)), _x(seed=6)
  route = lambda x: _gates_GSE(router.apply(variables, x, num_experts=E, capacity=2))
  full = route(x)
  assert np.any((full > 0).sum(-1) < 2)  # capacity binds
  changed = x.at[:, 4:].set(_x(seed=7)[:, 4:])
  np.testing.assert_array_equal(route(changed)[:, :4], full[:, :4])
  assert not np.array_equal(route(changed), full)
