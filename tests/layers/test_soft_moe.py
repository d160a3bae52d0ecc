"""Soft MoE (moe_jax.layers.soft_moe), Puigcerver et al. 2023, arXiv:2308.00951.

The reference is float64 numpy written from the paper's formulas (sec. 2.1, 2.3, Algorithms 1-2):
masked softmaxes taken row by row over the real tokens only, experts as explicit ReLU MLPs.
"""

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import gin_utils
from moe_jax.layers import soft_moe
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MOE_STATS
from moe_jax.layers.soft_moe import SoftMoE
from moe_jax.models import build_network, summary
from moe_jax.models.t5 import SparseDecoder, SparseEncoder
from moe_jax.train import partitioning

G, S, D, E, C, F = 3, 6, 16, 4, 2, 32
LAYER = SoftMoE(num_experts=E, slots_per_expert=C,
                expert=ExpertMlp(intermediate_dim=F, activations=("relu",)))


def _x(seed=0, shape=(G, S, D), scale=1.0):
  return jnp.asarray(np.random.RandomState(seed).normal(0, scale, shape), jnp.float32)


@pytest.fixture(scope="module")
def params():
  """Random parameters (scale 1.7, not its init 1, so the test sees it is applied)."""
  params = nn.unbox(LAYER.init(jax.random.key(0), _x())["params"])
  params = jax.tree.map(lambda v: jnp.asarray(
      np.random.RandomState(v.size).normal(0, 0.5, v.shape), jnp.float32), params)
  return {**params, "scale": jnp.float32(1.7)}


@pytest.fixture(scope="module")
def apply():
  return jax.jit(lambda p, x, mask=None: LAYER.apply({"params": p}, x, mask,
                                                     mutable=[MOE_STATS]))


def _stats(state):
  return state[MOE_STATS]["router_stats"][0]


def _phi_DEC(params):
  """The stored [D, E*C] slot parameters as [D, E, C] (column e*C + c is slot c of expert e)."""
  return params["phi"].reshape(D, E, C)


# --- float64 reference from the paper ------------------------------------------------------------


def _l2(v, axis):
  return v / np.sqrt(np.sum(v**2, axis=axis, keepdims=True) + 1e-6)


def _softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


def _reference(params, x, mask=None):
  """(y_GSD, dispatch_GSEC, combine_GSEC) of Soft MoE in float64."""
  x = np.asarray(x, np.float64)
  mask = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask)
  p64 = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  phi = float(p64["scale"]) * _l2(p64["phi"].reshape(D, E, C), axis=0)
  logits = np.einsum("gsd,dec->gsec", _l2(x, axis=-1), phi)
  dispatch, combine = np.zeros_like(logits), np.zeros_like(logits)
  for g in range(x.shape[0]):
    real = np.nonzero(mask[g])[0]
    for e in range(E):
      for c in range(C):
        if len(real):  # a slot's weights over the real tokens only
          dispatch[g, real, e, c] = _softmax(logits[g, real, e, c])
    for s in real:  # a real token's weights over all E * C slots
      combine[g, s] = _softmax(logits[g, s].ravel()).reshape(E, C)
  slots = np.einsum("gsec,gsd->egcd", dispatch, x)
  wi, wo = p64["expert"]["wi"]["kernel"], p64["expert"]["wo"]["kernel"]
  out = np.einsum("egcf,efd->egcd", np.maximum(np.einsum("egcd,edf->egcf", slots, wi), 0), wo)
  return np.einsum("gsec,egcd->gsd", combine, out), dispatch, combine


# --- weights --------------------------------------------------------------------------------------


def test_dispatch_is_a_softmax_over_tokens_and_combine_over_slots(params):
  mask = np.ones((G, S), bool)
  mask[1, 4:] = False
  logits = soft_moe.soft_moe_logits(_x(), _phi_DEC(params), params["scale"])
  dispatch, combine = map(np.asarray, soft_moe.soft_moe_weights(logits, jnp.asarray(mask)))
  np.testing.assert_allclose(dispatch.sum(axis=1), 1.0, rtol=1e-6)    # per slot, over tokens
  np.testing.assert_allclose(combine.sum(axis=(2, 3))[mask], 1.0, rtol=1e-6)  # per real token
  assert np.all(dispatch[~mask] == 0.0) and np.all(combine[~mask] == 0.0)
  _, ref_dispatch, ref_combine = _reference(params, _x(), mask)
  np.testing.assert_allclose(dispatch, ref_dispatch, atol=1e-6)
  np.testing.assert_allclose(combine, ref_combine, atol=1e-6)


def test_l2_normalisation_makes_logits_invariant_to_input_and_slot_scale(params):
  x, phi = _x(), _phi_DEC(params)
  logits = np.asarray(soft_moe.soft_moe_logits(x, phi, 1.0))
  assert np.abs(logits).max() <= 1.0 + 1e-6 and np.abs(logits).max() > 0.3  # cosines
  for c in (0.5, 40.0):  # the 1e-6 under the square root matters only for |v|^2 near 1e-6
    np.testing.assert_allclose(soft_moe.soft_moe_logits(c * x, phi, 1.0), logits, atol=1e-5)
    np.testing.assert_allclose(soft_moe.soft_moe_logits(x, c * phi, 1.0), logits, atol=1e-5)
  np.testing.assert_allclose(soft_moe.soft_moe_logits(x, phi, 3.0), 3.0 * logits, atol=1e-6)


# --- the layer ------------------------------------------------------------------------------------


def test_layer_equals_the_float64_reference_and_its_stats(params, apply):
  mask = np.ones((G, S), bool)
  mask[2, 3:] = False
  y, state = apply(params, _x(), jnp.asarray(mask))
  ref, _, combine = _reference(params, _x(), mask)
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
  stats = _stats(state)
  for name in ("load_balancing_loss", "z_loss", "fraction_dropped"):
    assert float(getattr(stats, name)) == 0.0, name
  np.testing.assert_allclose(stats.expert_load_E, combine.sum(-1)[mask].mean(0), rtol=1e-5)
  np.testing.assert_allclose(np.sum(stats.expert_load_E), 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats.router_confidence, combine.max(axis=(2, 3))[mask].mean(),
                             rtol=1e-5)


def test_identical_slot_vectors_mix_uniformly(params, apply):
  """Equal logits for every slot: each token reads each slot with weight 1 / (E * C)."""
  same = {**params, "phi": jnp.broadcast_to(params["phi"][:, :1], params["phi"].shape)}
  _, state = apply(same, _x())
  np.testing.assert_allclose(_stats(state).router_confidence, 1.0 / (E * C), rtol=1e-6)
  np.testing.assert_allclose(_stats(state).expert_load_E, np.full(E, 1.0 / E), rtol=1e-6)


def test_permuting_tokens_permutes_outputs(params, apply):
  perm = np.random.RandomState(1).permutation(S)
  mask = np.ones((G, S), bool)
  mask[0, -2:] = False
  y, _ = apply(params, _x(), jnp.asarray(mask))
  y_perm, _ = apply(params, _x()[:, perm], jnp.asarray(mask[:, perm]))
  np.testing.assert_allclose(y_perm, np.asarray(y)[:, perm], atol=1e-6)


def test_padding_takes_no_part_and_only_padding_gives_zeros(params, apply):
  mask = np.ones((G, S), bool)
  mask[0, 4:] = False   # two padding tokens
  mask[1, :] = False    # a sequence of only padding
  x = _x()
  garbage = x.at[0, 4:].set(_x(seed=5, shape=(2, D), scale=100.0)).at[1].set(_x(seed=6)[1])
  y, state = apply(params, x, jnp.asarray(mask))
  y_garbage, _ = apply(params, garbage, jnp.asarray(mask))
  y = np.asarray(y)
  assert np.all(np.isfinite(y)) and np.all(y[~mask] == 0.0)
  np.testing.assert_allclose(y_garbage, y, atol=1e-6)
  # The real tokens alone, unpadded, give the same outputs.
  alone, _ = apply(params, x[:1, :4])
  np.testing.assert_allclose(y[0, :4], alone[0], atol=1e-6)
  assert np.isfinite(float(_stats(state).router_confidence))
  logits = soft_moe.soft_moe_logits(x, _phi_DEC(params), params["scale"])
  dispatch, _ = soft_moe.soft_moe_weights(logits, jnp.asarray(mask))
  assert np.all(np.asarray(dispatch)[~mask] == 0.0)
  # Training through an all-padding sequence: finite, non-zero gradients for Phi and scale.
  loss = lambda p: jnp.sum(apply(p, x, jnp.asarray(mask))[0] ** 2)
  grads = jax.grad(loss)(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.abs(grads["phi"]).max() > 1e-4 and abs(float(grads["scale"])) > 1e-4


def test_relu_experts_make_the_layer_positively_homogeneous(params, apply):
  """Routing ignores the input scale and bias-free ReLU experts commute with it: y(3x) = 3y(x)."""
  y, _ = apply(params, _x())
  np.testing.assert_allclose(apply(params, 3.0 * _x())[0], 3.0 * np.asarray(y), rtol=1e-4,
                             atol=1e-5)


def test_bfloat16_layer_keeps_routing_in_float32(params):
  layer = LAYER.copy(dtype=jnp.bfloat16, expert=LAYER.expert.copy(dtype=jnp.bfloat16))
  y, state = layer.apply({"params": params}, _x().astype(jnp.bfloat16), mutable=[MOE_STATS])
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state[MOE_STATS]))
  np.testing.assert_allclose(np.asarray(y, np.float32), _reference(params, _x())[0], atol=0.05)


# --- validation and stacks ------------------------------------------------------------------------


def test_invalid_fields_and_causal_use_are_refused_by_name():
  with pytest.raises(ValueError, match="SoftMoE.slots_per_expert must be >= 1"):
    SoftMoE(slots_per_expert=0)
  with pytest.raises(ValueError, match="SoftMoE.num_experts must be >= 1"):
    SoftMoE(num_experts=0)
  with pytest.raises(ValueError, match="SoftMoE .* encoders and classifiers only"):
    SoftMoE(causal=True)
  with pytest.raises(ValueError, match="SparseDecoder.moe: SoftMoE .* cannot be causal"):
    SparseDecoder(num_layers=2, num_sparse_layers=1, moe=LAYER)
  SparseEncoder(num_layers=2, num_sparse_layers=1, moe=LAYER)
  SparseDecoder(num_layers=2, num_sparse_layers=0, moe=LAYER)  # dense: never builds it


def test_decoder_only_lm_with_soft_moe_fails_at_build_time():
  gin_utils.parse_gin(["models/switch_tiny.gin"], ["SparseDecoder.moe = @SoftMoE()"])
  with pytest.raises(ValueError, match="SparseDecoder.moe: SoftMoE .* encoders and classifiers"):
    build_network()


def test_summary_counts_every_soft_moe_weight_as_active():
  """soft_moe_tiny = switch_t5_tiny with the encoder's router [D, E] replaced by Phi [D, E*C] and
  scale; every token's output mixes all E encoder experts, one of E decoder experts is active."""
  infos = {}
  for name in ("switch_t5_tiny", "soft_moe_tiny"):
    gin.clear_config()
    gin_utils.parse_gin([f"models/{name}.gin"])
    infos[name] = summary.summarize(build_network())
  d_model, experts, slots, ffn = 64, 8, 16, 256
  soft = infos["soft_moe_tiny"]
  assert soft["num_params"] - infos["switch_t5_tiny"]["num_params"] == (
      d_model * experts * slots + 1 - d_model * experts)
  decoder_experts = experts * 3 * d_model * ffn  # gated GELU: wi_0, wi_1, wo
  assert soft["active_params_per_token"] == soft["num_params"] - decoder_experts * 7 // 8
  assert soft["moe_layers"][0] == {
      "layer": "encoder/layers_1", "router": "SoftMoE", "num_experts": experts,
      "experts_per_token": experts, "slots_per_expert": slots,
      "expert_params": decoder_experts}
  assert "slots per expert=16" in summary.format_summary(soft)


def test_expert_sharded_layer_compiles_to_all_to_all(params):
  """On a (data 2, expert 4) mesh the slot buffers move to the experts' devices and back; every
  parameter's logical axes map to mesh axes (a name may not repeat within one array)."""
  mesh = partitioning.make_mesh((2, 4, 1))
  x = jax.ShapeDtypeStruct((8, S, D), jnp.float32, sharding=partitioning.batch_sharding(mesh))
  boxed = jax.eval_shape(lambda x: LAYER.init(jax.random.key(0), x), x)["params"]
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                          partitioning.LOGICAL_AXIS_RULES)
  assert shardings["expert"]["wi"]["kernel"].spec[0] == "expert"
  with jax.set_mesh(mesh), partitioning.axis_rules():
    hlo = jax.jit(lambda p, x: LAYER.apply({"params": p}, x)).lower(params, x).compile(
        compiler_options={"xla_backend_optimization_level": 0}).as_text()
  assert hlo.count(" all-to-all(") == 2
