"""Optimizers (optax) and learning-rate schedules, gin-configurable.

`build_optimizer` wraps the chosen optimizer with gradient clipping and optional freezing of
parameters by regex on their '/'-joined paths (e.g. train only MoE weights when fine-tuning).
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Schedule = Callable[[jax.Array], jax.Array]


@gin.configurable(module="moe_jax.train.optimizers")
def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
  """T5: base / sqrt(max(step, warmup_steps)), i.e. constant 0.01 for the first 10k steps."""
  if warmup_steps < 1:
    raise ValueError(f"rsqrt_schedule.warmup_steps must be >= 1, got {warmup_steps}")
  return lambda step: base_learning_rate * jax.lax.rsqrt(
      jnp.maximum(step, warmup_steps).astype(jnp.float32))


@gin.configurable(module="moe_jax.train.optimizers")
def warmup_cosine_schedule(peak_learning_rate: float = 1e-3, warmup_steps: int = 1000,
                           decay_steps: int = 100_000, end_learning_rate: float = 0.0
                           ) -> Schedule:
  """Linear warmup from 0 to peak, then cosine decay to end_learning_rate at decay_steps."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_learning_rate, warmup_steps,
                                            max(decay_steps, warmup_steps + 1),
                                            end_learning_rate)


@gin.configurable(module="moe_jax.train.optimizers")
def linear_warmup_schedule(peak_learning_rate: float = 1e-3, warmup_steps: int = 1000) -> Schedule:
  """Linear warmup from 0 to peak, then constant."""
  return optax.linear_schedule(0.0, peak_learning_rate, max(warmup_steps, 1))


@gin.configurable(module="moe_jax.train.optimizers")
def adafactor(learning_rate: Schedule = gin.REQUIRED, decay_rate: float = 0.8,
              clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True, factored: bool = True,
              min_dim_size_to_factor: int = 128) -> optax.GradientTransformation:
  """Adafactor with T5's defaults (Shazeer & Stern 2018): factored second moments, no momentum.

  Factoring uses the two largest axes of each parameter; expert kernels [E, D, F] thus keep a
  per-expert factorisation whenever E < D and E < F (true of every config here).
  """
  return optax.adafactor(learning_rate, decay_rate=decay_rate,
                         clipping_threshold=clipping_threshold,
                         multiply_by_parameter_scale=multiply_by_parameter_scale,
                         factored=factored, min_dim_size_to_factor=min_dim_size_to_factor)


@gin.configurable(module="moe_jax.train.optimizers")
def adamw(learning_rate: Schedule = gin.REQUIRED, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.01) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019); decay skips 1-D params (norm scales)."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))


def path_labels(params, frozen_patterns: Sequence[str]):
  """'frozen' for params whose '/'-joined path matches any regex (re.search), else 'trainable'."""
  compiled = [re.compile(p) for p in frozen_patterns]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {k: "frozen" if any(c.search(k) for c in compiled) else "trainable" for k in flat}
  return traverse_util.unflatten_dict(labels, sep="/")


@gin.configurable(module="moe_jax.train.optimizers")
def build_optimizer(optimizer: optax.GradientTransformation = gin.REQUIRED,
                    grad_clip_norm: Optional[float] = None,
                    frozen_patterns: Sequence[str] = ()) -> optax.GradientTransformation:
  """optimizer, after global-norm clipping, applied only to params matching no frozen pattern.

  Examples: frozen_patterns=('/expert/', '/router/') trains only the dense weights;
  ('^(?!.*/mlp/(expert|router)/)',) trains only the MoE weights.
  """
  chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
  tx = optax.chain(*chain, optimizer)
  if not frozen_patterns:
    return tx
  for p in frozen_patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"build_optimizer.frozen_patterns: invalid regex {p!r}: {e}") from None
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               lambda params: path_labels(params, frozen_patterns))


@gin.configurable(module="moe_jax.train.optimizers")
def constant_schedule(learning_rate: float = 1e-3) -> Schedule:
  """A constant rate (T5 fine-tuning: Adafactor at 1e-3)."""
  return optax.constant_schedule(learning_rate)
