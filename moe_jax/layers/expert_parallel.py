"""Dropless dispatch under a mesh: explicit `shard_map` + `all_to_all` expert parallelism.

The rows of a dropless layer (`moe_jax.layers.dispatch`) have a data-dependent layout that GSPMD
cannot place: each shard sorts its own tokens' choices, so this module does the communication
by hand (MegaBlocks, Gale et al. 2022, arXiv:2211.15841; GShard's all-to-all, Lepikhin et al.
2020, arXiv:2006.16668). Tokens are split over the mesh axes of the logical 'batch' axis (the
row axes), experts over the axis of 'expert' (p shards of E / p experts). Per shard:

  1. dispatch: its M = T * K choices go, grouped by the expert shard that owns their expert,
     into a send buffer [p, M] (chunk j for shard j: every choice could go to one shard, so
     each chunk holds M rows); one `all_to_all` over the expert axis exchanges the chunks and
     the local expert id of each row (E / p marks an empty slot).
  2. the p*M received rows are sorted by local expert (`sort_rows`)
     and the experts run as grouped matmuls on the shard's own experts (`SortedRows.matmul`
     under `shard_map`; a kernel dimension split over another axis ('model') is summed there).
  3. combine: each received row's output goes back by the inverse `all_to_all`, into the
     slot its choice was sent from, and the choices are mixed with their gates.

Send buffers are sized for the worst case (p*M rows per shard, of which M are real): XLA:CPU
has no `ragged_all_to_all`, and a smaller fixed size could drop tokens. Empty rows cost
communication and memory, not matmul work (the windows and blocks kernels skip rows past the
last expert's).
With one expert shard (data parallelism only) nothing is exchanged: each shard sorts its own.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.layers import dispatch as dispatch_lib


class Plan(NamedTuple):
  """Where dropless rows live: split over `row_axes`, experts over `expert_axis` (p shards)."""
  row_axes: tuple[str, ...]
  expert_axis: Optional[str]
  expert_shards: int


def mesh_axes(logical: str) -> tuple[str, ...]:
  """The mesh axes the active logical-axis rules map `logical` to; () without rules."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def plan(num_experts: int) -> Optional[Plan]:
  """The active mesh + logical-axis rules' layout for dropless rows; None off a mesh."""
  if dispatch_lib.mesh_devices() == 1:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  row_axes = mesh_axes("batch")
  if not row_axes:
    return None
  expert_axes = [a for a in mesh_axes("expert") if mesh.shape[a] > 1]
  if len(expert_axes) > 1 or (expert_axes and expert_axes[0] not in row_axes):
    raise ValueError(f"MoeLayer.dispatch='dropless' exchanges tokens over the expert mesh axis, "
                     f"which must be one of the token ('batch') axes {row_axes}: got experts "
                     f"on {tuple(expert_axes)}")
  expert_axis = expert_axes[0] if expert_axes else None
  shards = mesh.shape[expert_axis] if expert_axis else 1
  if num_experts % shards:
    raise ValueError(f"MoeLayer.num_experts={num_experts} is not divisible by the "
                     f"{shards} shards of mesh axis {expert_axis!r}")
  return Plan(row_axes, expert_axis, shards)


class Unsort(NamedTuple):
  """What combine needs: the row of each received item and the slot each choice was sent to."""
  row_A: jax.Array
  slot_M: jax.Array


def dispatch(x_TD, expert_M, *, k: int, num_experts: int, block_size: int, grouped_matmul: str,
             plan: Plan):
  """(x_RD rows on their expert's shard, `SortedRows` with `row_axes`, `Unsort`).

  x_TD: tokens [T, D] and expert_M: their choices [T*K] (token-major, `num_experts` where
  invalid), both split over `plan.row_axes`.
  """
  shards = plan.expert_shards
  local_experts = num_experts // shards

  def local(x_TD, expert_M):
    num_items = expert_M.shape[0]
    if shards == 1:  # data parallelism only: sort this shard's own choices
      rows = dispatch_lib.sort_rows(expert_M, num_experts, block_size, grouped_matmul, k)
      x_RD = jnp.take(x_TD, rows.token_R, axis=0, mode="fill", fill_value=0)
      return x_RD, rows, jnp.arange(num_items, dtype=jnp.int32)
    dest_M = expert_M // local_experts  # `shards` for invalid choices
    order_M = jnp.argsort(dest_M, stable=True)
    counts = jnp.bincount(dest_M, length=shards)
    sorted_dest = dest_M[order_M]
    first = (jnp.cumsum(counts) - counts)[jnp.minimum(sorted_dest, shards - 1)]
    slot = jnp.where(sorted_dest < shards,
                     sorted_dest * num_items + jnp.arange(num_items) - first, shards * num_items)
    slot_M = jnp.zeros((num_items,), jnp.int32).at[order_M].set(slot.astype(jnp.int32))
    send_token_A = jnp.full((shards * num_items,), x_TD.shape[0], jnp.int32).at[slot_M].set(
        jnp.arange(num_items, dtype=jnp.int32) // k, mode="drop")
    send_expert_A = jnp.full((shards * num_items,), local_experts, jnp.int32).at[slot_M].set(
        expert_M % local_experts, mode="drop")
    send_x_AD = jnp.take(x_TD, send_token_A, axis=0, mode="fill", fill_value=0)
    exchange = lambda v: jax.lax.all_to_all(
        v.reshape((shards, num_items) + v.shape[1:]), plan.expert_axis, 0, 0).reshape(v.shape)
    recv_x_AD, recv_expert_A = exchange(send_x_AD), exchange(send_expert_A)
    rows = dispatch_lib.sort_rows(recv_expert_A, local_experts, block_size, grouped_matmul)
    x_RD = jnp.take(recv_x_AD, rows.token_R, axis=0, mode="fill", fill_value=0)
    return x_RD, rows, slot_M

  split = P(plan.row_axes)
  x_RD, rows, slot_M = jax.shard_map(local, in_specs=(split, split), out_specs=split,
                                     check_vma=False)(x_TD, expert_M)
  rows = rows.replace(num_experts=num_experts, row_axes=plan.row_axes)
  return x_RD, rows, Unsort(rows.row_M, slot_M)


def combine(y_RD, unsort: Unsort, plan: Plan):
  """y_MD: each choice's expert output, back on its token's shard (zeros where invalid)."""
  shards = plan.expert_shards

  def local(y_RD, row_A, slot_M):
    y_AD = jnp.take(y_RD, row_A, axis=0, mode="fill", fill_value=0)
    if shards == 1:
      return y_AD
    num_items = slot_M.shape[0]
    y_AD = jax.lax.all_to_all(y_AD.reshape(shards, num_items, -1), plan.expert_axis, 0, 0)
    return jnp.take(y_AD.reshape(shards * num_items, -1), slot_M, axis=0, mode="fill",
                    fill_value=0)

  split = P(plan.row_axes)
  return jax.shard_map(local, in_specs=(split, split, split), out_specs=split,
                       check_vma=False)(y_RD, unsort.row_A, unsort.slot_M)
