"""Vocabularies: bytes by default (no download), SentencePiece by path."""

import os
from typing import Optional

import seqio

# T5 reserves 100 extra ids as span-corruption sentinels, counted down from the top of the
# vocabulary (sentinel 0 = vocab_size - 1). Bytes: 3 specials + 256 bytes + 100 = 359 ids.
NUM_EXTRA_IDS = 100


def get_vocabulary(
    spm_path: Optional[str] = None, extra_ids: int = NUM_EXTRA_IDS
) -> seqio.Vocabulary:
  """`seqio.ByteVocabulary` when `spm_path` is None, else the SentencePiece model there."""
  if spm_path is None:
    return seqio.ByteVocabulary(extra_ids=extra_ids)
  if not os.path.exists(spm_path):
    raise FileNotFoundError(f"SentencePiece model not found: {spm_path!r}")
  return seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)
