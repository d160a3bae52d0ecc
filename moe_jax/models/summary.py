"""What a configured network is, without allocating it: parameter counts, sparse layers, experts."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from moe_jax.layers.moe import MoeLayer
from moe_jax.layers.soft_moe import SoftMoE
from moe_jax.models import scan


def abstract_variables(network: nn.Module, batch_size: int = 1, length: int = 8):
  """`jax.eval_shape` of `network.init`: ShapeDtypeStructs with their logical-axis boxes."""
  return jax.eval_shape(lambda: network.init(jax.random.key(0),
                                             **network.example_batch(batch_size, length)))


def param_table(network: nn.Module) -> dict[str, dict[str, Any]]:
  """'encoder/layers_1/mlp/expert/wi/kernel' -> {"shape": [...], "axes": [...]} (no allocation)."""
  params = abstract_variables(network)["params"]
  flat = traverse_util.flatten_dict(params, sep="/",
                                    is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  table = {}
  for path, leaf in sorted(flat.items()):
    table[path] = {"shape": list(nn.unbox(leaf).shape),
                   "axes": list(leaf.names) if isinstance(leaf, nn.Partitioned) else None}
  return table


def stacks(network: nn.Module) -> dict[str, nn.Module]:
  """{'encoder': SparseEncoder, 'decoder': SparseDecoder} (decoder only for decoder-only LMs)."""
  return {name: getattr(network, name) for name in ("encoder", "decoder")
          if hasattr(network, name)}


def moe_templates(network: nn.Module) -> dict[str, nn.Module]:
  """Parameter path of each MoE layer -> its template ('decoder/layers_1/mlp' -> the stack's
  `moe`); a network without stacks lists its own (`LstmMoeLanguageModel.moe_layers`)."""
  if hasattr(network, "moe_layers"):
    return network.moe_layers()
  return {f"{name}/layers_{i}/mlp": stack.moe for name, stack in stacks(network).items()
          for i in stack.sparse_layers}


def experts_per_token(moe: MoeLayer | SoftMoE) -> float:
  """k for tokens-choose routers; the train capacity factor (mean experts/token) for EC; E for
  Soft MoE, where every token's output mixes the slots of every expert (all weights active)."""
  if isinstance(moe, SoftMoE):
    return float(moe.num_experts)
  return moe.router.experts_per_token(moe.train_capacity_factor)


def mod_summary(network: nn.Module, sizes: dict[str, int]) -> tuple[list[dict[str, Any]], int]:
  """Each Mixture-of-Depths block's setup, and the weights a token skips on average: the
  (1 - capacity_fraction) share of every block's active weights (its MoE experts at k / E)."""
  layers, skipped = [], 0.0
  moes = moe_templates(network)
  for stack_name, stack in stacks(network).items():
    for i in getattr(stack, "mod_layers", ()):
      mod, layer = stack.mixture_of_depths, f"{stack_name}/layers_{i}"
      block_params = sum(n for p, n in sizes.items() if p.startswith(f"{layer}/"))
      block_active = block_params
      if f"{layer}/mlp" in moes:
        moe = moes[f"{layer}/mlp"]
        experts = sum(n for p, n in sizes.items() if p.startswith(f"{layer}/mlp/expert/"))
        block_active -= experts - experts * experts_per_token(moe) / moe.num_experts
      skipped += (1.0 - mod.capacity_fraction) * block_active
      layers.append({"layer": layer, "router": "MixtureOfDepths",
                     "capacity_fraction": mod.capacity_fraction, "predictor": mod.predictor,
                     "block_params": block_params,
                     "router_params": sum(n for p, n in sizes.items()
                                          if p.startswith(f"{stack_name}/mod_{i}/"))})
  return layers, int(round(skipped))


def attention_expert_summary(network: nn.Module, sizes: dict[str, int]
                             ) -> tuple[list[dict[str, Any]], int]:
  """Each attention-experts layer's setup (stacks' `self_attention`, e.g. SwitchHead, MoA),
  and the expert weights a token does not use: (E - k) / E of its `EXPERT_PARAMS`."""
  layers, inactive = [], 0
  for stack_name, stack in stacks(network).items():
    attention = getattr(stack, "self_attention", None)
    if attention is None:
      continue
    name = "self_attention" if stack.is_decoder else "attention"
    for i in range(stack.num_layers):
      prefix = f"{stack_name}/layers_{i}/{name}/"
      experts = sum(n for p, n in sizes.items() for e in attention.EXPERT_PARAMS
                    if p == prefix + e or p.startswith(f"{prefix}{e}/"))
      inactive += experts - int(round(experts * attention.k / attention.num_experts))
      layers.append({"layer": f"{stack_name}/layers_{i}", "attention": type(attention).__name__,
                     "num_experts": attention.num_experts, "experts_per_token": attention.k,
                     "expert_params": experts, "balance_loss": attention.HAS_BALANCE_LOSS})
  return layers, inactive


def summarize(network: nn.Module) -> dict[str, Any]:
  """Total and per-token-active parameter counts, sparse layers, and each MoE layer's setup.

  Active parameters per token count every non-expert weight plus, in each MoE layer,
  experts_per_token / E of its routed expert weights (the router weights and the shared
  experts, `mlp/shared_expert/`, are always active). Mixture-of-Depths blocks count
  capacity_fraction of their active weights, the expected share (`mod_summary`). Attention
  experts count k / E of their expert weights (`attention_expert_summary`).
  """
  # Scanned stacks count layer by layer, under their unrolled names (moe_jax.models.scan).
  params = jax.eval_shape(scan.unstack_layers, nn.unbox(abstract_variables(network)["params"]))
  sizes = {path: int(np.prod(leaf.shape))
           for path, leaf in traverse_util.flatten_dict(params, sep="/").items()}
  total = sum(sizes.values())
  active = total
  moe_layers = []
  summary: dict[str, Any] = {}
  for stack_name, stack in stacks(network).items():
    summary[f"{stack_name}_sparse_layers"] = list(stack.sparse_layers)
  for path, moe in moe_templates(network).items():
    layer = path.removesuffix("/mlp")
    expert_params = sum(n for p, n in sizes.items() if p.startswith(f"{path}/expert/"))
    k = experts_per_token(moe)
    active -= expert_params - int(round(expert_params * k / moe.num_experts))
    if isinstance(moe, SoftMoE):  # no router, capacity factor or token groups: slots
      moe_layers.append({
          "layer": layer, "router": "SoftMoE",
          "num_experts": moe.num_experts, "experts_per_token": k,
          "slots_per_expert": moe.slots_per_expert, "expert_params": expert_params})
      continue
    moe_layers.append({
        "layer": layer, "router": type(moe.router).__name__,
        "num_experts": moe.num_experts, "experts_per_token": k,
        "train_capacity_factor": moe.train_capacity_factor,
        "eval_capacity_factor": moe.eval_capacity_factor,
        "max_group_size": moe.max_group_size, "dispatch": moe.dispatch,
        "expert_params": expert_params, "num_shared_experts": moe.num_shared_experts,
        "shared_expert_params": sum(n for p, n in sizes.items() if p.startswith(
            f"{path}/shared_expert/"))})
  summary.setdefault("encoder_sparse_layers", [])
  mod_layers, skipped = mod_summary(network, sizes)
  attention_layers, inactive = attention_expert_summary(network, sizes)
  return {"network": type(network).__name__, "num_params": total,
          "active_params_per_token": active - skipped - inactive, **summary,
          "moe_layers": moe_layers, "mod_layers": mod_layers,
          "attention_expert_layers": attention_layers}


def format_summary(info: dict[str, Any]) -> str:
  """A human-readable version of `summarize`'s output."""
  lines = [f"network:                  {info['network']}",
           f"parameters:               {info['num_params']:,} ({info['num_params'] / 1e9:.3f}B)",
           f"active per token:         {info['active_params_per_token']:,} "
           f"({info['active_params_per_token'] / 1e9:.3f}B)"]
  for stack in ("encoder", "decoder"):
    if f"{stack}_sparse_layers" in info:
      lines.append(f"{stack + ' sparse layers:':26}{info[f'{stack}_sparse_layers']}")
  for m in info["moe_layers"]:
    if "slots_per_expert" in m:  # SoftMoE
      lines.append(f"  {m['layer']:20} {m['router']:18} E={m['num_experts']:<5} "
                   f"slots per expert={m['slots_per_expert']} (every token mixes every slot)")
      continue
    lines.append(f"  {m['layer']:20} {m['router']:18} E={m['num_experts']:<5} "
                 f"k={m['experts_per_token']:g} capacity factor train/eval="
                 f"{m['train_capacity_factor']:g}/{m['eval_capacity_factor']:g} "
                 f"group<={m['max_group_size']} dispatch={m['dispatch']}"
                 + (f" shared={m['num_shared_experts']}" if m.get("num_shared_experts") else ""))
  for m in info.get("attention_expert_layers", ()):
    lines.append(f"  {m['layer']:20} {m['attention']:18} E={m['num_experts']:<5} "
                 f"k={m['experts_per_token']:g} (self-attention experts)")
  for m in info.get("mod_layers", ()):
    lines.append(f"  {m['layer']:20} {m['router']:18} capacity {m['capacity_fraction']:g} of "
                 f"each sequence, {m['predictor']} predictor for decoding")
  return "\n".join(lines)
