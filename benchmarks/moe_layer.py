"""MoeLayer forward + backward per dispatch backend, against the dense FFN of equal active FLOPs.

  python benchmarks/moe_layer.py [--quick] [--json benchmarks/results/moe_layer.json]
      [--repeats 5] [--backends einsum,gather] [--experts 8,32,128] [--k 1,2]

Default sweep: E in {8, 32, 128} x k in {1, 2}; T=4096 tokens (8 rows of 512), d_model 512,
d_ff 2048, ReLU experts (`ExpertMlp`), SwitchRouter for k=1 and TopKRouter for k=2, train
capacity factor 1.25, MoeLayer's default max_group_size 4096 (so one routing group of T tokens),
`deterministic=False` (the training path), float32. Each case times every backend in
`moe_jax.layers.dispatch.BACKENDS` as the dict stands at run time, plus "dropless" where the
library has it (`dispatch.DROPLESS`, sorted rows, no capacity: its MoeLayer default kernel,
ragged_dot on TPU, openblas on CPU, blocks on GPU, or `--grouped_matmul`), and the dense `MlpBlock`
(ReLU, intermediate_dim = d_ff * k: the tokens' active FLOPs, without the router and the
capacity slack; the MoE experts run on k * 1.25 * T buffer slots, i.e. 1.25x the dense FFN's
matmul FLOPs, so ratio_to_dense ~1.25 is the best to hope for before routing and dispatch).

`--quick` (under 2 minutes on a 2-core CPU): T=1024 (2 rows of 512), d_model 128, d_ff 256,
E in {8, 128}, k in {1, 2}, 3 repeats, a 64 MiB bandwidth probe.

Method, all in ONE process: a step is `jax.vjp` of the layer w.r.t. (params, x) pulled back
with a fixed random cotangent, returning the output and the weight and input gradients, i.e.
what a training step computes for the layer (the output too: a step that returned only the
gradients would let XLA drop the dense FFN's second forward matmul, never the MoE experts'
outputs, which the gate gradient needs: a 6/5 handicap for MoE in every ratio).
Compile time is the wall time of `jax.jit(step).lower(...).compile()`. After one warm-up call
each, repeats are interleaved (dense, backend1, backend2, ..., dense, ...) so drift in machine
load hits all alike; times are medians of `block_until_ready` wall times (`--calls N`: each
repeat dispatches N steps back to back and counts a step as 1/N of its time, for accelerators,
where one step of ~1 ms would otherwise carry the launch latency). Memory comes from
`compiled.memory_analysis()` (temp / argument / output / peak bytes, where the backend reports
them; XLA:CPU's peak_memory_in_bytes can be below temp_size_in_bytes: read temp there).

Two references per case, not backends: "experts@cap", the experts alone (`ExpertMlp` forward +
backward on [E, 1, G*C, D] buffers, no routing, dispatch or combine) at the G groups x C
capacity rows per expert that einsum and gather multiply, and "experts@T*k/E", the same at
exactly T*k/E rows per expert (the dense FFN's FLOPs: what a perfectly balanced dropless layer
multiplies). They bound what any backend
built on per-expert matmuls can reach on this machine (`rows_per_expert` in their records).

Router weights are drawn with unit fan-in variance (logits ~ N(0, 1) for unit-normal inputs)
rather than the layer's tiny init (scale 0.1), whose near-uniform probabilities still spread
tokens evenly but make the top-k choice a coin toss among nearly equal gates; the realised
`fraction_dropped` (from the layer's own RouterStats, per backend) is reported so the routing
can be checked for degeneracy. A backend that fails to build or compile is printed and
recorded with its `error`, and the sweep goes on.

Memory-traffic floor: the bytes a forward + backward must move at least, over a bandwidth
measured in the same process (median of an in-place `a + 1` on a large float32 array: read +
write):

    bytes = 3 * P + 4 * T * D * b_act
    P = E * (n_in + 1) * D * F * 4 + D * E * 4     (expert + router float32 params; dense: the
        MlpBlock's (n_in + 1) * D * (k F) * 4)
    3 * P: weights read in the forward, read again in the backward (for dx), gradients written
    4 * T * D * b_act: x read, y written, the cotangent dy read, dx written

floor_s = bytes / bandwidth; `floor_frac` = floor_s / median_s says how close a step is to it
(1.0 = bandwidth-bound at the floor). Numbers are for the machine the script runs on: say which
when you quote them (the JSON records platform, device and GLIBC_TUNABLES: on CPU the host
allocator matters, README "Performance").
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

from moe_jax.layers import dispatch as dispatch_lib  # noqa: E402
from moe_jax.layers.dense import MlpBlock  # noqa: E402
from moe_jax.layers.experts import ExpertMlp  # noqa: E402
from moe_jax.layers.moe import MOE_STATS, MoeLayer, num_groups  # noqa: E402
from moe_jax.layers.routing import SwitchRouter, TopKRouter  # noqa: E402

ACTIVATIONS = ("relu",)  # the experts' default; the dense baseline uses the same
ROW_LENGTH = 512  # tokens per row: x is [T / ROW_LENGTH, ROW_LENGTH, D]
ROUTER_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
EXPERTS_AT_CAPACITY, EXPERTS_EXACT = "experts@cap", "experts@T*k/E"  # references, not backends
MEMORY_FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                 "peak_memory_in_bytes")


def measure_bandwidth(mib: int, repeats: int) -> float:
  """Bytes per second of `a + 1` over a float32 array of `mib` MiB (one read + one write), in
  place (the input donated): a fresh output buffer would time the host allocator's first-touch
  page faults as well (on XLA:CPU with glibc's default allocator ~5-6 GB/s against ~40 GB/s
  in place, 2-core CI machine), and the floor is the memory system's."""
  a = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
  add = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  a = jax.block_until_ready(add(a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    a = jax.block_until_ready(add(a))
    times.append(time.perf_counter() - start)
  return 2 * a.nbytes / float(np.median(times))


def make_inputs(tokens: int, d_model: int, dtype):
  """(x_BLD, dy_BLD, rng): unit-normal inputs and cotangent, [T / ROW_LENGTH, ROW_LENGTH, D]."""
  shape = (tokens // ROW_LENGTH, ROW_LENGTH, d_model)
  kx, kdy = jax.random.split(jax.random.key(0))
  return (jax.random.normal(kx, shape, dtype), jax.random.normal(kdy, shape, dtype),
          jax.random.key(2))


def dense_layer(k: int, args, dtype) -> MlpBlock:
  """The dense FFN of the MoE layer's active FLOPs: intermediate_dim = d_ff * k."""
  return MlpBlock(intermediate_dim=args.d_ff * k, activations=ACTIVATIONS, dtype=dtype)


def moe_layer(num_experts: int, k: int, args, dtype, **kwargs) -> MoeLayer:
  """The benchmarked MoeLayer: SwitchRouter (k=1) or TopKRouter, ReLU ExpertMlp experts,
  `args`' capacity factor and grouped matmul; kwargs (e.g. `dispatch`) go to MoeLayer."""
  router = (SwitchRouter(kernel_init=ROUTER_INIT) if k == 1
            else TopKRouter(k=k, kernel_init=ROUTER_INIT))
  expert = ExpertMlp(intermediate_dim=args.d_ff, activations=ACTIVATIONS, dtype=dtype)
  return MoeLayer(num_experts=num_experts, router=router, expert=expert,
                  train_capacity_factor=args.capacity_factor, dtype=dtype,
                  grouped_matmul=args.grouped_matmul, buffer_matmul=args.buffer_matmul,
                  **kwargs)


def make_step(layer):
  """(params, x_BLD, dy_BLD, rng) -> (y_BLD, (dparams, dx_BLD)): forward + backward, training
  path. The output is returned too, as the next layer would consume it: otherwise XLA drops
  whatever only the output needs (the dense FFN's second forward matmul, a sixth of its FLOPs,
  while a MoE layer keeps its experts' outputs for the gate gradient)."""
  def step(params, x_BLD, dy_BLD, rng):
    rngs = {"routing": rng, "dropout": rng}
    f = lambda p, x: layer.apply({"params": p}, x, deterministic=False, rngs=rngs)
    y_BLD, pull = jax.vjp(f, params, x_BLD)
    return y_BLD, pull(dy_BLD)
  return step


def compile_step(layer, args):
  """(compiled, compile seconds, memory fields) of the jitted step for these arguments."""
  start = time.perf_counter()
  compiled = jax.jit(make_step(layer)).lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  fields = {f: (int(getattr(memory, f)) if hasattr(memory, f) else None) for f in MEMORY_FIELDS}
  jax.block_until_ready(compiled(*args))  # warm-up: first-call allocations stay out of timing
  return compiled, compile_s, fields


def param_bytes(params) -> int:
  return sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))


def all_backends() -> list[str]:
  """BACKENDS' names as the library stands now, plus its dropless path if it has one."""
  names = list(dispatch_lib.BACKENDS)
  dropless = getattr(dispatch_lib, "DROPLESS", None)
  return names + [dropless] if dropless and dropless not in names else names


def kernel_fields(name: str, args) -> dict:
  """The experts' kernel a record's backend ran: `grouped_matmul` (dropless) and
  `buffer_matmul` (einsum, gather), each None where it does not apply."""
  return dict(
      grouped_matmul=((args.grouped_matmul or dispatch_lib.default_grouped_matmul())
                      if name == dispatch_lib.DROPLESS else None),
      buffer_matmul=((args.buffer_matmul or dispatch_lib.default_buffer_matmul(name))
                     if name in dispatch_lib.BACKENDS else None))


def fraction_dropped(layer, params, x_BLD, rng) -> float:
  _, state = jax.jit(lambda p, x: layer.apply(
      {"params": p}, x, deterministic=False, rngs={"routing": rng}, mutable=[MOE_STATS]))(
          params, x_BLD)
  (stats,) = state[MOE_STATS]["router_stats"]
  return float(stats.fraction_dropped)


def run_case(num_experts, k, dense, args, backends, dtype, bandwidth, inputs):
  """Records (dense first) for one (E, k): compile each, then interleaved timed repeats."""
  x_BLD, dy_BLD, rng = inputs
  tokens, d_model = x_BLD.shape[0] * x_BLD.shape[1], x_BLD.shape[2]
  dense_compiled, dense_params, dense_info = dense
  compiled, params, info = {"dense": dense_compiled}, {"dense": dense_params}, {"dense": dense_info}
  inits = {}  # backends with the same parameter shapes share one initialisation
  inputs_of = {}  # the experts-only references' own [E, 1, rows, D] inputs
  base = dict(backend=None, num_experts=num_experts, k=k, tokens=tokens, d_model=d_model,
              d_ff=args.d_ff)
  errors = []
  for b in backends:
    try:
      layer = moe_layer(num_experts, k, args, dtype, dispatch=b)
      shapes = str(jax.eval_shape(layer.init, jax.random.key(1), x_BLD))
      if shapes not in inits:
        inits[shapes] = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x_BLD)["params"])
      params[b] = p = inits[shapes]
      compiled[b], compile_s, memory = compile_step(layer, (p, x_BLD, dy_BLD, rng))
      info[b] = dict(compile_s=compile_s, **memory, rows_per_expert=None,
                     fraction_dropped=fraction_dropped(layer, p, x_BLD, rng))
    except Exception as e:  # noqa: BLE001 -- one broken backend must not end the sweep
      print(f"{num_experts:>4} {k:>2} {b:>13} FAILED: {type(e).__name__}: {e}", flush=True)
      errors.append(dict(base, backend=b, error=f"{type(e).__name__}: {e}"))
      compiled.pop(b, None)

  # Bounds for every backend that multiplies per-expert buffers: the experts alone (ExpertMlp
  # forward + backward on [E, 1, rows, D], no routing, dispatch or combine) at the capacity
  # buffers' rows (what einsum and gather multiply) and at exactly T*k/E rows each (the dense
  # FFN's FLOPs, what a perfectly balanced dropless layer multiplies).
  layer = moe_layer(num_experts, k, args, dtype)
  expert = layer.expert
  groups = num_groups(tokens, layer.max_group_size)  # one device: the layer's own grouping
  capacity_rows = groups * layer.capacity(tokens // groups, False)
  for name, rows in ((EXPERTS_AT_CAPACITY, capacity_rows),
                     (EXPERTS_EXACT, tokens * k // num_experts)):
    shape = (num_experts, 1, rows, d_model)
    x_E1CD = jax.random.normal(jax.random.key(3), shape, x_BLD.dtype)
    params[name] = nn.unbox(jax.jit(expert.init)(jax.random.key(1), x_E1CD)["params"])
    compiled[name], compile_s, memory = compile_step(expert, (params[name], x_E1CD, x_E1CD, rng))
    info[name] = dict(compile_s=compile_s, **memory, fraction_dropped=None, rows_per_expert=rows)
    inputs_of[name] = (x_E1CD, x_E1CD, rng)

  times = {name: [] for name in compiled}
  for _ in range(args.repeats):
    for name, fn in compiled.items():
      start = time.perf_counter()
      for _ in range(args.calls):  # queued back to back: launch latency stays off a short step
        out = fn(params[name], *inputs_of.get(name, inputs))
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / args.calls)

  act_bytes = 4 * tokens * d_model * jnp.dtype(x_BLD.dtype).itemsize
  dense_median = float(np.median(times["dense"]))
  records = []
  for name in compiled:
    median = float(np.median(times[name]))
    floor_bytes = 3 * param_bytes(params[name]) + act_bytes
    records.append(dict(
        base, backend=name, dense_intermediate_dim=args.d_ff * k,
        capacity_factor=args.capacity_factor, dtype=args.dtype, repeats=args.repeats,
        calls_per_repeat=args.calls,
        **kernel_fields(name, args),
        median_s=median, min_s=float(np.min(times[name])), dense_median_s=dense_median,
        ratio_to_dense=median / dense_median, floor_bytes=floor_bytes,
        floor_s=floor_bytes / bandwidth, floor_frac=floor_bytes / bandwidth / median,
        **info[name]))
  return records, errors


def print_row(r):
  mib = lambda v: "" if v is None else f"{v / 2**20:.1f}"
  dropped = "" if r["fraction_dropped"] is None else f"{r['fraction_dropped']:.3f}"
  print(f"{r['num_experts']:>4} {r['k']:>2} {r['backend']:>13} {r['compile_s']:>9.2f} "
        f"{r['median_s'] * 1e3:>9.2f} {r['ratio_to_dense']:>7.2f} "
        f"{mib(r['temp_size_in_bytes']):>9} {mib(r['peak_memory_in_bytes']):>9} "
        f"{r['floor_s'] * 1e3:>9.3f} {r['floor_frac']:>7.3f} {dropped:>7}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None,
                      help="default benchmarks/results/moe_layer.json "
                           "(moe_layer_quick.json with --quick)")
  parser.add_argument("--quick", action="store_true", help="small shapes, E 8,128, 3 repeats")
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
  parser.add_argument("--calls", type=int, default=1,
                      help="steps per timed repeat, dispatched back to back and averaged "
                           "(default 1; more on an accelerator, where a step is ~1 ms)")
  parser.add_argument("--backends", default=None,
                      help="comma-separated subset of dispatch.BACKENDS + dropless (default: all)")
  parser.add_argument("--experts", default=None, help="comma-separated E (default 8,32,128)")
  parser.add_argument("--k", default="1,2", help="comma-separated top-k (default 1,2)")
  parser.add_argument("--tokens", type=int, default=None, help="T (default 4096)")
  parser.add_argument("--d_model", type=int, default=None, help="default 512")
  parser.add_argument("--d_ff", type=int, default=None, help="default 2048")
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--grouped_matmul", default=None, choices=dispatch_lib.GROUPED_MATMULS,
                      help="dropless kernel (default: the library's per-platform choice)")
  parser.add_argument("--buffer_matmul", default=None, choices=dispatch_lib.BUFFER_MATMULS,
                      help="the einsum / gather experts' matmul (default: the library's "
                           "choice, openblas for gather on CPU)")
  args = parser.parse_args()
  quick = args.quick
  args.repeats = args.repeats or (3 if quick else 5)
  args.tokens = args.tokens or (1024 if quick else 4096)
  args.d_model = args.d_model or (128 if quick else 512)
  args.d_ff = args.d_ff or (256 if quick else 2048)
  experts = [int(e) for e in (args.experts or ("8,128" if quick else "8,32,128")).split(",")]
  ks = [int(k) for k in args.k.split(",")]
  known = all_backends()
  backends = known if args.backends is None else args.backends.split(",")
  unknown = [b for b in backends if b not in known]
  if unknown:
    parser.error(f"--backends {unknown} not among the library's dispatch backends {known}")
  if args.repeats < 1 or args.calls < 1:
    parser.error(f"--repeats and --calls must be >= 1, got {args.repeats}, {args.calls}")
  if args.tokens % ROW_LENGTH:
    parser.error(f"--tokens must be a multiple of {ROW_LENGTH}, got {args.tokens}")
  if args.json is None:
    args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                             "moe_layer_quick.json" if quick else "moe_layer.json")
  dtype = jnp.dtype(args.dtype)

  wall = time.perf_counter()
  device = jax.devices()[0]
  # 2 GiB on an accelerator, so that a copy at TB/s outlasts the launch by far.
  bandwidth = measure_bandwidth(64 if quick else 256 if device.platform == "cpu" else 2048,
                                5 if quick else 10)
  print(f"{device.platform} {device.device_kind}, jax {jax.__version__}; T={args.tokens} "
        f"D={args.d_model} F={args.d_ff} cf={args.capacity_factor} {args.dtype}, "
        f"{args.repeats} repeats; bandwidth {bandwidth / 1e9:.1f} GB/s; backends {backends}")
  print(f"{'E':>4} {'k':>2} {'backend':>13} {'compile s':>9} {'ms/step':>9} {'/dense':>7} "
        f"{'temp MiB':>9} {'peak MiB':>9} {'floor ms':>9} {'floor/t':>7} {'dropped':>7}")

  inputs = make_inputs(args.tokens, args.d_model, dtype)
  meta = dict(platform=device.platform, device=str(device.device_kind),
              host=platform.platform(), jax_version=jax.__version__,
              bandwidth_bytes_per_s=bandwidth, quick=quick,
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  records = []
  for k in ks:
    # The dense baseline depends on k only: compile it once, time it again in every case.
    mlp = dense_layer(k, args, dtype)
    dense_params = nn.unbox(jax.jit(mlp.init)(jax.random.key(1), inputs[0])["params"])
    fn, compile_s, memory = compile_step(mlp, (dense_params,) + inputs)
    dense = (fn, dense_params, dict(compile_s=compile_s, **memory, fraction_dropped=None,
                                    rows_per_expert=None))
    for num_experts in experts:
      case, errors = run_case(num_experts, k, dense, args, backends, dtype, bandwidth, inputs)
      for r in case:
        print_row(r)
      records += [dict(r, **meta) for r in case + errors]
      with open(args.json, "w") as f:  # after every case: a run cut short keeps what it measured
        json.dump(records, f, indent=1)
  print(f"{len(records)} records written to {args.json} in {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
  main()
