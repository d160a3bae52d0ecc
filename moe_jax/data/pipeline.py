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
import os
from typing import Mapping, Optional

import seqio
import tensorflow as tf

from moe_jax.data import facts, tasks


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


class FactsFeatureConverter(LMFeatureConverter):
  """`synthetic_facts`: the LM features, always unpacked, with loss weights on the value tokens.

  The keys are random letters: a loss on them spends capacity learning which keys exist and
  dilutes the recall signal. With the weights on the value positions, the trainer's loss is the
  value's cross-entropy and its accuracy the value-token accuracy. One fact per row keeps the
  values at fixed positions, whatever `pack` the run asks for (packing would gain nothing: every
  example has the same length).
  """

  def __init__(self, pack: bool = False):
    del pack
    super().__init__(pack=False)

  def _convert_features(self, ds, task_feature_lengths):
    values = facts.FactsConfig().value_positions
    length = task_feature_lengths["targets"]
    mask_L = tf.constant([values.start <= i < values.stop for i in range(length)], tf.int32)
    ds = super()._convert_features(ds, task_feature_lengths)
    return ds.map(lambda ex: {**ex, "decoder_loss_weights": ex["decoder_loss_weights"] * mask_L},
                  num_parallel_calls=tf.data.AUTOTUNE)


class _DropUncachedShuffleWarning(logging.Filter):
  """seqio warns that an uncached FunctionDataSource reshuffles poorly on restarts. Ours shuffle
  in the source with the pipeline seed, and a restart restores the iterator's saved state (or
  skips exactly the consumed batches)."""

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
  if mixture_or_task_name == facts.SYNTHETIC_FACTS:
    return FactsFeatureConverter(pack=pack)
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


class CheckpointableIterator:
  """Numpy batches out of a tf.data dataset, whose position can be saved and restored.

  The state is the tf.data iterator's own (`tf.train.Checkpoint(iterator=...)`, as T5X saves
  it): shuffle buffers, packing state and prefetched batches, so a restore costs the same at any
  step, where replaying the consumed batches grows with n (benchmarks/restart.py: 1.0 s vs
  83 s after 20k batches of 16 x 128). Every op of our pipelines is checkpointable; a tiny
  Shakespeare LM iterator's state is 2-5 MB per process: the shuffle buffers, plus however
  many batches the prefetch buffers held at that moment.
  """

  def __init__(self, ds: tf.data.Dataset):
    self._iterator = iter(ds)

  def __iter__(self):
    return self

  def __next__(self):
    return tf.nest.map_structure(lambda t: t.numpy(), next(self._iterator))

  def skip(self, num_batches: int) -> None:
    """Draws and drops `num_batches` batches: resuming from a checkpoint that holds no state.

    Drawn from this iterator rather than through `ds.skip(n)`, so that the dataset graph, and
    with it the state this iterator saves later, is the same on both resume paths (measured no
    slower: ~4 ms per 16 x 128 batch of tiny Shakespeare either way)."""
    for _ in range(num_batches):
      next(self._iterator)

  def save(self, prefix: str) -> None:
    """Writes the position to `prefix.index` / `prefix.data-*` (directories are created)."""
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    tf.train.Checkpoint(iterator=self._iterator).write(prefix)

  def restore(self, prefix: str) -> None:
    """Moves to the position saved at `prefix` (the dataset must be built the same way)."""
    tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
