"""Every routing-literature config trains through the command line: 20 steps of scripts/train.py's
function (`moe_jax.cli.train`, in-process) on its task with a falling loss, and model_info works;
the hierarchical / bidirectional variants of the LSTM and image models build through gin.

Dims are shrunk (the configs' own structure kept: routers, layers, stacks), so each run costs a
few seconds; the LSTM and image models have their own training tests (tests/models/).
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax import cli, gin_utils, objectives
from moe_jax.models import build_network
from moe_jax.models.summary import summarize

SHRINK = ["--gin.EMBED_DIM=32", "--gin.MLP_DIM=64", "--gin.NUM_HEADS=2", "--gin.HEAD_DIM=16"]
LM = ["--gin.MIXTURE_OR_TASK_NAME='tiny_shakespeare_lm'",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 64}"]
SPAN = ["--gin.MIXTURE_OR_TASK_NAME='tiny_shakespeare_span_corruption'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"]

# Two decoder layers, the second sparse (TOP keeps deepseek_tiny's first layer dense).
LM2 = LM + ["--gin.NUM_DECODER_LAYERS=2", "--gin.NUM_DECODER_SPARSE_LAYERS=1"]

CONFIGS = {  # config -> task and size flags
    "noisy_topk_tiny": LM2,
    "hierarchical_tiny": LM2,
    "cosine_tiny": LM2,
    "sigmoid_auxfree_tiny": LM2,
    "deepseek_tiny": LM2,
    "soft_moe_tiny": SPAN,  # 2 + 2 layers already
    "mod_tiny": LM + ["--gin.NUM_DECODER_LAYERS=2", "--gin.NUM_DECODER_MOD_LAYERS=1"],
    "switchhead_tiny": LM2,
    "moa_tiny": LM2,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_20_steps_through_the_cli(name, tmp_path, tfds_dir):
  del tfds_dir  # sets $MOE_JAX_TFDS_DIR
  model_dir = tmp_path / name
  cli.train([f"--gin_file=models/{name}.gin", "--gin_file=runs/pretrain.gin", *SHRINK,
             *CONFIGS[name], "--gin.TRAIN_STEPS=20", "--gin.BATCH_SIZE=8", "--gin.LOG_EVERY=1",
             "--gin.EVAL_PERIOD=0", "--gin.MESH_SHAPE=(1, 1, 1)",
             f"--gin.MODEL_DIR='{model_dir}'", "--traceback"])
  with open(model_dir / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert len(losses) == 20
  first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
  # A byte LM starts near ln(384) = 5.95; 20 steps at T5's 0.01 learning rate reach ~3.3.
  assert last < first - 1.0, losses
  info = cli.model_info([f"--gin_file=models/{name}.gin", "--traceback"])
  assert info["num_params"] >= info["active_params_per_token"] > 0, info
  assert os.path.exists(model_dir / "checkpoints")


VARIANTS = {  # the "flat, hierarchical or Soft MoE" through gin alone
    "vision_hierarchical": ("vision_moe_tiny", ["NUM_EXPERTS=8",
                                                "MoeLayer.router=@HierarchicalRouter()"]),
    "vision_lstm_hierarchical": ("vision_lstm_moe_tiny", [
        "NUM_EXPERTS=8", "MoeLayer.router=@HierarchicalRouter()"]),
    "lstm_hierarchical": ("lstm_moe_lm", ["EMBED_DIM=16", "MLP_DIM=16",
                                          "MoeLayer.router=@HierarchicalRouter()"]),
    "lstm_bidirectional": ("lstm_moe_lm", ["EMBED_DIM=16", "MLP_DIM=16", "BIDIRECTIONAL=True"]),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_hierarchical_and_bidirectional_variants_build_and_route(name):
  """The variants build from their configs by gin bindings alone; their MoE layers route with
  the bound router (its aux loss is positive) and the loss is finite."""
  config, bindings = VARIANTS[name]
  gin_utils.parse_gin([f"models/{config}.gin"], bindings)
  network = build_network()
  batch = network.example_batch(2, 16)
  # Random normal params from the abstract init (an eager `init` costs ~10 s here).
  shapes = nn.unbox(jax.eval_shape(network.init, jax.random.key(0), **batch))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.3).astype(x.dtype), shapes)
  batch.setdefault("decoder_target_tokens", batch.get("decoder_input_tokens"))
  loss, terms = jax.jit(lambda p, b: objectives.compute_loss(network, p, b))(params, batch)
  assert np.isfinite(float(loss)) and float(terms["aux_loss"]) > 0
  info = summarize(network)
  routers = {m["router"] for m in info["moe_layers"]}
  assert routers == {"HierarchicalRouter" if "hierarchical" in name else "NoisyTopKRouter"}
