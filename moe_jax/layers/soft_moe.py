"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts", arXiv:2308.00951).

No token is routed: each of the E experts has C = `slots_per_expert` slots (a slot is one unit
of expert capacity, hence the letter C), every slot takes a convex combination of a sequence's
tokens, and every token takes a convex combination of all the slots' outputs. Each sequence is
one routing group (G = B rows of S = L tokens), as the paper routes per image. With X the S
tokens of a group [S, D] and Phi the slot parameters [D, E*C] (sec. 2.1, 2.3):

    logits   = l2norm(X) @ (scale * l2norm(Phi))    l2norm over D; `scale` learned, init 1
    dispatch = softmax over the S tokens, per slot   (each slot: a mix of tokens)
    combine  = softmax over all E*C slots, per token (each token: a mix of slot outputs)
    X~ = dispatch^T X,  Y~ = expert_e(X~ of e's C slots),  Y = combine Y~

The l2 normalisation (sec. 2.3; the authors' vmoe code: x * rsqrt(|x|^2 + 1e-6), scale init 1)
bounds every logit by |scale| and makes the routing invariant to the scale of the inputs.

Padding tokens take no part: their logits are -inf in the token softmax (dispatch weight
exactly 0) and their combine weights are 0 (output exactly 0). A slot of a sequence that is only
padding gets dispatch weights 0 (an empty mixture is the zero vector, not 0/0), so no NaN.

Not causal: every slot mixes every token of the sequence, so a token's output depends on later
tokens. Soft MoE is for encoders and classifiers; decoders refuse it at build time. Packed rows
(several examples in one row) would share slots and leak information between examples: train
Soft MoE models without packing (`configs/models/soft_moe_tiny.gin` sets `train.pack = False`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from moe_jax.layers import routing
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MOE_STATS

# The authors' normaliser: x * rsqrt(sum(x^2) + eps) (vmoe `projects/soft_moe/router.py`).
L2_EPSILON = 1e-6

# Unit-norm slot vectors in expectation at init (fan-in D); the l2 normalisation makes the scale
# of Phi irrelevant to the forward pass, only to the size of its gradient steps.
default_phi_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def l2_normalize(x, axis):
  """x / sqrt(|x|^2 + L2_EPSILON) along `axis`."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + L2_EPSILON)


def soft_moe_logits(x_GSD, phi_DEC, scale):
  """float32 logits [G, S, E, C] = scale * <l2norm(token), l2norm(slot vector)> (sec. 2.3)."""
  x_GSD = l2_normalize(x_GSD.astype(jnp.float32), axis=-1)
  phi_DEC = scale * l2_normalize(phi_DEC.astype(jnp.float32), axis=0)
  return jnp.einsum("GSD,DEC->GSEC", x_GSD, phi_DEC)


def soft_moe_weights(logits_GSEC, mask_GS=None):
  """(dispatch_GSEC, combine_GSEC): softmax over tokens S per slot, and over slots (E, C) per
  token; padding tokens (mask_GS False) get exactly 0 in both."""
  if mask_GS is None:
    mask_GS = jnp.ones(logits_GSEC.shape[:2], bool)
  real_GS11 = mask_GS.astype(bool)[:, :, None, None]
  # Softmax over the real tokens only (padding logits = -inf), written out so that a group of
  # only padding gives 0, not 0/0. The max is a constant shift (softmax is invariant to it).
  max_G1EC = jnp.max(jnp.where(real_GS11, logits_GSEC, -jnp.inf), axis=1, keepdims=True)
  max_G1EC = jax.lax.stop_gradient(jnp.where(jnp.isfinite(max_G1EC), max_G1EC, 0.0))
  exp_GSEC = jnp.where(real_GS11, jnp.exp(jnp.where(real_GS11, logits_GSEC - max_G1EC, 0.0)),
                       0.0)
  # The sum is >= 1 (its largest term is exp(0)) when the group has a real token, else 0.
  dispatch_GSEC = exp_GSEC / jnp.maximum(jnp.sum(exp_GSEC, axis=1, keepdims=True), 1.0)
  combine_GSEC = jax.nn.softmax(logits_GSEC, axis=(2, 3)) * real_GS11
  return dispatch_GSEC, combine_GSEC


def soft_moe_stats(combine_GSEC, mask_GS=None) -> routing.RouterStats:
  """RouterStats of a Soft MoE layer, averaged over the real tokens.

  load_balancing_loss 0: every expert processes its C slots whatever the logits, so there is no
    load to balance. z_loss 0: the paper (and its code) trains with no aux loss, and the l2
    normalisation already bounds the logits by |scale|, which is what the router z-loss (Zoph
    et al. 2022) buys tokens-choose routers; a z-loss here would only fight the learned scale.
  fraction_dropped 0: no token is dropped. expert_load_E: each expert's share of the combine
    weight mass (sums to 1). router_confidence: mean over tokens of the largest combine weight
    (1 / (E*C) for uniform mixing, 1 when a token reads one slot).
  """
  if mask_GS is None:
    mask_GS = jnp.ones(combine_GSEC.shape[:2], bool)
  zero = jnp.zeros((), jnp.float32)
  return routing.RouterStats(
      load_balancing_loss=zero, z_loss=zero, fraction_dropped=zero,
      expert_load_E=routing._token_mean(jnp.sum(combine_GSEC, axis=-1), mask_GS),
      router_confidence=routing._token_mean(jnp.max(combine_GSEC, axis=(2, 3)), mask_GS))


@gin.configurable(module="moe_jax.layers.soft_moe")
class SoftMoE(nn.Module):
  """Soft MoE feed-forward layer (Puigcerver et al. 2023); a drop-in for `MoeLayer` in encoders.

  Params: `phi` [D, E*C] (the slot parameters; column e*C + c is slot c of expert e), `scale`
  [] and the stacked `expert` (`wi[_i]/kernel` [E, D, F], `wo/kernel` [E, F, D], as MoeLayer's).
  Each sequence's E*C slots cost E*C expert token-passes, whatever its length: the paper sets
  E*C near the number of tokens. `causal=True` (what decoders ask for) is refused.
  """
  num_experts: int = 8
  slots_per_expert: int = 1
  expert: ExpertMlp = ExpertMlp()
  dtype: Any = jnp.float32
  phi_init: Any = default_phi_init
  causal: bool = False

  def __post_init__(self):
    for name in ("num_experts", "slots_per_expert"):
      if getattr(self, name) < 1:
        raise ValueError(f"SoftMoE.{name} must be >= 1, got {getattr(self, name)}")
    if self.causal:
      raise ValueError("SoftMoE mixes every token of a sequence into every slot, future tokens "
                       "included, so it cannot be causal: it is for encoders and classifiers "
                       "only (e.g. SparseEncoder.moe = @SoftMoE()). Use a MoeLayer in decoders.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BLD, padding_mask_BL=None, deterministic: bool = True):
    # One group per sequence: G = B, S = L.
    x_GSD = nn.with_logical_constraint(x_BLD, ("batch", "unmodeled", "embed"))
    d_model, num_slots = x_BLD.shape[-1], self.num_experts * self.slots_per_expert
    # Stored [D, E*C], the paper's shape: a logical axis name may not repeat in one array.
    phi_DEC = self.param("phi", nn.with_logical_partitioning(self.phi_init, ("embed", "unmodeled")),
                         (d_model, num_slots), jnp.float32).reshape(d_model, self.num_experts, -1)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ()), (),
                       jnp.float32)
    mask_GS = None if padding_mask_BL is None else padding_mask_BL.astype(bool)
    dispatch_GSEC, combine_GSEC = soft_moe_weights(soft_moe_logits(x_GSD, phi_DEC, scale),
                                                   mask_GS)
    self.sow(MOE_STATS, "router_stats", soft_moe_stats(combine_GSEC, mask_GS))

    local_axes = (None, "batch", None, "embed")  # the slots of this shard's sequences
    expert_axes = ("expert", "expert_group", "unmodeled", "embed")
    x_EGCD = jnp.einsum("GSEC,GSD->EGCD", dispatch_GSEC.astype(self.dtype),
                        x_GSD.astype(self.dtype))
    # All-to-all (as in MoeLayer): slots go from ('data', 'expert') shards to 'data' only,
    # experts onto 'expert'.
    x_EGCD = nn.with_logical_constraint(nn.with_logical_constraint(x_EGCD, local_axes),
                                        expert_axes)
    y_EGCD = nn.with_logical_constraint(self.expert(x_EGCD, deterministic=deterministic),
                                        expert_axes)
    # All-to-all back: experts leave 'expert', sequences return to their batch shards.
    y_EGCD = nn.with_logical_constraint(y_EGCD, local_axes)
    y_GSD = jnp.einsum("GSEC,EGCD->GSD", combine_GSEC.astype(y_EGCD.dtype), y_EGCD)
    return nn.with_logical_constraint(y_GSD, ("batch", "length", "embed")).astype(x_BLD.dtype)
