"""Noisy top-k gating and hierarchical MoE (Shazeer et al. 2017, arXiv:1701.06538).

Both are tokens-choose routers: they score and pick differently, then hand their (expert, gate)
choices to `routing._TokensChoose.fill_choices`, the one path to buffers that gives every
router the same capacity, priority order, causal order and decode-time fill.

Noisy top-k gating (sec. 2.1, appendix A), per token x:

    H(x)_i = (x W_g)_i + eps_i * std_i,   std = softplus(x W_noise) + noise_epsilon,  eps ~ N(0, 1)
    gates  = softmax over the k largest H(x)_i (0 elsewhere)

Noise only in training (`deterministic=False`); W_g = W_noise = 0 at init, as in the paper.
`noise_epsilon` (1e-2, the paper's released code) keeps std > 0, so P below never divides by 0.
Aux losses, over all real tokens X of the layer:

    Importance_i = sum_x gates(x)_i                      L_importance = CV^2(Importance)
    P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / std_i)
    Load_i = sum_x P(x, i)                               L_load = CV^2(Load)

kth_excluding(H, k, i) is the k-th largest H_j over j != i: the (k+1)-th largest H when i is
among the chosen k, else the k-th. P is the probability that i is chosen under fresh noise on
its own logit, a smooth (differentiable w.r.t. W_g and W_noise) estimate of the load.

CV^2(v) = var(v) / (mean(v)^2 + 1e-10) with the POPULATION variance (divide by E): the E
experts are the whole population, not a sample of one, so a balanced vector gives exactly 0 and
a one-hot gives exactly E - 1 whatever E; the 1e-10 keeps an all-padding batch at 0.

Both losses go into `RouterStats.load_balancing_loss` as
`importance_weight * L_importance + load_weight * L_load` (the paper's w_importance and w_load,
0.1 each), so the one aux-loss path (`objectives.moe_loss_terms`, times `aux_loss_factor`)
reduces them; bind `moe_loss_terms.aux_loss_factor = 1.0` for the paper's weighting.
The z-loss is that of the clean logits x W_g.

Hierarchical MoE (appendix B): a primary noisy top-k1 gate over P expert groups and, in each
chosen group, a secondary noisy top-k2 gate over its Q experts; the experts stay one stacked
set of E = P * Q (expert p * Q + q), so every dispatch backend serves it. Shape letters here:
P expert groups (not the routing groups G), Q experts per group, I = k1, J = k2.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from moe_jax.layers import routing
from moe_jax.layers.routing import ROUTING_RNG, RouterWeights, TokenChoices

CV_EPSILON = 1e-10


def cv_squared(v_E):
  """Squared coefficient of variation over the last axis, population variance (see above)."""
  mean = jnp.mean(v_E, axis=-1)
  return jnp.var(v_E, axis=-1) / (mean**2 + CV_EPSILON)


def noisy_top_k(clean_GSX, noisy_GSX, std_GSX, k: int):
  """Top-k gates over the last axis (X options) and the smooth load probability P.

  Returns gate_GSK (softmax over the kept noisy logits, best first), choice_GSK (int32) and
  load_prob_GSX = P(x, i) (Shazeer et al. 2017, appendix A, eq. 8-10).
  """
  num_options = noisy_GSX.shape[-1]
  top_GSK, choice_GSK = routing.top_k_experts(noisy_GSX, min(k + 1, num_options))
  gate_GSK = jax.nn.softmax(top_GSK[..., :k], axis=-1)
  choice_GSK = choice_GSK[..., :k]
  if k >= num_options:  # every option is always chosen
    return gate_GSK, choice_GSK, jnp.ones_like(clean_GSX)
  chosen_GSX = jnp.max(jax.nn.one_hot(choice_GSK, num_options, dtype=bool), axis=-2)
  # The k-th largest of the OTHER logits: the (k+1)-th if i is among the top k, else the k-th.
  threshold_GSX = jnp.where(chosen_GSX, top_GSK[..., k:k + 1], top_GSK[..., k - 1:k])
  load_prob_GSX = jax.scipy.special.ndtr((clean_GSX - threshold_GSX) / std_GSX)
  return gate_GSK, choice_GSK, load_prob_GSX


def _dense(gate_GSK, choice_GSK, num_options):
  """[..., K] gates at their chosen indices -> [..., X] with zeros elsewhere."""
  return jnp.sum(jax.nn.one_hot(choice_GSK, num_options) * gate_GSK[..., None], axis=-2)


class _NoisyGating(routing._TokensChoose):
  """Noisy gate projections and checks shared by the two routers below."""
  kernel_init: Any = nn.initializers.zeros
  noise_kernel_init: Any = nn.initializers.zeros
  noise_epsilon: float = 1e-2
  importance_weight: float = 0.1
  load_weight: float = 0.1

  def __post_init__(self):
    name = type(self).__name__
    if self.renormalize or self.second_expert_policy != "all":
      raise ValueError(f"{name} gates are a softmax over the chosen experts already: "
                       f"renormalize and second_expert_policy do not apply")
    if self.noise_epsilon <= 0:
      raise ValueError(f"{name}.noise_epsilon must be > 0, got {self.noise_epsilon}")
    super().__post_init__()

  def _gate(self, x_GSD, num_options, names, deterministic):
    """(clean logits x W_g, noisy logits H, noise std), each [G, S, num_options]."""
    clean = RouterWeights(self.kernel_init, name=names[0])(x_GSD, num_options)
    raw_std = RouterWeights(self.noise_kernel_init, name=names[1])(x_GSD, num_options)
    std = jax.nn.softplus(raw_std) + self.noise_epsilon
    if deterministic:
      return clean, clean, std
    eps = jax.random.normal(self.make_rng(ROUTING_RNG), clean.shape, jnp.float32)
    return clean, clean + eps * std, std

  def _choices(self, expert_GSK, gate_GSK, mask_GS, balance_loss, clean_GSX):
    valid_GSK = jnp.broadcast_to(mask_GS[..., None], gate_GSK.shape)
    return TokenChoices(expert_GSK, gate_GSK, valid_GSK, gate_GSK[..., 0], balance_loss,
                        routing.router_z_loss(clean_GSX, mask_GS))


@gin.configurable(module="moe_jax.layers.noisy_routing")
class NoisyTopKRouter(_NoisyGating):
  """Noisy top-k gating with importance and smooth load losses (Shazeer et al. 2017, sec. 2.1).

  Params `router_weights/w/kernel` (W_g) and `noise_weights/w/kernel` (W_noise), [D, E].
  """
  k: int = 2

  def route_tokens(self, x_GSD, mask_GS, num_experts, capacity, deterministic,
                   expert_fill_GE=None):
    clean_GSE, noisy_GSE, std_GSE = self._gate(x_GSD, num_experts, ("router_weights", "noise_weights"),
                                                  deterministic)
    gate_GSK, expert_GSK, load_prob_GSE = noisy_top_k(clean_GSE, noisy_GSE, std_GSE, self.k)
    real_GS1 = mask_GS[..., None].astype(jnp.float32)
    importance_E = jnp.sum(_dense(gate_GSK, expert_GSK, num_experts) * real_GS1, axis=(0, 1))
    load_E = jnp.sum(load_prob_GSE * real_GS1, axis=(0, 1))
    loss = (self.importance_weight * cv_squared(importance_E)
            + self.load_weight * cv_squared(load_E))
    choices = self._choices(expert_GSK, gate_GSK, mask_GS, loss, clean_GSE)
    return self.fill_choices(choices, mask_GS, num_experts, capacity, expert_fill_GE)


@gin.configurable(module="moe_jax.layers.noisy_routing")
class HierarchicalRouter(_NoisyGating):
  """Two-level noisy top-k gating: groups of experts, then experts (Shazeer et al. 2017, app. B).

  Output weight of expert (p, q) = G_primary(x)_p * G_p(x)_q, for the k_primary chosen groups p
  and the k_secondary chosen experts q of each: k = k_primary * k_secondary choices per token
  (derived; do not bind `k`). Losses, with X^(p) the real tokens whose primary gate picks p:

      Importance_H[p, q] = sum_x G_primary(x)_p * G_p(x)_q
      Load_H[p, q] = Load_primary(X)_p * Load_p(X^(p))_q / |X^(p)|   (0 when X^(p) is empty)

  and CV^2 of each over all E = P * Q entries. Every group's secondary gate is computed for
  every token (one [D, E] projection, as costly as a flat router's), then the chosen groups'
  entries are gathered: no loop over groups, so thousands of experts cost one matmul.
  The z-loss is the primary gate's. Params `primary_weights` / `primary_noise_weights` [D, P], `secondary_weights` /
  `secondary_noise_weights` [D, E] (column p * Q + q is expert q of group p).
  """
  num_groups: int = 4
  k_primary: int = 2
  k_secondary: int = 2

  def __post_init__(self):
    k = self.k_primary * self.k_secondary
    if self.k not in (1, k):  # the base default, or the value a clone carries
      raise ValueError(f"HierarchicalRouter.k is k_primary * k_secondary = {k}; bind those, "
                       f"not k={self.k}")
    object.__setattr__(self, "k", k)
    for name in ("num_groups", "k_primary", "k_secondary"):
      if getattr(self, name) < 1:
        raise ValueError(f"HierarchicalRouter.{name} must be >= 1, got {getattr(self, name)}")
    if self.k_primary > self.num_groups:
      raise ValueError(f"HierarchicalRouter.k_primary={self.k_primary} exceeds "
                       f"num_groups={self.num_groups}")
    super().__post_init__()

  def experts_per_group(self, num_experts: int) -> int:
    if num_experts % self.num_groups or num_experts // self.num_groups < self.k_secondary:
      raise ValueError(f"HierarchicalRouter: MoeLayer.num_experts={num_experts} must be "
                       f"num_groups={self.num_groups} x experts per group (>= k_secondary="
                       f"{self.k_secondary})")
    return num_experts // self.num_groups

  def route_tokens(self, x_GSD, mask_GS, num_experts, capacity, deterministic,
                   expert_fill_GE=None):
    num_groups, per_group = self.num_groups, self.experts_per_group(num_experts)
    clean_GSP, noisy_GSP, std_GSP = self._gate(
        x_GSD, num_groups, ("primary_weights", "primary_noise_weights"), deterministic)
    gate_GSI, group_GSI, load_prob_GSP = noisy_top_k(clean_GSP, noisy_GSP, std_GSP,
                                                     self.k_primary)
    split = lambda v_GSE: v_GSE.reshape(v_GSE.shape[:2] + (num_groups, per_group))
    clean_GSPQ, noisy_GSPQ, std_GSPQ = map(
        split, self._gate(x_GSD, num_experts, ("secondary_weights", "secondary_noise_weights"),
                          deterministic))
    gate_GSPJ, expert_GSPJ, load_prob_GSPQ = noisy_top_k(clean_GSPQ, noisy_GSPQ, std_GSPQ,
                                                         self.k_secondary)

    # The chosen groups' secondary choices: [G, S, I, J] -> K = I * J, best group first.
    pick = lambda v_GSPJ: jnp.take_along_axis(v_GSPJ, group_GSI[..., None], axis=2)
    expert_GSIJ = group_GSI[..., None] * per_group + pick(expert_GSPJ)
    gate_GSIJ = gate_GSI[..., None] * pick(gate_GSPJ)
    flat = lambda v_GSIJ: v_GSIJ.reshape(v_GSIJ.shape[:2] + (-1,))

    real_GS11 = mask_GS[..., None, None].astype(jnp.float32)
    primary_GSP1 = _dense(gate_GSI, group_GSI, num_groups)[..., None]
    importance_PQ = jnp.sum(primary_GSP1 * _dense(gate_GSPJ, expert_GSPJ, per_group)
                            * real_GS11, axis=(0, 1))
    in_group_GSP1 = jnp.max(jax.nn.one_hot(group_GSI, num_groups), axis=-2)[..., None]
    in_group_GSP1 *= real_GS11
    load_primary_P = jnp.sum(load_prob_GSP * real_GS11[..., 0], axis=(0, 1))
    load_secondary_PQ = jnp.sum(load_prob_GSPQ * in_group_GSP1, axis=(0, 1))
    group_tokens_P = jnp.sum(in_group_GSP1[..., 0], axis=(0, 1))
    load_PQ = (load_primary_P[:, None] * load_secondary_PQ
               / jnp.maximum(group_tokens_P, 1.0)[:, None])
    loss = (self.importance_weight * cv_squared(importance_PQ.reshape(-1))
            + self.load_weight * cv_squared(load_PQ.reshape(-1)))
    choices = self._choices(flat(expert_GSIJ), flat(gate_GSIJ), mask_GS, loss, clean_GSP)
    return self.fill_choices(choices, mask_GS, num_experts, capacity, expert_fill_GE)
