"""A converted release as a directory the trainer fine-tunes from.

    OUT/checkpoints/0/state   orbax {"params": ...} (what `train.checkpoints.load_params` reads)
    OUT/checkpoints/0/meta    JSON: parameter shapes (the trainer's own step layout)
    OUT/model.gin             the network (+ VOCABULARY_PATH when the release has spiece.model)
    OUT/spiece.model          the release's SentencePiece vocabulary, when present
    OUT/hf_config.json        the release's config.json, for provenance

Fine-tune with `--gin_file=OUT/model.gin --gin_file=runs/finetune.gin
--gin.INITIAL_CHECKPOINT_PATH="'OUT'"`.
"""

from __future__ import annotations

import os
import shutil

import orbax.checkpoint as ocp

from moe_jax.convert import hf_switch
from moe_jax.convert import weights as weights_lib

SPM_NAME = "spiece.model"  # the name transformers' T5 tokenizer files use


def vocabulary_gin(spm_path: str) -> str:
  """The gin lines that point moe_jax's tasks at a SentencePiece model."""
  return ("\n# The release's SentencePiece vocabulary (T5's) for moe_jax's tasks "
          "(moe_jax.data.vocabularies).\n"
          f"VOCABULARY_PATH = {os.path.abspath(spm_path)!r}\n")


def _prepare_output(output_dir: str, overwrite: bool) -> None:
  if os.path.exists(output_dir):
    if not os.path.isdir(output_dir):
      raise FileExistsError(f"--output {output_dir!r} exists and is not a directory")
    if os.listdir(output_dir):
      if not overwrite:
        raise FileExistsError(f"--output {output_dir!r} is not empty; pass --overwrite to "
                              f"replace its contents")
      shutil.rmtree(output_dir)
  os.makedirs(output_dir, exist_ok=True)


def save_params(output_dir: str, params, step: int = 0) -> str:
  """Writes params as the trainer's step layout; returns the step directory."""
  from moe_jax.train.checkpoints import CHECKPOINT_SUBDIR, shape_table  # pylint: disable=g-import-not-at-top
  directory = os.path.join(os.path.abspath(output_dir), CHECKPOINT_SUBDIR)
  meta = {"batches_consumed": 0, "param_shapes": shape_table(params)}
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False)) as manager:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                               meta=ocp.args.JsonSave(meta)))
  return os.path.join(directory, str(step))


def convert_checkpoint(input_dir: str, output_dir: str, overwrite: bool = False) -> dict:
  """Converts the transformers checkpoint in `input_dir` into `output_dir` (layout above).

  Everything is read and checked before `output_dir` is touched. Returns a small report.
  """
  config = hf_switch.read_config(input_dir)
  spec = hf_switch.spec_from_config(config, os.path.join(input_dir, "config.json"))
  with weights_lib.open_weights(input_dir) as reader:
    params = hf_switch.convert_weights(reader, spec)
  _prepare_output(output_dir, overwrite)
  step_dir = save_params(output_dir, params)
  name = config.get("_name_or_path") or os.path.basename(os.path.abspath(input_dir))
  gin_text = hf_switch.model_gin(spec, f"{name}, converted from {os.path.abspath(input_dir)}")
  spm = os.path.join(input_dir, SPM_NAME)
  if os.path.isfile(spm):
    shutil.copyfile(spm, os.path.join(output_dir, SPM_NAME))
    gin_text += vocabulary_gin(os.path.join(output_dir, SPM_NAME))
  with open(os.path.join(output_dir, "model.gin"), "w") as f:
    f.write(gin_text)
  shutil.copyfile(os.path.join(input_dir, "config.json"),
                  os.path.join(output_dir, "hf_config.json"))
  num_params = sum(v.size for v in _leaves(params))
  return {"output": os.path.abspath(output_dir), "checkpoint": step_dir,
          "num_params": int(num_params), "vocabulary": os.path.isfile(spm),
          "encoder_sparse_layers": list(spec.encoder_sparse_layers),
          "decoder_sparse_layers": list(spec.decoder_sparse_layers)}


def _leaves(tree):
  for value in tree.values():
    if isinstance(value, dict):
      yield from _leaves(value)
    else:
      yield value
