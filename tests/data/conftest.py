"""Fixtures of the data tests: tiny Shakespeare built once per session into a temp TFDS dir."""

import os

import pytest

from moe_jax.data import paths


@pytest.fixture(scope="session")
def tiny_shakespeare_source():
  source = paths.tiny_shakespeare_source()
  if source is None or not os.path.exists(source):
    pytest.skip(f"no local tiny Shakespeare text (${paths.TINY_SHAKESPEARE_ENV} or "
                f"{paths.SHARED_DATA_DIR})")
  return source


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory, tiny_shakespeare_source):
  """A TFDS data dir holding tiny_shakespeare, set as $MOE_JAX_TFDS_DIR for the session."""
  from moe_jax.data.prepare import prepare_tiny_shakespeare  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prepare_tiny_shakespeare(data_dir, tiny_shakespeare_source)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(paths.TFDS_DIR_ENV, data_dir)
    yield data_dir


@pytest.fixture(scope="session")
def multi30k_dir():
  data_dir = paths.multi30k_dir()
  if not os.path.exists(os.path.join(data_dir, "train.en.gz")):
    pytest.skip(f"no Multi30k files in {data_dir} (${paths.MULTI30K_DIR_ENV})")
  return data_dir
