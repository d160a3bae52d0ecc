"""T5 multi-head attention, relative position bias and attention masks."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


_NEG_INF = -1e10


def attention_mask(q_valid_BL, kv_valid_BM, *, causal: bool = False, q_segment_BL=None,
                   kv_segment_BM=None):
  """Bool mask [B, 1, L, M]: both tokens real, same packed segment, and (causal) key <= query."""
  mask = q_valid_BL[:, None, :, None] & kv_valid_BM[:, None, None, :]
  if q_segment_BL is not None:
    mask &= q_segment_BL[:, None, :, None] == kv_segment_BM[:, None, None, :]
  if causal:
    length, mem = q_valid_BL.shape[1], kv_valid_BM.shape[1]
    mask &= jnp.arange(mem)[None, :] <= jnp.arange(length)[:, None]
  return mask


def mask_to_bias(mask_B1LM, dtype=jnp.float32):
  return jnp.where(mask_B1LM, 0.0, _NEG_INF).astype(dtype)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's bucketing of (key - query) offsets (Raffel et al. 2020, sec. 2.1).

  Half the buckets hold exact small distances; the rest grow logarithmically up to
  max_distance, beyond which all offsets share the last bucket. Bidirectional bucketing spends
  half of the buckets on keys after the query; causal bucketing treats those as distance 0.
  """
  distance = -relative_position
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    bucket = (distance < 0).astype(np.int32) * num_buckets
    distance = np.abs(distance)
  else:
    distance = np.maximum(distance, 0)
  max_exact = num_buckets // 2
  log_ratio = np.log(np.maximum(distance, 1) / max_exact) / np.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int32)
  large = np.minimum(large, num_buckets - 1)
  return bucket + np.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
  """Learned per-head bias of each relative-position bucket (param `rel_embedding` [N, buckets])."""
  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

  @nn.compact
  def __call__(self, q_len: int, k_len: int, q_offset=None):
    """Bias [1, N, q_len, k_len] of queries at positions q_offset + [0, q_len) (offset 0, or a
    traced scalar when decoding) against keys at [0, k_len)."""
    bucket = functools.partial(relative_position_bucket, bidirectional=self.bidirectional,
                               num_buckets=self.num_buckets, max_distance=self.max_distance)
    relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    if q_offset is None:
      buckets_LM = bucket(relative)
    else:
      # Bucket every offset a key can have with the numpy code above (bit-equal buckets), then
      # look the traced ones up.
      offsets = np.arange(-(q_len + k_len - 2), k_len)
      buckets_LM = jnp.asarray(bucket(offsets))[relative - q_offset - offsets[0]]
    table_NK = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(self.embedding_init, ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    return table_NK[:, buckets_LM][None].astype(self.dtype)  # [1, N, L, M]


def _projection_init(in_axis, out_axis):
  # Fan-in over the contracted axes only (d_model, or heads x head_dim for the output).
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis)


class _Projection(nn.Module):
  """x @ kernel, contracting x's last `len(in_dims)` axes; kernel [*in_dims, *out_dims].

  The kernel is created at its full rank, so its logical names always match its shape.
  """
  in_dims: tuple[int, ...]
  out_dims: tuple[int, ...]
  axes: tuple[str, ...]
  kernel_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        self.in_dims + self.out_dims, jnp.float32)
    contract = len(self.in_dims)
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                               ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))),
                                ((), ())))


class MultiHeadDotProductAttention(nn.Module):
  """T5 attention: no 1/sqrt(H) in the logits, folded into the query init instead.

  Params `query`, `key`, `value` [D, N, H] and `out` [N, H, D] (flaxformer's names and shapes).

  Decoding self-attention (`decode=True`, T5X's cache): the first call, on full-length inputs,
  creates zeros `cached_key` / `cached_value` [B, M, N, H] in the "cache" collection; later
  calls take one token per sequence, write its key/value at `decode_position` and attend over
  all M cached positions (`bias_BNLM` masks the ones not yet written). Cross-attention needs no
  cache: under jit, the projections of the fixed encoding leave the decoding loop (measured
  10-15% faster than caching them, benchmarks/decode.py on CPU).
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  float32_logits: bool = True

  @nn.compact
  def __call__(self, x_q_BLD, x_kv_BMD, bias_BNLM, deterministic: bool = True, *,
               decode: bool = False, decode_position=None):
    d_model, heads = x_q_BLD.shape[-1], (self.num_heads, self.head_dim)
    in_init = _projection_init(0, (1, 2))

    def query_init(key, shape, dtype=jnp.float32):
      return in_init(key, shape, dtype) / np.sqrt(self.head_dim).astype(dtype)

    def projection(name, init):
      return _Projection((d_model,), heads, ("embed", "heads", "kv"), init, self.dtype,
                         name=name)

    q_BLNH = projection("query", query_init)(x_q_BLD)
    k_BMNH = projection("key", in_init)(x_kv_BMD)
    v_BMNH = projection("value", in_init)(x_kv_BMD)
    if decode:
      stepping = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros_like, k_BMNH)
      cached_value = self.variable("cache", "cached_value", jnp.zeros_like, v_BMNH)
      if stepping:
        if decode_position is None:
          raise ValueError("decoding steps need decode_position")
        write = lambda cached, new_B1NH: jax.lax.dynamic_update_slice(
            cached, new_B1NH, (0, decode_position, 0, 0))
        cached_key.value = write(cached_key.value, k_BMNH)
        cached_value.value = write(cached_value.value, v_BMNH)
        k_BMNH, v_BMNH = cached_key.value, cached_value.value
    q_BLNH = nn.with_logical_constraint(q_BLNH, ("batch", "length", "heads", "kv"))
    if self.float32_logits:
      q_BLNH, k_BMNH = q_BLNH.astype(jnp.float32), k_BMNH.astype(jnp.float32)
    logits_BNLM = jnp.einsum("BLNH,BMNH->BNLM", q_BLNH, k_BMNH) + bias_BNLM.astype(q_BLNH.dtype)
    weights_BNLM = jax.nn.softmax(logits_BNLM, axis=-1).astype(self.dtype)
    weights_BNLM = nn.Dropout(self.dropout_rate)(weights_BNLM, deterministic=deterministic)
    out_BLNH = jnp.einsum("BNLM,BMNH->BLNH", weights_BNLM, v_BMNH)
    return _Projection(heads, (d_model,), ("heads", "kv", "embed"),
                       _projection_init((0, 1), 2), self.dtype, name="out")(out_BLNH)
