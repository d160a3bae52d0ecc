"""moe_jax reproduces transformers' SwitchTransformers from its saved checkpoints (from_hf)."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from moe_jax.convert import from_hf, hf_switch
from moe_jax.layers.moe import MOE_STATS
from moe_jax.layers.routing import RouterStats
from moe_jax.models.t5 import MoeLayout, SparseEncoder
from tests.convert.conftest import CASES, DECODER_TOKENS, DROPS, ENCODER_TOKENS, NEVER_BINDS

pytest.importorskip("transformers")

TOLERANCE = 1e-4


def _run(network, params):
  """(logits, encoder output, fraction dropped per MoE layer) from one compiled forward pass."""
  logits, state = jax.jit(lambda p: network.apply(
      {"params": p}, ENCODER_TOKENS, DECODER_TOKENS, mutable=[MOE_STATS, "intermediates"],
      capture_intermediates=lambda module, method: isinstance(module, SparseEncoder)))(params)
  (encoded,) = state["intermediates"]["encoder"]["__call__"]
  stats = jax.tree.leaves(state[MOE_STATS], is_leaf=lambda x: isinstance(x, RouterStats))
  return np.asarray(logits), np.asarray(encoded), [float(s.fraction_dropped) for s in stats]


@pytest.mark.parametrize("capacity", [NEVER_BINDS, DROPS])
@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_encoder_output_match_transformers(hf_case, name, capacity):
  """Padding positions of the encoder output are left out: transformers attends from them to
  real tokens, moe_jax masks them; neither the logits nor any real position depend on them."""
  case = hf_case(name, capacity)
  network, params = from_hf(case.path)
  logits, encoded, dropped = _run(network, params)
  real = ENCODER_TOKENS != 0
  assert np.abs(logits - case.logits).max() < TOLERANCE
  assert np.abs(encoded - case.encoded)[real].max() < TOLERANCE
  if capacity == NEVER_BINDS:
    assert max(dropped) == 0.0
  else:
    assert min(dropped) > 0.0  # every MoE layer drops tokens: the capacity rule is exercised


def test_sparse_layers_follow_transformers_rule(hf_case):
  network, _ = from_hf(hf_case("relu_step3_tied").path)
  assert network.encoder.sparse_layers == (1,)  # i % 3 == 1; MIXED would give (2,)
  assert network.encoder.sparse_layout == (1,) and network.decoder.sparse_layers == (1,)
  network, _ = from_hf(hf_case("relu_step2_tied").path)
  assert network.encoder.sparse_layout is MoeLayout.MIXED
  assert network.encoder.sparse_layers == (1, 3)
  assert hf_switch.hf_sparse_layers(12, 6) == (1, 3, 5, 7, 9, 11)
  assert hf_switch.hf_sparse_layers(15, 15) == tuple(range(15))
  assert hf_switch.hf_sparse_layers(12, 0) == (1,)  # transformers' own quirk, kept


def test_gated_checkpoint_has_gated_params(hf_case):
  _, params = from_hf(hf_case("gated_gelu_step2_untied").path)
  expert = params["encoder"]["layers_1"]["mlp"]["expert"]
  assert set(expert) == {"wi_0", "wi_1", "wo"} and expert["wi_0"]["kernel"].shape == (4, 16, 24)
  assert params["logits_head"]["logits_dense"]["kernel"].shape == (16, 64)


# --- Other weight formats ----------------------------------------------------------------


def _torch_state(case):
  return {k: v.contiguous() for k, v in case.model.state_dict().items()}


def _assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_sharded_safetensors(hf_case, tmp_path):
  case = hf_case("relu_step2_tied")
  case.model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert not os.path.exists(tmp_path / "model.safetensors")
  _assert_same_params(from_hf(str(tmp_path))[1], from_hf(case.path)[1])


def test_pytorch_model_bin_with_tied_copies(hf_case, tmp_path):
  """A 4.x-style pickle: the full state_dict, tied embedding copies and lm_head included."""
  import torch  # pylint: disable=g-import-not-at-top
  case = hf_case("relu_step2_tied")
  state = _torch_state(case)
  assert {"encoder.embed_tokens.weight", "lm_head.weight"} <= set(state)
  shutil.copy(os.path.join(case.path, "config.json"), tmp_path)
  torch.save(state, tmp_path / "pytorch_model.bin")
  _assert_same_params(from_hf(str(tmp_path))[1], from_hf(case.path)[1])


def test_sharded_pytorch_model_bin(hf_case, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  case = hf_case("relu_step1_untied")
  state = _torch_state(case)
  names = sorted(state)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    file = f"pytorch_model-0000{i + 1}-of-00002.bin"
    torch.save({n: state[n] for n in part}, tmp_path / file)
    weight_map.update({n: file for n in part})
  (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  shutil.copy(os.path.join(case.path, "config.json"), tmp_path)
  _assert_same_params(from_hf(str(tmp_path))[1], from_hf(case.path)[1])


def test_bfloat16_safetensors_are_widened(hf_case, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  case = hf_case("relu_step2_tied")
  state = {k: v.to(torch.bfloat16) for k, v in _torch_state(case).items()
           if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                        "lm_head.weight")}
  save_file(state, tmp_path / "model.safetensors")
  shutil.copy(os.path.join(case.path, "config.json"), tmp_path)
  params = from_hf(str(tmp_path))[1]
  expected = state["shared.weight"].to(torch.float32).numpy()
  np.testing.assert_array_equal(params["token_embedder"]["embedding"], expected)
  assert params["token_embedder"]["embedding"].dtype == np.float32


# --- Bad inputs name the culprit ----------------------------------------------------------


def _copy(case, tmp_path, config_edit=None):
  path = tmp_path / "ckpt"
  shutil.copytree(case.path, path)
  if config_edit:
    config = json.loads((path / "config.json").read_text())
    config_edit(config)
    (path / "config.json").write_text(json.dumps(config))
  return str(path)


def test_missing_directory_config_and_weights(hf_case, tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    from_hf(str(tmp_path / "no_such_dir"))
  path = _copy(hf_case("relu_step2_tied"), tmp_path)
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
    from_hf(path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_hf(path)


@pytest.mark.parametrize("key,value,match", [
    ("router_bias", True, "router_bias=True"),
    ("dense_act_fn", "gelu", "dense_act_fn='gelu'"),
    ("feed_forward_proj", "gated-fancy", "feed_forward_proj='gated-fancy'"),
    ("model_type", "t5", "model_type='t5'"),
    ("layer_norm_epsilon", 1e-5, "layer_norm_epsilon"),
    ("router_dtype", "bfloat16", "router_dtype='bfloat16'"),
    ("encoder_sparse_step", 3, "encoder_sparse_step=3"),
    ("d_model", "16", "d_model='16'"),
])
def test_unsupported_config_values(hf_case, tmp_path, key, value, match):
  path = _copy(hf_case("relu_step2_tied"), tmp_path, lambda c: c.__setitem__(key, value))
  with pytest.raises(ValueError, match=match):
    from_hf(path)


def test_shape_mismatch_names_the_tensor(hf_case, tmp_path):
  path = _copy(hf_case("relu_step2_tied"), tmp_path, lambda c: c.__setitem__("d_ff", 32))
  with pytest.raises(ValueError, match=r"layer\.1\.mlp\.wi\.weight.*\(24, 16\).*\(32, 16\)"):
    from_hf(path)


def test_gated_config_over_plain_weights_names_the_missing_tensor(hf_case, tmp_path):
  path = _copy(hf_case("relu_step2_tied"), tmp_path,
               lambda c: c.__setitem__("feed_forward_proj", "gated-gelu"))
  with pytest.raises(ValueError, match="missing tensor.*wi_0"):
    from_hf(path)


def test_unused_weight_is_refused(hf_case, tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  path = _copy(hf_case("relu_step2_tied"), tmp_path)
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  tensors["encoder.block.0.layer.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
  save_file(tensors, file)
  with pytest.raises(ValueError, match="does not map.*mlp.extra.weight"):
    from_hf(path)


def test_tied_copy_that_differs_is_refused(hf_case, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  case = hf_case("relu_step2_tied")
  state = _torch_state(case)
  state["lm_head.weight"] = state["lm_head.weight"] + 1.0
  shutil.copy(os.path.join(case.path, "config.json"), tmp_path)
  torch.save(state, tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight"):
    from_hf(str(tmp_path))


def test_bin_without_torch_says_what_to_install(hf_case, tmp_path, monkeypatch):
  import torch  # pylint: disable=g-import-not-at-top
  case = hf_case("relu_step2_tied")
  shutil.copy(os.path.join(case.path, "config.json"), tmp_path)
  torch.save(_torch_state(case), tmp_path / "pytorch_model.bin")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(ImportError, match="pip install torch"):
    from_hf(str(tmp_path))
