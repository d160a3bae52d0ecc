"""Assembled networks built from `moe_jax.layers`; gin configs pick one via `build_network`."""

import flax.linen as nn
import gin

# Registers every configurable network and layer with gin.
from moe_jax.layers import dense, experts, moe, noisy_routing, routing, soft_moe  # noqa: F401
from moe_jax.layers import attention_experts, mixture_of_depths, score_routing  # noqa: F401
from moe_jax.models import decoder_only, lstm, t5, vision  # noqa: F401


@gin.configurable(module="moe_jax.models")
def build_network(network: nn.Module = gin.REQUIRED) -> nn.Module:
  """The network an architecture gin file assembles (`build_network.network = @...()`)."""
  return network
