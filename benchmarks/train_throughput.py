"""End-to-end train-step throughput (tokens/s) and model FLOPs utilisation, per dispatch backend.

  python benchmarks/train_throughput.py [--quick] [--json benchmarks/results/train_throughput.json]
      [--dtype float32|bfloat16] [--repeats 5] [--backends einsum,gather,dropless]
      [--models dense_tiny,switch_tiny,top2_tiny,base] [--base_layers 2] [--base_experts 8,64]
      [--base_batch 8] [--base_length 128] [--gin NAME=VALUE ...] [--peak_flops F]
      [--profile STEPS]

Models: `configs/models/{dense,switch,top2}_tiny.gin` at `runs/pretrain.gin`'s batch (BATCH_SIZE
32 x TASK_FEATURE_LENGTHS targets 128 = 4096 tokens a step), and "base": a Switch-Base-shaped
decoder-only LM (switch_tiny.gin with d_model 768, 12 heads x 64, d_ff 3072 ReLU experts,
vocabulary 32128, `--base_layers` layers, every other one sparse with the last one sparse
(MIXED), top-1, `--base_experts` experts, routing groups of up to 4096 tokens and capacity
factor 1.25 as in switch_base.gin) at `--base_batch` x `--base_length` tokens a step. On
2 CPU cores the default base is 2 layers (1 sparse), E in {8, 64}, 8 x 128 tokens; give the
accelerator shape (e.g. 12 layers, 32 x 512) with the flags. Each MoE model runs once per
dispatch backend (`MoeLayer.dispatch`: einsum, gather, dropless); the dense one has none.

Method, like the trainer (`moe_jax.train.trainer.train`): gin files + `runs/pretrain.gin`
bindings, `build_network()`, `build_optimizer()` (Adafactor) and `rsqrt_schedule()`, a one-device
(1, 1, 1) mesh under `jax.set_mesh`, `state_shardings` / `init_state`, and `train_step` jitted
with those shardings and the state donated. Batches are synthetic: uniform random target ids in
[1, V) (no padding, every token counts), inputs the targets shifted right, the same batch every
step (no input pipeline in the timed loop; the loss falls as it is memorised). The backends of
one (model, E) case are compiled, warmed up once, then timed interleaved (einsum, gather,
dropless, einsum, ...) so drift in machine load hits all alike; step time is the median of
`block_until_ready` wall times, tokens/s = batch x length / step time.

Model FLOPs per token (PaLM, Chowdhery et al. 2022, arXiv:2204.02311, appendix B; the same
count as Kaplan et al. 2020, arXiv:2001.08361, without its embedding term):

    flops_per_token = 6 * N_active + 12 * n_layers * (heads * head_dim) * L

N_active: `moe_jax.models.summary.summarize`'s active parameters per token (every non-expert
weight, routers included, and k / E of each MoE layer's expert weights: only the k experts a
token uses, not the capacity slack) minus the input embedding table, plus the logit projection's
V x D (a matmul; with tied embeddings it is the same table, so N_active equals the active
count). The second term is attention's QK^T and AV matmuls, forward + backward, counted over
the whole length as PaLM does (no saving for the causal mask). MFU = flops_per_token x tokens/s
/ peak FLOP/s: the work the model needs, not what the hardware did (capacity padding, one-hot
dispatch and the rematerialised nothing are overhead, i.e. lower MFU).

Peak FLOP/s: on GPU/TPU, a table of the vendors' dense bfloat16 (float32: TF32) numbers keyed by
`jax.devices()[0].device_kind` (H100 SXM / H200 989e12, A100 312e12, ...); on CPU, the FLOP/s
of a 2048^3 matmul in the model dtype, timed once in every round of each case's interleaved
repeats (median: the machine's matmul speed under the same load as the steps; `peak_source`
"measured_matmul"), and MFU is against it. `matmul_flops` is recorded on every platform. The
CPU's nominal peak, cores x GHz x FLOPs/cycle from /proc/cpuinfo (AVX-512 FMA: 32 float32 FLOPs
per FMA unit per cycle, 2 units assumed; AVX2: 16), is printed and recorded as
`nominal_peak_flops` for reference. `--peak_flops` overrides both.
Numbers are for the machine the script runs on; say which (and how loaded) when you quote them.

`--profile STEPS`: after its timed steps, each case traces STEPS more and prints where they
spend their time by part of the model (`benchmarks/profile_layer.py`'s STEP_PARTS: the MoE
layers' router / dispatch / experts / combine, attention, dense MLPs, norms, logits + loss,
embedding, and "other", mostly the optimizer's update), recorded as `profile_*` fields. On a
GPU run it with XLA_FLAGS=--xla_gpu_enable_command_buffer= (`PARTS=trainprofile bash
benchmarks/gpu.sh` does), or most kernels name no op.
"""

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # profile_layer

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import gin_utils  # noqa: E402
from moe_jax.layers import dispatch as dispatch_lib  # noqa: E402
from moe_jax.models import build_network  # noqa: E402
from moe_jax.models.summary import param_table, summarize  # noqa: E402
from moe_jax.train import partitioning, trainer  # noqa: E402
from moe_jax.train.optimizers import build_optimizer, rsqrt_schedule  # noqa: E402
import profile_layer  # noqa: E402

RUN_FILE = "runs/pretrain.gin"
TINY_MODELS = ("dense_tiny", "switch_tiny", "top2_tiny")
BASE = "base"  # Switch-Base-shaped decoder (Fedus et al. 2021, arXiv:2101.03961, Table 9 dims)
BASE_BINDINGS = ("VOCAB_SIZE=32128", "EMBED_DIM=768", "NUM_HEADS=12", "HEAD_DIM=64",
                 "MLP_DIM=3072", "MLP_ACTIVATIONS=('relu',)", "MoeLayer.max_group_size=4096")
# Dense peak FLOP/s by device_kind substring (first match wins): (bfloat16, float32 as TF32).
PEAK_TABLE = (("H100 PCIe", 756e12, 378e12), ("H100", 989e12, 494.5e12),
              ("H200", 989e12, 494.5e12), ("A100", 312e12, 156e12),
              ("TPU v4", 275e12, 275e12), ("TPU v5 lite", 197e12, 197e12),
              ("TPU v5e", 197e12, 197e12), ("TPU v5p", 459e12, 459e12),
              ("TPU v5", 459e12, 459e12), ("TPU v6", 918e12, 918e12))


class MatmulProbe:
  """An n x n x n matmul (2 n^3 FLOPs) in the model dtype, timed beside the train steps."""

  def __init__(self, n: int, dtype):
    ka, kb = jax.random.split(jax.random.key(0))
    self.n, self.args = n, (jax.random.normal(ka, (n, n), dtype),
                            jax.random.normal(kb, (n, n), dtype))
    self.fn = jax.jit(jnp.matmul)
    jax.block_until_ready(self.fn(*self.args))  # compile + warm-up

  def seconds(self) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.fn(*self.args))
    return time.perf_counter() - start

  def flops(self, times) -> float:
    return 2 * self.n**3 / float(np.median(times))


def nominal_cpu_peak() -> tuple[float | None, str]:
  """cores x GHz x float32 FLOPs/cycle read from /proc/cpuinfo (None where it cannot tell)."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return None, "no /proc/cpuinfo"
  mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
  flags = next((line.split(":")[1].split() for line in text.splitlines()
                if line.startswith("flags")), [])
  if not mhz:
    return None, "no cpu MHz in /proc/cpuinfo"
  # Per cycle per core: lanes x 2 (multiply + add of an FMA) x 2 FMA units (assumed).
  per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
  cores = len(os.sched_getaffinity(0))
  return (cores * mhz[0] * 1e6 * per_cycle,
          f"{cores} cores x {mhz[0] / 1e3:.2f} GHz x {per_cycle} FLOPs/cycle")


def table_peak(args, device) -> tuple[float | None, str]:
  """(peak FLOP/s, its source) from --peak_flops or the device table; None: use the probe."""
  if args.peak_flops:
    return args.peak_flops, "--peak_flops"
  if device.platform != "cpu":
    for kind, bf16, f32 in PEAK_TABLE:
      if kind.lower() in device.device_kind.lower():
        which = "bfloat16" if args.dtype == "bfloat16" else "float32 (TF32)"
        return (bf16 if args.dtype == "bfloat16" else f32), f"table: {kind} {which}"
  return None, "measured_matmul"


def model_flops_per_token(network, length: int) -> tuple[float, int]:
  """(6 N_active + 12 n_layers (heads x head_dim) L, N_active) as in the module docstring."""
  table = param_table(network)
  vocab, embed = table["token_embedder/embedding"]["shape"]
  active = summarize(network)["active_params_per_token"]
  # The embedding lookup is no matmul; the logit projection is (tied: the same table, so +V D).
  n_active = active - vocab * embed + (vocab * embed if network.logits_via_embedding else 0)
  decoder = network.decoder
  attention = 12 * decoder.num_layers * decoder.num_heads * decoder.head_dim * length
  return 6.0 * n_active + attention, n_active


def cases(args):
  """(model, num_experts or None, gin file, bindings) to run, in order."""
  out = []
  for model in args.models:
    if model == BASE:
      sparse = args.base_layers // 2
      for e in args.base_experts:
        out.append((BASE, e, "models/switch_tiny.gin", list(BASE_BINDINGS) + [
            f"NUM_DECODER_LAYERS={args.base_layers}", f"NUM_DECODER_SPARSE_LAYERS={sparse}",
            f"NUM_EXPERTS={e}", f"BATCH_SIZE={args.base_batch}",
            f"TASK_FEATURE_LENGTHS={{'targets': {args.base_length}}}"]))
    else:
      out.append((model, None, f"models/{model}.gin",
                  [f"BATCH_SIZE={args.tiny_batch}"] if args.tiny_batch else []))
  return out


def build_case(gin_file, bindings, backend, args):
  """Network, optimizer, schedule and (batch, length) of one gin configuration + backend."""
  extra = [f"ACTIVATION_DTYPE='{args.dtype}'", "MODEL_DIR='unused'"] + args.gin
  if backend is not None:
    extra.append(f"MoeLayer.dispatch='{backend}'")
  gin_utils.parse_gin([gin_file, RUN_FILE], list(bindings) + extra)
  try:
    logit_z_loss = gin.query_parameter("train.logit_z_loss")
  except ValueError:
    logit_z_loss = 1e-4  # trainer.train's default
  batch = gin.query_parameter("%BATCH_SIZE")
  length = gin.query_parameter("%TASK_FEATURE_LENGTHS")["targets"]
  return (build_network(), build_optimizer(), rsqrt_schedule(), logit_z_loss,
          gin.query_parameter("%NUM_MICROBATCHES"), batch, length)


def expert_kernel(backend):
  """The experts' matmul of this backend's MoE layers as gin now binds them (the library's
  per-platform default unless `--gin` chose one); None for a dense model."""
  if backend is None:
    return None
  if backend == dispatch_lib.DROPLESS:
    field, default = "grouped_matmul", dispatch_lib.default_grouped_matmul
  else:
    field, default = "buffer_matmul", lambda: dispatch_lib.default_buffer_matmul(backend)
  try:
    bound = gin.query_parameter(f"MoeLayer.{field}")
  except ValueError:
    bound = None
  return bound or default()


def synthetic_batch(batch, length, vocab, mesh):
  targets = np.random.default_rng(0).integers(1, vocab, (batch, length), dtype=np.int32)
  inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  host = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones((batch, length), np.float32)}
  return trainer.to_global(host, partitioning.batch_sharding(mesh))


def compile_train_step(built, mesh):
  """(compiled step, state, batch, compile seconds) exactly as the trainer jits it."""
  network, optimizer, schedule, logit_z_loss, microbatches, batch, length = built
  shardings = trainer.state_shardings(network, optimizer, mesh)
  state = trainer.init_state(network, optimizer, shardings, jax.random.key(0))
  data_sharding = partitioning.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(trainer.train_step, network=network, optimizer=optimizer,
                        schedule=schedule, logit_z_loss=logit_z_loss,
                        num_microbatches=microbatches),
      in_shardings=(shardings, data_sharding, partitioning.replicated(mesh)),
      out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=(0,))
  data = synthetic_batch(batch, length, network.vocab_size, mesh)
  rng = jax.random.key(0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, data, rng).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, data, rng)  # warm-up: first-call allocations stay out
  return compiled, state, data, compile_s, float(metrics["loss"])


def profile_run(name, run, steps):
  """Where `steps` train steps of one compiled case spend their time, by part of the model
  (`profile_layer.STEP_PARTS`: the MoE layers' router / dispatch / experts / combine,
  attention, dense MLPs, norms, logits + loss, embedding, other: mostly the optimizer);
  printed, and returned as record fields."""
  rng = jax.random.key(0)

  def step():
    run["state"], metrics = run["compiled"](run["state"], run["data"], rng)
    jax.block_until_ready((run["state"], metrics))

  with tempfile.TemporaryDirectory() as trace_dir:
    wall_s, times, busy_s, table = profile_layer.profile(step, run["compiled"].as_text(),
                                                         steps, trace_dir)
  parts = profile_layer.print_profile(name, wall_s, busy_s, times, table, 10,
                                      profile_layer.STEP_PARTS)
  return dict(profile_steps=steps, profile_wall_s=wall_s, profile_op_s=sum(times.values()),
              profile_busy_s=busy_s, profile_parts_s=parts,
              profile_top_ops=profile_layer.top_ops(times, table, 10))


def run_case(model, num_experts, gin_file, bindings, backends, args, mesh, peak, probe):
  """Records of one (model, E): every backend compiled, then interleaved timed repeats (the
  matmul probe timed in each round too: on CPU the peak is its median, under the same load).
  `peak`: (FLOP/s, its source), or None to take the matmul probe measured here."""
  runs, records = {}, []
  for backend in backends:
    try:
      built = build_case(gin_file, bindings, backend, args)
      network, batch, length = built[0], built[5], built[6]
      info = summarize(network)
      moe = info["moe_layers"][0] if info["moe_layers"] else None
      flops, n_active = model_flops_per_token(network, length)
      compiled, state, data, compile_s, first_loss = compile_train_step(built, mesh)
      runs[backend] = dict(compiled=compiled, state=state, data=data, times=[], meta=dict(
          model=model, backend=backend or "none", expert_kernel=expert_kernel(backend),
          num_experts=moe and moe["num_experts"],
          k=moe and moe["experts_per_token"], batch=batch, length=length,
          num_layers=network.decoder.num_layers, d_model=network.embed_dim,
          num_params=info["num_params"], active_params_per_token=info["active_params_per_token"],
          n_active_matmul=n_active, flops_per_token=flops, compile_s=compile_s,
          first_loss=first_loss))
    except Exception as e:  # noqa: BLE001 -- one broken backend must not end the sweep
      print(f"{model:>11} {num_experts or '':>4} {backend or 'none':>9} FAILED: "
            f"{type(e).__name__}: {e}", flush=True)
      records.append(dict(model=model, backend=backend, num_experts=num_experts,
                          error=f"{type(e).__name__}: {e}"))
  rng, probe_times = jax.random.key(0), []
  for _ in range(args.repeats):
    probe_times.append(probe.seconds())
    for run in runs.values():
      start = time.perf_counter()
      run["state"], metrics = run["compiled"](run["state"], run["data"], rng)
      jax.block_until_ready((run["state"], metrics))
      run["times"].append(time.perf_counter() - start)
      run["loss"] = float(metrics["loss"])
  matmul = probe.flops(probe_times)
  peak, source = peak or (matmul, f"measured_matmul ({probe.n}^3 {args.dtype}, this case)")
  for run in runs.values():
    meta = run["meta"]
    step_s = float(np.median(run["times"]))
    tokens_per_s = meta["batch"] * meta["length"] / step_s
    records.append(dict(meta, step_s=step_s, min_step_s=float(np.min(run["times"])),
                        tokens_per_s=tokens_per_s,
                        mfu=meta["flops_per_token"] * tokens_per_s / peak,
                        last_loss=run["loss"], repeats=args.repeats, peak_flops=peak,
                        peak_source=source, matmul_flops=matmul))
    if args.profile:  # after the timed steps, so that tracing never slows them
      name = f"{model} E={meta['num_experts'] or '-'} {meta['backend']}"
      records[-1].update(profile_run(name, run, args.profile))
  return records


def print_row(r):
  k = "" if r["k"] is None else f"{r['k']:g}"
  print(f"{r['model']:>11} {r['num_experts'] or '':>4} {k:>2} {r['backend']:>9} "
        f"{r['batch']:>4}x{r['length']:<5} {r['compile_s']:>8.1f} {r['step_s'] * 1e3:>9.1f} "
        f"{r['tokens_per_s']:>10.0f} {r['flops_per_token'] / 1e6:>9.2f} {r['mfu']:>7.4f} "
        f"{r['first_loss']:>7.3f} {r['last_loss']:>7.3f} {r['matmul_flops'] / 1e9:>8.1f}",
        flush=True)


def _ints(text):
  return [int(v) for v in text.split(",")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None,
                      help="default benchmarks/results/train_throughput.json "
                           "(train_throughput_quick.json with --quick)")
  parser.add_argument("--quick", action="store_true",
                      help="3 repeats, tiny models batch 8; base: E 8 only, batch 2")
  parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 5)")
  parser.add_argument("--models", default=",".join(TINY_MODELS + (BASE,)),
                      help=f"comma-separated subset of {TINY_MODELS + (BASE,)}")
  parser.add_argument("--backends", default=None,
                      help="comma-separated subset of dispatch.BACKENDS + dropless (default all)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="ACTIVATION_DTYPE (bfloat16 on accelerators; routers stay float32)")
  parser.add_argument("--tiny_batch", type=int, default=None,
                      help="rows for the tiny models (default: pretrain.gin's 32; --quick 8)")
  parser.add_argument("--base_layers", type=int, default=2, help="decoder layers (half sparse)")
  parser.add_argument("--base_experts", default=None, help="comma-separated E (default 8,64)")
  parser.add_argument("--base_batch", type=int, default=None, help="rows (default 8)")
  parser.add_argument("--base_length", type=int, default=128, help="tokens per row")
  parser.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE",
                      help="extra gin binding for every model (repeatable), e.g. "
                           "--gin \"MoeLayer.max_group_size=1024\"")
  parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                      help="also trace STEPS steps of each case and print where the time goes "
                           "by part of the model (benchmarks/profile_layer.py; default 0: off)")
  parser.add_argument("--peak_flops", type=float, default=None,
                      help="peak FLOP/s for MFU (default: device table, or measured on CPU)")
  args = parser.parse_args()
  args.repeats = args.repeats or (3 if args.quick else 5)
  args.models = args.models.split(",")
  args.base_experts = _ints(args.base_experts or ("8" if args.quick else "8,64"))
  args.base_batch = args.base_batch or (2 if args.quick else 8)
  args.tiny_batch = args.tiny_batch or (8 if args.quick else None)
  known = list(dispatch_lib.BACKENDS) + [dispatch_lib.DROPLESS]
  backends = known if args.backends is None else args.backends.split(",")
  bad = [m for m in args.models if m not in TINY_MODELS + (BASE,)]
  if bad:
    parser.error(f"--models {bad} not among {TINY_MODELS + (BASE,)}")
  if [b for b in backends if b not in known]:
    parser.error(f"--backends {backends} not all among the library's dispatch backends {known}")
  if args.repeats < 1 or args.base_layers < 2 or args.base_batch < 1 or args.profile < 0:
    parser.error("--repeats, --base_batch must be >= 1, --base_layers >= 2, --profile >= 0")
  if args.json is None:
    args.json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                             "train_throughput_quick.json" if args.quick
                             else "train_throughput.json")

  wall = time.perf_counter()
  device = jax.devices()[0]
  peak, peak_source = table_peak(args, device)
  probe = MatmulProbe(2048 if device.platform == "cpu" else 8192, jnp.dtype(args.dtype))
  nominal, nominal_how = nominal_cpu_peak() if device.platform == "cpu" else (None, "")
  matmul = probe.flops([probe.seconds() for _ in range(3)])
  print(f"{device.platform} {device.device_kind}, jax {jax.__version__}, {args.dtype}, "
        f"{args.repeats} repeats; peak: {peak_source}"
        + (f" {peak / 1e12:.1f} TFLOP/s" if peak else "") + f"; {probe.n}^3 matmul now "
        f"{matmul / 1e9:.1f} GFLOP/s" + (f"; nominal CPU peak {nominal / 1e9:.1f} GFLOP/s "
                                         f"({nominal_how})" if nominal else ""), flush=True)
  print(f"{'model':>11} {'E':>4} {'k':>2} {'backend':>9} {'batch':>10} {'compile':>8} "
        f"{'ms/step':>9} {'tokens/s':>10} {'MFLOP/tok':>9} {'MFU':>7} {'loss 0':>7} {'last':>7} "
        f"{'mm GF/s':>8}")
  meta = dict(dtype=args.dtype, nominal_peak_flops=nominal, nominal_peak=nominal_how,
              platform=device.platform, device_kind=str(device.device_kind),
              host=platform.platform(), jax_version=jax.__version__, quick=args.quick,
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  mesh = partitioning.make_mesh((1, 1, 1))
  records = []
  with jax.set_mesh(mesh):
    for model, num_experts, gin_file, bindings in cases(args):
      case = run_case(model, num_experts, gin_file, bindings,
                      [None] if model == "dense_tiny" else backends, args, mesh,
                      (peak, peak_source) if peak else None, probe)
      for r in case:
        if "error" not in r:
          print_row(r)
      records += [dict(r, **meta) for r in case]
      with open(args.json, "w") as f:  # after every case: a run cut short keeps what it measured
        json.dump(records, f, indent=1)
  print(f"{len(records)} records written to {args.json} in {time.perf_counter() - wall:.0f} s")

if __name__ == "__main__":
  main()
