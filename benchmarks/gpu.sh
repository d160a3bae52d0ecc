#!/usr/bin/env bash
# Accelerator benchmarks on one GPU, in order:
#   1. benchmarks/moe_layer.py: MoeLayer fwd + bwd per dispatch backend vs dense, bfloat16,
#      d_model 768, d_ff 3072, E in {8, 64, 128}, k in {1, 2}, T=16384 tokens; into
#      moe_layer_gpu.json.
#   2. (PARTS "windows") the dropless layer with the "windows" grouped matmul (XLA ops only,
#      not yet measured on a GPU), E in {8, 64}, k=1, into moe_layer_gpu_windows.json.
#   3. benchmarks/train_throughput.py: train-step tokens/s and MFU of the Switch-Base-shaped
#      decoder (12 layers, 6 sparse, E in {8, 64}, 32 x 512 tokens), bfloat16, per backend;
#      into train_throughput_gpu.json.
#   4. (PARTS "profile") benchmarks/profile_layer.py: where the gather and dropless layers'
#      time goes against the dense FFN (router / dispatch / experts / combine, forward and
#      backward, top kernels), E=8, k=1, the shapes of part 1, with XLA command buffers off so
#      that every kernel names its op; into profile_layer_gpu.json.
#   5. (PARTS "trainprofile") the train step of part 3 at E=8, gather only, profiled by part of
#      the model (train_throughput.py --profile: MoE router / dispatch / experts / combine,
#      attention, dense MLPs, norms, logits + loss, embedding, other = mostly the optimizer),
#      command buffers off as in part 4; into train_profile_gpu.json.
# Measured on one H200 (2026-11-29): part 1 reached E=8, k=2 in 200 s (the ragged_dot dropless
# compiles take 8-15 s at E >= 64), part 2 took ~220 s per E with three backends: the whole
# script needs ~12 minutes, more than one 10-minute call; PARTS="layer" or PARTS="train" runs
# one part ("layer windows profile train trainprofile" runs all five).
# JSON goes to "$OUT" if set, else benchmarks/results/, under each part's file name above.
# Downloads nothing: the Python environment must already have a CUDA-enabled jax (e.g.
# jax[cuda12]). Usage, from anywhere:
#   bash benchmarks/gpu.sh            # PYTHON=/path/to/python to choose the interpreter
# Override the sizes with BASE_LAYERS, BASE_EXPERTS, BASE_BATCH, BASE_LENGTH, LAYER_TOKENS, and
# the time limits (s) with LAYER_LIMIT (default 240), WINDOWS_LIMIT (150), PROFILE_LIMIT (120),
# TRAIN_LIMIT (360) and TRAIN_PROFILE_LIMIT (180);
# arguments go to train_throughput.py (e.g. --gin "MoeLayer.max_group_size=1024").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$RESULTS"

# Fail fast, before any compilation, when JAX sees no GPU.
if ! BACKEND="$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>/dev/null)"; then
  echo "gpu.sh: error: '$PYTHON' cannot import jax (set PYTHON=... to a Python with jax)" >&2
  exit 2
fi
if [[ "$BACKEND" != "gpu" && "$BACKEND" != "cuda" && "$BACKEND" != "rocm" ]]; then
  echo "gpu.sh: error: no GPU visible to JAX (jax.default_backend() is '$BACKEND');" \
       "nvidia-smi: $(command -v nvidia-smi >/dev/null && echo present || echo absent)." \
       "Run on a GPU machine whose Python has a CUDA-enabled jax (jax[cuda12])." >&2
  exit 2
fi
"$PYTHON" -c 'import jax; d = jax.devices()[0]; print(f"GPU: {d.device_kind} x {jax.device_count()}, jax {jax.__version__}")'

"$PYTHON" -c 'import flax, optax, orbax.checkpoint as o, numpy; print(f"flax {flax.__version__}, optax {optax.__version__}, orbax-checkpoint {o.__version__}, numpy {numpy.__version__}")' || true

# Each benchmark runs under its own time limit (seconds), and one that fails or runs out of
# time does not stop the next; both write their JSON after every case.
STATUS=0
run() {  # run LIMIT CMD...: prints the exact command, runs it, reports its wall time
  local limit=$1; shift
  echo "+ $*"
  local start=$SECONDS rc=0
  timeout "$limit" "$@" || rc=$?
  echo "  ($((SECONDS - start)) s, exit $rc)"
  if (( rc != 0 )); then STATUS=$rc; fi
}

PARTS="${PARTS:-layer train}"
if [[ " $PARTS " == *" layer "* ]]; then
  run "${LAYER_LIMIT:-240}" "$PYTHON" benchmarks/moe_layer.py --dtype bfloat16 --d_model 768 \
    --d_ff 3072 --experts 8,64,128 --k 1,2 --tokens "${LAYER_TOKENS:-16384}" --repeats 10 \
    --calls 20 --json "$RESULTS/moe_layer_gpu.json"
fi

if [[ " $PARTS " == *" windows "* ]]; then
  run "${WINDOWS_LIMIT:-150}" "$PYTHON" benchmarks/moe_layer.py --dtype bfloat16 --d_model 768 \
    --d_ff 3072 --experts 8,64 --k 1 --tokens "${LAYER_TOKENS:-16384}" --repeats 10 \
    --calls 20 --backends gather,dropless --grouped_matmul windows \
    --json "$RESULTS/moe_layer_gpu_windows.json"
fi

# Profiles need every kernel to name its HLO op: XLA's command buffers hide that.
PROFILE_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
if [[ " $PARTS " == *" profile "* ]]; then
  echo "+ XLA_FLAGS='$PROFILE_FLAGS'"
  XLA_FLAGS="$PROFILE_FLAGS" run "${PROFILE_LIMIT:-120}" \
    "$PYTHON" benchmarks/profile_layer.py --dtype bfloat16 --d_model 768 --d_ff 3072 \
    --experts 8 --k 1 --tokens "${LAYER_TOKENS:-16384}" --backends gather,dropless --top 12 \
    --json "$RESULTS/profile_layer_gpu.json"
fi

if [[ " $PARTS " == *" train "* ]]; then
  run "${TRAIN_LIMIT:-360}" "$PYTHON" benchmarks/train_throughput.py --dtype bfloat16 \
    --models base --base_layers "${BASE_LAYERS:-12}" --base_experts "${BASE_EXPERTS:-8,64}" \
    --base_batch "${BASE_BATCH:-32}" --base_length "${BASE_LENGTH:-512}" --repeats 10 \
    --json "$RESULTS/train_throughput_gpu.json" "$@"
fi

if [[ " $PARTS " == *" trainprofile "* ]]; then
  echo "+ XLA_FLAGS='$PROFILE_FLAGS'"
  XLA_FLAGS="$PROFILE_FLAGS" run "${TRAIN_PROFILE_LIMIT:-180}" \
    "$PYTHON" benchmarks/train_throughput.py --dtype bfloat16 --models base \
    --base_layers "${BASE_LAYERS:-12}" --base_experts 8 --base_batch "${BASE_BATCH:-32}" \
    --base_length "${BASE_LENGTH:-512}" --backends gather --repeats 3 --profile 5 \
    --json "$RESULTS/train_profile_gpu.json" "$@"
fi

echo "results: the JSON files named above, in $RESULTS"
exit $STATUS
