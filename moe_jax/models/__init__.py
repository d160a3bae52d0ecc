"""Assembled networks built from `moe_jax.layers`; gin configs pick one via `build_network`."""

import flax.linen as nn
import gin

# Registers every configurable network and layer with gin.
from moe_jax.layers import dense, experts, moe, noisy_routing, routing  # noqa: F401
from moe_jax.models import decoder_only, t5  # noqa: F401


@gin.configurable(module="moe_jax.models")
def build_network(network: nn.Module = gin.REQUIRED) -> nn.Module:
  """The network an architecture gin file assembles (`build_network.network = @...()`)."""
  return network
