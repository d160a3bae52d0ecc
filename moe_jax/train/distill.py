"""MoE -> dense distillation (Fedus, Zoph & Shazeer 2021, "Switch Transformers",
arXiv:2101.03961, sec. 5 and table 6).

A dense student starts from the MoE teacher's non-expert weights (INITIAL_CHECKPOINT_PATH =
the teacher: every param whose path and shape match is copied) and trains on

  teacher_weight * soft + (1 - teacher_weight) * cross entropy (+ the student's aux / z-losses)

where `soft` is the cross entropy of the student against the teacher's probabilities (0.25 /
0.75 in the paper), with Hinton et al.'s temperature (2015, arXiv:1503.02531):
T^2 * CE(softmax(teacher / T), log_softmax(student / T)); T = 1 is the paper's.

The teacher is rebuilt from its own run's recorded config (MODEL_DIR/config.gin) with gin's
global state swapped out and back (`GinConfig`), so the student's config and its recorded
config.gin stay untouched; the teacher's config is active again whenever its network is traced.
Its variables are an argument of every jitted step (sharded by its logical axes, loaded once),
its forward runs in eval mode (no dropout, eval capacity factor) without gradient, and what its
MoE layers sow is dropped: only the student's router losses enter the objective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from absl import logging
from gin import config as gin_globals

from moe_jax import gin_utils, objectives
from moe_jax.layers.moe import MOE_STATS
from moe_jax.layers.score_routing import ROUTER_LOAD
from moe_jax.models import build_network
from moe_jax.models.summary import abstract_variables
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import partitioning
from moe_jax.train.loop import with_non_finite_flag

# Sown by the teacher's layers and dropped (mutable, so that state collections a checkpoint
# lacks initialise instead of failing).
_TEACHER_SCRATCH = (MOE_STATS, ROUTER_LOAD) + tuple(objectives.STATE_COLLECTIONS)


@gin.configurable(module="moe_jax.train.distill")
@dataclasses.dataclass(frozen=True)
class Distillation:
  """What to distil from: `teacher_checkpoint` is a MODEL_DIR or one checkpoint step directory
  (as INITIAL_CHECKPOINT_PATH takes) of a run that recorded its config.gin."""
  teacher_checkpoint: str = ""
  teacher_weight: float = 0.25
  temperature: float = 1.0

  def __post_init__(self):
    name = "Distillation.teacher_checkpoint (TEACHER_CHECKPOINT)"
    if not isinstance(self.teacher_checkpoint, str) or not self.teacher_checkpoint:
      raise ValueError(f"{name} must name the teacher's MODEL_DIR or checkpoint directory, got "
                       f"{self.teacher_checkpoint!r}")
    if (isinstance(self.teacher_weight, bool) or not isinstance(self.teacher_weight, (int, float))
        or not 0.0 <= self.teacher_weight <= 1.0):
      raise ValueError(f"Distillation.teacher_weight must be in [0, 1], got "
                       f"{self.teacher_weight!r}")
    if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
        or not 0.0 < self.temperature < math.inf):
      raise ValueError(f"Distillation.temperature must be a positive number, got "
                       f"{self.temperature!r}")
    path = os.path.abspath(os.path.expanduser(self.teacher_checkpoint))
    if not os.path.isdir(path):
      raise ValueError(f"{name} {path!r} does not exist")
    try:
      ckpt_lib.resolve_checkpoint_path(path)
    except FileNotFoundError:
      raise ValueError(f"{name} {path!r} holds no complete checkpoint (expected "
                       f"<dir>/checkpoints/<step>/state or <dir>/<step>/state)") from None
    if gin_utils.recorded_config(path) is None:
      raise ValueError(f"{name} {path!r} has no {gin_utils.RECORDED_CONFIG} beside it: the "
                       f"teacher's architecture is read from the config its training run "
                       f"recorded in its MODEL_DIR")

  def load_teacher(self, student: nn.Module, mesh=None, batch_size: Optional[int] = None):
    """The Teacher, refused (ValueError) unless its output size and input features are the
    student's; with a mesh, it must also fit it. Nothing is compiled; params land on the host."""
    directory, step = ckpt_lib.resolve_checkpoint_path(self.teacher_checkpoint)
    config_path = gin_utils.recorded_config(self.teacher_checkpoint)
    network, teacher_gin = build_from_recorded_config(config_path)
    with use_gin_config(teacher_gin):
      teacher_out, boxed = output_shape(network), abstract_variables(network)
      if mesh is not None:
        partitioning.check_network_fits_mesh(network, mesh, batch_size)
    student_out = output_shape(student)
    source = f"Distillation.teacher_checkpoint {self.teacher_checkpoint!r}"
    if teacher_out[-1] != student_out[-1]:
      raise ValueError(f"{source}: the teacher's vocabulary / output size is {teacher_out[-1]} "
                       f"({config_path}) but the student's is {student_out[-1]}")
    features, student_features = sorted(network.example_batch()), sorted(student.example_batch())
    if features != student_features:
      raise ValueError(f"{source}: the teacher ({type(network).__name__}) reads {features}, the "
                       f"student ({type(student).__name__}) {student_features}")
    params = ckpt_lib.load_params(self.teacher_checkpoint)
    ckpt_lib.check_same_shapes(
        ckpt_lib.shape_table(params), ckpt_lib.shape_table(nn.unbox(boxed["params"])),
        f"{source} ({directory}, step {step})",
        f" Its network was rebuilt from {config_path}.")
    variables = {"params": params, **ckpt_lib.load_model_state(self.teacher_checkpoint)}
    logging.info("Distilling from %s (step %d, %s rebuilt from %s): teacher_weight %g, "
                 "temperature %g.", directory, step, type(network).__name__, config_path,
                 self.teacher_weight, self.temperature)
    return Teacher(network, variables, self.teacher_weight, self.temperature, teacher_gin)


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: hashed and compared by identity
class Teacher:
  """The teacher's network, its variables on the host, the loss weights (see Distillation),
  and the gin config it was built with (None: built in Python, no gin)."""
  network: nn.Module
  variables: Mapping[str, Any]
  teacher_weight: float = 0.25
  temperature: float = 1.0
  gin_config: Optional[GinConfig] = None

  def logits(self, variables, batch: Mapping[str, jax.Array], rngs=None) -> jax.Array:
    """float32 logits in eval mode (no dropout, eval capacity factor), without gradient."""
    with use_gin_config(self.gin_config):
      logits, _ = self.network.apply(variables, **objectives.model_inputs(self.network, batch),
                                     enable_dropout=False, rngs=rngs,
                                     mutable=list(_TEACHER_SCRATCH))
    return jax.lax.stop_gradient(logits.astype(jnp.float32))

  def on_mesh(self, mesh):
    """(variables, shardings) with the shardings of the teacher's logical axes."""
    with use_gin_config(self.gin_config):
      boxed = abstract_variables(self.network)
    shardings = {name: partitioning.logical_shardings(boxed[name], mesh)
                 for name in self.variables}
    return jax.device_put(dict(self.variables), shardings), shardings

  def loss_fn(self, variables) -> Callable:
    """`objectives.compute_loss`'s signature, distilling from the teacher's `variables`."""
    return functools.partial(distillation_loss, teacher=self, teacher_variables=variables)

  def train_step(self, step_fn: Callable) -> Callable:
    """`step_fn(state, batch, rng, *, loss_fn)` (steps.train_step with its settings bound) as
    the loop's step `(state, batch, rng, first_bad, teacher_variables)`."""
    def step(state, batch, rng, first_bad, variables):
      return with_non_finite_flag(functools.partial(step_fn, loss_fn=self.loss_fn(variables)))(
          state, batch, rng, first_bad)
    return step


# ------------------------------------------------------------------------------------------
# The loss.


def soft_cross_entropy(student_logits_BLV, teacher_logits_BLV, weights_BL,
                       temperature: float = 1.0) -> jax.Array:
  """T^2 * weighted mean over tokens of -sum_v softmax(teacher / T) log_softmax(student / T)
  (Hinton, Vinyals & Dean 2015, arXiv:1503.02531: T^2 keeps the gradient's scale)."""
  probs_BLV = jax.nn.softmax(teacher_logits_BLV.astype(jnp.float32) / temperature, axis=-1)
  log_q_BLV = jax.nn.log_softmax(student_logits_BLV.astype(jnp.float32) / temperature, axis=-1)
  weights_BL = weights_BL.astype(jnp.float32)
  ce_BL = -jnp.sum(probs_BLV * log_q_BLV, axis=-1)
  return temperature**2 * jnp.sum(ce_BL * weights_BL) / jnp.maximum(jnp.sum(weights_BL), 1.0)


def distillation_loss(network, params, batch: Mapping[str, jax.Array], *, teacher: Teacher,
                      teacher_variables, rngs=None, return_router_load: bool = False, **kwargs):
  """`objectives.compute_loss` with the distillation objective as its loss: the plain loss
  with teacher_weight of its cross entropy replaced by the soft term. Its terms are the plain
  ones (`loss` included, so curves compare with other runs) plus `distill_loss` (the soft term).
  """
  teacher_logits_BLV = teacher.logits(teacher_variables, batch, rngs)
  captured = []
  # compute_loss's own student logits (no second forward pass, label terms exactly the plain
  # run's): the output of the root module's __call__.
  with nn.intercept_methods(functools.partial(_record_root_output, captured)):
    loss, terms, load = objectives.compute_loss(network, params, batch, rngs=rngs,
                                                return_router_load=True, **kwargs)
  if len(captured) != 1:
    raise RuntimeError(f"expected one call of {type(network).__name__}, saw {len(captured)}")
  weights_BL = objectives.loss_weights(batch["decoder_target_tokens"],
                                       batch.get("decoder_loss_weights"))
  soft = soft_cross_entropy(captured[0], teacher_logits_BLV, weights_BL, teacher.temperature)
  # teacher_weight 0 is the plain objective exactly (soft stays a metric, outside the gradient).
  total = (loss + teacher.teacher_weight * (soft - terms["cross_entropy"])
           if teacher.teacher_weight else loss)
  terms = dict(terms, distill_loss=soft)
  return (total, terms, load) if return_router_load else (total, terms)


def _record_root_output(captured: list, next_fun, args, kwargs, context):
  out = next_fun(*args, **kwargs)
  if (context.method_name == "__call__" and context.module.scope is not None
      and context.module.path == ()):
    captured.append(out)
  return out


def output_shape(network: nn.Module) -> tuple:
  """The shape of the network's output on its example batch (traced, not compiled)."""
  out, _ = jax.eval_shape(lambda: network.init_with_output(
      jax.random.key(0), **network.example_batch(1, 8)))
  return tuple(out.shape)


# ------------------------------------------------------------------------------------------
# The teacher's gin config beside the student's.


@dataclasses.dataclass(frozen=True)
class GinConfig:
  """A copy of gin's global state: bindings, imports, operative config, singletons, the lock
  and the search path. gin 0.5 has no public API for this; `install` puts one back."""
  # pylint: disable=protected-access
  bindings: dict
  imports: set
  operative: dict
  singletons: dict
  locked: bool
  search_path: list

  @classmethod
  def capture(cls) -> GinConfig:
    with gin_globals._OPERATIVE_CONFIG_LOCK:
      operative = {k: dict(v) for k, v in gin_globals._OPERATIVE_CONFIG.items()}
    return cls({k: dict(v) for k, v in gin_globals._CONFIG.items()}, set(gin_globals._IMPORTS),
               operative, dict(gin_globals._SINGLETONS), gin.config_is_locked(),
               list(gin_globals._LOCATION_PREFIXES))

  def install(self) -> None:
    gin_globals._CONFIG.clear()
    gin_globals._CONFIG.update({k: dict(v) for k, v in self.bindings.items()})
    gin_globals._SINGLETONS.clear()
    gin_globals._SINGLETONS.update(self.singletons)
    gin_globals._IMPORTS.clear()
    gin_globals._IMPORTS.update(self.imports)
    with gin_globals._OPERATIVE_CONFIG_LOCK:
      gin_globals._OPERATIVE_CONFIG.clear()
      gin_globals._OPERATIVE_CONFIG.update({k: dict(v) for k, v in self.operative.items()})
    gin_globals._LOCATION_PREFIXES[:] = self.search_path
    gin_globals._set_config_is_locked(self.locked)


@contextlib.contextmanager
def use_gin_config(config: Optional[GinConfig]):
  """`config` installed inside the block, the previous state restored after (None: as is)."""
  if config is None:
    yield
    return
  saved = GinConfig.capture()
  config.install()
  try:
    yield
  finally:
    saved.install()


def build_from_recorded_config(config_path: str) -> tuple[nn.Module, GinConfig]:
  """`build_network()` under a run's recorded config.gin, and that config (as built); the
  caller's gin state is left as it was."""
  saved = GinConfig.capture()
  try:
    try:
      gin_utils.parse_gin([config_path])
    except ValueError as e:
      raise ValueError(f"Distillation: the teacher's recorded config {config_path} does not "
                       f"parse: {e}") from e
    network = build_network()
    return network, GinConfig.capture()
  finally:
    saved.install()
