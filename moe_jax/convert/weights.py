"""Tensors of a transformers checkpoint directory, read one at a time, as float32 numpy.

Formats, in order of preference: `model.safetensors`, `model.safetensors.index.json` (shards),
`pytorch_model.bin`, `pytorch_model.bin.index.json`. safetensors are read without torch
(`safetensors` numpy API, bfloat16 through ml_dtypes); `.bin` files need torch, imported only
then. Tensors are read lazily, so converting holds about one copy of the model in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Iterator

import numpy as np

_SAFETENSORS = "model.safetensors"
_TORCH = "pytorch_model.bin"


class Reader:
  """Name -> tensor, tracking which names were taken so leftovers can be reported."""

  def __init__(self, source: str, loaders: dict[str, Callable[[], np.ndarray]]):
    self.source = source
    self._loaders = loaders
    self._used: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self._loaders

  def names(self) -> list[str]:
    return sorted(self._loaders)

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor `name` as float32, checked to have `shape`."""
    if name not in self._loaders:
      raise ValueError(f"{self.source}: missing tensor {name!r} (the config implies it; is the "
                       f"config.json the one these weights were saved with?)")
    value = self._loaders[name]()
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"{self.source}: tensor {name!r} has shape {tuple(value.shape)}, expected "
                       f"{tuple(shape)} from config.json")
    self._used.add(name)
    return np.asarray(value, np.float32)

  def check_all_used(self) -> None:
    unused = sorted(set(self._loaders) - self._used)
    if unused:
      raise ValueError(f"{self.source}: {len(unused)} tensor(s) the converter does not map, e.g. "
                       f"{unused[:5]}; refusing to drop weights silently")


def _shards(path: str, index_name: str) -> list[str]:
  index_path = os.path.join(path, index_name)
  with open(index_path) as f:
    try:
      weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_path}: not a transformers index (needs a 'weight_map'): "
                       f"{e}") from None
  files = sorted(set(weight_map.values()))
  missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise FileNotFoundError(f"{index_path} names shard(s) that are not there: {missing}")
  return [os.path.join(path, f) for f in files]


def _safetensors_loaders(files: list[str], stack: contextlib.ExitStack) -> dict:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  loaders = {}
  for file in files:
    handle = stack.enter_context(safe_open(file, framework="numpy"))
    for name in handle.keys():
      if name in loaders:
        raise ValueError(f"tensor {name!r} appears in more than one shard ({file})")
      loaders[name] = lambda h=handle, n=name: h.get_tensor(n)
  return loaders


def _torch_loaders(files: list[str]) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{files[0]} is a PyTorch pickle and reading it needs torch: "
                      f"`pip install torch` (the CPU wheel is enough), or save the checkpoint "
                      f"with safetensors (`save_pretrained(..., safe_serialization=True)`)") from None
  loaders = {}
  for file in files:
    # mmap: tensors stay on disk until taken; weights_only: no arbitrary code from the pickle.
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    for name, tensor in state.items():
      if name in loaders:
        raise ValueError(f"tensor {name!r} appears in more than one shard ({file})")
      # numpy has no bfloat16: widen first (exact), the Reader makes everything float32 anyway.
      loaders[name] = lambda t=tensor: t.detach().to(torch.float32).numpy()
  return loaders


@contextlib.contextmanager
def open_weights(path: str) -> Iterator[Reader]:
  """A Reader over the weights in checkpoint directory `path` (see the module docstring)."""
  candidates = [(_SAFETENSORS, False), (_SAFETENSORS + ".index.json", True),
                (_TORCH, False), (_TORCH + ".index.json", True)]
  for name, sharded in candidates:
    if os.path.isfile(os.path.join(path, name)):
      break
  else:
    raise FileNotFoundError(f"no weights in {path!r}: expected one of "
                            f"{[n for n, _ in candidates]}")
  files = _shards(path, name) if sharded else [os.path.join(path, name)]
  with contextlib.ExitStack() as stack:
    if name.startswith(_SAFETENSORS):
      loaders = _safetensors_loaders(files, stack)
    else:
      loaders = _torch_loaders(files)
    yield Reader(os.path.join(path, name), loaders)
