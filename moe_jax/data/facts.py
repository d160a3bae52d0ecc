"""`synthetic_facts`: seeded random key -> value facts to memorise and recall (capacity study).

A task where more parameters at the same FLOPs should help: nothing generalises, every fact
has to be stored. Generated offline from `FactsConfig` (gin-configurable, read when a dataset
is built), no files:

- `num_facts` keys of `key_length` lowercase letters, all distinct, each with a value of
  `value_length` characters from [a-z0-9]; one fact per example, the decoder-only LM text
  "key=value\\n" as "targets" in BYTES (`seqio.ByteVocabulary`, whatever VOCABULARY_PATH says),
  no EOS: the newline ends a fact. Every example is `sequence_length` = key + 1 + value + 1
  tokens, so the value sits at fixed target positions `value_positions`.
- train = every fact (memorisation: the same facts again and again, reshuffled each epoch);
  validation = test = the first `num_eval_facts` facts (a fixed random subset of them: recall
  is measured on memorised facts).

What counts is recall of the value given the key. The task's feature converter
(moe_jax.data.pipeline.FactsFeatureConverter) puts the loss weights on the value tokens only,
so the trainer's loss is the value's cross-entropy and its accuracy the value-token accuracy.
Exact recall (every value token right) comes from `fact_recall` (teacher-forced argmax over the
value positions; `recall_eval` runs it at every training evaluation) and, on decoded strings,
the seqio metric `exact_recall`. The two agree: a value is decoded greedily exactly iff every
value token is the argmax under teacher forcing.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Mapping, Optional, Sequence, Tuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from moe_jax import objectives
from moe_jax.data.vocabularies import get_vocabulary

SYNTHETIC_FACTS = "synthetic_facts"
SPLITS = ("train", "validation", "test")
KEY_ALPHABET = string.ascii_lowercase
VALUE_ALPHABET = string.ascii_lowercase + string.digits
SEPARATOR, TERMINATOR = "=", "\n"
BYTE_OFFSET = 3  # seqio.ByteVocabulary: ids 0 pad, 1 EOS, 2 UNK, then byte b -> b + 3

_FIXED_SOURCE_SEED = 0

Fact = Tuple[str, str]


@dataclasses.dataclass(frozen=True)
class FactsConfig:
  """The facts of `synthetic_facts`: how many, how long, which seed (module docstring)."""
  num_facts: int = 20_000
  key_length: int = 6
  value_length: int = 6
  num_eval_facts: int = 1_000
  seed: int = 0

  def __post_init__(self):
    for name in ("num_facts", "key_length", "value_length", "num_eval_facts"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"FactsConfig.{name} must be a positive integer, got {value!r}")
    if not isinstance(self.seed, int):
      raise ValueError(f"FactsConfig.seed must be an integer, got {self.seed!r}")
    # Distinct keys are drawn by rejection; at most half the key space keeps that quick.
    if self.num_facts > len(KEY_ALPHABET) ** self.key_length // 2:
      raise ValueError(f"FactsConfig.num_facts={self.num_facts} is more than half of the "
                       f"{len(KEY_ALPHABET)}**{self.key_length} keys of key_length="
                       f"{self.key_length}: raise key_length")
    if self.num_eval_facts > self.num_facts:
      raise ValueError(f"FactsConfig.num_eval_facts={self.num_eval_facts} exceeds num_facts="
                       f"{self.num_facts} (evaluation recalls a subset of the trained facts)")

  @property
  def sequence_length(self) -> int:
    """Tokens of one example: key, '=', value, newline."""
    return self.key_length + 1 + self.value_length + 1

  @property
  def value_positions(self) -> slice:
    """Where the value's tokens are in "targets" (and their predictions in the logits)."""
    start = self.key_length + 1
    return slice(start, start + self.value_length)


# moe_jax.data is imported lazily, after gin has locked its config; configs/runs/facts.gin
# imports this module while parsing, so that FactsConfig bindings resolve.
with gin.unlock_config():
  FactsConfig = gin.configurable(FactsConfig, module="moe_jax.data.facts")


@functools.lru_cache(maxsize=4)
def generate_facts(config: FactsConfig) -> Tuple[Fact, ...]:
  """(key, value) pairs, keys distinct, in a random order; the same for the same config."""
  rng = np.random.default_rng(config.seed)
  keys, seen = [], set()
  while len(keys) < config.num_facts:  # redraw the few duplicates
    rows = rng.integers(0, len(KEY_ALPHABET), (config.num_facts - len(keys), config.key_length))
    for row in rows:
      key = "".join(KEY_ALPHABET[i] for i in row)
      if key not in seen:
        seen.add(key)
        keys.append(key)
  values = rng.integers(0, len(VALUE_ALPHABET), (config.num_facts, config.value_length))
  return tuple((key, "".join(VALUE_ALPHABET[i] for i in row)) for key, row in zip(keys, values))


def split_facts(split: str, config: Optional[FactsConfig] = None) -> Tuple[Fact, ...]:
  """train: every fact; validation and test: the first `num_eval_facts` of them."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} of {SYNTHETIC_FACTS!r}; choose one of {SPLITS}")
  config = config or FactsConfig()
  facts = generate_facts(config)
  return facts if split == "train" else facts[:config.num_eval_facts]


def fact_text(key: str, value: str) -> str:
  return f"{key}{SEPARATOR}{value}{TERMINATOR}"


def facts_dataset(split: str, shuffle_files: bool, seed: Optional[int] = None):
  """{"targets": "key=value\\n"} per fact of a split (seqio.FunctionDataSource's signature)."""
  texts = [fact_text(key, value) for key, value in split_facts(split)]
  ds = tf.data.Dataset.from_tensor_slices({"targets": texts})
  if shuffle_files:  # a full shuffle, the same order in every process (seqio shards after it)
    ds = ds.shuffle(len(texts), seed=_FIXED_SOURCE_SEED if seed is None else seed)
  return ds


def check_length(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]] = None):
  """Refuses a "targets" length that would cut facts (a cut value cannot be recalled)."""
  needed = FactsConfig().sequence_length
  length = (sequence_length or {}).get("targets")
  if length is not None and length < needed:
    config = FactsConfig()
    raise ValueError(f"TASK_FEATURE_LENGTHS['targets']={length} cuts {SYNTHETIC_FACTS!r} "
                     f"examples of {needed} tokens (FactsConfig.key_length {config.key_length} "
                     f"+ 1 + value_length {config.value_length} + 1)")
  return dataset


def _value(text: str) -> str:
  """The value in a decoded "key=value\\n..." or in a bare continuation "value\\n..."."""
  return text.split(SEPARATOR, 1)[-1].split(TERMINATOR, 1)[0]


def exact_recall(targets: Sequence[str], predictions: Sequence[str]) -> Mapping[str, float]:
  """seqio metric: the fraction of facts whose value the prediction reproduces exactly."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
  hits = [_value(t) == _value(p) for t, p in zip(targets, predictions)]
  return {"exact_recall": float(np.mean(hits)) if hits else 0.0}


def task_kwargs() -> dict:
  """seqio.TaskRegistry.add kwargs of `synthetic_facts` (registered once by tasks.py)."""
  vocab = get_vocabulary()  # bytes: the values must sit at fixed token positions
  return dict(source=seqio.FunctionDataSource(facts_dataset, splits=SPLITS),
              output_features={"targets": seqio.Feature(vocab, add_eos=False)},
              preprocessors=[check_length, seqio.preprocessors.tokenize],
              metric_fns=[exact_recall])


# ------------------------------------------------------------------------------------------
# Recall of a trained model (teacher forcing).


def encode_facts(facts: Sequence[Fact], config: FactsConfig) -> np.ndarray:
  """Byte ids [N, sequence_length] of "key=value\\n" per fact (the task's "targets")."""
  texts = [fact_text(k, v).encode("utf-8") for k, v in facts]
  if any(len(t) != config.sequence_length for t in texts):
    raise ValueError(f"facts do not match FactsConfig key_length={config.key_length}, "
                     f"value_length={config.value_length}")
  return np.frombuffer(b"".join(texts), np.uint8).reshape(len(texts), -1).astype(np.int32) + \
      BYTE_OFFSET


def recall_from_predictions(predicted_NL, targets_NL, config: FactsConfig) -> dict:
  """{"exact_recall": facts with every value token right, "value_token_accuracy"}."""
  value = config.value_positions
  correct_NV = np.asarray(predicted_NL)[:, value] == np.asarray(targets_NL)[:, value]
  return {"exact_recall": float(np.mean(np.all(correct_NV, axis=1))),
          "value_token_accuracy": float(np.mean(correct_NV))}


@functools.partial(jax.jit, static_argnames=("network",))
def _argmax_tokens(network, variables, decoder_input_tokens, decoder_target_tokens):
  logits_BLV, _ = network.apply(
      variables, decoder_input_tokens=decoder_input_tokens,
      decoder_target_tokens=decoder_target_tokens,
      mutable=[objectives.MOE_STATS, *objectives.STATE_COLLECTIONS])
  return jnp.argmax(logits_BLV, axis=-1)


def fact_recall(network, params, facts: Sequence[Fact], *, model_state=None,
                config: Optional[FactsConfig] = None, batch_size: int = 256) -> dict:
  """Teacher-forced recall of `facts` by a decoder-only LM (see `recall_from_predictions`).

  Batches are padded to `batch_size` rows (one compilation); padding rows are dropped.
  """
  config = config or FactsConfig()
  if not facts:
    raise ValueError("fact_recall needs at least one fact")
  targets_NL = encode_facts(facts, config)
  variables = {"params": params, **(model_state or {})}
  predicted = []
  for start in range(0, len(targets_NL), batch_size):
    rows = targets_NL[start:start + batch_size]
    targets_BL = np.pad(rows, ((0, batch_size - len(rows)), (0, 0)))
    inputs_BL = np.pad(targets_BL[:, :-1], ((0, 0), (1, 0)))  # shifted right, 0 = BOS
    predicted.append(np.asarray(_argmax_tokens(network, variables, inputs_BL,
                                               targets_BL))[:len(rows)])
  return recall_from_predictions(np.concatenate(predicted), targets_NL, config)


def recall_eval(network, params, model_state, split: str = "validation") -> dict:
  """A trainer eval hook (`train.eval_hooks = [@recall_eval]`): `fact_recall` of a split's
  facts, as {"exact_recall", "value_token_accuracy"}. One process only (the batches are this
  host's): multi-host runs evaluate recall afterwards from the checkpoint."""
  if jax.process_count() > 1:
    raise ValueError("facts.recall_eval runs in one process; drop train.eval_hooks for "
                     "multi-host runs and evaluate recall from the checkpoint")
  return fact_recall(network, params, split_facts(split), model_state=model_state)


with gin.unlock_config():  # see FactsConfig: this module may be imported after gin locked
  recall_eval = gin.configurable(recall_eval, module="moe_jax.data.facts")
