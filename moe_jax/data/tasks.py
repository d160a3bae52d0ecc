"""seqio tasks of moe_jax, registered on import (see `register_tasks`).

Their vocabulary is a `ConfiguredVocabulary`: bytes, or the SentencePiece model that the gin
macro VOCABULARY_PATH names (e.g. a Switch release's `spiece.model`), looked up when used.

- `tiny_shakespeare_lm` (TFDS tiny_shakespeare): "targets", windows of
  `sequence_length["targets"]` bytes of the text, no EOS.
- `tiny_shakespeare_span_corruption` (TFDS tiny_shakespeare): "inputs"/"targets", T5 span
  corruption (15% noise, mean span 3) of windows sized to fit `sequence_length["inputs"]`, + EOS.
- `multi30k_en_de` (Multi30k gzip files): "inputs" = "translate English to German: <en>",
  "targets" = "<de>", + EOS; metric BLEU.
- `digits`, `cifar10` (moe_jax.data.images): image classification, pixels as "inputs" tokens
  and the label as one "targets" token; not vocabulary-dependent, registered once.
- `synthetic_facts` (moe_jax.data.facts): seeded random "key=value\\n" facts to memorise,
  generated offline; always bytes (values at fixed positions), registered once.

Splits: train / validation / test. The LM has no EOS: its windows cut a continuous text at
arbitrary points, so an EOS there would teach the model to end mid-sentence.
"""

import functools
from typing import Optional, Tuple

import seqio

from moe_jax.data import facts, images, metrics, preprocessors, sources, span_corruption
from moe_jax.data.vocabularies import ConfiguredVocabulary

TINY_SHAKESPEARE_LM = "tiny_shakespeare_lm"
TINY_SHAKESPEARE_SPAN_CORRUPTION = "tiny_shakespeare_span_corruption"
MULTI30K_EN_DE = "multi30k_en_de"
TASK_NAMES = (TINY_SHAKESPEARE_LM, TINY_SHAKESPEARE_SPAN_CORRUPTION, MULTI30K_EN_DE)

_registered = list(TASK_NAMES)


def registered_task_names() -> Tuple[str, ...]:
  """Every task `register_tasks` added (the defaults and any suffixed variants)."""
  return tuple(name for name in _registered if name in seqio.TaskRegistry.names())


def _add(name: str, **kwargs) -> None:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)  # re-registering (module reload) replaces the task
  seqio.TaskRegistry.add(name, **kwargs)
  if name not in _registered:
    _registered.append(name)


def register_tasks(vocabulary: Optional[seqio.Vocabulary] = None,
                   suffix: str = "") -> Tuple[str, ...]:
  """Registers our tasks with `vocabulary` under `name + suffix`.

  The default, `ConfiguredVocabulary()`, is bytes unless gin binds VOCABULARY_PATH.
  E.g. `register_tasks(get_vocabulary("spm/model.model"), suffix="_spm")` adds
  `tiny_shakespeare_lm_spm`, ... Returns the registered names.
  """
  vocab = vocabulary or ConfiguredVocabulary()
  text_to_targets = functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"})
  lm_features = {"targets": seqio.Feature(vocab, add_eos=False)}
  seq2seq_features = {"inputs": seqio.Feature(vocab, add_eos=True),
                      "targets": seqio.Feature(vocab, add_eos=True)}

  _add(TINY_SHAKESPEARE_LM + suffix,
       source=sources.tiny_shakespeare_source(),
       output_features=lm_features,
       preprocessors=[text_to_targets, seqio.preprocessors.tokenize,
                      seqio.CacheDatasetPlaceholder(),
                      preprocessors.split_to_targets_length],
       metric_fns=[])
  _add(TINY_SHAKESPEARE_SPAN_CORRUPTION + suffix,
       source=sources.tiny_shakespeare_source(),
       output_features=seq2seq_features,
       preprocessors=[text_to_targets, seqio.preprocessors.tokenize,
                      seqio.CacheDatasetPlaceholder(),
                      span_corruption.span_corruption,
                      seqio.preprocessors.append_eos_after_trim],
       metric_fns=[])
  _add(MULTI30K_EN_DE + suffix,
       source=sources.multi30k_source(),
       output_features=seq2seq_features,
       preprocessors=[preprocessors.translate_en_de, seqio.preprocessors.tokenize,
                      seqio.CacheDatasetPlaceholder(),
                      seqio.preprocessors.append_eos_after_trim],
       metric_fns=[metrics.bleu])
  return tuple(name + suffix for name in TASK_NAMES)


register_tasks()
for _name, _task in images.image_tasks().items():
  _add(_name, **_task)
_add(facts.SYNTHETIC_FACTS, **facts.task_kwargs())
