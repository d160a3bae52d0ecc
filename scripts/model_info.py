"""Describe a configured model without allocating it: `moe_jax.cli.model_info` (run with --help for the flags)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import cli  # noqa: E402

if __name__ == "__main__":
  cli.model_info()
