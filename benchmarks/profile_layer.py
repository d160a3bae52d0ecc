"""Where a MoeLayer's forward + backward spends its time: a profile broken down by part.

  python benchmarks/profile_layer.py [--backends gather,dropless] [--experts 8] [--k 1]
      [--tokens 4096] [--d_model 512] [--d_ff 2048] [--dtype float32] [--steps 10]
      [--json benchmarks/results/profile_layer.json]

The same step and shapes as `benchmarks/moe_layer.py` (its `make_step`; the dense FFN of equal
active FLOPs is profiled too, as the yardstick). The step runs `--steps` times under
`jax.profiler.trace`; every op the trace records for the step's XLA module (CPU thunks, GPU
kernels: events whose `hlo_op` names an instruction of the compiled HLO) is charged to a part
of the layer by the `op_name` metadata XLA keeps from JAX's name stack:

  router    the router module (logits, softmax, top-k, capacity positions, aux losses)
  dispatch  the `dispatch` scope of MoeLayer: tokens into expert buffers (dropless: the sort
            by expert and the row gather)
  experts   the expert module (its matmuls; dropless: the grouped-matmul kernel); for the
            dense FFN its two matmuls (`wi`, `wo`)
  combine   the `combine` scope: expert outputs back to tokens, mixed by their gates
  other     anything else (e.g. the layer's casts and reshapes, XLA-inserted copies)

each split into forward and backward (`transpose(` in the op_name: what autodiff added).
Loops and conditionals (while, conditional, call) are not charged themselves: the ops inside
them are. The wall time is the median over as many steps timed outside the trace; "some op
running" is the union of the ops' intervals, so wall minus it is time between ops (launch
gaps on a GPU, waits on dependencies).

Reading it per platform:
  GPU: device kernels, timed on the device. Kernels run from XLA command buffers (on by
    default) carry no `hlo_op` and land in "(unattributed)": profile with
    XLA_FLAGS=--xla_gpu_enable_command_buffer= (what `PARTS=profile bash benchmarks/gpu.sh`
    does) to charge every kernel to its op.
  CPU: host thunks. Independent ops run concurrently on the thread pool, so op times can add
    up to more than the wall time; and ops XLA:CPU runs asynchronously (its Eigen dots, e.g.
    a dense FFN's weight gradient) record only their launch, so their time is missing (on the
    2-core machine the dense FFN's trace showed ~100 ms of its ~340 ms step with no op
    running). Compare parts between backends; treat absolute op totals as lower bounds.

Prints one table per backend and the `--top` most expensive ops, and writes JSON records
(backend, num_experts, k, shapes, wall_s, per-part forward / backward seconds per step, top
ops with their op_name). The trace itself stays in a temporary directory (`--trace_dir` keeps
it, for TensorBoard / Perfetto).
"""

import argparse
import collections
import fnmatch
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # moe_layer's helpers

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import moe_layer as bench  # noqa: E402  (puts the repository on sys.path)
from moe_jax.layers import dispatch as dispatch_lib  # noqa: E402

# Parts and the op_name scopes that mark them (fnmatch patterns over the op_name's "/"-separated
# scopes), checked in order; an op matching none is "other".
LAYER_PARTS = (("router", ("router", "router.*")), ("dispatch", ("dispatch",)),
               ("combine", ("combine",)),
               ("experts", ("expert", "wi", "wo")))  # wi / wo: the dense FFN's matmuls
# A whole train step (benchmarks/train_throughput.py --profile): the MoE layers' parts first
# (they sit inside "mlp"), then the rest of the Transformer, the loss, and "other" (mostly the
# optimizer's update, which carries no module scope).
STEP_PARTS = LAYER_PARTS[:3] + (
    ("experts", ("expert",)),
    ("norms", ("*_norm",)),  # before attention: "pre_self_attention_layer_norm"
    ("attention", ("*attention*", "relpos_bias")),
    ("dense mlp", ("mlp",)),
    ("logits+loss", ("logits_head", "jvp()", "transpose(jvp())", "*take_along_axis*")),
    ("embedding", ("token_embedder",)))
_CONTAINERS = {"while", "conditional", "call"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict:
  """{instruction name: (opcode, op_name)} of every instruction in a compiled module's text."""
  table = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rest = match.groups()
    if rest.startswith("("):  # a tuple type: skip to its closing parenthesis
      depth = 0
      for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
          rest = rest[i + 1:].lstrip()
          break
    else:
      rest = rest.split(" ", 1)[1] if " " in rest else ""
    opcode = rest.split("(", 1)[0].strip()
    scope = _OP_NAME.search(rest)
    table[name] = (opcode, scope.group(1) if scope else "")
  return table


def classify(op_name: str, parts=LAYER_PARTS) -> tuple[str, bool]:
  """(part, is_backward) of an op from its op_name, e.g.
  'jit(step)/transpose(jvp(MoeLayer))/expert/wi/ENI,EIO->ENO/dot_general' -> ('experts', True).
  """
  scopes = op_name.split("/")
  backward = "transpose(" in op_name
  for part, patterns in parts:
    if any(fnmatch.fnmatchcase(scope, pattern) for scope in scopes for pattern in patterns):
      return part, backward
  return "other", backward


def part_names(parts=LAYER_PARTS) -> tuple:
  return tuple(dict.fromkeys([p for p, _ in parts] + ["other"]))


UNATTRIBUTED = "(unattributed)"  # device kernels naming no instruction of the module


def op_times(trace_events, module: str, table: dict, steps: int) -> tuple[dict, float]:
  """({instruction: seconds per step}, busy seconds per step) of the trace's op events.

  With device timelines in the trace (a GPU's, process "/device:..."), only their kernels
  count, each charged to its `hlo_op` (kernels naming none, e.g. run from a command buffer,
  go to `UNATTRIBUTED`); otherwise the host's op events for `module` (XLA:CPU thunks).
  Containers (loops, conditionals) are left out: the ops they run are counted instead. Busy
  time is the union of the ops' intervals, i.e. when at least one op of the step was running.
  """
  processes = {e["pid"]: (e.get("args") or {}).get("name", "") for e in trace_events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  totals = collections.Counter()
  intervals = []
  for event in trace_events:
    if event.get("ph") != "X" or "dur" not in event:
      continue
    if devices and event.get("pid") not in devices:
      continue
    args = event.get("args") or {}
    op = args.get("hlo_op") or event.get("name")
    # GPU traces may write the module as "jit_step(<program id>)".
    event_module = args.get("hlo_module", module).split("(")[0]
    if op not in table or event_module != module:
      if not devices:
        continue  # host events of other kinds (Python, the runtime)
      op = UNATTRIBUTED
    elif table[op][0] in _CONTAINERS:
      continue
    totals[op] += event["dur"] * 1e-6 / steps  # trace durations are in microseconds
    intervals.append((event["ts"], event["ts"] + event["dur"]))
  busy, end = 0.0, -float("inf")
  for lo, hi in sorted(intervals):
    busy += max(0.0, hi - max(lo, end))
    end = max(end, hi)
  return dict(totals), busy * 1e-6 / steps


def op_name(op: str, table: dict) -> str:
  return table[op][1] if op in table else ""


def breakdown(times: dict, table: dict, parts=LAYER_PARTS) -> dict:
  """{part: {"forward": s, "backward": s}} per step."""
  out = {p: {"forward": 0.0, "backward": 0.0} for p in part_names(parts)}
  for op, seconds in times.items():
    part, backward = classify(op_name(op, table), parts)
    out[part]["backward" if backward else "forward"] += seconds
  return out


def read_trace(trace_dir: str) -> list:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    return json.load(f)["traceEvents"]


def profile(step, hlo_text: str, steps: int, trace_dir: str):
  """(wall s, {instruction: op s}, busy s (`op_times`), instruction table), per step, of
  `step()` (one step of the compiled module whose text is `hlo_text`, run to completion):
  once to warm up, `steps` times timed, `steps` times traced."""
  table = hlo_instructions(hlo_text)
  module = re.search(r"HloModule ([\w.\-]+)", hlo_text).group(1)
  step()
  walls = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    walls.append(time.perf_counter() - start)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      step()
  times, busy_s = op_times(read_trace(trace_dir), module, table, steps)
  return float(np.median(walls)), times, busy_s, table


def print_profile(name, wall_s, busy_s, times, table, top, parts=LAYER_PARTS):
  """The per-part table of one profile and its `top` ops; returns the breakdown."""
  split = breakdown(times, table, parts)
  total = sum(times.values()) or 1.0
  print(f"\n{name}: {wall_s * 1e3:.1f} ms/step wall; ops {total * 1e3:.1f} ms in all, "
        f"some op running for {busy_s * 1e3:.1f} ms")
  print(f"  {'part':<11} {'fwd ms':>8} {'bwd ms':>8} {'share':>6}")
  for part, t in split.items():
    if t["forward"] or t["backward"]:
      print(f"  {part:<11} {t['forward'] * 1e3:>8.1f} {t['backward'] * 1e3:>8.1f} "
            f"{(t['forward'] + t['backward']) / total:>6.1%}")
  for op, seconds in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    part, backward = classify(op_name(op, table), parts)
    print(f"    {seconds * 1e3:8.2f} ms  {part:<11} {'bwd' if backward else 'fwd'}  {op}: "
          f"{op_name(op, table)[-90:]}")
  if times.get(UNATTRIBUTED, 0.0) > 0.1 * total:
    print("  (over a tenth of the kernel time names no op: run with "
          "XLA_FLAGS=--xla_gpu_enable_command_buffer= to attribute it)")
  return split


def top_ops(times: dict, table: dict, top: int) -> list:
  return [dict(op=op, seconds=t, op_name=op_name(op, table))
          for op, t in sorted(times.items(), key=lambda kv: -kv[1])[:top]]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backends", default="gather,dropless",
                      help="comma-separated dispatch backends (default gather,dropless)")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--k", type=int, default=1)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=2048)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--grouped_matmul", default=None, choices=dispatch_lib.GROUPED_MATMULS)
  parser.add_argument("--buffer_matmul", default=None, choices=dispatch_lib.BUFFER_MATMULS)
  parser.add_argument("--steps", type=int, default=10, help="profiled (and timed) steps")
  parser.add_argument("--top", type=int, default=8, help="ops listed per backend")
  parser.add_argument("--trace_dir", default=None, help="keep the traces here")
  parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "results", "profile_layer.json"))
  args = parser.parse_args()
  known = bench.all_backends()
  backends = args.backends.split(",")
  if [b for b in backends if b not in known]:
    parser.error(f"--backends {backends} not all among the library's backends {known}")
  if args.tokens % bench.ROW_LENGTH:
    parser.error(f"--tokens must be a multiple of {bench.ROW_LENGTH}, got {args.tokens}")
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0]
  print(f"{device.platform} {device.device_kind}, jax {jax.__version__}; E={args.experts} "
        f"k={args.k} T={args.tokens} D={args.d_model} F={args.d_ff} cf={args.capacity_factor} "
        f"{args.dtype}, {args.steps} steps")

  inputs = bench.make_inputs(args.tokens, args.d_model, dtype)
  layers = {"dense": bench.dense_layer(args.k, args, dtype)}
  for b in backends:
    layers[b] = bench.moe_layer(args.experts, args.k, args, dtype, dispatch=b)

  meta = dict(num_experts=args.experts, k=args.k, tokens=args.tokens, d_model=args.d_model,
              d_ff=args.d_ff, capacity_factor=args.capacity_factor, dtype=args.dtype,
              steps=args.steps, platform=device.platform,
              device=str(device.device_kind), host=platform.platform(),
              jax_version=jax.__version__, glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  records = []
  with tempfile.TemporaryDirectory() as scratch:
    for name, layer in layers.items():
      try:
        params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), inputs[0])["params"])
        compiled, compile_s, _ = bench.compile_step(layer, (params,) + inputs)
        trace_dir = os.path.join(args.trace_dir or scratch, name)
        step = lambda: jax.block_until_ready(compiled(params, *inputs))  # noqa: E731
        wall_s, times, busy_s, table = profile(step, compiled.as_text(), args.steps, trace_dir)
      except Exception as e:  # noqa: BLE001 -- one broken backend must not end the run
        print(f"\n{name} FAILED: {type(e).__name__}: {e}", flush=True)
        records.append(dict(meta, backend=name, error=f"{type(e).__name__}: {e}"))
        continue
      parts = print_profile(name, wall_s, busy_s, times, table, args.top)
      records.append(dict(
          meta, backend=name, **bench.kernel_fields(name, args), compile_s=compile_s,
          wall_s=wall_s, op_s=sum(times.values()),
          busy_s=busy_s, parts_s=parts, top_ops=top_ops(times, table, args.top)))
      with open(args.json, "w") as f:  # after every layer: a run cut short keeps its records
        json.dump(records, f, indent=1)
  print(f"\n{len(records)} records written to {args.json}")


if __name__ == "__main__":
  main()
