"""Bounded compile time for deep stacks: `lax.scan` over repeating blocks of layers, and remat.

Scanning (`_SparseStack.scan_layers=True`): the stack's layers repeat with a period p (which
layers are sparse, have ST-MoE's extra dense FFN, or are Mixture-of-Depths routed), so the
stack is `nn.scan` over num_layers / p copies of one BLOCK of p consecutive layers, traced
and compiled once (MaxText / T5X `scan_layers`). Parameters live under `<stack>/layers/`:
`layers_<pos>` and `mod_<pos>` for the block's positions, each leaf with a leading axis of
num_layers / p (logical axis "layers"). Layer i is position i % p of block i // p.
Every mutable collection stacks along the scan: MOE_STATS, the router-bias state and load,
and the decoding "cache" (on axis 1, so its leaves keep their batch axis first, as beam
search's reordering needs). The routing stats are then unstacked and re-sown under the
unrolled names (`<stack>/layers_<i>/mlp`, `<stack>/mod_<i>`), so losses and per-layer
metrics are named and valued as without scan.

Remat (`remat_policy`): each layer is `nn.remat`-ed with a `jax.checkpoint_policies` policy
(Chen et al. 2016, arXiv:1604.06174: recompute activations in the backward pass).

`unstack_layers` / `stack_layers` / `match_layout` map params between the unrolled layout
(`layers_0 ... layers_{N-1}`) and the scanned one; checkpoints use them for fine-tuning.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.layers.moe import MOE_STATS
from moe_jax.layers.routing import ROUTING_RNG
from moe_jax.layers.score_routing import ROUTER_BIAS, ROUTER_LOAD

SCAN_NAME = "layers"  # the scanned module's name and its parameters' logical axis

# None: no remat. "full" saves nothing (everything is recomputed in the backward pass).
REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def check_remat_policy(owner: str, policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"{owner}.remat_policy={policy!r} is not one of {list(REMAT_POLICIES)}")


def scan_period(owner: str, pattern: Sequence[Any], layout: Any) -> int:
  """The smallest p with pattern[i] == pattern[i % p] that repeats at least twice.

  `pattern[i]` describes layer i (sparse? extra dense FFN? routed?); `layout` is only named in
  the error.
  """
  n = len(pattern)
  for p in range(1, n // 2 + 1):
    if n % p == 0 and all(pattern[i] == pattern[i % p] for i in range(n)):
      return p
  raise ValueError(f"{owner}.scan_layers=True needs layers that repeat: {owner}.sparse_layout="
                   f"{layout} gives {n} layers whose pattern (sparse, extra dense FFN, "
                   f"Mixture-of-Depths) has no period repeating at least twice; set "
                   f"scan_layers=False or a periodic layout (e.g. MoeLayout.MIXED)")


def with_static_options(layer_cls: type) -> type:
  """A subclass of the T5 layer class taking deterministic / decode / max_decode_length as
  fields, and its arrays positionally (MixtureOfDepths' call-time copies are ignored)."""

  def __call__(self, x_BLD, self_bias_BNLM, padding_mask_BL, encoded_BMD=None,
               cross_bias_BNLM=None, decode_position=None, **unused_static):
    return layer_cls.__call__(self, x_BLD, self_bias_BNLM, padding_mask_BL,
                              encoded_BMD=encoded_BMD, cross_bias_BNLM=cross_bias_BNLM,
                              deterministic=self.deterministic, decode=self.decode,
                              decode_position=decode_position,
                              max_decode_length=self.max_decode_length)

  fields = {"deterministic": bool, "decode": bool, "max_decode_length": Optional[int]}
  return type(f"Static{layer_cls.__name__}", (layer_cls,),
              {"__annotations__": fields, "deterministic": True, "decode": False,
               "max_decode_length": None, "__call__": __call__,
               "__module__": layer_cls.__module__})


def remat_class(cls: type, policy: str, scanned: bool) -> type:
  """`cls` wrapped in `nn.remat` with the named policy ("none": `cls` itself)."""
  if policy == "none":
    return cls
  # Inside scan the loop already keeps XLA from merging the recomputation (flax's advice).
  return nn.remat(cls, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)


class _Block(nn.Module):
  """p consecutive layers (the scanned body): layer templates, MoD-routed where `routed`."""
  layers: Sequence[nn.Module]  # unbound; flax names them layers_0 ... layers_{p-1}
  routed: Sequence[bool]
  mixture_of_depths: Optional[nn.Module] = None
  # Static call options, fields rather than arguments so that scan and remat never trace them.
  deterministic: bool = True
  decode: bool = False
  max_decode_length: Optional[int] = None

  @nn.compact
  def __call__(self, x_BLD, self_bias, padding_mask_BL, encoded_BMD, cross_bias,
               decode_position):
    for pos, layer in enumerate(self.layers):
      if self.routed[pos]:
        layer = functools.partial(
            self.mixture_of_depths.clone(parent=self, name=f"mod_{pos}"), layer)
      x_BLD = layer(x_BLD, self_bias, padding_mask_BL, encoded_BMD=encoded_BMD,
                    cross_bias_BNLM=cross_bias, decode_position=decode_position,
                    deterministic=self.deterministic, decode=self.decode,
                    max_decode_length=self.max_decode_length)
    return x_BLD, None


class _Resow(nn.Module):
  """Sows a tree of sown tuples ({'mlp': {'router_stats': (stats,)}}) at its own path."""

  @nn.compact
  def __call__(self, tree):
    for key, value in tree.items():
      if isinstance(value, tuple):
        for call in value:
          self.sow(MOE_STATS, key, call)
      else:
        _Resow(name=key)(value)


def scanned_layers(templates: Sequence[nn.Module], routed: Sequence[bool],
                   mixture_of_depths: Optional[nn.Module], num_layers: int, static: dict,
                   x_BLD, self_bias, padding_mask_BL, encoded_BMD, cross_bias,
                   decode_position):
  """Runs `templates` (one block of p layers) num_layers / p times under `nn.scan`.

  Call inside the stack's compact `__call__`: the scanned module becomes its child
  `layers`, and the routing stats are re-sown as the stack's `layers_<i>` / `mod_<i>`.
  `static`: deterministic, decode, max_decode_length.
  """
  p = len(templates)
  repeats = num_layers // p
  captured = {}

  def take_stats(collections):
    captured.update(collections.get(MOE_STATS, {}))
    return {k: v for k, v in collections.items() if k != MOE_STATS}

  scan = nn.scan(
      _Block,
      variable_axes={"params": 0, MOE_STATS: 0, ROUTER_BIAS: 0, ROUTER_LOAD: 0, "cache": 1},
      split_rngs={"params": True, "dropout": True, ROUTING_RNG: True},
      in_axes=(nn.broadcast,) * 5, length=repeats,
      metadata_params={nn.PARTITION_NAME: SCAN_NAME})
  # Routing stats leave the scanned scope through `take_stats`, not as a stacked collection.
  block = nn.map_variables(scan, MOE_STATS, trans_out_fn=take_stats, mutable=True)
  x_BLD, _ = block(tuple(templates), tuple(routed), mixture_of_depths, **static,
                   name=SCAN_NAME)(
      x_BLD, self_bias, padding_mask_BL, encoded_BMD, cross_bias, decode_position)
  for name, tree in captured.items():
    kind, pos = name.rsplit("_", 1)
    for j in range(repeats):
      _Resow(name=f"{kind}_{j * p + int(pos)}")(jax.tree.map(lambda a: a[j], tree))
  return x_BLD


# --- Parameter layouts: unrolled (layers_<i>, mod_<i>) <-> scanned (layers/<kind>_<pos>). ---

_LAYER = re.compile(r"^(layers|mod)_(\d+)$")


def _is_scanned(tree) -> bool:
  sub = tree.get(SCAN_NAME) if isinstance(tree, dict) else None
  return isinstance(sub, dict) and bool(sub) and all(_LAYER.match(k) for k in sub)


def _period(scanned: dict) -> int:
  return sum(1 for k in scanned if k.startswith("layers_"))


def unstack_layers(tree):
  """Unrolled params (`layers_<i>`, `mod_<i>`) from a tree with scanned stacks (identity on
  unrolled trees). Works on arrays, numpy arrays and inside `jax.eval_shape`."""
  if not isinstance(tree, dict):
    return tree
  if not _is_scanned(tree):
    return {k: unstack_layers(v) for k, v in tree.items()}
  out = {k: unstack_layers(v) for k, v in tree.items() if k != SCAN_NAME}
  scanned = tree[SCAN_NAME]
  p = _period(scanned)
  for name, sub in scanned.items():
    kind, pos = _LAYER.match(name).groups()
    repeats = jax.tree.leaves(sub)[0].shape[0]
    for j in range(repeats):
      out[f"{kind}_{j * p + int(pos)}"] = jax.tree.map(lambda a: a[j], sub)
  return out


def scan_periods(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
  """{path of a scanned stack: its period p} in a (scanned) params tree."""
  if not isinstance(tree, dict):
    return {}
  if _is_scanned(tree):
    return {prefix: _period(tree[SCAN_NAME])}
  return {k: v for key, sub in tree.items() for k, v in scan_periods(sub, prefix + (key,)).items()}


def _stack(*leaves):
  xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
  return xp.stack(leaves)


def stack_layers(tree, periods: dict[tuple[str, ...], int], prefix: tuple[str, ...] = ()):
  """Scanned params from unrolled ones: the stacks at `periods`' paths get blocks of p."""
  if not isinstance(tree, dict):
    return tree
  if prefix not in periods or _is_scanned(tree):
    return {k: stack_layers(v, periods, prefix + (k,)) for k, v in tree.items()}
  p = periods[prefix]
  layers = {k: v for k, v in tree.items() if _LAYER.match(k)}
  num_layers = sum(1 for k in layers if k.startswith("layers_"))
  if num_layers % p:
    raise ValueError(f"{'/'.join(prefix)}: {num_layers} unrolled layers do not make blocks of "
                     f"{p} for the scanned model")
  out = {k: v for k, v in tree.items() if k not in layers}
  block = {}
  for name in layers:
    kind, i = _LAYER.match(name).groups()
    if int(i) < p:
      block[f"{kind}_{i}"] = jax.tree.map(
          _stack, *[layers[f"{kind}_{j * p + int(i)}"] for j in range(num_layers // p)])
  out[SCAN_NAME] = block
  return out


def match_layout(loaded, target):
  """`loaded` params rearranged into `target`'s layout (scanned or unrolled, per stack)."""
  return stack_layers(unstack_layers(loaded), scan_periods(target))


def layout_hint(stored_paths, our_paths) -> str:
  """A sentence for checkpoint errors when only scan_layers differs ('' otherwise)."""
  scanned = re.compile(rf"(^|/){SCAN_NAME}/(layers|mod)_\d+/")
  def kind(paths):
    return "scanned" if any(scanned.search(p) for p in paths) else "unrolled"
  if kind(stored_paths) == kind(our_paths):
    return ""
  theirs = kind(stored_paths) == "scanned"
  return (f"The checkpoint was written with scan_layers={theirs} and this model has "
          f"scan_layers={not theirs}: set scan_layers={theirs} (gin SCAN_LAYERS = {theirs}) to "
          f"resume it, or fine-tune from it with INITIAL_CHECKPOINT_PATH (which converts "
          f"between the layouts). ")
