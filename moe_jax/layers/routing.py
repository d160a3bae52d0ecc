"""Routers: which tokens go to which experts, with what weight, plus aux losses and metrics.

Every router maps the tokens of each group, `x_GSD`, to ONE output type, `RouterOutput`, in
*buffer* form: for each group g, expert e and capacity slot c, which token of the group fills
the slot and with what combine weight. Tokens-choose routers (Switch, top-k) fill the buffer in
priority order until an expert is full; expert-choice routers fill it directly. Every dispatch
backend (`moe_jax.layers.dispatch`) consumes that one type.

Router math is float32 whatever the model dtype ("selective precision", Fedus et al. 2021).

Expert capacity, the ONE formula (`expert_capacity`):

    C = min(S, max(min_expert_capacity, ceil(capacity_factor * k * S / E)))

k is the number of experts each token picks (1 for Switch and expert-choice, whose capacity
factor is the average number of experts per token). No expert can hold more than the S tokens of
a group, hence the cap.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from flax import struct

# The rng stream of all router randomness (jitter, the GShard random second-expert policy).
ROUTING_RNG = "routing"

_SECOND_EXPERT_POLICIES = ("all", "random", "threshold")


@struct.dataclass
class RouterStats:
  """Per-layer aux losses and routing metrics (float32, averaged over the real tokens).

  load_balancing_loss: the router's balance loss: Switch `E * sum_e f_e * P_e` (see
    `load_balancing_loss`); the weighted importance + load losses for noisy top-k gating
    (`moe_jax.layers.noisy_routing`); 0 for expert choice.
  z_loss: router z-loss `mean_tokens logsumexp(logits)^2` (Zoph et al. 2022).
  fraction_dropped: fraction of (non-padding) tokens that no expert processes.
  expert_load_E: [E] fraction of routing choices (before capacity) that go to each expert.
  router_confidence: mean over tokens of the top-1 router probability.
  """
  load_balancing_loss: jax.Array
  z_loss: jax.Array
  fraction_dropped: jax.Array
  expert_load_E: jax.Array
  router_confidence: jax.Array


@struct.dataclass
class RouterOutput:
  """Routing of one MoE layer in buffer form.

  token_index_GEC: [G, E, C] int32, the token (index into the group's S tokens) in slot c of
    expert e; 0 where the slot is empty.
  combine_GEC: [G, E, C] float32, weight of that expert's output for that token; exactly 0 where
    the slot is empty. Differentiable w.r.t. the router weights.
  valid_GEC: [G, E, C] bool, whether the slot holds a token.
  stats: aux losses and metrics.
  With `capacity=None` (dropless, tokens-choose routers only) the three buffers are None and
  `choices` holds every token's k choices instead; nothing is dropped.
  """
  token_index_GEC: Optional[jax.Array]
  combine_GEC: Optional[jax.Array]
  valid_GEC: Optional[jax.Array]
  stats: RouterStats
  # Dropless routing (`capacity=None`, tokens-choose routers): the choices themselves, no buffers.
  choices: Optional["TokenChoices"] = None


@struct.dataclass
class TokenChoices:
  """Each token's k expert choices before capacity: what tokens-choose routers differ in.

  expert_GSK: [G, S, K] int32 chosen experts, best first. gate_GSK: [G, S, K] float32 combine
  weights. valid_GSK: [G, S, K] bool, False for padding (and GShard's skipped 2nd choices).
  top1_GS: [G, S] the best choice's score: batch-prioritized routing's order and the
  router_confidence metric. load_balancing_loss, z_loss: the router's aux losses (RouterStats).
  """
  expert_GSK: jax.Array
  gate_GSK: jax.Array
  valid_GSK: jax.Array
  top1_GS: jax.Array
  load_balancing_loss: jax.Array
  z_loss: jax.Array


def expert_capacity(group_size: int, num_experts: int, k: float, capacity_factor: float,
                    min_expert_capacity: int) -> int:
  """Slots per expert per group: min(S, max(min_expert_capacity, ceil(cf * k * S / E)))."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  capacity = math.ceil(capacity_factor * k * group_size / num_experts)
  return int(min(group_size, max(min_expert_capacity, capacity)))


def _masked_mean(x, mask, axis):
  """Mean of x over `axis` counting only mask=True entries (0 when none)."""
  mask = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def _token_mean(x_GS, mask_GS):
  """Mean over every real token of every group of x [G, S, ...] (padding-only groups count 0)."""
  return _masked_mean(x_GS, mask_GS.reshape(mask_GS.shape + (1,) * (x_GS.ndim - 2)), axis=(0, 1))


def load_balancing_loss(probs_GSE, expert_GSK, mask_GS):
  """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), flaxformer's top-k form.

  f_e = fraction of tokens whose k choices include expert e, P_e = mean router probability of
  e, loss = E * sum_e f_e * P_e per group, averaged over groups weighted by their real tokens.
  Perfect balance gives k (1 for top-1);
  all tokens on one expert with probability 1 gives E. Padding tokens (mask_GS False) are ignored.
  """
  num_experts = probs_GSE.shape[-1]
  chosen_GSE = jnp.max(jax.nn.one_hot(expert_GSK, num_experts, dtype=jnp.float32), axis=-2)
  f_GE = _masked_mean(chosen_GSE, mask_GS[..., None], axis=1)
  p_GE = _masked_mean(probs_GSE, mask_GS[..., None], axis=1)
  # Groups weigh by their real tokens, so a group of padding (eval batches) adds nothing.
  tokens_G = jnp.sum(mask_GS, axis=1).astype(jnp.float32)
  loss_G = jnp.sum(f_GE * p_GE, axis=-1) * num_experts
  return jnp.sum(loss_G * tokens_G) / jnp.maximum(jnp.sum(tokens_G), 1.0)


def router_z_loss(logits_GSE, mask_GS):
  """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
  return _token_mean(jax.nn.logsumexp(logits_GSE, axis=-1) ** 2, mask_GS)


class RouterWeights(nn.Module):
  """Router projection D -> E, float32 (param `router_weights/w/kernel` [D, E], flaxformer's)."""
  kernel_init: Any = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")

  @nn.compact
  def __call__(self, x_GSD, num_experts):
    return nn.DenseGeneral(
        num_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, ("embed", "unmodeled")),
        name="w")(x_GSD)


class Router(nn.Module):
  """Shared front half of every router: jittered float32 logits -> probabilities.

  Subclasses implement `route` (the selection) and set `k` (experts per token, used by the
  capacity formula). `causal=True` (set by decoders) routes each token using only itself and
  the tokens before it in its group, so later tokens never change earlier outputs; routers
  that cannot do that refuse it by name.
  """
  jitter_noise: float = 0.0
  ignore_padding_tokens: bool = True
  batch_prioritized_routing: bool = False
  kernel_init: Any = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
  causal: bool = False

  k: int = 1

  def __post_init__(self):
    name = type(self).__name__
    if self.jitter_noise < 0:
      raise ValueError(f"{name}.jitter_noise must be >= 0, got {self.jitter_noise}")
    if self.k < 1:
      raise ValueError(f"{name}.k must be >= 1, got {self.k}")
    if self.causal and self.batch_prioritized_routing:
      raise ValueError(
          f"{name}.batch_prioritized_routing=True orders each group by router probability, "
          f"future tokens included, so it cannot route a causal decoder. Bind it for the "
          f"encoder only, e.g. --gin.encoder/{name}.batch_prioritized_routing=True")
    super().__post_init__()

  def experts_per_token(self, capacity_factor: float) -> float:
    """Mean experts that process a token: k for tokens-choose routers."""
    del capacity_factor
    return float(self.k)

  @nn.compact
  def __call__(self, x_GSD, *, num_experts: int, capacity: Optional[int],
               padding_mask_GS=None, deterministic: bool = True,
               expert_fill_GE=None) -> RouterOutput:
    """Routes each group; `expert_fill_GE` [G, E] (decoding) counts the slots that earlier
    tokens of each group already fill, so this call's tokens continue those buffers.
    `capacity=None`: dropless, the `TokenChoices` without buffers (tokens-choose routers)."""
    x_GSD = x_GSD.astype(jnp.float32)
    if self.jitter_noise > 0 and not deterministic:
      # Multiplicative jitter on the router inputs (Switch Transformer, sec. 2.4).
      x_GSD *= jax.random.uniform(self.make_rng(ROUTING_RNG), x_GSD.shape, jnp.float32,
                                  1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    if padding_mask_GS is None or not self.ignore_padding_tokens:
      mask_GS = jnp.ones(x_GSD.shape[:2], bool)
    else:
      mask_GS = padding_mask_GS.astype(bool)
    return self.route_tokens(x_GSD, mask_GS, num_experts, capacity, deterministic,
                             expert_fill_GE)

  def route_tokens(self, x_GSD, mask_GS, num_experts, capacity, deterministic,
                   expert_fill_GE=None) -> RouterOutput:
    """Scores the tokens with `router_weights` and routes them; routers whose scores need
    more than one projection of x (noisy gating) override this."""
    logits_GSE = RouterWeights(self.kernel_init, name="router_weights")(x_GSD, num_experts)
    if expert_fill_GE is None:
      return self.route(logits_GSE, mask_GS, capacity, deterministic)
    return self.route(logits_GSE, mask_GS, capacity, deterministic, expert_fill_GE=expert_fill_GE)

  def route(self, logits_GSE, mask_GS, capacity, deterministic) -> RouterOutput:
    raise NotImplementedError


def _fill_buffers(expert_A, token_A, gate_A, valid_A, num_experts, capacity, fill_E=None):
  """Puts routing choices, given in priority order, into [E, C] expert buffers (one group).

  Choice a goes to slot `position` of expert `expert_A[a]`, where position counts the earlier
  valid choices for the same expert, starting at `fill_E[e]` (slots that earlier tokens of the
  group fill: one-token decoding steps; default 0); choices at position >= C are dropped.
  Linear in the number of choices up to a sort, so it serves every backend. Returns buffers
  and kept_A.
  """
  num_choices = expert_A.shape[0]
  key_A = jnp.where(valid_A, expert_A, num_experts)  # invalid choices sort last, bucket E
  perm = jnp.argsort(key_A, stable=True)
  sorted_expert = key_A[perm]
  counts = jnp.bincount(key_A, length=num_experts + 1)
  starts = jnp.cumsum(counts) - counts
  if fill_E is not None:  # an offset per expert; bucket E (invalid choices) has none
    starts -= jnp.concatenate([fill_E.astype(starts.dtype), jnp.zeros((1,), starts.dtype)])
  position = jnp.arange(num_choices) - starts[sorted_expert]
  kept_sorted = (sorted_expert < num_experts) & (position < capacity)
  slot = jnp.where(kept_sorted, sorted_expert * capacity + position, num_experts * capacity)
  size = num_experts * capacity
  scatter = lambda v: (jnp.zeros((size,), v.dtype).at[slot].set(v[perm], mode="drop")
                       .reshape(num_experts, capacity))
  kept_A = jnp.zeros((num_choices,), bool).at[perm].set(kept_sorted)
  return scatter(token_A), scatter(jnp.where(valid_A, gate_A, 0.0)), scatter(kept_A), kept_A


def top_k_experts(probs_GSE, k: int):
  """(values, indices) of the k largest probabilities per token, like `jax.lax.top_k`.

  Built from k argmax reductions: GSPMD partitions those over sharded groups, whereas it
  all-gathers the whole [G, S, E] tensor for `lax.top_k`. Ties go to the lower expert index.
  """
  values, indices = [], []
  for _ in range(k):
    index_GS = jnp.argmax(probs_GSE, axis=-1)
    values.append(jnp.take_along_axis(probs_GSE, index_GS[..., None], axis=-1)[..., 0])
    indices.append(index_GS)
    probs_GSE = jnp.where(jax.nn.one_hot(index_GS, probs_GSE.shape[-1], dtype=bool), -jnp.inf,
                          probs_GSE)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1).astype(jnp.int32)


class _TokensChoose(Router):
  """Each token picks its top-k experts; experts keep the first C choices in priority order.

  Priority: all first choices outrank all second choices, and so on (GShard, Flaxformer).
  Within a choice rank, tokens are taken in sequence order, or by descending top-1 probability
  with `batch_prioritized_routing` (BPR, Riquelme et al. 2021), which makes the kept set
  invariant to token order. `causal=True` takes the choices token by token instead (all k
  choices of token s before any of token s+1): otherwise a later token's first choice could
  evict an earlier token's second choice. For k=1 both orders are the same.

  `second_expert_policy`: which tokens use their 2nd choice (GShard, Lepikhin et al. 2020,
  arXiv:2006.16668; Mesh TF `moe.py`, lingvo `gshard_layers.py`), g2n = g2 / (g1 + g2):
  "all": always; "random": with probability 2 * g2n, in training only; "threshold": when
  g2n > `second_expert_threshold`, in training AND eval (deterministic, so causal decoders
  too; lingvo applies it in both, Mesh TF's eval policy is the same by default). Gates are
  unchanged; the balance loss and expert_load_E count the choices before the policy.
  """
  renormalize: bool = False
  second_expert_policy: str = "all"
  second_expert_threshold: float = 0.0

  def __post_init__(self):
    name = type(self).__name__
    if self.second_expert_policy not in _SECOND_EXPERT_POLICIES:
      raise ValueError(f"{name}.second_expert_policy must be one of "
                       f"{_SECOND_EXPERT_POLICIES}, got {self.second_expert_policy!r}")
    if not 0.0 <= self.second_expert_threshold <= 1.0:
      raise ValueError(f"{name}.second_expert_threshold must be in [0, 1], "
                       f"got {self.second_expert_threshold}")
    if self.second_expert_policy == "threshold" and self.k != 2:
      raise ValueError(f"{name}.second_expert_policy='threshold' is GShard's top-2 rule: it "
                       f"needs k=2, got k={self.k}")
    if self.second_expert_threshold and self.second_expert_policy != "threshold":
      raise ValueError(f"{name}.second_expert_threshold is only read by second_expert_policy="
                       f"'threshold', got {self.second_expert_policy!r}")
    super().__post_init__()

  def route(self, logits_GSE, mask_GS, capacity, deterministic, expert_fill_GE=None):
    return self.fill_choices(self.choose(logits_GSE, mask_GS, deterministic), mask_GS,
                             logits_GSE.shape[-1], capacity, expert_fill_GE)

  def choose(self, logits_GSE, mask_GS, deterministic) -> TokenChoices:
    """Softmax top-k choices with the Switch balance loss and the router z-loss."""
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    gate_GSK, expert_GSK = top_k_experts(probs_GSE, self.k)
    top1_GS = gate_GSK[..., 0]
    if self.renormalize:  # Mixtral / DeepSeek: weights sum to 1 over the chosen k.
      gate_GSK = gate_GSK / jnp.sum(gate_GSK, axis=-1, keepdims=True)
    valid_GSK = self.second_expert_valid(
        gate_GSK, jnp.broadcast_to(mask_GS[..., None], gate_GSK.shape), deterministic)
    return TokenChoices(expert_GSK, gate_GSK, valid_GSK, top1_GS,
                        load_balancing_loss(probs_GSE, expert_GSK, mask_GS),
                        router_z_loss(logits_GSE, mask_GS))

  def second_expert_valid(self, gate_GSK, valid_GSK, deterministic):
    """valid_GSK less the 2nd choices the policy skips (reads g2 / (g1 + g2): any gate scale)."""
    if self.k < 2 or self.second_expert_policy == "all":
      return valid_GSK
    g1, g2 = gate_GSK[..., 0], gate_GSK[..., 1]
    if self.second_expert_policy == "threshold":
      # g2 / (g1 + g2) > t, without the division (g1 + g2 > 0 for softmax and sigmoid gates).
      keep_GS = g2 > self.second_expert_threshold * (g1 + g2)
    elif deterministic:  # "random" samples in training only
      return valid_GSK
    else:  # GShard: use the 2nd expert with probability 2 * g2 / (g1 + g2).
      u_GS = jax.random.uniform(self.make_rng(ROUTING_RNG), g1.shape)
      keep_GS = u_GS < 2 * g2 / (g1 + g2)
    return valid_GSK.at[..., 1].set(valid_GSK[..., 1] & keep_GS)

  def fill_choices(self, choices: TokenChoices, mask_GS, num_experts, capacity,
                   expert_fill_GE=None) -> RouterOutput:
    """The one path from (expert, gate) choices to buffers and metrics, shared by every
    tokens-choose router: priority order, capacity, causal order, decode-time fill.
    `capacity=None` (dropless) keeps every valid choice: the choices come back unbuffered."""
    expert_GSK, gate_GSK, valid_GSK = choices.expert_GSK, choices.gate_GSK, choices.valid_GSK
    num_groups, group_size, k = expert_GSK.shape
    if capacity is None:  # dropless: every valid choice is processed, nothing to fill
      stats = self._stats(choices, mask_GS, num_experts, jnp.zeros((), jnp.float32))
      return RouterOutput(None, None, None, stats, choices)
    if self.batch_prioritized_routing:
      order_GS = jnp.argsort(-jnp.where(mask_GS, choices.top1_GS, -1.0), axis=-1, stable=True)
    else:
      order_GS = jnp.broadcast_to(jnp.arange(group_size), (num_groups, group_size))
    # Choices in priority order: choice-major [G, K, S] -> [G, K*S], or token-major (causal)
    # [G, S, K] -> [G, S*K].
    def take(v_GSK):
      v_GSK = jnp.take_along_axis(v_GSK, order_GS[..., None], axis=1)
      return v_GSK if self.causal else v_GSK.swapaxes(1, 2)

    flat = lambda v: v.reshape(num_groups, -1)
    token_GA = flat(take(jnp.broadcast_to(jnp.arange(group_size)[:, None], expert_GSK.shape)))
    fill = jax.vmap(_fill_buffers, in_axes=(0, 0, 0, 0, None, None, 0))
    token_GEC, combine_GEC, valid_GEC, kept_GA = fill(
        flat(take(expert_GSK)), token_GA, flat(take(gate_GSK)), flat(take(valid_GSK)),
        num_experts, capacity, expert_fill_GE)

    kept_GS = jnp.zeros((num_groups, group_size), bool).at[
        jnp.arange(num_groups)[:, None], token_GA].max(kept_GA)
    stats = self._stats(choices, mask_GS, num_experts, _token_mean(1.0 - kept_GS, mask_GS))
    return RouterOutput(token_GEC, combine_GEC, valid_GEC, stats)

  @staticmethod
  def _stats(choices: TokenChoices, mask_GS, num_experts, fraction_dropped) -> RouterStats:
    k = choices.expert_GSK.shape[-1]
    return RouterStats(
        load_balancing_loss=choices.load_balancing_loss,
        z_loss=choices.z_loss,
        fraction_dropped=fraction_dropped,
        expert_load_E=_token_mean(
            jnp.sum(jax.nn.one_hot(choices.expert_GSK, num_experts), axis=-2) / k, mask_GS),
        router_confidence=_token_mean(choices.top1_GS, mask_GS))


@gin.configurable(module="moe_jax.layers.routing")
class SwitchRouter(_TokensChoose):
  """Top-1 tokens-choose routing (Switch Transformer, Fedus et al. 2021, arXiv:2101.03961)."""
  k: int = 1

  def __post_init__(self):
    if self.k != 1:
      raise ValueError(f"SwitchRouter.k is 1 by definition, got {self.k}; use TopKRouter")
    super().__post_init__()


@gin.configurable(module="moe_jax.layers.routing")
class TopKRouter(_TokensChoose):
  """Top-k tokens-choose routing (GShard, Lepikhin et al. 2020, arXiv:2006.16668).

  `renormalize=False` keeps the raw softmax probabilities as combine weights (Switch,
  Flaxformer); `True` renormalises them over the chosen k (Mixtral, DeepSeek).
  `second_expert_policy="random"` is GShard's stochastic dispatch to the 2nd expert (training
  only); `"threshold"` with `second_expert_threshold` its deterministic one (see _TokensChoose).
  """
  k: int = 2


@gin.configurable(module="moe_jax.layers.routing")
class ExpertChoiceRouter(Router):
  """Experts choose their top-C tokens (Zhou et al. 2022, arXiv:2202.09368).

  Token-to-expert scores are the softmax over experts; expert e keeps the C tokens of the group
  with the highest score and weights its output by that score. Every expert is full by
  construction, so no balance loss is needed (it is 0). It looks at every token of a group,
  future ones included, so it cannot route a causal decoder. Padding tokens are never chosen
  while real tokens remain.
  """

  def __post_init__(self):
    if self.causal:
      raise ValueError("ExpertChoiceRouter picks tokens using the whole group, future tokens "
                       "included: it cannot route a causal decoder. Use SwitchRouter or "
                       "TopKRouter in the decoder.")
    super().__post_init__()

  def experts_per_token(self, capacity_factor: float) -> float:
    """The capacity factor: experts take C = cf * S / E tokens each, cf per token on average."""
    return float(capacity_factor)

  def route(self, logits_GSE, mask_GS, capacity, deterministic):
    if capacity is None:
      raise ValueError("ExpertChoiceRouter fills expert buffers of a fixed capacity by "
                       "construction: it has no dropless form (capacity=None)")
    num_experts = logits_GSE.shape[-1]
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    scores_GES = jnp.where(mask_GS[..., None], probs_GSE, -1.0).swapaxes(1, 2)
    # Each expert's top-C tokens, as `lax.top_k` orders them (descending score, ties to the
    # lower token index), from a sort on keys (-score, token): GSPMD sorts each shard's groups
    # in place, whereas it all-gathers every group's scores for `lax.top_k`.
    _, token_GES = jax.lax.sort(
        (-scores_GES, jax.lax.broadcasted_iota(jnp.int32, scores_GES.shape, 2)),
        dimension=2, num_keys=2)
    token_GEC = token_GES[..., :capacity]
    score_GEC = jnp.take_along_axis(scores_GES, token_GEC, axis=2)
    valid_GEC = score_GEC >= 0.0
    chosen_GS = jnp.zeros(mask_GS.shape, bool).at[
        jnp.arange(mask_GS.shape[0])[:, None, None], token_GEC].max(valid_GEC)
    preferred_GSE = jax.nn.one_hot(jnp.argmax(probs_GSE, axis=-1), num_experts)
    stats = RouterStats(
        load_balancing_loss=jnp.zeros((), jnp.float32),
        z_loss=router_z_loss(logits_GSE, mask_GS),
        fraction_dropped=_token_mean(1.0 - chosen_GS, mask_GS),
        expert_load_E=_token_mean(preferred_GSE, mask_GS),
        router_confidence=_token_mean(jnp.max(probs_GSE, -1), mask_GS))
    return RouterOutput(jnp.where(valid_GEC, token_GEC, 0), jnp.where(valid_GEC, score_GEC, 0.0),
                        valid_GEC, stats)
