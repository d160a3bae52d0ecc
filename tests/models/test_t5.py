"""Sparse T5 stacks: layouts, dense equivalence, padding, packing, causality, validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MOE_STATS, MoeLayer
from moe_jax.layers.routing import ExpertChoiceRouter, SwitchRouter, TopKRouter
from moe_jax.models.decoder_only import SparseDecoderOnly
from moe_jax.models.t5 import (MoeLayout, SparseDecoder, SparseEncoder, SparseEncoderDecoder,
                               sparse_layer_indices)

D, F, HEADS, HEAD_DIM, V = 16, 32, 2, 8, 40


def _moe(num_experts=4, router=None, capacity_factor=None, activations=("gelu", "linear")):
  """An MoE layer; capacity_factor=None means no token is ever dropped (C = S)."""
  cf = num_experts if capacity_factor is None else capacity_factor
  return MoeLayer(num_experts=num_experts, router=router or SwitchRouter(),
                  expert=ExpertMlp(intermediate_dim=F, activations=activations),
                  train_capacity_factor=cf, eval_capacity_factor=cf, min_expert_capacity=1)


def _mlp():
  return MlpBlock(intermediate_dim=F, activations=("gelu", "linear"))


def _encdec(enc_sparse=1, dec_sparse=1, moe=None, layers=2, **kw):
  stack = dict(num_layers=layers, num_heads=HEADS, head_dim=HEAD_DIM, mlp=_mlp())
  moe = _moe() if moe is None else moe
  return SparseEncoderDecoder(
      vocab_size=V, embed_dim=D,
      encoder=SparseEncoder(num_sparse_layers=enc_sparse, moe=moe, **stack),
      decoder=SparseDecoder(num_sparse_layers=dec_sparse, moe=moe, **stack), **kw)


def _lm(sparse=1, moe=None, layers=2, **kw):
  return SparseDecoderOnly(
      vocab_size=V, embed_dim=D,
      decoder=SparseDecoder(num_layers=layers, num_sparse_layers=sparse,
                            moe=_moe() if moe is None else moe, num_heads=HEADS,
                            head_dim=HEAD_DIM, mlp=_mlp()), **kw)


def _params(net, **inputs):
  return nn.unbox(net.init(jax.random.key(0), **inputs)["params"])


@pytest.mark.parametrize("layout,num_sparse,expected", [
    (MoeLayout.BOTTOM, 4, (0, 1, 2, 3)),
    (MoeLayout.MIDDLE, 2, (5, 6)),
    (MoeLayout.MIXED, 3, (3, 7, 11)),
    (MoeLayout.MIXED, 6, (1, 3, 5, 7, 9, 11)),
    (MoeLayout.MIXED, 12, tuple(range(12))),
    (MoeLayout.TOP, 1, (11,)),
    (MoeLayout.TOP, 0, ()),
])
def test_sparse_layer_indices_at_12_layers(layout, num_sparse, expected):
  assert sparse_layer_indices(12, num_sparse, layout) == expected


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_sparse_layers=3, num_layers=2), "SparseEncoder.num_sparse_layers"),
    (dict(num_sparse_layers=-1), "SparseEncoder.num_sparse_layers"),
    (dict(num_sparse_layers=1, sparse_layout="top"), "SparseEncoder.sparse_layout"),
    (dict(num_layers=12, num_sparse_layers=5), "SparseEncoder.num_sparse_layers=5 must divide"),
    (dict(num_sparse_layers=1, moe=None), "SparseEncoder.moe"),
    (dict(num_layers=0), "SparseEncoder.num_layers"),
])
def test_invalid_stack_config_names_the_field(kwargs, match):
  kwargs = dict(dict(num_layers=2, moe=_moe()), **kwargs)
  with pytest.raises(ValueError, match=match):
    SparseEncoder(**kwargs)


def test_expert_choice_in_a_decoder_is_rejected():
  with pytest.raises(ValueError, match="SparseDecoder.moe.router: ExpertChoiceRouter .* cannot route a causal decoder"):
    SparseDecoder(num_layers=2, num_sparse_layers=1, moe=_moe(router=ExpertChoiceRouter()))
  SparseEncoder(num_layers=2, num_sparse_layers=1, moe=_moe(router=ExpertChoiceRouter()))


def test_sparse_layers_get_moe_params_and_extra_dense_mlp():
  net = _encdec(enc_sparse=2, dec_sparse=1, layers=4)
  net = net.clone(decoder=net.decoder.clone(extra_dense_mlp=True))
  params = _params(net, **net.example_batch())
  enc, dec = params["encoder"], params["decoder"]
  # MIXED 2 of 4 -> layers 1, 3; MIXED 1 of 4 -> layer 3.
  assert [i for i in range(4) if "router" in enc[f"layers_{i}"]["mlp"]] == [1, 3]
  assert [i for i in range(4) if "router" in dec[f"layers_{i}"]["mlp"]] == [3]
  assert [i for i in range(4) if "extra_mlp" in dec[f"layers_{i}"]] == [3]
  assert enc["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"].shape == (4, D, F)
  assert enc["layers_1"]["mlp"]["expert"]["wo"]["kernel"].shape == (4, F, D)
  assert enc["layers_1"]["mlp"]["router"]["router_weights"]["w"]["kernel"].shape == (D, 4)
  # Each sparse layer owns its experts (no sharing through the template).
  assert not np.array_equal(enc["layers_1"]["mlp"]["expert"]["wo"]["kernel"],
                            enc["layers_3"]["mlp"]["expert"]["wo"]["kernel"])


def test_zero_sparse_layers_is_the_dense_model():
  batch = _encdec().example_batch(2, 8)
  sparse0 = _encdec(enc_sparse=0, dec_sparse=0)
  dense = _encdec(enc_sparse=0, dec_sparse=0).clone(
      encoder=sparse0.encoder.clone(moe=None), decoder=sparse0.decoder.clone(moe=None))
  params = _params(dense, **batch)
  assert jax.tree.structure(params) == jax.tree.structure(_params(sparse0, **batch))
  np.testing.assert_array_equal(dense.apply({"params": params}, **batch),
                                sparse0.apply({"params": params}, **batch))


def test_single_expert_moe_equals_the_dense_mlp():
  """E=1, no capacity limit: router probability is exactly 1, so the MoE layer IS its expert."""
  rng = np.random.default_rng(0)
  batch = {"encoder_input_tokens": jnp.asarray(rng.integers(1, V, (2, 8))),
           "decoder_input_tokens": jnp.asarray(rng.integers(1, V, (2, 6)))}
  dense = _encdec(enc_sparse=0, dec_sparse=0)
  sparse = _encdec(enc_sparse=2, dec_sparse=2, moe=_moe(num_experts=1))
  dense_params = _params(dense, **batch)
  sparse_params = jax.tree.map(lambda x: x, _params(sparse, **batch))
  for stack in ("encoder", "decoder"):
    for i in range(2):
      layer = dict(sparse_params[stack][f"layers_{i}"])
      mlp = dense_params[stack][f"layers_{i}"]["mlp"]
      layer["mlp"] = dict(layer["mlp"], expert={
          name: {"kernel": w["kernel"][None]} for name, w in mlp.items()})
      dense_layer = dict(dense_params[stack][f"layers_{i}"])
      sparse_params[stack][f"layers_{i}"] = dict(dense_layer, mlp=layer["mlp"])
    for shared in ("relpos_bias", f"{stack}_norm"):
      sparse_params[stack][shared] = dense_params[stack][shared]
  sparse_params["token_embedder"] = dense_params["token_embedder"]
  np.testing.assert_allclose(sparse.apply({"params": sparse_params}, **batch),
                             dense.apply({"params": dense_params}, **batch), atol=1e-5)


def test_padding_does_not_change_real_positions():
  net = _encdec()
  rng = np.random.default_rng(1)
  enc = rng.integers(1, V, (2, 6))
  dec_in = np.pad(rng.integers(1, V, (2, 5)), ((0, 0), (1, 0)))[:, :5]
  targets = rng.integers(1, V, (2, 5))
  short = dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in,
               decoder_target_tokens=targets)
  pad = lambda x: np.pad(x, ((0, 0), (0, 3)))
  long = {k: pad(v) for k, v in short.items()}
  params = _params(net, **long)
  out_short = net.apply({"params": params}, **short)
  out_long = net.apply({"params": params}, **long)
  np.testing.assert_allclose(out_long[:, :5], out_short, atol=1e-5)


def test_packed_segments_match_separate_sequences():
  lm = _lm(moe=_moe(router=TopKRouter(k=2)))
  rng = np.random.default_rng(2)
  a, b = rng.integers(1, V, 5), rng.integers(1, V, 3)
  shift = lambda t: np.concatenate([[0], t[:-1]])
  packed = dict(decoder_input_tokens=np.concatenate([shift(a), shift(b)])[None],
                decoder_target_tokens=np.concatenate([a, b])[None],
                decoder_segment_ids=np.array([[1] * 5 + [2] * 3]))
  params = _params(lm, **packed)
  out_packed = lm.apply({"params": params}, **packed)[0]
  out_a = lm.apply({"params": params}, decoder_input_tokens=shift(a)[None],
                   decoder_target_tokens=a[None])[0]
  out_b = lm.apply({"params": params}, decoder_input_tokens=shift(b)[None],
                   decoder_target_tokens=b[None])[0]
  np.testing.assert_allclose(out_packed, np.concatenate([out_a, out_b]), atol=1e-5)


def test_decoder_is_causal():
  lm = _lm(layers=2)
  tokens = np.arange(1, 9)[None]
  params = _params(lm, decoder_input_tokens=tokens)
  changed = tokens.copy()
  changed[0, 5] = 30
  before = lm.apply({"params": params}, decoder_input_tokens=tokens)
  after = lm.apply({"params": params}, decoder_input_tokens=changed)
  np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6)
  assert not np.allclose(before[:, 5:], after[:, 5:])


def test_bfloat16_model_keeps_router_and_logits_float32():
  moe = _moe().clone(dtype=jnp.bfloat16, expert=_moe().expert.clone(dtype=jnp.bfloat16))
  lm = _lm(moe=moe, dtype=jnp.bfloat16)
  lm = lm.clone(decoder=lm.decoder.clone(dtype=jnp.bfloat16, mlp=_mlp().clone(dtype=jnp.bfloat16)))
  tokens = np.arange(1, 9)[None]
  variables = lm.init(jax.random.key(0), decoder_input_tokens=tokens)
  params = nn.unbox(variables["params"])
  (logits, state), = [lm.apply({"params": params}, decoder_input_tokens=tokens,
                               mutable=[MOE_STATS, "intermediates"], capture_intermediates=True)]
  assert logits.dtype == jnp.float32
  router_out = state["intermediates"]["decoder"]["layers_1"]["mlp"]["router"]["router_weights"]
  assert router_out["__call__"][0].dtype == jnp.float32
  hidden = state["intermediates"]["decoder"]["layers_1"]["mlp"]["expert"]["__call__"][0]
  assert hidden.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_logits_tied_and_untied():
  for tied in (True, False):
    lm = _lm(logits_via_embedding=tied)
    params = _params(lm, **lm.example_batch())
    assert ("logits_dense" in params.get("logits_head", {})) == (not tied)
    assert lm.apply({"params": params}, **lm.example_batch()).shape == (2, 8, V)
