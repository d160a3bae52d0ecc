"""Autoregressive decoding: greedy (temperature 0) and temperature sampling, jitted.

Each step runs the decoder over the whole fixed-length buffer (no KV cache yet: O(T^2)
attention per step, fine for the short sequences here). Positions after the current one are
marked as padding, so they neither attend nor take MoE capacity, and the result equals
step-by-step decoding of the prefix alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pick(logits_BV, temperature: float, rng):
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1)
  return jax.random.categorical(rng, logits_BV / temperature, axis=-1)


def decode(network: nn.Module, params, *, max_decode_length: int, prompt_BP=None,
           encoder_input_tokens=None, temperature: float = 0.0, rng=None, eos_id: int = 1):
  """Generated tokens [B, max_decode_length] (0 after EOS).

  Decoder-only: continues `prompt_BP` (0-padded on the right; may be empty) and returns the
  prompt followed by the continuation. Encoder-decoder: decodes from `encoder_input_tokens`.
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  rng = jax.random.key(0) if rng is None else rng
  encdec = encoder_input_tokens is not None
  batch = encoder_input_tokens.shape[0] if encdec else prompt_BP.shape[0]
  length = max_decode_length
  tokens_BT = jnp.zeros((batch, length), jnp.int32)
  if prompt_BP is not None:
    tokens_BT = tokens_BT.at[:, :prompt_BP.shape[1]].set(prompt_BP[:, :length])
  prompt_len_B = (jnp.zeros((batch,), jnp.int32) if prompt_BP is None
                  else jnp.sum(prompt_BP > 0, axis=1).astype(jnp.int32))
  variables = {"params": params}
  encoded = (network.apply(variables, encoder_input_tokens, method=network.encode)
             if encdec else None)
  positions = jnp.arange(length)

  def logits_at(tokens_BT, i):
    inputs_BT = jnp.pad(tokens_BT[:, :-1], ((0, 0), (1, 0)))  # shift right behind BOS 0
    live_BT = jnp.broadcast_to((positions <= i)[None], tokens_BT.shape).astype(jnp.int32)
    if encdec:
      logits = network.apply(variables, encoded, encoder_input_tokens, inputs_BT,
                             decoder_target_tokens=live_BT, method=network.decode)
    else:
      logits = network.apply(variables, decoder_input_tokens=inputs_BT,
                             decoder_target_tokens=live_BT)
    return logits[:, i]

  def step(i, carry):
    tokens_BT, done_B, rng = carry
    rng, sample_rng = jax.random.split(rng)
    new_B = _pick(logits_at(tokens_BT, i), temperature, sample_rng).astype(jnp.int32)
    keep_prompt = i < prompt_len_B
    new_B = jnp.where(keep_prompt, tokens_BT[:, i], jnp.where(done_B, 0, new_B))
    done_B = done_B | (~keep_prompt & (new_B == eos_id))
    return tokens_BT.at[:, i].set(new_B), done_B, rng

  tokens_BT, _, _ = jax.lax.fori_loop(0, length, step,
                                      (tokens_BT, jnp.zeros((batch,), bool), rng))
  return tokens_BT


# Compiled once per (network, length, temperature, EOS) and batch shape: evaluation and
# inference call it batch after batch.
decode_jit = jax.jit(decode, static_argnames=("network", "max_decode_length", "temperature",
                                              "eos_id"))
