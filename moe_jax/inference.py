"""Evaluation (loss, accuracy, BLEU for translation) and inference from a checkpoint.

Both entry points are gin-configurable and back `scripts/eval.py` / `scripts/infer.py`.
Predictions go to a JSON-lines file: {"inputs", "target", "prediction"} per example.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moe_jax import decoding
from moe_jax import gin_utils
from moe_jax import objectives
from moe_jax.models import build_network
from moe_jax.models.summary import abstract_variables
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import partitioning
from moe_jax.train.metrics import track
from moe_jax.train.trainer import check_task, eval_step, input_batches
from moe_jax.train.trainer import evaluate as evaluate_batches


def _onto_mesh(loaded, boxed, checkpoint_path: str, what: str, mesh):
  """Host arrays `loaded` placed like the abstract tree `boxed` on `mesh` (shapes checked)."""
  recorded = gin_utils.recorded_config(checkpoint_path)
  hint = (f"Its run recorded its config in {recorded}: leave out the model --gin_file to use it "
          f"(or pass --gin_file={recorded})." if recorded else
          "Check the --gin_file model config.")
  ckpt_lib.check_same_shapes(ckpt_lib.shape_table(loaded), ckpt_lib.shape_table(nn.unbox(boxed)),
                             f"checkpoint {checkpoint_path!r}{what}", hint)
  return jax.device_put(loaded, partitioning.logical_shardings(boxed, mesh))


def load_params_onto_mesh(network, checkpoint_path: str, mesh):
  """Checkpoint params placed with the logical-rule shardings of `mesh` (shapes checked)."""
  return _onto_mesh(ckpt_lib.load_params(checkpoint_path),
                    abstract_variables(network)["params"], checkpoint_path, "", mesh)


def load_model_state_onto_mesh(network, checkpoint_path: str, mesh):
  """The checkpoint's TrainState.model_state (e.g. aux-loss-free router biases), placed like
  the trainer places it; {} for a network without state collections."""
  boxed = objectives.model_state_of(abstract_variables(network))
  if not boxed:
    return {}
  return _onto_mesh(ckpt_lib.load_model_state(checkpoint_path), boxed, checkpoint_path,
                    " (model state)", mesh)


def _batches(task, lengths, split, batch_size, *, pack, seed=0, max_batches=None) -> list:
  """One pass over the whole split (a last, smaller batch is kept), at most max_batches.

  Read into host memory first (evaluation splits are small) so that progress can show a total.
  """
  return list(itertools.islice(input_batches(task, lengths, split, batch_size, shuffle=False,
                                             seed=seed, num_epochs=1, pack=pack,
                                             drop_remainder=False), max_batches))


def _text(vocab, tokens) -> str:
  tokens = [int(t) for t in tokens if int(t) > 0]
  if vocab.eos_id in tokens:
    tokens = tokens[:tokens.index(vocab.eos_id)]
  return vocab.decode(tokens)


def is_classifier(network) -> bool:
  """Image classifiers (moe_jax.models.vision) predict by argmax, not by decoding text."""
  return getattr(network, "is_classifier", False)


def _classify(network, params, model_state, encoder_input_tokens):
  logits_BTV = network.apply({"params": params, **model_state}, encoder_input_tokens)
  return jnp.argmax(logits_BTV[:, :1], axis=-1)  # the label token (label + 1)


_classify_jit = jax.jit(_classify, static_argnames=("network",))


def predict(network, params, batch: Mapping[str, np.ndarray], *, max_decode_length: int,
            prompt_length: int = 0, temperature: float = 0.0, rng=None, beam_size: int = 1,
            alpha: float = 0.6, model_state=None) -> np.ndarray:
  """Decoded tokens for a batch: translation from encoder inputs, or LM continuation of the
  first `prompt_length` target tokens. Cached decoding; `beam_size` > 1: the best beam (length
  penalty `alpha`, T5X's), otherwise greedy or sampled at `temperature`. `model_state`: the
  checkpoint's (`load_model_state_onto_mesh`). Image classifiers: the argmax label token [B, 1]."""
  if is_classifier(network):
    return np.asarray(_classify_jit(network, params, model_state or {},
                                    jnp.asarray(batch["encoder_input_tokens"])))
  if "encoder_input_tokens" in batch:
    inputs = dict(encoder_input_tokens=jnp.asarray(batch["encoder_input_tokens"]))
  else:
    inputs = dict(prompt_BP=jnp.asarray(
        np.asarray(batch["decoder_target_tokens"])[:, :prompt_length]))
  if beam_size > 1:
    beams, _ = decoding.beam_search_jit(network, params, beam_size=beam_size,
                                        max_decode_length=max_decode_length, alpha=alpha,
                                        model_state=model_state, **inputs)
    return np.asarray(beams[:, 0])
  return np.asarray(decoding.decode_jit(network, params, max_decode_length=max_decode_length,
                                        temperature=temperature, rng=rng,
                                        model_state=model_state, **inputs))


@gin.configurable(module="moe_jax.inference")
def evaluate(checkpoint_path: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED, split: str = "validation",
             batch_size: int = 32, max_batches: Optional[int] = None, bleu: Optional[bool] = None,
             output_dir: Optional[str] = None, mesh_shape: Sequence[int] = (1, -1, 1),
             beam_size: int = 1) -> dict:
  """Token-weighted loss / accuracy over a split and, for translation tasks, corpus BLEU of
  greedy (or `beam_size` beam search) decodes; written to
  `<output_dir or checkpoint dir>/eval_<task>_<split>.json`."""
  network = build_network()
  has_inputs, vocab = check_task(mixture_or_task_name, network)
  classifier = is_classifier(network)
  if classifier and bleu:
    raise ValueError(f"evaluate.bleu=True: {type(network).__name__} is an image classifier; "
                     f"its accuracy (argmax over the classes) is the metric")
  mesh = partitioning.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    params = load_params_onto_mesh(network, checkpoint_path, mesh)
    model_state = load_model_state_onto_mesh(network, checkpoint_path, mesh)
    eval_fn = jax.jit(functools.partial(eval_step, network=network))
    metrics = evaluate_batches(eval_fn, params, track(_batches(
        mixture_or_task_name, task_feature_lengths, split, batch_size, pack=not classifier,
        max_batches=max_batches), "eval loss"), model_state=model_state)
    if not metrics:
      raise ValueError(f"{mixture_or_task_name!r} split {split!r} yielded no batch")
    metrics = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
    if not classifier and (has_inputs if bleu is None else bleu):
      targets, predictions = [], []
      for batch in track(_batches(mixture_or_task_name, task_feature_lengths, split,
                                  batch_size, pack=False, max_batches=max_batches),
                         "eval decode"):
        decoded = predict(network, params, batch,
                          max_decode_length=task_feature_lengths["targets"], beam_size=beam_size,
                          model_state=model_state)
        targets += [_text(vocab, t) for t in batch["decoder_target_tokens"]]
        predictions += [_text(vocab, p) for p in decoded]
      from moe_jax import data  # pylint: disable=g-import-not-at-top
      metrics.update(data.bleu(targets, predictions))
  metrics = {k: float(v) for k, v in metrics.items()}
  out_dir = output_dir or os.path.dirname(ckpt_lib.resolve_checkpoint_path(checkpoint_path)[0])
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"eval_{mixture_or_task_name}_{split}.json")
  with open(path, "w") as f:
    json.dump(metrics, f, indent=1)
  logging.info("%s written to %s", json.dumps(metrics), path)
  return metrics


@gin.configurable(module="moe_jax.inference")
def infer(checkpoint_path: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, split: str = "test",
          batch_size: int = 16, num_examples: Optional[int] = 64, prompt_length: int = 32,
          temperature: float = 0.0, seed: int = 0, output_file: Optional[str] = None,
          mesh_shape: Sequence[int] = (1, -1, 1), beam_size: int = 1) -> str:
  """Decodes `num_examples` of a split (greedy, sampling with temperature > 0, or beam search
  with beam_size > 1) and writes
  {"inputs", "target", "prediction"} lines; returns the file's path. Image classifiers write
  {"target", "prediction"} class labels (argmax)."""
  network = build_network()
  has_inputs, vocab = check_task(mixture_or_task_name, network)
  if not has_inputs and not 0 < prompt_length < task_feature_lengths["targets"]:
    raise ValueError(f"prompt_length must be in (0, {task_feature_lengths['targets']}) for a "
                     f"language-model task, got {prompt_length}")
  output_file = output_file or os.path.join(
      os.path.dirname(ckpt_lib.resolve_checkpoint_path(checkpoint_path)[0]), "inference",
      f"{mixture_or_task_name}_{split}.jsonl")
  os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
  mesh = partitioning.make_mesh(mesh_shape)

  def records(params, model_state):
    """{"inputs", "target", "prediction"} per example, decoded a batch at a time."""
    rng = jax.random.key(seed)
    max_batches = None if num_examples is None else -(-num_examples // batch_size)
    for batch in track(_batches(mixture_or_task_name, task_feature_lengths, split, batch_size,
                                pack=False, seed=seed, max_batches=max_batches), "infer"):
      rng, batch_rng = jax.random.split(rng)
      decoded = predict(network, params, batch, max_decode_length=task_feature_lengths["targets"],
                        prompt_length=prompt_length, temperature=temperature, rng=batch_rng,
                        beam_size=beam_size, model_state=model_state)
      for row, tokens in enumerate(decoded):
        target = batch["decoder_target_tokens"][row]
        if is_classifier(network):  # labels, not text: token = label + 1
          yield {"target": int(target[0]) - 1, "prediction": int(tokens[0]) - 1}
          continue
        if has_inputs:
          inputs, prediction = _text(vocab, batch["encoder_input_tokens"][row]), tokens
        else:
          inputs, prediction = _text(vocab, target[:prompt_length]), tokens[prompt_length:]
          target = target[prompt_length:]
        yield {"inputs": inputs, "target": _text(vocab, target),
               "prediction": _text(vocab, prediction)}

  written = 0
  with jax.set_mesh(mesh), open(output_file, "w") as f:
    params = load_params_onto_mesh(network, checkpoint_path, mesh)
    model_state = load_model_state_onto_mesh(network, checkpoint_path, mesh)
    # Read to the end (batches are bounded), so that progress ends.
    for record in records(params, model_state):
      if num_examples is None or written < num_examples:
        f.write(json.dumps(record) + "\n")
        written += 1
  logging.info("%d predictions written to %s", written, output_file)
  return output_file


def generate_text(network, params, vocab, prompts: Sequence[str], *, max_decode_length: int,
                  temperature: float = 0.0, seed: int = 0, beam_size: int = 1,
                  model_state=None) -> list[str]:
  """Continuations of text prompts with a decoder-only LM (prompt excluded from the result)."""
  encoded = [list(vocab.encode(p)) for p in prompts]
  longest = max(len(e) for e in encoded)
  if longest >= max_decode_length:
    raise ValueError(f"prompts of up to {longest} tokens leave no room in "
                     f"max_decode_length={max_decode_length}")
  prompt = np.zeros((len(prompts), longest), np.int32)
  for row, tokens in enumerate(encoded):
    prompt[row, :len(tokens)] = tokens
  decoded = predict(network, params, {"decoder_target_tokens": prompt},
                    max_decode_length=max_decode_length, prompt_length=longest,
                    temperature=temperature, rng=jax.random.key(seed), beam_size=beam_size,
                    model_state=model_state)
  return [_text(vocab, tokens[len(e):]) for tokens, e in zip(decoded, encoded)]
