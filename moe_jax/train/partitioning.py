"""Device mesh ("data", "expert", "model") and THE table of logical -> mesh axis rules.

GSPMD ("pjit") style: every parameter and large activation carries logical axis names; this
file alone maps them to mesh axes. Activation constraints only apply when BOTH a mesh is set
with `jax.set_mesh(mesh)` (the legacy `with Mesh(...)` context silently drops them) AND the
rules are active (`axis_rules()`: flax's `with_logical_constraint` is a no-op without rules).
The trainer traces its steps under both.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")

# The only mapping from logical axis names (on every parameter and large activation) to mesh
# axes. Expert devices do data parallelism for the dense layers (batch over data AND expert);
# experts themselves live on "expert", so GSPMD inserts the all-to-all in MoeLayer.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("expert", "expert"),
    ("expert_group", "data"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("length", None),
    ("unmodeled", None),
    ("relpos_buckets", None),
    # Scanned stacks' leading axis (moe_jax.models.scan): each device holds every layer.
    ("layers", None),
)


@contextlib.contextmanager
def axis_rules():
  """Makes every `nn.with_logical_constraint` traced inside use LOGICAL_AXIS_RULES.

  Together with `jax.set_mesh(mesh)` this is what turns the MoE layer's activation constraints
  into real sharding constraints (and the expert all-to-all); without a mesh they stay no-ops.
  """
  with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """(data, expert, model) with at most one -1 standing for the remaining devices."""
  shape = tuple(int(s) for s in mesh_shape)
  if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(f"MESH_SHAPE must be 3 positive sizes (data, expert, model), one of which "
                     f"may be -1, got {tuple(mesh_shape)}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"MESH_SHAPE {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"MESH_SHAPE {shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return shape


def make_mesh(mesh_shape: Sequence[int] = (1, -1, 1), devices=None) -> jax.sharding.Mesh:
  """A mesh with Auto axes (as GSPMD sharding needs) over the given devices, else all devices.

  A shape without -1 that needs fewer than all devices takes the first ones (with a warning):
  e.g. (1, 1, 1) runs on one device of a multi-device host.
  """
  if devices is None:
    devices = jax.devices()
    wanted = math.prod(int(s) for s in mesh_shape)
    if jax.process_count() == 1 and -1 not in tuple(mesh_shape) and 0 < wanted < len(devices):
      logging.warning("MESH_SHAPE %s uses %d of the %d devices", tuple(mesh_shape), wanted,
                      len(devices))
      devices = devices[:wanted]
  devices = list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_shardings(abstract_tree, mesh):
  """NamedShardings for a tree whose leaves may be boxed with logical axis names."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh) -> NamedSharding:
  """Examples split over ("data", "expert"); everything after the batch axis replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_network_fits_mesh(network: nn.Module, mesh, batch_size: int) -> None:
  """Clear errors for shapes the mesh cannot split, raised before any compilation."""
  # Local import: keeps this module free of model imports.
  from moe_jax.models.summary import moe_templates  # pylint: disable=g-import-not-at-top
  expert_devices = mesh.shape["expert"]
  for name, moe in moe_templates(network).items():
    if moe.num_experts % expert_devices:
      raise ValueError(f"{name.split('/')[0]} {type(moe).__name__}.num_experts={moe.num_experts} "
                       f"is not divisible by the mesh's expert axis ({expert_devices} devices); "
                       f"change MESH_SHAPE or NUM_EXPERTS")
  dp = data_parallel_size(mesh)
  if batch_size % dp:
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size "
                     f"{dp} (mesh data x expert = {mesh.shape['data']} x {expert_devices})")


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
