"""Decoding: the jitted fixed-buffer loop equals step-by-step decoding of the prefix alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decoding, gin_utils
from moe_jax.models import build_network


def _network(config, **bindings):
  gin_utils.parse_gin([f"models/{config}.gin"],
                      ["EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8", "VOCAB_SIZE=48"]
                      + [f"{k}={v}" for k, v in bindings.items()])
  network = build_network()
  return network, nn.unbox(network.init(jax.random.key(1), **network.example_batch())["params"])


def test_greedy_lm_decode_matches_stepwise_argmax():
  # Tight capacity: future positions would steal capacity if they were not masked out.
  network, params = _network("top2_tiny", **{"MoeLayer.eval_capacity_factor": 0.5,
                                             "MoeLayer.min_expert_capacity": 1})
  prompt = jnp.array([[5, 6, 7], [9, 3, 0]])
  out = np.asarray(decoding.decode(network, params, max_decode_length=7, prompt_BP=prompt))
  for row, length in ((0, 3), (1, 2)):
    tokens = [int(t) for t in prompt[row, :length]]
    while len(tokens) < 7:
      logits = network.apply({"params": params}, decoder_input_tokens=jnp.array([[0] + tokens]))
      tokens.append(int(jnp.argmax(logits[0, -1])))
    # Row 1 decodes in a batch with row 0 yet matches decoding alone: no cross-row leakage
    # through the groups' capacity, since undecoded positions are padding.
    np.testing.assert_array_equal(out[row], tokens)


def test_encoder_decoder_greedy_decode_stops_at_eos():
  network, params = _network("expert_choice_tiny")
  enc = jnp.array([[5, 6, 7, 1]])
  out = np.asarray(decoding.decode(network, params, max_decode_length=5,
                                   encoder_input_tokens=enc, eos_id=1))
  tokens = []
  encoded = network.apply({"params": params}, enc, method=network.encode)
  while len(tokens) < 5:
    logits = network.apply({"params": params}, encoded, enc, jnp.array([[0] + tokens]),
                           method=network.decode)
    tokens.append(int(jnp.argmax(logits[0, -1])))
    if tokens[-1] == 1:
      break
  np.testing.assert_array_equal(out[0, :len(tokens)], tokens)
  assert (out[0, len(tokens):] == 0).all()


def test_sampling_is_seeded_and_temperature_validated():
  network, params = _network("switch_tiny")
  prompt = jnp.array([[5, 6]])
  sample = lambda seed: np.asarray(decoding.decode(
      network, params, max_decode_length=12, prompt_BP=prompt, temperature=1.0,
      rng=jax.random.key(seed)))
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))
  with pytest.raises(ValueError, match="temperature"):
    decoding.decode(network, params, max_decode_length=4, prompt_BP=prompt, temperature=-1.0)
