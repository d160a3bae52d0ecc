"""convert_checkpoint / scripts/convert_checkpoint.py: a directory the trainer fine-tunes from."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax import gin_utils
from moe_jax.convert import convert_checkpoint, from_hf
from moe_jax.models import build_network
from moe_jax.models.summary import abstract_variables
from moe_jax.train import checkpoints

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_round_trip_through_the_trainers_checkpoint_reader(hf_case, tmp_path):
  case = hf_case("relu_step3_tied")
  out = str(tmp_path / "out")
  report = convert_checkpoint(case.path, out)
  network, params = from_hf(case.path)
  loaded = checkpoints.load_params(out)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert report["num_params"] == sum(x.size for x in jax.tree.leaves(params))
  assert report["encoder_sparse_layers"] == [1] and not report["vocabulary"]

  # model.gin builds the very network from_hf returns, with the converted params' shapes.
  gin_utils.parse_gin([os.path.join(out, "model.gin")])
  built = build_network()
  assert built == network
  assert _shapes(nn.unbox(abstract_variables(built)["params"])) == _shapes(params)

  # With the fine-tuning run config, every parameter comes from the converted checkpoint.
  gin_utils.parse_gin([os.path.join(out, "model.gin"), "runs/finetune.gin"],
                      [f"INITIAL_CHECKPOINT_PATH={out!r}", "MODEL_DIR='unused'"])
  target = nn.unbox(abstract_variables(build_network())["params"])
  _, init_report = checkpoints.init_params_from(target, loaded)
  assert not init_report["fresh"] and not init_report["upcycled"]


def test_output_is_never_overwritten_without_the_flag(hf_case, tmp_path):
  case = hf_case("relu_step2_tied")
  out = tmp_path / "out"
  out.mkdir()
  (out / "precious.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert_checkpoint(case.path, str(out))
  assert (out / "precious.txt").read_text() == "keep me"
  convert_checkpoint(case.path, str(out), overwrite=True)
  assert not (out / "precious.txt").exists() and (out / "model.gin").exists()
  (tmp_path / "a_file").write_text("")
  with pytest.raises(FileExistsError, match="not a directory"):
    convert_checkpoint(case.path, str(tmp_path / "a_file"), overwrite=True)


def test_bad_input_leaves_no_output(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert_checkpoint(str(tmp_path), str(out))
  assert not out.exists()


def test_script(hf_case, tmp_path):
  case = hf_case("relu_step1_untied")
  out = str(tmp_path / "out")
  script = os.path.join(REPO, "scripts", "convert_checkpoint.py")
  ok = subprocess.run([sys.executable, script, f"--input={case.path}", f"--output={out}"],
                      capture_output=True, text=True, cwd=REPO, check=False)
  assert ok.returncode == 0, ok.stderr
  assert '"num_params"' in ok.stdout and os.path.isdir(os.path.join(out, "checkpoints", "0"))
  again = subprocess.run([sys.executable, script, f"--input={case.path}", f"--output={out}"],
                         capture_output=True, text=True, cwd=REPO, check=False)
  assert again.returncode == 2 and "--overwrite" in again.stderr
