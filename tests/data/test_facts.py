"""The `synthetic_facts` task (moe_jax.data.facts): seeded facts, splits, examples, recall."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data, gin_utils
from moe_jax.data import facts

SMALL = facts.FactsConfig(num_facts=300, key_length=3, value_length=4, num_eval_facts=40,
                          seed=7)


def _generate(config):
  return facts.generate_facts.__wrapped__(config)  # past the cache: a real second draw


def test_same_seed_same_facts_other_seed_other_facts():
  first = _generate(SMALL)
  assert first == _generate(facts.FactsConfig(**{**SMALL.__dict__}))
  assert first != _generate(facts.FactsConfig(**{**SMALL.__dict__, "seed": 8}))


def test_keys_are_distinct_and_well_formed():
  pairs = _generate(SMALL)  # 300 of 26**3 keys: duplicates are drawn and must be redrawn
  keys = [k for k, _ in pairs]
  assert len(pairs) == 300 and len(set(keys)) == 300
  assert all(len(k) == 3 and set(k) <= set("abcdefghijklmnopqrstuvwxyz") for k in keys)
  assert all(len(v) == 4 and set(v) <= set("abcdefghijklmnopqrstuvwxyz0123456789")
             for _, v in pairs)


def test_splits_train_is_all_validation_and_test_a_fixed_subset():
  train = facts.split_facts("train", SMALL)
  assert facts.split_facts("validation", SMALL) == facts.split_facts("test", SMALL)
  assert facts.split_facts("validation", SMALL) == train[:40]
  assert train == facts.generate_facts(SMALL)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    facts.split_facts("dev", SMALL)


@pytest.mark.parametrize("field,value,message", [
    ("num_facts", 0, "FactsConfig.num_facts must be a positive integer"),
    ("num_eval_facts", 301, "FactsConfig.num_eval_facts=301 exceeds num_facts=300"),
    ("num_facts", 26 ** 3 // 2 + 1, "more than half of the 26\\*\\*3 keys"),
    ("value_length", 2.5, "FactsConfig.value_length must be a positive integer"),
])
def test_bad_config_is_refused(field, value, message):
  with pytest.raises(ValueError, match=message):
    facts.FactsConfig(**{**SMALL.__dict__, field: value})


def _read(split, length=9, shuffle=False, batch_size=8):
  ds = data.get_dataset(facts.SYNTHETIC_FACTS, {"targets": length}, split, batch_size,
                        shuffle=shuffle, seed=3, pack=False, num_epochs=1, drop_remainder=False)
  return [{k: v.numpy() for k, v in b.items()} for b in ds]


def test_examples_are_key_equals_value_newline_bytes_through_gin():
  gin_utils.parse_gin([], [f"moe_jax.data.facts.FactsConfig.{k} = {v!r}"
                           for k, v in SMALL.__dict__.items()])
  batches = _read("validation")
  targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
  expected = [list((k + "=" + v + "\n").encode()) for k, v in facts.split_facts("test", SMALL)]
  np.testing.assert_array_equal(targets, np.array(expected) + 3)  # ByteVocabulary: byte + 3
  np.testing.assert_array_equal(batches[0]["decoder_input_tokens"][:, 1:],
                                batches[0]["decoder_target_tokens"][:, :-1])
  assert (batches[0]["decoder_input_tokens"][:, 0] == 0).all()
  # Train: every fact once per epoch, shuffled.
  train = np.concatenate([b["decoder_target_tokens"] for b in _read("train", shuffle=True)])
  assert sorted(map(tuple, train)) == sorted(map(tuple, np.array(
      [list((k + "=" + v + "\n").encode()) for k, v in facts.split_facts("train", SMALL)]) + 3))
  assert train[:40].tolist() != targets.tolist()
  with pytest.raises(ValueError, match=r"\['targets'\]=8 cuts 'synthetic_facts' examples of 9"):
    _read("validation", length=8)


def test_exact_recall_metric_on_decoded_strings():
  targets = ["abc=x1y2\n", "def=zzzz\n", "ghi=0000\n", "jkl=abcd\n"]
  predictions = ["abc=x1y2\n", "zzzz\nqq", "ghi=0001\n", "abcd"]  # whole text or continuation
  assert facts.exact_recall(targets, predictions) == {"exact_recall": 0.75}
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    facts.exact_recall(targets[:2], predictions[:1])


def test_recall_from_hand_made_predictions():
  config = facts.FactsConfig(num_facts=3, key_length=2, value_length=3, num_eval_facts=3)
  targets = facts.encode_facts([("ab", "xyz"), ("cd", "123"), ("ef", "999")], config)
  predicted = targets.copy()
  predicted[:, :3] = 0        # key and '=' positions are not scored
  predicted[1, 4] += 1        # one value token wrong in fact 1
  predicted[:, -1] = 0        # nor the newline
  out = facts.recall_from_predictions(predicted, targets, config)
  assert out == {"exact_recall": 2 / 3, "value_token_accuracy": 8 / 9}


class _Oracle(nn.Module):
  """Logits that put all mass on the previous input token (a copy model): no params."""

  @nn.compact
  def __call__(self, decoder_input_tokens, decoder_target_tokens=None):
    return jax.nn.one_hot(decoder_input_tokens, 384) * 10.0 - 5.0 + 0.0 * jnp.sum(
        decoder_target_tokens)


def test_fact_recall_of_a_copy_model():
  """A model predicting "the token I read" gets value token i right iff value[i] equals the
  character before it ('=' for i = 0: never), worked out from the strings."""
  config = facts.FactsConfig(num_facts=50, key_length=2, value_length=3, num_eval_facts=50)
  pairs = [("ab", "zzz"), ("cd", "1q1"), ("ef", "rss"), ("gh", "000")]
  out = facts.fact_recall(_Oracle(), {}, pairs, config=config, batch_size=3)
  right = sum(v[i] == v[i - 1] for _, v in pairs for i in range(1, 3))
  assert out == {"exact_recall": 0.0, "value_token_accuracy": right / 12}


def test_loss_weighs_the_value_tokens_only_and_rows_stay_unpacked():
  """Loss weights 1 exactly at the value positions (3 key letters + '=' -> positions 4..7 of
  9), 0 elsewhere, whatever `pack` asks for: each row is still one fact."""
  gin_utils.parse_gin([], [f"moe_jax.data.facts.FactsConfig.{k} = {v!r}"
                           for k, v in SMALL.__dict__.items()])
  for pack in (False, True):
    (batch,) = [{k: v.numpy() for k, v in b.items()} for b in data.get_dataset(
        facts.SYNTHETIC_FACTS, {"targets": 11}, "validation", 40, shuffle=False, seed=0,
        pack=pack, num_epochs=1)]
    expected = [list((k + "=" + v + "\n").encode()) + [-3, -3]
                for k, v in facts.split_facts("test", SMALL)]
    np.testing.assert_array_equal(batch["decoder_target_tokens"], np.array(expected) + 3)
    np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                  np.tile([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0], (40, 1)))
    assert "decoder_segment_ids" not in batch


def test_trainer_eval_hook_logs_exact_recall(tmp_path):
  """`train.eval_hooks = [recall_eval]` adds eval/exact_recall and eval/value_token_accuracy,
  equal to `fact_recall` of the saved params; eval/accuracy (value tokens only) equals the
  hook's value-token accuracy, both being argmax accuracy over the same positions."""
  from moe_jax.train import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from tests.train import tiny  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin([], [f"moe_jax.data.facts.FactsConfig.{k} = {v!r}"
                           for k, v in SMALL.__dict__.items()])
  # Capacity never binds (factor 8): a token's logits do not depend on the batch it is in.
  net = tiny.network(num_layers=1, num_sparse_layers=1, capacity_factor=8.0)
  trainer_kwargs = dict(model_dir=str(tmp_path), train_steps=2, batch_size=8,
                        mixture_or_task_name=facts.SYNTHETIC_FACTS,
                        task_feature_lengths={"targets": 9}, optimizer=tiny.optimizer(),
                        mesh_shape=(1, 1, 1), network=net, eval_period=2, eval_steps=5,
                        async_checkpoints=False, tensorboard=False, pack=False,
                        eval_hooks=[facts.recall_eval])
  tiny.trainer.train(**trainer_kwargs)
  (record,) = tiny.read_metrics(str(tmp_path), prefix="eval/")
  params = ckpt_lib.load_params(str(tmp_path))
  expected = facts.fact_recall(net, params, facts.split_facts("validation", SMALL))
  assert record["eval/exact_recall"] == expected["exact_recall"]
  assert record["eval/value_token_accuracy"] == pytest.approx(expected["value_token_accuracy"])
  assert record["eval/accuracy"] == pytest.approx(expected["value_token_accuracy"], abs=1e-6)
