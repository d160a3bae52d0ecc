"""Markers for tests of the openblas kernel (moe_jax.layers.openblas_matmul).

It is built on first use with a C++ compiler; without one it cannot run (a build that fails
with a compiler present is a failure, not a skip).
"""

import os
import shutil

import pytest

HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None
NEEDS_COMPILER = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
OPENBLAS = pytest.param("openblas", marks=NEEDS_COMPILER)
