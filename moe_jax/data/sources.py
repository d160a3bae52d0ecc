"""Data sources: tiny Shakespeare (TFDS) cut into examples, and Multi30k en-de (local gzip files).

Both are `seqio.FunctionDataSource`s that resolve their paths (`moe_jax.data.paths`) when a
dataset is built and fail early, naming the path and the fix, when the data is missing or
empty. The order of examples out of a source is the same in every process (shuffled with the
pipeline seed, or a fixed one without it), so that seqio's per-process sharding, which follows
the source, gives disjoint shards.
"""

import glob
import gzip
import os
from typing import List, Optional

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from moe_jax.data import paths

TINY_SHAKESPEARE = "tiny_shakespeare"
SPLITS = ("train", "validation", "test")

# Tiny Shakespeare has ONE text per split (1.0 MB train, 56 kB validation and test). We cut it
# into consecutive chunks of whole lines of at most CHUNK_CHARS characters (a line is never
# split; chunks keep their newlines, so joining them gives back the split's text exactly). The
# tasks then cut each chunk into windows of the model's sequence length, so no text is lost to
# truncation and the train split gives ~490 chunks to shuffle and shard.
CHUNK_CHARS = 2048

MULTI30K_FILES = {"train": "train", "validation": "val", "test": "test_2016_flickr"}

_FIXED_SOURCE_SEED = 0


def _shuffle(ds: tf.data.Dataset, size: int, shuffle: bool, seed: Optional[int]):
  return ds.shuffle(size, seed=_FIXED_SOURCE_SEED if seed is None else seed) if shuffle else ds


def split_into_chunks(text: str, max_chars: int = CHUNK_CHARS) -> List[str]:
  """Consecutive runs of whole lines, each at most `max_chars` long (unless one line is longer)."""
  lines = [line + "\n" for line in text.split("\n")]
  lines[-1] = lines[-1][:-1]  # the text's own end has no newline to give back
  chunks, current, size = [], [], 0
  for line in lines:
    if current and size + len(line) > max_chars:
      chunks.append("".join(current))
      current, size = [], 0
    current.append(line)
    size += len(line)
  if size:
    chunks.append("".join(current))
  return chunks


def _prepare_hint(data_dir: str) -> str:
  return (f"Build it with `python -m moe_jax.data.prepare --data_dir {data_dir}` (it reads the "
          f"local text from ${paths.TINY_SHAKESPEARE_ENV} or ../shared/data), or point "
          f"${paths.TFDS_DIR_ENV} at a directory that holds it.")


def tiny_shakespeare_dir(data_dir: Optional[str] = None) -> str:
  """The prepared TFDS tiny_shakespeare version directory in `data_dir`, or a clear error."""
  data_dir = data_dir or paths.tfds_data_dir()
  infos = sorted(glob.glob(os.path.join(data_dir, TINY_SHAKESPEARE, "*", "dataset_info.json")))
  if not infos:
    raise FileNotFoundError(
        f"TFDS dataset '{TINY_SHAKESPEARE}' is not prepared in {data_dir!r} "
        f"(${paths.TFDS_DIR_ENV}). {_prepare_hint(data_dir)}")
  return os.path.dirname(infos[-1])


def load_tiny_shakespeare_text(split: str, data_dir: Optional[str] = None) -> str:
  """The whole text of one split of the TFDS dataset, built first if it is not there yet.

  Like `tfds.load(download=True)`, but from the local copy of the text when there is one; with
  neither a copy nor a network the build fails at once with what to do.
  """
  try:
    dataset_dir = tiny_shakespeare_dir(data_dir)
  except FileNotFoundError:
    from moe_jax.data import prepare  # pylint: disable=g-import-not-at-top  (imports this module)
    dataset_dir = prepare.prepare_tiny_shakespeare(data_dir)
  ds = tfds.builder_from_directory(dataset_dir).as_dataset(split=split)
  texts = [ex["text"].decode("utf-8") for ex in tfds.as_numpy(ds)]
  if not texts or not "".join(texts).strip():
    raise ValueError(f"TFDS '{TINY_SHAKESPEARE}' split {split!r} in {dataset_dir!r} is empty. "
                     f"Delete that directory and rebuild it. {_prepare_hint(data_dir or '')}")
  return "".join(texts)


def tiny_shakespeare_dataset(split: str, shuffle_files: bool,
                             seed: Optional[int] = None) -> tf.data.Dataset:
  """{"text": chunk} examples of one tiny Shakespeare split (see CHUNK_CHARS)."""
  chunks = split_into_chunks(load_tiny_shakespeare_text(split))
  ds = tf.data.Dataset.from_tensor_slices({"text": chunks})
  return _shuffle(ds, len(chunks), shuffle_files, seed)


def multi30k_files(split: str, data_dir: Optional[str] = None) -> tuple[str, str]:
  """(English, German) gzip files of a split, checked to exist, be non-empty and aligned."""
  data_dir = data_dir or paths.multi30k_dir()
  en, de = (os.path.join(data_dir, f"{MULTI30K_FILES[split]}.{lang}.gz") for lang in ("en", "de"))
  counts = []
  for path in (en, de):
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"Multi30k file not found: {path!r}. Set ${paths.MULTI30K_DIR_ENV} to the directory "
          "holding {train,val,test_2016_flickr}.{en,de}.gz (default ../shared/data/multi30k).")
    with gzip.open(path, "rt", encoding="utf-8") as f:
      counts.append(sum(1 for _ in f))
    if counts[-1] == 0:
      raise ValueError(f"Multi30k file is empty: {path!r}.")
  if counts[0] != counts[1]:
    raise ValueError(f"Multi30k files are not aligned: {en!r} has {counts[0]} lines, "
                     f"{de!r} has {counts[1]}.")
  return en, de


def multi30k_dataset(split: str, shuffle_files: bool,
                     seed: Optional[int] = None) -> tf.data.Dataset:
  """{"en", "de"} sentence pairs of one Multi30k split, in file order unless shuffled."""
  en, de = multi30k_files(split)
  lines = [tf.data.TextLineDataset(path, compression_type="GZIP") for path in (en, de)]
  ds = tf.data.Dataset.zip(*lines).map(lambda e, d: {"en": e, "de": d})
  # The whole train split (29k short pairs) fits in the buffer: a full shuffle.
  return _shuffle(ds, 32_768, shuffle_files, seed)


def tiny_shakespeare_source() -> seqio.DataSource:
  return seqio.FunctionDataSource(tiny_shakespeare_dataset, splits=SPLITS)


def multi30k_source() -> seqio.DataSource:
  return seqio.FunctionDataSource(multi30k_dataset, splits=SPLITS)
