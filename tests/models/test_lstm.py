"""LSTM + MoE LM (moe_jax.models.lstm), Shazeer et al. 2017.

References are float64 numpy written from the LSTM equations (Hochreiter & Schmidhuber 1997,
with forget gate) and the paper's appendix C.1 layer composition; networks get random numpy
parameters (no `init` run) and are compiled once per module.
"""

import functools
import importlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import cli, decoding
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MOE_STATS, MoeLayer
from moe_jax.layers.noisy_routing import NoisyTopKRouter
from moe_jax.layers.routing import ExpertChoiceRouter
from moe_jax.models.lstm import Lstm, LstmMoeLanguageModel
from moe_jax.models.summary import param_table, summarize
from moe_jax.train.partitioning import LOGICAL_AXIS_RULES

# Registers infer's configurables now: importing the module after cli.train has locked gin fails.
importlib.import_module("moe_jax.inference")

V, D, L, E = 24, 16, 8, 4
PROMPT = jnp.array([[5, 6, 7], [9, 3, 0], [4, 0, 0]])


def _moe(**kwargs):
  # One routing group per row (max_group_size = L) whose capacity binds: 1 slot per expert,
  # 2 choices per token.
  return MoeLayer(num_experts=E, router=NoisyTopKRouter(k=2), max_group_size=L,
                  expert=ExpertMlp(intermediate_dim=16, activations=("relu",)),
                  eval_capacity_factor=0.25, min_expert_capacity=1, **kwargs)


def _net(**kwargs):
  return LstmMoeLanguageModel(**{"vocab_size": V, "embed_dim": D, "moe": _moe(), **kwargs})


def _random_params(network, seed=0, scale=0.5):
  shapes = nn.unbox(jax.eval_shape(network.init, jax.random.key(0), **network.example_batch()))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.normal(size=x.shape) * scale).astype(np.float32),
                      shapes["params"])


@pytest.fixture(scope="module")
def lm():
  network = _net()
  # One compilation per input signature: logits and the sown router stats.
  return network, _random_params(network), jax.jit(functools.partial(network.apply,
                                                                     mutable=(MOE_STATS,)))


# --- float64 references ------------------------------------------------------------------------


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _ref_lstm(cell, x_BLD, starts_BL):
  """The LSTM equations, one step at a time; the carry restarts from 0 at segment starts."""
  w = lambda name, part="kernel": np.asarray(cell[name][part], np.float64)
  units = w("hi").shape[0]
  c, h = np.zeros((x_BLD.shape[0], units)), np.zeros((x_BLD.shape[0], units))
  out = []
  for t in range(x_BLD.shape[1]):
    restart = starts_BL[:, t, None]
    c, h = np.where(restart, 0.0, c), np.where(restart, 0.0, h)
    z = {g: x_BLD[:, t] @ w(f"i{g}") + h @ w(f"h{g}") + w(f"h{g}", "bias") for g in "ifgo"}
    c = _sigmoid(z["f"]) * c + _sigmoid(z["i"]) * np.tanh(z["g"])
    h = _sigmoid(z["o"]) * np.tanh(c)
    out.append(h)
  return np.stack(out, axis=1)


def _ref_stacked_lstm_lm(params, tokens_BL, starts_BL, moe_output):
  """embedding -> x + LSTM_0(x) -> x + moe_output -> x + LSTM_1(x) -> softmax logits."""
  x = np.asarray(params["token_embedder"]["embedding"], np.float64)[np.asarray(tokens_BL)]
  x = x + _ref_lstm(params["lstm_0"]["cell"], x, starts_BL)
  x = x + moe_output
  x = x + _ref_lstm(params["lstm_1"]["cell"], x, starts_BL)
  return x @ np.asarray(params["logits_head"]["logits_dense"]["kernel"], np.float64)


# --- the LSTM layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_layer_matches_the_equations_and_restarts_at_segment_starts(reverse):
  layer = Lstm(features=6, reverse=reverse)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 4)).astype(np.float32)
  segments = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
  starts = np.concatenate([np.ones((2, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x))
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes["params"])
  y = np.asarray(layer.apply({"params": params}, x, jnp.asarray(segments)))
  if reverse:  # the backward LSTM reads each segment from its end
    x, starts = x[:, ::-1], np.concatenate(
        [np.ones((2, 1), bool), segments[:, ::-1][:, 1:] != segments[:, ::-1][:, :-1]], axis=1)
    y = y[:, ::-1]
  np.testing.assert_allclose(y, _ref_lstm(params["cell"], x.astype(np.float64), starts),
                             atol=1e-5)
  # Not vacuous: without the restart, the segment read second would come out otherwise.
  unsegmented = _ref_lstm(params["cell"], x.astype(np.float64), np.zeros_like(starts))
  assert np.abs(y[0, 3:] - unsegmented[0, 3:]).max() > 1e-3


# --- the model -----------------------------------------------------------------------------------


def test_with_the_moe_output_zeroed_the_model_is_a_stacked_lstm_lm(lm):
  network, params, apply = lm
  tokens = jnp.asarray(np.random.default_rng(2).integers(2, V, (2, L)))
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2], [1] * L])  # row 0 packs two sequences
  starts = np.asarray(segments[:, 1:] != segments[:, :-1])
  starts = np.concatenate([np.ones((2, 1), bool), starts], axis=1)
  # wo = 0: every expert outputs exactly 0, so the MoE layer adds sigmoid(0) = 1/2 everywhere.
  zeroed = jax.tree.map(lambda v: v, params)
  wo = zeroed["moe_0"]["expert"]["wo"]
  wo["kernel"] = np.zeros_like(wo["kernel"])
  logits = apply({"params": zeroed}, tokens, decoder_segment_ids=segments)[0]
  np.testing.assert_allclose(logits, _ref_stacked_lstm_lm(zeroed, tokens, starts, 0.5),
                             atol=1e-4, rtol=1e-5)
  # The MoE layer is live with the real wo (not a vacuous comparison).
  assert np.abs(apply({"params": params}, tokens, decoder_segment_ids=segments)[0]
                - logits).max() > 1e-2
  # The plain stacked LSTM LM (moe=None; the same parameters minus the MoE layer's).
  plain = _net(moe=None)
  plain_logits = jax.jit(plain.apply)({"params": {k: v for k, v in zeroed.items()
                                                  if k != "moe_0"}},
                                      tokens, decoder_segment_ids=segments)
  np.testing.assert_allclose(plain_logits, _ref_stacked_lstm_lm(zeroed, tokens, starts, 0.0),
                             atol=1e-4, rtol=1e-5)


def test_later_tokens_never_change_earlier_logits(lm):
  network, params, apply = lm
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(2, V, (3, L)))
  one_segment = jnp.ones(tokens.shape, jnp.int32)  # the other test's signature: one compilation
  full, stats = apply({"params": params}, tokens, decoder_segment_ids=one_segment)
  assert float(stats[MOE_STATS]["moe_0"]["router_stats"][0].fraction_dropped) > 0  # binds
  bidi = _net(bidirectional=True)
  bidi_apply = functools.partial(jax.jit(bidi.apply), {"params": _random_params(bidi)})
  bidi_full = bidi_apply(tokens)
  for t in (3, 6):
    changed = tokens.at[:, t:].set(jnp.asarray(rng.integers(2, V, (3, L - t))))
    logits, _ = apply({"params": params}, changed, decoder_segment_ids=one_segment)
    np.testing.assert_array_equal(logits[:, :t], full[:, :t])
    assert np.abs(logits[:, t:] - full[:, t:]).max() > 1e-3
    # The bidirectional model reads the future (the property is not vacuous).
    assert np.abs(bidi_apply(changed)[:, :t] - bidi_full[:, :t]).max() > 1e-3


def test_cached_decode_equals_full_recompute(lm):
  network, params, _ = lm
  decode = lambda cache, temperature: decoding.decode_jit(
      network, params, prompt_BP=PROMPT, max_decode_length=10, temperature=temperature,
      rng=jax.random.key(7), cache=cache, return_logits=True)
  for temperature in (0.0, 1.0):
    (cached, cached_logits), (full, full_logits) = decode(True, temperature), decode(False,
                                                                                   temperature)
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_allclose(cached_logits, full_logits, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(cached[:, :3] * (PROMPT > 0), PROMPT)


def test_bidirectional_refuses_decoding(lm):
  _, params, _ = lm
  bidi = _net(bidirectional=True)
  with pytest.raises(ValueError, match=r"LstmMoeLanguageModel.bidirectional=True .* cannot "
                                       r"decode"):
    decoding.decode(bidi, params, prompt_BP=PROMPT, max_decode_length=6)
  with pytest.raises(ValueError, match="bidirectional=True"):
    bidi.apply({"params": params}, PROMPT, decode=True, max_decode_length=3, mutable=["cache"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_layers=0), "LstmMoeLanguageModel.num_layers must be >= 1"),
    (dict(embed_dim=15, bidirectional=True), "LstmMoeLanguageModel.embed_dim must be positive"),
    (dict(dropout_rate=1.0), r"LstmMoeLanguageModel.dropout_rate must be in \[0, 1\)"),
    (dict(moe=MoeLayer(num_experts=E, router=ExpertChoiceRouter())),
     "LstmMoeLanguageModel.moe.router: ExpertChoiceRouter .* cannot route a causal decoder"),
])
def test_bad_fields_fail_at_construction_naming_them(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _net(**kwargs)


def test_config_summary_and_sharding_rules():
  """configs/models/lstm_moe_lm.gin: model_info works, active parameters count k = 4 of the
  16 experts, every parameter axis has a sharding rule."""
  info = cli.model_info(["--gin_file=models/lstm_moe_lm.gin", "--json"])
  (layer,) = info["moe_layers"]
  assert (layer["layer"], layer["router"], layer["num_experts"], layer["experts_per_token"]) == (
      "moe_0", "NoisyTopKRouter", 16, 4.0)
  expert_params = 16 * 2 * 128 * 256
  assert layer["expert_params"] == expert_params
  assert info["active_params_per_token"] == info["num_params"] - expert_params * 12 // 16
  from moe_jax.models import build_network  # the network model_info parsed
  known = {name for name, _ in LOGICAL_AXIS_RULES}
  for path, entry in param_table(build_network()).items():
    assert entry["axes"] is not None and set(entry["axes"]) <= known, (path, entry)
  assert summarize(build_network())["num_params"] == info["num_params"]


def test_train_then_sample_from_the_checkpoint(tmp_path, tfds_dir):
  """20 steps of the tiny LSTM-MoE LM on tiny Shakespeare (packed: carries restart per
  example) lower the loss; scripts/infer.py's function then samples text from the checkpoint."""
  del tfds_dir  # sets $MOE_JAX_TFDS_DIR
  run = tmp_path / "run"
  metrics = cli.train([
      "--gin_file=models/lstm_moe_lm.gin", "--gin_file=runs/pretrain.gin",
      f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=20", "--gin.BATCH_SIZE=8",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.MESH_SHAPE=(1, 1, 1)",
      "--gin.EMBED_DIM=32", "--gin.NUM_EXPERTS=8", "--gin.MLP_DIM=64", "--gin.DROPOUT_RATE=0.0",
      "--gin.LOG_EVERY=1", "--gin.EVAL_PERIOD=0", "--gin.CHECKPOINT_PERIOD=20",
      "--gin.rsqrt_schedule.warmup_steps=100"])
  assert metrics
  with open(run / "metrics.jsonl") as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert len(losses) == 20 and np.log(384) - 0.5 < losses[0] < np.log(384) + 0.5, losses
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses

  output = cli.infer([
      "--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_PATH='{run}'",
      "--gin.MIXTURE_OR_TASK_NAME='tiny_shakespeare_lm'",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.NUM_EXAMPLES=2",
      "--gin.BATCH_SIZE=2", "--gin.TEMPERATURE=0.8", "--gin.infer.mesh_shape=(1, 1, 1)"])
  assert os.path.dirname(output) == str(run / "inference")
  with open(output) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 2 and any(r["prediction"] for r in records), records
