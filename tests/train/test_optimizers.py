"""moe_jax.train.optimizers: schedules by hand, Adafactor's per-expert factored statistics,
AdamW's weight-decay mask, clipping and freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.train import optimizers


def test_rsqrt_schedule_by_hand():
  schedule = optimizers.rsqrt_schedule(base_learning_rate=2.0, warmup_steps=4)
  for step in [0, 1, 3, 4, 5, 9, 16, 100]:
    expected = 2.0 / np.sqrt(max(step, 4))
    np.testing.assert_allclose(schedule(jnp.asarray(step)), expected, rtol=1e-6)
  # T5's default: constant 1 / sqrt(10_000) = 0.01 during warmup.
  np.testing.assert_allclose(optimizers.rsqrt_schedule()(jnp.asarray(123)), 0.01, rtol=1e-6)
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizers.rsqrt_schedule(warmup_steps=0)


def test_warmup_schedules_by_hand():
  linear = optimizers.linear_warmup_schedule(peak_learning_rate=1e-3, warmup_steps=10)
  np.testing.assert_allclose([linear(s) for s in (0, 5, 10, 50)], [0, 5e-4, 1e-3, 1e-3],
                             rtol=1e-6)
  cosine = optimizers.warmup_cosine_schedule(peak_learning_rate=1e-3, warmup_steps=10,
                                             decay_steps=110, end_learning_rate=1e-4)
  np.testing.assert_allclose(cosine(5), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(cosine(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(cosine(60), 1e-4 + (1e-3 - 1e-4) * 0.5, rtol=1e-5)  # half-way
  np.testing.assert_allclose(cosine(110), 1e-4, rtol=1e-5)


def _factored_state(state):
  (factored,) = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "v_row"))
                 if hasattr(s, "v_row")]
  return factored


def test_adafactor_factors_expert_kernels_per_expert():
  """[E, D, F] factors over its two largest axes (D, F): v_row [E, D], v_col [E, F], one row /
  column statistic per expert; after one step they are the means of g^2 over F and over D."""
  E, D, F = 4, 256, 384
  params = {"expert": {"wi": jnp.zeros((E, D, F))}, "scale": jnp.zeros((D,))}
  grads = {"expert": {"wi": jax.random.normal(jax.random.key(0), (E, D, F))},
           "scale": jnp.ones((D,))}
  opt = optimizers.adafactor(learning_rate=0.01)
  state = opt.init(params)
  factored = _factored_state(state)
  assert factored.v_row["expert"]["wi"].shape == (E, D)
  assert factored.v_col["expert"]["wi"].shape == (E, F)
  assert factored.v["scale"].shape == (D,)  # vectors are not factored
  _, state = opt.update(grads, state, params)
  g2 = np.asarray(grads["expert"]["wi"], np.float64) ** 2
  factored = _factored_state(state)
  # First step: decay 1 - 1^-0.8 = 0, so the statistics are exactly the means (+ eps 1e-30).
  np.testing.assert_allclose(factored.v_row["expert"]["wi"], g2.mean(axis=2), rtol=1e-5)
  np.testing.assert_allclose(factored.v_col["expert"]["wi"], g2.mean(axis=1), rtol=1e-5)
  # Experts really have separate statistics.
  expert_scaled = np.asarray(grads["expert"]["wi"]).copy()
  expert_scaled[1] *= 3
  _, state3 = opt.update({**grads, "expert": {"wi": jnp.asarray(expert_scaled)}},
                         opt.init(params), params)
  v_row3 = _factored_state(state3).v_row["expert"]["wi"]
  np.testing.assert_allclose(v_row3[1], 9 * factored.v_row["expert"]["wi"][1], rtol=1e-5)
  np.testing.assert_allclose(v_row3[0], factored.v_row["expert"]["wi"][0], rtol=1e-6)


def test_adamw_weight_decay_skips_vectors():
  """Zero gradients: Adam's step is 0, so only decoupled decay moves params: -lr * wd * p for
  matrices (and expert kernels); 1-D params (norm scales) stay put."""
  params = {"kernel": jnp.full((3, 4), 2.0), "expert": jnp.full((2, 3, 4), -1.0),
            "scale": jnp.full((4,), 5.0)}
  opt = optimizers.adamw(learning_rate=0.5, weight_decay=0.1)
  updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["kernel"], 2.0 * (1 - 0.5 * 0.1), rtol=1e-6)
  np.testing.assert_allclose(new["expert"], -1.0 * (1 - 0.5 * 0.1), rtol=1e-6)
  np.testing.assert_array_equal(new["scale"], params["scale"])


def test_build_optimizer_clips_and_freezes():
  params = {"encoder": {"attention": {"kernel": jnp.ones((2, 2))}},
            "mlp": {"expert": {"wi": jnp.ones((2, 2, 2))}}}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0), params)  # global norm sqrt(12) * 3
  clipped = optimizers.build_optimizer(optax.sgd(1.0), grad_clip_norm=1.0)
  updates, _ = clipped.update(grads, clipped.init(params), params)
  np.testing.assert_allclose(optax.global_norm(updates), 1.0, rtol=1e-6)

  frozen = optimizers.build_optimizer(optax.sgd(1.0), frozen_patterns=("/expert/",))
  assert optimizers.path_labels(params, ("/expert/",)) == {
      "encoder": {"attention": {"kernel": "trainable"}}, "mlp": {"expert": {"wi": "frozen"}}}
  updates, _ = frozen.update(grads, frozen.init(params), params)
  np.testing.assert_array_equal(updates["mlp"]["expert"]["wi"], 0.0)
  np.testing.assert_allclose(updates["encoder"]["attention"]["kernel"], -3.0)
  with pytest.raises(ValueError, match=r"invalid regex '\('"):
    optimizers.build_optimizer(optax.sgd(1.0), frozen_patterns=("(",))
