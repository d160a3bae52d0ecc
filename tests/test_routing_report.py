"""The routing report (moe_jax.routing_report) of a tiny Switch run on `synthetic_facts`."""

import os

import jax
import numpy as np
import pytest
import seqio

from moe_jax import gin_utils, routing_report
from moe_jax.data import facts
from moe_jax.train import partitioning, trainer

TINY = ["EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8", "NUM_DECODER_LAYERS=2",
        "NUM_DECODER_SPARSE_LAYERS=2", "NUM_EXPERTS=4", "TRAIN_STEPS=3", "BATCH_SIZE=8",
        "LOG_EVERY=1", "EVAL_PERIOD=0", "MESH_SHAPE=(1, 1, 1)", "NUM_FACTS=200",
        "NUM_EVAL_FACTS=40", "train.tensorboard=False",
        "MoeLayer.eval_capacity_factor=4.0"]  # capacity = the group: no token is dropped
BATCH, BATCHES = 8, 2
LAYERS = ("decoder/layers_0/mlp", "decoder/layers_1/mlp")


def train_tiny(tmp_path_factory, model_gin: str) -> str:
  model_dir = str(tmp_path_factory.mktemp("routing") / "run")
  gin_utils.parse_gin([model_gin, "runs/facts.gin"], TINY + [f"MODEL_DIR='{model_dir}'"])
  trainer.train()
  return model_dir


def capture_first_batch(run_dir: str) -> dict:
  """capture_routing of the run's first validation batch."""
  mesh = partitioning.make_mesh((1, 1, 1))
  with jax.set_mesh(mesh):
    network, variables, task, lengths, pack, _ = routing_report.load_run(run_dir, mesh)
    batch = next(trainer.input_batches(task, lengths, "validation", BATCH, shuffle=False, seed=0,
                                       num_epochs=1, pack=pack))
    return routing_report.capture_routing(network, variables, batch)


def assert_top_expert_is_argmax(captured: dict) -> None:
  assert sorted(captured) == list(LAYERS)
  for assigned_NE, logits_NE in captured.values():
    assert (assigned_NE.sum(axis=1) == 1).all()
    np.testing.assert_array_equal(assigned_NE.argmax(axis=1), logits_NE.argmax(axis=1))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return train_tiny(tmp_path_factory, "models/switch_tiny.gin")


@pytest.fixture(scope="module")
def report(run_dir):
  return routing_report.routing_report(run_dir, max_batches=BATCHES, batch_size=BATCH)


def test_token_classes_of_a_hand_written_byte_string():
  chars = routing_report.token_chars(seqio.ByteVocabulary(extra_ids=100), 384)
  tokens = np.array(list("aZ9!  \n~\t".encode()) + [0xE9, 0xFF]) + 3
  names = [routing_report.TOKEN_CLASSES[c] for c in routing_report.classify_tokens(
      np.concatenate([[0, 1, 2], tokens, [360, 383]]), chars)]
  assert names == (["other"] * 3 + ["letters", "capitals", "digits", "punctuation", "spaces",
                                    "spaces", "newlines", "punctuation", "spaces", "other",
                                    "other"] + ["other"] * 2)


def test_load_history_keeps_the_records_after_a_resume():
  def load(step, value):
    return {"step": step, "expert_load/mlp": [value, 1.0 - value]}
  # Logged to step 200, checkpointed at 50, killed; resumed and killed again after 150: the
  # first 100..200 are stale. The eval row (no expert_load) is not a training record.
  records = [load(50, 0.1), load(100, 0.2), {"step": 100, "eval/loss": 1.0}, load(150, 0.3),
             load(200, 0.4), load(100, 0.6), load(150, 0.7)]
  steps, loads = routing_report.load_history(records)["mlp"]
  np.testing.assert_array_equal(steps, [50, 100, 150])
  np.testing.assert_allclose(loads[:, 0], [0.1, 0.6, 0.7])


def test_report_files_and_shares(run_dir, report):
  names = sorted(os.listdir(os.path.dirname(report["report"])))
  assert names == sorted(["report.md"] + [f"{kind}_{layer.replace('/', '_')}.png"
                                          for kind in ("expert_load", "token_classes")
                                          for layer in LAYERS])
  assert all(os.path.getsize(f) > 1000 for f in report["files"])
  text = open(report["report"]).read()
  assert all(f"## {layer}" in text for layer in LAYERS) and "| 3 |" in text
  # What the layers read: 16 validation facts, "\0key=value" (BOS, 6 + 1 + 6 characters).
  pairs = facts.split_facts("validation", facts.FactsConfig(num_facts=200,
                                                            num_eval_facts=40))[:BATCH * BATCHES]
  read = "".join("=" + k + "=" + v for k, v in pairs)  # BOS counted as '=' below, then fixed
  counts = np.array([sum(routing_report.char_class(c) == i for c in read)
                     for i in range(len(routing_report.TOKEN_CLASSES))], float)
  counts[routing_report.TOKEN_CLASSES.index("punctuation")] -= len(pairs)
  counts[routing_report.TOKEN_CLASSES.index("other")] += len(pairs)
  for layer in LAYERS:
    s = report["layers"][layer]
    assert s["tokens"] == BATCH * BATCHES * 14 and s["drop_rate"] == 0.0
    np.testing.assert_allclose(s["token_share_E"].sum(), 1.0, rtol=1e-12)
    busy = s["token_share_E"] > 0
    np.testing.assert_allclose(s["class_share_EC"][busy].sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(s["class_share_C"], counts / counts.sum(), rtol=1e-12)
    assert 0.0 <= s["entropy"] <= np.log(4) + 1e-9


def test_every_token_goes_to_its_top_expert_at_its_position(run_dir, report):
  """Switch, no drops: each real token's one expert is the argmax of ITS router logits, so the
  [G, E, C] slots map back to [B, L] positions right; the load heatmap has one column a step."""
  del report
  assert_top_expert_is_argmax(capture_first_batch(run_dir))
  history = routing_report.load_history(routing_report.read_metrics(run_dir))
  steps, load_TE = history[LAYERS[1]]
  assert steps.tolist() == [1, 2, 3] and load_TE.shape == (3, 4)
  np.testing.assert_allclose(load_TE.sum(axis=1), 1.0, rtol=1e-5)


def test_cosine_router_scores_are_its_logits(tmp_path_factory):
  """The cosine router has no `router_weights`: the report reads the scores it sows, the scaled
  cosine similarities it routes by (each token's expert is their argmax), and gives an entropy."""
  cosine_dir = train_tiny(tmp_path_factory, "models/cosine_tiny.gin")
  assert_top_expert_is_argmax(capture_first_batch(cosine_dir))
  report = routing_report.routing_report(cosine_dir, max_batches=1, batch_size=BATCH)
  for layer in LAYERS:
    assert 0.0 <= report["layers"][layer]["entropy"] <= np.log(4) + 1e-9
