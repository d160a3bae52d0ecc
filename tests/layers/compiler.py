"""Markers for tests of the openblas kernel (moe_jax.layers.openblas_matmul).

It is built on first use with a C++ compiler; without one it cannot run (a build that fails
with a compiler present is a failure, not a skip).
"""

import contextlib
import os
import shutil

import pytest

from moe_jax.layers import openblas_matmul

HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None
NEEDS_COMPILER = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
OPENBLAS = pytest.param("openblas", marks=NEEDS_COMPILER)


@contextlib.contextmanager
def without_compiler(monkeypatch, tmp_path):
  """Inside, the kernel is as on a machine without a C++ compiler ("no-such-compiler++", nothing
  built in the empty cache `tmp_path`); after, as it was."""
  monkeypatch.setenv("CXX", "no-such-compiler++")
  monkeypatch.setenv("MOE_JAX_CACHE_DIR", str(tmp_path))
  openblas_matmul.unavailable_reason.cache_clear()
  try:
    yield
  finally:
    monkeypatch.undo()
    openblas_matmul.unavailable_reason.cache_clear()
