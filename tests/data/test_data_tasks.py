"""seqio tasks (moe_jax.data.tasks), vocabularies and sources: exact examples from the files."""

import gzip
import os

import numpy as np
import pytest
import seqio

from moe_jax.data import metrics, preprocessors, sources, tasks
from moe_jax.data.vocabularies import get_vocabulary

VOCAB = get_vocabulary()


def _first_line(path):
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return f.readline().rstrip("\n")


def test_tasks_are_registered_on_import():
  assert set(tasks.TASK_NAMES) <= set(seqio.TaskRegistry.names())
  assert set(tasks.TASK_NAMES) <= set(tasks.registered_task_names())


def test_byte_vocabulary_has_t5_extra_ids():
  assert isinstance(VOCAB, seqio.ByteVocabulary)
  assert (VOCAB.vocab_size, VOCAB.extra_ids, VOCAB.eos_id) == (3 + 256 + 100, 100, 1)
  assert VOCAB.decode(VOCAB.encode("To be, or not")) == "To be, or not"


def test_sentencepiece_vocabulary_by_path(tmp_path, tiny_shakespeare_source):
  sentencepiece = pytest.importorskip("sentencepiece")
  with open(tiny_shakespeare_source, encoding="utf-8") as f:
    lines = f.read().splitlines()[:3000]
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(tmp_path / "spm"), vocab_size=300,
      model_type="unigram", minloglevel=2)
  vocab = get_vocabulary(str(tmp_path / "spm.model"))
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert vocab.vocab_size == 300 + 100
  assert vocab.decode(vocab.encode("First Citizen:")) == "First Citizen:"
  with pytest.raises(FileNotFoundError, match="no_such.model"):
    get_vocabulary(str(tmp_path / "no_such.model"))


def test_register_tasks_with_suffix_adds_variants():
  names = tasks.register_tasks(seqio.ByteVocabulary(extra_ids=100), suffix="_test_suffix")
  try:
    assert names == tuple(n + "_test_suffix" for n in tasks.TASK_NAMES)
    assert set(names) <= set(tasks.registered_task_names())
  finally:
    for name in names:
      seqio.TaskRegistry.remove(name)
  assert not set(names) & set(tasks.registered_task_names())


def test_chunks_are_whole_lines_that_join_back():
  text = "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n" * 50 + "end"
  chunks = sources.split_into_chunks(text, max_chars=100)
  assert "".join(chunks) == text
  assert all(len(c) <= 100 and c.endswith("\n") for c in chunks[:-1])
  assert chunks[-1].endswith("end")


def test_tiny_shakespeare_splits_are_the_source_text(tfds_dir, tiny_shakespeare_source):
  with open(tiny_shakespeare_source, encoding="utf-8") as f:
    text = f.read()
  splits = [sources.load_tiny_shakespeare_text(s) for s in ("train", "validation", "test")]
  assert "".join(splits) == text
  assert len(splits[0]) == int(len(text) * 0.9)  # TFDS's 90/5/5 split
  assert splits[0].startswith("First Citizen:\nBefore we proceed any further, hear me speak.\n")


def test_lm_task_is_the_text_in_windows(tfds_dir):
  task = seqio.get_mixture_or_task(tasks.TINY_SHAKESPEARE_LM)
  assert set(task.output_features) == {"targets"}
  ds = task.get_dataset({"targets": 128}, split="validation", shuffle=False)
  windows = [ex["targets"] for ex in ds.as_numpy_iterator()]
  text = sources.load_tiny_shakespeare_text("validation")
  # Consecutive windows of at most 128 bytes, no EOS, concatenating to the split exactly.
  assert all(0 < len(w) <= 128 for w in windows)
  assert np.mean([len(w) == 128 for w in windows]) > 0.7
  assert np.concatenate(windows).tolist() == VOCAB.encode(text)


def test_multi30k_examples_are_the_files_lines(multi30k_dir):
  task = seqio.get_mixture_or_task(tasks.MULTI30K_EN_DE)
  assert task.metric_fns == [metrics.bleu]
  for split, stem in sources.MULTI30K_FILES.items():
    en = _first_line(os.path.join(multi30k_dir, f"{stem}.en.gz"))
    de = _first_line(os.path.join(multi30k_dir, f"{stem}.de.gz"))
    ex = next(task.get_dataset({"inputs": 256, "targets": 256}, split=split,
                               shuffle=False).as_numpy_iterator())
    assert ex["inputs_pretokenized"].decode() == "translate English to German: " + en
    assert ex["targets_pretokenized"].decode() == de
    assert ex["inputs"].tolist() == VOCAB.encode(preprocessors.TRANSLATE_EN_DE_PREFIX + en) + [1]
    assert ex["targets"].tolist() == VOCAB.encode(de) + [1]
    if split == "test":
      assert en == "A man in an orange hat starring at something."  # test_2016_flickr


def test_multi30k_sizes(multi30k_dir):
  for split, size in (("validation", 1014), ("test", 1000)):
    ds = sources.multi30k_dataset(split, shuffle_files=False)
    assert sum(1 for _ in ds) == size


def test_bleu():
  refs = ["Ein Mann mit einem orangefarbenen Hut.", "Zwei Hunde spielen im Schnee."]
  assert metrics.bleu(refs, refs) == {"bleu": pytest.approx(100.0)}
  assert metrics.bleu(refs, ["Katze", "Haus"])["bleu"] == pytest.approx(0.0)
  assert 0 < metrics.bleu(refs, [refs[0], "Zwei Katzen spielen im Gras."])["bleu"] < 100
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.bleu(refs, refs[:1])
