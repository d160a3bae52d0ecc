"""Mixture-of-Depths (moe_jax.layers.mixture_of_depths), Raposo et al. 2024.

References are float64 numpy from the paper's formulas: router scores r = x . w_r, the top k by
argsort, the predictor MLP written out, the chosen tokens' attention bias rebuilt from their
original positions with T5's bucketing, and the block run alone on the gathered subsequence.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decoding, gin_utils
from moe_jax.layers.attention import (RelativePositionBias, attention_mask, mask_to_bias,
                                      relative_position_bucket)
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.mixture_of_depths import MixtureOfDepths
from moe_jax.layers.moe import MOE_STATS
from moe_jax.models import build_network
from moe_jax.models.summary import param_table, summarize
from moe_jax.models.t5 import SparseDecoder, TransformerLayer
from moe_jax.train.partitioning import LOGICAL_AXIS_RULES

B, L, D, N, H, F = 3, 12, 16, 2, 8, 32
BUCKETS, MAX_DISTANCE = 8, 16
# An encoder output for cross-attention, its last positions padding in two rows.
ENCODED_BMD = jnp.asarray(np.random.RandomState(9).normal(0, 1, (B, 5, D)), jnp.float32)
ENCODER_REAL_BM = jnp.asarray(np.arange(5)[None, :] < np.array([[4], [3], [5]]))


def _block(decoder):
  mlp = MlpBlock(intermediate_dim=F, activations=("gelu", "linear"), parent=None)
  return TransformerLayer(N, H, mlp, decoder=decoder, parent=None)


class _Harness(nn.Module):
  """A block behind Mixture-of-Depths, biased as `t5._SparseStack` biases it."""
  mod: MixtureOfDepths
  decoder: bool = True
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x_BLD, padding_BL):
    relpos = RelativePositionBias(N, bidirectional=not self.decoder, num_buckets=BUCKETS,
                                  max_distance=MAX_DISTANCE, name="relpos")
    bias = mask_to_bias(attention_mask(padding_BL, padding_BL, causal=self.decoder))
    block = _block(self.decoder).clone(parent=self, name="block")
    cross = {}
    if self.cross_attention:
      cross = dict(encoded_BMD=ENCODED_BMD, cross_bias_BNLM=mask_to_bias(
          attention_mask(padding_BL, ENCODER_REAL_BM)))
    return self.mod(block, x_BLD, bias + relpos(L, L), padding_BL, **cross)


def _jit(fn):
  """jax.jit without LLVM optimisation: these tiny programs run a few times each."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _block_apply(decoder):
  def apply(params, x_BKD, bias_BNKK, encoded_BMD=None, cross_bias_BNKM=None):
    return _block(decoder).apply({"params": params}, x_BKD, bias_BNKK,
                                 jnp.ones(x_BKD.shape[:2], bool), encoded_BMD=encoded_BMD,
                                 cross_bias_BNLM=cross_bias_BNKM)
  return _jit(apply)


_BLOCK = {decoder: _block_apply(decoder) for decoder in (True, False)}


def _x(seed):
  return jnp.asarray(np.random.RandomState(seed).normal(0, 1, (B, L, D)), jnp.float32)


ALL_REAL = jnp.ones((B, L), bool)


@pytest.fixture(scope="module")
def nets():
  """name -> (harness, params, jitted apply returning (out, RouterStats), unjitted apply)."""
  out = {}
  for name, decoder, mod in [
      ("decoder", True, MixtureOfDepths(capacity_fraction=0.25)),
      ("encoder", False, MixtureOfDepths(capacity_fraction=0.25)),
      ("cross_attention", True, MixtureOfDepths(capacity_fraction=0.25)),
      ("causal", True, MixtureOfDepths(capacity_fraction=0.25, causal_selection=True)),
      ("router", True, MixtureOfDepths(capacity_fraction=0.25, predictor="router"))]:
    harness = _Harness(mod, decoder, cross_attention=name == "cross_attention")
    shapes = nn.unbox(jax.eval_shape(harness.init, jax.random.key(0), _x(0), ALL_REAL))
    rng = np.random.RandomState(1)  # predictor biases too: its decisions must be mixed
    params = jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.5, v.shape), jnp.float32),
                          shapes["params"])

    def apply(params, x, padding, harness=harness):
      y, state = harness.apply({"params": params}, x, padding, mutable=[MOE_STATS])
      return y, state[MOE_STATS]["mod"]["router_stats"][0]

    out[name] = (harness, params, _jit(apply), apply)
  return out


def _r(params, x):
  return np.asarray(x, np.float64) @ np.asarray(params["mod"]["router_kernel"], np.float64)


def _predictor(params, x):
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params["mod"])
  hidden, logit = p["predictor_hidden"], p["predictor_logit"]
  h = np.maximum(np.asarray(x, np.float64) @ hidden["kernel"] + hidden["bias"], 0.0)
  return (h @ logit["kernel"] + logit["bias"])[..., 0]


def _reference(params, x_LD, chosen, decoder, cross_row=None):
  """x + r * (block(x~) - x~) on the chosen positions of one row (all real), by hand;
  `cross_row`: the row of the encoder output the block attends to."""
  pos = np.flatnonzero(chosen)
  table = np.asarray(params["relpos"]["rel_embedding"])
  buckets = relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=not decoder,
                                     num_buckets=BUCKETS, max_distance=MAX_DISTANCE)
  bias = table[:, buckets]
  if decoder:
    bias = bias + np.where(pos[None, :] <= pos[:, None], 0.0, -1e10)
  x_KD = np.asarray(x_LD)[pos]
  cross = ()
  if cross_row is not None:
    cross_bias = np.where(ENCODER_REAL_BM[cross_row], 0.0, -1e10)
    cross = (ENCODED_BMD[cross_row][None],
             jnp.asarray(np.broadcast_to(cross_bias, (1, 1, len(pos), 5)), jnp.float32))
  y_KD = _BLOCK[decoder](params["block"], jnp.asarray(x_KD)[None],
                         jnp.asarray(bias, jnp.float32)[None], *cross)
  f_KD = np.asarray(y_KD[0], np.float64) - x_KD
  return x_KD + _r(params, x_KD)[:, None] * f_KD, f_KD


def _changed(out, x):
  return np.any(np.asarray(out) != np.asarray(x), axis=-1)


@pytest.mark.parametrize("name", ["decoder", "encoder", "cross_attention"])
def test_top_k_tokens_get_the_block_on_their_subsequence_others_pass_bit_identical(nets, name):
  harness, params, apply, _ = nets[name]
  x = _x(2)
  out, stats = apply(params, x, ALL_REAL)
  k = 3  # ceil(0.25 * 12)
  chosen = np.zeros((B, L), bool)
  np.put_along_axis(chosen, np.argsort(-_r(params, x), axis=-1)[:, :k], True, axis=-1)
  np.testing.assert_array_equal(_changed(out, x), chosen)
  assert np.all(chosen.sum(-1) == k)
  np.testing.assert_array_equal(np.asarray(out)[~chosen], np.asarray(x)[~chosen])
  for row in range(B):
    expected, _ = _reference(params, x[row], chosen[row], harness.decoder,
                             row if harness.cross_attention else None)
    np.testing.assert_allclose(np.asarray(out)[row][chosen[row]], expected, atol=2e-5)
  np.testing.assert_allclose(stats.fraction_dropped, 1 - k / L, rtol=1e-6)
  np.testing.assert_allclose(stats.expert_load_E, [k / L, 1 - k / L], rtol=1e-6)


def test_padding_is_never_chosen_while_real_tokens_remain(nets):
  _, params, apply, _ = nets["decoder"]
  real = np.arange(L)[None, :] < np.array([[L], [7], [2]])
  # Padding scores far above every real token: chosen only if the mask is ignored.
  w = np.asarray(params["mod"]["router_kernel"])
  x = np.where(real[..., None], _x(3), 50.0 * w / np.dot(w, w))
  out, stats = apply(params, jnp.asarray(x, jnp.float32), jnp.asarray(real))
  changed = _changed(out, x)
  assert not changed[~real].any()  # padding passes through bit-identical
  assert changed.sum(-1).tolist() == [3, 3, 2]  # row 2: fewer real tokens than k = 3
  r = np.where(real, _r(params, x), -np.inf)
  np.testing.assert_array_equal(changed[1], r[1] >= np.sort(r[1])[-3])
  np.testing.assert_allclose(stats.fraction_dropped, 1 - 8 / (L + 7 + 2), rtol=1e-6)


def test_predictor_selection_is_causal_and_is_the_block_on_the_predicted_subsequence(nets):
  harness, params, apply, _ = nets["causal"]
  x = _x(4)
  out, stats = apply(params, x, ALL_REAL)
  predicted = _predictor(params, x) > 0
  assert 0 < predicted.sum() < B * L  # both processed and skipped tokens
  np.testing.assert_array_equal(_changed(out, x), predicted)
  for row in range(B):
    expected, _ = _reference(params, x[row], predicted[row], decoder=True)
    np.testing.assert_allclose(np.asarray(out)[row][predicted[row]], expected, atol=2e-5)
  np.testing.assert_allclose(stats.fraction_dropped, 1 - predicted.mean(), rtol=1e-6)
  for t in (3, 8):
    changed = x.at[:, t:].set(_x(5)[:, t:])
    np.testing.assert_allclose(apply(params, changed, ALL_REAL)[0][:, :t], out[:, :t], atol=1e-6)
  # The top k is not causal: the same change moves earlier outputs of the training rule.
  _, top_params, top_apply, _ = nets["decoder"]
  changed = x.at[:, 6:].set(_x(5)[:, 6:] * 3)
  assert not np.allclose(top_apply(top_params, changed, ALL_REAL)[0][:, :6],
                         top_apply(top_params, x, ALL_REAL)[0][:, :6])


def test_gradient_reaches_the_router_through_r(nets):
  _, params, _, apply = nets["decoder"]
  x, g = _x(6), np.random.RandomState(7).normal(0, 1, (B, L, D))
  grad = _jit(jax.grad(lambda p: jnp.sum(apply(p, x, ALL_REAL)[0] * g)))(params)
  # The selection is piecewise constant: d/dw of sum_i g_i . (x_i + (x_i . w) f_i) over the
  # chosen i is sum_i (g_i . f_i) x_i.
  expected = np.zeros(D)
  for row in range(B):
    chosen = np.zeros(L, bool)
    chosen[np.argsort(-_r(params, x[row]))[:3]] = True
    _, f_KD = _reference(params, x[row], chosen, decoder=True)
    expected += np.einsum("KD,KD,KE->E", g[row][chosen], f_KD, np.asarray(x[row])[chosen])
  np.testing.assert_allclose(grad["mod"]["router_kernel"], expected, rtol=1e-4, atol=1e-4)
  assert np.abs(expected).max() > 1e-2


@pytest.mark.parametrize("name", ["decoder", "router"])
def test_predictor_loss_is_the_bce_against_the_top_k(nets, name):
  _, params, apply, raw_apply = nets[name]
  x = _x(8)
  stats = apply(params, x, ALL_REAL)[1]
  logit = _r(params, x) if name == "router" else _predictor(params, x)
  target = np.zeros((B, L), bool)
  np.put_along_axis(target, np.argsort(-_r(params, x), axis=-1)[:, :3], True, axis=-1)
  p = 1 / (1 + np.exp(-logit))
  bce = -np.mean(np.where(target, np.log(p), np.log(1 - p)))
  np.testing.assert_allclose(stats.load_balancing_loss, bce, rtol=1e-5)
  np.testing.assert_allclose(stats.router_confidence, np.mean((logit > 0) == target), rtol=1e-6)
  assert float(stats.z_loss) == 0.0
  # The MLP predictor sees stop_gradient(x): its loss trains only itself.
  loss = lambda p, x: raw_apply(p, x, ALL_REAL)[1].load_balancing_loss
  grad_w, grad_x = _jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  grad_w = grad_w["mod"]
  if name == "decoder":
    assert float(jnp.abs(grad_x).max()) == 0.0
    assert float(jnp.abs(grad_w["router_kernel"]).max()) == 0.0
    assert float(jnp.abs(grad_w["predictor_hidden"]["kernel"]).max()) > 1e-4
  else:
    assert float(jnp.abs(grad_w["router_kernel"]).max()) > 1e-4


def test_bad_settings_fail_at_construction_naming_the_field():
  for kwargs, match in [(dict(capacity_fraction=0.0), "MixtureOfDepths.capacity_fraction"),
                        (dict(capacity_fraction=1.5), "MixtureOfDepths.capacity_fraction"),
                        (dict(predictor="lstm"), "MixtureOfDepths.predictor"),
                        (dict(predictor_hidden_dim=0), "MixtureOfDepths.predictor_hidden_dim")]:
    with pytest.raises(ValueError, match=match):
      MixtureOfDepths(**kwargs)
  with pytest.raises(ValueError, match="SparseDecoder.mixture_of_depths must be set"):
    SparseDecoder(num_layers=2, num_mod_layers=1)
  with pytest.raises(ValueError, match=r"SparseDecoder.num_mod_layers must be in \[0, num_lay"):
    SparseDecoder(num_layers=2, num_mod_layers=3, mixture_of_depths=MixtureOfDepths())
  with pytest.raises(ValueError, match=r"SparseDecoder.mod_layout=\(0, 0\)"):
    SparseDecoder(num_layers=2, num_mod_layers=2, mod_layout=(0, 0),
                  mixture_of_depths=MixtureOfDepths())


def test_mod_tiny_wraps_every_other_block_and_decodes_with_the_predictor():
  gin_utils.parse_gin(["models/mod_tiny.gin"], ["EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2",
                                                "HEAD_DIM=8", "VOCAB_SIZE=48"])
  network = build_network()
  assert network.decoder.mod_layers == (1, 3)
  shapes = nn.unbox(jax.eval_shape(network.init, jax.random.key(0), **network.example_batch()))
  assert set(shapes["params"]["decoder"]) >= {"layers_1", "mod_1", "layers_3", "mod_3"}
  assert "mod_0" not in shapes["params"]["decoder"]
  known = {name for name, _ in LOGICAL_AXIS_RULES}
  table = param_table(network)
  for path, entry in table.items():
    assert set(entry["axes"]) <= known, (path, entry)
  # Per token on average: 1 - 1/8 of each routed block's weights go unused.
  block = sum(int(np.prod(e["shape"])) for p, e in table.items()
              if p.startswith("decoder/layers_1/"))
  info = summarize(network)
  assert info["active_params_per_token"] == info["num_params"] - round(2 * 7 / 8 * block)
  assert [m["layer"] for m in info["mod_layers"]] == ["decoder/layers_1", "decoder/layers_3"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.5).astype(np.float32),
                        shapes["params"])
  tokens = jnp.asarray(np.random.RandomState(0).randint(2, 48, (2, 16)))
  fraction = lambda net: _jit(lambda p: net.apply({"params": p}, decoder_input_tokens=tokens,
                                                     mutable=[MOE_STATS])[1])(params)
  top_k = fraction(network)[MOE_STATS]["decoder"]
  for layer in ("mod_1", "mod_3"):  # 2 of 16 tokens per sequence
    np.testing.assert_allclose(top_k[layer]["router_stats"][0].fraction_dropped, 14 / 16)
  # Decoding's network lets the predictor decide, per token: a mix of processed and skipped.
  predicted = fraction(decoding.decoding_network(network))[MOE_STATS]["decoder"]
  dropped = [float(predicted[layer]["router_stats"][0].fraction_dropped)
             for layer in ("mod_1", "mod_3")]
  assert any(0 < d < 1 and d != 14 / 16 for d in dropped), dropped
