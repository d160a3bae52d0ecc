"""Span corruption (moe_jax.data.span_corruption): exact counts, sentinels, reconstruction."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from moe_jax.data import span_corruption as sc
from moe_jax.data import sources, tasks
from moe_jax.data.vocabularies import get_vocabulary

VOCAB = get_vocabulary()  # bytes: ids 0..258, sentinels 358, 357, ... (100 extra ids)
FIRST_SENTINEL = VOCAB.vocab_size - 1


def _is_sentinel(token):
  return token >= VOCAB.vocab_size - VOCAB.extra_ids


def _reconstruct(inputs, targets):
  """The original tokens from (inputs, targets) without EOS; checks sentinel order on the way."""
  spans, order = {}, []
  for t in targets:
    if _is_sentinel(t):
      order.append(int(t))
      spans[int(t)] = []
    else:
      spans[order[-1]].append(int(t))
  out, input_sentinels = [], []
  for t in inputs:
    if _is_sentinel(t):
      input_sentinels.append(int(t))
      out.extend(spans[int(t)])
    else:
      out.append(int(t))
  assert order == input_sentinels == list(range(FIRST_SENTINEL, FIRST_SENTINEL - len(order), -1))
  return out


def test_noise_counts_follow_the_t5_formula():
  # num_noise = round(L * 0.15) clipped to [1, L-1]; spans = max(1, round(num_noise / 3)).
  assert sc.noise_counts(568) == (85, 28)  # 85.2 -> 85; 28.33 -> 28
  assert sc.noise_counts(100) == (15, 5)
  assert sc.noise_counts(10) == (2, 1)  # 1.5 rounds half to even -> 2; 0.67 -> 1
  assert sc.noise_counts(30) == (4, 1)  # 4.5 rounds half to even -> 4; 1.33 -> 1
  assert sc.noise_counts(2) == (1, 1)  # round(0.3) = 0 is clipped to 1


def test_noise_counts_agree_in_python_and_tensorflow():
  lengths = np.arange(2, 5000)
  num_noise, num_spans = sc._noise_counts_tf(tf.constant(lengths, tf.int32), 0.15, 3.0)
  expected = np.array([sc.noise_counts(n) for n in lengths])
  np.testing.assert_array_equal(num_noise.numpy(), expected[:, 0])
  np.testing.assert_array_equal(num_spans.numpy(), expected[:, 1])


def test_span_corruption_lengths_are_t5s():
  assert sc.span_corruption_lengths(512) == (568, 114)
  tokens_length, targets_length = sc.span_corruption_lengths(64)
  for n in range(2, tokens_length + 1):
    noise, spans = sc.noise_counts(n)
    assert n - noise + spans + 1 <= 64 and noise + spans + 1 <= targets_length
  noise, spans = sc.noise_counts(tokens_length + 1)
  assert tokens_length + 1 - noise + spans + 1 > 64


@pytest.mark.parametrize("length", [2, 3, 7, 10, 31, 64, 200, 568])
def test_corrupt_spans_exact_properties(length):
  tokens = np.random.RandomState(length).randint(3, 259, size=length).astype(np.int32)
  num_noise, num_spans = sc.noise_counts(length)
  for seed in range(3):
    inputs, targets = (x.numpy() for x in sc.corrupt_spans(
        tf.constant(tokens), tf.constant([seed, 1]), VOCAB.vocab_size))
    assert _reconstruct(inputs, targets) == tokens.tolist()
    assert sum(_is_sentinel(t) for t in inputs) == num_spans
    assert len(targets) == num_noise + num_spans  # exactly 15% of the tokens are dropped
    assert len(inputs) == length - num_noise + num_spans
    assert not _is_sentinel(inputs[0]) and _is_sentinel(targets[0])
    # Kept spans are non-empty, so no two sentinels touch in the inputs (nor in the targets).
    for seq in (inputs, targets):
      assert not any(_is_sentinel(a) and _is_sentinel(b) for a, b in zip(seq[:-1], seq[1:]))


def test_noise_mask_counts_and_mean_span_length():
  lengths = []
  for seed in range(20):
    mask, _ = sc.random_spans_noise_mask(568, 0.15, 3.0, tf.constant([seed, 0]))
    mask = mask.numpy()
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert mask.sum() == 85 and len(starts) == 28
    lengths.append(mask.sum() / len(starts))
  np.testing.assert_allclose(np.mean(lengths), 85 / 28)


def test_corrupt_spans_is_deterministic_given_the_seed():
  tokens = tf.range(3, 3 + 300, dtype=tf.int32)
  first = [x.numpy() for x in sc.corrupt_spans(tokens, tf.constant([5, 6]), VOCAB.vocab_size)]
  again = [x.numpy() for x in sc.corrupt_spans(tokens, tf.constant([5, 6]), VOCAB.vocab_size)]
  other = [x.numpy() for x in sc.corrupt_spans(tokens, tf.constant([5, 7]), VOCAB.vocab_size)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], other[0])


def test_too_few_sentinels_is_a_clear_error():
  features = {"targets": seqio.Feature(seqio.ByteVocabulary(extra_ids=5)),
              "inputs": seqio.Feature(seqio.ByteVocabulary(extra_ids=5))}
  ds = tf.data.Dataset.from_tensors({"targets": tf.range(3, 1000)})
  with pytest.raises(ValueError, match="28 sentinels.*only 5 extra ids"):
    sc.span_corruption(ds, {"inputs": 512, "targets": 114}, features)


def test_task_reconstructs_the_split_text(tfds_dir):
  """Every example of the task decodes back to its text window, in order, with EOS."""
  inputs_length = 128
  _, targets_length = sc.span_corruption_lengths(inputs_length)
  task = seqio.get_mixture_or_task(tasks.TINY_SHAKESPEARE_SPAN_CORRUPTION)
  ds = task.get_dataset({"inputs": inputs_length, "targets": targets_length},
                        split="validation", shuffle=False, seed=0)
  tokens = []
  for ex in ds.as_numpy_iterator():
    assert ex["inputs"][-1] == ex["targets"][-1] == VOCAB.eos_id
    assert len(ex["inputs"]) <= inputs_length and len(ex["targets"]) <= targets_length
    tokens.extend(_reconstruct(ex["inputs"][:-1], ex["targets"][:-1]))
  text = sources.load_tiny_shakespeare_text("validation")
  assert tokens == VOCAB.encode(text)
