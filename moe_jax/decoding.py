"""Autoregressive decoding, jitted: greedy, temperature sampling and beam search.

Decoding runs the decoder one token at a time over a key/value cache (T5X's `decode` mode: a
"cache" collection created by a full-length call, then one `mutable=["cache"]` step per token),
O(T) attention work per token. `cache=False` instead reruns the whole decoder over the
fixed-length buffer at every step (O(T^2) per token), positions after the current one marked as
padding; it is the reference the cached path equals.

How decoding relates to the teacher-forced model (training / `eval_step`): the decoder routes
causally, so a token's MoE routing depends only on itself and the tokens before it in its group.
Decoding makes each sequence its own routing group (`decoding_network`: the decoder's MoE
template with `sequence_groups=True`, same parameters) with the capacity of a T-token group,
`MoeLayer.capacity(T, deterministic=True)`, and future positions as padding. Hence:
- where no expert's capacity binds, decoding gives the teacher-forced logits of the decoded
  prefix whatever the grouping;
- where capacity binds, decoding equals the teacher-forced model with per-sequence groups, not
  the (default) groups of several rows that share capacity; in exchange, a row's decode never
  depends on the other rows of its batch (or beams), and the cached decode equals the full
  recompute exactly: each step's token takes the expert-buffer slot it has in its sequence's
  full-length group (`MoeLayer`'s `expert_fill` cache).
Mixture-of-Depths blocks decode with their causal predictor instead of the (non-causal) top k
of training (`decoding_network` sets `causal_selection`; see moe_jax.layers.mixture_of_depths).
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

# T5X's "minus infinity" for scores: finite, so dead beams never turn into NaNs.
NEG_INF = -1.0e7


def decoding_network(network: nn.Module) -> nn.Module:
  """`network` with one MoE routing group per sequence in its decoder (parameters unchanged).

  A network whose MoE layers are not a `decoder` stack's (the LSTM LM) provides this copy
  itself, as its `decoding_network()` method (which may refuse: a bidirectional model).
  """
  if hasattr(network, "decoding_network"):
    return network.decoding_network()
  decoder, changes = network.decoder, {}
  if decoder.moe is not None and not decoder.moe.sequence_groups:
    changes["moe"] = decoder.moe.clone(sequence_groups=True)
  mod = getattr(decoder, "mixture_of_depths", None)
  if mod is not None and not mod.causal_selection:
    # Mixture-of-Depths: the per-token predictor decides in the recompute too, as in the steps.
    changes["mixture_of_depths"] = mod.clone(causal_selection=True)
  return network.clone(decoder=decoder.clone(**changes)) if changes else network


class _Stepper:
  """Logits of position i given the tokens before it: from the cache, or by recomputing."""

  def __init__(self, network, variables, length: int, encoder_input_tokens, use_cache: bool,
               repeat: int = 1):
    self.network, self.variables, self.length = network, variables, length
    self.use_cache = use_cache
    self.encoder_tokens = encoder_input_tokens
    self.encoded = None
    if encoder_input_tokens is not None:
      self.encoded = network.apply(variables, encoder_input_tokens,
                                   method=network.encode)
      if repeat > 1:  # beams: each row's encoding once per beam, rows stay contiguous
        self.encoded = jnp.repeat(self.encoded, repeat, axis=0)
        self.encoder_tokens = jnp.repeat(encoder_input_tokens, repeat, axis=0)

  def _apply(self, variables, inputs_BL, **kwargs):
    if self.encoded is not None:
      return self.network.apply(variables, self.encoded, self.encoder_tokens, inputs_BL,
                                method=self.network.decode, **kwargs)
    return self.network.apply(variables, decoder_input_tokens=inputs_BL, **kwargs)

  def init(self, batch: int):
    """The cache for `batch` sequences (None without one)."""
    if not self.use_cache:
      return None
    # The full-length call creates the cache; its logits are unused and jit drops their work.
    _, state = self._apply(self.variables, jnp.zeros((batch, self.length), jnp.int32),
                           decode=True, max_decode_length=self.length, mutable=["cache"])
    return state["cache"]

  def logits(self, tokens_BT, i, cache):
    """(logits [B, V] of position i, cache), tokens_BT[:, :i] being the decoded prefix."""
    if self.use_cache:
      previous_B1 = jax.lax.dynamic_slice_in_dim(tokens_BT, jnp.maximum(i - 1, 0), 1, axis=1)
      previous_B1 = jnp.where(i == 0, 0, previous_B1)  # BOS 0 before the first token
      logits_B1V, state = self._apply({**self.variables, "cache": cache}, previous_B1,
                                      decode=True, max_decode_length=self.length,
                                      mutable=["cache"])
      return logits_B1V[:, 0], state["cache"]
    inputs_BT = jnp.pad(tokens_BT[:, :-1], ((0, 0), (1, 0)))  # shift right behind BOS 0
    live_BT = jnp.broadcast_to(jnp.arange(self.length)[None] <= i, tokens_BT.shape)
    logits_BTV = self._apply(self.variables, inputs_BT,
                             decoder_target_tokens=live_BT.astype(jnp.int32))
    return logits_BTV[:, i], None


def _start(max_decode_length: int, prompt_BP, encoder_input_tokens):
  """(batch, tokens_BT holding the prompt, prompt lengths [B])."""
  if (prompt_BP is None) == (encoder_input_tokens is None):
    raise ValueError("pass prompt_BP (decoder-only) or encoder_input_tokens "
                     "(encoder-decoder), not both")
  batch = (prompt_BP if encoder_input_tokens is None else encoder_input_tokens).shape[0]
  tokens_BT = jnp.zeros((batch, max_decode_length), jnp.int32)
  if prompt_BP is None:
    return batch, tokens_BT, jnp.zeros((batch,), jnp.int32)
  tokens_BT = tokens_BT.at[:, :prompt_BP.shape[1]].set(prompt_BP[:, :max_decode_length])
  return batch, tokens_BT, jnp.sum(prompt_BP > 0, axis=1).astype(jnp.int32)


def _pick(logits_BV, temperature, rng):
  """Argmax at temperature 0, else a sample; `temperature` may be traced (one compilation)."""
  sampling = temperature > 0
  sample_B = jax.random.categorical(rng, logits_BV / jnp.where(sampling, temperature, 1.0),
                                    axis=-1)
  return jnp.where(sampling, sample_B, jnp.argmax(logits_BV, axis=-1))


def decode(network: nn.Module, params, *, max_decode_length: int, prompt_BP=None,
           encoder_input_tokens=None, temperature=0.0, rng=None, eos_id: int = 1,
           cache: bool = True, return_logits: bool = False, model_state=None):
  """Generated tokens [B, max_decode_length] (0 after EOS), greedy or sampled.

  Decoder-only: continues `prompt_BP` (0-padded on the right; may be empty) and returns the
  prompt followed by the continuation. Encoder-decoder: decodes from `encoder_input_tokens`.
  `cache=False` recomputes the whole decoder per token (the reference). `return_logits` also
  returns each position's float32 logits [B, T, V]. `model_state`: the non-param collections
  applied beside `params` (TrainState.model_state, e.g. router biases; None: none).
  """
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  rng = jax.random.key(0) if rng is None else rng
  batch, tokens_BT, prompt_len_B = _start(max_decode_length, prompt_BP, encoder_input_tokens)
  stepper = _Stepper(decoding_network(network), {"params": params, **(model_state or {})},
                     max_decode_length, encoder_input_tokens, cache)

  def step(i, carry):
    tokens_BT, done_B, rng, cache, logits_BTV = carry
    rng, sample_rng = jax.random.split(rng)
    logits_BV, cache = stepper.logits(tokens_BT, i, cache)
    new_B = _pick(logits_BV, temperature, sample_rng).astype(jnp.int32)
    keep_prompt = i < prompt_len_B
    new_B = jnp.where(keep_prompt, tokens_BT[:, i], jnp.where(done_B, 0, new_B))
    done_B = done_B | (~keep_prompt & (new_B == eos_id))
    if logits_BTV is not None:
      logits_BTV = logits_BTV.at[:, i].set(logits_BV)
    return tokens_BT.at[:, i].set(new_B), done_B, rng, cache, logits_BTV

  logits_BTV = None
  if return_logits:
    vocab = network.vocab_size
    logits_BTV = jnp.zeros((batch, max_decode_length, vocab), jnp.float32)
  tokens_BT, _, _, _, logits_BTV = jax.lax.fori_loop(
      0, max_decode_length, step,
      (tokens_BT, jnp.zeros((batch,), bool), rng, stepper.init(batch), logits_BTV))
  return (tokens_BT, logits_BTV) if return_logits else tokens_BT


def brevity_penalty(alpha: float, length):
  """T5X's length normalisation ((5 + length) / 6) ** alpha (GNMT, Wu et al. 2016)."""
  return ((5.0 + length) / 6.0) ** alpha


def _best(scores_BM, seqs_BMT, k: int):
  """The k best (score, sequence) pairs per row, best first."""
  scores_BK, index_BK = jax.lax.top_k(scores_BM, k)
  return scores_BK, jnp.take_along_axis(seqs_BMT, index_BK[..., None], axis=1)


def _reorder_cache(cache, beam_BK):
  """Each beam's cache rows taken from the beam it extends (per-row leaves [B*K, ...])."""
  batch, beams = beam_BK.shape

  def take(x):
    if x.ndim == 0:  # the shared position
      return x
    x = x.reshape((batch, beams) + x.shape[1:])
    x = jnp.take_along_axis(x, beam_BK.reshape(beam_BK.shape + (1,) * (x.ndim - 2)), axis=1)
    return x.reshape((batch * beams,) + x.shape[2:])

  return jax.tree.map(take, cache)


def beam_search(network: nn.Module, params, *, beam_size: int, max_decode_length: int,
                prompt_BP=None, encoder_input_tokens=None, alpha: float = 0.6,
                eos_id: int = 1, cache: bool = True, model_state=None):
  """The `beam_size` best sequences [B, K, T] (0 after EOS) and their scores [B, K], best first.

  T5X's beam search: score = log p(sequence) / brevity_penalty(alpha, length), length counting
  every token up to and including EOS (the prompt too). Each step extends the K alive beams by
  every token and keeps the 2K best extensions: those ending in EOS join the K finished
  sequences (which keep their score and are never extended), the K best others stay alive.
  Sequences that reach max_decode_length without EOS count as finished at that length.
  Decoder-only prompts (as in `decode`) are forced and add no log-probability.
  `model_state` as in `decode`.
  """
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  batch, tokens_BT, prompt_len_B = _start(max_decode_length, prompt_BP, encoder_input_tokens)
  beams, length, vocab = beam_size, max_decode_length, network.vocab_size
  if 2 * beams > beams * vocab:
    raise ValueError(f"beam search needs a vocabulary of at least 2 tokens, got {vocab}")
  stepper = _Stepper(decoding_network(network), {"params": params, **(model_state or {})},
                     length, encoder_input_tokens, cache, repeat=beams)

  def step(i, carry):
    alive_BKT, alive_lp_BK, done_BKT, done_score_BK, cache = carry
    logits_NV, cache = stepper.logits(alive_BKT.reshape(batch * beams, length), i, cache)
    lp_BKV = jax.nn.log_softmax(logits_NV).reshape(batch, beams, vocab)
    forced_B = i < prompt_len_B
    prompt_lp_BV = jnp.where(jnp.arange(vocab) == tokens_BT[:, i, None], 0.0, NEG_INF)
    lp_BKV = jnp.where(forced_B[:, None, None], prompt_lp_BV[:, None], lp_BKV)
    top_lp_BM, index_BM = jax.lax.top_k(
        (alive_lp_BK[..., None] + lp_BKV).reshape(batch, beams * vocab), 2 * beams)
    beam_BM, token_BM = index_BM // vocab, index_BM % vocab
    seqs_BMT = jnp.take_along_axis(alive_BKT, beam_BM[..., None], axis=1).at[:, :, i].set(
        token_BM)
    ends_BM = (token_BM == eos_id) & ~forced_B[:, None]
    alive_lp_BK, keep_BK = jax.lax.top_k(jnp.where(ends_BM, NEG_INF, top_lp_BM), beams)
    alive_BKT = jnp.take_along_axis(seqs_BMT, keep_BK[..., None], axis=1)
    cache = _reorder_cache(cache, jnp.take_along_axis(beam_BM, keep_BK, axis=1))
    ended_BM = jnp.where(ends_BM, top_lp_BM / brevity_penalty(alpha, i + 1), NEG_INF)
    done_score_BK, done_BKT = _best(jnp.concatenate([done_score_BK, ended_BM], axis=1),
                                    jnp.concatenate([done_BKT, seqs_BMT], axis=1), beams)
    return alive_BKT, alive_lp_BK, done_BKT, done_score_BK, cache

  # Only beam 0 starts alive, so the first expansion does not repeat itself K times.
  alive_lp_BK = jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF) * jnp.ones((batch, 1))
  start_BKT = jnp.repeat(tokens_BT[:, None], beams, axis=1)
  alive_BKT, alive_lp_BK, done_BKT, done_score_BK, _ = jax.lax.fori_loop(
      0, length, step, (start_BKT, alive_lp_BK, start_BKT, jnp.full((batch, beams), NEG_INF),
                        stepper.init(batch * beams)))
  full_BK = alive_lp_BK / brevity_penalty(alpha, length)
  scores_BK, seqs_BKT = _best(jnp.concatenate([done_score_BK, full_BK], axis=1),
                              jnp.concatenate([done_BKT, alive_BKT], axis=1), beams)
  return seqs_BKT, scores_BK


# Compiled once per configuration and batch shape: evaluation and inference call them batch
# after batch.
decode_jit = jax.jit(decode, static_argnames=("network", "max_decode_length", "eos_id", "cache",
                                              "return_logits"))
beam_search_jit = jax.jit(beam_search, static_argnames=("network", "beam_size",
                                                        "max_decode_length", "alpha", "eos_id",
                                                        "cache"))
