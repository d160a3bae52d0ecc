"""Evaluation metrics of our seqio tasks (seqio's legacy `metric_fns(targets, predictions)`).

seqio 0.0.20 ships no text metrics (BLEU lived in the `t5` package, which wraps sacrebleu), so
BLEU comes from sacrebleu directly, imported only when a metric is computed.
"""

from typing import Mapping, Sequence


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> Mapping[str, float]:
  """Corpus BLEU (0-100) with sacrebleu's standard settings (13a tokenizer, one reference)."""
  try:
    import sacrebleu  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The BLEU metric needs sacrebleu: pip install sacrebleu==2.6.0") from e
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
  return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score}
