"""Token embedding with an `attend` method for tied input/output embeddings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Embed(nn.Module):
  """Lookup table `embedding` [V, D] (axes 'vocab', 'embed'); T5 init N(0, 1)."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens_BL):
    return jnp.take(self.embedding, tokens_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD, dtype: Any = None):
    """Logits against the embedding table: x_BLD @ embedding^T -> [B, L, V], in `dtype`."""
    dtype = self.dtype if dtype is None else dtype
    return jnp.einsum("BLD,VD->BLV", x_BLD.astype(dtype), self.embedding.astype(dtype))
