"""MoE image classifiers (moe_jax.models.vision) and the image tasks (moe_jax.data.images).

Expected values come from the math: pixel tokens map to [-1, 1] by hand-computed values;
attention without position information is permutation-equivariant and every other op is
per-token (no MoE drops at a capacity of the whole group), so mean pooling and the class token
are invariant to permuting patches when the position embeddings are zero; the digits splits
are checked against scikit-learn's data itself.
"""

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

# moe_jax.inference is imported before gin locks its config: cli.evaluate / infer configure it.
from moe_jax import cli, gin_utils, inference, objectives
from moe_jax.data import images, prepare
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MoeLayer
from moe_jax.models import build_network
from moe_jax.models.summary import param_table, summarize
from moe_jax.models.vision import (PAD_CLASS_LOGIT, LstmRowsEncoder, LstmRowsMoeClassifier,
                                   VisionEncoder, VisionMoeClassifier, images_from_tokens)
from moe_jax.train.partitioning import LOGICAL_AXIS_RULES

PATCH = 2


def _vit(pooling="mean"):
  # Capacity = the whole group (eval factor 100, capped at S): no token is ever dropped.
  moe = MoeLayer(num_experts=4, expert=ExpertMlp(intermediate_dim=32), max_group_size=64,
                 eval_capacity_factor=100.0)
  encoder = VisionEncoder(num_layers=2, num_heads=2, head_dim=8, mlp=MlpBlock(32), moe=moe,
                          num_sparse_layers=1)
  return VisionMoeClassifier(image_shape=(8, 8, 1), patch_size=PATCH, embed_dim=16,
                             encoder=encoder, pooling=pooling)


def _tokens(images_BHWC):
  return jnp.asarray(images_BHWC.reshape(images_BHWC.shape[0], -1).astype(np.int32) + 1)


@pytest.fixture(scope="module")
def digits():
  return {split: images.digits_arrays(split) for split in images.SPLITS}


def test_digits_splits_sizes_pixels_and_labels(digits):
  raw = load_digits()
  assert {s: len(y) for s, (_, y) in digits.items()} == {"train": 1437, "validation": 180,
                                                         "test": 180}
  # Together the splits are exactly scikit-learn's 1797 (image, label) pairs, each once.
  ours = sorted(x.tobytes() + bytes([y]) for x, y in zip(
      np.concatenate([x for x, _ in digits.values()]),
      np.concatenate([y for _, y in digits.values()])))
  levels = np.rint(raw.data * 255 / 16).astype(np.uint8)
  assert ours == sorted(x.tobytes() + bytes([y]) for x, y in zip(levels, raw.target))
  x, _ = digits["train"]
  assert x.shape[1] == 64 and x.min() == 0 and x.max() == 255
  assert set(np.unique(x)) <= {round(v * 255 / 16) for v in range(17)}  # 17 grey levels
  again, _ = images.digits_arrays("validation")  # the fixed permutation: the same split
  np.testing.assert_array_equal(again, digits["validation"][0])


def test_digits_task_features_through_the_pipeline(digits):
  from moe_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.get_dataset("digits", {"inputs": 64, "targets": 1}, "validation", 64,
                        shuffle=False, seed=0, pack=False, num_epochs=1, drop_remainder=False)
  batches = list(ds.as_numpy_iterator())
  inputs = np.concatenate([b["encoder_input_tokens"] for b in batches])
  targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
  x, y = digits["validation"]
  np.testing.assert_array_equal(inputs, x.astype(np.int32) + 1)  # intensity + 1, 0 = padding
  np.testing.assert_array_equal(targets[:, 0], y + 1)
  assert batches[0]["decoder_input_tokens"].tolist() == [[0]] * 64


def test_cifar10_offline_fails_fast_saying_what_to_do(tmp_path, monkeypatch):
  monkeypatch.delenv(images.CIFAR10_ENV, raising=False)
  monkeypatch.setattr(prepare, "_online", lambda host: False)
  start = time.time()
  with pytest.raises(prepare.OfflineError, match=f"{images.CIFAR10_ENV}.*MOE_JAX_TFDS_DIR"):
    images.prepare_cifar10(str(tmp_path))
  assert time.time() - start < 10
  with pytest.raises(FileNotFoundError, match="no_such.tar.gz"):
    images.prepare_cifar10(str(tmp_path), archive=str(tmp_path / "no_such.tar.gz"))


def test_pixel_tokens_to_images_by_hand():
  tokens = jnp.array([[1, 256, 129, 2]])
  np.testing.assert_allclose(images_from_tokens(tokens, (2, 2, 1), "X")[0, :, :, 0],
                             [[-1.0, 1.0], [2 * 128 / 255 - 1, 2 / 255 - 1]], atol=1e-6)
  with pytest.raises(ValueError, match=r"X.image_shape=\(2, 2, 1\) needs encoder_input_tokens "
                     r"of length 4, got 8: set TASK_FEATURE_LENGTHS"):
    images_from_tokens(jnp.ones((1, 8), jnp.int32), (2, 2, 1), "X")


@pytest.mark.parametrize("make,message", [
    (lambda: VisionMoeClassifier(patch_size=3), "VisionMoeClassifier.patch_size=3"),
    (lambda: VisionMoeClassifier(pooling="max"), "VisionMoeClassifier.pooling"),
    (lambda: VisionMoeClassifier(image_shape=(8, 8)), "VisionMoeClassifier.image_shape"),
    (lambda: VisionMoeClassifier(num_classes=0), "VisionMoeClassifier.num_classes"),
    (lambda: VisionEncoder(num_sparse_layers=1), "VisionEncoder.moe must be set"),
    (lambda: VisionEncoder(num_layers=4, num_sparse_layers=3), "VisionEncoder.num_sparse_layers"),
    (lambda: LstmRowsEncoder(), "LstmRowsEncoder.moe must be set"),
    (lambda: LstmRowsMoeClassifier(), "LstmRowsMoeClassifier.encoder must be set"),
    (lambda: LstmRowsMoeClassifier(encoder=LstmRowsEncoder(moe=MoeLayer()), readout="max"),
     "LstmRowsMoeClassifier.readout"),
])
def test_bad_fields_fail_at_construction_naming_them(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize("pooling", ["mean", "token"])
def test_vit_shapes_params_and_patch_permutation_invariance(pooling):
  net = _vit(pooling)
  rng = np.random.RandomState(0)
  images_BHWC = rng.randint(0, 256, (3, 8, 8, 1))
  decoder_inputs = jnp.zeros((3, 2), jnp.int32)  # two decoder positions: the same logits
  variables = net.init(jax.random.key(0), _tokens(images_BHWC), decoder_inputs)
  params = nn.unbox(variables["params"])
  patches = 1 + 16 if pooling == "token" else 16
  assert params["patch_embedding"]["kernel"].shape == (PATCH * PATCH * 1, 16)
  assert params["position_embedding"].shape == (patches, 16)
  assert ("class_token" in params) == (pooling == "token")
  table = param_table(net)
  assert table["encoder/layers_1/mlp/expert/wo/kernel"]["shape"] == [4, 32, 16]
  assert "encoder/layers_0/mlp/wo/kernel" in table  # dense block 0, MoE block 1 (V-MoE MIXED)
  known = {name for name, _ in LOGICAL_AXIS_RULES}
  assert all(e["axes"] is not None and set(e["axes"]) <= known for e in table.values())
  assert summarize(net)["encoder_sparse_layers"] == [1]

  apply = jax.jit(lambda p, t: net.apply({"params": p}, t, decoder_inputs))
  logits = np.asarray(apply(params, _tokens(images_BHWC)))
  assert logits.shape == (3, 2, 11) and logits.dtype == np.float32
  np.testing.assert_array_equal(logits[..., 0], PAD_CLASS_LOGIT)
  np.testing.assert_array_equal(logits[:, 0], logits[:, 1])

  # Permute the 2x2 patches of every image (a fixed shuffle of the 4x4 grid of blocks).
  blocks = images_BHWC.reshape(3, 4, PATCH, 4, PATCH, 1).transpose(0, 1, 3, 2, 4, 5)
  order = rng.permutation(16)
  shuffled = blocks.reshape(3, 16, PATCH, PATCH, 1)[:, order].reshape(3, 4, 4, PATCH, PATCH, 1)
  permuted = shuffled.transpose(0, 1, 3, 2, 4, 5).reshape(3, 8, 8, 1)
  assert not np.array_equal(permuted, images_BHWC)
  zero_pos = dict(params, position_embedding=jnp.zeros_like(params["position_embedding"]))
  np.testing.assert_allclose(apply(zero_pos, _tokens(permuted)), apply(zero_pos, _tokens(
      images_BHWC)), rtol=1e-5, atol=1e-5)
  # Position embeddings are what tells the patches apart: with them the logits move.
  assert np.abs(np.asarray(apply(params, _tokens(permuted))) - logits)[..., 1:].max() > 1e-4


def test_lstm_rows_classifier_learns_and_its_moe_trains(digits):
  gin_utils.parse_gin(["models/vision_lstm_moe_tiny.gin"])
  net = build_network()
  assert isinstance(net, LstmRowsMoeClassifier) and inference.is_classifier(net)
  assert summarize(net)["moe_layers"][0]["layer"] == "encoder/layers_1"
  x, y = digits["train"]
  params = nn.unbox(net.init(jax.random.key(0), **net.example_batch(2))["params"])
  tx = optax.adamw(3e-3)

  @jax.jit
  def step(params, opt_state, inputs, labels, rng):
    batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": jnp.zeros_like(labels),
             "decoder_target_tokens": labels}
    (_, terms), grads = jax.value_and_grad(lambda p: objectives.compute_loss(
        net, p, batch, rngs={"routing": rng}, enable_dropout=True), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, terms

  opt_state, losses, start = tx.init(params), [], params
  order = np.random.RandomState(0).permutation(len(y))
  for i in range(50):
    rows = order[(i * 32) % 1408:(i * 32) % 1408 + 32]
    params, opt_state, terms = step(params, opt_state, _tokens(x[rows].reshape(-1, 8, 8, 1)),
                                    jnp.asarray(y[rows, None] + 1), jax.random.key(i))
    losses.append(float(terms["cross_entropy"]))
    assert float(terms["aux_loss"]) > 0  # noisy top-k's importance + load losses
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses
  w_g = lambda p: p["encoder"]["layers_1"]["mlp"]["router"]["router_weights"]["w"]["kernel"]
  assert not np.any(np.asarray(w_g(start)))  # W_g = 0 at init (the paper's) ...
  assert np.abs(np.asarray(w_g(params))).max() > 0  # ... and the router learns


def test_vit_trains_evaluates_and_predicts_on_digits_through_the_cli(tmp_path):
  """300 steps of the tiny V-MoE (2 blocks, the 2nd MoE) on `digits`: > 90% on the whole
  validation split (eval) and the same accuracy recomputed from infer's argmax labels."""
  run = str(tmp_path / "run")
  task = ["--gin.MIXTURE_OR_TASK_NAME='digits'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 1}"]
  start = time.time()
  cli.train(["--gin_file=models/vision_moe_tiny.gin", "--gin_file=runs/pretrain.gin", *task,
             f"--gin.MODEL_DIR='{run}'", "--gin.NUM_LAYERS=2", "--gin.NUM_SPARSE_LAYERS=1",
             "--gin.TRAIN_STEPS=300", "--gin.BATCH_SIZE=32", "--gin.MESH_SHAPE=(1, 1, 1)",
             "--gin.EVAL_PERIOD=0", "--gin.LOG_EVERY=100", "--gin.CHECKPOINT_PERIOD=300",
             "--gin.train.tensorboard=False", "--gin.train.async_checkpoints=False"])
  train_s = time.time() - start
  one_device = "--gin.{}.mesh_shape=(1, 1, 1)"
  metrics = cli.evaluate(["--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH='{run}'", *task,
                          one_device.format("evaluate")])
  assert metrics["num_tokens"] == 180  # the whole split, one label per image
  assert metrics["accuracy"] > 0.9, (metrics, train_s)
  path = cli.infer(["--gin_file=runs/infer.gin", f"--gin.CHECKPOINT_PATH='{run}'", *task,
                    "--gin.INFER_SPLIT='validation'", "--gin.NUM_EXAMPLES=None",
                    one_device.format("infer")])
  with open(path) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 180 and set(records[0]) == {"target", "prediction"}
  assert all(0 <= r["prediction"] < 10 for r in records)
  correct = sum(r["target"] == r["prediction"] for r in records)
  assert correct / 180 == pytest.approx(metrics["accuracy"], abs=1e-6)
  assert os.path.exists(os.path.join(run, "config.gin"))
