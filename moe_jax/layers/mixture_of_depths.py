"""Mixture-of-Depths (Raposo et al. 2024, arXiv:2404.02258): a block processes k tokens a sequence.

A scalar router w_r [D] (float32) scores each token of the block's input, r_i = x_i . w_r.
Training and teacher-forced evaluation (expert-choice style, sec. 3.2-3.4):

    k = ceil(capacity_fraction * L)  slots per sequence (row; packed segments share them)
    chosen = the k highest r_i of the row's REAL tokens; padding fills the slots left only
             when the row has fewer than k real tokens, and changes nothing
    x~ = the chosen tokens in their original order
    out_i = x_i + r_i * f(x~)_i   for chosen real i,  f(x~) = block(x~) - x~ (its residual update)
    out_i = x_i                   otherwise (bit-identical)

The chosen tokens attend only among themselves, with the bias (causal mask, padding, packed
segments, relative positions) of their ORIGINAL positions: the rows and columns of the stack's
full-length bias at the chosen positions. The factor r_i puts the router on the gradient path.

Top-k over a sequence looks at future tokens, so autoregressive sampling needs a per-token
decision (sec. 3.5). `predictor` makes one, trained with a binary cross-entropy loss against
"token i is among the top k":
- "mlp" (default): a small MLP on stop_gradient(x_i), the paper's auxiliary predictor; it leaves
  the language-modelling objective untouched (no gradient reaches x or the router).
- "router": the router itself, sigmoid(r_i) (the paper's auxiliary loss on the router outputs);
  its gradient reaches the router and the residual stream.
A token is processed iff its predictor logit > 0 (and it is real). That per-token causal rule
replaces the top k when decoding (`decode=True`, T5X's cache) and whenever
`causal_selection=True`; `moe_jax.decoding.decoding_network` sets it so that the full recompute
equals the cached decode. Teacher-forced evaluation keeps the top k by default (the computation
the model was trained with). Under the causal rule the block runs over the full length with the
keys of skipped tokens masked and skipped tokens as padding for its routers (no expert capacity),
which equals running it on the processed subsequence; decoding keeps which positions were
processed in the "cache" collection (`processed` [B, T]), so a skipped token's cached key/value
is never attended to.

Aux loss and metrics leave through `RouterStats` in MOE_STATS (`objectives.moe_loss_terms`):
load_balancing_loss = the predictor's mean BCE over real tokens (0 in one-token decoding
steps, where the top k is unknown); z_loss = 0 (no softmax); fraction_dropped = fraction of real
tokens that skip the block; expert_load_E = [fraction processed, fraction skipped];
router_confidence = the predictor's accuracy (its decision vs the top-k membership; 0 in steps).
With the "mlp" predictor and an adaptive optimizer (Adafactor, Adam) the loss factor hardly
matters: no other loss reaches the predictor's parameters.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from moe_jax.layers.attention import mask_to_bias
from moe_jax.layers.moe import MOE_STATS
from moe_jax.layers.routing import RouterStats, _token_mean

PREDICTORS = ("mlp", "router")


def _fan_in_init(key, shape, dtype=jnp.float32):
  """N(0, 1 / D) for the router vector [D]: r_i has unit scale for unit-RMS tokens."""
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[0])


def _take(v_BL, index_BK):
  """v at the chosen positions: [B, L, ...] -> [B, K, ...]."""
  return jnp.take_along_axis(v_BL, index_BK.reshape(index_BK.shape + (1,) * (v_BL.ndim - 2)),
                             axis=1)


def binary_cross_entropy(logit_BL, target_BL):
  """-[t log sigmoid(z) + (1 - t) log sigmoid(-z)], float32, stable for large |z|."""
  target_BL = target_BL.astype(jnp.float32)
  return -(target_BL * jax.nn.log_sigmoid(logit_BL)
           + (1.0 - target_BL) * jax.nn.log_sigmoid(-logit_BL))


@gin.configurable(module="moe_jax.layers.mixture_of_depths")
class MixtureOfDepths(nn.Module):
  """Routes the top `capacity_fraction` of each sequence's tokens through a block (see module doc).

  Called as `mod(block, x_BLD, self_bias_BNLM, padding_mask_BL, **block_kwargs)` with a
  `t5.TransformerLayer` (or any block of that signature); params `router_kernel` [D] and, for
  the "mlp" predictor, `predictor_hidden` (kernel [D, predictor_hidden_dim], bias) and
  `predictor_logit` (kernel [predictor_hidden_dim, 1], bias).
  """
  capacity_fraction: float = 0.125
  predictor: str = "mlp"
  predictor_hidden_dim: int = 64
  causal_selection: bool = False
  router_init: Callable = _fan_in_init

  def __post_init__(self):
    if not 0.0 < self.capacity_fraction <= 1.0:
      raise ValueError(f"MixtureOfDepths.capacity_fraction must be in (0, 1], "
                       f"got {self.capacity_fraction}")
    if self.predictor not in PREDICTORS:
      raise ValueError(f"MixtureOfDepths.predictor must be one of {PREDICTORS}, "
                       f"got {self.predictor!r}")
    if self.predictor_hidden_dim < 1:
      raise ValueError(f"MixtureOfDepths.predictor_hidden_dim must be >= 1, "
                       f"got {self.predictor_hidden_dim}")
    super().__post_init__()

  def capacity(self, length: int) -> int:
    """k = ceil(capacity_fraction * L) tokens per sequence (at least 1)."""
    return max(1, min(length, math.ceil(self.capacity_fraction * length)))

  def _predictor_logits(self, x_BLD, r_BL):
    if self.predictor == "router":
      return r_BL
    dense = lambda features, axes, name: nn.Dense(
        features, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name)
    # Stop-gradient: the predictor learns to imitate the top k without steering the model.
    h_BLP = nn.relu(dense(self.predictor_hidden_dim, ("embed", "mlp"), "predictor_hidden")(
        jax.lax.stop_gradient(x_BLD)))
    return dense(1, ("mlp", "unmodeled"), "predictor_logit")(h_BLP)[..., 0]

  @nn.compact
  def __call__(self, block, x_BLD, self_bias_BNLM, padding_mask_BL=None, *,
               cross_bias_BNLM=None, deterministic: bool = True, decode: bool = False,
               decode_position=None, max_decode_length: Optional[int] = None, **block_kwargs):
    batch, length, d_model = x_BLD.shape
    w_D = self.param("router_kernel", nn.with_logical_partitioning(self.router_init, ("embed",)),
                     (d_model,), jnp.float32)
    x32_BLD = x_BLD.astype(jnp.float32)
    r_BL = jnp.einsum("BLD,D->BL", x32_BLD, w_D)
    logit_BL = self._predictor_logits(x32_BLD, r_BL)
    real_BL = (jnp.ones((batch, length), bool) if padding_mask_BL is None
               else padding_mask_BL.astype(bool))
    block_kwargs.update(deterministic=deterministic)

    stepping = decode and self.has_variable("cache", "processed")
    if decode:
      cache = self.variable("cache", "processed", jnp.zeros, (batch, length), bool)
    target_BL = None
    if not stepping:  # the top k: the training rule, and the predictor's target
      k = self.capacity(length)
      _, index_BK = jax.lax.top_k(jnp.where(real_BL, r_BL, -jnp.inf), k)
      index_BK = jnp.sort(index_BK, axis=-1)  # original order
      target_BL = jnp.zeros((batch, length), bool).at[
          jnp.arange(batch)[:, None], index_BK].set(True)

    if not (decode or self.causal_selection):
      processed_BL = target_BL & real_BL
      x_BKD = _take(x_BLD, index_BK)
      bias_BNLM = jnp.broadcast_to(self_bias_BNLM, (batch,) + self_bias_BNLM.shape[1:])
      bias_BNKK = jnp.take_along_axis(
          jnp.take_along_axis(bias_BNLM, index_BK[:, None, :, None], axis=2),
          index_BK[:, None, None, :], axis=3)
      if cross_bias_BNLM is not None:
        cross_bias_BNLM = jnp.take_along_axis(
            jnp.broadcast_to(cross_bias_BNLM, (batch,) + cross_bias_BNLM.shape[1:]),
            index_BK[:, None, :, None], axis=2)
      real_BK = _take(real_BL, index_BK)
      y_BKD = block(x_BKD, bias_BNKK, real_BK, cross_bias_BNLM=cross_bias_BNLM, **block_kwargs)
      r_BK = _take(r_BL, index_BK)
      new_BKD = (x_BKD + r_BK[..., None] * (y_BKD - x_BKD)).astype(x_BLD.dtype)
      new_BKD = jnp.where(real_BK[..., None], new_BKD, x_BKD)
      out_BLD = x_BLD.at[jnp.arange(batch)[:, None], index_BK].set(new_BKD)
    else:
      processed_BL = (logit_BL > 0) & real_BL
      keys_BL = processed_BL
      if stepping:
        if decode_position is None:
          raise ValueError("MixtureOfDepths decoding steps need decode_position")
        cache.value = jax.lax.dynamic_update_slice(cache.value, processed_BL,
                                                   (0, decode_position))
        keys_BL = cache.value
      # Skipped tokens' keys are masked and they are padding to the block's routers: the
      # processed tokens see exactly the processed subsequence.
      bias_BNLM = self_bias_BNLM + mask_to_bias(keys_BL[:, None, None, :],
                                                self_bias_BNLM.dtype)
      y_BLD = block(x_BLD, bias_BNLM, processed_BL, cross_bias_BNLM=cross_bias_BNLM,
                    decode=decode, decode_position=decode_position,
                    max_decode_length=max_decode_length, **block_kwargs)
      new_BLD = (x_BLD + r_BL[..., None] * (y_BLD - x_BLD)).astype(x_BLD.dtype)
      out_BLD = jnp.where(processed_BL[..., None], new_BLD, x_BLD)

    self.sow(MOE_STATS, "router_stats", self._stats(logit_BL, target_BL, processed_BL, real_BL))
    return out_BLD

  def _stats(self, logit_BL, target_BL, processed_BL, real_BL) -> RouterStats:
    zero = jnp.zeros((), jnp.float32)
    processed = _token_mean(processed_BL.astype(jnp.float32), real_BL)
    if target_BL is None:  # a decoding step: no top k to compare with
      bce, accuracy = zero, zero
    else:
      bce = _token_mean(binary_cross_entropy(logit_BL, target_BL), real_BL)
      accuracy = _token_mean(((logit_BL > 0) == target_BL).astype(jnp.float32), real_BL)
    return RouterStats(load_balancing_loss=bce, z_loss=zero, fraction_dropped=1.0 - processed,
                       expert_load_E=jnp.stack([processed, 1.0 - processed]),
                       router_confidence=accuracy)
