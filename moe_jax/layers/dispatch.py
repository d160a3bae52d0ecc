"""Dispatch / combine strategies: move tokens into expert buffers and expert outputs back.

Every backend consumes the same `RouterOutput` (buffer form) and gives the same result for the
same routing; they differ in cost:

  "einsum": GShard one-hot dispatch and combine tensors [G, S, E, C] (reference; O(G*S*E*C)).
  "gather": index the buffers directly (take / scatter-add; O(G*E*C*D), linear in tokens).

`dispatch` returns expert inputs x_EGCD; `combine` returns y_GSD. Empty slots contribute exactly
0, so a token that every chosen expert dropped gets exactly 0 (the residual carries it).

The experts' matmul over the buffers (`BUFFER_MATMULS`, `MoeLayer.buffer_matmul`): "xla", one
batched einsum over every slot, or "openblas" (CPU, one device; the default for gather there),
the native kernel of `moe_jax.layers.openblas_matmul` over each buffer's FILLED slots only
(`FilledSlots`): the capacity factor's empty slots cost no FLOPs. On a 2-core CPU (float32,
T=4096, d_model 512, d_ff 2048, top-1, capacity factor 1.25, forward + backward, against the
dense FFN) gather ran 0.98x / 1.16x / 1.79x at E = 8 / 32 / 128 with it and 1.23x / 1.36x /
2.45x with XLA's einsum.

"dropless" (`DROPLESS`, not in `BACKENDS`: it has no capacity and no buffers; MegaBlocks, Gale
et al. 2022, arXiv:2211.15841): every token's k (expert, gate) choices (`TokenChoices`) are
sorted by expert into R rows (`sort_choices` -> `SortedRows`), the experts run as ONE grouped
matmul over the rows (`grouped_matmul`), and each token's rows are gathered back and mixed with
its gates (`dropless_combine`). No token is dropped whatever the load. Grouped matmul:

  "ragged_dot" (TPU default): `jax.lax.ragged_dot` over the rows, each expert's a group.
  "openblas" (CPU default): an XLA FFI custom call (`moe_jax.layers.openblas_matmul`, compiled
    on first use) that runs single-threaded OpenBLAS sgemm on each expert's exact rows, in
    chunks shared by XLA's intra-op threads; forward, dx and dW alike. Where it cannot be built
    (no C++ compiler) the CPU default is "windows".
  "windows" (CPU, XLA ops only): rows unpadded; a `lax.scan` over the experts multiplies each
    expert's rows by its [I, O] kernel in windows of static power-of-two sizes (the largest
    first, each taken at most once by `lax.cond`: a binary decomposition of the expert's row
    count down to `block_size`, rounded up to a power of two), then one window of that size,
    masked, for the rest; a larger window, masked, ends the decomposition early where the rows
    left fill all but an eighth of it. So most rows go through a few large matmuls, and fewer
    than `block_size` rows, or an eighth of a finishing window, per expert are wasted. The
    VJP's dx is a scan of the same form; each expert's dW is ONE matmul over a masked window
    from static sizes growing by 1.25x (`lax.switch`), not a sum over its windows (each would
    read and write the [I, O] sum).
  "blocks" (GPU default): each expert's group is padded to a multiple of `block_size`
    rows (at most M + E*(block_size - 1) rows in all, M = G*S*K, a static bound), and a `lax.scan`
    over the blocks multiplies each by its expert's [I, O] kernel (a dynamic slice, never a
    gathered [blocks, I, O] copy); blocks past the last expert's are skipped (`lax.cond`). Its
    VJP is a scan of the same form (dW accumulates in place per block).

XLA:CPU lowers `ragged_dot` to a dense dot over every expert (E times the work), and a padded
[E, max_rows, D] buffer needs max_rows = M to be dropless. On a 2-core CPU (float32, T=4096,
d_model 512, d_ff 2048, top-1, forward + backward, against the dense FFN; benchmarks/RESULTS.md)
openblas ran 0.96x / 1.12x / 1.82x at E = 8 / 32 / 128, windows 1.09x / 1.34x / 2.4x (its
copies, masks and zero-fills: XLA ops cannot multiply a dynamic row range in place) and blocks
1.33x / 2.06x / 2.97x: blocks pads (on average half a block per expert) and reads and writes its
expert's whole dW slice for every block. (OpenBLAS's sgemm is also faster than XLA:CPU's dot
there: a dense FFN forward + backward in numpy took 282 ms against XLA's 341 ms.) On an H200
(jax 0.11.2, bf16, T=16384, d_model 768, d_ff 3072) `ragged_dot`'s temporaries grew with E as a
dense dot's would (2.4 / 19 / 38 GiB at E = 8 / 64 / 128) and it ran 10x / 71x / 143x the dense
FFN; blocks ran 32x / 43x (E = 8 / 64) in under 1 GiB (windows was not measured there): all are
far behind `gather` on GPU, the backend to use there.

Under a mesh, `moe_jax.layers.expert_parallel` runs the same steps per shard with explicit
`shard_map` + `all_to_all` communication (expert parallelism).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.layers import openblas_matmul
from moe_jax.layers.routing import RouterOutput, TokenChoices


def _dispatch_mask_GSEC(routing: RouterOutput, group_size: int):
  token_onehot_GECS = jax.nn.one_hot(routing.token_index_GEC, group_size, dtype=jnp.float32)
  return (token_onehot_GECS * routing.valid_GEC[..., None]).transpose(0, 3, 1, 2)


def einsum_dispatch(x_GSD, routing: RouterOutput):
  dispatch_GSEC = _dispatch_mask_GSEC(routing, x_GSD.shape[1]).astype(x_GSD.dtype)
  return jnp.einsum("GSEC,GSD->EGCD", dispatch_GSEC, x_GSD)


def einsum_combine(y_EGCD, routing: RouterOutput, group_size: int):
  dispatch_GSEC = _dispatch_mask_GSEC(routing, group_size)
  combine_GSEC = dispatch_GSEC * routing.combine_GEC[:, None, :, :]
  return jnp.einsum("GSEC,EGCD->GSD", combine_GSEC.astype(y_EGCD.dtype), y_EGCD)


def _slot_tokens_GEC(routing: RouterOutput, group_size: int):
  """Each slot's token, `group_size` (past the group) for empty slots: a gather fills them with
  0 (no separate select pass) and a scatter drops them (they never collide on token 0)."""
  return jnp.where(routing.valid_GEC, routing.token_index_GEC, group_size)


def gather_dispatch(x_GSD, routing: RouterOutput):
  take = lambda x_SD, idx_EC: jnp.take(x_SD, idx_EC, axis=0, mode="fill", fill_value=0)
  x_GECD = jax.vmap(take)(x_GSD, _slot_tokens_GEC(routing, x_GSD.shape[1]))
  return x_GECD.transpose(1, 0, 2, 3)


def gather_combine(y_EGCD, routing: RouterOutput, group_size: int):
  # An einsum, not `y * combine[..., None]`: the gate gradient is then a dot over D, where
  # XLA:CPU (jaxlib 0.10.2) reduces sum(a * b, -1) over a [1, E, C, D] array ~30x slower
  # (38 ms against 1.4 ms at E=8, C=640, D=512: the shape of one routing group).
  weighted_GECD = jnp.einsum("EGCD,GEC->GECD", y_EGCD,
                             routing.combine_GEC.astype(y_EGCD.dtype))

  def scatter_add(y_ECD, idx_EC):
    y_SD = jnp.zeros((group_size, y_ECD.shape[-1]), y_ECD.dtype)
    return y_SD.at[idx_EC.reshape(-1)].add(y_ECD.reshape(-1, y_ECD.shape[-1]), mode="drop")

  return jax.vmap(scatter_add)(weighted_GECD, _slot_tokens_GEC(routing, group_size))


# name -> (dispatch, combine)
BACKENDS = {
    "einsum": (einsum_dispatch, einsum_combine),
    "gather": (gather_dispatch, gather_combine),
}

# The experts' matmul over capacity buffers (dispatch "einsum" / "gather"): XLA's batched
# einsum over every slot, or the native kernel over the filled slots only (`FilledSlots`).
BUFFER_MATMULS = ("xla", "openblas")


def mesh_devices() -> int:
  """Devices of the active mesh (`jax.set_mesh`); 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else mesh.size


def default_buffer_matmul(dispatch: str) -> str:
  """openblas for gather on one CPU device where it can be built; xla otherwise, and always
  for einsum (the reference). GSPMD cannot partition the custom call over a mesh."""
  if (dispatch == "gather" and mesh_devices() == 1
      and openblas_matmul.unavailable_reason() is None):  # None only on CPU
    return "openblas"
  return "xla"


DROPLESS = "dropless"
GROUPED_MATMULS = ("ragged_dot", "openblas", "windows", "blocks")
UNPADDED = ("ragged_dot", "openblas")  # no block, no window: rows as sorted


def default_grouped_matmul() -> str:
  """ragged_dot on TPU (a grouped kernel there), openblas on CPU (windows where it cannot be
  built), blocks on GPU: the fastest of each platform's measured kernels (module docstring)."""
  backend = jax.default_backend()
  if backend == "cpu":
    return "windows" if openblas_matmul.unavailable_reason() else "openblas"
  return "ragged_dot" if backend == "tpu" else "blocks"


# `MoeLayer.dropless_block_size=None`: rows per block of blocks, of the smallest window of
# windows. Windows' is small: on a 2-core CPU (T=4096, d_model 512, d_ff 2048, top-1, forward +
# backward) the dropless layer ran 1.11x / 1.15x / 1.20x the dense FFN with 8 / 16 / 128 at E=8
# and 1.53x / 1.52x / 1.68x at E=32 (the masked last window wastes up to its size per expert,
# and at 128 that is a whole expert's share at E=32); 4 to 32 within noise at E=128.
DEFAULT_BLOCK_SIZES = {"blocks": 128, "windows": 8}


def dropless_block_size(num_choices: int, num_experts: int, max_block_size: int | None,
                        grouped_matmul: str) -> int:
  """Rows per block (blocks) or of the smallest window (windows): <= max_block_size (None:
  `DEFAULT_BLOCK_SIZES`), and no more than the power of two >= M / E, so that tiny layers do
  not pad every expert to a large block; 1 for the unpadded kernels."""
  if grouped_matmul in UNPADDED:
    return 1
  if max_block_size is None:
    max_block_size = DEFAULT_BLOCK_SIZES[grouped_matmul]
  return min(max_block_size, 1 << max(0, math.ceil(math.log2(max(1, num_choices / num_experts)))))


@struct.dataclass
class SortedRows:
  """Items (token choices) sorted by expert into R rows, each expert's padded to b rows for
  the blocks kernel (b = `block_size`; unpadded for the others, windows' smallest window b).

  token_R: [R] int32, the item's source row (a token of the G*S; with `per_item` > 1 choices
    of one token share it) for each row; the number of sources for padding rows.
  row_M: [M] int32, the row of each item (token-major choices); R for invalid items.
  expert_N: [N] int32, the expert of each block of b rows (blocks; of each row otherwise); E
    for blocks past the last.
  group_sizes_E: [E] int32, rows per expert (padding included; they sum to <= R).
  num_experts, block_size, grouped_matmul: static. row_axes: static, the mesh axes the rows
    are split over (expert parallelism, `moe_jax.layers.expert_parallel`): each shard's rows,
    experts and arrays are then its own, and `matmul` runs per shard; () on one device.
  """
  token_R: jax.Array
  row_M: jax.Array
  expert_N: jax.Array
  group_sizes_E: jax.Array
  num_experts: int = struct.field(pytree_node=False)
  block_size: int = struct.field(pytree_node=False)
  grouped_matmul: str = struct.field(pytree_node=False)
  row_axes: tuple = struct.field(pytree_node=False, default=())

  def matmul(self, x_RI, w_EIO, logical_axes_EIO=None):
    """Each row times its expert's kernel: y_RO[r] = x_RI[r] @ w_EIO[expert of r].

    With `row_axes`, per shard under `shard_map`: w's logical axes `logical_axes_EIO` say how
    it is sharded (its experts on the expert axis; a sharded I is summed over its axis, a
    sharded O stays split).
    """
    if not self.row_axes:
      return self._local_matmul(x_RI, w_EIO, self.expert_N, self.group_sizes_E)
    P = jax.sharding.PartitionSpec
    e_axis, i_axis, o_axis = nn.logical_to_mesh_axes(logical_axes_EIO)
    if i_axis is not None and jax.sharding.get_abstract_mesh().shape[i_axis] == 1:
      i_axis = None  # nothing to sum over

    def local(x_RI, w_EIO, expert_N, sizes_E):
      y_RO = self._local_matmul(x_RI, w_EIO, expert_N, sizes_E)
      return y_RO if i_axis is None else jax.lax.psum(y_RO, i_axis)

    rows = P(self.row_axes)
    return jax.shard_map(local, in_specs=(P(self.row_axes, i_axis), P(e_axis, i_axis, o_axis),
                                          rows, rows),
                         out_specs=P(self.row_axes, o_axis), check_vma=False)(
                             x_RI, w_EIO, self.expert_N, self.group_sizes_E)

  def _local_matmul(self, x_RI, w_EIO, expert_N, sizes_E):
    if self.grouped_matmul == "ragged_dot":
      return jax.lax.ragged_dot(x_RI, w_EIO, sizes_E)
    if self.grouped_matmul == "openblas":
      return openblas_matmul.grouped_matmul(x_RI, w_EIO, sizes_E)
    if self.grouped_matmul == "windows":
      return _window_matmul(x_RI, w_EIO, sizes_E, self.block_size)
    return _block_matmul(x_RI, w_EIO, expert_N)


@struct.dataclass
class FilledSlots:
  """Capacity buffers x_EGCD whose experts run over the FILLED slots only (`matmul`).

  extent_EG: [E, G] int32, one past the last filled slot of expert e's buffer in group g (0
  for none; routers fill slots in order, so this is the fill count). Every slot past it is
  empty (zeros in x), and its output is set to zeros, which is what the FFN gives an all-zero
  row (no biases, and every activation maps 0 to 0). The "openblas" buffer matmul (CPU, one
  device).
  """
  extent_EG: jax.Array

  @property
  def num_experts(self) -> int:
    return self.extent_EG.shape[0]

  def matmul(self, x_EGCI, w_EIO, logical_axes_EIO=None):
    """y_EGCO = x_EGCI @ w_EIO[e] over each buffer's filled slots, zeros past them."""
    del logical_axes_EIO  # one device: nothing is sharded
    num_experts, groups, capacity, in_dim = x_EGCI.shape
    y_RO = openblas_matmul.grouped_matmul(x_EGCI.reshape(-1, in_dim), w_EIO,
                                          self.extent_EG.reshape(-1), stride=capacity)
    return y_RO.reshape(num_experts, groups, capacity, -1)


def filled_slots(routing: RouterOutput) -> FilledSlots:
  """Each buffer's extent: one past its last valid slot (a hole before it is computed)."""
  capacity = routing.valid_GEC.shape[-1]
  slot_number = jnp.arange(1, capacity + 1, dtype=jnp.int32)
  extent_GE = jnp.max(jnp.where(routing.valid_GEC, slot_number, 0), axis=-1)
  return FilledSlots(extent_GE.T)


def sort_rows(expert_M, num_experts: int, block_size: int, grouped_matmul: str,
              per_item: int = 1) -> SortedRows:
  """Sorts M items by expert (stable: item order within an expert) into block-padded rows.

  expert_M: [M] int32, each item's expert; `num_experts` marks an invalid item (no row). Item
  m reads source row m // per_item (a token's k choices share its row of x).
  """
  if grouped_matmul not in GROUPED_MATMULS:
    raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMULS}, got {grouped_matmul!r}")
  num_items = expert_M.shape[0]
  pad = block_size if grouped_matmul == "blocks" else 1  # the others take unpadded rows
  # Every expert's group ends with < b padding rows: M + E*(b-1) rows is the static bound.
  num_blocks = -(-(num_items + num_experts * (pad - 1)) // pad)
  num_rows = num_blocks * pad
  counts_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
  sizes_E = -(-counts_E // pad) * pad
  ends_E = jnp.cumsum(sizes_E)
  order_M = jnp.argsort(expert_M, stable=True)
  sorted_expert_M = expert_M[order_M]
  in_range_M = sorted_expert_M < num_experts
  expert_or_0 = jnp.where(in_range_M, sorted_expert_M, 0)
  first_M = jnp.cumsum(counts_E)[expert_or_0] - counts_E[expert_or_0]  # expert's first item
  row = ends_E[expert_or_0] - sizes_E[expert_or_0] + jnp.arange(num_items) - first_M
  row_M = jnp.zeros((num_items,), jnp.int32).at[order_M].set(
      jnp.where(in_range_M, row, num_rows).astype(jnp.int32))
  token_R = jnp.full((num_rows,), num_items // per_item, jnp.int32).at[row_M].set(
      jnp.arange(num_items, dtype=jnp.int32) // per_item, mode="drop")
  expert_N = jnp.searchsorted(ends_E, jnp.arange(num_blocks) * pad, side="right")
  return SortedRows(token_R, row_M, expert_N.astype(jnp.int32), sizes_E, num_experts,
                    block_size, grouped_matmul)


def choice_experts(choices: TokenChoices, num_experts: int):
  """expert_M [G*S*K] (token-major), `num_experts` for invalid choices (sort_rows' input)."""
  return jnp.where(choices.valid_GSK, choices.expert_GSK, num_experts).reshape(-1)


def sort_choices(choices: TokenChoices, num_experts: int, block_size: int,
                 grouped_matmul: str) -> SortedRows:
  """Sorts the G*S*K choices by expert (stable: token order within an expert) into rows."""
  return sort_rows(choice_experts(choices, num_experts), num_experts, block_size,
                   grouped_matmul, per_item=choices.expert_GSK.shape[-1])


def dropless_dispatch(x_GSD, rows: SortedRows):
  """x_RD: each row's token (zeros in padding rows)."""
  x_TD = x_GSD.reshape(-1, x_GSD.shape[-1])
  return jnp.take(x_TD, rows.token_R, axis=0, mode="fill", fill_value=0)


def choice_outputs(y_RD, rows: SortedRows):
  """y_MD: each choice's row of expert output (zeros for invalid choices)."""
  return jnp.take(y_RD, rows.row_M, axis=0, mode="fill", fill_value=0)


def dropless_combine(y_MD, choices: TokenChoices):
  """y_GSD = sum_k gate_k * y[choice k]; invalid choices contribute exactly 0."""
  groups, group_size, k = choices.expert_GSK.shape
  y_GSKD = y_MD.reshape(groups, group_size, k, y_MD.shape[-1])
  gate_GSK = jnp.where(choices.valid_GSK, choices.gate_GSK, 0.0).astype(y_MD.dtype)
  return jnp.einsum("GSK,GSKD->GSD", gate_GSK, y_GSKD)


def _scan_blocks(x_NBI, expert_N, num_experts, block_fn, out_shape_BO, out_dtype):
  """[N, B, O]: block_fn(x_BI, e) for each block of an expert, zeros for blocks past the last."""
  def body(_, xs):
    x_BI, e = xs
    y_BO = jax.lax.cond(e < num_experts, lambda: block_fn(x_BI, e).astype(out_dtype),
                        lambda: jnp.zeros(out_shape_BO, out_dtype))
    return None, y_BO
  return jax.lax.scan(body, None, (x_NBI, expert_N))[1]


@jax.custom_vjp
def _block_matmul(x_RI, w_EIO, expert_N):
  return _block_matmul_fwd(x_RI, w_EIO, expert_N)[0]


def _block_matmul_fwd(x_RI, w_EIO, expert_N):
  num_experts, _, out_dim = w_EIO.shape
  x_NBI = x_RI.reshape(expert_N.shape[0], -1, x_RI.shape[-1])
  w_of = lambda e: jax.lax.dynamic_index_in_dim(w_EIO, e, keepdims=False)
  y_NBO = _scan_blocks(x_NBI, expert_N, num_experts, lambda x_BI, e: x_BI @ w_of(e),
                       (x_NBI.shape[1], out_dim), jnp.result_type(x_RI, w_EIO))
  return y_NBO.reshape(-1, out_dim), (x_RI, w_EIO, expert_N)


def _block_matmul_bwd(residuals, dy_RO):
  x_RI, w_EIO, expert_N = residuals
  num_experts, in_dim, _ = w_EIO.shape
  x_NBI = x_RI.reshape(expert_N.shape[0], -1, in_dim)
  dy_NBO = dy_RO.reshape(expert_N.shape[0], -1, dy_RO.shape[-1])
  w_of = lambda e: jax.lax.dynamic_index_in_dim(w_EIO, e, keepdims=False)
  dx_NBI = _scan_blocks(dy_NBO, expert_N, num_experts, lambda dy_BO, e: dy_BO @ w_of(e).T,
                        (x_NBI.shape[1], in_dim), x_RI.dtype)

  def accumulate(dw_EIO, xs):  # dW_e += x_b^T dy_b, in place in the loop carry
    x_BI, dy_BO, e = xs
    e = jnp.minimum(e, num_experts - 1)  # blocks past the last hold zero rows: adds 0
    dw_IO = jax.lax.dynamic_index_in_dim(dw_EIO, e, keepdims=False)
    dw_IO += jnp.matmul(x_BI.T, dy_BO, preferred_element_type=jnp.float32)
    return jax.lax.dynamic_update_index_in_dim(dw_EIO, dw_IO, e, 0), None

  # float32 sums over blocks, rounded once (as one bfloat16 dot accumulates).
  dw_EIO = jax.lax.scan(accumulate, jnp.zeros(w_EIO.shape, jnp.float32),
                        (x_NBI, dy_NBO, expert_N))[0]
  return dx_NBI.reshape(x_RI.shape), dw_EIO.astype(w_EIO.dtype), None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def _window_sizes(num_rows: int, min_window: int) -> list[int]:
  """The windows kernel's static window sizes, ascending: powers of two from the smallest
  >= min_window up to the largest <= num_rows (just [num_rows] if min_window >= num_rows)."""
  size = 1 << max(0, math.ceil(math.log2(max(1, min_window))))
  if size >= num_rows:
    return [num_rows]
  sizes = []
  while size <= num_rows:
    sizes.append(size)
    size *= 2
  return sizes


# A window of size s may also finish an expert whose remaining rows fill all but s / 8 of it
# (masked): fewer, larger matmuls (each window reads the expert's whole kernel) for at most that
# waste. A/B in one process on the 2-core CPU (benchmarks/RESULTS.md): the dropless layer went
# 1.127x -> 1.087x the dense FFN at E=8, 1.35 -> 1.32 at E=32, 1.06 -> 1.03 at E=8, k=2, for
# ~1.5 s more compile per layer; s / 16 was no better than s / 8. 0: no early finish.
FINISH_SLACK = 8


def _cover_expert(start, count, sizes, piece, carry):
  """Calls `carry = piece(carry, lo, size, keep)` for windows covering one expert's rows
  [start, start + count): the static `sizes` largest first, each taken (`lax.cond`) while it
  fits in what is left (a binary decomposition: each at most once, as count < 2 * sizes[-1]),
  or, where what is left fills all but size / FINISH_SLACK of it, as the last window; then the
  smallest size once more for the rest (< sizes[0] rows). A last window ends at the expert's
  last row: it reaches back over rows done already or before `start`, and `keep` [size, 1]
  marks the rows it owns (None for the exact windows)."""
  end = start + count

  def last(carry, offset, size):
    lo = jnp.maximum(end - size, 0)
    row = lo + jnp.arange(size)
    return piece(carry, lo, size, ((row >= offset) & (row < end))[:, None])

  offset, left = start, count
  for size in reversed(sizes):
    take = left >= size
    carry = jax.lax.cond(take, lambda c, lo=offset, n=size: piece(c, lo, n, None),
                         lambda c: c, carry)
    offset, left = offset + jnp.where(take, size, 0), left - jnp.where(take, size, 0)
    if FINISH_SLACK and size > sizes[0]:
      finish = (left > 0) & (size - left <= size // FINISH_SLACK)
      carry = jax.lax.cond(finish, lambda c, o=offset, n=size: last(c, o, n), lambda c: c, carry)
      left = jnp.where(finish, 0, left)
  return jax.lax.cond(left > 0, lambda c: last(c, offset, sizes[0]), lambda c: c, carry)


def _expert_starts(sizes_E):
  """Each expert's first row in the unpadded layout (its rows follow the previous expert's)."""
  return jnp.cumsum(sizes_E) - sizes_E


def _scan_experts(expert_fn, init, w_EIO, sizes_E, num_rows, min_window):
  """lax.scan of expert_fn(carry, w_IO, cover) over the experts, where `cover(piece, carry)`
  runs `_cover_expert` over that expert's rows of the unpadded layout."""
  sizes = _window_sizes(num_rows, min_window)

  def body(carry, xs):
    w_IO, start, count = xs
    return expert_fn(carry, w_IO, lambda piece, c: _cover_expert(start, count, sizes, piece, c))

  return jax.lax.scan(body, init, (w_EIO, _expert_starts(sizes_E), sizes_E))


def _rows(a, lo, size):
  return jax.lax.dynamic_slice_in_dim(a, lo, size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _window_matmul(x_RI, w_EIO, sizes_E, min_window):
  """The windows kernel: rows sorted by expert, unpadded (expert e's `sizes_E[e]` rows follow
  expert e-1's); a scan over experts multiplies each expert's rows by its kernel in a few
  windows of static power-of-two sizes (`_window_sizes`, `_cover_expert`), so most work is in
  large matmuls and fewer rows than the smallest window (`min_window` rounded up to a power of
  two), or an eighth of a finishing window, per expert are computed and masked away. Rows past
  the last expert's get zeros."""
  return _window_matmul_fwd(x_RI, w_EIO, sizes_E, min_window)[0]


def _window_matmul_fwd(x_RI, w_EIO, sizes_E, min_window):
  num_rows = x_RI.shape[0]
  out_dtype = jnp.result_type(x_RI, w_EIO)

  def expert(y_RO, w_IO, cover):
    def piece(y_RO, lo, size, keep):
      y_BO = (_rows(x_RI, lo, size) @ w_IO).astype(out_dtype)
      if keep is not None:
        y_BO = jnp.where(keep, y_BO, _rows(y_RO, lo, size))
      return jax.lax.dynamic_update_slice_in_dim(y_RO, y_BO, lo, 0)

    return cover(piece, y_RO), None

  y_RO = _scan_experts(expert, jnp.zeros((num_rows, w_EIO.shape[-1]), out_dtype), w_EIO,
                       sizes_E, num_rows, min_window)[0]
  return y_RO, (x_RI, w_EIO, sizes_E)


def _weight_window_sizes(num_rows: int, granule: int) -> list[int]:
  """The static sizes of the one window the windows kernel's dW takes per expert, ascending:
  multiples of `granule`, each the larger of (the last + granule) and (1.25x the last, rounded
  up to the granule), up to num_rows; so the window covering n rows has fewer than
  n / 4 + granule rows past them."""
  sizes = [min(granule, num_rows)]
  while sizes[-1] < num_rows:
    grown = -(-math.ceil(sizes[-1] * 1.25) // granule) * granule
    sizes.append(min(num_rows, max(sizes[-1] + granule, grown)))
  return sizes


def _expert_weight_grad(x_RI, dy_RO, start, count, sizes):
  """dW [I, O] float32 of the expert whose rows are [start, start + count): ONE matmul over the
  smallest window of `sizes` that holds them (`lax.switch`), the other rows of the narrower of
  x and dy masked to zero (the mask is a copy of that operand's window)."""
  num_rows = x_RI.shape[0]
  mask_x = x_RI.shape[1] <= dy_RO.shape[1]

  def window(size):
    def grad():
      lo = jnp.clip(start, 0, num_rows - size)
      row = lo + jnp.arange(size)
      keep = ((row >= start) & (row < start + count))[:, None]
      x_BI, dy_BO = _rows(x_RI, lo, size), _rows(dy_RO, lo, size)
      if mask_x:
        x_BI = jnp.where(keep, x_BI, 0)
      else:
        dy_BO = jnp.where(keep, dy_BO, 0)
      return jnp.matmul(x_BI.T, dy_BO, preferred_element_type=jnp.float32)
    return grad

  index = jnp.searchsorted(jnp.asarray(sizes), count, side="left")
  return jax.lax.switch(index, [window(size) for size in sizes])


def _window_matmul_bwd(min_window, residuals, dy_RO):
  x_RI, w_EIO, sizes_E = residuals

  def expert(dx_RI, w_IO, cover):  # dx by the forward's windows
    def piece(dx_RI, lo, size, keep):
      dx_BI = (_rows(dy_RO, lo, size) @ w_IO.T).astype(x_RI.dtype)
      if keep is not None:
        dx_BI = jnp.where(keep, dx_BI, _rows(dx_RI, lo, size))
      return jax.lax.dynamic_update_slice_in_dim(dx_RI, dx_BI, lo, 0)

    return cover(piece, dx_RI), None

  num_rows = x_RI.shape[0]
  dx_RI = _scan_experts(expert, jnp.zeros_like(x_RI), w_EIO, sizes_E, num_rows, min_window)[0]
  # dW in one matmul per expert, over up to a quarter more rows than the expert's: cheaper than
  # summing each window's partial dW into an [I, O] carry, which reads and writes the sum once
  # per window (the layer went 1.17x -> 1.13x the dense FFN at E=8, 1.59x -> 1.41x at E=32;
  # benchmarks/RESULTS.md).
  sizes = _weight_window_sizes(num_rows, _window_sizes(num_rows, min_window)[0])
  dw_EIO = jax.lax.map(lambda a: _expert_weight_grad(x_RI, dy_RO, *a, sizes),
                       (_expert_starts(sizes_E), sizes_E))
  return dx_RI, dw_EIO.astype(w_EIO.dtype), None


_window_matmul.defvjp(_window_matmul_fwd, _window_matmul_bwd)
