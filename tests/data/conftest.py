"""Fixtures of the data tests (tiny Shakespeare's `tfds_dir` is in tests/conftest.py)."""

import os

import pytest

from moe_jax.data import paths


@pytest.fixture(scope="session")
def multi30k_dir():
  data_dir = paths.multi30k_dir()
  if not os.path.exists(os.path.join(data_dir, "train.en.gz")):
    pytest.skip(f"no Multi30k files in {data_dir} (${paths.MULTI30K_DIR_ENV})")
  return data_dir
