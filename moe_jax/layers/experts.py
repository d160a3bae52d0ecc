"""Stacked expert FFNs: one batched matmul over all E experts (params [E, ...])."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from moe_jax.layers.dense import check_activations, feed_forward

# Fan-in of each expert's own [D, F] matrix; axis 0 (experts) is a batch axis.
default_expert_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


class ExpertDense(nn.Module):
  """x_E...I @ kernel [E, I, O] per expert (the stacked twin of a bias-free DenseGeneral)."""
  features: int
  axes: tuple[str, str, str]
  dtype: Any = jnp.float32
  kernel_init: Any = default_expert_init

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (x.shape[0], x.shape[-1], self.features), jnp.float32)
    return jnp.einsum("E...I,EIO->E...O", x.astype(self.dtype), kernel.astype(self.dtype))


@gin.configurable(module="moe_jax.layers.experts")
class ExpertMlp(nn.Module):
  """E expert FFNs applied to their buffers x_EGCD (params `wi[_i]/kernel` [E, D, F], `wo` [E, F, D]).

  `intermediate_dropout_rate` is the expert dropout (Switch Transformer fine-tuning uses 0.4).
  """
  intermediate_dim: int = 2048
  activations: Sequence[str] = ("relu",)
  intermediate_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  kernel_init: Any = default_expert_init

  def __post_init__(self):
    check_activations("ExpertMlp", self.activations)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_EGCD, deterministic: bool = True):
    def dense(name, features):
      axes = ("expert", "mlp", "embed") if name == "wo" else ("expert", "embed", "mlp")
      return ExpertDense(features, axes, self.dtype, self.kernel_init, name=name)

    return feed_forward(
        x_EGCD, dense, activations=self.activations, intermediate_dim=self.intermediate_dim,
        out_dim=x_EGCD.shape[-1], dropout_rate=self.intermediate_dropout_rate,
        deterministic=deterministic,
        constrain_hidden=lambda h: nn.with_logical_constraint(
            h, ("expert", "expert_group", "unmodeled", "mlp")))
