"""Where the data lives: environment variables with offline-friendly defaults.

Every path is resolved when a dataset is built (not when tasks are registered), so setting
an environment variable after `import moe_jax.data` still takes effect.

| variable | default |
|---|---|
| `MOE_JAX_TFDS_DIR` | `~/tensorflow_datasets` |
| `MOE_JAX_TINY_SHAKESPEARE` | `<repo>/../shared/data/tinyshakespeare.txt` if it exists |
| `MOE_JAX_MULTI30K_DIR` | `<repo>/../shared/data/multi30k` |
"""

import os
import pathlib
from typing import Optional

TFDS_DIR_ENV = "MOE_JAX_TFDS_DIR"
TINY_SHAKESPEARE_ENV = "MOE_JAX_TINY_SHAKESPEARE"
MULTI30K_DIR_ENV = "MOE_JAX_MULTI30K_DIR"

# <repo>/moe_jax/data/paths.py -> <repo>/../shared/data (the project's offline corpora).
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def tfds_data_dir() -> str:
  """TFDS data directory: `$MOE_JAX_TFDS_DIR`, else `~/tensorflow_datasets`."""
  path = os.environ.get(TFDS_DIR_ENV) or "~/tensorflow_datasets"
  return os.path.expanduser(path)


def tiny_shakespeare_source() -> Optional[str]:
  """Local copy of the tiny Shakespeare text, or None if there is none."""
  path = os.environ.get(TINY_SHAKESPEARE_ENV)
  if path:
    return os.path.expanduser(path)
  default = SHARED_DATA_DIR / "tinyshakespeare.txt"
  return str(default) if default.exists() else None


def multi30k_dir() -> str:
  """Directory holding Multi30k `{train,val,test_2016_flickr}.{en,de}.gz`."""
  path = os.environ.get(MULTI30K_DIR_ENV)
  return os.path.expanduser(path) if path else str(SHARED_DATA_DIR / "multi30k")
