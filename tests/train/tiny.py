"""Tiny networks and runs shared by the training tests (CPU-sized: a step takes milliseconds).

The MoE net: decoder-only, embed 16, 2 layers, both MoE with 8 experts (so metrics carry two
`expert_load/...` entries), gated-GELU experts. Batches of 8 x 32 = 256 tokens with
max_group_size 32 form 8 groups on one device AND on a (2, 4, 1) mesh (the group count is
rounded up to a multiple of data x expert = 8), so routing is the same on both.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax.layers import routing
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MoeLayer
from moe_jax.models.decoder_only import SparseDecoderOnly
from moe_jax.models.t5 import SparseDecoder
from moe_jax.train import optimizers, trainer

EMBED, MLP, EXPERTS, BATCH, LENGTH, GROUP = 16, 32, 8, 8, 32, 32
TASK = "tiny_shakespeare_lm"
ACTIVATIONS = ("gelu", "linear")
LEARNING_RATE = 0.01  # rsqrt_schedule(1.0, 10_000): T5's constant 0.01 during warmup


def moe_layer(num_experts=EXPERTS, router=None, capacity_factor=1.25, **kwargs):
  return MoeLayer(num_experts=num_experts, router=router or routing.SwitchRouter(),
                  expert=ExpertMlp(intermediate_dim=MLP, activations=ACTIVATIONS),
                  max_group_size=GROUP, train_capacity_factor=capacity_factor,
                  eval_capacity_factor=capacity_factor, **kwargs)


def network(num_layers=2, num_sparse_layers=2, embed=EMBED, moe=None, **moe_kwargs):
  """SparseDecoderOnly; num_sparse_layers=0 is the dense twin (same names, MlpBlock FFNs)."""
  moe = moe or (moe_layer(**moe_kwargs) if num_sparse_layers else None)
  return SparseDecoderOnly(
      vocab_size=384, embed_dim=embed,
      decoder=SparseDecoder(num_layers=num_layers, num_sparse_layers=num_sparse_layers,
                            num_heads=2, head_dim=8,
                            mlp=MlpBlock(intermediate_dim=MLP, activations=ACTIVATIONS),
                            moe=moe))


def schedule():
  return optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=10_000)


def optimizer(**kwargs):
  return optimizers.build_optimizer(optimizers.adafactor(schedule()), **kwargs)


def train(model_dir, train_steps, *, mesh_shape=(1, 1, 1), net=None, opt=None, **kwargs):
  """trainer.train on the tiny task, logging every step unless told; returns its result."""
  kwargs = {"checkpoint_period": 5, "eval_period": 0, "async_checkpoints": False,
            "log_every": 1, **kwargs}
  return trainer.train(
      model_dir=str(model_dir), train_steps=train_steps, batch_size=BATCH,
      mixture_or_task_name=TASK, task_feature_lengths={"targets": LENGTH},
      optimizer=opt or optimizer(), learning_rate_schedule=schedule(), mesh_shape=mesh_shape,
      network=net or network(), **kwargs)


def nan_updates_at(step):
  """An optax transformation that turns the updates of 1-based `step` into NaN."""
  def init(params):
    del params
    return jnp.zeros((), jnp.int32)

  def update(updates, count, params=None):
    del params
    updates = jax.tree.map(lambda u: jnp.where(count == step - 1, jnp.nan, u), updates)
    return updates, count + 1
  return optax.GradientTransformation(init, update)


def read_metrics(model_dir, prefix=""):
  """metrics.jsonl records of training (prefix "") or evaluation (prefix "eval/")."""
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if f"{prefix}loss" in r]


def losses_by_step(model_dir):
  """{step: loss}, the LAST record of each step winning (a resumed run re-logs steps)."""
  return {r["step"]: r["loss"] for r in read_metrics(model_dir)}


def unbox_init(net, rng, batch_size=1, length=8):
  return nn.unbox(net.init(rng, **net.example_batch(batch_size, length)))["params"]


def padded_batch(seed=0) -> dict:
  """A random byte batch [BATCH, LENGTH] whose rows hold different amounts of padding."""
  targets = np.random.default_rng(seed).integers(3, 384, (BATCH, LENGTH)).astype(np.int32)
  for row, length in enumerate([32, 5, 20, 32, 9, 32, 27, 14]):
    targets[row, length:] = 0
  return {"decoder_target_tokens": targets,
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0)))}
