"""Routers (moe_jax.layers.routing): exact aux losses, capacity, priority, padding, jitter.

Every expected value is worked out from the math; routing is checked against a plain-Python
reference of the documented priority rules, with probabilities recomputed from the kernel.
"""

import math

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import routing

E, D, S = 4, 8, 16


def _kernel(seed=0, scale=1.0):
  return jnp.asarray(np.random.RandomState(seed).normal(0, scale, (D, E)), jnp.float32)


def _tokens(seed=1, groups=2):
  return jnp.asarray(np.random.RandomState(seed).normal(0, 1, (groups, S, D)), jnp.float32)


def _route(router, x_GSD, kernel_DE, capacity, mask_GS=None, deterministic=True, rngs=None):
  params = {"router_weights": {"w": {"kernel": kernel_DE}}}
  return router.apply({"params": params}, x_GSD, num_experts=kernel_DE.shape[-1],
                      capacity=capacity, padding_mask_GS=mask_GS, deterministic=deterministic,
                      rngs=rngs)


def _probs(x_GSD, kernel_DE):
  logits = np.asarray(x_GSD, np.float64) @ np.asarray(kernel_DE, np.float64)
  logits -= logits.max(-1, keepdims=True)
  return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def _buffers(out, g=0):
  """Per expert, the tokens in its valid slots, in slot order."""
  tokens, valid = np.asarray(out.token_index_GEC[g]), np.asarray(out.valid_GEC[g])
  return [list(tokens[e][valid[e]]) for e in range(tokens.shape[0])]


def _reference_buffers(probs_SE, k, capacity, mask_S=None, bpr=False):
  """GShard priority: all first choices before all second choices; within a rank, sequence
  order, or descending top-1 probability with batch-prioritized routing."""
  num_tokens, num_experts = probs_SE.shape
  mask_S = np.ones(num_tokens, bool) if mask_S is None else np.asarray(mask_S, bool)
  choices_SK = np.argsort(-probs_SE, axis=-1, kind="stable")[:, :k]
  order = (np.argsort(-probs_SE.max(-1), kind="stable") if bpr else np.arange(num_tokens))
  buffers = [[] for _ in range(num_experts)]
  for rank in range(k):
    for s in order:
      e = choices_SK[s, rank]
      if mask_S[s] and len(buffers[e]) < capacity:
        buffers[e].append(int(s))
  return buffers


# --- capacity --------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size, num_experts, k, factor, min_capacity, expected", [
    (16, 4, 1, 1.0, 0, 4),     # 1 * 1 * 16 / 4 = 4
    (16, 4, 1, 1.25, 0, 5),    # 1.25 * 16 / 4 = 5
    (16, 4, 2, 1.25, 0, 10),   # 1.25 * 2 * 16 / 4 = 10
    (10, 4, 1, 1.0, 0, 3),     # ceil(2.5) = 3
    (16, 4, 1, 0.01, 0, 1),    # ceil(0.04) = 1
    (16, 4, 1, 0.01, 4, 4),    # min_expert_capacity floor
    (16, 4, 1, 0.5, 3, 3),     # floor 3 beats ceil(2) = 2
    (16, 4, 2, 4.0, 0, 16),    # 32 capped at S = 16
    (16, 4, 1, 1.0, 100, 16),  # the floor is capped at S too
])
def test_expert_capacity_formula(group_size, num_experts, k, factor, min_capacity, expected):
  assert routing.expert_capacity(group_size, num_experts, k, factor, min_capacity) == expected


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_expert_capacity_rejects_nonpositive_factor(factor):
  with pytest.raises(ValueError, match="capacity_factor"):
    routing.expert_capacity(16, 4, 1, factor, 0)


# --- aux losses from hand-made probabilities -------------------------------------------------


def test_load_balancing_loss_uniform_probs_balanced_choices():
  probs = jnp.full((2, S, E), 1.0 / E)
  mask = jnp.ones((2, S), bool)
  top1 = jnp.broadcast_to(jnp.arange(S)[:, None] % E, (2, S, 1))
  top2 = jnp.broadcast_to(jnp.stack([jnp.arange(S) % E, (jnp.arange(S) + 1) % E], -1), (2, S, 2))
  # f_e = k / E, P_e = 1 / E  ->  E * E * (k / E) * (1 / E) = k.
  assert float(routing.load_balancing_loss(probs, top1, mask)) == 1.0
  assert float(routing.load_balancing_loss(probs, top2, mask)) == 2.0


def test_load_balancing_loss_all_tokens_on_one_expert_is_num_experts():
  probs = jax.nn.one_hot(jnp.zeros((2, S), jnp.int32), E)
  experts = jnp.zeros((2, S, 1), jnp.int32)
  # f_0 = 1, P_0 = 1  ->  E.
  assert float(routing.load_balancing_loss(probs, experts, jnp.ones((2, S), bool))) == E


def test_load_balancing_loss_hand_example_with_mask():
  probs = jnp.array([[[0.75, 0.25], [0.6, 0.4]]])
  experts = jnp.array([[[0], [0]]])
  # f = (1, 0), P = (0.675, 0.325) -> 2 * 0.675.
  np.testing.assert_allclose(
      routing.load_balancing_loss(probs, experts, jnp.ones((1, 2), bool)), 1.35, rtol=1e-6)
  # Second token is padding: f = (1, 0), P = (0.75, 0.25) -> 2 * 0.75.
  np.testing.assert_allclose(
      routing.load_balancing_loss(probs, experts, jnp.array([[True, False]])), 1.5, rtol=1e-6)


def test_router_z_loss_hand_values():
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -jnp.inf, -jnp.inf]]])
  # logsumexp: log 4 and log(1 + 3) = log 4.
  np.testing.assert_allclose(routing.router_z_loss(logits, jnp.ones((1, 2), bool)),
                             math.log(4.0)**2, rtol=1e-6)
  logits = jnp.array([[[0.0, 0.0], [5.0, 5.0]]])
  # Padding token 1 (lse = 5 + log 2) is excluded: (log 2)^2.
  np.testing.assert_allclose(routing.router_z_loss(logits, jnp.array([[True, False]])),
                             math.log(2.0)**2, rtol=1e-6)


# --- uniform routing through the routers ------------------------------------------------------


@pytest.mark.parametrize("router, expected", [
    (routing.SwitchRouter(), 1.0),
    (routing.TopKRouter(k=2), 2.0),
    (routing.TopKRouter(k=3), 3.0),
])
def test_uniform_routing_balance_loss_is_k(router, expected):
  out = _route(router, _tokens(), jnp.zeros((D, E)), capacity=S)
  assert float(out.stats.load_balancing_loss) == expected
  np.testing.assert_allclose(out.stats.z_loss, math.log(E)**2, rtol=1e-6)
  np.testing.assert_allclose(out.stats.router_confidence, 1.0 / E, rtol=1e-6)


def test_zero_logits_z_loss_expert_choice():
  out = _route(routing.ExpertChoiceRouter(), _tokens(), jnp.zeros((D, E)), capacity=4)
  np.testing.assert_allclose(out.stats.z_loss, math.log(E)**2, rtol=1e-6)
  assert float(out.stats.load_balancing_loss) == 0.0


# --- tokens-choose: capacity, uniqueness, combine weights --------------------------------------


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("capacity", [1, 3])
def test_tokens_choose_buffers_match_reference(k, bpr, capacity):
  router = (routing.SwitchRouter if k == 1 else routing.TopKRouter)(
      batch_prioritized_routing=bpr, **({} if k == 1 else {"k": k}))
  x, kernel = _tokens(), _kernel(scale=2.0)
  out = _route(router, x, kernel, capacity)
  probs = _probs(x, kernel)
  assert out.combine_GEC.dtype == jnp.float32
  for g in range(2):
    got = _buffers(out, g)
    assert got == _reference_buffers(probs[g], k, capacity, bpr=bpr)
    for tokens in got:
      assert len(tokens) <= capacity
      assert len(set(tokens)) == len(tokens)  # a token appears at most once per expert
    valid = np.asarray(out.valid_GEC[g])
    combine = np.asarray(out.combine_GEC[g])
    tokens = np.asarray(out.token_index_GEC[g])
    # Kept slot: the token's router probability for that expert; empty slot: exactly 0.
    np.testing.assert_allclose(combine[valid], probs[g][tokens[valid], np.nonzero(valid)[0]],
                               rtol=1e-5)
    assert np.all(combine[~valid] == 0.0)
    # Slots fill from the front.
    assert np.all(valid == (np.arange(capacity)[None, :] < valid.sum(-1, keepdims=True)))
  # Fraction dropped: tokens with no kept slot, averaged over the two (full) groups.
  dropped = [S - len(set(sum(_buffers(out, g), []))) for g in range(2)]
  np.testing.assert_allclose(out.stats.fraction_dropped, sum(dropped) / (2 * S), rtol=1e-6)


def test_first_choices_outrank_second_choices():
  # The kernel copies features 0..3 into the logits. Token 0 prefers experts (0, 1); token 1
  # prefers (1, 3); the other tokens are padding. With C = 1, token 1's FIRST choice must win
  # expert 1 over token 0's second choice, although token 0 comes first in the sequence.
  x = np.zeros((2, S, D), np.float32)
  x[:, 0, :E] = [4.0, 2.0, -9.0, -9.0]
  x[:, 1, :E] = [-9.0, 4.0, -9.0, 2.0]
  mask = jnp.asarray(np.arange(S) < 2)[None].repeat(2, 0)
  kernel = jnp.concatenate([jnp.eye(E), jnp.zeros((D - E, E))])
  out = _route(routing.TopKRouter(k=2), jnp.asarray(x), kernel, capacity=1, mask_GS=mask)
  assert _buffers(out, 0) == _buffers(out, 1) == [[0], [1], [], [1]]
  # Both real tokens keep at least one slot.
  assert float(out.stats.fraction_dropped) == 0.0


def test_batch_prioritized_routing_keeps_highest_top1_probability():
  router = routing.SwitchRouter(batch_prioritized_routing=True)
  x, kernel = _tokens(seed=3), _kernel(seed=4, scale=2.0)
  capacity = 2
  out = _route(router, x, kernel, capacity)
  for g, probs in enumerate(_probs(x, kernel)):
    top1, choice = probs.max(-1), probs.argmax(-1)
    for e, kept in enumerate(_buffers(out, g)):
      wanted = np.nonzero(choice == e)[0]
      expected = wanted[np.argsort(-top1[wanted])][:capacity]
      assert sorted(kept) == sorted(expected.tolist())
      dropped = np.setdiff1d(wanted, kept)
      if len(kept) and len(dropped):
        assert top1[kept].min() > top1[dropped].max()
  # A dropped token exists, or the test shows nothing.
  assert float(out.stats.fraction_dropped) > 0


@pytest.mark.parametrize("router", [
    routing.SwitchRouter(batch_prioritized_routing=True),
    routing.TopKRouter(k=2, batch_prioritized_routing=True),
])
def test_batch_prioritized_routing_is_invariant_to_token_order(router):
  x, kernel = _tokens(seed=5), _kernel(seed=6, scale=2.0)
  perm = np.random.RandomState(7).permutation(S)
  out = _route(router, x, kernel, capacity=2)
  out_perm = _route(router, x[:, perm], kernel, capacity=2)

  def kept_pairs(o, token_of):
    return {(g, int(token_of[t]), e, round(float(w), 6))
            for g in range(2)
            for e, (ts, ws, vs) in enumerate(zip(o.token_index_GEC[g], o.combine_GEC[g],
                                                 o.valid_GEC[g]))
            for t, w, v in zip(np.asarray(ts), np.asarray(ws), np.asarray(vs)) if v}

  pairs = kept_pairs(out, np.arange(S))
  assert 0 < len(pairs) < 2 * router.k * S  # capacity binds
  assert kept_pairs(out_perm, perm) == pairs


# --- expert choice -----------------------------------------------------------------------------


def test_expert_choice_fills_every_expert_with_top_c_tokens():
  x, kernel = _tokens(), _kernel(scale=2.0)
  capacity = 5
  out = _route(routing.ExpertChoiceRouter(), x, kernel, capacity)
  assert out.valid_GEC.shape == (2, E, capacity)
  assert bool(jnp.all(out.valid_GEC))
  probs = _probs(x, kernel)
  for g in range(2):
    for e, tokens in enumerate(_buffers(out, g)):
      assert len(set(tokens)) == capacity
      assert sorted(tokens) == sorted(np.argsort(-probs[g, :, e])[:capacity].tolist())
      np.testing.assert_allclose(out.combine_GEC[g, e], probs[g, tokens, e], rtol=1e-5)


def test_expert_choice_never_chooses_padding_while_real_tokens_remain():
  x, kernel = _tokens(), _kernel(scale=2.0)
  capacity = 5
  # Group 0: 10 real tokens (every third token is padding) >= C; group 1: 4 real tokens < C.
  mask_np = np.stack([np.arange(S) % 3 != 0, np.isin(np.arange(S), [2, 7, 8, 13])])
  out = _route(routing.ExpertChoiceRouter(), x, kernel, capacity, mask_GS=jnp.asarray(mask_np))
  real = [set(np.nonzero(m)[0].tolist()) for m in mask_np]
  probs = _probs(x, kernel)
  # Enough real tokens: every slot holds a distinct real token, the expert's top-C real ones.
  assert bool(jnp.all(out.valid_GEC[0]))
  for e, tokens in enumerate(_buffers(out, 0)):
    assert set(tokens) <= real[0] and len(set(tokens)) == capacity
    ranked = [t for t in np.argsort(-probs[0, :, e]) if t in real[0]]
    assert sorted(tokens) == sorted(ranked[:capacity])
  # Too few: each expert takes all 4 real tokens and leaves one slot empty, with weight 0.
  assert np.asarray(out.valid_GEC[1]).sum(-1).tolist() == [4] * E
  for tokens in _buffers(out, 1):
    assert set(tokens) == real[1]
  assert np.all(np.asarray(out.combine_GEC)[~np.asarray(out.valid_GEC)] == 0.0)
  assert float(out.stats.fraction_dropped) == 0.0


# --- padding (tokens-choose) -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_padding_uses_no_capacity_and_is_excluded_from_losses(k):
  router = routing.SwitchRouter() if k == 1 else routing.TopKRouter(k=k)
  x, kernel = _tokens(seed=8), _kernel(seed=9, scale=2.0)
  # Padding FIRST in group 0 (in sequence order it would take the slots if it counted) and
  # scattered in group 1; 10 real tokens in each group.
  mask_np = np.stack([np.arange(S) >= 6, np.arange(S) % 8 >= 3])
  out = _route(router, x, kernel, capacity=2, mask_GS=jnp.asarray(mask_np))
  probs = _probs(x, kernel)
  for g in range(2):
    # The same buffers as routing the real tokens alone.
    assert _buffers(out, g) == _reference_buffers(probs[g], k, 2, mask_np[g])

  real = [probs[g][mask_np[g]] for g in range(2)]
  chosen = [np.eye(E)[np.argsort(-p, -1)[:, :k]].sum(1) for p in real]
  expected_balance = np.mean([E * np.sum(c.mean(0) * p.mean(0)) for c, p in zip(chosen, real)])
  logits = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
  lse = np.log(np.exp(logits).sum(-1))
  expected_z = np.mean([np.mean(lse[g][mask_np[g]]**2) for g in range(2)])
  np.testing.assert_allclose(out.stats.load_balancing_loss, expected_balance, rtol=1e-5)
  np.testing.assert_allclose(out.stats.z_loss, expected_z, rtol=1e-5)
  dropped = sum(10 - len(set(sum(_buffers(out, g), []))) for g in range(2))
  assert dropped > 0
  np.testing.assert_allclose(out.stats.fraction_dropped, dropped / 20, rtol=1e-6)
  np.testing.assert_allclose(
      out.stats.expert_load_E, sum(c.sum(0) for c in chosen) / (20 * k), rtol=1e-6)


def test_padding_is_routed_when_not_ignored():
  x, kernel = _tokens(), _kernel()
  mask = jnp.asarray(np.arange(S) >= 6)[None].repeat(2, 0)
  out = _route(routing.SwitchRouter(ignore_padding_tokens=False), x, kernel, S, mask_GS=mask)
  assert int(jnp.sum(out.valid_GEC)) == 2 * S  # C = S: every token, padding included, is kept


# --- jitter ------------------------------------------------------------------------------------


def test_jitter_is_off_when_deterministic():
  x, kernel = _tokens(), _kernel()
  plain = _route(routing.SwitchRouter(), x, kernel, capacity=S)
  jittered = _route(routing.SwitchRouter(jitter_noise=0.5), x, kernel, capacity=S,
                    deterministic=True)
  np.testing.assert_array_equal(plain.combine_GEC, jittered.combine_GEC)
  np.testing.assert_array_equal(plain.token_index_GEC, jittered.token_index_GEC)


def test_jitter_needs_the_routing_rng_stream():
  router = routing.SwitchRouter(jitter_noise=0.1)
  with pytest.raises(flax.errors.InvalidRngError, match=routing.ROUTING_RNG):
    _route(router, _tokens(), _kernel(), S, deterministic=False,
           rngs={"dropout": jax.random.key(0)})
  _route(router, _tokens(), _kernel(), S, deterministic=False,
         rngs={routing.ROUTING_RNG: jax.random.key(0)})


def test_jitter_changes_logits_only_within_the_multiplicative_range():
  eps = 0.1
  x, kernel = _tokens(), _kernel()
  params = {"params": {"router_weights": {"w": {"kernel": kernel}}}}

  def logits(router, deterministic, key=0):
    _, state = router.apply(params, x, num_experts=E, capacity=S, deterministic=deterministic,
                            rngs={routing.ROUTING_RNG: jax.random.key(key)},
                            capture_intermediates=True, mutable=["intermediates"])
    return np.asarray(state["intermediates"]["router_weights"]["__call__"][0], np.float64)

  clean = logits(routing.SwitchRouter(), True)
  noisy = logits(routing.SwitchRouter(jitter_noise=eps), False)
  assert not np.allclose(noisy, clean)
  # logits = sum_d x_d u_d W_de with u_d in [1 - eps, 1 + eps]: |change| <= eps * |x| @ |W|.
  bound = eps * np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(kernel, np.float64))
  assert np.all(np.abs(noisy - clean) <= bound + 1e-5)
  # Another key gives other noise.
  assert not np.allclose(logits(routing.SwitchRouter(jitter_noise=eps), False, key=1), noisy)


def test_jitter_on_one_feature_scales_logits_within_range():
  # Only feature 0 is nonzero: every logit of a token is scaled by the same u in [1-eps, 1+eps].
  eps = 0.25
  x = np.zeros((2, S, D), np.float32)
  x[..., 0] = np.random.RandomState(0).uniform(0.5, 2.0, (2, S))
  kernel = jnp.zeros((D, E)).at[0].set(jnp.array([1.0, -2.0, 0.5, 3.0]))
  params = {"params": {"router_weights": {"w": {"kernel": kernel}}}}
  _, state = routing.SwitchRouter(jitter_noise=eps).apply(
      params, jnp.asarray(x), num_experts=E, capacity=S, deterministic=False,
      rngs={routing.ROUTING_RNG: jax.random.key(0)}, capture_intermediates=True,
      mutable=["intermediates"])
  ratio = np.asarray(state["intermediates"]["router_weights"]["__call__"][0]) / (
      x[..., :1] * np.asarray(kernel[0]))
  np.testing.assert_allclose(ratio, ratio[..., :1].repeat(E, -1), rtol=1e-5)
  assert np.all((ratio >= 1 - eps - 1e-6) & (ratio <= 1 + eps + 1e-6))
  assert np.std(ratio[..., 0]) > 0


# --- GShard random second-expert policy --------------------------------------------------------


def test_random_second_expert_policy():
  router = routing.TopKRouter(k=2, second_expert_policy="random")
  x, kernel = _tokens(), _kernel(scale=2.0)
  probs = _probs(x, kernel)
  first, second = np.argsort(-probs, -1)[..., 0], np.argsort(-probs, -1)[..., 1]

  def kept_choices(out):
    kept = np.zeros((2, S, E), bool)
    for g in range(2):
      for e, tokens in enumerate(_buffers(out, g)):
        kept[g, tokens, e] = True
    take = lambda c: np.take_along_axis(kept, c[..., None], -1)[..., 0]
    return take(first), take(second)

  # Capacity S: nothing is dropped for lack of room.
  train = _route(router, x, kernel, S, deterministic=False,
                 rngs={routing.ROUTING_RNG: jax.random.key(0)})
  kept_first, kept_second = kept_choices(train)
  assert kept_first.all()
  assert 0 < kept_second.sum() < 2 * S  # how many: test_random_second_expert_keep_rate
  # Kept weights: every first-choice probability and the kept second-choice ones, unchanged.
  prob_of = lambda c: np.take_along_axis(probs, c[..., None], -1)[..., 0]
  np.testing.assert_allclose(
      np.sort(np.asarray(train.combine_GEC)[np.asarray(train.valid_GEC)]),
      np.sort(np.concatenate([prob_of(first).ravel(), prob_of(second)[kept_second]])),
      rtol=1e-5)

  kept_first, kept_second = kept_choices(_route(router, x, kernel, S, deterministic=True))
  assert kept_first.all() and kept_second.all()


# --- invalid configs ---------------------------------------------------------------------------


def test_switch_router_rejects_k_2():
  with pytest.raises(ValueError, match=r"SwitchRouter\.k"):
    routing.SwitchRouter(k=2)


def test_unknown_second_expert_policy():
  with pytest.raises(ValueError, match="second_expert_policy"):
    routing.TopKRouter(k=2, second_expert_policy="sometimes")


@pytest.mark.parametrize("cls", [routing.SwitchRouter, routing.TopKRouter,
                                 routing.ExpertChoiceRouter])
def test_negative_jitter(cls):
  with pytest.raises(ValueError, match="jitter_noise"):
    cls(jitter_noise=-0.1)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_experts_equals_lax_top_k(k):
  """Same values and indices as jax.lax.top_k, ties (uniform rows) included."""
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 16, 4)), axis=-1)
  probs = probs.at[1].set(0.25)  # a group of exact ties
  values, indices = routing.top_k_experts(probs, k)
  ref_values, ref_indices = jax.lax.top_k(probs, k)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_array_equal(values, ref_values)


def test_random_second_expert_keep_rate():
  """GShard keeps a token's 2nd choice with probability p = min(1, 2 g2 / (g1 + g2)).

  With C = S nothing is dropped for lack of room, so the kept 2nd choices are independent
  Bernoulli(p_i) draws: their count lies within 5 binomial standard deviations of sum_i p_i,
  overall and among tokens with small and large p separately.
  """
  groups, group_size = 4, 512
  x = jnp.asarray(np.random.RandomState(10).normal(0, 1, (groups, group_size, D)), jnp.float32)
  kernel = _kernel(seed=11, scale=1.0)
  route = jax.jit(lambda x, kernel: _route(
      routing.TopKRouter(k=2, second_expert_policy="random"), x, kernel, group_size,
      deterministic=False, rngs={routing.ROUTING_RNG: jax.random.key(12)}))
  out = route(x, kernel)
  probs = _probs(x, kernel)
  ranked = np.argsort(-probs, -1)
  g1 = np.take_along_axis(probs, ranked[..., :1], -1)[..., 0]
  g2 = np.take_along_axis(probs, ranked[..., 1:2], -1)[..., 0]
  p = np.minimum(1.0, 2 * g2 / (g1 + g2))
  kept = np.zeros(probs.shape, bool)
  g_idx = np.arange(groups)[:, None, None]
  e_idx = np.arange(E)[None, :, None]
  valid = np.asarray(out.valid_GEC)
  kept[np.broadcast_to(g_idx, valid.shape)[valid], np.asarray(out.token_index_GEC)[valid],
       np.broadcast_to(e_idx, valid.shape)[valid]] = True
  assert np.take_along_axis(kept, ranked[..., :1], -1).all()  # every 1st choice is kept
  kept_second = np.take_along_axis(kept, ranked[..., 1:2], -1)[..., 0]
  assert kept.sum() == groups * group_size + kept_second.sum()  # nothing beyond 2 choices
  assert 0.3 < p.mean() < 0.8  # p is spread out, so the check has power
  for subset in (np.ones_like(p, bool), p < np.median(p), p >= np.median(p)):
    expected, sigma = p[subset].sum(), np.sqrt(np.sum(p[subset] * (1 - p[subset])))
    assert abs(kept_second[subset].sum() - expected) < 5 * sigma, (subset.sum(), expected)


# --- GShard threshold second-expert policy -----------------------------------------------------


THRESHOLD = 0.3


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("renormalize, causal", [(False, False), (True, True)])
def test_threshold_policy_keeps_second_choice_iff_its_normalised_gate_exceeds_threshold(
    deterministic, renormalize, causal):
  """Hand-built logits: token s has top-2 gates with g2 / (g1 + g2) = r_s, i.e. logits
  (0, l2 = log(r / (1 - r))) on two experts and l2 - 1 on the others (so the raw g2 is well
  below r: the normalisation matters); r just above / below the threshold. Same decisions in
  training and eval (no rng needed), gates unchanged."""
  ratios = np.tile([THRESHOLD + 1e-4, THRESHOLD - 1e-4, 0.05, 0.45], S // 4)
  x = np.zeros((2, S, D))
  for g in range(2):
    for s, r in enumerate(ratios):
      first, second = (s + g) % E, (s + g + 1 + s // 4) % E
      second = second if second != first else (first + 2) % E
      l2 = math.log(r / (1 - r))
      x[g, s, :E] = l2 - 1.0
      x[g, s, first], x[g, s, second] = 0.0, l2
  kernel = jnp.concatenate([jnp.eye(E), jnp.zeros((D - E, E))])  # logits = x[..., :E]
  router = routing.TopKRouter(k=2, renormalize=renormalize, causal=causal,
                              second_expert_policy="threshold",
                              second_expert_threshold=THRESHOLD)
  out = _route(router, jnp.asarray(x, jnp.float32), kernel, S, deterministic=deterministic)
  probs = _probs(jnp.asarray(x, jnp.float32), kernel)
  ranked = np.argsort(-probs, -1)
  keep_second = ratios > THRESHOLD
  for g in range(2):
    expected = [[] for _ in range(E)]
    for s in range(S):
      expected[ranked[g, s, 0]].append(s)
      if keep_second[s]:
        expected[ranked[g, s, 1]].append(s)
    assert [sorted(b) for b in _buffers(out, g)] == [sorted(b) for b in expected]
  # Kept 2nd weights: the softmax probability, or r itself once renormalised over the two.
  combine, valid = np.asarray(out.combine_GEC), np.asarray(out.valid_GEC)
  g2 = np.take_along_axis(probs, ranked[..., 1:2], -1)[..., 0]
  assert np.all(g2[:, 0::4] < THRESHOLD)  # raw g2 of the kept r = threshold + 1e-4 tokens
  weights = np.sort(combine[valid])
  if renormalize:
    expected_weights = np.concatenate([np.tile(1 - ratios, 2), np.tile(ratios[keep_second], 2)])
  else:
    g1 = np.take_along_axis(probs, ranked[..., :1], -1)[..., 0]
    expected_weights = np.concatenate([g1.ravel(), g2[:, keep_second].ravel()])
  np.testing.assert_allclose(weights, np.sort(expected_weights), rtol=1e-5)
  assert float(out.stats.fraction_dropped) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"second_expert_threshold": -0.1}, r"TopKRouter\.second_expert_threshold must be in"),
    ({"second_expert_threshold": 1.5}, r"TopKRouter\.second_expert_threshold must be in"),
    ({"k": 1}, r"TopKRouter\.second_expert_policy='threshold'.*got k=1"),
    ({"k": 3}, r"TopKRouter\.second_expert_policy='threshold'.*got k=3"),
    ({"second_expert_policy": "all"}, r"TopKRouter\.second_expert_threshold is only read"),
    ({"second_expert_policy": "random"}, r"TopKRouter\.second_expert_threshold is only read"),
])
def test_threshold_policy_refuses_invalid_combinations(kwargs, match):
  kwargs = {"k": 2, "second_expert_policy": "threshold", "second_expert_threshold": 0.2,
            **kwargs}
  with pytest.raises(ValueError, match=match):
    routing.TopKRouter(**kwargs)


def test_threshold_policy_accepted_at_the_ends_and_in_causal_decoders():
  with pytest.raises(ValueError, match=r"SwitchRouter\.second_expert_policy='threshold'"):
    routing.SwitchRouter(second_expert_policy="threshold")
  for threshold in (0.0, 1.0):
    routing.TopKRouter(k=2, second_expert_policy="threshold", second_expert_threshold=threshold,
                       causal=True)


# --- causal (decoder) routing ------------------------------------------------------------------


def _reference_causal_buffers(probs_SE, k, capacity, mask_S=None):
  """Token-major priority: all k choices of token s before any choice of token s + 1."""
  num_tokens, num_experts = probs_SE.shape
  mask_S = np.ones(num_tokens, bool) if mask_S is None else np.asarray(mask_S, bool)
  choices_SK = np.argsort(-probs_SE, axis=-1, kind="stable")[:, :k]
  buffers = [[] for _ in range(num_experts)]
  for s in range(num_tokens):
    for rank in range(k):
      e = choices_SK[s, rank]
      if mask_S[s] and len(buffers[e]) < capacity:
        buffers[e].append(int(s))
  return buffers


def test_causal_top2_later_first_choice_cannot_evict_earlier_second_choice():
  # The kernel copies features 0..3 into the logits. Token 0 prefers experts (0, 1), token 1
  # prefers (1, 3); the rest is padding. C = 1. Choice-major priority gives expert 1 to token
  # 1's FIRST choice (test_first_choices_outrank_second_choices); a causal router must give it
  # to token 0's second choice, which it took before token 1 existed.
  x = np.zeros((2, S, D), np.float32)
  x[:, 0, :E] = [4.0, 2.0, -9.0, -9.0]
  x[:, 1, :E] = [-9.0, 4.0, -9.0, 2.0]
  mask = jnp.asarray(np.arange(S) < 2)[None].repeat(2, 0)
  kernel = jnp.concatenate([jnp.eye(E), jnp.zeros((D - E, E))])
  out = _route(routing.TopKRouter(k=2, causal=True), jnp.asarray(x), kernel, capacity=1,
               mask_GS=mask)
  assert _buffers(out, 0) == _buffers(out, 1) == [[0], [0], [], [1]]
  probs = _probs(jnp.asarray(x), kernel)
  # Token 0's second slot carries its expert-1 probability, e^2 / (e^4 + e^2 + 2 e^-9).
  np.testing.assert_allclose(out.combine_GEC[0, 1, 0], probs[0, 0, 1], rtol=1e-6)
  np.testing.assert_allclose(
      probs[0, 0, 1], math.exp(2) / (math.exp(4) + math.exp(2) + 2 * math.exp(-9)), rtol=1e-6)
  assert float(out.stats.fraction_dropped) == 0.0


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("capacity", [1, 3])
def test_causal_buffers_match_token_major_reference(k, capacity):
  router = (routing.SwitchRouter if k == 1 else routing.TopKRouter)(
      causal=True, **({} if k == 1 else {"k": k}))
  x, kernel = _tokens(seed=13), _kernel(seed=14, scale=2.0)
  mask_np = np.stack([np.ones(S, bool), np.arange(S) % 5 != 2])
  out = _route(router, x, kernel, capacity, mask_GS=jnp.asarray(mask_np))
  probs = _probs(x, kernel)
  for g in range(2):
    assert _buffers(out, g) == _reference_causal_buffers(probs[g], k, capacity, mask_np[g])
  if k == 1:  # one choice per token: token-major and choice-major priority coincide
    plain = _route(routing.SwitchRouter(), x, kernel, capacity, mask_GS=jnp.asarray(mask_np))
    np.testing.assert_array_equal(plain.token_index_GEC, out.token_index_GEC)
  dropped = sum(mask_np[g].sum() - len(set(sum(_buffers(out, g), []))) for g in range(2))
  assert dropped > 0
  np.testing.assert_allclose(out.stats.fraction_dropped, dropped / mask_np.sum(), rtol=1e-6)


def test_causal_routing_of_a_prefix_ignores_later_tokens():
  """Whatever tokens t..S-1 are, the slots held by tokens < t are the same."""
  router = routing.TopKRouter(k=2, causal=True)
  x, kernel = _tokens(seed=15), _kernel(seed=16, scale=2.0)
  t = 6
  other = x.at[:, t:].set(_tokens(seed=17)[:, t:])
  held = lambda out: [[[s for s in slots if s < t] for slots in _buffers(out, g)]
                      for g in range(2)]
  assert held(_route(router, x, kernel, 2)) == held(_route(router, other, kernel, 2))
  # Choice-major routing fails this: later first choices evict earlier second choices.
  plain = routing.TopKRouter(k=2)
  assert held(_route(plain, x, kernel, 2)) != held(_route(plain, other, kernel, 2))


@pytest.mark.parametrize("cls", [routing.SwitchRouter, routing.TopKRouter])
def test_causal_router_refuses_batch_prioritized_routing(cls):
  with pytest.raises(ValueError, match=rf"{cls.__name__}\.batch_prioritized_routing=True.*"
                                       r"--gin\.encoder/"):
    cls(causal=True, batch_prioritized_routing=True)
  cls(batch_prioritized_routing=True)  # fine outside a decoder
  cls(causal=True)


def test_expert_choice_refuses_causal():
  with pytest.raises(ValueError, match="ExpertChoiceRouter .*cannot route a causal decoder"):
    routing.ExpertChoiceRouter(causal=True)


@pytest.mark.parametrize("router, factor, expected", [
    (routing.SwitchRouter(), 1.25, 1.0),
    (routing.TopKRouter(k=2), 1.25, 2.0),
    (routing.TopKRouter(k=3), 0.5, 3.0),
    (routing.ExpertChoiceRouter(), 2.0, 2.0),  # C = 2 S / E slots per expert: 2 per token
    (routing.ExpertChoiceRouter(), 0.5, 0.5),
])
def test_experts_per_token(router, factor, expected):
  assert router.experts_per_token(factor) == expected


# --- expert choice selects like lax.top_k, without it ------------------------------------------


def _expert_choice_reference(logits_GSE, mask_GS, capacity):
  """The selection as lax.top_k makes it (the router's previous implementation)."""
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  scores_GES = jnp.where(mask_GS[..., None], probs_GSE, -1.0).swapaxes(1, 2)
  score_GEC, token_GEC = jax.lax.top_k(scores_GES, capacity)
  valid_GEC = score_GEC >= 0.0
  return jnp.where(valid_GEC, token_GEC, 0), jnp.where(valid_GEC, score_GEC, 0.0), valid_GEC


@pytest.mark.parametrize("case", ["random", "uniform", "duplicates", "underflow", "padding"])
def test_expert_choice_selection_equals_lax_top_k(case):
  """Same tokens, weights and order as lax.top_k, ties included: tied scores go to the lower
  token index (uniform logits; repeated tokens; probabilities that underflow to exactly 0;
  padding scored -1 when real tokens run out)."""
  x, kernel, capacity = _tokens(seed=18), _kernel(seed=19, scale=2.0), 5
  mask = jnp.ones((2, S), bool)
  if case == "uniform":
    kernel = jnp.zeros((D, E))
  elif case == "duplicates":
    x = x[:, np.arange(S) % 3]  # tokens 0, 3, 6, ... share their scores exactly
  elif case == "underflow":
    kernel = _kernel(seed=19, scale=60.0)
  elif case == "padding":
    mask = jnp.asarray(np.stack([np.arange(S) % 4 == 1, np.arange(S) < 3]))  # 4 and 3 real < C
  params = {"params": {"router_weights": {"w": {"kernel": kernel}}}}
  out, state = routing.ExpertChoiceRouter().apply(
      params, x, num_experts=E, capacity=capacity, padding_mask_GS=mask,
      capture_intermediates=True, mutable=["intermediates"])
  logits = state["intermediates"]["router_weights"]["__call__"][0]
  token, combine, valid = _expert_choice_reference(logits, mask, capacity)
  if case in ("uniform", "duplicates", "underflow"):  # the case really has ties
    scores = np.sort(np.asarray(jax.nn.softmax(logits)).swapaxes(1, 2), -1)
    assert np.any(scores[..., 1:] == scores[..., :-1])
  if case == "underflow":
    assert np.any(np.asarray(combine)[np.asarray(valid)] == 0.0)
  np.testing.assert_array_equal(out.token_index_GEC, token)
  np.testing.assert_array_equal(out.combine_GEC, combine)
  np.testing.assert_array_equal(out.valid_GEC, valid)


def test_expert_choice_router_gradient_equals_lax_top_k():
  x, kernel, capacity = _tokens(seed=20), _kernel(seed=21, scale=2.0), 5
  r_GEC = jnp.asarray(np.random.RandomState(22).normal(0, 1, (2, E, capacity)), jnp.float32)

  def loss(kernel_DE):
    out = _route(routing.ExpertChoiceRouter(), x, kernel_DE, capacity)
    return jnp.sum(out.combine_GEC * r_GEC)

  def reference_loss(kernel_DE):
    _, combine, _ = _expert_choice_reference(x @ kernel_DE, jnp.ones((2, S), bool), capacity)
    return jnp.sum(combine * r_GEC)

  grad, reference_grad = jax.jit(lambda k: (jax.grad(loss)(k), jax.grad(reference_loss)(k)))(
      kernel)
  assert np.abs(grad).max() > 0.01
  np.testing.assert_allclose(grad, reference_grad, rtol=1e-5, atol=1e-7)
