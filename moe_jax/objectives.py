"""Task losses and the reduction of MoE aux losses / routing metrics.

total loss = cross entropy (+ output-logit z-loss)
           + aux_loss_factor * mean over MoE layers of the load-balancing loss
           + z_loss_factor   * mean over MoE layers of the router z-loss
(defaults 1e-2 and 1e-3; the mean over layers follows T5X's MoE models).
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
from flax import traverse_util

from moe_jax.layers.moe import MOE_STATS
from moe_jax.layers.routing import RouterStats
from moe_jax.layers.score_routing import ROUTER_BIAS, ROUTER_LOAD

# The network's persistent non-param collections (`TrainState.model_state`): updated outside
# the optimizer, checkpointed, and applied beside the params everywhere.
STATE_COLLECTIONS = (ROUTER_BIAS,)


def loss_weights(targets_BL, weights_BL=None):
  """float32 per-token loss weights: `weights_BL` (decoder_loss_weights) or non-padding."""
  return (targets_BL > 0 if weights_BL is None else weights_BL).astype(jnp.float32)


def cross_entropy(logits_BLV, targets_BL, weights_BL=None, logit_z_loss: float = 0.0):
  """Weighted token cross entropy, its output-logit z-loss and accuracy, averaged over weights."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  weights_BL = loss_weights(targets_BL, weights_BL)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  denom = jnp.maximum(jnp.sum(weights_BL), 1.0)
  mean = lambda v_BL: jnp.sum(v_BL * weights_BL) / denom
  return {
      "cross_entropy": mean(lse_BL - target_logit_BL),
      "logit_z_loss": logit_z_loss * mean(lse_BL**2),
      "accuracy": mean((jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)),
      "num_tokens": jnp.sum(weights_BL),
  }


def router_stats_by_layer(moe_stats: Mapping[str, Any]) -> dict[str, RouterStats]:
  """'encoder/layers_1/mlp' -> RouterStats, from the sown MOE_STATS collection.

  A layer called more than once in one apply (shared weights) is averaged over its calls.
  """
  flat = traverse_util.flatten_dict(dict(moe_stats), sep="/")
  out = {}
  for path, calls in flat.items():
    layer = path.rsplit("/", 1)[0]
    out[layer] = jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *calls)
  return out


@gin.configurable(module="moe_jax.objectives")
def moe_loss_terms(moe_stats: Mapping[str, Any], aux_loss_factor: float = 1e-2,
                   z_loss_factor: float = 1e-3) -> dict[str, Any]:
  """Weighted aux losses (means over MoE layers) and per-layer routing metrics.

  Returns {"aux_loss", "z_loss"} (already multiplied by their factors; 0 for a dense model) and
  unweighted metrics: mean "fraction_dropped", "router_confidence", and
  "expert_load/<layer>" [E] for every MoE layer.
  """
  layers = router_stats_by_layer(moe_stats.get(MOE_STATS, moe_stats) if moe_stats else {})
  zero = jnp.zeros((), jnp.float32)
  if not layers:
    return {"aux_loss": zero, "z_loss": zero, "fraction_dropped": zero,
            "router_confidence": zero}
  mean = lambda field: jnp.mean(jnp.stack([getattr(s, field) for s in layers.values()]))
  out = {
      "aux_loss": aux_loss_factor * mean("load_balancing_loss"),
      "z_loss": z_loss_factor * mean("z_loss"),
      "fraction_dropped": mean("fraction_dropped"),
      "router_confidence": mean("router_confidence"),
  }
  out.update({f"expert_load/{name}": s.expert_load_E for name, s in layers.items()})
  return out


def model_inputs(network, batch: Mapping[str, Any]) -> dict[str, Any]:
  """The features of `batch` that `network.__call__` takes (T5X feature names)."""
  accepted = inspect.signature(type(network).__call__).parameters
  return {k: v for k, v in batch.items() if k in accepted and k != "enable_dropout"}


def model_state_of(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The STATE_COLLECTIONS of `variables` ({} for most models)."""
  return {name: variables[name] for name in STATE_COLLECTIONS if name in variables}


def compute_loss(network, params, batch: Mapping[str, Any], *, model_state=None, rngs=None,
                 enable_dropout: bool = False, logit_z_loss: float = 0.0,
                 return_router_load: bool = False):
  """Total loss and its terms for one batch: CE (+ logit z-loss) + weighted MoE aux losses.

  `batch` holds `decoder_target_tokens` (and optionally `decoder_loss_weights`) plus the
  network's input features. `model_state`: the network's STATE_COLLECTIONS
  (`TrainState.model_state`); None uses their initial values. `return_router_load` also
  returns the ROUTER_LOAD collection that aux-loss-free routers sow in training
  (`score_routing.update_router_bias`).
  """
  mutable = [MOE_STATS, ROUTER_LOAD] + (list(STATE_COLLECTIONS) if model_state is None else [])
  logits, state = network.apply({"params": params, **(model_state or {})},
                                **model_inputs(network, batch), enable_dropout=enable_dropout,
                                rngs=rngs, mutable=mutable)
  terms = cross_entropy(logits, batch["decoder_target_tokens"],
                        batch.get("decoder_loss_weights"), logit_z_loss)
  terms.update(moe_loss_terms(state))
  loss = terms["cross_entropy"] + terms["logit_z_loss"] + terms["aux_loss"] + terms["z_loss"]
  if return_router_load:
    return loss, dict(terms, loss=loss), state.get(ROUTER_LOAD, {})
  return loss, dict(terms, loss=loss)
