"""TrainState, the pure train/eval steps, and the training loop (T5X-style, gin-configured).

`train_step(state, batch, rng) -> (state, metrics)` is jitted once with explicit in/out
shardings derived from the logical-axis rules, and donates the old state. Host work (data,
logging, evaluation, checkpoints) stays in `train`, sectioned top to bottom.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import objectives
from moe_jax.layers.routing import ROUTING_RNG
from moe_jax.models import build_network
from moe_jax.models.summary import abstract_variables
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import partitioning
from moe_jax.train.metrics import MetricsWriter, Progress

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------
# Pure steps.


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               network: nn.Module, optimizer: optax.GradientTransformation,
               schedule: Optional[Callable] = None, logit_z_loss: float = 0.0):
  """One optimizer step; dropout / routing randomness is `fold_in(rng, step)` (resumable)."""
  step_rng = jax.random.fold_in(rng, state.step)
  dropout_rng, routing_rng = jax.random.split(step_rng)
  rngs = {"dropout": dropout_rng, ROUTING_RNG: routing_rng}

  def loss_fn(params):
    return objectives.compute_loss(network, params, batch, rngs=rngs, enable_dropout=True,
                                   logit_z_loss=logit_z_loss)

  with partitioning.axis_rules():  # activation constraints (under jax.set_mesh): all-to-all
    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # param_norm: the loop refuses (never checkpoints) a state whose new params are not finite.
  metrics = dict(terms, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
  if schedule is not None:
    metrics["learning_rate"] = schedule(state.step)
  return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, batch: Mapping[str, jax.Array], *, network: nn.Module,
              logit_z_loss: float = 0.0):
  """Loss terms with dropout off and the eval capacity factor."""
  with partitioning.axis_rules():
    _, terms = objectives.compute_loss(network, params, batch, logit_z_loss=logit_z_loss)
  return terms


# ------------------------------------------------------------------------------------------
# State creation and sharding.


def _init_fn(network, optimizer):
  def init(rng):
    params = nn.unbox(network.init(rng, **network.example_batch(1, 8))["params"])
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
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
  """Shardings of TrainState: params from the logical rules, optimizer state like its params.

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
  return TrainState(partitioning.replicated(mesh), param_shardings, opt_shardings)


def abstract_state(network, optimizer, shardings):
  shapes = jax.eval_shape(_init_fn(network, optimizer), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def init_state(network, optimizer, shardings, rng):
  return jax.jit(_init_fn(network, optimizer), out_shardings=shardings)(rng)


def state_from_params(params, optimizer, shardings):
  """Fresh optimizer state (step 0) around given params (fine-tuning)."""
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  return TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)


# ------------------------------------------------------------------------------------------
# Data.


def input_batches(task, feature_lengths, split, batch_size, *, shuffle, seed, num_epochs,
                  skip_batches=0, pack=True, drop_remainder=True):
  """Host numpy batches of this process's shard (imports TensorFlow/seqio lazily)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from moe_jax import data  # pylint: disable=g-import-not-at-top
  local_batch = batch_size // jax.process_count()
  ds = data.get_dataset(task, feature_lengths, split, local_batch, shuffle=shuffle, seed=seed,
                        shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()),
                        pack=pack, num_epochs=num_epochs, drop_remainder=drop_remainder)
  if skip_batches:
    ds = ds.skip(skip_batches)  # deterministic given the seed: exact resume
  return ds.as_numpy_iterator()


def check_task(task: str, network) -> None:
  """The task must exist and provide the features the network reads."""
  from moe_jax import data  # pylint: disable=g-import-not-at-top
  data.get_feature_converter(task)  # raises a ValueError naming unknown tasks
  import seqio  # pylint: disable=g-import-not-at-top
  has_inputs = "inputs" in seqio.get_mixture_or_task(task).output_features
  wants_inputs = "encoder_input_tokens" in network.example_batch()
  if has_inputs != wants_inputs:
    kind = "encoder-decoder" if wants_inputs else "decoder-only"
    raise ValueError(f"MIXTURE_OR_TASK_NAME={task!r} {'has' if has_inputs else 'has no'} "
                     f"'inputs' but the model is {kind}; pick a matching task or model config")


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def mean_metrics(history: Sequence[Mapping[str, Any]], weight_key: str = "num_tokens"):
  """Token-weighted mean of per-batch metrics (num_tokens itself is summed)."""
  weights = np.array([float(m[weight_key]) for m in history])
  total = max(weights.sum(), 1.0)
  out = {}
  for key in history[0]:
    values = np.stack([np.asarray(m[key], np.float64) for m in history])
    out[key] = values.sum(0) if key == weight_key else np.tensordot(weights, values, 1) / total
  return out


# ------------------------------------------------------------------------------------------
# The loop.


@gin.configurable(module="moe_jax.train.trainer")
def train(model_dir: str = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          optimizer: optax.GradientTransformation = gin.REQUIRED,
          learning_rate_schedule: Optional[Callable] = None,
          mesh_shape: Sequence[int] = (1, -1, 1),
          log_every: int = 50,
          checkpoint_period: int = 500,
          keep_checkpoints: Optional[int] = 3,
          eval_period: int = 0,
          eval_steps: int = 20,
          eval_split: str = "validation",
          initial_checkpoint_path: Optional[str] = None,
          upcycle: bool = False,
          logit_z_loss: float = 1e-4,
          seed: int = 0,
          tensorboard: bool = True,
          async_checkpoints: bool = True,
          pack: bool = True,
          network: Optional[nn.Module] = None) -> dict:
  """Trains `build_network()` (or `network`) on a seqio task; returns the last logged metrics.

  Resumes from the newest complete checkpoint in MODEL_DIR/checkpoints if there is one
  (params, optimizer state, step and data position: the losses are those of an uninterrupted
  run). Otherwise starts from INITIAL_CHECKPOINT_PATH's params (fine-tuning) or from scratch.
  """
  # --- Validate everything before any compilation. ---------------------------------------
  if not model_dir:
    raise ValueError("MODEL_DIR must be set, e.g. --gin.MODEL_DIR=\"'runs/switch_tiny'\"")
  for name, value in (("TRAIN_STEPS", train_steps), ("BATCH_SIZE", batch_size),
                      ("LOG_EVERY", log_every), ("CHECKPOINT_PERIOD", checkpoint_period)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  network = build_network() if network is None else network
  mesh = partitioning.make_mesh(mesh_shape)
  partitioning.check_network_fits_mesh(network, mesh, batch_size)
  if batch_size % jax.process_count():
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the {jax.process_count()} "
                     f"processes")
  check_task(mixture_or_task_name, network)
  initial_params = None
  checkpointer = ckpt_lib.Checkpointer(model_dir, keep_checkpoints, async_checkpoints)
  resume_step = checkpointer.latest_step()
  try:
    if resume_step is not None:  # a MODEL_DIR of another model fails here, before compiling
      checkpointer.check_compatible(resume_step,
                                    nn.unbox(abstract_variables(network)["params"]))
    elif initial_checkpoint_path:
      initial_params = ckpt_lib.load_params(initial_checkpoint_path)
  except (ValueError, FileNotFoundError):
    checkpointer.close()
    raise
  batches_consumed = 0 if resume_step is None else checkpointer.batches_consumed(resume_step)
  # Building the input pipeline now surfaces missing or empty data before any compilation.
  batches = input_batches(mixture_or_task_name, task_feature_lengths, "train", batch_size,
                           shuffle=True, seed=seed, num_epochs=None,
                           skip_batches=batches_consumed, pack=pack)
  is_chief = jax.process_index() == 0
  writer = MetricsWriter(model_dir, tensorboard=tensorboard, enabled=is_chief)

  with jax.set_mesh(mesh):
    # --- State: resume, fine-tune, or fresh. ---------------------------------------------
    shardings = state_shardings(network, optimizer, mesh)
    rng = jax.random.key(seed)
    if resume_step is not None:
      state = checkpointer.restore(resume_step, abstract_state(network, optimizer, shardings))
      print(f"Resumed from {checkpointer.directory} at step {resume_step}.", flush=True)
    elif initial_params is not None:
      fresh = jax.device_get(init_state(network, optimizer, shardings, rng).params)
      params, report = ckpt_lib.init_params_from(fresh, initial_params, upcycle=upcycle)
      print(f"Initialised from {initial_checkpoint_path}: {len(report['copied'])} params copied, "
            f"{len(report['upcycled'])} upcycled into experts, {len(report['fresh'])} fresh.",
            flush=True)
      state = state_from_params(params, optimizer, shardings)
    else:
      state = init_state(network, optimizer, shardings, rng)
    start_step = int(jax.device_get(state.step))

    # --- Compiled steps. -------------------------------------------------------------------
    data_sharding = partitioning.batch_sharding(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, network=network, optimizer=optimizer,
                          schedule=learning_rate_schedule, logit_z_loss=logit_z_loss),
        in_shardings=(shardings, data_sharding, partitioning.replicated(mesh)),
        out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, network=network, logit_z_loss=logit_z_loss),
                      in_shardings=(shardings.params, data_sharding),
                      out_shardings=partitioning.replicated(mesh))

    def evaluate(params) -> dict:
      history = []
      for batch in itertools.islice(input_batches(
          mixture_or_task_name, task_feature_lengths, eval_split, batch_size, shuffle=False,
          seed=seed, num_epochs=1, pack=pack), eval_steps):
        history.append(jax.device_get(eval_fn(params, to_global(batch, data_sharding))))
      return mean_metrics(history) if history else {}

    # --- Train. ----------------------------------------------------------------------------
    progress = Progress(train_steps, start_step)
    history, last, tokens, interval_start = [], {}, 0, time.time()
    for step in range(start_step, train_steps):
      try:
        host_batch = next(batches)
      except StopIteration:
        raise ValueError(f"{mixture_or_task_name!r} yielded no training batch: is its train "
                         f"split empty?") from None
      tokens += int(sum(np.count_nonzero(host_batch[k]) for k in
                        ("encoder_input_tokens", "decoder_target_tokens") if k in host_batch))
      state, metrics = step_fn(state, to_global(host_batch, data_sharding), rng)
      metrics = jax.device_get(metrics)
      if not all(np.isfinite(metrics[k]) for k in ("loss", "grad_norm", "param_norm")):
        checkpointer.close()
        raise FloatingPointError(
            f"non-finite loss {metrics['loss']} / grad norm {metrics['grad_norm']} / norm of "
            f"the updated params {metrics['param_norm']} at step {step + 1}; stopping without "
            f"checkpointing this state (last checkpoint: {checkpointer.latest_step()})")
      history.append(metrics)
      done = step + 1
      if done % log_every == 0 or done == train_steps:
        elapsed = time.time() - interval_start
        last = mean_metrics(history)
        last["tokens_per_second"] = tokens / max(elapsed, 1e-9)
        record = writer.write(done, last)
        if is_chief:
          print(progress.line(done, record["loss"], record["tokens_per_second"]), flush=True)
        history, tokens, interval_start = [], 0, time.time()
      if done % checkpoint_period == 0 or done == train_steps:
        checkpointer.save(done, state, batches_consumed=done)
      if eval_period and (done % eval_period == 0 or done == train_steps):
        eval_metrics = evaluate(state.params)
        if eval_metrics:
          writer.write(done, eval_metrics, prefix="eval/")
          if is_chief:
            print(f"eval at step {done}: loss {eval_metrics['loss']:.4f} accuracy "
                  f"{eval_metrics['accuracy']:.4f}", flush=True)
        interval_start = time.time()  # tokens/s counts training time only
    checkpointer.close()
    writer.close()
  return last
