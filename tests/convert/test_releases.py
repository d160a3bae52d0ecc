"""configs/models/switch_*_<experts>.gin: generated from the releases' config.json values by the
converter's own code path, and of the published sizes (jax.eval_shape only, no allocation)."""

import os

import pytest

from moe_jax import gin_utils
from moe_jax.convert import hf_switch, releases
from moe_jax.models import build_network
from moe_jax.models.summary import summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def expected_num_params(config: dict) -> int:
  """Parameter count of a SwitchTransformers config, from its dimensions (T5 layout)."""
  d, f, v, e = config["d_model"], config["d_ff"], config["vocab_size"], config["num_experts"]
  inner = config["num_heads"] * config["d_kv"]
  matrices = 3 if config.get("feed_forward_proj", "").startswith("gated") else 2
  dense, experts = matrices * d * f, e * matrices * d * f + d * e  # + router [D, E]
  attention, relpos = 4 * d * inner, config["relative_attention_num_buckets"] * config["num_heads"]
  total = v * d + (0 if config["tie_word_embeddings"] else d * v)
  for layers, sparse, attentions in (
      (config["num_layers"], config["num_sparse_encoder_layers"], 1),
      (config["num_decoder_layers"], config["num_sparse_decoder_layers"], 2)):
    step = layers // sparse
    num_sparse = sum(1 for i in range(layers) if step == 1 or i % step == 1)
    per_layer = attentions * (attention + d) + d  # attention(s) and their norms, FFN norm
    total += layers * per_layer + num_sparse * experts + (layers - num_sparse) * dense
    total += relpos + d  # one relative-position table per stack, final norm
  return total


@pytest.mark.parametrize("name", sorted(releases.RELEASES))
def test_checked_in_file_is_what_the_converter_emits(name):
  with open(os.path.join(REPO, "configs", "models", f"{name}.gin")) as f:
    assert f.read() == releases.release_gin(name), (
        "regenerate with: python -m moe_jax.convert.releases")


@pytest.mark.parametrize("name", sorted(releases.RELEASES))
def test_parameter_count_from_dims_and_published(name):
  hub_id, published, config = releases.RELEASES[name]
  gin_utils.parse_gin([f"models/{name}.gin"])
  num_params = summarize(build_network())["num_params"]
  assert num_params == expected_num_params(config)
  if published:
    assert abs(num_params - published) / published < 0.03, (hub_id, num_params)


def test_gin_builds_the_same_network_as_the_converter():
  gin_utils.parse_gin(["models/switch_base_8.gin"])
  assert build_network() == hf_switch.build_network(releases.release_spec("switch_base_8"))


def test_published_sizes_spot_checks():
  """The hand formula itself, on two sizes worked out in full."""
  base8 = releases.RELEASES["switch_base_8"][2]
  # 32128*768 embedding; per stack 12 attentions of 4*768^2 (decoder: 24), 6 dense FFNs of
  # 2*768*3072, 6 MoE layers of 8*2*768*3072 + 768*8 router; norms and relpos tables.
  attention, ffn = 4 * 768 * 768, 2 * 768 * 3072
  by_hand = (32128 * 768 + 36 * attention + 12 * ffn + 12 * (8 * ffn + 768 * 8)
             + (12 * 2 + 1) * 768 + (12 * 3 + 1) * 768 + 2 * 32 * 12)
  assert expected_num_params(base8) == by_hand == 619_339_008
