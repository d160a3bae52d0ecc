"""T5 span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", 3.1.4).

A fraction `noise_density` of the tokens, in spans of mean length `mean_noise_span_length`, is
dropped from the input; each dropped span is replaced by ONE sentinel in the input, and the
target lists every dropped span after its sentinel:

    tokens   a b c d e f g h      (noise: c d, g)
    inputs   a b <S0> e f <S1> h  -> then EOS
    targets  <S0> c d <S1> g      -> then EOS

Sentinels are the vocabulary's extra ids counted down from the top: <Si> = vocab_size - 1 - i.

Defaults follow sec. 3.3.4 (15% corrupted, mean span length 3). Counts for a sequence of L
tokens (in float64, rounding half to even like numpy and `tf.round`):

    num_noise_tokens = clip(round(L * noise_density), 1, L - 1)
    num_noise_spans  = max(1, round(num_noise_tokens / mean_noise_span_length))

The noise tokens and the kept tokens are each cut into `num_noise_spans` non-empty spans,
uniformly among all such cuts, and interleaved kept, noise, kept, noise, ... (the sequence
starts with kept tokens and ends with noise, as in the T5 reference setup). All randomness is
stateless and seeded per example, so a pipeline seed fixes every mask.
"""

from typing import Mapping, Optional, Tuple

import numpy as np
import seqio
import tensorflow as tf

from moe_jax.data import preprocessors

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def noise_counts(length: int, noise_density: float = NOISE_DENSITY,
                 mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> Tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for `length` >= 2 tokens; the formula above, in Python."""
  num_noise = int(np.clip(np.round(length * noise_density), 1, length - 1))
  num_spans = max(1, int(np.round(num_noise / mean_noise_span_length)))
  return num_noise, num_spans


def _noise_counts_tf(length, noise_density, mean_noise_span_length):
  """`noise_counts` on an int32 tensor: float64 and half-to-even like numpy, so they agree."""
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length)
  return num_noise, tf.maximum(tf.cast(num_spans, tf.int32), 1)


def span_corruption_lengths(
    inputs_length: int, noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> Tuple[int, int]:
  """(tokens_length, targets_length) so that every corrupted input fits `inputs_length`.

  tokens_length is the longest raw segment such that it and every shorter segment give at most
  `inputs_length` input tokens, EOS included; targets_length is the longest target (with EOS)
  those segments produce. For inputs_length=512 this is (568, 114), T5's numbers.
  """
  tokens_length, targets_length = 1, 0
  for length in range(2, 4 * inputs_length + 2):
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    if length - num_noise + num_spans + 1 > inputs_length:
      break
    tokens_length = length
    targets_length = max(targets_length, num_noise + num_spans + 1)
  if tokens_length < 2:
    raise ValueError(f"inputs_length={inputs_length} is too short for span corruption.")
  return tokens_length, targets_length


def _random_composition(total, num_parts, seed):
  """Lengths of `num_parts` positive parts summing to `total`, uniform over all such splits."""
  # Choose num_parts - 1 distinct cut points among the total - 1 gaps between items.
  gaps = tf.random.stateless_uniform([total - 1], seed=seed)
  cuts = tf.sort(tf.argsort(gaps)[: num_parts - 1] + 1)
  bounds = tf.concat([[0], cuts, [total]], axis=0)
  return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length, noise_density: float, mean_noise_span_length: float,
                            seed) -> Tuple[tf.Tensor, tf.Tensor]:
  """Noise mask [L] bool and span index [L] int32 (noise span number of each noise token).

  `length` >= 2; `seed` is a stateless seed, shape [2] int.
  """
  num_noise, num_spans = _noise_counts_tf(length, noise_density, mean_noise_span_length)
  noise_seed, keep_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  noise_lengths = _random_composition(num_noise, num_spans, noise_seed)
  keep_lengths = _random_composition(length - num_noise, num_spans, keep_seed)
  span_lengths = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])
  span_is_noise = tf.tile([False, True], [num_spans])
  mask = tf.repeat(span_is_noise, span_lengths)
  span_index = tf.repeat(tf.range(2 * num_spans) // 2, span_lengths)
  return mask, span_index


def corrupt_spans(tokens, seed, vocab_size: int, noise_density: float = NOISE_DENSITY,
                  mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                  ) -> Tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) without EOS for a 1-D int32 `tokens` of length >= 2."""
  mask, span_index = random_spans_noise_mask(
      tf.size(tokens), noise_density, mean_noise_span_length, seed)
  span_starts = tf.logical_and(mask, tf.logical_not(tf.pad(mask[:-1], [[1, 0]])))
  sentinels = vocab_size - 1 - span_index
  # Each position contributes (a sentinel if a noise span starts there, its token); the inputs
  # keep the sentinels and the kept tokens, the targets the sentinels and the noise tokens.
  values = tf.reshape(tf.stack([sentinels, tokens], axis=1), [-1])
  inputs = tf.boolean_mask(
      values, tf.reshape(tf.stack([span_starts, tf.logical_not(mask)], axis=1), [-1]))
  targets = tf.boolean_mask(values, tf.reshape(tf.stack([span_starts, mask], axis=1), [-1]))
  return inputs, targets


def span_corruption(dataset: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tf.data.Dataset:
  """seqio preprocessor: tokenized "targets" -> span-corrupted "inputs"/"targets" (no EOS yet).

  Long token sequences are first cut into segments that fit `sequence_length["inputs"]` once
  corrupted (`span_corruption_lengths`); segments shorter than 2 tokens are dropped (nothing to
  corrupt). Follow with `seqio.preprocessors.append_eos_after_trim`.
  """
  vocabulary = output_features["targets"].vocabulary
  inputs_length = (sequence_length or {}).get("inputs")
  if inputs_length is None:
    raise ValueError("span_corruption needs sequence_length['inputs'] to size its segments.")
  tokens_length, _ = span_corruption_lengths(inputs_length, noise_density,
                                             mean_noise_span_length)
  max_spans = max(noise_counts(n, noise_density, mean_noise_span_length)[1]
                  for n in range(2, tokens_length + 1))
  if max_spans > vocabulary.extra_ids:
    raise ValueError(
        f"Span corruption of {tokens_length} tokens needs {max_spans} sentinels but the "
        f"vocabulary has only {vocabulary.extra_ids} extra ids; use a shorter inputs length "
        "or more extra ids.")
  dataset = preprocessors.split_tokens(dataset, tokens_length, feature_key="targets")
  dataset = dataset.filter(lambda ex: tf.size(ex["targets"]) >= 2)

  @seqio.map_over_dataset(num_seeds=1)
  def corrupt(features, seed):
    inputs, targets = corrupt_spans(features["targets"], seed, vocabulary.vocab_size,
                                    noise_density, mean_noise_span_length)
    return {"inputs": inputs, "targets": targets}

  return corrupt(dataset)
