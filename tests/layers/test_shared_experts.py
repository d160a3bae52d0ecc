"""Shared experts (DeepSeekMoE, Dai et al. 2024): MoeLayer.num_shared_experts.

The shared experts are one dense FFN of hidden K_s * F added to the routed output. Expected
values: the FFN by hand in float64 numpy, parameter counts by hand.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moe_jax import decoding, gin_utils
from moe_jax.layers import moe, routing
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.experts import ExpertMlp
from moe_jax.models import build_network
from moe_jax.models.decoder_only import SparseDecoderOnly
from moe_jax.models.summary import summarize
from moe_jax.models.t5 import SparseDecoder

E, D, F, K_S, B, L = 4, 8, 16, 2, 2, 16
GATED = ("gelu", "linear")


def _layer(num_shared_experts=K_S, **kwargs):
  # eval_capacity_factor 0.01 -> C = 1 per expert per group: most tokens are dropped.
  return moe.MoeLayer(num_experts=E, router=routing.TopKRouter(k=2),
                      expert=ExpertMlp(intermediate_dim=F, activations=GATED), max_group_size=L,
                      min_expert_capacity=0, eval_capacity_factor=0.01,
                      num_shared_experts=num_shared_experts, **kwargs)


def _x():
  return jnp.asarray(np.random.RandomState(0).normal(0, 1, (B, L, D)), jnp.float32)


def _boxed_params(layer):
  """init's parameters, shapes and logical axes only (jax.eval_shape: nothing is computed)."""
  return jax.eval_shape(layer.init, jax.random.key(0), _x())["params"]


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/",
                                    is_leaf=lambda _, x: isinstance(x, nn.Partitioned))


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _shared_ffn(params, x_BLD):
  """The shared experts by hand (float64): gelu(x W_0) * (x W_1) @ W_o."""
  p = {k: np.asarray(v["kernel"], np.float64) for k, v in params["shared_expert"].items()}
  x = np.asarray(x_BLD, np.float64)
  return (_gelu(x @ p["wi_0"]) * (x @ p["wi_1"])) @ p["wo"]


@pytest.fixture(scope="module")
def shared_and_routed():
  """One run of the layer with shared experts and one of the same layer without them."""
  shapes = nn.unbox(_boxed_params(_layer()))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)
  routed_params = {k: v for k, v in params.items() if k != "shared_expert"}

  def run(layer, p, x):
    y, state = layer.apply({"params": p}, x, None, True, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: isinstance(m, routing.Router))
    return y, state["intermediates"]["router"]["__call__"][0]

  x = _x()
  y_shared, routes = jax.jit(lambda p, x: run(_layer(), p, x))(params, x)
  y_routed, _ = jax.jit(lambda p, x: run(_layer(0), p, x))(routed_params, x)
  return params, x, np.asarray(y_shared), np.asarray(y_routed), routes


def test_output_is_the_routed_output_plus_the_shared_dense_ffn(shared_and_routed):
  params, x, y_shared, y_routed, _ = shared_and_routed
  shared = _shared_ffn(params, x)
  np.testing.assert_allclose(y_shared, y_routed + shared, rtol=1e-5, atol=1e-5)
  assert np.abs(y_routed).max() > 0.1 and np.abs(shared).max() > 0.1  # both terms matter


def test_token_dropped_by_every_routed_expert_gets_exactly_the_shared_ffn(shared_and_routed):
  params, x, y_shared, y_routed, routes = shared_and_routed
  tokens, valid = np.asarray(routes.token_index_GEC), np.asarray(routes.valid_GEC)
  kept = np.zeros((B, L), bool)  # groups are the rows (max_group_size = L)
  for g in range(B):
    kept[g, tokens[g][valid[g]]] = True
  dropped = ~kept
  # C = 1 slot in each of E experts for 2L choices per group: at least L - E tokens dropped.
  assert dropped.sum(-1).min() >= L - E
  assert np.all(y_routed[dropped] == 0.0)
  np.testing.assert_allclose(y_shared[dropped], _shared_ffn(params, x)[dropped], rtol=1e-5,
                             atol=1e-6)


def test_shared_expert_params_are_a_dense_mlp_of_hidden_ks_times_f():
  flat = _flat(_boxed_params(_layer()))
  shared = {p: (tuple(v.value.shape), tuple(v.names)) for p, v in flat.items()
            if p.startswith("shared_expert/")}
  assert shared == {"shared_expert/wi_0/kernel": ((D, K_S * F), ("embed", "mlp")),
                    "shared_expert/wi_1/kernel": ((D, K_S * F), ("embed", "mlp")),
                    "shared_expert/wo/kernel": ((K_S * F, D), ("mlp", "embed"))}
  # The same names and axes as the dense MLP's, so they shard like it.
  dense = _flat(jax.eval_shape(MlpBlock(K_S * F, GATED).init, jax.random.key(0), _x())["params"])
  assert {f"shared_expert/{p}": (tuple(v.value.shape), tuple(v.names))
          for p, v in dense.items()} == shared


def test_no_shared_experts_leaves_the_param_tree_unchanged():
  flat = _flat(_boxed_params(_layer(0)))
  assert sorted(flat) == ["expert/wi_0/kernel", "expert/wi_1/kernel", "expert/wo/kernel",
                          "router/router_weights/w/kernel"]
  assert moe.MoeLayer().num_shared_experts == 0


def test_active_parameters_count_the_shared_experts():
  """D=16, F=8, relu experts, E=4, k=2, K_s=2: shared = 16*16 + 16*16 = 512 weights, all
  active; routed = 4 * (16*8 + 8*16) = 1024, of which (E - k) / E = 512 are inactive."""
  def network(num_shared):
    layer = moe.MoeLayer(num_experts=4, router=routing.TopKRouter(k=2),
                         expert=ExpertMlp(intermediate_dim=8, activations=("relu",)),
                         num_shared_experts=num_shared)
    return SparseDecoderOnly(vocab_size=32, embed_dim=16, decoder=SparseDecoder(
        num_layers=2, num_sparse_layers=1, num_heads=2, head_dim=8,
        mlp=MlpBlock(intermediate_dim=32), moe=layer))

  with_shared, without = summarize(network(2)), summarize(network(0))
  assert with_shared["num_params"] - without["num_params"] == 512
  assert with_shared["active_params_per_token"] - without["active_params_per_token"] == 512
  assert with_shared["num_params"] - with_shared["active_params_per_token"] == 512
  (layer,) = with_shared["moe_layers"]
  assert (layer["num_shared_experts"], layer["shared_expert_params"]) == (2, 512)


class _NoSizes(nn.Module):
  """An expert module without the fields the shared FFN copies."""

  def __call__(self, x_EGCD, deterministic=True):
    return x_EGCD


@pytest.mark.parametrize("kwargs, match", [
    ({"num_shared_experts": -1}, r"MoeLayer\.num_shared_experts must be >= 0"),
    ({"num_shared_experts": 1, "expert": _NoSizes()}, r"MoeLayer\.expert=_NoSizes"),
])
def test_invalid_shared_experts_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    moe.MoeLayer(**kwargs)


def test_cached_decode_with_shared_experts_and_threshold_policy_equals_full_recompute():
  """Decoding steps: shared experts are per-token FFNs and the threshold policy is causal, so
  the cached decode equals the full recompute (capacity binds: C = 1)."""
  gin_utils.parse_gin(["models/top2_tiny.gin"], [
      "EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8", "NUM_DECODER_LAYERS=1",
      "NUM_DECODER_SPARSE_LAYERS=1", "VOCAB_SIZE=48", "MoeLayer.eval_capacity_factor=0.5",
      "MoeLayer.min_expert_capacity=1", "MoeLayer.num_shared_experts=1",
      "TopKRouter.second_expert_policy='threshold'", "TopKRouter.second_expert_threshold=0.3"])
  network = build_network()
  shapes = nn.unbox(jax.eval_shape(network.init, jax.random.key(0), **network.example_batch()))
  assert "shared_expert" in shapes["params"]["decoder"]["layers_0"]["mlp"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.5).astype(np.float32),
                        shapes["params"])
  prompt = jnp.array([[5, 6, 7], [9, 3, 0], [4, 0, 0]])
  (cached, cached_logits), (full, full_logits) = (
      decoding.decode_jit(network, params, prompt_BP=prompt, max_decode_length=10, cache=c,
                          return_logits=True) for c in (True, False))
  np.testing.assert_array_equal(cached, full)
  np.testing.assert_allclose(cached_logits, full_logits, rtol=0, atol=1e-5)
