"""Expert merging: a trained MoE's experts averaged into one dense FFN per layer (MoE -> dense),
the counterpart of sparse upcycling (dense -> MoE, `checkpoints.init_params_from`).

Each MoE layer's expert kernels [E, ...] become the dense FFN's kernel as the average over E
weighted by the experts' routing usage (the training log's `expert_load/<layer>`), or uniform.
This is the parameter-averaging idea of "Merging Experts into One" (Li et al. 2023,
arXiv:2310.09832: a weighted average of the selected experts' weights), applied once to a whole
trained model and weighted by usage, so a dense model starts from the MoE's knowledge.

What merging cannot preserve: the output is one FFN of the averaged weights, not the average of
the experts' outputs (the FFN is nonlinear in its weights: activations, and for gated FFNs the
product of `wi_0` and `wi_1` projections); the router's per-token choice of experts; the
router's per-token gate scaling (top-1 Switch routing, Fedus et al. 2021, arXiv:2101.03961,
scales the expert's output by the gate probability p < 1, which the dense FFN does not; top-k
gates renormalised to sum to 1 have no such scale); and capacity dropping (a token an expert
drops gets 0 from the MoE, the dense FFN's output here). With identical experts, top-k gates
summing to 1 and nothing dropped, the dense model computes exactly the MoE's function.

Shared experts (`MoeLayer.num_shared_experts`, DeepSeekMoE) are one always-on dense FFN added to
the routed output: they carry over exactly when the dense FFN is as wide as the routed experts
plus the shared ones (hidden F + K_s * F, the shared units after the merged ones), since an FFN
whose hidden units are concatenated computes the sum of the two FFNs.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, Optional

import gin
import numpy as np
from absl import logging
from flax import traverse_util

from moe_jax import curves
from moe_jax.train import checkpoints as ckpt_lib

USAGE_PREFIX = "expert_load/"  # the training records' per-layer load (eval ones: "eval/...")
_DENSE_KERNEL = re.compile(r"^(.*/mlp)/(wi|wi_\d+|wo)/kernel$")


# --- Usage from the training log. -----------------------------------------------------------


@gin.configurable(module="moe_jax.train.merging")
def expert_usage(model_dir: str, last_steps: int = 200) -> dict[str, np.ndarray]:
  """{MoE layer: usage fractions [E]} from `<model_dir>/metrics.jsonl`.

  The layer names are the MoE layers' param paths (e.g. `decoder/layers_1/mlp`, whose experts
  are `decoder/layers_1/mlp/expert/...`; scanned stacks log unrolled names too). Usage is the
  token-weighted mean of the training records' `expert_load/<layer>` (the fraction of routing
  choices, before capacity, that go to each expert) over the final `last_steps` training steps
  (each record is the mean over the steps since the previous one; at least the last record);
  the last record of a step wins (a resumed run logs some steps twice; `curves.last_per_step`).
  Sums to 1 per layer.
  """
  if not isinstance(last_steps, int) or last_steps < 1:
    raise ValueError(f"expert_usage.last_steps must be a positive integer, got {last_steps!r}")
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"expert usage: {path!r} not found (is {model_dir!r} the MODEL_DIR "
                            f"of an MoE training run?)")
  by_step = curves.last_per_step(r for r in curves.read_jsonl(path)
                                 if any(k.startswith(USAGE_PREFIX) for k in r))
  if not by_step:
    raise ValueError(f"expert usage: {path} holds no training record with {USAGE_PREFIX}<layer> "
                     f"(a dense model's run?)")
  final = max(by_step)
  records = [r for s, r in sorted(by_step.items()) if s > final - last_steps]
  weights = np.array([float(r.get("num_tokens", 1.0)) for r in records], np.float64)
  usage = {}
  for key in (k for k in records[-1] if k.startswith(USAGE_PREFIX)):
    load_TE = np.array([r[key] for r in records if key in r], np.float64)
    w_T = np.array([w for w, r in zip(weights, records) if key in r])
    mean_E = w_T @ load_TE / w_T.sum()
    usage[key[len(USAGE_PREFIX):]] = mean_E / mean_E.sum()
  return usage


def run_dir(checkpoint_path: str) -> str:
  """The MODEL_DIR of a checkpoint path (a MODEL_DIR, its checkpoints/ dir or a step dir)."""
  directory, _ = ckpt_lib.resolve_checkpoint_path(checkpoint_path)
  if os.path.basename(directory) == ckpt_lib.CHECKPOINT_SUBDIR:
    return os.path.dirname(directory)
  return directory


def check_options(merge_experts: bool, upcycle: bool, initial_checkpoint_path: Optional[str],
                  expert_usage_from: Optional[str]) -> None:
  """The trainer's merging flags, refused by name before any work."""
  if merge_experts and upcycle:
    raise ValueError("train.merge_experts=True (MoE -> dense) and train.upcycle=True (dense -> "
                     "MoE) exclude each other: set one")
  if merge_experts and not initial_checkpoint_path:
    raise ValueError("train.merge_experts=True needs INITIAL_CHECKPOINT_PATH: the MoE checkpoint "
                     "whose experts are merged")
  if expert_usage_from and not merge_experts:
    raise ValueError(f"train.expert_usage_from={expert_usage_from!r} is only read with "
                     f"train.merge_experts=True")


def initial_checkpoint_usage(initial_checkpoint_path: str,
                             expert_usage_from: Optional[str]) -> Optional[dict]:
  """Usage weighting the trainer's merge: from `expert_usage_from`'s metrics.jsonl if given, else
  from the initial checkpoint's run directory if it logged one; None (uniform) otherwise."""
  directory = expert_usage_from
  if not directory:
    directory = run_dir(initial_checkpoint_path)
    if not os.path.isfile(os.path.join(directory, "metrics.jsonl")):
      logging.info("merge_experts: %s has no metrics.jsonl: uniform expert weights (set "
                   "train.expert_usage_from to the MoE's MODEL_DIR to weight by usage)", directory)
      return None
  usage = expert_usage(directory)
  logging.info("merge_experts: expert usage from %s", os.path.join(directory, "metrics.jsonl"))
  return usage


# --- Merging params. ------------------------------------------------------------------------


def _layer_weights(layer: str, num_experts: int, usage) -> np.ndarray:
  """Normalised float64 weights [E] for `layer`, refusing bad usage by name."""
  if usage is None:
    return np.full(num_experts, 1.0 / num_experts)
  if layer not in usage:
    raise ValueError(f"merge_experts: usage has no entry for MoE layer {layer!r} (it has "
                     f"{sorted(usage)}); give every merged layer's usage, or usage=None for "
                     f"uniform weights")
  w_E = np.asarray(usage[layer], np.float64)
  if w_E.shape != (num_experts,):
    raise ValueError(f"merge_experts: usage[{layer!r}] has shape {w_E.shape}, but the layer has "
                     f"{num_experts} experts")
  if not np.all(np.isfinite(w_E)) or np.any(w_E < 0):
    raise ValueError(f"merge_experts: usage[{layer!r}] must be finite and non-negative, got "
                     f"{w_E.tolist()}")
  if w_E.sum() <= 0:
    raise ValueError(f"merge_experts: usage[{layer!r}] is all zero: no expert to weight")
  return w_E / w_E.sum()


def _merged_kernel(path, layer, name, target_shape, flat_loaded, w_E):
  """The usage-weighted average of `layer`'s expert kernel `name` (+ shared experts)."""
  expert = np.asarray(flat_loaded[f"{layer}/expert/{name}/kernel"])
  merged = np.tensordot(w_E, expert.astype(np.float64), axes=1)
  shared = flat_loaded.get(f"{layer}/shared_expert/{name}/kernel")
  hidden_axis = 0 if name == "wo" else 1  # wi: [D, F], wo: [F, D]
  if shared is not None:
    merged = np.concatenate([merged, np.asarray(shared, np.float64)], axis=hidden_axis)
  if merged.shape != tuple(target_shape):
    what = (f"the merged experts' {expert.shape[1:]}" if shared is None else
            f"the merged experts' {expert.shape[1:]} + the shared experts' {np.shape(shared)} "
            f"= {merged.shape}")
    raise ValueError(f"merge_experts: {path} has shape {tuple(target_shape)} in this model but "
                     f"{what} in the checkpoint: the dense FFN's hidden size (MLP_DIM) must be "
                     f"the experts' (+ the shared experts')")
  return merged


def merge_experts(target_params, loaded_params, usage: Optional[Mapping] = None):
  """Params for a dense `target` from an MoE checkpoint's: (params, report).

  Every dense FFN kernel of the target (`<layer>/wi[_i]/kernel`, `<layer>/wo/kernel` with
  `<layer>` ending in `/mlp`) that the loaded params lack but hold as expert kernels
  `<layer>/expert/<name>/kernel` [E, ...] becomes their average over E weighted by
  `usage[<layer>]` (normalised to sum 1; see `expert_usage`), or uniformly when `usage` is None.
  Everything else is as `checkpoints.init_params_from` does it: copied where path and shape
  match, fresh where absent (routers have no dense counterpart and are left out). The report
  lists "copied", "merged", "fresh" paths and the per-layer "weights". Scanned stacks on either
  side are matched in the unrolled layout.
  """
  from moe_jax.models import scan  # pylint: disable=g-import-not-at-top  (models stay optional)
  if usage is not None and not isinstance(usage, Mapping):
    raise ValueError(f"merge_experts: usage must be a mapping {{layer: [E] fractions}} or None, "
                     f"got {type(usage).__name__}")
  periods = scan.scan_periods(target_params)
  flat_loaded = traverse_util.flatten_dict(scan.unstack_layers(loaded_params), sep="/")
  flat_target = traverse_util.flatten_dict(scan.unstack_layers(target_params), sep="/")
  out, copied, merged, fresh, weights = {}, [], [], [], {}
  for path, value in flat_target.items():
    source = flat_loaded.get(path)
    if source is not None and np.shape(source) == value.shape:
      out[path] = np.asarray(source).astype(value.dtype)
      copied.append(path)
      continue
    match = _DENSE_KERNEL.match(path) if source is None else None
    if match and f"{match.group(1)}/expert/{match.group(2)}/kernel" in flat_loaded:
      layer, name = match.groups()
      experts = np.shape(flat_loaded[f"{layer}/expert/{name}/kernel"])[0]
      if layer not in weights:
        weights[layer] = _layer_weights(layer, experts, usage)
      out[path] = _merged_kernel(path, layer, name, value.shape, flat_loaded,
                                 weights[layer]).astype(value.dtype)
      merged.append(path)
      continue
    if source is not None:
      raise ValueError(f"merge_experts: {path} has shape {np.shape(source)} in the checkpoint "
                       f"but {value.shape} in this model")
    out[path] = value
    fresh.append(path)
  if not merged:
    raise ValueError("merge_experts: no dense FFN kernel of this model (<layer>/mlp/wi*/kernel, "
                     "<layer>/mlp/wo/kernel) has expert kernels (<layer>/mlp/expert/.../kernel) "
                     "in the checkpoint: merging needs a dense target and an MoE checkpoint")
  if usage is None:
    logging.info("merge_experts: no usage given, experts of %s averaged uniformly",
                 sorted(weights))
  report = {"copied": copied, "merged": merged, "fresh": fresh,
            "weights": {k: w.tolist() for k, w in weights.items()}}
  return scan.stack_layers(traverse_util.unflatten_dict(out, sep="/"), periods), report


# --- A merged checkpoint without training (scripts/merge_experts.py). ----------------------


def write_merged_checkpoint(network, source: str, out_dir: str, usage: Optional[Mapping] = None,
                            seed: int = 0) -> dict:
  """Merges the MoE checkpoint at `source` into the dense `network` and saves the result as a
  step-0 checkpoint in `out_dir` (TrainState with an empty optimizer state) beside
  `config.gin` (the operative gin config, so scripts/eval.py needs no model file) and
  `merge.json` (the report). Evaluate it (CHECKPOINT_PATH) or fine-tune from it
  (INITIAL_CHECKPOINT_PATH); resuming training in `out_dir` itself is not supported."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from moe_jax import objectives  # pylint: disable=g-import-not-at-top
  from moe_jax.train import loop  # pylint: disable=g-import-not-at-top
  from moe_jax.train.steps import TrainState  # pylint: disable=g-import-not-at-top
  checkpoints = os.path.join(out_dir, ckpt_lib.CHECKPOINT_SUBDIR)
  if os.path.exists(checkpoints):
    raise ValueError(f"merge_experts: {checkpoints} already exists: choose a new output "
                     f"directory")
  loaded = ckpt_lib.load_params(source)
  init = jax.jit(lambda rng: nn.unbox(network.init(rng, **network.example_batch(1, 8))))
  variables = jax.device_get(init(jax.random.key(seed)))
  params, report = merge_experts(variables["params"], loaded, usage)
  model_state, _ = ckpt_lib.init_params_from(objectives.model_state_of(variables),
                                             ckpt_lib.load_model_state(source))
  checkpointer = ckpt_lib.Checkpointer(out_dir, async_save=False)
  try:
    checkpointer.save(0, TrainState(jnp.zeros((), jnp.int32), params, {}, model_state),
                      batches_consumed=0)
  finally:
    checkpointer.close()
  loop.write_gin_config(out_dir)
  report = {"source": os.path.abspath(source), "uniform": usage is None, **report}
  with open(os.path.join(out_dir, "merge.json"), "w") as f:
    json.dump(report, f, indent=1)
  logging.info("Merged %d expert kernels of %s into %s (%s weights): %d params copied, %d "
               "fresh.", len(report["merged"]), source, checkpoints,
               "uniform" if usage is None else "usage", len(report["copied"]),
               len(report["fresh"]))
  return report
