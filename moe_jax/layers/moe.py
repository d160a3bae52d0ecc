"""MoeLayer: group tokens -> route -> dispatch -> experts -> combine (GShard / Switch / flaxformer).

x_BLD -> x_GSD (G groups of S <= max_group_size tokens) -> RouterOutput (buffers [G, E, C])
-> x_EGCD (sharded on 'expert': the all-to-all) -> experts -> y_GSD -> y_BLD
(+ the shared experts' dense FFN of x_BLD, DeepSeekMoE).
With `dispatch="dropless"` the router's `TokenChoices` are sorted by expert instead of filling
capacity-bounded buffers (`dispatch.sort_choices`): no token is ever dropped.

Aux losses and routing metrics leave the layer through ONE mechanism: the layer sows its
`RouterStats` into the `MOE_STATS` collection; `moe_jax.objectives.moe_losses_and_metrics`
reduces that collection.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from moe_jax.layers import dispatch as dispatch_lib
from moe_jax.layers import expert_parallel
from moe_jax.layers import openblas_matmul
from moe_jax.layers import routing
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.experts import ExpertMlp

MOE_STATS = "moe_stats"


def num_groups(num_tokens: int, max_group_size: int, multiple: int = 1) -> int:
  """Fewest groups G, a multiple of `multiple` dividing num_tokens, with num_tokens / G <= max."""
  if num_tokens % multiple:
    multiple = 1  # cannot align groups with batch shards; routing stays correct, only slower
  groups = multiple * math.ceil(math.ceil(num_tokens / max_group_size) / multiple)
  while num_tokens % groups:
    groups += multiple
  return groups


def _batch_shards() -> int:
  """Devices the logical 'batch' axis is split over (groups must not straddle them).

  Read from the active logical-axis rules and mesh, so this layer names no mesh axis.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape.get(axis, 1) for axis in expert_parallel.mesh_axes("batch"))


@gin.configurable(module="moe_jax.layers.moe")
class MoeLayer(nn.Module):
  """Sparse MoE feed-forward layer; a drop-in for `MlpBlock` (same call signature).

  Tokens are routed in groups of at most `max_group_size` (the batch's tokens in row order),
  or, with `sequence_groups=True`, one group per sequence (row), as Hugging Face's
  SwitchTransformers routes. Capacity per expert per group comes from `routing.expert_capacity`
  with `train_capacity_factor` when `deterministic=False` and `eval_capacity_factor` otherwise,
  unless `expert_capacity` fixes it (capped at the group size).

  Decoding (`decode=True`, needs `sequence_groups`): the first call, on full-length [B, T]
  inputs, creates the "cache" collection's `expert_fill` [B, E], the slots each sequence's
  earlier tokens fill in each expert's buffer; later calls route one token per sequence into
  the slot it takes in the sequence's full group of T tokens (causal routing), with that group's
  capacity, so one-token steps equal the full-length layer.

  Shared experts (DeepSeekMoE, Dai et al. 2024, arXiv:2401.06066, sec. 3.2): with
  `num_shared_experts` = K_s > 0, every token also goes through K_s always-on experts with
  weight 1, added to the routed output. As in DeepSeek-V2/V3 they are ONE dense FFN of hidden
  size K_s * `expert.intermediate_dim` (params `shared_expert/wi[_i]/kernel` [D, K_s*F],
  `shared_expert/wo/kernel`, sharded like `MlpBlock`), with the experts' activations, dtype and
  dropout. A token every routed expert drops still gets it; padding tokens get it too (as from
  a dense FFN: only routing skips them); in decoding steps it is a per-token FFN.

  Dropless (`dispatch="dropless"`, MegaBlocks, Gale et al. 2022, arXiv:2211.15841; see
  `moe_jax.layers.dispatch`): tokens-choose routers only (called with `capacity=None` they
  return their `TokenChoices` unbuffered); capacity factors are not read and
  `fraction_dropped` is exactly 0. `grouped_matmul` ("ragged_dot" / "openblas" / "windows" /
  "blocks", None: by platform: ragged_dot on TPU, openblas on CPU (windows where it cannot be
  built; asking for it there is refused), blocks on GPU) and
  `dropless_block_size` (rows per block of blocks, of the smallest window of windows, unused by
  the others; None: 128 for blocks, 8 for windows, `dispatch.DEFAULT_BLOCK_SIZES`) choose the
  kernel.
  Decoding works as it is (no capacity, so each token's output is its own: causal by
  construction; no cache is kept). Under a mesh it is expert-parallel by explicit all-to-all
  (`moe_jax.layers.expert_parallel`).

  `buffer_matmul` (dispatch "einsum" / "gather"): "xla" multiplies every capacity slot in one
  batched einsum; "openblas" (CPU, one device) only each buffer's filled slots, by the native
  kernel (`dispatch.FilledSlots`): the same outputs and gradients. None: openblas for gather on
  one CPU device where the kernel can be built, xla otherwise and for the einsum reference.
  Asking for openblas where it cannot be built is refused here, on a mesh of several devices
  when the layer runs (GSPMD cannot partition the custom call).
  """
  num_experts: int = 8
  router: routing.Router = routing.SwitchRouter()
  expert: ExpertMlp = ExpertMlp()
  max_group_size: int = 4096
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  dispatch: str = "einsum"
  dtype: Any = jnp.float32
  sequence_groups: bool = False
  expert_capacity: Optional[int] = None
  num_shared_experts: int = 0
  grouped_matmul: Optional[str] = None
  buffer_matmul: Optional[str] = None
  dropless_block_size: Optional[int] = None

  def __post_init__(self):
    if self.num_experts < 1:
      raise ValueError(f"MoeLayer.num_experts must be >= 1, got {self.num_experts}")
    if self.num_shared_experts < 0:
      raise ValueError(f"MoeLayer.num_shared_experts must be >= 0, got {self.num_shared_experts}")
    if self.num_shared_experts and not all(
        hasattr(self.expert, f) for f in ("intermediate_dim", "activations",
                                          "intermediate_dropout_rate", "dtype")):
      raise ValueError(f"MoeLayer.num_shared_experts sizes the shared FFN from the expert's "
                       f"intermediate_dim, activations, intermediate_dropout_rate and dtype, "
                       f"which MoeLayer.expert={type(self.expert).__name__} lacks")
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      if getattr(self, name) <= 0:
        raise ValueError(f"MoeLayer.{name} must be > 0, got {getattr(self, name)}")
    if self.max_group_size < 1:
      raise ValueError(f"MoeLayer.max_group_size must be >= 1, got {self.max_group_size}")
    if self.expert_capacity is not None and self.expert_capacity < 1:
      raise ValueError(f"MoeLayer.expert_capacity must be >= 1 or None, got {self.expert_capacity}")
    if self.min_expert_capacity < 0:
      raise ValueError(f"MoeLayer.min_expert_capacity must be >= 0, got {self.min_expert_capacity}")
    names = sorted([*dispatch_lib.BACKENDS, dispatch_lib.DROPLESS])
    if self.dispatch not in names:
      raise ValueError(f"MoeLayer.dispatch must be one of {names}, got {self.dispatch!r}")
    if self.dispatch == dispatch_lib.DROPLESS and not isinstance(self.router,
                                                                 routing._TokensChoose):
      raise ValueError(f"MoeLayer.dispatch='dropless' needs a tokens-choose router (Switch, "
                       f"top-k, noisy, ...): {type(self.router).__name__} fills expert buffers "
                       f"of a fixed capacity by construction and has no dropless form")
    for name, kernels in (("grouped_matmul", dispatch_lib.GROUPED_MATMULS),
                          ("buffer_matmul", dispatch_lib.BUFFER_MATMULS)):
      kernel = getattr(self, name)
      if kernel not in (None, *kernels):
        raise ValueError(f"MoeLayer.{name} must be None or one of {kernels}, got {kernel!r}")
      if kernel == "openblas" and (why := openblas_matmul.unavailable_reason()):
        raise ValueError(f"MoeLayer.{name}='openblas' is unavailable here: {why}")
    if self.dropless_block_size is not None and self.dropless_block_size < 1:
      raise ValueError(f"MoeLayer.dropless_block_size must be >= 1 or None, got "
                       f"{self.dropless_block_size}")
    if self.router.k > self.num_experts:
      raise ValueError(f"{type(self.router).__name__}.k={self.router.k} exceeds "
                       f"MoeLayer.num_experts={self.num_experts}")
    super().__post_init__()

  def capacity(self, group_size: int, deterministic: bool) -> int:
    if self.expert_capacity is not None:
      return min(group_size, self.expert_capacity)
    factor = self.eval_capacity_factor if deterministic else self.train_capacity_factor
    return routing.expert_capacity(group_size, self.num_experts, self.router.k, factor,
                                   self.min_expert_capacity)

  @nn.compact
  def __call__(self, x_BLD, padding_mask_BL=None, deterministic: bool = True, *,
               decode: bool = False, max_decode_length: Optional[int] = None):
    batch, length, d_model = x_BLD.shape
    if decode and not self.sequence_groups:
      raise ValueError("MoeLayer decodes each sequence as its own routing group: set "
                       "sequence_groups=True (moe_jax.decoding does)")
    if self.sequence_groups:
      groups = batch
    else:
      groups = num_groups(batch * length, self.max_group_size, _batch_shards())
    group_size = batch * length // groups
    x_GSD = nn.with_logical_constraint(x_BLD.reshape(groups, group_size, d_model),
                                       ("batch", "unmodeled", "embed"))
    mask_GS = None if padding_mask_BL is None else padding_mask_BL.reshape(groups, group_size)
    if self.dispatch == dispatch_lib.DROPLESS:
      y_GSD = self._dropless(x_GSD, mask_GS, deterministic)
      return self._finish(y_GSD, x_BLD, deterministic)

    stepping = decode and self.has_variable("cache", "expert_fill")
    fill = (self.variable("cache", "expert_fill", jnp.zeros, (batch, self.num_experts), jnp.int32)
            if decode else None)
    if stepping:
      if max_decode_length is None:
        raise ValueError("MoeLayer decoding steps need max_decode_length (the group's length)")
      capacity = self.capacity(max_decode_length, deterministic)
    else:
      capacity = self.capacity(group_size, deterministic)
    routes = self.router(x_GSD, num_experts=self.num_experts, capacity=capacity,
                         padding_mask_GS=mask_GS, deterministic=deterministic,
                         expert_fill_GE=fill.value if stepping else None)
    self.sow(MOE_STATS, "router_stats", routes.stats)
    if stepping:
      # A step's group of one token fills at most one slot per expert, so the [E, C] buffers
      # collapse to one slot each: the same outputs for C times less expert work.
      kept_GE = jnp.sum(routes.valid_GEC, axis=-1, dtype=jnp.int32)
      fill.value = fill.value + kept_GE
      routes = routing.RouterOutput(
          jnp.zeros(kept_GE.shape + (1,), jnp.int32),
          jnp.sum(routes.combine_GEC, axis=-1, keepdims=True), kept_GE[..., None] > 0,
          routes.stats)

    dispatch, combine = dispatch_lib.BACKENDS[self.dispatch]
    local_axes = (None, "batch", None, "embed")  # the buffers of this shard's groups
    expert_axes = ("expert", "expert_group", "unmodeled", "embed")
    with jax.named_scope("dispatch"):  # names the ops in profiles (benchmarks/profile_layer.py)
      x_EGCD = nn.with_logical_constraint(dispatch(x_GSD.astype(self.dtype), routes),
                                          local_axes)
    # All-to-all: groups go from ('data', 'expert') shards to 'data' only, experts onto 'expert'.
    x_EGCD = nn.with_logical_constraint(x_EGCD, expert_axes)
    y_EGCD = nn.with_logical_constraint(self._buffer_experts(x_EGCD, routes, deterministic),
                                        expert_axes)
    # All-to-all back: experts leave 'expert', groups return to their batch shards; the
    # combine then runs on local data.
    y_EGCD = nn.with_logical_constraint(y_EGCD, local_axes)
    with jax.named_scope("combine"):
      y_GSD = nn.with_logical_constraint(combine(y_EGCD, routes, group_size),
                                         ("batch", "unmodeled", "embed"))
    return self._finish(y_GSD, x_BLD, deterministic)

  def _buffer_experts(self, x_EGCD, routes, deterministic):
    """y_EGCD: the experts over every slot (xla) or over the filled slots only (openblas)."""
    kernel = self.buffer_matmul or (dispatch_lib.default_buffer_matmul(self.dispatch)
                                    if isinstance(self.expert, ExpertMlp) else "xla")
    if kernel == "xla":
      return self.expert(x_EGCD, deterministic=deterministic)
    if (devices := dispatch_lib.mesh_devices()) > 1:
      raise ValueError(f"MoeLayer.buffer_matmul='openblas' runs on one device, but the mesh "
                       f"has {devices} (GSPMD cannot partition the custom call): use 'xla'")
    return self.expert(x_EGCD, deterministic=deterministic,
                       rows=dispatch_lib.filled_slots(routes))

  def _dropless(self, x_GSD, mask_GS, deterministic):
    """Routes every token to all its valid choices: sort by expert, grouped matmul, unsort.

    Under a mesh each shard sorts its own tokens and the rows move to their expert's shard by
    explicit all-to-all (`moe_jax.layers.expert_parallel`)."""
    routes = self.router(x_GSD, num_experts=self.num_experts, capacity=None,
                         padding_mask_GS=mask_GS, deterministic=deterministic)
    choices = routes.choices
    self.sow(MOE_STATS, "router_stats", routes.stats)
    kernel = self.grouped_matmul or dispatch_lib.default_grouped_matmul()
    x_GSD = x_GSD.astype(self.dtype)
    plan = expert_parallel.plan(self.num_experts)
    if plan is None:
      block = dispatch_lib.dropless_block_size(choices.expert_GSK.size, self.num_experts,
                                               self.dropless_block_size, kernel)
      with jax.named_scope("dispatch"):
        rows = dispatch_lib.sort_choices(choices, self.num_experts, block, kernel)
        x_RD = dispatch_lib.dropless_dispatch(x_GSD, rows)
      y_RD = self.expert(x_RD, deterministic=deterministic, rows=rows)
      with jax.named_scope("combine"):
        return dispatch_lib.dropless_combine(dispatch_lib.choice_outputs(y_RD, rows), choices)
    # A shard receives up to p * M_local rows for its E / p experts: M_local * p / E each.
    block = dispatch_lib.dropless_block_size(
        choices.expert_GSK.size // _batch_shards() * plan.expert_shards, self.num_experts,
        self.dropless_block_size, kernel)
    with jax.named_scope("dispatch"):
      x_RD, rows, unsort = expert_parallel.dispatch(
          x_GSD.reshape(-1, x_GSD.shape[-1]),
          dispatch_lib.choice_experts(choices, self.num_experts), k=choices.expert_GSK.shape[-1],
          num_experts=self.num_experts, block_size=block, grouped_matmul=kernel, plan=plan)
    y_RD = self.expert(x_RD, deterministic=deterministic, rows=rows)
    with jax.named_scope("combine"):
      return dispatch_lib.dropless_combine(expert_parallel.combine(y_RD, unsort, plan), choices)

  def _finish(self, y_GSD, x_BLD, deterministic):
    """y_BLD in x's dtype, plus the shared experts."""
    y_BLD = y_GSD.reshape(x_BLD.shape).astype(x_BLD.dtype)
    if self.num_shared_experts:  # K_s shared experts = one dense FFN of hidden K_s * F
      shared = MlpBlock(intermediate_dim=self.num_shared_experts * self.expert.intermediate_dim,
                        activations=self.expert.activations,
                        intermediate_dropout_rate=self.expert.intermediate_dropout_rate,
                        dtype=self.expert.dtype, name="shared_expert")
      y_BLD += shared(x_BLD, deterministic=deterministic).astype(x_BLD.dtype)
    return y_BLD
