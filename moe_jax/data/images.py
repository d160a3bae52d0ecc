"""Image classification tasks: 8-bit pixels as integer tokens, the label as one target token.

Every image task gives the encoder-decoder features that the trainer and evaluation already
read, so a classifier trains, evaluates and predicts through the same command lines as T5:

- "inputs" [H * W * C] int32: each pixel's 8-bit intensity (0..255) + 1, row-major over
  (H, W, C); 0 stays the padding token, never a pixel. Vocabulary `PassThroughVocabulary(257)`.
- "targets" [1] int32: label + 1 (0 is padding). Vocabulary `PassThroughVocabulary(classes + 1)`.
  No EOS on either: lengths are fixed, TASK_FEATURE_LENGTHS = {'inputs': H*W*C, 'targets': 1}.

`moe_jax.models.vision` classifiers rebuild the image from "inputs" and refuse any other length,
so packing (the trainer's default) can never put two images in one row: each fills its row.

Tasks (splits train / validation / test):
- `digits`: scikit-learn's bundled handwritten digits (UCI optdigits; Alpaydin & Kaynak 1998),
  1797 grey 8x8 images with intensities 0..16 (scaled to 0..255 as round(v * 255 / 16)),
  10 classes; no download. Split by ONE fixed permutation, `RandomState(0).permutation(1797)`:
  its first 1437 indices are train, the next 180 validation, the last 180 test.
- `cifar10`: TFDS `cifar10` (Krizhevsky 2009), 32x32x3, 10 classes; train = TFDS
  train[:45000], validation = train[45000:], test = TFDS test (10000). It needs the 170 MB
  archive: built on first use from `$MOE_JAX_CIFAR10` (a local cifar-10-binary.tar.gz) or
  downloaded; offline without the archive it fails at once saying what to do.
"""

import contextlib
import glob
import io
import os
import tempfile
from typing import Optional

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from moe_jax.data import paths

DIGITS = "digits"
CIFAR10 = "cifar10"
IMAGE_TASK_NAMES = (DIGITS, CIFAR10)
SPLITS = ("train", "validation", "test")
PIXEL_VOCAB_SIZE = 257  # 0 = padding, 1..256 = intensity 0..255

DIGITS_SHAPE, DIGITS_MAX_INTENSITY, DIGITS_CLASSES = (8, 8, 1), 16, 10
DIGITS_SPLIT_SIZES = {"train": 1437, "validation": 180, "test": 180}
DIGITS_SPLIT_SEED = 0

CIFAR10_SHAPE, CIFAR10_CLASSES = (32, 32, 3), 10
CIFAR10_SPLITS = {"train": "train[:45000]", "validation": "train[45000:]", "test": "test"}
CIFAR10_ENV = "MOE_JAX_CIFAR10"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
_CIFAR10_HOST = "www.cs.toronto.edu"
_CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"  # the name TFDS looks for in a manual dir

_FIXED_SOURCE_SEED = 0


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; image tasks have {SPLITS}")


def _examples(inputs_NP, labels_N, shuffle: bool, seed: Optional[int]) -> tf.data.Dataset:
  """{"inputs": pixels + 1, "targets": [label + 1]} per image, the split fully shuffled."""
  ds = tf.data.Dataset.from_tensor_slices({
      "inputs": np.asarray(inputs_NP, np.int32) + 1,
      "targets": np.asarray(labels_N, np.int32)[:, None] + 1})
  if shuffle:  # the same order in every process (seqio shards after the source)
    ds = ds.shuffle(len(labels_N), seed=_FIXED_SOURCE_SEED if seed is None else seed)
  return ds


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(intensities [N, 64] uint8 in 0..255, labels [N]) of one `digits` split (module doc)."""
  _check_split(split)
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top  (~1 s)
  digits = load_digits()
  order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(digits.target))
  start = 0
  for name in SPLITS:  # consecutive slices of the one permutation, in SPLITS order
    stop = start + DIGITS_SPLIT_SIZES[name]
    if name == split:
      index = order[start:stop]
      break
    start = stop
  pixels = np.rint(digits.data[index] * 255.0 / DIGITS_MAX_INTENSITY).astype(np.uint8)
  return pixels, digits.target[index]


def digits_dataset(split: str, shuffle_files: bool, seed: Optional[int] = None):
  return _examples(*digits_arrays(split), shuffle_files, seed)


def cifar10_dir(data_dir: Optional[str] = None) -> str:
  """The prepared TFDS cifar10 version directory in `data_dir`, or FileNotFoundError."""
  data_dir = data_dir or paths.tfds_data_dir()
  infos = sorted(glob.glob(os.path.join(data_dir, CIFAR10, "*", "dataset_info.json")))
  if not infos:
    raise FileNotFoundError(f"TFDS dataset '{CIFAR10}' is not prepared in {data_dir!r}")
  return os.path.dirname(infos[-1])


def prepare_cifar10(data_dir: Optional[str] = None, archive: Optional[str] = None) -> str:
  """Builds TFDS cifar10 into `data_dir` (default $MOE_JAX_TFDS_DIR) if needed; its directory.

  archive: a local cifar-10-binary.tar.gz (default $MOE_JAX_CIFAR10); without one TFDS
  downloads it, and with no network we fail at once rather than after TFDS's retries.
  """
  from moe_jax.data import prepare  # pylint: disable=g-import-not-at-top  (imports TFDS builders)
  data_dir = data_dir or paths.tfds_data_dir()
  with contextlib.suppress(FileNotFoundError):
    return cifar10_dir(data_dir)
  archive = archive or os.environ.get(CIFAR10_ENV)
  builder = tfds.builder(CIFAR10, data_dir=data_dir)
  tfds.disable_progress_bar()
  if archive is None:
    if not prepare._online(_CIFAR10_HOST):  # pylint: disable=protected-access
      raise prepare.OfflineError(
          f"Cannot build TFDS '{CIFAR10}' in {data_dir!r}: it is not prepared there and "
          f"{_CIFAR10_HOST} is unreachable. Download {CIFAR10_URL} elsewhere and set "
          f"${CIFAR10_ENV} to the file, or point ${paths.TFDS_DIR_ENV} at a TFDS directory "
          f"that holds '{CIFAR10}'.")
    logging.info("TFDS '%s' is not in %s: downloading and building it.", CIFAR10, data_dir)
    builder.download_and_prepare()
    return cifar10_dir(data_dir)
  if not os.path.isfile(archive):
    raise FileNotFoundError(f"${CIFAR10_ENV}: CIFAR-10 archive not found: {archive!r}")
  logging.info("TFDS '%s' is not in %s: building it from %s.", CIFAR10, data_dir, archive)
  with tempfile.TemporaryDirectory(prefix="cifar10_manual_") as manual_dir, \
      contextlib.redirect_stdout(io.StringIO()):
    # TFDS takes a file named like the download from manual_dir (and checks its sha256).
    os.symlink(os.path.abspath(archive), os.path.join(manual_dir, _CIFAR10_ARCHIVE))
    builder.download_and_prepare(
        download_dir=os.path.join(manual_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return cifar10_dir(data_dir)


def cifar10_dataset(split: str, shuffle_files: bool, seed: Optional[int] = None):
  _check_split(split)
  ds = tfds.builder_from_directory(prepare_cifar10()).as_dataset(split=CIFAR10_SPLITS[split])
  flat = lambda ex: {"inputs": tf.cast(tf.reshape(ex["image"], [-1]), tf.int32) + 1,
                     "targets": tf.cast(ex["label"], tf.int32)[None] + 1}
  if shuffle_files:  # the whole train split in the buffer: a full shuffle
    ds = ds.shuffle(50_000, seed=_FIXED_SOURCE_SEED if seed is None else seed)
  return ds.map(flat, num_parallel_calls=tf.data.AUTOTUNE)


def _features(num_classes: int) -> dict:
  return {"inputs": seqio.Feature(seqio.PassThroughVocabulary(PIXEL_VOCAB_SIZE), add_eos=False),
          "targets": seqio.Feature(seqio.PassThroughVocabulary(num_classes + 1), add_eos=False)}


def image_tasks() -> dict[str, dict]:
  """{task name: seqio.TaskRegistry.add kwargs} of the image tasks (registered by tasks.py)."""
  return {
      DIGITS: dict(source=seqio.FunctionDataSource(digits_dataset, splits=SPLITS,
                                                   num_input_examples=DIGITS_SPLIT_SIZES),
                   output_features=_features(DIGITS_CLASSES), preprocessors=[], metric_fns=[]),
      CIFAR10: dict(source=seqio.FunctionDataSource(cifar10_dataset, splits=SPLITS),
                    output_features=_features(CIFAR10_CLASSES), preprocessors=[],
                    metric_fns=[]),
  }
