"""Sparse T5 stacks: layouts, dense equivalence, padding, packing, causality, validation."""

import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers.attention import MultiHeadDotProductAttention
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.embedding import Embed
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MOE_STATS, MoeLayer
from moe_jax.layers.normalization import RMSNorm
from moe_jax.layers.routing import ExpertChoiceRouter, SwitchRouter, TopKRouter
from moe_jax.models import t5
from moe_jax.models.decoder_only import SparseDecoderOnly
from moe_jax.models.t5 import (LogitsHead, MoeLayout, SparseDecoder, SparseEncoder,
                               SparseEncoderDecoder, TransformerLayer, sparse_layer_indices)

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


def _jit(fn):
  """jax.jit for tiny programs that run once or twice: compiled without LLVM optimisation,
  which halves the compile time (op-by-op execution would compile every op instead)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _params(net, **inputs):
  return nn.unbox(_jit(net.init)(jax.random.key(0), **inputs)["params"])


def _apply(net, params, **inputs):
  return _jit(lambda p, inputs: net.apply({"params": p}, **inputs))(params, inputs)


@pytest.mark.parametrize("layout,num_sparse,expected", [
    (MoeLayout.BOTTOM, 4, (0, 1, 2, 3)),
    (MoeLayout.MIDDLE, 2, (5, 6)),       # L - S = 10 even: 10 <= 2i < 14
    (MoeLayout.MIDDLE, 3, (5, 6, 7)),    # L - S = 9 odd: 9 <= 2i < 15, one more above centre
    (MoeLayout.MIDDLE, 1, (6,)),         # 11 <= 2i < 13
    (MoeLayout.MIDDLE, 12, tuple(range(12))),
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
  with pytest.raises(ValueError, match="SparseDecoder.moe.router: ExpertChoiceRouter .* cannot "
                                       "route a causal decoder"):
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


def _t5_bucket(relative, bidirectional, num_buckets, max_distance):
  """Mesh TensorFlow's T5 relative-position bucket of one (key - query) offset."""
  n, bucket = -relative, 0
  if bidirectional:
    num_buckets //= 2
    bucket += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
  return bucket + min(large, num_buckets - 1)


def _reference_t5(p, encoder_tokens, decoder_tokens, num_buckets, max_distance):
  """T5 v1.1 encoder-decoder in float64 numpy, written from the paper and Mesh TensorFlow,
  reading only the parameter tree: RMSNorm pre-norm blocks, unscaled dot-product attention
  with a relative-position bias per stack, gated-GELU FFNs, tied logits / sqrt(D)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  emb = p["token_embedder"]["embedding"]

  def rms(x, scale):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale

  def attention(a, x_q, x_kv, bias):
    q, k, v = (np.einsum("BLD,DNH->BLNH", x, a[n]["kernel"])
               for n, x in (("query", x_q), ("key", x_kv), ("value", x_kv)))
    logits = np.einsum("BLNH,BMNH->BNLM", q, k) + bias
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("BNLM,BMNH,NHD->BLD", w, v, a["out"]["kernel"])

  def ffn(m, x):
    h = x @ m["wi_0"]["kernel"]
    gelu = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return (gelu * (x @ m["wi_1"]["kernel"])) @ m["wo"]["kernel"]

  def relpos(table, length, bidirectional):
    buckets = np.array([[_t5_bucket(k - q, bidirectional, num_buckets, max_distance)
                         for k in range(length)] for q in range(length)])
    return table[:, buckets][None]  # [1, N, L, L]

  masked = lambda keep: np.where(keep, 0.0, -1e10)
  enc_valid, (length_enc, length_dec) = encoder_tokens > 0, (encoder_tokens.shape[1],
                                                             decoder_tokens.shape[1])
  x, stack = emb[encoder_tokens], p["encoder"]
  bias = relpos(stack["relpos_bias"]["rel_embedding"], length_enc, True) + masked(
      enc_valid[:, None, :, None] & enc_valid[:, None, None, :])
  for i in range(len([k for k in stack if k.startswith("layers_")])):
    layer = stack[f"layers_{i}"]
    h = rms(x, layer["pre_attention_layer_norm"]["scale"])
    x = x + attention(layer["attention"], h, h, bias)
    x = x + ffn(layer["mlp"], rms(x, layer["pre_mlp_layer_norm"]["scale"]))
  encoded = rms(x, stack["encoder_norm"]["scale"])

  y, stack = emb[decoder_tokens], p["decoder"]
  causal = np.tril(np.ones((length_dec, length_dec), bool))
  self_bias = relpos(stack["relpos_bias"]["rel_embedding"], length_dec, False) + masked(causal)
  cross_bias = masked(enc_valid[:, None, None, :])
  for i in range(len([k for k in stack if k.startswith("layers_")])):
    layer = stack[f"layers_{i}"]
    h = rms(y, layer["pre_self_attention_layer_norm"]["scale"])
    y = y + attention(layer["self_attention"], h, h, self_bias)
    h = rms(y, layer["pre_cross_attention_layer_norm"]["scale"])
    y = y + attention(layer["encoder_decoder_attention"], h, encoded, cross_bias)
    y = y + ffn(layer["mlp"], rms(y, layer["pre_mlp_layer_norm"]["scale"]))
  y = rms(y, stack["decoder_norm"]["scale"])
  return y @ emb.T / np.sqrt(emb.shape[1])


def test_zero_sparse_layers_is_the_dense_t5():
  """num_sparse_layers=0 (with an MoE template given, and ignored) is T5 v1.1: compared with a
  float64 reimplementation from the parameter tree, not with another path through our code.
  Few relative-position buckets, so that the log-spaced and clipped buckets are used too."""
  buckets, max_distance = 8, 6
  stack = dict(num_layers=2, num_heads=HEADS, head_dim=HEAD_DIM, mlp=_mlp(), moe=_moe(),
               num_sparse_layers=0, relative_attention_num_buckets=buckets,
               relative_attention_max_distance=max_distance)
  net = SparseEncoderDecoder(vocab_size=V, embed_dim=D, encoder=SparseEncoder(**stack),
                             decoder=SparseDecoder(**stack))
  rng = np.random.default_rng(9)
  encoder_tokens = rng.integers(1, V, (2, 12))
  encoder_tokens[1, 9:] = 0  # padding
  batch = dict(encoder_input_tokens=encoder_tokens,
               decoder_input_tokens=rng.integers(1, V, (2, 10)))
  params = _random_params(jax.eval_shape(net.init, jax.random.key(0), **batch)["params"], 10)
  assert not any("router" in str(path) or "expert" in str(path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(params))
  logits = _apply(net, params, **batch)
  expected = _reference_t5(params, encoder_tokens, batch["decoder_input_tokens"], buckets,
                           max_distance)
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


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
  np.testing.assert_allclose(_apply(sparse, sparse_params, **batch),
                             _apply(dense, dense_params, **batch), atol=1e-5)


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
  out_short = _apply(net, params, **short)
  out_long = _apply(net, params, **long)
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
  out_packed = _apply(lm, params, **packed)[0]
  out_a = _apply(lm, params, decoder_input_tokens=shift(a)[None],
                   decoder_target_tokens=a[None])[0]
  out_b = _apply(lm, params, decoder_input_tokens=shift(b)[None],
                   decoder_target_tokens=b[None])[0]
  np.testing.assert_allclose(out_packed, np.concatenate([out_a, out_b]), atol=1e-5)


def test_decoder_is_causal():
  lm = _lm(layers=2)
  tokens = np.arange(1, 9)[None]
  params = _params(lm, decoder_input_tokens=tokens)
  changed = tokens.copy()
  changed[0, 5] = 30
  before = _apply(lm, params, decoder_input_tokens=tokens)
  after = _apply(lm, params, decoder_input_tokens=changed)
  np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6)
  assert not np.allclose(before[:, 5:], after[:, 5:])


def test_bfloat16_model_keeps_router_and_logits_float32():
  moe = _moe().clone(dtype=jnp.bfloat16, expert=_moe().expert.clone(dtype=jnp.bfloat16))
  lm = _lm(moe=moe, dtype=jnp.bfloat16)
  lm = lm.clone(decoder=lm.decoder.clone(dtype=jnp.bfloat16, mlp=_mlp().clone(dtype=jnp.bfloat16)))
  tokens = np.arange(1, 9)[None]
  # Only dtypes are checked: trace, do not compute.
  variables = jax.eval_shape(lm.init, jax.random.key(0), decoder_input_tokens=tokens)
  params = nn.unbox(variables["params"])
  logits, state = jax.eval_shape(lambda p: lm.apply(
      {"params": p}, decoder_input_tokens=tokens, mutable=[MOE_STATS, "intermediates"],
      capture_intermediates=True), params)
  assert logits.dtype == jnp.float32
  router_out = state["intermediates"]["decoder"]["layers_1"]["mlp"]["router"]["router_weights"]
  assert router_out["__call__"][0].dtype == jnp.float32
  hidden = state["intermediates"]["decoder"]["layers_1"]["mlp"]["expert"]["__call__"][0]
  assert hidden.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_logits_tied_and_untied():
  for tied in (True, False):
    lm = _lm(logits_via_embedding=tied)
    params = jax.eval_shape(lm.init, jax.random.key(0), **lm.example_batch())["params"]
    assert ("logits_dense" in params.get("logits_head", {})) == (not tied)
    logits = jax.eval_shape(lambda p: lm.apply({"params": p}, **lm.example_batch()), params)
    assert logits.shape == (2, 8, V)  # values: test_logits_are_projected_in_float32_...


# --- layouts: Flaxformer's MIDDLE rule, explicit indices ---------------------------------------


@pytest.mark.parametrize("num_layers,num_sparse,expected", [
    (4, 1, (2,)),          # 3 <= 2i < 5 (Flaxformer), not the (4 - 1) // 2 = 1 of rounding down
    (4, 2, (1, 2)),        # 2 <= 2i < 6
    (4, 3, (1, 2, 3)),     # 1 <= 2i < 7
    (5, 1, (2,)),          # 4 <= 2i < 6
    (5, 2, (2, 3)),        # 3 <= 2i < 7
    (6, 3, (2, 3, 4)),     # 3 <= 2i < 9
    (1, 1, (0,)),
    (7, 0, ()),
])
def test_middle_layout_is_flaxformers_rule(num_layers, num_sparse, expected):
  assert sparse_layer_indices(num_layers, num_sparse, MoeLayout.MIDDLE) == expected


def test_middle_layout_is_centred_and_has_num_sparse_layers():
  for num_layers in range(1, 13):
    for num_sparse in range(num_layers + 1):
      got = sparse_layer_indices(num_layers, num_sparse, MoeLayout.MIDDLE)
      assert got == tuple(range(got[0], got[0] + num_sparse)) if num_sparse else got == ()
      if num_sparse:
        # As many dense layers below the block as above it, or one more below.
        below, above = got[0], num_layers - 1 - got[-1]
        assert above <= below <= above + 1, (num_layers, num_sparse, got)


@pytest.mark.parametrize("layout,expected", [
    ((1, 4), (1, 4)),      # Hugging Face's i % 3 == 1 for 6 layers, 2 sparse
    ([0, 5], (0, 5)),      # a list works too
])
def test_sparse_layout_as_layer_indices(layout, expected):
  assert sparse_layer_indices(6, 2, layout) == expected


@pytest.mark.parametrize("layout,match", [
    ((4, 1), "increasing"),          # not sorted
    ((1, 1), "increasing"),          # duplicate
    ((1, 6), r"in \[0, 6\)"),        # past the last layer
    ((-1, 2), r"in \[0, 6\)"),
    ((1,), "must be 2 \\(num_sparse_layers\\)"),
    ((0, 2, 4), "must be 2 \\(num_sparse_layers\\)"),
    (("1", "4"), "MoeLayout .* or a tuple of layer indices"),
    (1, "MoeLayout .* or a tuple of layer indices"),
])
def test_sparse_layout_indices_errors_name_the_field(layout, match):
  with pytest.raises(ValueError, match=r"SparseDecoder\.sparse_layout.*" + match):
    SparseDecoder(num_layers=6, num_sparse_layers=2, sparse_layout=layout, moe=_moe())


def test_tuple_layout_puts_moe_at_those_layers():
  net = _lm(sparse=2, layers=4)
  net = net.clone(decoder=net.decoder.clone(sparse_layout=(0, 2)))
  shapes = jax.eval_shape(net.init, jax.random.key(0), **net.example_batch())["params"]
  assert [i for i in range(4) if "router" in shapes["decoder"][f"layers_{i}"]["mlp"]] == [0, 2]


# --- decoders refuse routers that look ahead ---------------------------------------------------


@pytest.mark.parametrize("router", [SwitchRouter(batch_prioritized_routing=True),
                                    TopKRouter(k=2, batch_prioritized_routing=True)],
                         ids=["switch", "top2"])
def test_decoder_refuses_batch_prioritized_routing_naming_the_field(router):
  name = type(router).__name__
  match = rf"SparseDecoder\.moe\.router: {name}\.batch_prioritized_routing=True"
  with pytest.raises(ValueError, match=match):
    SparseDecoder(num_layers=2, num_sparse_layers=1, moe=_moe(router=router))
  with pytest.raises(ValueError, match=match):
    _lm(moe=_moe(router=router))
  SparseEncoder(num_layers=2, num_sparse_layers=1, moe=_moe(router=router))
  SparseDecoder(num_layers=2, num_sparse_layers=0, moe=_moe(router=router))  # no MoE layer


def test_decoder_routes_causally_and_the_template_stays_as_given():
  decoder = SparseDecoder(num_layers=2, num_sparse_layers=1, moe=_moe(router=TopKRouter(k=2)))
  assert decoder._moe_layer().router.causal  # pylint: disable=protected-access
  assert not decoder.moe.router.causal
  encoder = SparseEncoder(num_layers=2, num_sparse_layers=1, moe=_moe(router=TopKRouter(k=2)))
  assert not encoder._moe_layer().router.causal  # pylint: disable=protected-access


def test_gin_encoder_scoped_batch_prioritized_routing_builds():
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from moe_jax.models import build_network  # pylint: disable=g-import-not-at-top
  tiny = ["EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8", "VOCAB_SIZE=64",
          "NUM_EXPERTS=4"]
  gin_utils.parse_gin(["models/switch_t5_tiny.gin"],
                      tiny + ["encoder/SwitchRouter.batch_prioritized_routing=True"])
  net = build_network()
  assert net.encoder.moe.router.batch_prioritized_routing
  assert not net.decoder.moe.router.batch_prioritized_routing
  shapes = jax.eval_shape(net.init, jax.random.key(0), **net.example_batch(2, 8))["params"]
  assert "router" in shapes["encoder"]["layers_1"]["mlp"]
  # Unscoped, the binding reaches the decoder's router too: refused at build time, by name.
  gin.clear_config()
  gin_utils.parse_gin(["models/switch_t5_tiny.gin"],
                      tiny + ["SwitchRouter.batch_prioritized_routing=True"])
  with pytest.raises(ValueError, match=r"SparseDecoder\.moe\.router: .*batch_prioritized_routing"
                                       r".*--gin\.encoder/SwitchRouter"):
    build_network()


# --- ST-MoE's extra dense FFN runs after the MoE FFN -------------------------------------------


def _random_params(shapes, seed=0):
  """Params of the given shapes with every value random (norm scales too), so that swapped or
  skipped pieces show. Kernels get std 1/sqrt(fan-in)."""
  rng = np.random.default_rng(seed)

  def fill(path, shape):
    names = [getattr(k, "key", "") for k in path]
    if names[-1] == "scale":
      return jnp.asarray(1.0 + 0.3 * rng.standard_normal(shape.shape), jnp.float32)
    if names[-1] in ("embedding", "rel_embedding"):
      fan_in = 1
    elif "out" in names:  # attention output [N, H, D]
      fan_in = shape.shape[0] * shape.shape[1]
    else:  # [D, ...] projections, [E, D, F] experts
      fan_in = shape.shape[-2] if len(shape.shape) == 3 and names[-2] in ("wi", "wi_0", "wi_1",
                                                                          "wo") else shape.shape[0]
    return jnp.asarray(rng.standard_normal(shape.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes))


def test_extra_dense_mlp_runs_after_the_moe_ffn():
  """x1 = x + attn(norm(x)); x2 = x1 + moe(norm_mlp(x1)); out = x2 + mlp(norm_extra(x2))."""
  moe, mlp = _moe(router=TopKRouter(k=2)), _mlp()
  layer = TransformerLayer(HEADS, HEAD_DIM, moe, extra_mlp=mlp)
  x = jnp.asarray(np.random.default_rng(3).normal(0, 1, (2, 8, D)), jnp.float32)
  bias = jnp.zeros((1, HEADS, 8, 8))
  p = _random_params(jax.eval_shape(layer.init, jax.random.key(0), x, bias, None)["params"])

  def out_expected_swapped(p, x):
    norm = lambda name, y: RMSNorm().apply({"params": p[name]}, y)
    attend = lambda h: MultiHeadDotProductAttention(HEADS, HEAD_DIM).apply(
        {"params": p["attention"]}, h, h, bias)
    moe_ffn = lambda h: moe.apply({"params": p["mlp"]}, h)
    dense_ffn = lambda h: mlp.apply({"params": p["extra_mlp"]}, h)
    x1 = x + attend(norm("pre_attention_layer_norm", x))
    x2 = x1 + moe_ffn(norm("pre_mlp_layer_norm", x1))
    expected = x2 + dense_ffn(norm("pre_extra_mlp_layer_norm", x2))
    # The other order, extra FFN first:
    x2_swapped = x1 + dense_ffn(norm("pre_extra_mlp_layer_norm", x1))
    swapped = x2_swapped + moe_ffn(norm("pre_mlp_layer_norm", x2_swapped))
    return layer.apply({"params": p}, x, bias, None), expected, swapped

  out, expected, swapped = map(np.asarray, _jit(out_expected_swapped)(p, x))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # The swapped order is a different function, far outside the tolerance.
  assert np.abs(swapped - expected).max() > 0.1


# --- float32 logits for bfloat16 activations ---------------------------------------------------


class _Head(nn.Module):
  """An embedding and the logits head, bfloat16 activations."""
  tied: bool

  @nn.compact
  def __call__(self, y_BLD):
    embedder = Embed(V, y_BLD.shape[-1], dtype=jnp.bfloat16, name="embedder")
    embedder(jnp.zeros((1, 1), jnp.int32))  # creates the table in the untied case too
    return LogitsHead(V, self.tied, jnp.bfloat16, name="head")(y_BLD, embedder)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_are_projected_in_float32_for_bfloat16_activations(tied):
  d = 256  # long dot products: bfloat16 products and sums would lose ~3 significant digits
  y = jnp.asarray(np.random.default_rng(4).normal(0, 1, (2, 4, d)), jnp.bfloat16)
  head = _Head(tied)
  params = _random_params(jax.eval_shape(head.init, jax.random.key(0), y)["params"], seed=5)
  logits = head.apply({"params": params}, y)
  assert logits.dtype == jnp.float32
  y64 = np.asarray(y.astype(jnp.float32), np.float64)  # the exact bfloat16 activations
  if tied:
    w_DV = np.asarray(params["embedder"]["embedding"], np.float64).T / np.sqrt(d)
    w_bf16 = params["embedder"]["embedding"].astype(jnp.bfloat16).T
    rounded = jnp.einsum("BLD,DV->BLV", y, w_bf16) / jnp.asarray(np.sqrt(d), jnp.bfloat16)
  else:
    w_DV = np.asarray(params["head"]["logits_dense"]["kernel"], np.float64)
    rounded = jnp.einsum("BLD,DV->BLV", y, params["head"]["logits_dense"]["kernel"].astype(
        jnp.bfloat16))
  expected = y64 @ w_DV
  scale = np.abs(expected).max()
  # float32: error ~1e-7 relative; a bfloat16 projection errs by ~1e-3 relative, 100x more.
  err = np.abs(np.asarray(logits, np.float64) - expected).max() / scale
  err_bf16 = np.abs(np.asarray(rounded.astype(jnp.float32), np.float64) - expected).max() / scale
  assert err < 1e-5
  assert err_bf16 > 100 * 1e-5


# --- while tokens are dropped: causality, padding, packing -------------------------------------
#
# Capacity binds in these tests (C well below the tokens an expert is offered), and every test
# asserts through the sown `fraction_dropped` that tokens were dropped.

_DECODER_ROUTERS = {
    "switch": SwitchRouter(),
    "top2": TopKRouter(k=2),
    "top2_random": TopKRouter(k=2, second_expert_policy="random"),  # in training mode
}


def _dropping_net(kind, router, **moe_kwargs):
  """One-layer sparse decoder (after a one-layer dense encoder for "encoder_decoder"); E = 4
  experts and capacity factor 0.5 (C = 2 for top-1, 4 for top-2 in a group of 16 tokens)."""
  moe = _moe(router=router, capacity_factor=0.5).clone(**moe_kwargs)
  stack = dict(num_layers=1, num_heads=HEADS, head_dim=HEAD_DIM, mlp=_mlp())
  decoder = SparseDecoder(num_sparse_layers=1, moe=moe, **stack)
  if kind == "decoder_only":
    return SparseDecoderOnly(vocab_size=V, embed_dim=D, decoder=decoder)
  return SparseEncoderDecoder(vocab_size=V, embed_dim=D, decoder=decoder,
                              encoder=SparseEncoder(num_sparse_layers=0, **stack))


def _apply_variants(net, variants, seed=0):
  """Logits and fraction_dropped [MoE layers] of each variant (a leading axis over batches), in
  training mode with one fixed routing rng, compiled once."""
  params = _random_params(jax.eval_shape(
      net.init, jax.random.key(0), **jax.tree.map(lambda v: v[0], variants))["params"], seed)

  def apply(batch):
    logits, state = net.apply({"params": params}, **batch, enable_dropout=True,
                              rngs={"routing": jax.random.key(1)}, mutable=[MOE_STATS])
    stats = jax.tree.leaves(state[MOE_STATS], is_leaf=lambda x: hasattr(x, "fraction_dropped"))
    return logits, jnp.stack([s.fraction_dropped for s in stats])  # [MoE layers]

  logits, dropped = _jit(jax.vmap(apply))(variants)
  return np.asarray(logits), np.asarray(dropped)


def _causality_variants(kind):
  """A batch of 2 x 8 (row 0 packs segments of 5 and 3; row 1 has 6 tokens and 2 of padding)
  and copies with one decoder input token changed, at (row, position) `changes`."""
  rng = np.random.default_rng(6)
  targets = rng.integers(1, V, (2, 8))
  targets[1, 6:] = 0
  segments = np.array([[1] * 5 + [2] * 3, [1] * 6 + [0] * 2])
  inputs = np.where(np.arange(8) == 0, 0, np.roll(targets, 1, axis=1))
  inputs[0, 5] = 0  # segment 2 starts afresh
  batch = dict(decoder_input_tokens=inputs, decoder_target_tokens=targets,
               decoder_segment_ids=segments)
  if kind == "encoder_decoder":
    encoder_tokens = rng.integers(1, V, (2, 6))
    encoder_tokens[1, 4:] = 0
    batch.update(encoder_input_tokens=encoder_tokens,
                 encoder_segment_ids=np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]]))
  changes = [(0, 1), (0, 3), (0, 6), (1, 2), (1, 4)]
  variants = {k: np.stack([v] * (1 + len(changes))) for k, v in batch.items()}
  for i, (b, t) in enumerate(changes):
    variants["decoder_input_tokens"][i + 1, b, t] = variants["decoder_input_tokens"][0, b, t] % (
        V - 1) + 1
  return variants, changes


def _causality_violations(logits, changes):
  """Max logit change at positions before each change, in the batch's token order (earlier
  rows come first in the routing group, so they count as before)."""
  flat = logits.reshape(logits.shape[0], -1, V)
  length = logits.shape[2]
  out = []
  for i, (b, t) in enumerate(changes):
    n = b * length + t
    before = np.abs(flat[i + 1, :n] - flat[0, :n]).max() if n else 0.0
    out.append(float(before))
    # The changed position itself moves, so the change reaches the network.
    assert np.abs(flat[i + 1, n] - flat[0, n]).max() > 1e-3
  return out


@pytest.mark.parametrize("router", list(_DECODER_ROUTERS), ids=list(_DECODER_ROUTERS))
@pytest.mark.parametrize("kind", ["decoder_only", "encoder_decoder"])
def test_decoder_is_causal_while_tokens_are_dropped(kind, router):
  """With padding, packing and capacity binding, a change at position t never changes the
  logits before t (training mode: train capacity factor, random 2nd-expert policy)."""
  variants, changes = _causality_variants(kind)
  logits, dropped = _apply_variants(_dropping_net(kind, _DECODER_ROUTERS[router]), variants)
  assert np.all(dropped > 0.1), dropped
  assert max(_causality_violations(logits, changes)) < 1e-6


def test_causality_check_catches_choice_major_top2(monkeypatch):
  """Test of the test: with the decoder's router left non-causal (choice-major priority),
  the same inputs DO change earlier logits, through later first choices evicting earlier
  second choices."""
  monkeypatch.setattr(t5._SparseStack, "_moe_layer",  # pylint: disable=protected-access
                      lambda self: self.moe.copy(parent=None))
  variants, changes = _causality_variants("decoder_only")
  logits, _ = _apply_variants(_dropping_net("decoder_only", TopKRouter(k=2)), variants)
  assert max(_causality_violations(logits, changes)) > 1e-2


def test_padding_with_dropped_tokens_given_the_same_capacity():
  """Real positions do not depend on how much padding a row has, nor where it sits, when the
  capacity is the same: a fixed `expert_capacity` (with a capacity factor, C grows with the
  padded group size) and groups of the same real tokens (`sequence_groups`). Padding takes no
  slot even when it comes first in the (non-causal, top-2) encoder."""
  net = _dropping_net("encoder_decoder", TopKRouter(k=2), expert_capacity=1,
                      sequence_groups=True)
  net = net.clone(encoder=net.encoder.clone(num_sparse_layers=1, moe=net.decoder.moe))
  rng = np.random.default_rng(7)
  a, x, y = rng.integers(1, V, 5), rng.integers(1, V, 5), rng.integers(1, V, 5)
  pad = lambda t, front=0, back=3: np.pad(t, (front, back))
  padded = dict(  # row 0: padding after the encoder tokens; row 1: before
      encoder_input_tokens=np.stack([pad(a), pad(a, 3, 0)]),
      decoder_input_tokens=np.stack([pad(x), pad(x)]),
      decoder_target_tokens=np.stack([pad(y), pad(y)]))
  unpadded = dict(encoder_input_tokens=a[None], decoder_input_tokens=x[None],
                  decoder_target_tokens=y[None])
  logits, dropped = _apply_variants(net, jax.tree.map(lambda v: v[None], padded))
  logits_alone, dropped_alone = _apply_variants(net, jax.tree.map(lambda v: v[None], unpadded))
  assert np.all(dropped > 0.1) and np.all(dropped_alone > 0.1), (dropped, dropped_alone)
  np.testing.assert_allclose(logits[0, 0, :5], logits_alone[0, 0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 1, :5], logits_alone[0, 0], atol=1e-5)


def test_packing_with_dropped_tokens_given_the_same_capacity():
  """In a packed decoder row the FIRST segment's logits equal the segment's alone (same fixed
  capacity): causal routing lets no later token take an earlier token's slot. A later segment
  finds slots already taken by the earlier ones, so while capacity binds it differs from its
  unpacked self (routing groups are rows, not segments, as in Flaxformer)."""
  net = _dropping_net("decoder_only", TopKRouter(k=2), expert_capacity=1, sequence_groups=True)
  rng = np.random.default_rng(8)
  a, b = rng.integers(1, V, 5), rng.integers(1, V, 3)
  shift = lambda t: np.concatenate([[0], t[:-1]])
  pad = lambda t: np.pad(t, (0, 8 - len(t)))
  batch = dict(  # rows: [a | b] packed, a alone, b alone
      decoder_input_tokens=np.stack([np.concatenate([shift(a), shift(b)]), pad(shift(a)),
                                     pad(shift(b))]),
      decoder_target_tokens=np.stack([np.concatenate([a, b]), pad(a), pad(b)]),
      decoder_segment_ids=np.stack([[1] * 5 + [2] * 3, pad([1] * 5), pad([1] * 3)]))
  logits, dropped = _apply_variants(net, jax.tree.map(lambda v: v[None], batch))
  logits = logits[0]
  assert np.all(dropped > 0.1), dropped
  np.testing.assert_allclose(logits[0, :5], logits[1, :5], atol=1e-5)
  assert np.abs(logits[0, 5:] - logits[2, :3]).max() > 1e-2
