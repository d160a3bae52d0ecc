"""SparseDecoderOnly: a causal language model over a SparseDecoder (no cross-attention)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from moe_jax.layers.embedding import Embed
from moe_jax.models.t5 import LogitsHead, SparseDecoder, decoder_padding_mask


@gin.configurable(module="moe_jax.models.decoder_only")
class SparseDecoderOnly(nn.Module):
  """Decoder-only LM; returns float32 logits [B, L, V] for teacher-forced inputs."""
  vocab_size: int = 384
  embed_dim: int = 64
  decoder: SparseDecoder = SparseDecoder()
  logits_via_embedding: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
               decoder_positions=None, enable_dropout: bool = False, decode: bool = False,
               max_decode_length: Optional[int] = None):
    """Logits [B, L, V]; `decode=True` steps a cache (see SparseDecoder)."""
    del decoder_positions  # implied by relative attention within each (packed) segment
    embedder = Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name="token_embedder")
    padding_BL = decoder_padding_mask(decoder_input_tokens, decoder_target_tokens,
                                      decoder_segment_ids)
    y_BLD = self.decoder(embedder(decoder_input_tokens), padding_BL, decoder_segment_ids,
                         deterministic=not enable_dropout, decode=decode,
                         max_decode_length=max_decode_length)
    return LogitsHead(self.vocab_size, self.logits_via_embedding, self.dtype,
                      name="logits_head")(y_BLD, embedder)

  def example_batch(self, batch_size: int = 2, length: int = 8) -> dict:
    """Dummy inputs for `init` / `jax.eval_shape`."""
    return {"decoder_input_tokens": jnp.ones((batch_size, length), jnp.int32)}
