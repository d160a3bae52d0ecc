"""Quickstart: build configs/models/switch_tiny.gin, run one forward + backward pass on a random
batch, and print parameter counts and per-layer routing metrics.

  python scripts/quickstart.py [--gin_file=...] [--gin.NAME=VALUE ...]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402

from moe_jax import gin_utils, objectives  # noqa: E402
from moe_jax.layers.routing import ROUTING_RNG  # noqa: E402
from moe_jax.models import build_network  # noqa: E402
from moe_jax.models.summary import format_summary, summarize  # noqa: E402


def main(argv):
  if not any(a.startswith("--gin_file") for a in argv):
    argv = ["--gin_file=models/switch_tiny.gin"] + list(argv)
  gin_utils.parse_flags(argv)
  network = build_network()
  print(format_summary(summarize(network)))

  batch_size, length = 8, 64
  rng = jax.random.key(0)
  tokens = jax.random.randint(rng, (batch_size, length), 1, network.vocab_size)
  batch = {k: tokens for k in network.example_batch(batch_size, length)}
  # Teacher forcing: the decoder sees the targets shifted right behind a 0 (BOS).
  batch["decoder_input_tokens"] = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
  batch["decoder_target_tokens"] = tokens
  params = nn.unbox(network.init(rng, **network.example_batch(batch_size, length))["params"])

  @jax.jit
  def loss_and_grads(params, rng):
    rngs = {"dropout": rng, ROUTING_RNG: rng}
    return jax.value_and_grad(
        lambda p: objectives.compute_loss(network, p, batch, rngs=rngs, enable_dropout=True),
        has_aux=True)(params)

  start = time.perf_counter()
  (loss, terms), grads = loss_and_grads(params, rng)
  jax.block_until_ready(grads)
  print(f"\nforward + backward (compile included): {time.perf_counter() - start:.2f}s")
  grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  print(f"loss {float(loss):.4f} = cross entropy {float(terms['cross_entropy']):.4f} + aux "
        f"{float(terms['aux_loss']):.5f} + router z {float(terms['z_loss']):.5f}; "
        f"grad norm {float(grad_norm):.4f}")
  print(f"fraction of tokens dropped {float(terms['fraction_dropped']):.4f}, "
        f"router confidence {float(terms['router_confidence']):.4f}")
  for name, load in terms.items():
    if name.startswith("expert_load/"):
      print(f"{name:32} " + " ".join(f"{float(x):.3f}" for x in load))


if __name__ == "__main__":
  main(sys.argv[1:])
