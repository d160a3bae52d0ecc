"""Quickstart: train configs/models/switch_tiny.gin on tiny_shakespeare_lm for a few hundred
steps on CPU, then print where metrics, checkpoints and TensorBoard logs are, and a sample.

  python scripts/quickstart.py [--gin.TRAIN_STEPS=400] [--gin.MODEL_DIR="'runs/quickstart'"] ...

Running it again resumes from the last checkpoint (and finishes at once if already done).
"""

import os
import sys

import gin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import gin_utils, inference  # noqa: E402
from moe_jax.data import get_vocabulary  # noqa: E402
from moe_jax.data.prepare import prepare_tiny_shakespeare  # noqa: E402
from moe_jax.models import build_network  # noqa: E402
from moe_jax.models.summary import format_summary, summarize  # noqa: E402
from moe_jax.train import trainer  # noqa: E402
from moe_jax.train.partitioning import make_mesh  # noqa: E402

DEFAULTS = [
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
PROMPTS = ["ROMEO:\n", "First Citizen:\n"]


def main(argv):
  print(f"TFDS tiny_shakespeare: {prepare_tiny_shakespeare()}")
  has_files = any(a.startswith("--gin_file") for a in argv)
  defaults = [d for d in DEFAULTS if not (has_files and d.startswith("--gin_file"))]
  gin_utils.parse_flags(defaults + list(argv))
  print(format_summary(summarize(build_network())), flush=True)
  trainer.train()

  model_dir = os.path.abspath(gin.query_parameter("%MODEL_DIR"))
  network = build_network()
  params = inference.load_params_onto_mesh(network, model_dir, make_mesh((1, 1, 1)))
  samples = inference.generate_text(network, params, get_vocabulary(), PROMPTS,
                                    max_decode_length=160, temperature=0.8)
  print("\nSamples (temperature 0.8):")
  for prompt, text in zip(PROMPTS, samples):
    print(f"---\n{prompt}{text}")
  print(f"\nmetrics:     {model_dir}/metrics.jsonl\n"
        f"checkpoints: {model_dir}/checkpoints\n"
        f"tensorboard: tensorboard --logdir {model_dir}/tensorboard\n"
        f"next: see README.md (evaluate, infer, fine-tune on multi30k)")


if __name__ == "__main__":
  main(sys.argv[1:])
