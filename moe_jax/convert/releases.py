"""The config.json values of Google's Switch Transformer releases on the Hugging Face hub, and
the gin files generated from them (configs/models/switch_*_<experts>.gin).

    python -m moe_jax.convert.releases    # rewrites those gin files

No machine here reaches the hub: these values are written from the releases' model cards and
config.json files as recalled, cross-checked against the published parameter counts (the
numbers after each name), not read from the files. `NOT_VERIFIED` says what could not be checked.
"""

from __future__ import annotations

import os

from moe_jax.convert import hf_switch

_COMMON = dict(model_type="switch_transformers", vocab_size=32128, d_kv=64, expert_capacity=64,
               dense_act_fn="relu", tie_word_embeddings=True, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, router_jitter_noise=0.01, dropout_rate=0.1,
               router_bias=False, router_dtype="float32", layer_norm_epsilon=1e-6)
_BASE = dict(_COMMON, d_model=768, d_ff=3072, num_heads=12, num_layers=12, num_decoder_layers=12,
             num_sparse_encoder_layers=6, num_sparse_decoder_layers=6)

# name -> (hub id, published parameter count, config.json values)
RELEASES = {
    f"switch_base_{e}": (f"google/switch-base-{e}", None, dict(_BASE, num_experts=e))
    for e in (8, 16, 32, 64, 128, 256)
}
RELEASES["switch_base_8"] = ("google/switch-base-8", 0.62e9, RELEASES["switch_base_8"][2])
RELEASES["switch_base_128"] = ("google/switch-base-128", 7.4e9, RELEASES["switch_base_128"][2])
RELEASES["switch_large_128"] = ("google/switch-large-128", 26e9, dict(
    _COMMON, d_model=1024, d_ff=4096, num_heads=16, num_layers=24, num_decoder_layers=24,
    num_sparse_encoder_layers=12, num_sparse_decoder_layers=12, num_experts=128))
RELEASES["switch_xxl_128"] = ("google/switch-xxl-128", 395e9, dict(
    _COMMON, d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24,
    num_sparse_encoder_layers=12, num_sparse_decoder_layers=12, num_experts=128,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False))
RELEASES["switch_c_2048"] = ("google/switch-c-2048", 1571e9, dict(
    _COMMON, d_model=2080, d_ff=6144, num_heads=32, num_layers=15, num_decoder_layers=15,
    num_sparse_encoder_layers=15, num_sparse_decoder_layers=15, num_experts=2048))

NOT_VERIFIED = {
    "switch_xxl_128": """\
Not verified against the hub's config.json: gated GELU (feed_forward_proj='gated-gelu',
T5 v1.1 as in the paper's Table 9) and untied logits. With them the count is the published
395B, with 128 experts in every other FFN (the paper's table says 64 experts, which gives
~201B). transformers' SwitchTransformers has no gated FFN: it cannot run this release as
gated, so moe_jax's numbers for it are unchecked against any reference.""",
    "switch_c_2048": """\
Not verified against the hub's config.json: every value. Paper's Table 9 dims (d_model 2080,
d_ff 6144, 32 heads of 64, 15 + 15 layers, every FFN sparse, relu, tied): 1571B, which matches
the model card's 1.6T parameters / 3.1 TB in bfloat16. If the hub's config.json differs,
regenerate this file with scripts/convert_checkpoint.py from that config.""",
    "switch_large_128": """\
Not verified against the hub's config.json: d_ff 4096 (T5-Large v1.0) and relu; they give the
model card's 26B.""",
}
_BASE_NOTE = """\
Not verified against the hub's config.json: d_ff 3072 and relu (T5-Base v1.0); with them
switch-base-8 has 0.62B and switch-base-128 7.4B parameters, as published."""


def release_spec(name: str) -> hf_switch.SwitchSpec:
  return hf_switch.spec_from_config(RELEASES[name][2], source=RELEASES[name][0])


def release_gin(name: str) -> str:
  """The gin file of release `name` (what configs/models/<name>.gin holds)."""
  hub_id, count, _ = RELEASES[name]
  title = f"{hub_id}" + (f" (~{count / 1e9:g}B parameters)" if count else "")
  return hf_switch.model_gin(release_spec(name), title, NOT_VERIFIED.get(name, _BASE_NOTE))


def write_configs(directory: str) -> list[str]:
  paths = []
  for name in RELEASES:
    paths.append(os.path.join(directory, f"{name}.gin"))
    with open(paths[-1], "w") as f:
      f.write(release_gin(name))
  return paths


if __name__ == "__main__":
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for path in write_configs(os.path.join(repo, "configs", "models")):
    print(path)
