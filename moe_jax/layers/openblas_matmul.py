"""The "openblas" grouped matmul (CPU): each expert's rows times its kernel, by OpenBLAS.

XLA:CPU has no grouped matmul, and its own ops cannot multiply a dynamic row range without
copies, masks or zero-fills (the "windows" kernel of `moe_jax.layers.dispatch` pays those). This
kernel is an XLA FFI custom call (`openblas_matmul.cc`) that calls single-threaded sgemm of
scipy-openblas64 (a dependency) on each expert's exact rows, split into chunks run by XLA's
intra-op thread pool, for the forward, dx and dW. Its rows come in segments: back to back for
dropless's sorted rows (`dispatch.SortedRows`), at a stride for gather's capacity buffers, of
which only the filled slots are multiplied (`dispatch.FilledSlots`). It is compiled on first
use with the C++ compiler `$CXX` (default g++) against jaxlib's FFI headers into a cache
directory (`$MOE_JAX_CACHE_DIR`, default ~/.cache/moe_jax), keyed by its source, the command
and jaxlib's version; `unavailable_reason()` says why it cannot be used (no compiler, a failed
build, not CPU), and the defaults then fall back to "windows" (dropless) and "xla" (gather).
float32 inside: other dtypes are cast.
First-order gradients only (the custom call has no derivative of its own); under `jax.vmap` it
runs once per mapped element.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "moe_jax_grouped_matmul"
SOURCE = pathlib.Path(__file__).with_name("openblas_matmul.cc")
FORWARD, INPUT_GRAD, WEIGHT_GRAD = 0, 1, 2  # the kernel's modes


def _cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / ".cache" / "moe_jax"
  return pathlib.Path(os.environ.get("MOE_JAX_CACHE_DIR") or default)


def _build() -> pathlib.Path:
  """The compiled kernel's path (built now unless cached); RuntimeError saying why not."""
  import scipy_openblas64  # pylint: disable=import-outside-toplevel
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX) to build {SOURCE.name}")
  lib_dir = scipy_openblas64.get_lib_dir()
  command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}",
             str(SOURCE), f"-L{lib_dir}", f"-l{scipy_openblas64.get_library()}",
             f"-Wl,-rpath,{lib_dir}"]
  key = hashlib.sha256("\0".join([SOURCE.read_text(), *command, jax.lib.__version__]).encode())
  path = _cache_dir() / f"openblas_matmul-{key.hexdigest()[:16]}.so"
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # concurrent builds: last one wins
    built = pathlib.Path(tmp) / path.name
    result = subprocess.run([*command, "-o", str(built)], capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(command)}):\n"
                         f"{result.stderr[-2000:]}")
    os.replace(built, path)
  return path


@functools.cache
def unavailable_reason() -> str | None:
  """None once the kernel is built and registered with XLA (once per process); otherwise why
  it cannot be (logged once)."""
  if jax.default_backend() != "cpu":
    return f"it runs on CPU only, and the default backend is {jax.default_backend()!r}"
  try:
    library = ctypes.CDLL(str(_build()))
  except (RuntimeError, OSError, ImportError) as e:
    logging.warning("moe_jax: the 'openblas' grouped matmul is unavailable (%s); on CPU "
                    "dropless layers use 'windows' and gather layers 'xla'", e)
    return str(e)
  _register(library)
  return None


@functools.cache
def _register(library):
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.MoeJaxGroupedMatmul),
                              platform="cpu")


def _call(mode: int, a, b, sizes_S, stride: int, out_shape):
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(a, b, sizes_S.astype(jnp.int32),
                                                    mode=np.int32(mode), stride=np.int64(stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(x_RI, w_EIO, sizes_S, stride):
  return _call(FORWARD, x_RI, w_EIO, sizes_S, stride, (x_RI.shape[0], w_EIO.shape[-1]))


def _grouped_matmul_fwd(x_RI, w_EIO, sizes_S, stride):
  return _grouped_matmul(x_RI, w_EIO, sizes_S, stride), (x_RI, w_EIO, sizes_S)


def _grouped_matmul_bwd(stride, residuals, dy_RO):
  x_RI, w_EIO, sizes_S = residuals
  dx_RI = _call(INPUT_GRAD, dy_RO, w_EIO, sizes_S, stride, x_RI.shape)
  dw_EIO = _call(WEIGHT_GRAD, x_RI, dy_RO, sizes_S, stride, w_EIO.shape)
  return dx_RI, dw_EIO, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(x_RI, w_EIO, sizes_S, stride: int = 0):
  """y_RO: each segment's rows times its expert's kernel, zeros in every other row.

  The R rows hold S = E * n segments, segment s of expert s // n (`sizes_S[s]` rows each).
  stride 0: back to back (rows sorted by expert, unpadded: expert e's rows follow expert
  e-1's). stride > 0: segment s starts at row s * stride and fills its first `sizes_S[s]`
  rows (capacity buffers [E, G, C] flattened: stride C, n = G). Differentiable in x and w;
  computed in float32, returned in their result type.
  """
  if sizes_S.shape[0] % w_EIO.shape[0]:
    raise ValueError(f"grouped_matmul: {sizes_S.shape[0]} segment sizes are not a multiple of "
                     f"the {w_EIO.shape[0]} experts")
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"grouped_matmul='openblas' is unavailable: {reason}")
  out_dtype = jnp.result_type(x_RI, w_EIO)
  y_RO = _grouped_matmul(x_RI.astype(jnp.float32), w_EIO.astype(jnp.float32), sizes_S, stride)
  return y_RO.astype(out_dtype)
