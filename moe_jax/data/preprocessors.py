"""seqio preprocessors of our tasks (span corruption has its own module)."""

from typing import Mapping, Optional

import seqio
import tensorflow as tf

TRANSLATE_EN_DE_PREFIX = "translate English to German: "


def split_tokens(dataset: tf.data.Dataset, max_tokens: int,
                 feature_key: str = "targets") -> tf.data.Dataset:
  """Cuts `feature_key` into consecutive segments of `max_tokens` (the last may be shorter).

  Other features are dropped: they would no longer describe the segments.
  """
  if max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")

  def segments(features):
    tokens = features[feature_key]
    num_rows = (tf.size(tokens) + max_tokens - 1) // max_tokens
    padded = tf.pad(tokens, [[0, num_rows * max_tokens - tf.size(tokens)]])
    lengths = tf.minimum(tf.size(tokens) - tf.range(num_rows) * max_tokens, max_tokens)
    rows = tf.data.Dataset.from_tensor_slices((tf.reshape(padded, [num_rows, max_tokens]), lengths))
    return rows.map(lambda row, n: {feature_key: row[:n]})

  return dataset.flat_map(segments)


def split_to_targets_length(dataset: tf.data.Dataset,
                            sequence_length: Optional[Mapping[str, int]],
                            output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """Cuts "targets" into windows that fill `sequence_length["targets"]` (EOS included if any)."""
  targets_length = (sequence_length or {}).get("targets")
  if targets_length is None:
    return dataset
  return split_tokens(dataset, targets_length - int(output_features["targets"].add_eos))


@seqio.map_over_dataset
def translate_en_de(features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
  """{"en", "de"} -> {"inputs": "translate English to German: " + en, "targets": de}."""
  return {"inputs": tf.strings.join([TRANSLATE_EN_DE_PREFIX, features["en"]]),
          "targets": features["de"]}
