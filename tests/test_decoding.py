"""Decoding: the cached decode equals the full recompute, rows never interact, greedy decoding
equals the teacher-forced model's argmax where capacity does not bind, and beam search finds
the exhaustive-search optimum."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decoding, gin_utils
from moe_jax.models import build_network

# One-layer decoders (the layer sparse) and a dense encoder keep each compilation short.
TINY = ["EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8", "NUM_DECODER_LAYERS=1",
        "NUM_DECODER_SPARSE_LAYERS=1"]
ENC = ["NUM_ENCODER_LAYERS=1", "NUM_ENCODER_SPARSE_LAYERS=0"]
# Capacity binds in every sequence: T * k routing choices exceed the E * C slots (C = 1 for
# Switch, 2 for top-2 at T = 8..10, E = 8).
TIGHT = ["MoeLayer.eval_capacity_factor=0.5", "MoeLayer.min_expert_capacity=1"]
TOP2_DECODER = ["decoder/MoeLayer.router=@TopKRouter()", "TopKRouter.k=2"]
PROMPT = jnp.array([[5, 6, 7], [9, 3, 0], [4, 0, 0]])
SOURCE = jnp.array([[5, 6, 7, 9, 1], [9, 3, 1, 0, 0], [4, 4, 4, 4, 1]])

NETWORKS = {  # name -> (model config, bindings)
    "lm_switch": ("switch_tiny", TIGHT),
    "lm_top2": ("top2_tiny", TIGHT),
    "encdec_switch": ("switch_t5_tiny", TIGHT + ENC),
    "encdec_top2": ("switch_t5_tiny", TIGHT + ENC + TOP2_DECODER),
    # Shazeer et al. (2017) gating, which scores with two projections of x (16 experts for
    # the hierarchical one: 4 choices per token still exceed the 16 one-slot buffers).
    "lm_noisy_top2": ("noisy_topk_tiny", TIGHT),
    "lm_hierarchical": ("hierarchical_tiny", TIGHT),
    # Mixture-of-Depths (Raposo et al. 2024) around a Switch block: the predictor picks the
    # tokens, skipped ones are masked keys and padding to the router (MoDE, staged).
    "lm_mod_switch": ("mod_tiny", TIGHT + ["SparseDecoder.moe=@decoder/MoeLayer()",
                                           "NUM_DECODER_MOD_LAYERS=1"]),
    # Attention experts: the cache holds SwitchHead's expert-mixed values, MoA's shared K, V
    # (4 MoA experts, one relative-position head each, k = 2).
    "lm_switchhead": ("switchhead_tiny", TIGHT),
    "lm_moa": ("moa_tiny", TIGHT + ["NUM_HEADS=4"]),
}


def _network(config, bindings=(), vocab=48):
  """A tiny network and random parameters (numpy normals: running `init` costs ~10 s here)."""
  gin_utils.parse_gin([f"models/{config}.gin"], TINY + [f"VOCAB_SIZE={vocab}", *bindings])
  network = build_network()
  shapes = nn.unbox(jax.eval_shape(network.init, jax.random.key(0), **network.example_batch()))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.5).astype(np.float32),
                        shapes["params"])
  return network, params


def _inputs(network, rows=slice(None)):
  if hasattr(network, "encoder"):
    return dict(encoder_input_tokens=SOURCE[rows], max_decode_length=8)
  return dict(prompt_BP=PROMPT[rows], max_decode_length=10)


@pytest.mark.parametrize("name", NETWORKS)
def test_cached_decode_equals_full_recompute_and_rows_never_interact(name):
  network, params = _network(*NETWORKS[name])
  inputs = _inputs(network)
  decode = lambda cache, temperature, **kw: decoding.decode_jit(
      network, params, **{**inputs, **kw}, temperature=temperature, rng=jax.random.key(7),
      cache=cache, return_logits=True)
  for temperature in (0.0, 1.0):
    (cached, cached_logits), (full, full_logits) = (decode(True, temperature),
                                                    decode(False, temperature))
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_allclose(cached_logits, full_logits, rtol=0, atol=1e-5)
  greedy, greedy_logits = decode(True, 0.0)
  assert not np.array_equal(greedy, cached)  # it did sample

  # Row 1 decodes the same beside other rows (capacity binds, yet rows share nothing).
  key = "encoder_input_tokens" if "encoder_input_tokens" in inputs else "prompt_BP"
  others = inputs[key].at[0].set(inputs[key][2]).at[2].set(inputs[key][0] % 7 + 2)
  alone, alone_logits = decode(True, 0.0, **{key: others})
  np.testing.assert_array_equal(alone[1], greedy[1])
  np.testing.assert_allclose(alone_logits[1], greedy_logits[1], rtol=0, atol=1e-5)
  assert not np.array_equal(alone[0], greedy[0])  # the other rows did change
  if name == "lm_top2":
    # Not a vacuous property: the teacher-forced model, whose routing groups hold several
    # rows, gives row 1 other logits beside other rows.
    apply = jax.jit(lambda tokens: network.apply({"params": params},
                                                 decoder_input_tokens=tokens))
    shift = lambda tokens: jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    leak = jnp.abs(apply(shift(greedy))[1] - apply(shift(greedy.at[0].set(alone[0])))[1]).max()
    assert leak > 1e-3, leak


@pytest.mark.parametrize("config,eos_id", [("top2_tiny", 1), ("switch_t5_tiny", 35)])
def test_greedy_decode_is_the_teacher_forced_argmax_where_capacity_does_not_bind(config, eos_id):
  # Capacity factor E: every expert can take every token of a group, so routing groups (rows
  # shared, as in training) do not matter. EOS ids that these models emit.
  network, params = _network(config, ["MoeLayer.eval_capacity_factor=8.0"] + ENC)
  inputs = _inputs(network)
  out = np.asarray(decoding.decode_jit(network, params, **inputs, eos_id=eos_id))
  # Teacher forcing the decoded rows gives every position's logits given the tokens before it
  # (the decoder is causal), the stepwise reference in one call.
  decoder_inputs = jnp.pad(out[:, :-1], ((0, 0), (1, 0)))
  if "encoder_input_tokens" in inputs:
    logits = jax.jit(network.apply)({"params": params}, SOURCE, decoder_inputs)
  else:
    logits = jax.jit(network.apply)({"params": params}, decoder_input_tokens=decoder_inputs)
  logits = np.asarray(logits)
  prompt_len = np.sum(np.asarray(inputs.get("prompt_BP", SOURCE[:, :0])) > 0, axis=1)
  ended = 0
  for row in range(3):
    done = False
    for i in range(prompt_len[row], out.shape[1]):
      np.testing.assert_equal(out[row, i], 0 if done else np.argmax(logits[row, i]))
      done |= out[row, i] == eos_id
    ended += done
  assert ended, "no row reached EOS: the test does not exercise it"


def _exhaustive_best(network, params, prompt_len, length, alpha, encoder_input_tokens=None,
                     prompt=()):
  """The best sequence of one row and its score by brute force over every token sequence.

  Scores are teacher-forced log-probabilities (each sequence its own routing group, causal
  routing: a position's logits do not depend on later tokens), summed up to the first EOS after
  the prompt (or the end) and divided by ((5 + length) / 6) ** alpha.
  """
  vocab = network.vocab_size
  per_seq = network.clone(decoder=network.decoder.clone(
      moe=network.decoder.moe.clone(sequence_groups=True)))
  tails = np.array(list(itertools.product(range(vocab), repeat=length - prompt_len)))
  seqs = np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(tails), 1)), tails], axis=1)
  inputs = np.pad(seqs[:, :-1], ((0, 0), (1, 0)))
  if encoder_input_tokens is None:
    logits = jax.jit(per_seq.apply)({"params": params}, decoder_input_tokens=inputs)
  else:
    # One encoding, repeated: it does not depend on the decoder tokens.
    logits = jax.jit(lambda inputs: per_seq.apply(
        {"params": params},
        jnp.repeat(per_seq.apply({"params": params}, encoder_input_tokens,
                                 method=per_seq.encode), len(seqs), 0),
        jnp.repeat(encoder_input_tokens, len(seqs), 0), inputs, method=per_seq.decode))(inputs)
  lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), seqs[..., None], -1)[..., 0]
  lp[:, :prompt_len] = 0.0
  best = (None, -np.inf)
  for seq, seq_lp in zip(seqs, lp):
    eos = [i for i in range(prompt_len, length) if seq[i] == 1]
    end = eos[0] + 1 if eos else length
    score = seq_lp[:end].sum() / ((5.0 + end) / 6.0) ** alpha
    if score > best[1]:
      best = (np.where(np.arange(length) < end, seq, 0), score)
  return best


@pytest.mark.parametrize("config,alpha", [("top2_tiny", 0.6), ("switch_t5_tiny", 0.0)])
def test_beam_search_finds_the_exhaustive_optimum(config, alpha):
  # Vocabulary 6 (EOS 1), 3 free positions: 25 beams keep every EOS-free prefix, so beam search
  # is exact. Binding capacity, as above.
  network, params = _network(config, TIGHT + ENC, vocab=6)
  encdec = config == "switch_t5_tiny"
  rows = jnp.array([[2, 3, 1], [4, 5, 1], [3, 3, 1]]) if encdec else jnp.array([[3], [4], [5]])
  kw = dict(encoder_input_tokens=rows) if encdec else dict(prompt_BP=rows)
  length = 3 if encdec else 4
  seqs, scores = decoding.beam_search_jit(network, params, beam_size=25, max_decode_length=length,
                                          alpha=alpha, **kw)
  ended_early = False
  for row in range(3):
    best_seq, best_score = _exhaustive_best(
        network, params, 0 if encdec else 1, length, alpha,
        encoder_input_tokens=rows[row:row + 1] if encdec else None,
        prompt=() if encdec else rows[row])
    np.testing.assert_array_equal(seqs[row, 0], best_seq)
    np.testing.assert_allclose(scores[row, 0], best_score, rtol=0, atol=1e-5)
    ended_early |= best_seq[-1] == 0
  assert ended_early, "no best sequence ends with EOS: the test does not exercise it"
  assert (np.diff(np.asarray(scores), axis=1) <= 0).all()  # best first


def test_sampling_is_seeded_and_temperature_validated():
  network, params = _network(*NETWORKS["lm_switch"])  # compiled above
  sample = lambda seed: np.asarray(decoding.decode_jit(
      network, params, **_inputs(network), temperature=1.0, rng=jax.random.key(seed),
      return_logits=True)[0])
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))
  with pytest.raises(ValueError, match="temperature"):
    decoding.decode(network, params, max_decode_length=4, prompt_BP=PROMPT, temperature=-1.0)
  with pytest.raises(ValueError, match="beam_size"):
    decoding.beam_search(network, params, beam_size=0, max_decode_length=4, prompt_BP=PROMPT)
