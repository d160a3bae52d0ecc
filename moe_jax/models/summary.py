"""What a configured network is, without allocating it: parameter counts, sparse layers, experts."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from moe_jax.layers.moe import MoeLayer


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


def experts_per_token(moe: MoeLayer) -> float:
  """k for tokens-choose routers; the train capacity factor (mean experts/token) for EC."""
  return moe.router.experts_per_token(moe.train_capacity_factor)


def summarize(network: nn.Module) -> dict[str, Any]:
  """Total and per-token-active parameter counts, sparse layers, and each MoE layer's setup.

  Active parameters per token count every non-expert weight plus, in each MoE layer,
  experts_per_token / E of its expert weights (the router weights are always active).
  """
  table = param_table(network)
  sizes = {path: int(np.prod(entry["shape"])) for path, entry in table.items()}
  total = sum(sizes.values())
  active = total
  moe_layers = []
  summary: dict[str, Any] = {}
  for stack_name, stack in stacks(network).items():
    summary[f"{stack_name}_sparse_layers"] = list(stack.sparse_layers)
    for i in stack.sparse_layers:
      prefix = f"{stack_name}/layers_{i}/mlp/expert/"
      expert_params = sum(n for p, n in sizes.items() if p.startswith(prefix))
      moe = stack.moe
      k = experts_per_token(moe)
      active -= expert_params - int(round(expert_params * k / moe.num_experts))
      moe_layers.append({
          "layer": f"{stack_name}/layers_{i}", "router": type(moe.router).__name__,
          "num_experts": moe.num_experts, "experts_per_token": k,
          "train_capacity_factor": moe.train_capacity_factor,
          "eval_capacity_factor": moe.eval_capacity_factor,
          "max_group_size": moe.max_group_size, "dispatch": moe.dispatch,
          "expert_params": expert_params})
  summary.setdefault("encoder_sparse_layers", [])
  return {"network": type(network).__name__, "num_params": total,
          "active_params_per_token": active, **summary, "moe_layers": moe_layers}


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
    lines.append(f"  {m['layer']:20} {m['router']:18} E={m['num_experts']:<5} "
                 f"k={m['experts_per_token']:g} capacity factor train/eval="
                 f"{m['train_capacity_factor']:g}/{m['eval_capacity_factor']:g} "
                 f"group<={m['max_group_size']} dispatch={m['dispatch']}")
  return "\n".join(lines)
