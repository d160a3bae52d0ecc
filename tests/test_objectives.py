"""Cross entropy, aux-loss reduction and the total loss, against hand-computed values."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import objectives
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MOE_STATS, MoeLayer
from moe_jax.layers.routing import RouterStats, SwitchRouter
from moe_jax.models.decoder_only import SparseDecoderOnly
from moe_jax.models.t5 import SparseDecoder


def test_cross_entropy_of_uniform_logits_is_log_vocab():
  logits = jnp.zeros((2, 3, 10))
  targets = jnp.array([[1, 2, 0], [3, 0, 0]])  # 0 = padding: 3 real tokens
  terms = objectives.cross_entropy(logits, targets, logit_z_loss=1e-4)
  np.testing.assert_allclose(terms["cross_entropy"], math.log(10), rtol=1e-6)
  np.testing.assert_allclose(terms["logit_z_loss"], 1e-4 * math.log(10) ** 2, rtol=1e-6)
  assert float(terms["num_tokens"]) == 3


def test_cross_entropy_weights_and_accuracy():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
  targets = jnp.array([[0, 1]])
  terms = objectives.cross_entropy(logits, targets, jnp.array([[1.0, 1.0]]))
  np.testing.assert_allclose(terms["cross_entropy"], (-math.log(0.5) - math.log(0.1)) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(terms["accuracy"], 0.5)


def _stats(balance, z, dropped, load):
  return RouterStats(jnp.float32(balance), jnp.float32(z), jnp.float32(dropped),
                     jnp.asarray(load, jnp.float32), jnp.float32(0.5))


def test_moe_loss_terms_average_over_layers_and_apply_factors():
  sown = {MOE_STATS: {"decoder": {
      "layers_1": {"mlp": {"router_stats": (_stats(1.0, 2.0, 0.1, [0.5, 0.5]),)}},
      "layers_3": {"mlp": {"router_stats": (_stats(3.0, 4.0, 0.3, [1.0, 0.0]),)}}}}}
  terms = objectives.moe_loss_terms(sown, aux_loss_factor=0.1, z_loss_factor=0.01)
  np.testing.assert_allclose(terms["aux_loss"], 0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(terms["z_loss"], 0.01 * 3.0, rtol=1e-6)
  np.testing.assert_allclose(terms["fraction_dropped"], 0.2, rtol=1e-6)
  np.testing.assert_array_equal(terms["expert_load/decoder/layers_3/mlp"], [1.0, 0.0])


def test_dense_model_has_zero_aux_losses():
  terms = objectives.moe_loss_terms({})
  assert float(terms["aux_loss"]) == 0 and float(terms["z_loss"]) == 0


@pytest.mark.parametrize("num_experts", [4, 8])
def test_total_loss_with_uniform_router(num_experts):
  """Zero router weights: balance loss exactly 1 and router z-loss exactly (log E)^2."""
  moe = MoeLayer(num_experts=num_experts, router=SwitchRouter(),
                 expert=ExpertMlp(intermediate_dim=16), min_expert_capacity=1)
  lm = SparseDecoderOnly(vocab_size=32, embed_dim=8, decoder=SparseDecoder(
      num_layers=2, num_sparse_layers=2, moe=moe, num_heads=2, head_dim=4,
      mlp=MlpBlock(intermediate_dim=16)))
  tokens = jnp.arange(1, 13).reshape(2, 6)
  # Jitted: eager (op-by-op) init and apply cost ~10x the compilation of the whole program.
  params = nn.unbox(jax.jit(lm.init)(jax.random.key(0), decoder_input_tokens=tokens)["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "router" in jax.tree_util.keystr(path) else x, params)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}
  loss, terms = jax.jit(lambda p, b: objectives.compute_loss(lm, p, b))(params, batch)
  np.testing.assert_allclose(terms["aux_loss"], 1e-2 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(terms["z_loss"], 1e-3 * math.log(num_experts) ** 2, rtol=1e-6)
  np.testing.assert_allclose(terms["router_confidence"], 1 / num_experts, rtol=1e-6)
  np.testing.assert_allclose(
      loss, terms["cross_entropy"] + terms["aux_loss"] + terms["z_loss"], rtol=1e-6)
