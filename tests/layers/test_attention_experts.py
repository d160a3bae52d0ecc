"""Attention experts (moe_jax.layers.attention_experts): SwitchHead and MoA.

References are float64 numpy written from the papers' formulas (Csordas et al. 2023, sec. 3;
Zhang et al. 2022, sec. 3): top-k by sorting, sigmoid / softmax by hand, every projection an
explicit einsum.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers.attention import MultiHeadDotProductAttention, attention_mask, mask_to_bias
from moe_jax.layers.attention_experts import (MoaAttention, SigmoidSelection,
                                              SwitchHeadAttention)
from moe_jax.layers.moe import MOE_STATS

B, L, D, N, H, E, K = 2, 7, 16, 2, 8, 4, 2


def _normal(seed, shape, scale=0.5):
  return np.random.RandomState(seed).normal(0, scale, shape).astype(np.float32)


def _x(seed=0):
  return _normal(seed, (B, L, D), 1.0)


def _bias(heads, valid_BL=None, seed=9):
  """Causal mask (+ padding) and a random per-head bias standing in for relative positions."""
  valid_BL = np.ones((B, L), bool) if valid_BL is None else valid_BL
  mask = mask_to_bias(attention_mask(jnp.asarray(valid_BL), jnp.asarray(valid_BL), causal=True))
  return np.asarray(mask) + _normal(seed, (1, heads, L, L))


PADDED = np.ones((B, L), bool)
PADDED[1, -2:] = False


def _switchhead_params(num_experts=E, seed=1):
  return {"query": {"kernel": _normal(seed, (D, N, H))},
          "key": {"kernel": _normal(seed + 1, (D, N, H))},
          "value": _normal(seed + 2, (N, num_experts, D, H)),
          "out": _normal(seed + 3, (N, num_experts, H, D)),
          "value_selection": {"kernel": _normal(seed + 4, (D, N, num_experts), 1.0)},
          "out_selection": {"kernel": _normal(seed + 5, (D, N, num_experts), 1.0)}}


def _moa_params(num_experts=E, seed=1):
  return {"router": {"w": {"kernel": _normal(seed, (D, num_experts), 1.0)}},
          "query": _normal(seed + 1, (num_experts, D, H)),
          "key": {"kernel": _normal(seed + 2, (D, H))},
          "value": {"kernel": _normal(seed + 3, (D, H))},
          "out": _normal(seed + 4, (num_experts, H, D))}


def _apply(module, params, x, bias, **kw):
  # Eager: a handful of small ops, cheaper than compiling each module variant.
  y, state = module.apply({"params": params}, x, x, bias, mutable=[MOE_STATS], **kw)
  return np.asarray(y, np.float64), state[MOE_STATS]["router_stats"][0]


# --- float64 references ---------------------------------------------------------------------


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _keep_top_k(scores, k):
  """Scores at each row's k largest entries, 0 elsewhere."""
  mask = np.zeros(scores.shape, bool)
  np.put_along_axis(mask, np.argsort(-scores, axis=-1)[..., :k], True, axis=-1)
  return np.where(mask, scores, 0.0)


def _ref_switchhead(x, p, bias, k):
  x, f = x.astype(np.float64), lambda a: np.asarray(a, np.float64)
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  select = lambda name: _keep_top_k(
      sigmoid(np.einsum("bld,dne->blne", x, f(p[name]["kernel"]))), k)
  gate_src, gate_dst = select("value_selection"), select("out_selection")
  q = np.einsum("bld,dnh->blnh", x, f(p["query"]["kernel"]))
  kk = np.einsum("bld,dnh->blnh", x, f(p["key"]["kernel"]))
  v = np.einsum("blne,bld,nedh->blnh", gate_src, x, f(p["value"]))
  a = _softmax(np.einsum("blnh,bmnh->bnlm", q, kk) + bias)
  o = np.einsum("bnlm,bmnh->blnh", a, v)
  return np.einsum("blne,blnh,nehd->bld", gate_dst, o, f(p["out"])), gate_src, gate_dst


def _ref_moa(x, p, bias, k, renormalize, valid_BL):
  x, f = x.astype(np.float64), lambda a: np.asarray(a, np.float64)
  logits = np.einsum("bld,de->ble", x, f(p["router"]["w"]["kernel"]))
  probs = _softmax(logits)
  gates = _keep_top_k(probs, k)
  if renormalize:
    gates = gates / gates.sum(-1, keepdims=True)
  kk = x @ f(p["key"]["kernel"])
  v = x @ f(p["value"]["kernel"])
  y = np.zeros_like(x)
  for e in range(probs.shape[-1]):  # every expert densely, weighted by its (maybe 0) gate
    q = np.einsum("bld,dh->blh", x, f(p["query"][e]))
    a = _softmax(np.einsum("blh,bmh->blm", q, kk) + bias[:, e if bias.shape[1] > 1 else 0])
    y += gates[..., e:e + 1] * (np.einsum("blm,bmh->blh", a, v) @ f(p["out"][e]))
  # Load balance (sec. 3.3): f_e = share of the k * T choices, P_e = mean probability.
  real = valid_BL.reshape(-1)
  chosen = (gates > 0).reshape(-1, probs.shape[-1])[real]
  frac = chosen.sum(0) / chosen.sum()
  mean_prob = probs.reshape(-1, probs.shape[-1])[real].mean(0)
  lse = np.log(np.exp(logits).sum(-1)).reshape(-1)[real]
  return y, probs.shape[-1] * np.sum(frac * mean_prob), np.mean(lse**2), frac


# --- SwitchHead -------------------------------------------------------------------------------


def test_switchhead_gates_are_the_top_k_sigmoid_scores_unnormalised():
  params, x = _switchhead_params(), _x()
  gates, _, _ = SigmoidSelection(N, E, K).apply({"params": params["value_selection"]}, x)
  _, ref_src, _ = _ref_switchhead(x, params, _bias(N), K)
  np.testing.assert_allclose(gates, ref_src, rtol=1e-5, atol=1e-6)
  assert np.all((np.asarray(gates) > 0).sum(-1) == K)
  assert not np.allclose(np.asarray(gates).sum(-1), 1.0)  # not renormalised


def test_switchhead_matches_the_paper_and_sows_its_stats():
  module = SwitchHeadAttention(num_heads=N, head_dim=H, num_experts=E, k=K)
  params, x, bias = _switchhead_params(), _x(), _bias(N, PADDED)
  y, stats = _apply(module, params, x, bias)
  ref, gate_src, gate_dst = _ref_switchhead(x, params, bias, K)
  # Padding queries attend to nothing: their (unused) outputs are float32 round-off.
  np.testing.assert_allclose(y[PADDED], ref[PADDED], rtol=1e-4, atol=1e-4)
  assert float(stats.load_balancing_loss) == 0.0 and float(stats.z_loss) == 0.0
  assert float(stats.fraction_dropped) == 0.0
  # Each side's share of the k choices per (real token, head), the two sides averaged.
  load = lambda g: (g[PADDED] > 0).sum((0, 1)) / (PADDED.sum() * N * K)
  np.testing.assert_allclose(stats.expert_load_E, (load(gate_src) + load(gate_dst)) / 2,
                             rtol=1e-6)
  top1 = lambda g: g[PADDED].max(-1).mean()
  np.testing.assert_allclose(stats.router_confidence, (top1(gate_src) + top1(gate_dst)) / 2,
                             rtol=1e-5)


def test_switchhead_one_expert_with_zero_selection_is_a_quarter_of_attention():
  """E = k = 1 and zero selection weights: every gate is sigmoid(0) = 1/2 on both the value
  and the output side, and attention is linear in each: SwitchHead = MHA / 4 exactly."""
  params = _switchhead_params(num_experts=1)
  params["value_selection"] = params["out_selection"] = {"kernel": np.zeros((D, N, 1))}
  x, bias = _x(), _bias(N)
  y, _ = _apply(SwitchHeadAttention(num_heads=N, head_dim=H, num_experts=1, k=1), params, x,
                bias)
  mha = {"query": params["query"], "key": params["key"],
         "value": {"kernel": params["value"][:, 0].transpose(1, 0, 2)},
         "out": {"kernel": params["out"][:, 0]}}
  ref = MultiHeadDotProductAttention(N, H).apply({"params": mha}, x, x, bias)
  np.testing.assert_allclose(y, np.asarray(ref) / 4, rtol=1e-5, atol=1e-6)


# --- MoA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
def test_moa_matches_the_paper_with_its_load_and_z_losses(renormalize):
  module = MoaAttention(head_dim=H, num_experts=E, k=K, renormalize=renormalize)
  params, x, bias = _moa_params(), _x(), _bias(E, PADDED)
  y, stats = _apply(module, params, x, bias)
  ref, balance, z_loss, frac = _ref_moa(x, params, bias, K, renormalize, PADDED)
  np.testing.assert_allclose(y[PADDED], ref[PADDED], rtol=1e-4, atol=1e-4)
  assert abs(balance - 1.0) > 1e-3  # not balanced: the loss is not the trivial value
  np.testing.assert_allclose(stats.load_balancing_loss, balance, rtol=1e-5)
  np.testing.assert_allclose(stats.z_loss, z_loss, rtol=1e-5)
  np.testing.assert_allclose(stats.expert_load_E, frac, rtol=1e-6)


def test_moa_one_expert_equals_multi_head_attention():
  """E = k = 1: the gate is 1 and MoA is one-head attention with the expert's q / o weights."""
  params, x, bias = _moa_params(num_experts=1), _x(), _bias(1)
  y, stats = _apply(MoaAttention(head_dim=H, num_experts=1, k=1), params, x, bias)
  mha = {"query": {"kernel": params["query"][0][:, None]},
         "key": {"kernel": params["key"]["kernel"][:, None]},
         "value": {"kernel": params["value"]["kernel"][:, None]},
         "out": {"kernel": params["out"]}}
  ref = MultiHeadDotProductAttention(1, H).apply({"params": mha}, x, x, bias)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.load_balancing_loss, 1.0, rtol=1e-6)  # E * f * P = 1


# --- both: causality, decoding, dtype, errors ----------------------------------------------------

MODULES = {
    "switchhead": (SwitchHeadAttention(num_heads=N, head_dim=H, num_experts=E, k=K),
                   _switchhead_params, N),
    "moa": (MoaAttention(head_dim=H, num_experts=E, k=K), _moa_params, E),
}


@pytest.mark.parametrize("name", MODULES)
def test_later_tokens_never_change_earlier_outputs(name):
  module, make_params, heads = MODULES[name]
  params, x, bias = make_params(), _x(), _bias(heads)
  full, _ = _apply(module, params, x, bias)
  for t in (2, 5):
    changed = x.copy()
    changed[:, t:] = _x(seed=3)[:, t:]
    y, _ = _apply(module, params, changed, bias)
    np.testing.assert_allclose(y[:, :t], full[:, :t], rtol=0, atol=1e-6)
    assert np.abs(y[:, t:] - full[:, t:]).max() > 1e-3


@pytest.mark.parametrize("name", MODULES)
def test_cached_decode_equals_full_recompute(name):
  module, make_params, heads = MODULES[name]
  params, x, bias = make_params(), _x(), _bias(heads)
  full, _ = _apply(module, params, x, bias)
  _, state = module.apply({"params": params}, x, x, bias, decode=True, mutable=["cache"])
  cache = jax.tree.map(jnp.zeros_like, state["cache"])

  @jax.jit
  def step(cache, x_B1D, bias_1N1M, i):
    y, state = module.apply({"params": params, "cache": cache}, x_B1D, x_B1D, bias_1N1M,
                            decode=True, decode_position=i, mutable=["cache"])
    return y, state["cache"]

  for i in range(L):
    # The row of the full causal bias: keys written so far, their relative bias.
    y, cache = step(cache, x[:, i:i + 1], bias[:1, :, i:i + 1], i)
    np.testing.assert_allclose(y[:, 0], full[:, i], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", MODULES)
def test_routing_is_float32_in_a_bfloat16_model(name):
  module, make_params, heads = MODULES[name]
  params, x, bias = make_params(), _x(), _bias(heads)
  y32, stats32 = _apply(module, params, x, bias)
  y16, stats16 = _apply(module.copy(dtype=jnp.bfloat16), params, x, bias)
  for a, b in zip(jax.tree.leaves(stats32), jax.tree.leaves(stats16)):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # same routing, same stats
  np.testing.assert_allclose(y16, y32, atol=0.1 * np.abs(y32).max())


def test_bad_fields_raise_naming_them():
  with pytest.raises(ValueError, match="SwitchHeadAttention.k=6 exceeds SwitchHeadAttention."
                                       "num_experts=5"):
    SwitchHeadAttention(k=6)
  with pytest.raises(ValueError, match="MoaAttention.num_experts must be >= 1"):
    MoaAttention(num_experts=0)
  with pytest.raises(ValueError, match="SwitchHeadAttention.num_heads must be >= 1"):
    SwitchHeadAttention(num_heads=0)
  x = _x()
  with pytest.raises(ValueError, match="SwitchHeadAttention.num_heads=2 differs"):
    SwitchHeadAttention(num_heads=N, head_dim=H).init(jax.random.key(0), x, x, _bias(3))
  with pytest.raises(ValueError, match="MoaAttention.num_experts=4: the stack's attention bias"):
    MoaAttention(head_dim=H, num_experts=E).init(jax.random.key(0), x, x, _bias(3))


def test_summary_counts_k_of_e_attention_experts_as_active():
  from moe_jax import gin_utils
  from moe_jax.models import build_network
  from moe_jax.models.summary import param_table, summarize
  gin_utils.parse_gin(["models/switchhead_tiny.gin"])
  network = build_network()
  sizes = {p: int(np.prod(e["shape"])) for p, e in param_table(network).items()}
  ffn_experts = sum(n for p, n in sizes.items() if "/mlp/expert/" in p)
  attention_experts = sum(n for p, n in sizes.items()
                          if p.endswith("self_attention/value") or p.endswith("self_attention/out"))
  assert attention_experts == 4 * 2 * (2 * 4 * 64 * 32)  # layers x (value, out) x [N, E, D, H]
  info = summarize(network)
  expected = sum(sizes.values()) - ffn_experts * 7 // 8 - attention_experts * 2 // 4
  assert info["active_params_per_token"] == expected
  assert [m["attention"] for m in info["attention_expert_layers"]] == ["SwitchHeadAttention"] * 4
