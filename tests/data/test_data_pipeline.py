"""get_dataset (moe_jax.data.pipeline): packing, determinism, sharding, errors."""

import gzip
import os

import numpy as np
import pytest
import seqio

from moe_jax.data import get_dataset, paths, preprocessors, sources, tasks
from moe_jax.data.vocabularies import get_vocabulary

VOCAB = get_vocabulary()
ENC_DEC_FEATURES = {
    "encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
    "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
    "decoder_positions"}


def _batches(ds, n):
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(n)]


def _check_packing(segment_ids, positions):
  """Segment ids count 1, 2, ... along each row then 0 (padding); positions restart per segment."""
  for seg, pos in zip(segment_ids, positions):
    used = seg > 0
    assert np.all(used[:-1] >= used[1:])  # padding only at the end
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
    starts = starts[seg[starts] > 0]
    np.testing.assert_array_equal(seg[starts], np.arange(1, len(starts) + 1))
    expected = np.zeros_like(pos)
    for i, s in enumerate(starts):
      end = starts[i + 1] if i + 1 < len(starts) else used.sum()
      expected[s:end] = np.arange(end - s)
    np.testing.assert_array_equal(pos, expected)


def test_lm_batches_are_packed_windows(tfds_dir):
  (batch,) = _batches(get_dataset(tasks.TINY_SHAKESPEARE_LM, {"targets": 64}, "validation",
                                  batch_size=4, shuffle=False, seed=0), 1)
  assert set(batch) == {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                        "decoder_segment_ids", "decoder_positions"}
  assert all(v.shape == (4, 64) and v.dtype == np.int32 for v in batch.values())
  _check_packing(batch["decoder_segment_ids"], batch["decoder_positions"])
  np.testing.assert_array_equal(batch["decoder_loss_weights"], batch["decoder_segment_ids"] > 0)
  # Teacher forcing: inputs are targets shifted right, with 0 (BOS) at each segment start.
  targets, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
  starts = batch["decoder_positions"] == 0
  np.testing.assert_array_equal(inputs[:, 1:][~starts[:, 1:]], targets[:, :-1][~starts[:, 1:]])
  assert np.all(inputs[starts] == 0)
  text = VOCAB.decode(targets[0][batch["decoder_segment_ids"][0] == 1].tolist())
  assert text == sources.load_tiny_shakespeare_text("validation")[:64]  # "?\n\nGREMIO:\nGood..."


def test_multi30k_batches_pack_several_sentences(multi30k_dir):
  (batch,) = _batches(get_dataset(tasks.MULTI30K_EN_DE, {"inputs": 256, "targets": 256},
                                  "validation", batch_size=2, shuffle=False, seed=0), 1)
  assert set(batch) == ENC_DEC_FEATURES
  _check_packing(batch["encoder_segment_ids"], batch["encoder_positions"])
  _check_packing(batch["decoder_segment_ids"], batch["decoder_positions"])
  seg = batch["encoder_segment_ids"][0]
  assert seg.max() >= 3  # ~70-byte sentences: several per 256-token row
  with gzip.open(os.path.join(multi30k_dir, "val.en.gz"), "rt", encoding="utf-8") as f:
    lines = [f.readline().rstrip("\n") for _ in range(seg.max())]
  for i, line in enumerate(lines):
    tokens = batch["encoder_input_tokens"][0][seg == i + 1]
    assert tokens[-1] == VOCAB.eos_id
    assert VOCAB.decode(tokens.tolist()) == preprocessors.TRANSLATE_EN_DE_PREFIX + line
  dec_seg = batch["decoder_segment_ids"][0]
  assert dec_seg.max() == seg.max()  # inputs and targets of one pair share the segment id


def test_same_seed_same_batches(tfds_dir):
  def batches(seed):
    return _batches(get_dataset(tasks.TINY_SHAKESPEARE_SPAN_CORRUPTION,
                                {"inputs": 128, "targets": 32}, "train", batch_size=4,
                                shuffle=True, seed=seed), 3)
  first, again, other = batches(3), batches(3), batches(4)
  assert set(first[0]) == ENC_DEC_FEATURES
  for a, b in zip(first, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(first[0]["encoder_input_tokens"], other[0]["encoder_input_tokens"])


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_are_disjoint_and_cover_the_split(tfds_dir, shuffle):
  def rows(shard_info):
    ds = get_dataset(tasks.TINY_SHAKESPEARE_LM, {"targets": 256}, "validation", batch_size=1,
                     shuffle=shuffle, seed=1, shard_info=shard_info, pack=False, num_epochs=1)
    return [b["decoder_target_tokens"][0].tobytes() for b in ds.as_numpy_iterator()]
  everything = rows(None)
  shards = [rows(seqio.ShardInfo(index=i, num_shards=2)) for i in range(2)]
  assert len(set(everything)) == len(everything)  # windows are distinct
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(everything)
  assert abs(len(shards[0]) - len(shards[1])) < len(everything) // 4


def test_unknown_task_lists_ours():
  with pytest.raises(ValueError, match="Unknown task.*'shakespeare'.*tiny_shakespeare_lm, "
                     "tiny_shakespeare_span_corruption, multi30k_en_de"):
    get_dataset("shakespeare", {"targets": 64}, "train", 2, shuffle=False, seed=0)


def test_bad_split_and_lengths_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown split 'dev'.*'validation'"):
    get_dataset(tasks.MULTI30K_EN_DE, {"inputs": 8, "targets": 8}, "dev", 2, False, 0)
  with pytest.raises(ValueError, match=r"needs a length for \['inputs'\]"):
    get_dataset(tasks.MULTI30K_EN_DE, {"targets": 8}, "train", 2, False, 0)


def test_missing_or_empty_multi30k_names_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.MULTI30K_DIR_ENV, str(tmp_path))
  lengths = {"inputs": 64, "targets": 64}
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train.en.gz.*MOE_JAX_MULTI30K_DIR"):
    get_dataset(tasks.MULTI30K_EN_DE, lengths, "train", 2, False, 0)
  for lang in ("en", "de"):
    with gzip.open(tmp_path / f"train.{lang}.gz", "wt"):
      pass
  with pytest.raises(ValueError, match=f"empty: '{tmp_path}/train.en.gz'"):
    get_dataset(tasks.MULTI30K_EN_DE, lengths, "train", 2, False, 0)
  with gzip.open(tmp_path / "train.en.gz", "wt") as f:
    f.write("one\ntwo\n")
  with gzip.open(tmp_path / "train.de.gz", "wt") as f:
    f.write("eins\n")
  with pytest.raises(ValueError, match="not aligned.*2 lines.*1"):
    get_dataset(tasks.MULTI30K_EN_DE, lengths, "train", 2, False, 0)


def test_keeping_the_remainder_covers_the_whole_split(multi30k_dir):
  """Evaluation reads every example once: 1014 validation pairs in 63 batches of 16 + 1 of 6."""
  del multi30k_dir
  ds = get_dataset("multi30k_en_de", {"inputs": 64, "targets": 64}, "validation", 16,
                   shuffle=False, seed=0, pack=False, num_epochs=1, drop_remainder=False)
  sizes = [len(b["decoder_target_tokens"]) for b in ds.as_numpy_iterator()]
  assert sizes == [16] * 63 + [6]
