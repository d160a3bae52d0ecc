"""A release's SentencePiece vocabulary reaches moe_jax's tasks through the gin macro
VOCABULARY_PATH (written into the converted model.gin); unbound, tasks keep bytes."""

import gzip
import shutil

import numpy as np
import pytest
import seqio

from moe_jax import data, gin_utils
from moe_jax.data import vocabularies

SPM_PIECES = 200


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  """A tiny T5-style SentencePiece model (pad 0, eos 1, unk 2, no bos) trained here."""
  sentencepiece = pytest.importorskip("sentencepiece")
  from moe_jax.data import sources  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("spm")
  lines = []
  for path in sources.multi30k_files("train"):  # the local Multi30k files (../shared/data)
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines += [next(f).strip() for _ in range(1000)]
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(directory / "spiece"),
      vocab_size=SPM_PIECES, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=2)
  return str(directory / "spiece.model")


def _task_vocab():
  return seqio.get_mixture_or_task("multi30k_en_de").output_features["targets"].vocabulary


def test_unbound_macro_means_bytes():
  gin_utils.parse_gin(["models/switch_tiny.gin"])
  assert vocabularies.configured_vocabulary_path() is None
  vocab = _task_vocab()
  assert isinstance(vocab.resolved, seqio.ByteVocabulary) and vocab.vocab_size == 359
  assert list(vocab.encode("ab")) == [97 + 3, 98 + 3]


def test_macro_switches_the_tasks_to_sentencepiece(spm_path):
  gin_utils.parse_gin(["models/switch_tiny.gin"], [f"VOCABULARY_PATH={spm_path!r}"])
  vocab = _task_vocab()
  reference = seqio.SentencePieceVocabulary(spm_path, extra_ids=100)
  assert vocab.resolved == reference and vocab.vocab_size == SPM_PIECES + 100
  text = "a man in an orange hat"
  assert list(vocab.encode(text)) == list(reference.encode(text))
  assert vocab.decode(vocab.encode(text)) == text and vocab.eos_id == 1
  # Through seqio's tokenizer (encode_tf) into a batch, as training reads it.
  ds = data.get_dataset("multi30k_en_de", {"inputs": 32, "targets": 32}, "validation",
                        batch_size=2, shuffle=False, seed=0, pack=False)
  batch = next(ds.as_numpy_iterator())
  assert 0 < batch["decoder_target_tokens"].max() < SPM_PIECES + 100
  first = [t for t in batch["decoder_target_tokens"][0] if t > 1]
  assert reference.decode(first) and np.all(batch["encoder_input_tokens"] < SPM_PIECES + 100)
  gin_utils.parse_gin(["models/switch_tiny.gin"], ["VOCABULARY_PATH='/no/such/spiece.model'"])
  with pytest.raises(FileNotFoundError, match="/no/such/spiece.model"):
    _task_vocab().vocab_size


def test_converted_model_gin_names_the_copied_vocabulary(hf_case, spm_path, tmp_path):
  pytest.importorskip("transformers")
  from moe_jax.convert import convert_checkpoint  # pylint: disable=g-import-not-at-top
  source = tmp_path / "release"
  shutil.copytree(hf_case("relu_step2_tied").path, source)
  shutil.copy(spm_path, source / "spiece.model")
  out = tmp_path / "out"
  assert convert_checkpoint(str(source), str(out))["vocabulary"]
  gin_utils.parse_gin([str(out / "model.gin")])
  assert vocabularies.configured_vocabulary_path() == str(out / "spiece.model")
  assert _task_vocab().resolved == seqio.SentencePieceVocabulary(str(out / "spiece.model"),
                                                                 extra_ids=100)
