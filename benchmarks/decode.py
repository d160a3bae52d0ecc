"""Decoding speed: key/value cache vs full recompute, greedy, on the tiny configs.

  python benchmarks/decode.py [--quick] [--json benchmarks/results/decode.json]

For switch_tiny (decoder-only, 16-token prompt) and switch_t5_tiny (encoder-decoder, 256-token
inputs): new tokens per second over batches of --batch rows, each decode `--new_tokens` long,
with the cache and without it (the whole decoder rerun per token), plus compile time reported
separately. Random parameters: speed does not depend on them. Prints a table and writes JSON;
numbers are for the machine it runs on (say which when you quote them).
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
import numpy as np  # noqa: E402

from moe_jax import decoding, gin_utils  # noqa: E402
from moe_jax.models import build_network  # noqa: E402

PROMPT_LENGTH = 16  # decoder-only prompt
INPUT_LENGTH = 256  # encoder-decoder inputs


def build(config: str):
  gin_utils.parse_gin([f"models/{config}.gin"], [])
  network = build_network()
  params = jax.jit(network.init)(jax.random.key(0), **network.example_batch())["params"]
  return network, nn.unbox(params)


def time_decode(network, params, inputs, length, cache, repeats):
  """(compile seconds, median seconds per decode)."""
  kwargs = dict(max_decode_length=length, eos_id=-1, cache=cache)  # never stop early
  start = time.perf_counter()
  compiled = decoding.decode_jit.lower(network, params, **inputs, **kwargs).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, **inputs))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, **inputs))
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "decode.json"))
  parser.add_argument("--quick", action="store_true", help="32 new tokens, batch 2, 1 repeat")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  if args.quick:
    args.batch, args.new_tokens, args.repeats = 2, 32, 1

  rng = np.random.default_rng(0)
  rows = []
  print(f"{'model':>15} {'kind':>8} {'cache':>5} {'batch':>5} {'new':>4} {'compile s':>9} "
        f"{'decode s':>9} {'tokens/s':>9}")
  for config, kind in (("switch_tiny", "lm"), ("switch_t5_tiny", "enc-dec")):
    network, params = build(config)
    if kind == "lm":
      inputs = dict(prompt_BP=jnp.asarray(rng.integers(3, 259, (args.batch, PROMPT_LENGTH))))
      length = PROMPT_LENGTH + args.new_tokens
    else:
      inputs = dict(encoder_input_tokens=jnp.asarray(
          rng.integers(3, 259, (args.batch, INPUT_LENGTH))))
      length = args.new_tokens
    for cache in (True, False):
      compile_s, decode_s = time_decode(network, params, inputs, length, cache, args.repeats)
      tokens_per_s = args.batch * args.new_tokens / decode_s
      rows.append(dict(model=config, kind=kind, cache=cache, batch=args.batch,
                       new_tokens=args.new_tokens, decode_length=length, compile_s=compile_s,
                       decode_s=decode_s, tokens_per_s=tokens_per_s))
      print(f"{config:>15} {kind:>8} {str(cache):>5} {args.batch:>5} {args.new_tokens:>4} "
            f"{compile_s:>9.2f} {decode_s:>9.3f} {tokens_per_s:>9.0f}", flush=True)
    speedup = rows[-2]["tokens_per_s"] / rows[-1]["tokens_per_s"]
    print(f"{'':>15} cache speed-up: {speedup:.1f}x")
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump({"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
               "jax": jax.__version__, "quick": args.quick, "results": rows}, f, indent=1)
  print(f"written to {args.json}")


if __name__ == "__main__":
  main()
