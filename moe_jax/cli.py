"""Command-line entry points (T5X-style flags): train, evaluate, infer, model_info, quickstart.

`scripts/<name>.py` and the console scripts installed by setup.py (`moe-jax-train`, ...) call
these. Each sets up the console first: absl INFO lines of moe_jax plus every library's warnings
and errors on stderr, the training progress line on stdout, and TensorFlow's start-up notices
(which it prints whatever TF_CPP_MIN_LOG_LEVEL says) left out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging as py_logging
import os
import sys
import tempfile
from typing import Optional, Sequence

# Before TensorFlow is first imported (only `moe_jax.data` imports it): drop its INFO lines,
# keep its warnings and errors. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import gin  # noqa: E402
import jax  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from moe_jax import gin_utils  # noqa: E402

# What TensorFlow's C++ start-up writes to stderr before its logging is initialised (so that
# TF_CPP_MIN_LOG_LEVEL cannot hold it back), and the CUDA probe of a TensorFlow that we keep off
# the GPUs anyway (it only runs the input pipeline; JAX owns the accelerators, as in T5X).
_TF_START_UP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
)


@contextlib.contextmanager
def _without_lines(noise: Sequence[str]):
  """Captures file descriptor 2 (C++ writes there directly) and replays every line except the
  ones containing a `noise` string, so real errors still reach the console."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      for line in capture.read().decode(errors="replace").splitlines(keepends=True):
        if not any(n in line for n in noise):
          sys.stderr.write(line)
      sys.stderr.flush()


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (and seqio) without its start-up notices, and hides GPUs from it."""
  with _without_lines(_TF_START_UP_NOISE):
    import seqio  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")


class _OursOrWarnings(py_logging.Filter):
  """INFO lines of moe_jax; warnings and errors of every library (orbax logs INFO per save)."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or f"{os.sep}moe_jax{os.sep}" in record.pathname


def setup_console() -> None:
  """absl logging on stderr at INFO for moe_jax (as T5X scripts do), the rest at WARNING."""
  if not flags.FLAGS.is_parsed():  # absl's own flags keep their defaults (no absl.app here)
    flags.FLAGS.mark_as_parsed()  # and absl no longer warns "Logging before flag parsing"
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OursOrWarnings) for f in handler.filters):
    handler.addFilter(_OursOrWarnings())


# --- User errors: one message and a non-zero exit, no traceback. ------------------------------

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "MOE_JAX_TRACEBACK"


def is_user_error(error: BaseException) -> bool:
  """The one place that decides: what the person running the command fixes (a flag, gin file
  or binding, task, mesh, checkpoint, data, a diverging run) prints one line; anything else
  (a bug, an XLA failure) keeps its traceback. Value, file-system and gin-syntax errors are
  raised with messages naming the culprit, as are the error classes moe_jax defines."""
  return (isinstance(error, (ValueError, OSError, SyntaxError, FloatingPointError))
          or type(error).__module__.startswith("moe_jax."))


def _message(error: BaseException) -> str:
  # gin appends "In call to configurable 'train' (<function ...>)" lines: not the user's business.
  lines = [line for line in str(error).splitlines()
           if not line.strip().startswith("In call to configurable")]
  return "\n".join(lines).strip() or type(error).__name__


def entry_point(fn):
  """Runs a command; a user error exits with status 1 and one message on stderr (the traceback
  with --traceback or $MOE_JAX_TRACEBACK=1)."""
  @functools.wraps(fn)
  def main(argv: Optional[Sequence[str]] = None):
    argv = _argv(argv)
    if TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
      return fn(argv)
    try:
      return fn(argv)
    except Exception as e:  # pylint: disable=broad-exception-caught
      if not is_user_error(e):
        raise
      sys.stderr.flush()
      sys.stdout.flush()
      print(f"{os.path.basename(sys.argv[0])}: error: {_message(e)}\n"
            f"(for the traceback, rerun with {TRACEBACK_FLAG} or {TRACEBACK_ENV}=1)",
            file=sys.stderr, flush=True)
      sys.exit(1)
  return main


def _bool(value: str) -> bool:
  if value.lower() in ("1", "true", "yes"):
    return True
  if value.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_process_flags(parser: argparse.ArgumentParser) -> None:
  """Multi-process flags, under T5X's names and ours (either works)."""
  group = parser.add_argument_group("multi-process (one process per host, same command)")
  group.add_argument("--multiprocess_gpu", "--multiprocess", dest="multiprocess", nargs="?",
                     const=True, default=False, type=_bool,
                     help="call jax.distributed.initialize() (cluster auto-detection on TPU "
                     "pods, SLURM, ...; or name it with the flags below)")
  group.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  group.add_argument("--process_count", "--num_processes", dest="num_processes", type=int,
                     default=None, help="number of processes")
  group.add_argument("--process_index", "--process_id", dest="process_id", type=int,
                     default=None, help="this process's index, 0 .. process_count - 1")
  group.add_argument("--local_device_ids", type=_device_ids, default=None,
                     help="comma-separated accelerators this process drives, e.g. 0,1,2,3,4,5,6,7 "
                     "for one process per node under SLURM (which otherwise gives each process "
                     "only GPU $SLURM_LOCALID)")


def _device_ids(text: str) -> list[int]:
  try:
    return [int(i) for i in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--local_device_ids takes comma-separated integers, got {text!r}") from None


def initialize_distributed(args: argparse.Namespace) -> None:
  if args.multiprocess or args.coordinator_address:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id,
                               local_device_ids=args.local_device_ids)


def _parser(doc: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(TRACEBACK_FLAG, action="store_true",
                      help=f"show the traceback of errors (also ${TRACEBACK_ENV}=1)")
  return parser


def _start(doc: str, argv: Optional[Sequence[str]], model_from_checkpoint: bool = False) -> None:
  """What train/eval/infer share: a quiet console, flags and gin (errors before any device
  work), TensorFlow imported without its notices, then jax.distributed if asked for."""
  setup_console()
  parser = _parser(doc)
  add_process_flags(parser)
  args, _ = gin_utils.parse_flags(_argv(argv), parser,
                                  model_from_checkpoint=model_from_checkpoint)
  import_tensorflow_quietly()
  initialize_distributed(args)


def _argv(argv: Optional[Sequence[str]]) -> list[str]:
  return list(sys.argv[1:] if argv is None else argv)


TRAIN_DOC = """Train a model (T5X-style flags).

  moe-jax-train --gin_file=models/switch_tiny.gin --gin_file=runs/pretrain.gin \\
      --gin.MODEL_DIR="'runs/switch_tiny'" --gin.TRAIN_STEPS=200 [--gin.NAME=VALUE ...]

--gin_bindings='NAME = VALUE' (repeatable) is the same as --gin.NAME=VALUE. Restarting the same
command resumes from MODEL_DIR's newest readable checkpoint. Multi-host: every process runs the
same command with --multiprocess_gpu, or --coordinator_address=HOST:PORT --process_count=N
--process_index=I.
"""


@entry_point
def train(argv: Optional[Sequence[str]] = None) -> dict:
  from moe_jax.train import trainer  # pylint: disable=g-import-not-at-top
  _start(TRAIN_DOC, argv)
  return trainer.train()


EVAL_DOC = """Evaluate a checkpoint (loss, accuracy, BLEU for translation); T5X-style flags.

  moe-jax-eval --gin_file=models/switch_t5_tiny.gin --gin_file=runs/eval.gin \\
      --gin.CHECKPOINT_PATH="'runs/t5_tiny_mt'" [--gin.EVAL_STEPS=N] [--gin.NAME=VALUE ...]

Without a model --gin_file, the run's recorded MODEL_DIR/config.gin is read first (the run file
and flags still win). Metrics go to MODEL_DIR/eval_<task>_<split>.json.
"""


@entry_point
def evaluate(argv: Optional[Sequence[str]] = None) -> dict:
  with gin.unlock_config():  # registering its configurables after an earlier command's parse
    from moe_jax import inference  # pylint: disable=g-import-not-at-top
  _start(EVAL_DOC, argv, model_from_checkpoint=True)
  return inference.evaluate()


INFER_DOC = """Decode examples of a split from a checkpoint into a JSON-lines file; T5X-style flags.

  moe-jax-infer --gin_file=models/switch_t5_tiny.gin --gin_file=runs/infer.gin \\
      --gin.CHECKPOINT_PATH="'runs/t5_tiny_mt'" [--gin.NUM_EXAMPLES=N] [--gin.NAME=VALUE ...]

Without a model --gin_file, the run's recorded MODEL_DIR/config.gin is read first (the run file
and flags still win). Predictions go to MODEL_DIR/inference/<task>_<split>.jsonl.
"""


@entry_point
def infer(argv: Optional[Sequence[str]] = None) -> str:
  with gin.unlock_config():  # registering its configurables after an earlier command's parse
    from moe_jax import inference  # pylint: disable=g-import-not-at-top
  _start(INFER_DOC, argv, model_from_checkpoint=True)
  return inference.infer()


MODEL_INFO_DOC = """Describe a configured model without allocating it.

  moe-jax-model-info --gin_file=models/switch_base.gin [--gin.NAME=VALUE ...] [--json]
"""


@entry_point
def model_info(argv: Optional[Sequence[str]] = None) -> dict:
  from moe_jax.models import build_network  # pylint: disable=g-import-not-at-top
  from moe_jax.models.summary import format_summary, summarize  # pylint: disable=g-import-not-at-top
  setup_console()
  parser = _parser(MODEL_INFO_DOC)
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args, _ = gin_utils.parse_flags(_argv(argv), parser)
  info = summarize(build_network())
  print(json.dumps(info) if args.json else format_summary(info))
  return info


QUICKSTART_DOC = """Quickstart: train configs/models/switch_tiny.gin on tiny_shakespeare_lm for a few
hundred steps on CPU, then print where metrics, checkpoints and TensorBoard logs are, and a sample.

  python scripts/quickstart.py [--gin.TRAIN_STEPS=400] [--gin.MODEL_DIR="'runs/quickstart'"] ...

Running it again resumes from the last checkpoint (and finishes at once if already done).
"""

QUICKSTART_FLAGS = [
    "--gin_file=models/switch_tiny.gin",
    "--gin_file=runs/pretrain.gin",
    "--gin.MODEL_DIR='runs/quickstart'",
    "--gin.TRAIN_STEPS=400",
    "--gin.BATCH_SIZE=16",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 128}",
    "--gin.LOG_EVERY=50",
    "--gin.CHECKPOINT_PERIOD=200",
    "--gin.EVAL_PERIOD=200",
]
QUICKSTART_PROMPTS = ["ROMEO:\n", "First Citizen:\n"]


@entry_point
def quickstart(argv: Optional[Sequence[str]] = None) -> None:
  import gin  # pylint: disable=g-import-not-at-top
  from moe_jax import inference  # pylint: disable=g-import-not-at-top
  from moe_jax.models import build_network  # pylint: disable=g-import-not-at-top
  from moe_jax.models.summary import format_summary, summarize  # pylint: disable=g-import-not-at-top
  from moe_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from moe_jax.train.partitioning import make_mesh  # pylint: disable=g-import-not-at-top
  setup_console()
  argv = _argv(argv)
  has_files = any(a.startswith("--gin_file") for a in argv)
  defaults = [d for d in QUICKSTART_FLAGS if not (has_files and d.startswith("--gin_file"))]
  gin_utils.parse_flags(defaults + argv, _parser(QUICKSTART_DOC))
  import_tensorflow_quietly()
  from moe_jax.data import get_vocabulary  # pylint: disable=g-import-not-at-top
  print(format_summary(summarize(build_network())), flush=True)
  trainer.train()  # builds TFDS tiny_shakespeare from the local copy first if needed

  model_dir = os.path.abspath(gin.query_parameter("%MODEL_DIR"))
  network = build_network()
  mesh = make_mesh((1, 1, 1))
  params = inference.load_params_onto_mesh(network, model_dir, mesh)
  samples = inference.generate_text(
      network, params, get_vocabulary(), QUICKSTART_PROMPTS, max_decode_length=160,
      temperature=0.8, model_state=inference.load_model_state_onto_mesh(network, model_dir, mesh))
  print("\nSamples (temperature 0.8):")
  for prompt, text in zip(QUICKSTART_PROMPTS, samples):
    print(f"---\n{prompt}{text}")
  print(f"\nmetrics:     {model_dir}/metrics.jsonl\n"
        f"checkpoints: {model_dir}/checkpoints\n"
        f"config:      {model_dir}/config.gin\n"
        f"tensorboard: tensorboard --logdir {model_dir}/tensorboard\n"
        f"next: see README.md (evaluate, infer, fine-tune on multi30k)")
