"""TrainState and the pure steps: `train_step(state, batch, rng) -> (state, metrics)`,
`eval_step`, and the state's creation and shardings (from the logical-axis rules).

Nothing here touches the host: the loop (moe_jax.train.trainer) jits these once with explicit
in/out shardings and donates the old state.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import objectives
from moe_jax.layers import score_routing
from moe_jax.layers.routing import ROUTING_RNG
from moe_jax.models.summary import abstract_variables
from moe_jax.train import partitioning


@struct.dataclass
class TrainState:
  """`model_state`: the network's non-param collections (`objectives.STATE_COLLECTIONS`, e.g.
  aux-loss-free routers' biases), updated outside the optimizer; {} for most models."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any = struct.field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Pure steps.


def loss_and_grads(params, batch: Mapping[str, jax.Array], rngs: Mapping[str, jax.Array], *,
                   network: nn.Module, model_state=None, logit_z_loss: float = 0.0,
                   num_microbatches: int = 1, loss_fn: Callable = objectives.compute_loss):
  """(loss terms, grads, router load) of a batch, over `num_microbatches` slices of it in turn.

  `loss_fn`: `objectives.compute_loss` or one with its signature (distillation's,
  moe_jax.train.distill), called on each microbatch.

  Gradient accumulation: each microbatch's gradient is weighted by its share of the batch's
  loss tokens, so the result equals the full-batch gradient for every token-mean term. The MoE
  layer forms its routing groups from the tokens it is given, i.e. per microbatch: the result is
  the full batch's whenever groups do not span sequences (max_group_size <= the length, or one
  sequence per group). When groups span sequences, microbatching changes the group members,
  and with them the balance loss and, where capacity binds, which tokens are dropped.
  The router load (the ROUTER_LOAD collection, expert counts before capacity) adds up over the
  microbatches: the whole batch's.
  """
  def terms_and_grads(batch, rngs, weight):
    def objective(params):
      loss, terms, load = loss_fn(
          network, params, batch, model_state=model_state, rngs=rngs, enable_dropout=True,
          logit_z_loss=logit_z_loss, return_router_load=True)
      return loss * weight, (terms, load)
    with partitioning.axis_rules():  # activation constraints (under jax.set_mesh): all-to-all
      (_, (terms, load)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return terms, grads, load

  if num_microbatches == 1:
    return terms_and_grads(batch, rngs, 1.0)
  # Row i goes to microbatch i % M: every microbatch keeps rows on every data-parallel device.
  micro = jax.tree.map(lambda x: jnp.swapaxes(
      x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:]), 0, 1), batch)
  targets = batch["decoder_target_tokens"]
  weights = objectives.loss_weights(targets, batch.get("decoder_loss_weights"))
  micro_tokens = jnp.sum(objectives.loss_weights(micro["decoder_target_tokens"],
                                                 micro.get("decoder_loss_weights")),
                         axis=tuple(range(1, targets.ndim + 1)))
  shares = micro_tokens / jnp.maximum(jnp.sum(weights), 1.0)

  def body(grads_sum, inputs):
    index, mb, share = inputs
    mb_rngs = {k: jax.random.fold_in(r, index) for k, r in rngs.items()}
    terms, grads, load = terms_and_grads(mb, mb_rngs, share)
    return jax.tree.map(jnp.add, grads_sum, grads), (terms, load)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (terms, load) = jax.lax.scan(body, zeros,
                                      (jnp.arange(num_microbatches), micro, shares))
  # Token-weighted means, like the full batch's (num_tokens adds up).
  terms = {k: jnp.sum(v, 0) if k == "num_tokens" else jnp.tensordot(shares, v, 1)
           for k, v in terms.items()}
  return terms, grads, jax.tree.map(lambda v: jnp.sum(v, 0), load)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               network: nn.Module, optimizer: optax.GradientTransformation,
               schedule: Optional[Callable] = None, logit_z_loss: float = 0.0,
               num_microbatches: int = 1, loss_fn: Callable = objectives.compute_loss):
  """One optimizer step; dropout / routing randomness is `fold_in(rng, step)` (resumable)."""
  step_rng = jax.random.fold_in(rng, state.step)
  dropout_rng, routing_rng = jax.random.split(step_rng)
  rngs = {"dropout": dropout_rng, ROUTING_RNG: routing_rng}
  terms, grads, router_load = loss_and_grads(
      state.params, batch, rngs, network=network, model_state=state.model_state,
      logit_z_loss=logit_z_loss, num_microbatches=num_microbatches, loss_fn=loss_fn)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Aux-loss-free balancing: router biases move outside the optimizer, once per step.
  model_state = score_routing.update_router_bias(state.model_state, router_load)
  # param_norm: the loop refuses (never checkpoints) a state whose new params are not finite.
  metrics = dict(terms, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
  if schedule is not None:
    metrics["learning_rate"] = schedule(state.step)
  return TrainState(state.step + 1, params, opt_state, model_state), metrics


def eval_step(params, batch: Mapping[str, jax.Array], model_state, *, network: nn.Module,
              logit_z_loss: float = 0.0):
  """Loss terms with dropout off and the eval capacity factor (`model_state`: TrainState's)."""
  with partitioning.axis_rules():
    _, terms = objectives.compute_loss(network, params, batch, model_state=model_state,
                                       logit_z_loss=logit_z_loss)
  return terms


# ------------------------------------------------------------------------------------------
# State creation and sharding.


def _init_fn(network, optimizer):
  def init(rng):
    variables = nn.unbox(network.init(rng, **network.example_batch(1, 8)))
    params = variables["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      objectives.model_state_of(variables))
  return init


def _opt_state_sharding(leaf, param, sharding, mesh):
  """An optimizer-state leaf beside `param` (same tree path) is sharded like it.

  Same shape (Adam moments, unfactored Adafactor v): the param's sharding. One axis fewer
  (Adafactor's factored v_row / v_col): the param's spec without that axis, so an expert
  kernel's [E, D] / [E, F] statistics stay on the expert axis. Anything else: replicated.
  """
  if leaf.shape == param.shape:
    return sharding
  spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
  if leaf.ndim == param.ndim - 1:
    for axis in reversed(range(param.ndim)):
      if param.shape[:axis] + param.shape[axis + 1:] == leaf.shape:
        return NamedSharding(mesh, P(*(spec[:axis] + spec[axis + 1:])))
  return partitioning.replicated(mesh)


def state_shardings(network, optimizer, mesh):
  """Shardings of TrainState: params and model state from the logical rules, optimizer state
  like its params.

  Optimizer-state leaves are matched to params by their trailing dict keys (the param path
  inside the state tree, e.g. `...v/decoder/layers_1/mlp/expert/wi/kernel`); counts and
  other scalars are replicated. (Leaving them to XLA's propagation replicated them all, expert
  moments included, on every device.) No compilation happens here.
  """
  boxed = abstract_variables(network)
  param_shardings = partitioning.logical_shardings(boxed["params"], mesh)
  shapes = jax.eval_shape(_init_fn(network, optimizer), jax.random.key(0))
  param_paths, _ = jax.tree_util.tree_flatten_with_path(shapes.params)
  by_keys = {tuple(k.key for k in path): (leaf, sharding) for (path, leaf), sharding in zip(
      param_paths, jax.tree.leaves(param_shardings))}

  def opt_leaf_sharding(path, leaf):
    keys = []
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.insert(0, entry.key)
    for start in range(len(keys)):  # the longest trailing key path that names a param
      if tuple(keys[start:]) in by_keys:
        param, sharding = by_keys[tuple(keys[start:])]
        return _opt_state_sharding(leaf, param, sharding, mesh)
    return partitioning.replicated(mesh)

  opt_shardings = jax.tree_util.tree_map_with_path(opt_leaf_sharding, shapes.opt_state)
  return TrainState(partitioning.replicated(mesh), param_shardings, opt_shardings,
                    partitioning.logical_shardings(objectives.model_state_of(boxed), mesh))


def abstract_state(network, optimizer, shardings):
  shapes = jax.eval_shape(_init_fn(network, optimizer), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def init_state(network, optimizer, shardings, rng):
  return jax.jit(_init_fn(network, optimizer), out_shardings=shardings)(rng)


def state_from_params(params, optimizer, shardings, model_state=None):
  """Fresh optimizer state (step 0) around given params and model state (fine-tuning)."""
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  model_state = jax.device_put({} if model_state is None else model_state,
                               shardings.model_state)
  return TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state,
                    model_state)


def lower_train_step(network, optimizer, mesh, batch_size: int, length: int):
  """`train_step` jitted as the trainer jits it and lowered from abstract state and tokens
  [batch_size, length] (`jax.eval_shape`: nothing is allocated); `.compile()` the result for
  an ahead-of-time build (tests, benchmarks/compile_time.py)."""
  with jax.set_mesh(mesh), partitioning.axis_rules():
    shardings = state_shardings(network, optimizer, mesh)
    state = abstract_state(network, optimizer, shardings)
    data, replicated = partitioning.batch_sharding(mesh), partitioning.replicated(mesh)
    tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=data)
    batch = {k: tokens for k in network.example_batch()} | {"decoder_target_tokens": tokens}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    step = jax.jit(lambda s, b, r: train_step(s, b, r, network=network, optimizer=optimizer),
                   in_shardings=(shardings, data, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
    return step.lower(state, batch, rng)
