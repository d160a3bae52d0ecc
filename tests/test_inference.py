"""evaluate / infer / generate_text from a checkpoint, end to end on a tiny translation model."""

import json
import os

import pytest

from moe_jax import gin_utils, inference
from moe_jax.data import get_vocabulary
from moe_jax.models import build_network
from moe_jax.train import trainer

LENGTHS = {"inputs": 32, "targets": 32}
TINY = ["EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8"]
# One layer per stack, each sparse (the model's size does not matter here): less to compile.
T5_LAYERS = ["NUM_ENCODER_LAYERS=1", "NUM_DECODER_LAYERS=1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A switch_t5_tiny checkpoint after 2 steps on multi30k_en_de."""
  path = str(tmp_path_factory.mktemp("mt"))
  gin_utils.parse_gin(["models/switch_t5_tiny.gin", "runs/pretrain.gin"], TINY + T5_LAYERS + [
      f"MODEL_DIR='{path}'", "TRAIN_STEPS=2", "BATCH_SIZE=4", "LOG_EVERY=1",
      "MIXTURE_OR_TASK_NAME='multi30k_en_de'", f"TASK_FEATURE_LENGTHS={LENGTHS}",
      "EVAL_PERIOD=0", "MESH_SHAPE=(1, 1, 1)", "train.tensorboard=False"])
  trainer.train()
  return path


def _parse(run_file, model_dir, *bindings):
  gin_utils.parse_gin(["models/switch_t5_tiny.gin", run_file], TINY + T5_LAYERS + [
      f"CHECKPOINT_PATH='{model_dir}'", f"TASK_FEATURE_LENGTHS={LENGTHS}", *bindings])


def test_evaluate_reports_loss_accuracy_and_bleu(model_dir):
  _parse("runs/eval.gin", model_dir, "BATCH_SIZE=4", "evaluate.max_batches=1")
  metrics = inference.evaluate()
  assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["bleu"] <= 100.0
  assert metrics["loss"] > 0
  with open(os.path.join(model_dir, "eval_multi30k_en_de_validation.json")) as f:
    assert json.load(f) == pytest.approx(metrics)


def test_infer_writes_one_line_per_example(model_dir):
  _parse("runs/infer.gin", model_dir, "BATCH_SIZE=2", "NUM_EXAMPLES=3", "TEMPERATURE=0.5")
  path = inference.infer()
  with open(path) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 3
  assert lines[0]["inputs"].startswith("translate English to German: ")
  assert set(lines[0]) == {"inputs", "target", "prediction"}


def test_checkpoint_of_another_model_is_refused(model_dir):
  _parse("runs/eval.gin", model_dir, "EMBED_DIM=24")
  with pytest.raises(ValueError, match="does not hold this model's parameters"):
    inference.evaluate()


def test_generate_text_continues_prompts(model_dir):
  gin_utils.parse_gin(["models/switch_tiny.gin"], TINY + ["NUM_DECODER_LAYERS=2"])
  network = build_network()
  import flax.linen as nn
  import jax
  params = nn.unbox(jax.jit(network.init)(jax.random.key(0), **network.example_batch())[
      "params"])
  texts = inference.generate_text(network, params, get_vocabulary(), ["ab", "hello"],
                                  max_decode_length=12)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  with pytest.raises(ValueError, match="max_decode_length"):
    inference.generate_text(network, params, get_vocabulary(), ["x" * 20], max_decode_length=12)
