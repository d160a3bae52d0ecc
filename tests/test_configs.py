"""Every gin config parses, builds, inits and applies; paper-sized ones match the paper's counts.

Parameter shapes and logical axes of the paper-sized configs are frozen in tests/testdata/
(regenerate after an intended change with MOE_JAX_UPDATE_SNAPSHOTS=1).
"""

import functools
import glob
import json
import os
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from moe_jax import gin_utils, objectives
from moe_jax.models import build_network
from moe_jax.models.summary import param_table, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIGS = sorted(os.path.basename(p)[:-4]
                       for p in glob.glob(os.path.join(REPO, "configs", "models", "*.gin")))
TINY = ["EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8", "VOCAB_SIZE=64",
        "NUM_EXPERTS=4", "MoeLayer.max_group_size=64"]
# CPU-sized models whose names do not end in `_tiny` (they build and train as they are).
SMALL = {"lstm_moe_lm"}
PAPER_SIZED = [m for m in MODEL_CONFIGS if not m.endswith("_tiny") and m not in SMALL]
SNAPSHOT_DIR = os.path.join(REPO, "tests", "testdata")


def _build(name, bindings=()):
  gin_utils.parse_gin([f"models/{name}.gin"], bindings)
  return build_network()


@functools.lru_cache(maxsize=None)
def _param_table(name):
  """param_table of a config as it is (an abstract init: seconds for the paper-sized ones),
  shared by the snapshot and the sharding-rule tests."""
  return param_table(_build(name))


def _shrink(name):
  """TINY dims, 2 layers per stack, one sparse layer in each stack that had any."""
  gin_utils.parse_gin([f"models/{name}.gin"])
  bindings = list(TINY)
  for macro in ("NUM_ENCODER_LAYERS", "NUM_DECODER_LAYERS"):
    try:
      gin.query_parameter(f"%{macro}")
    except ValueError:
      continue
    sparse = gin.query_parameter(f"%{macro.replace('_LAYERS', '_SPARSE_LAYERS')}")
    bindings += [f"{macro}=2", f"{macro.replace('_LAYERS', '_SPARSE_LAYERS')}={min(sparse, 1)}"]
  return _build(name, bindings)


def test_configs_exist():
  assert {"switch_tiny", "top2_tiny", "expert_choice_tiny", "dense_tiny", "switch_base",
          "switch_large", "switch_xxl", "switch_c", "top2_base", "expert_choice_base",
          "st_moe_base", "t5_base"} <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_builds_inits_and_applies(name):
  network = _shrink(name) if name in PAPER_SIZED else _build(name)
  batch = network.example_batch(2, 16)
  batch["decoder_target_tokens"] = batch["decoder_input_tokens"]
  params = nn.unbox(network.init(jax.random.key(0), **network.example_batch(2, 16))["params"])
  loss, terms = objectives.compute_loss(network, params, batch)
  assert np.isfinite(float(loss))
  info = summarize(network)
  if info["moe_layers"]:
    # Expert choice and Soft MoE fill every expert by construction: no balance loss.
    assert float(terms["aux_loss"]) > 0 or all(m["router"] in ("ExpertChoiceRouter", "SoftMoE")
                                               for m in info["moe_layers"])
  if any(m["balance_loss"] for m in info["attention_expert_layers"]):  # MoA yes, SwitchHead no
    assert float(terms["aux_loss"]) > 0


@pytest.mark.parametrize("name,expected", [("switch_base", 7.4e9), ("switch_c", 1571e9),
                                           ("t5_base", 0.223e9)])
def test_paper_parameter_counts_within_one_percent(name, expected):
  """Switch Transformers (Fedus et al. 2021) Table 9 / T5 (Raffel et al. 2020)."""
  num_params = summarize(_build(name))["num_params"]
  assert abs(num_params - expected) / expected < 0.01, num_params


def test_active_parameters_per_token_of_switch_base():
  """Top-1: every non-expert weight plus one expert of each of the 12 MoE layers."""
  info = summarize(_build("switch_base"))
  expert_params = 128 * 2 * 768 * 3072
  assert info["active_params_per_token"] == info["num_params"] - 12 * expert_params * 127 // 128
  assert info["encoder_sparse_layers"] == [1, 3, 5, 7, 9, 11]
  assert info["decoder_sparse_layers"] == [1, 3, 5, 7, 9, 11]


@pytest.mark.parametrize("name", PAPER_SIZED)
def test_parameter_shapes_and_axes_match_snapshot(name):
  table = _param_table(name)
  path = os.path.join(SNAPSHOT_DIR, f"{name}.json")
  if os.environ.get("MOE_JAX_UPDATE_SNAPSHOTS"):
    with open(path, "w") as f:
      json.dump(table, f, indent=0, sort_keys=True)
  with open(path) as f:
    assert table == json.load(f)


def test_every_parameter_axis_has_a_sharding_rule():
  from moe_jax.train.partitioning import LOGICAL_AXIS_RULES
  known = {name for name, _ in LOGICAL_AXIS_RULES}
  for name in ("switch_base", "expert_choice_base", "st_moe_base"):
    for path, entry in _param_table(name).items():
      assert entry["axes"] is not None and set(entry["axes"]) <= known, (path, entry)


def test_short_binding_names_and_overrides():
  network = _build("switch_tiny", ["MoeLayer.num_experts=16"])
  assert network.decoder.moe.num_experts == 16


def test_misspelled_binding_fails_at_parse_naming_it():
  with pytest.raises(ValueError, match="num_expertz"):
    gin_utils.parse_gin(["models/switch_tiny.gin"], ["MoeLayer.num_expertz=16"])
  with pytest.raises(ValueError, match="MoeLayr"):
    gin_utils.parse_gin(["models/switch_tiny.gin"], ["MoeLayr.num_experts=16"])


def test_unknown_gin_file_names_it():
  with pytest.raises(FileNotFoundError, match="models/switch_tinyy.gin"):
    gin_utils.parse_gin(["models/switch_tinyy.gin"])


def test_invalid_value_fails_before_compilation_naming_the_field():
  with pytest.raises(ValueError, match="MoeLayer.train_capacity_factor"):
    _build("switch_tiny", ["MoeLayer.train_capacity_factor=0.0"])
  with pytest.raises(ValueError, match="TopKRouter.k=9 exceeds MoeLayer.num_experts=8"):
    _build("top2_tiny", ["TopKRouter.k=9"])


def test_model_info_script_json():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "model_info.py"),
       "--gin_file=configs/models/switch_base.gin", "--gin.NUM_EXPERTS=64", "--json"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  info = json.loads(out)
  assert {"num_params", "active_params_per_token", "encoder_sparse_layers",
          "decoder_sparse_layers"} <= set(info)
  assert info["moe_layers"][0]["num_experts"] == 64
  assert info["encoder_sparse_layers"] == [1, 3, 5, 7, 9, 11]


def test_includes_resolve_beside_namespace_packages_of_the_same_name(tmp_path, monkeypatch):
  """A `runs/` MODEL_DIR (or `models/` dir) on sys.path must not hijack gin's include search."""
  for name in ("runs", "models", "architectures"):
    (tmp_path / name).mkdir()
  monkeypatch.syspath_prepend(str(tmp_path))
  gin_utils.parse_gin(["models/switch_t5_tiny.gin", "runs/finetune.gin"],
                      ["INITIAL_CHECKPOINT_PATH='x'", "MODEL_DIR='y'"])
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "multi30k_en_de"
