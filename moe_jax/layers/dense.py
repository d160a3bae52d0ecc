"""Feed-forward blocks: the dense T5 MLP and the FFN math it shares with stacked experts."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "linear": lambda x: x,
}

# T5's default kernel init (flaxformer): truncated-normal variance scaling on fan-in.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def check_activations(owner: str, activations: Sequence[str]) -> None:
  unknown = [a for a in activations if a not in ACTIVATIONS]
  if not activations or unknown:
    raise ValueError(f"{owner}.activations must be a non-empty sequence of {sorted(ACTIVATIONS)}, "
                     f"got {tuple(activations)}")


def feed_forward(x, dense: Callable[[str, int], Callable], *, activations: Sequence[str],
                 intermediate_dim: int, out_dim: int, dropout_rate: float, deterministic: bool,
                 constrain_hidden: Callable[[jax.Array], jax.Array]):
  """T5 FFN: prod_i act_i(x W_i) -> dropout -> W_o. One activation: `wi`; several: `wi_0`, `wi_1`.

  ("gelu", "linear") is T5 v1.1's gated GELU. `dense(name, features)` makes the projection, so the
  dense MLP ([D, F] kernels) and the stacked experts ([E, D, F]) share this code.
  """
  hidden = None
  for i, act in enumerate(activations):
    name = "wi" if len(activations) == 1 else f"wi_{i}"
    h = ACTIVATIONS[act](dense(name, intermediate_dim)(x))
    hidden = h if hidden is None else hidden * h
  hidden = constrain_hidden(hidden)
  hidden = nn.Dropout(dropout_rate, broadcast_dims=())(hidden, deterministic=deterministic)
  return dense("wo", out_dim)(hidden)


@gin.configurable(module="moe_jax.layers.dense")
class MlpBlock(nn.Module):
  """Dense T5 MLP on x_BLD (params `wi[_i]/kernel` [D, F], `wo/kernel` [F, D], no biases)."""
  intermediate_dim: int = 2048
  activations: Sequence[str] = ("gelu", "linear")
  intermediate_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  kernel_init: Any = default_kernel_init

  def __post_init__(self):
    check_activations("MlpBlock", self.activations)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BLD, padding_mask_BL=None, deterministic: bool = True):
    del padding_mask_BL  # only routing needs it; accepted so dense and MoE blocks are swappable
    axes = {"wo": ("mlp", "embed")}

    def dense(name, features):
      return nn.DenseGeneral(
          features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(self.kernel_init,
                                                   axes.get(name, ("embed", "mlp"))),
          name=name)

    return feed_forward(
        x_BLD, dense, activations=self.activations, intermediate_dim=self.intermediate_dim,
        out_dim=x_BLD.shape[-1], dropout_rate=self.intermediate_dropout_rate,
        deterministic=deterministic,
        constrain_hidden=lambda h: nn.with_logical_constraint(h, ("batch", "length", "mlp")))
