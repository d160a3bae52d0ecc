"""Builds the TFDS datasets our tasks read, offline from a local copy when there is one.

    python -m moe_jax.data.prepare [--data_dir DIR] [--source_file tinyshakespeare.txt]

TFDS `tiny_shakespeare` normally downloads karpathy/char-rnn's input.txt; given the same file
locally, TFDS builds from it as a "manual" download (it still checks the file's sha256).
"""

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import socket
import tempfile
from typing import Optional

import tensorflow_datasets as tfds
from absl import logging

from moe_jax.data import paths, sources

_DOWNLOAD_HOST = "raw.githubusercontent.com"
# Checked before TFDS (which checks it too) so that a wrong file gets a plain message.
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class OfflineError(RuntimeError):
  """A dataset that is neither prepared nor buildable without the network."""


def _online(host: str = _DOWNLOAD_HOST, timeout_s: float = 3.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout_s).close()
    return True
  except OSError:
    return False


def prepare_tiny_shakespeare(data_dir: Optional[str] = None,
                             source_file: Optional[str] = None) -> str:
  """Builds TFDS tiny_shakespeare into `data_dir` and returns its version directory.

  data_dir: default `$MOE_JAX_TFDS_DIR` or ~/tensorflow_datasets.
  source_file: the text; default `$MOE_JAX_TINY_SHAKESPEARE` or ../shared/data's copy. Without
    one, TFDS downloads it (and we fail at once, not after TFDS's minutes of retries, when
    there is no network). Does nothing when the dataset is already there.
  """
  data_dir = data_dir or paths.tfds_data_dir()
  try:
    return sources.tiny_shakespeare_dir(data_dir)
  except FileNotFoundError:
    pass
  source_file = source_file or paths.tiny_shakespeare_source()
  tfds.disable_progress_bar()  # a build takes a second; our log lines say what happens
  builder = tfds.builder(sources.TINY_SHAKESPEARE, data_dir=data_dir)
  if source_file is None:
    if not _online():
      raise OfflineError(
          f"Cannot build TFDS '{sources.TINY_SHAKESPEARE}' in {data_dir!r}: no local text and "
          f"no network ({_DOWNLOAD_HOST} unreachable). Pass source_file= (--source_file) or set "
          f"${paths.TINY_SHAKESPEARE_ENV} to a copy of karpathy/char-rnn's "
          "data/tinyshakespeare/input.txt.")
    logging.info("TFDS '%s' is not in %s: downloading and building it.",
                 sources.TINY_SHAKESPEARE, data_dir)
    builder.download_and_prepare()
    return sources.tiny_shakespeare_dir(data_dir)
  if not os.path.isfile(source_file):
    raise FileNotFoundError(f"tiny Shakespeare source file not found: {source_file!r}")
  with open(source_file, "rb") as f:
    if hashlib.sha256(f.read()).hexdigest() != TINY_SHAKESPEARE_SHA256:
      raise ValueError(
          f"{source_file!r} is not the text TFDS tiny_shakespeare is built from (karpathy/"
          "char-rnn data/tinyshakespeare/input.txt, 1115394 bytes): its sha256 differs.")
  logging.info("TFDS '%s' is not in %s: building it from the local copy %s.",
               sources.TINY_SHAKESPEARE, data_dir, source_file)
  # TFDS prints "Downloading and preparing dataset ..." even for a local file; ours say what
  # happens.
  with tempfile.TemporaryDirectory(prefix="tiny_shakespeare_manual_") as manual_dir, \
      contextlib.redirect_stdout(io.StringIO()):
    # TFDS looks for the download's file name (input.txt) in manual_dir.
    shutil.copyfile(source_file, os.path.join(manual_dir, "input.txt"))
    builder.download_and_prepare(
        download_dir=os.path.join(manual_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  version_dir = sources.tiny_shakespeare_dir(data_dir)
  logging.info("Built TFDS '%s' in %s.", sources.TINY_SHAKESPEARE, version_dir)
  return version_dir


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=None, help=f"TFDS data dir (default "
                      f"${paths.TFDS_DIR_ENV} or ~/tensorflow_datasets)")
  parser.add_argument("--source_file", default=None,
                      help=f"local tinyshakespeare.txt (default ${paths.TINY_SHAKESPEARE_ENV} "
                      "or ../shared/data/tinyshakespeare.txt)")
  args = parser.parse_args(argv)
  from moe_jax import cli  # pylint: disable=g-import-not-at-top
  cli.setup_console()  # our INFO lines on stderr
  print(prepare_tiny_shakespeare(args.data_dir, args.source_file))


if __name__ == "__main__":
  main()
