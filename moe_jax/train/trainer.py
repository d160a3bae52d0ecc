"""TrainState, the pure train/eval steps, and the training loop (T5X-style, gin-configured).

`train_step(state, batch, rng) -> (state, metrics)` is jitted once with explicit in/out
shardings derived from the logical-axis rules, and donates the old state. Host work (data,
logging, evaluation, checkpoints) stays in `train`, sectioned top to bottom.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import objectives
from moe_jax.layers import score_routing
from moe_jax.layers.routing import ROUTING_RNG
from moe_jax.models import build_network
from moe_jax.models.summary import abstract_variables, summarize
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import partitioning
from moe_jax.train.metrics import MetricsWriter, Progress


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
                   num_microbatches: int = 1):
  """(loss terms, grads, router load) of a batch, over `num_microbatches` slices of it in turn.

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
    def loss_fn(params):
      loss, terms, load = objectives.compute_loss(
          network, params, batch, model_state=model_state, rngs=rngs, enable_dropout=True,
          logit_z_loss=logit_z_loss, return_router_load=True)
      return loss * weight, (terms, load)
    with partitioning.axis_rules():  # activation constraints (under jax.set_mesh): all-to-all
      (_, (terms, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return terms, grads, load

  if num_microbatches == 1:
    return terms_and_grads(batch, rngs, 1.0)
  # Row i goes to microbatch i % M: every microbatch keeps rows on every data-parallel device.
  micro = jax.tree.map(lambda x: jnp.swapaxes(
      x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:]), 0, 1), batch)
  targets = batch["decoder_target_tokens"]
  weights = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
  micro_tokens = jnp.sum(micro.get("decoder_loss_weights", micro["decoder_target_tokens"] > 0)
                         .astype(jnp.float32), axis=tuple(range(1, targets.ndim + 1)))
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
               num_microbatches: int = 1):
  """One optimizer step; dropout / routing randomness is `fold_in(rng, step)` (resumable)."""
  step_rng = jax.random.fold_in(rng, state.step)
  dropout_rng, routing_rng = jax.random.split(step_rng)
  rngs = {"dropout": dropout_rng, ROUTING_RNG: routing_rng}
  terms, grads, router_load = loss_and_grads(
      state.params, batch, rngs, network=network, model_state=state.model_state,
      logit_z_loss=logit_z_loss, num_microbatches=num_microbatches)
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


def check_task(task: str, network=None):
  """(has "inputs", targets vocabulary) of a registered task; with a network, it must read
  the task's features (encoder-decoder for tasks with inputs, decoder-only otherwise)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from moe_jax import data  # pylint: disable=g-import-not-at-top  (registers the tasks)
  data.get_feature_converter(task)  # raises a ValueError naming unknown tasks
  features = seqio.get_mixture_or_task(task).output_features
  has_inputs = "inputs" in features
  if network is not None and has_inputs != ("encoder_input_tokens" in network.example_batch()):
    kind = "decoder-only" if has_inputs else "encoder-decoder"
    raise ValueError(f"MIXTURE_OR_TASK_NAME={task!r} {'has' if has_inputs else 'has no'} "
                     f"'inputs' but the model is {kind}; pick a matching task or model config")
  return has_inputs, features["targets"].vocabulary


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


def evaluate(eval_fn: Callable, params, batches: Iterable[Mapping[str, np.ndarray]],
             to_device: Callable = lambda batch: batch, model_state=None) -> dict:
  """Token-weighted mean of `eval_fn(params, batch, model_state)` over host batches ({} when
  none); `model_state` is TrainState's (None: {}, a model without state collections)."""
  model_state = {} if model_state is None else model_state
  history = [jax.device_get(eval_fn(params, to_device(batch), model_state))
             for batch in batches]
  return mean_metrics(history) if history else {}


# ------------------------------------------------------------------------------------------
# The loop.


def write_gin_config(model_dir: str) -> None:
  """MODEL_DIR/config.gin: the operative config (the values this run uses), as T5X writes it.

  Called once the network, optimizer and schedule are built, so it lists every parameter they
  were built with, defaults included; `gin.config_str()` would list only what files and flags
  bound. Process 0 only.
  """
  if jax.process_index() != 0:
    return
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, "config.gin")
  with open(path, "w") as f:
    f.write(gin.operative_config_str())
  logging.info("Operative gin config written to %s", path)


def log_run_setup(model_dir: str, network, mesh, tensorboard: bool) -> None:
  """Where the run writes, what the model is, and which devices it runs on (absl INFO)."""
  model_dir = os.path.abspath(model_dir)
  logging.info("Model directory %s: checkpoints in %s, metrics in metrics.jsonl%s", model_dir,
               os.path.join(model_dir, ckpt_lib.CHECKPOINT_SUBDIR),
               f", TensorBoard: tensorboard --logdir {os.path.join(model_dir, 'tensorboard')}"
               if tensorboard else "")
  info = summarize(network)
  layers = info["moe_layers"]
  moe = (f"{len(layers)} MoE layers of {layers[0]['num_experts']} experts "
         f"({layers[0]['router']}, {layers[0]['experts_per_token']:g} per token)"
         if layers else "dense")
  logging.info("Model %s: %s parameters, %s active per token, %s", info["network"],
               f"{info['num_params']:,}", f"{info['active_params_per_token']:,}", moe)
  devices = mesh.devices.reshape(-1)
  logging.info("Mesh %s over %d %s device(s) in %d process(es)",
               ", ".join(f"{k} {v}" for k, v in mesh.shape.items()), len(devices),
               devices[0].platform.upper(), jax.process_count())


def warn_if_t5x_step_count(train_steps: int, initial_checkpoint_path: str) -> None:
  """Warns when TRAIN_STEPS looks like T5X's fine-tuning count (initial step + new steps).

  moe_jax fine-tunes for TRAIN_STEPS steps from step 0 (params only, fresh optimizer state
  and schedule); T5X continues the checkpoint's step count up to TRAIN_STEPS.
  """
  _, initial_step = ckpt_lib.resolve_checkpoint_path(initial_checkpoint_path)
  if initial_step < train_steps <= 2 * initial_step:
    logging.warning(
        "TRAIN_STEPS=%d counts fine-tuning steps from 0 in moe_jax; T5X counts them on from "
        "the initial checkpoint's step (%d). This run trains %d steps; if you meant %d more "
        "steps (T5X's reading), set TRAIN_STEPS=%d.", train_steps, initial_step, train_steps,
        train_steps - initial_step, train_steps - initial_step)


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
          num_microbatches: int = 1,
          tensorboard: bool = True,
          async_checkpoints: bool = True,
          pack: bool = True,
          network: Optional[nn.Module] = None) -> dict:
  """Trains `build_network()` (or `network`) on a seqio task; returns the last logged metrics.

  Resumes from the newest readable checkpoint in MODEL_DIR/checkpoints if there is one
  (params, optimizer state, step and data position: the losses are those of an uninterrupted
  run). Otherwise starts from INITIAL_CHECKPOINT_PATH's params (fine-tuning: TRAIN_STEPS more
  steps, counted from 0) or from scratch.
  """
  # --- Validate everything before any compilation. ---------------------------------------
  if not model_dir:
    raise ValueError("MODEL_DIR must be set, e.g. --gin.MODEL_DIR=\"'runs/switch_tiny'\"")
  for name, value in (("TRAIN_STEPS", train_steps), ("BATCH_SIZE", batch_size),
                      ("LOG_EVERY", log_every), ("CHECKPOINT_PERIOD", checkpoint_period),
                      ("NUM_MICROBATCHES", num_microbatches), ("EVAL_STEPS", eval_steps)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  network = build_network() if network is None else network
  mesh = partitioning.make_mesh(mesh_shape)
  if batch_size % num_microbatches:
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by NUM_MICROBATCHES="
                     f"{num_microbatches}")
  partitioning.check_network_fits_mesh(network, mesh, batch_size // num_microbatches)
  if batch_size % jax.process_count():
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the {jax.process_count()} "
                     f"processes")
  check_task(mixture_or_task_name, network)
  log_run_setup(model_dir, network, mesh, tensorboard)
  initial_params = None
  checkpointer = ckpt_lib.Checkpointer(model_dir, keep_checkpoints, async_checkpoints)
  try:  # closing waits for the last async save, and raises if it failed
    # A MODEL_DIR of another model fails here, before compiling.
    resume_step = checkpointer.check_compatible(nn.unbox(abstract_variables(network)["params"]))
    if resume_step is None and not checkpointer.damaged() and initial_checkpoint_path:
      warn_if_t5x_step_count(train_steps, initial_checkpoint_path)
      initial_params = ckpt_lib.load_params(initial_checkpoint_path)
      initial_model_state = ckpt_lib.load_model_state(initial_checkpoint_path)
    # Building the input pipeline now surfaces missing or empty data before any compilation.
    skip = 0 if resume_step is None else checkpointer.batches_consumed(resume_step)
    batches = input_batches(mixture_or_task_name, task_feature_lengths, "train", batch_size,
                            shuffle=True, seed=seed, num_epochs=None, skip_batches=skip,
                            pack=pack)
    is_chief = jax.process_index() == 0
    writer = MetricsWriter(model_dir, tensorboard=tensorboard, enabled=is_chief)

    with jax.set_mesh(mesh):
      # --- State: resume, fine-tune, or fresh. -------------------------------------------
      shardings = state_shardings(network, optimizer, mesh)
      rng = jax.random.key(seed)
      resumed = checkpointer.restore_latest(abstract_state(network, optimizer, shardings))
      if resumed is not None:
        resume_step, state, batches_consumed = resumed
        if batches_consumed != skip:  # fell back past an unreadable checkpoint
          batches = input_batches(mixture_or_task_name, task_feature_lengths, "train",
                                  batch_size, shuffle=True, seed=seed, num_epochs=None,
                                  skip_batches=batches_consumed, pack=pack)
        logging.info("Resumed from %s at step %d.", checkpointer.directory, resume_step)
      elif initial_params is not None:
        fresh = jax.device_get(init_state(network, optimizer, shardings, rng))
        params, report = ckpt_lib.init_params_from(fresh.params, initial_params, upcycle=upcycle)
        logging.info("Initialised from %s: %d params copied, %d upcycled into experts, %d "
                     "fresh.", initial_checkpoint_path, len(report["copied"]),
                     len(report["upcycled"]), len(report["fresh"]))
        # The model state (e.g. router biases) carries over too, matched by path and shape.
        model_state, _ = ckpt_lib.init_params_from(fresh.model_state, initial_model_state)
        state = state_from_params(params, optimizer, shardings, model_state)
      else:
        state = init_state(network, optimizer, shardings, rng)
      start_step = int(jax.device_get(state.step))
      if start_step >= train_steps:
        logging.info("Nothing left to do: %s is at step %d and TRAIN_STEPS=%d (raise "
                     "TRAIN_STEPS to train on).", checkpointer.directory, start_step, train_steps)
        writer.close()
        return {}
      write_gin_config(model_dir)  # everything configurable is built by now

      # --- Compiled steps. ---------------------------------------------------------------
      data_sharding = partitioning.batch_sharding(mesh)
      step_fn = jax.jit(
          functools.partial(train_step, network=network, optimizer=optimizer,
                            schedule=learning_rate_schedule, logit_z_loss=logit_z_loss,
                            num_microbatches=num_microbatches),
          in_shardings=(shardings, data_sharding, partitioning.replicated(mesh)),
          out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=(0,))
      eval_fn = jax.jit(functools.partial(eval_step, network=network, logit_z_loss=logit_z_loss),
                        in_shardings=(shardings.params, data_sharding, shardings.model_state),
                        out_shardings=partitioning.replicated(mesh))

      def run_eval(state) -> dict:
        eval_batches = itertools.islice(input_batches(
            mixture_or_task_name, task_feature_lengths, eval_split, batch_size, shuffle=False,
            seed=seed, num_epochs=1, pack=pack), eval_steps)
        return evaluate(eval_fn, state.params, eval_batches,
                        lambda b: to_global(b, data_sharding), state.model_state)

      # --- Train. ------------------------------------------------------------------------
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
          raise FloatingPointError(
              f"non-finite loss {metrics['loss']} / grad norm {metrics['grad_norm']} / norm of "
              f"the updated params {metrics['param_norm']} at step {step + 1}; stopping without "
              f"checkpointing this state (last checkpoint: {checkpointer.latest_step()})")
        checkpointer.raise_if_save_failed()  # a background save's failure stops the run here
        history.append(metrics)
        done = step + 1
        # The first step too, so that a run shorter than LOG_EVERY is not silent until its end.
        if done % log_every == 0 or done == train_steps or step == start_step:
          elapsed = time.time() - interval_start
          last = mean_metrics(history)
          last["tokens_per_second"] = tokens / max(elapsed, 1e-9)
          record = writer.write(done, last)
          if is_chief:  # the console's one stream; all else goes through absl logging
            print(progress.line(done, record["loss"], record["tokens_per_second"]), flush=True)
          history, tokens, interval_start = [], 0, time.time()
        if done % checkpoint_period == 0 or done == train_steps:
          checkpointer.save(done, state, batches_consumed=done)
        if eval_period and (done % eval_period == 0 or done == train_steps):
          eval_metrics = run_eval(state)
          if eval_metrics:
            writer.write(done, eval_metrics, prefix="eval/")
            logging.info("eval at step %d: loss %.4f accuracy %.4f", done,
                         eval_metrics["loss"], eval_metrics["accuracy"])
          interval_start = time.time()  # tokens/s counts training time only
      writer.close()
  finally:
    checkpointer.close()
  return last
