"""Dispatch backends compared: MoeLayer forward + backward time and peak buffer size.

  python benchmarks/dispatch.py [--out benchmarks/results/dispatch.json]

"einsum" builds one-hot [G, S, E, C] dispatch / combine tensors (O(S^2) per group at fixed
capacity factor); "gather" indexes the buffers directly (linear in tokens). Prints a table and
writes JSON; numbers are for the machine it runs on (say which when you quote them).
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax.layers.experts import ExpertMlp  # noqa: E402
from moe_jax.layers.moe import MoeLayer  # noqa: E402
from moe_jax.layers.routing import TopKRouter  # noqa: E402

CASES = [  # (tokens, group size, experts, d_model, d_ff, k)
    (4096, 512, 8, 256, 512, 2),
    (4096, 1024, 32, 256, 512, 2),
    (8192, 2048, 64, 256, 512, 1),
]


def time_case(tokens, group, experts, d_model, d_ff, k, dispatch, repeats=5):
  layer = MoeLayer(num_experts=experts, router=TopKRouter(k=k), max_group_size=group,
                   expert=ExpertMlp(intermediate_dim=d_ff), dispatch=dispatch)
  x = jax.random.normal(jax.random.key(0), (tokens // 256, 256, d_model))
  params = nn.unbox(layer.init(jax.random.key(1), x)["params"])

  @jax.jit
  def step(params, x):
    return jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(params)

  compiled = step.lower(params, x).compile()
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  jax.block_until_ready(compiled(params, x))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(compiled(params, x))
  return (time.perf_counter() - start) / repeats, temp_bytes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                     "dispatch.json"))
  args = parser.parse_args()
  rows = []
  print(f"{'tokens':>7} {'S':>5} {'E':>4} {'k':>2} {'backend':>7} {'ms/step':>9} {'temp MiB':>9}")
  for case in CASES:
    for dispatch in ("einsum", "gather"):
      seconds, temp = time_case(*case, dispatch)
      tokens, group, experts, d_model, d_ff, k = case
      rows.append(dict(tokens=tokens, group_size=group, experts=experts, d_model=d_model,
                       d_ff=d_ff, k=k, dispatch=dispatch, ms_per_step=seconds * 1e3,
                       temp_mib=None if temp is None else temp / 2**20))
      print(f"{tokens:>7} {group:>5} {experts:>4} {k:>2} {dispatch:>7} {seconds * 1e3:>9.1f} "
            f"{'' if temp is None else f'{temp / 2**20:9.1f}'}", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
               "results": rows}, f, indent=1)
  print(f"written to {args.out}")


if __name__ == "__main__":
  main()
