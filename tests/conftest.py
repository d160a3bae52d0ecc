"""Test setup: 8 simulated CPU devices and fast XLA compilation (must precede the first jax
import), gin isolation."""

import os

# Test programs are tiny, so XLA:CPU's compile time dominates their run time. Skipping LLVM's
# optimisation passes and the MLIR fusion emitters (the classic elemental emitter instead) cuts
# it to about a third; fast-math stays off. Flags of the pinned jaxlib (setup.py): an unknown
# flag aborts every test, so re-check them when jaxlib changes.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true",
                      "--xla_cpu_use_fusion_emitters=false")


def xla_flags(device_count: int) -> str:
  """XLA_FLAGS for a subprocess: `device_count` simulated CPU devices, fast compilation."""
  return " ".join((f"--xla_force_host_platform_device_count={device_count}",
                   *FAST_COMPILE_FLAGS))


for _flag in ("--xla_force_host_platform_device_count=8", *FAST_COMPILE_FLAGS):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import gin  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(autouse=True)
def _clear_gin():
  """Every test starts and ends with an empty gin config."""
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def tiny_shakespeare_source():
  from moe_jax.data import paths  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  source = paths.tiny_shakespeare_source()
  if source is None or not os.path.exists(source):
    pytest.skip(f"no local tiny Shakespeare text (${paths.TINY_SHAKESPEARE_ENV} or "
                f"{paths.SHARED_DATA_DIR})")
  return source


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory, tiny_shakespeare_source):
  """A TFDS data dir holding tiny_shakespeare, set as $MOE_JAX_TFDS_DIR for the session."""
  from moe_jax.data import paths  # pylint: disable=g-import-not-at-top
  from moe_jax.data.prepare import prepare_tiny_shakespeare  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prepare_tiny_shakespeare(data_dir, tiny_shakespeare_source)
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(paths.TFDS_DIR_ENV, data_dir)
    yield data_dir
