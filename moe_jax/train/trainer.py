"""The training loop (T5X-style, gin-configured), sectioned top to bottom in `train`.

The pure steps and the state's creation live in moe_jax.train.steps, the loop's host-side
helpers (input batches, late metric fetching, run setup) in moe_jax.train.loop; their public
names are re-exported here. `train_step` is jitted once with explicit in/out shardings derived
from the logical-axis rules, and donates the old state. The host never waits for a step it has
just dispatched: step metrics are fetched one step late and only on log steps, the non-finite
check runs on the device (fetched at every log step, before every checkpoint and evaluation).
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
from absl import logging

from moe_jax.models import build_network
from moe_jax.models.summary import abstract_variables
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import merging, partitioning
from moe_jax.train.distill import Distillation
from moe_jax.train.loop import (StepMetrics, check_task, evaluate, input_batches, log_run_setup,
                                num_tokens, resume_input, to_global, warn_if_t5x_step_count,
                                with_non_finite_flag, write_gin_config)
from moe_jax.train.metrics import MetricsWriter, Progress, mean_metrics
from moe_jax.train.steps import (TrainState, abstract_state, eval_step, init_state,
                                 loss_and_grads, state_from_params, state_shardings, train_step)

# Re-exported: scripts, inference and tests reach these through `trainer`.
__all__ = ["TrainState", "abstract_state", "check_task", "eval_step", "evaluate", "init_state",
           "input_batches", "loss_and_grads", "mean_metrics", "state_from_params",
           "state_shardings", "to_global", "train", "train_step", "warn_if_t5x_step_count"]


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
          merge_experts: bool = False,
          expert_usage_from: Optional[str] = None,
          logit_z_loss: float = 1e-4,
          seed: int = 0,
          num_microbatches: int = 1,
          tensorboard: bool = True,
          async_checkpoints: bool = True,
          pack: bool = True,
          eval_hooks: Sequence[Callable] = (),
          network: Optional[nn.Module] = None,
          distillation: Optional[Distillation] = None) -> dict:
  """Trains `build_network()` (or `network`) on a seqio task; returns the last logged metrics.

  Resumes from the newest readable checkpoint in MODEL_DIR/checkpoints if there is one
  (params, optimizer state, step, and the input iterator's saved state, or for checkpoints
  without one a replay of the consumed batches: the losses are those of an uninterrupted run).
  Otherwise starts from INITIAL_CHECKPOINT_PATH's params (fine-tuning: TRAIN_STEPS more
  steps, counted from 0) or from scratch. `upcycle`: dense -> MoE (experts start as copies of
  the dense FFN); `merge_experts`: MoE -> dense (the usage-weighted average of the experts, with
  usage from `expert_usage_from`'s metrics.jsonl or the checkpoint's run; moe_jax.train.merging).

  eval_hooks: extra evaluations run with every EVAL_PERIOD's loss evaluation, each
  `hook(network, params, model_state) -> {name: value}` (e.g. `facts.recall_eval`); their
  values are logged under eval/ beside the loss.

  distillation: train against a teacher too (moe_jax.train.distill; runs/distill.gin), which
  is rebuilt from its run's config.gin and loaded on every start, resumes included.
  """
  # --- Validate everything before any compilation. ---------------------------------------
  if not model_dir:
    raise ValueError("MODEL_DIR must be set, e.g. --gin.MODEL_DIR=\"'runs/switch_tiny'\"")
  for name, value in (("TRAIN_STEPS", train_steps), ("BATCH_SIZE", batch_size),
                      ("LOG_EVERY", log_every), ("CHECKPOINT_PERIOD", checkpoint_period),
                      ("NUM_MICROBATCHES", num_microbatches), ("EVAL_STEPS", eval_steps)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  merging.check_options(merge_experts, upcycle, initial_checkpoint_path, expert_usage_from)
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
  teacher = distillation.load_teacher(network, mesh, batch_size // num_microbatches) if (
      distillation is not None) else None
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
      usage = merging.initial_checkpoint_usage(
          initial_checkpoint_path, expert_usage_from) if merge_experts else None
    # Building the input pipeline now surfaces missing or empty data before any compilation.
    train_batches = functools.partial(
        input_batches, mixture_or_task_name, task_feature_lengths, "train", batch_size,
        shuffle=True, seed=seed, num_epochs=None, pack=pack)
    batches = train_batches()
    is_chief = jax.process_index() == 0
    writer = MetricsWriter(model_dir, tensorboard=tensorboard, enabled=is_chief)

    with jax.set_mesh(mesh):
      # --- State: resume, fine-tune, or fresh. -------------------------------------------
      shardings = state_shardings(network, optimizer, mesh)
      rng = jax.random.key(seed)
      resumed = checkpointer.restore_latest(abstract_state(network, optimizer, shardings))
      if resumed is not None:
        resume_step, state, _ = resumed  # may be older than check_compatible's (damage)
        batches = resume_input(checkpointer, resume_step, batches, train_batches)
        logging.info("Resumed from %s at step %d.", checkpointer.directory, resume_step)
      elif initial_params is not None:
        fresh = jax.device_get(init_state(network, optimizer, shardings, rng))
        if merge_experts:
          params, report = merging.merge_experts(fresh.params, initial_params, usage)
        else:
          params, report = ckpt_lib.init_params_from(fresh.params, initial_params, upcycle)
        logging.info("Initialised from %s: %s.", initial_checkpoint_path, ", ".join(
            f"{len(paths)} params {kind}" for kind, paths in report.items() if kind != "weights"))
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
      data_sharding, replicated = partitioning.batch_sharding(mesh), partitioning.replicated(mesh)
      train_fn = functools.partial(
          train_step, network=network, optimizer=optimizer, schedule=learning_rate_schedule,
          logit_z_loss=logit_z_loss, num_microbatches=num_microbatches)
      teacher_args, teacher_shardings = (), ()
      if teacher is not None:  # its variables: one more argument of every step, placed once
        variables, variable_shardings = teacher.on_mesh(mesh)
        teacher_args, teacher_shardings = (variables,), (variable_shardings,)
      step_fn = jax.jit(
          with_non_finite_flag(train_fn) if teacher is None else teacher.train_step(train_fn),
          in_shardings=(shardings, data_sharding, replicated, replicated, *teacher_shardings),
          out_shardings=(shardings, replicated, replicated), donate_argnums=(0,))
      eval_fn = jax.jit(functools.partial(eval_step, network=network, logit_z_loss=logit_z_loss),
                        in_shardings=(shardings.params, data_sharding, shardings.model_state),
                        out_shardings=replicated)

      def run_eval(state) -> dict:
        eval_batches = itertools.islice(input_batches(
            mixture_or_task_name, task_feature_lengths, eval_split, batch_size, shuffle=False,
            seed=seed, num_epochs=1, pack=pack), eval_steps)
        return evaluate(eval_fn, state.params, eval_batches,
                        lambda b: to_global(b, data_sharding), state.model_state)

      # --- Train: step n+1 is dispatched before step n's metrics are fetched. -------------
      metrics_log = StepMetrics(writer, Progress(train_steps, start_step),
                                checkpointer.latest_step, is_chief)
      first_bad = jax.device_put(jnp.zeros((), jnp.int32), replicated)  # see with_non_finite_flag
      for step in range(start_step, train_steps):
        try:
          host_batch = next(batches)
        except StopIteration:
          raise ValueError(f"{mixture_or_task_name!r} yielded no training batch: is its train "
                           f"split empty?") from None
        state, metrics, first_bad = step_fn(state, to_global(host_batch, data_sharding), rng,
                                            first_bad, *teacher_args)
        done = step + 1
        # The first step logs too, so that a run shorter than LOG_EVERY is not silent.
        metrics_log.add(done, metrics, num_tokens(host_batch), first_bad, log=(
            done % log_every == 0 or done == train_steps or step == start_step))
        checkpointer.raise_if_save_failed()  # a background save's failure stops the run here
        if done % checkpoint_period == 0 or done == train_steps:
          metrics_log.sync()  # raises if any step so far went non-finite: never saved
          # The iterator has yielded exactly `done` batches' worth: its position is this step's.
          checkpointer.save(done, state, batches_consumed=done, input_iterator=batches)
        if eval_period and (done % eval_period == 0 or done == train_steps):
          metrics_log.sync()
          eval_metrics = run_eval(state)
          for hook in eval_hooks:
            eval_metrics.update(hook(network, state.params, state.model_state))
          if eval_metrics:
            writer.write(done, eval_metrics, prefix="eval/")
            logging.info("eval at step %d: %s", done, "  ".join(
                f"{k} {v:.4f}" for k, v in eval_metrics.items() if isinstance(v, float)))
          metrics_log.restart_clock()
      metrics_log.sync()
      writer.close()
  finally:
    checkpointer.close()
  return metrics_log.last
