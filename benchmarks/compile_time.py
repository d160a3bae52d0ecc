"""Compile time of a Switch-Large train step, unrolled vs `nn.scan` over layers (and remat).

  python benchmarks/compile_time.py [--config switch_large] [--mesh 1,8,1] [--batch 8]
      [--length 128] [--cases unrolled,scan,scan+full] [--layers N]
      [--json benchmarks/results/compile_time.json]

Ahead of time and without allocating anything: the TrainState comes from `jax.eval_shape`
(`steps.abstract_state`, shardings from the logical-axis rules), and
`jax.jit(train_step, in_shardings, out_shardings).lower(...).compile()` runs under
`jax.set_mesh` and the rules on 8 simulated CPU devices (XLA_FLAGS set before jax is imported),
with Adafactor (T5's optimizer, `configs/runs/pretrain.gin`). Each case reports the wall time
of `lower` (tracing + StableHLO) and of `compile` (XLA), the number of instructions in the
optimized HLO, and its all-to-alls. Cases: "unrolled" (SCAN_LAYERS=False), "scan"
(SCAN_LAYERS=True) and "scan+full" (plus REMAT_POLICY='full'). `--layers N` overrides the
number of layers per stack (sparse layers: N / 2), for quick runs.
"""

import argparse
import json
import os
import platform
import re
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from moe_jax import gin_utils  # noqa: E402
from moe_jax.models import build_network  # noqa: E402
from moe_jax.train import optimizers, partitioning  # noqa: E402
from moe_jax.train import steps  # noqa: E402

CASES = {"unrolled": ["SCAN_LAYERS=False"], "scan": ["SCAN_LAYERS=True"],
         "scan+full": ["SCAN_LAYERS=True", "REMAT_POLICY='full'"]}


def lower_and_compile(network, mesh_shape, batch_size, length):
  """(lower seconds, compile seconds, compiled) of one train step; nothing is allocated."""
  mesh = partitioning.make_mesh(mesh_shape)
  optimizer = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
  start = time.perf_counter()
  lowered = steps.lower_train_step(network, optimizer, mesh, batch_size, length)
  lowered_s = time.perf_counter() - start
  with jax.set_mesh(mesh), partitioning.axis_rules():
    start = time.perf_counter()
    compiled = lowered.compile()
    return lowered_s, time.perf_counter() - start, compiled


def hlo_counts(compiled) -> dict:
  """Instructions and all-to-alls in the optimized HLO text."""
  text = compiled.as_text()
  return {"hlo_instructions": len(re.findall(r"^\s+(?:ROOT )?%?[\w.-]+ = ", text, re.M)),
          "all_to_alls": len(re.findall(r"\ball-to-all(?:-start)?\(", text))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="switch_large")
  parser.add_argument("--mesh", default="1,8,1")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--layers", type=int, default=None)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                     "compile_time.json"))
  args = parser.parse_args()
  mesh_shape = tuple(int(s) for s in args.mesh.split(","))
  sizes = []
  if args.layers:
    sizes = [f"{m}={v}" for m, v in (("NUM_ENCODER_LAYERS", args.layers),
                                     ("NUM_DECODER_LAYERS", args.layers),
                                     ("NUM_ENCODER_SPARSE_LAYERS", args.layers // 2),
                                     ("NUM_DECODER_SPARSE_LAYERS", args.layers // 2))]
  rows = []
  print(f"{'case':10} {'lower s':>8} {'compile s':>10} {'total s':>8} {'HLO instr':>10} "
        f"{'all-to-all':>10}")
  for case in args.cases.split(","):
    gin_utils.parse_gin([f"models/{args.config}.gin"], sizes + CASES[case])
    network = build_network()
    lowered_s, compile_s, compiled = lower_and_compile(network, mesh_shape, args.batch,
                                                       args.length)
    row = {"case": case, "lower_s": round(lowered_s, 2), "compile_s": round(compile_s, 2),
           "total_s": round(lowered_s + compile_s, 2), **hlo_counts(compiled)}
    rows.append(row)
    print(f"{case:10} {row['lower_s']:8.1f} {row['compile_s']:10.1f} {row['total_s']:8.1f} "
          f"{row['hlo_instructions']:10d} {row['all_to_alls']:10d}", flush=True)
    del compiled
  result = {"config": args.config, "layers_per_stack": args.layers or "config", "mesh": mesh_shape,
            "batch": args.batch, "length": args.length, "optimizer": "adafactor",
            "platform": jax.default_backend(), "devices": jax.device_count(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "jax": jax.__version__,
            # Compile times scale with the machine's other load: record it beside them.
            "load_average_1min_at_end": round(os.getloadavg()[0], 1),
            "results": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
