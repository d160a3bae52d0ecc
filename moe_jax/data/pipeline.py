"""From a task name to batches of model features (T5X names), packed, sharded, deterministic.

Encoder-decoder tasks (with "inputs") go through `seqio.EncDecFeatureConverter`:
encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, and
with packing encoder/decoder_segment_ids and encoder/decoder_positions. Decoder-only tasks go
through `seqio.LMFeatureConverter`: the decoder_* subset. Packing concatenates examples into
each row; segment ids (1, 2, ... per example, 0 on padding) and positions (restarting at 0 for
each example) let attention and position biases keep them apart.
"""

import difflib
import logging
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from moe_jax.data import tasks



class _TaskFeaturesOnly:
  """Keeps only the features given lengths before converting: seqio's tokenize also keeps the
  `*_pretokenized` texts, which packing would drop anyway, warning "Features not in
  `features_length` will be removed during packing" for every dataset built."""

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k in task_feature_lengths},
                num_parallel_calls=tf.data.AUTOTUNE)
    return super().__call__(ds, task_feature_lengths)


class EncDecFeatureConverter(_TaskFeaturesOnly, seqio.EncDecFeatureConverter):
  pass


class LMFeatureConverter(_TaskFeaturesOnly, seqio.LMFeatureConverter):
  pass


class _DropUncachedShuffleWarning(logging.Filter):
  """seqio warns that an uncached FunctionDataSource reshuffles poorly on restarts. Ours shuffle
  in the source with the pipeline seed, and a restart skips exactly the consumed batches."""

  def filter(self, record):
    return not record.getMessage().startswith("Using an uncached FunctionDataset")


logging.getLogger("absl").addFilter(_DropUncachedShuffleWarning())


def _get_provider(name: str) -> seqio.DatasetProviderBase:
  if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
    known = tasks.registered_task_names()
    close = difflib.get_close_matches(name, known, n=1)
    guess = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown task or mixture {name!r}.{guess} moe_jax registers: "
                     f"{', '.join(known)}.")
  return seqio.get_mixture_or_task(name)


def get_feature_converter(mixture_or_task_name: str, pack: bool = True) -> seqio.FeatureConverter:
  """EncDecFeatureConverter for tasks with "inputs", LMFeatureConverter for "targets" only."""
  provider = _get_provider(mixture_or_task_name)
  if "inputs" in provider.output_features:
    return EncDecFeatureConverter(pack=pack)
  return LMFeatureConverter(pack=pack)


def get_dataset(mixture_or_task_name: str,
                task_feature_lengths: Mapping[str, int],
                split: str,
                batch_size: int,
                shuffle: bool,
                seed: Optional[int],
                shard_info: Optional[seqio.ShardInfo] = None,
                pack: bool = True,
                num_epochs: Optional[int] = None,
                drop_remainder: bool = True) -> tf.data.Dataset:
  """Batches {feature: int32 [batch_size, length]} of a registered task or mixture.

  task_feature_lengths: e.g. {"inputs": 512, "targets": 114} (span corruption: see
    `span_corruption_lengths`) or {"targets": 512} (LM); longer features are truncated.
  batch_size: rows per batch for THIS process.
  shuffle, seed: the same seed gives the same batches (shuffle order and span-corruption
    noise); seed=None draws both at random.
  shard_info: `seqio.ShardInfo(jax.process_index(), jax.process_count())` in multi-process
    training; each process gets a disjoint 1/num_shards of the examples.
  num_epochs: None repeats forever (training); 1 for one pass (evaluation).
  drop_remainder: False keeps a last, smaller batch (evaluation over a whole split).
  """
  provider = _get_provider(mixture_or_task_name)
  if split not in provider.splits:
    raise ValueError(f"Unknown split {split!r} for {mixture_or_task_name!r}; "
                     f"choose one of {list(provider.splits)}.")
  missing = set(provider.output_features) - set(task_feature_lengths)
  if missing:
    raise ValueError(f"task_feature_lengths of {mixture_or_task_name!r} needs a length for "
                     f"{sorted(missing)}, got {dict(task_feature_lengths)}.")
  ds = seqio.get_dataset(
      provider,
      task_feature_lengths=dict(task_feature_lengths),
      feature_converter=get_feature_converter(mixture_or_task_name, pack=pack),
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_info=shard_info,
      seed=seed,
      batch_size=batch_size if drop_remainder else None,
      verbose=False)
  return ds if drop_remainder else ds.batch(batch_size, drop_remainder=False)
