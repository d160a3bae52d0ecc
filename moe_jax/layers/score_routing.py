"""Score routers: X-MoE's cosine router and DeepSeek-V3's sigmoid router with aux-loss-free
load balancing.

Both are tokens-choose routers: they score and pick differently, then hand their (expert, gate)
choices to `routing._TokensChoose.fill_choices`, the one path to buffers that gives every
router the same capacity, priority order, causal order and decode-time fill.

Cosine routing (X-MoE, Chi et al. 2022, arXiv:2204.09179, sec. 3), per token x:

    h = x W_proj                           W_proj [D, P], P = projection_dim << D
    logits_e = cos(h, w_e) / tau           w_e: learnable expert embeddings [E, P]
    probs = softmax(logits) -> top-k       Switch balance loss, z-loss on these logits

cos(u, v) = u.v / (max(|u|, eps) max(|v|, eps)) with eps = NORM_EPSILON (torch F.normalize's
convention): the max only acts on a vector shorter than eps, which it sends to ~0 instead of
NaN, so for every token with |x W_proj| >= eps the routing is exactly invariant to scaling x by
any a > 0. Projecting to a low dimension before the cosine is X-MoE's remedy for representation
collapse. tau = exp(clip(log_tau, log min_temperature, log max_temperature)), log_tau learnable
from log(0.07) (X-MoE's init); the clip keeps tau in [0.01, 1] by default (0.01: CLIP's clamp
of its logit scale at 100), so |logits| <= 1 / min_temperature, and gives log_tau no gradient
while it lies outside that range.

Sigmoid routing (DeepSeek-V3, DeepSeek-AI 2024, arXiv:2412.19437, sec. 2.1.2), per token x:

    s = sigmoid(x W)                       affinities [E], float32
    chosen = top-k of s + b                b [E]: per-expert bias, used for the SELECTION only
    gates = s[chosen] (/ sum s[chosen] with renormalize) * route_scale

Auxiliary-loss-free balancing (sec. 2.1.2): b lives in its own collection ROUTER_BIAS (not a
param: no gradient, no optimizer), zeros at init, and after every training step moves by

    b_e += gamma * sign(mean_e'(load_e') - load_e)      gamma = bias_update_rate

load_e being the real (non-padding) tokens that chose expert e, before capacity, over the
step's whole global batch. In training the router sows its load into ROUTER_LOAD (a `BiasLoad`
under the bias's own path); the trainer sums it over microbatches and applies
`update_router_bias` once per step, so gradient accumulation updates b as the full batch does.

Complementary sequence-wise balance loss (eq. 17-20), per routing group of T real tokens:

    f_i = E / (K T) * #{tokens choosing i}     P_i = 1/T sum_t s_i,t / sum_j s_j,t
    L = sum_i f_i P_i                          (1 at perfect balance)

A group is a sequence when `MoeLayer.sequence_groups=True` (the paper's setting), otherwise up
to `max_group_size` tokens of the batch; groups are averaged weighted by their real tokens.
Configs bind `moe_loss_terms.aux_loss_factor` to the paper's alpha (1e-4). DeepSeek-V3 uses no
router z-loss (a softmax regulariser), so the sigmoid router reports 0 for it.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from flax import struct, traverse_util

from moe_jax.layers import routing
from moe_jax.layers.routing import RouterWeights, TokenChoices

# Flax collections of aux-loss-free balancing: the persistent per-expert biases, and the
# per-step expert loads that training applies sow (a `BiasLoad` under each bias's path).
ROUTER_BIAS = "router_bias"
ROUTER_LOAD = "router_load"

NORM_EPSILON = 1e-6


def l2_normalize(v, axis=-1):
  """v / max(|v|, NORM_EPSILON) along `axis`; finite gradients at v = 0."""
  return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=axis, keepdims=True),
                                       NORM_EPSILON**2))


# Name under which a router whose softmax logits are not its `router_weights` output sows them.
ROUTING_SCORES = "routing_scores"


@gin.configurable(module="moe_jax.layers.score_routing")
class CosineRouter(routing._TokensChoose):
  """X-MoE cosine routing (Chi et al. 2022, arXiv:2204.09179), softmax top-k (see above).

  Params `projection/w/kernel` [D, projection_dim], `expert_embeddings` [E, projection_dim],
  `log_temperature` (scalar).
  """
  k: int = 1
  projection_dim: int = 16
  initial_temperature: float = 0.07
  min_temperature: float = 0.01
  max_temperature: float = 1.0
  embedding_init: Any = nn.initializers.orthogonal()

  def __post_init__(self):
    if self.projection_dim < 1:
      raise ValueError(f"CosineRouter.projection_dim must be >= 1, got {self.projection_dim}")
    if not 0 < self.min_temperature <= self.max_temperature:
      raise ValueError(f"CosineRouter needs 0 < min_temperature <= max_temperature, got "
                       f"{self.min_temperature} and {self.max_temperature}")
    if not self.min_temperature <= self.initial_temperature <= self.max_temperature:
      raise ValueError(f"CosineRouter.initial_temperature={self.initial_temperature} is outside "
                       f"[min_temperature, max_temperature] = "
                       f"[{self.min_temperature}, {self.max_temperature}]")
    super().__post_init__()

  def temperature(self):
    """tau = exp(clip(log_tau)): stays in [min_temperature, max_temperature]."""
    log_tau = self.param(
        "log_temperature",
        nn.with_logical_partitioning(nn.initializers.constant(math.log(self.initial_temperature)),
                                     ()), (), jnp.float32)
    return jnp.exp(jnp.clip(log_tau, math.log(self.min_temperature),
                            math.log(self.max_temperature)))

  def route_tokens(self, x_GSD, mask_GS, num_experts, capacity, deterministic,
                   expert_fill_GE=None):
    h_GSP = RouterWeights(self.kernel_init, name="projection")(x_GSD, self.projection_dim)
    # Replicated like the router kernel (a logical name may occur once per array, so the expert
    # axis is None): every token's routing reads every expert's embedding.
    w_EP = self.param("expert_embeddings",
                      nn.with_logical_partitioning(self.embedding_init, (None, "unmodeled")),
                      (num_experts, self.projection_dim), jnp.float32)
    cosine_GSE = jnp.einsum("GSP,EP->GSE", l2_normalize(h_GSP), l2_normalize(w_EP))
    scores_GSE = cosine_GSE / self.temperature()
    # The routing report's logits (there is no `router_weights` projection to read them from);
    # kept only where "intermediates" is mutable.
    self.sow("intermediates", ROUTING_SCORES, scores_GSE)
    return self.route(scores_GSE, mask_GS, capacity, deterministic, expert_fill_GE)


@struct.dataclass
class BiasLoad:
  """One router's step load: load_E [E] real tokens choosing each expert (before capacity),
  and its bias_update_rate (static)."""
  load_E: jax.Array
  rate: float = struct.field(pytree_node=False)


def sequence_balance_loss(scores_GSE, expert_GSK, mask_GS):
  """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), per group, averaged
  over groups weighted by their real tokens (see the module docstring)."""
  num_experts, k = scores_GSE.shape[-1], expert_GSK.shape[-1]
  real_GS = mask_GS.astype(jnp.float32)
  chosen_GSE = jnp.sum(jax.nn.one_hot(expert_GSK, num_experts, dtype=jnp.float32), axis=-2)
  tokens_G = jnp.sum(real_GS, axis=1)
  f_GE = (num_experts / k) * jnp.einsum("GSE,GS->GE", chosen_GSE, real_GS) / jnp.maximum(
      tokens_G, 1.0)[:, None]
  normalized_GSE = scores_GSE / jnp.sum(scores_GSE, axis=-1, keepdims=True)
  p_GE = jnp.einsum("GSE,GS->GE", normalized_GSE, real_GS) / jnp.maximum(tokens_G, 1.0)[:, None]
  loss_G = jnp.sum(f_GE * p_GE, axis=-1)
  return jnp.sum(loss_G * tokens_G) / jnp.maximum(jnp.sum(tokens_G), 1.0)


@gin.configurable(module="moe_jax.layers.score_routing")
class SigmoidRouter(routing._TokensChoose):
  """DeepSeek-V3 sigmoid top-k routing with aux-loss-free balancing (arXiv:2412.19437).

  `bias_update_rate` is gamma; 0 turns the bias off (no ROUTER_BIAS collection). Param
  `router_weights/w/kernel` [D, E]; variable `router_bias/.../bias` [E].
  """
  k: int = 2
  renormalize: bool = True
  route_scale: float = 1.0
  bias_update_rate: float = 1e-3

  def __post_init__(self):
    if self.second_expert_policy != "all":
      raise ValueError(f"SigmoidRouter.second_expert_policy={self.second_expert_policy!r}: the "
                       f"sigmoid router always dispatches to all k choices; leave it 'all'")
    if self.route_scale <= 0:
      raise ValueError(f"SigmoidRouter.route_scale must be > 0, got {self.route_scale}")
    if self.bias_update_rate < 0:
      raise ValueError(f"SigmoidRouter.bias_update_rate must be >= 0, got "
                       f"{self.bias_update_rate}")
    super().__post_init__()

  def expert_bias(self, num_experts):
    """The selection bias b [E] from ROUTER_BIAS (zeros when balancing is off)."""
    if self.bias_update_rate == 0:
      return jnp.zeros((num_experts,), jnp.float32)
    if not (self.has_variable(ROUTER_BIAS, "bias") or self.is_mutable_collection(ROUTER_BIAS)):
      raise ValueError(f"SigmoidRouter(bias_update_rate={self.bias_update_rate}) reads its "
                       f"expert bias from the {ROUTER_BIAS!r} collection: apply the network "
                       f"with {{'params': ..., **model_state}} (TrainState.model_state, "
                       f"inference.load_model_state_onto_mesh)")
    return self.variable(ROUTER_BIAS, "bias",
                         nn.with_logical_partitioning(jnp.zeros, ("unmodeled",)),
                         (num_experts,), jnp.float32).value

  def choose(self, logits_GSE, mask_GS, deterministic) -> TokenChoices:
    num_experts = logits_GSE.shape[-1]
    scores_GSE = jax.nn.sigmoid(logits_GSE)
    _, expert_GSK = routing.top_k_experts(scores_GSE + self.expert_bias(num_experts), self.k)
    gate_GSK = jnp.take_along_axis(scores_GSE, expert_GSK, axis=-1)
    top1_GS = gate_GSK[..., 0]
    if self.renormalize:
      gate_GSK = gate_GSK / jnp.sum(gate_GSK, axis=-1, keepdims=True)
    gate_GSK = gate_GSK * self.route_scale
    valid_GSK = jnp.broadcast_to(mask_GS[..., None], gate_GSK.shape)
    if self.bias_update_rate > 0 and not deterministic:
      load_E = jnp.sum(jax.nn.one_hot(expert_GSK, num_experts, dtype=jnp.float32)
                       * valid_GSK[..., None], axis=(0, 1, 2))
      self.sow(ROUTER_LOAD, "bias", BiasLoad(load_E, self.bias_update_rate))
    return TokenChoices(expert_GSK, gate_GSK, valid_GSK, top1_GS,
                        sequence_balance_loss(scores_GSE, expert_GSK, mask_GS),
                        jnp.zeros((), jnp.float32))


def update_router_bias(model_state, router_load):
  """`model_state` after one step of aux-loss-free balancing (DeepSeek-V3, sec. 2.1.2).

  Each bias with a sown `BiasLoad` in `router_load` (the ROUTER_LOAD collection, summed over
  microbatches) moves by rate * sign(mean_e(load) - load_e): down for experts above the mean
  load, up below it. A router applied more than once in a step counts all its calls.
  """
  loads = traverse_util.flatten_dict(dict(router_load or {}))  # leaves: tuples of BiasLoad
  if not loads:
    return model_state
  biases = traverse_util.flatten_dict(dict(model_state[ROUTER_BIAS]))
  for path, calls in loads.items():
    load_E = sum(call.load_E for call in calls)
    # Per router: the mean over its experts (a scanned stack's [layers, E] is each layer's).
    mean = jnp.mean(load_E, axis=-1, keepdims=True)
    biases[path] = biases[path] + calls[0].rate * jnp.sign(mean - load_E)
  return {**model_state, ROUTER_BIAS: traverse_util.unflatten_dict(biases)}
