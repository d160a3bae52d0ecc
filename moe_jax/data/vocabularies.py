"""Vocabularies: bytes by default (no download), SentencePiece by path.

moe_jax's tasks hold a `ConfiguredVocabulary`: it becomes the SentencePiece model named by the
gin macro `VOCABULARY_PATH` when one is bound (e.g. `--gin.VOCABULARY_PATH="'spiece.model'"`,
or the `model.gin` that `scripts/convert_checkpoint.py` writes beside a release's
`spiece.model`), and the byte vocabulary otherwise. It is resolved each time it is used, after
gin has parsed, so registering the tasks at import needs no vocabulary yet and the trainer
needs no extra call.
"""

import functools
import os
from typing import Optional

import gin
import seqio

# T5 reserves 100 extra ids as span-corruption sentinels, counted down from the top of the
# vocabulary (sentinel 0 = vocab_size - 1). Bytes: 3 specials + 256 bytes + 100 = 359 ids.
# T5's SentencePiece model (the Switch releases'): 32000 pieces + 100 = 32100 <= 32128.
NUM_EXTRA_IDS = 100

# The gin macro naming a SentencePiece model for moe_jax's tasks (None or unbound: bytes).
VOCABULARY_PATH_MACRO = "VOCABULARY_PATH"


def get_vocabulary(
    spm_path: Optional[str] = None, extra_ids: int = NUM_EXTRA_IDS
) -> seqio.Vocabulary:
  """`seqio.ByteVocabulary` when `spm_path` is None, else the SentencePiece model there."""
  if spm_path is None:
    return seqio.ByteVocabulary(extra_ids=extra_ids)
  if not os.path.exists(spm_path):
    raise FileNotFoundError(f"SentencePiece model not found: {spm_path!r}")
  return seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)


@functools.lru_cache(maxsize=None)
def _cached_vocabulary(spm_path: Optional[str], extra_ids: int) -> seqio.Vocabulary:
  return get_vocabulary(spm_path, extra_ids)


def configured_vocabulary_path() -> Optional[str]:
  """The gin macro VOCABULARY_PATH (absolute), or None when gin binds none."""
  try:
    path = gin.query_parameter(f"%{VOCABULARY_PATH_MACRO}")
  except ValueError:  # gin raises ValueError for a macro no file or flag defines
    return None
  if path is None:
    return None
  if not isinstance(path, str) or not path:
    raise ValueError(f"{VOCABULARY_PATH_MACRO} must be a path string or None, got {path!r}")
  return os.path.abspath(os.path.expanduser(path))


def configured_vocabulary(extra_ids: int = NUM_EXTRA_IDS) -> seqio.Vocabulary:
  """The SentencePiece model at gin's VOCABULARY_PATH, or bytes when it is unbound or None."""
  return _cached_vocabulary(configured_vocabulary_path(), extra_ids)


class ConfiguredVocabulary(seqio.Vocabulary):
  """Stands for `configured_vocabulary()`, looked up at every use (see the module docstring)."""

  def __init__(self, extra_ids: int = NUM_EXTRA_IDS):
    super().__init__(extra_ids=extra_ids)

  @property
  def resolved(self) -> seqio.Vocabulary:
    return configured_vocabulary(self._extra_ids)

  def __getattr__(self, name):  # anything else (sp_model, tokenizer, ...) of the real one
    if name.startswith("__") or name == "_extra_ids":
      raise AttributeError(name)
    return getattr(self.resolved, name)

  @property
  def bos_id(self):
    return self.resolved.bos_id

  @property
  def eos_id(self):
    return self.resolved.eos_id

  @property
  def pad_id(self):
    return self.resolved.pad_id

  @property
  def unk_id(self):
    return self.resolved.unk_id

  @property
  def extra_ids(self):
    return self.resolved.extra_ids

  @property
  def vocab_size(self):
    return self.resolved.vocab_size

  @property
  def _base_vocab_size(self):
    return self.resolved._base_vocab_size  # pylint: disable=protected-access

  def _encode(self, s):
    return self.resolved._encode(s)  # pylint: disable=protected-access

  def _decode(self, ids):
    return self.resolved._decode(ids)  # pylint: disable=protected-access

  def _encode_tf(self, s):
    return self.resolved._encode_tf(s)  # pylint: disable=protected-access

  def _decode_tf(self, ids):
    return self.resolved._decode_tf(ids)  # pylint: disable=protected-access

  def encode(self, s):
    return self.resolved.encode(s)

  def decode(self, ids):
    return self.resolved.decode(ids)

  def encode_tf(self, s):
    return self.resolved.encode_tf(s)

  def decode_tf(self, ids):
    return self.resolved.decode_tf(ids)

  def __eq__(self, other):
    other = other.resolved if isinstance(other, ConfiguredVocabulary) else other
    return self.resolved == other

  def __hash__(self):
    return id(self)

  def __str__(self):
    return f"ConfiguredVocabulary({self.resolved})"
