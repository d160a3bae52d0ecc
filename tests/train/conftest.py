"""Fixtures of the training tests (tiny Shakespeare's `tfds_dir` is in tests/conftest.py): a
per-session persistent compilation cache (identical programs compile once per session), and the
baseline run several tests compare against."""


import jax
import pytest

from tests.train import tiny

BASELINE_STEPS = 10


CACHE_OPTIONS = {"jax_compilation_cache_dir": "JAX_COMPILATION_CACHE_DIR",
                 "jax_persistent_cache_min_compile_time_secs":
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "jax_persistent_cache_min_entry_size_bytes":
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """Caches every compiled program of this session (also for subprocesses, via the env).

  Only a speed-up: without jax's (private) cache reset the tests run uncached.
  """
  try:
    from jax._src import compilation_cache as cc  # pylint: disable=g-import-not-at-top
    cc.reset_cache  # pylint: disable=pointless-statement
  except (ImportError, AttributeError):
    yield None
    return
  values = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
            "jax_persistent_cache_min_compile_time_secs": 0,
            "jax_persistent_cache_min_entry_size_bytes": 0}
  old = {name: getattr(jax.config, name) for name in values}
  with pytest.MonkeyPatch.context() as mp:
    for name, value in values.items():
      jax.config.update(name, value)
      mp.setenv(CACHE_OPTIONS[name], str(value))
    cc.reset_cache()  # the cache is set up once per process: make it see the new dir
    yield values["jax_compilation_cache_dir"]
    for name, value in old.items():
      jax.config.update(name, value)
    cc.reset_cache()


@pytest.fixture(scope="session")
def baseline_dir(tmp_path_factory, tfds_dir):
  """MODEL_DIR of a straight BASELINE_STEPS-step run on one device (checkpoints at 5 and 10,
  an evaluation of 2 validation batches at the end)."""
  del tfds_dir
  model_dir = tmp_path_factory.mktemp("baseline")
  tiny.train(model_dir, BASELINE_STEPS, mesh_shape=(1, 1, 1), eval_period=BASELINE_STEPS,
             eval_steps=2)
  return str(model_dir)
