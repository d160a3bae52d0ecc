"""Tiny random transformers SwitchTransformers checkpoints (no hub), built once per session.

`hf_case(name, capacity)` -> Case: a checkpoint directory written by `save_pretrained`, and the
transformers model's own outputs on `TOKENS` (the reference). Gated-GELU cases swap T5's
`T5DenseGatedActDense` into every FFN, since transformers' Switch model has no gated FFN.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

NEVER_BINDS = 64  # > every sequence length here: no token is ever dropped
DROPS = 1  # one slot per expert per sequence: most tokens are dropped

# Right-padded encoder rows (0 = padding); decoder rows start with 0 (decoder_start_token_id),
# the last one has trailing padding, which transformers (no decoder mask) treats as tokens.
ENCODER_TOKENS = np.array([[5, 9, 13, 2, 7, 33, 12, 40],
                           [8, 3, 3, 19, 51, 0, 0, 0],
                           [60, 22, 4, 0, 0, 0, 0, 0]], np.int32)
DECODER_TOKENS = np.array([[0, 7, 12, 30, 2, 9],
                           [0, 44, 8, 8, 61, 3],
                           [0, 5, 17, 0, 0, 0]], np.int32)

_DIMS = dict(vocab_size=64, d_model=16, d_kv=6, num_heads=2, d_ff=24, num_experts=4,
             dropout_rate=0.0, router_jitter_noise=0.0, relative_attention_num_buckets=8,
             relative_attention_max_distance=16)
CASES = {
    # transformers' step 2 (layers 1, 3), tied logits scaled by d_model**-0.5
    "relu_step2_tied": dict(num_layers=4, num_decoder_layers=2, num_sparse_encoder_layers=2,
                            num_sparse_decoder_layers=1, tie_word_embeddings=True),
    # step 1: every layer sparse; untied logits, unscaled
    "relu_step1_untied": dict(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=2,
                              num_sparse_decoder_layers=2, tie_word_embeddings=False),
    # step 3: i % 3 == 1 -> layer 1 of 3 (MoeLayout.MIXED would pick layer 2)
    "relu_step3_tied": dict(num_layers=3, num_decoder_layers=3, num_sparse_encoder_layers=1,
                            num_sparse_decoder_layers=1, tie_word_embeddings=True),
    "gated_gelu_step2_untied": dict(num_layers=4, num_decoder_layers=2,
                                    num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
                                    tie_word_embeddings=False, feed_forward_proj="gated-gelu"),
}


@dataclasses.dataclass
class Case:
  path: str
  model: object  # the transformers model (torch), eval mode
  logits: np.ndarray  # [B, L, V] on ENCODER_TOKENS / DECODER_TOKENS
  encoded: np.ndarray  # [B, M, D]


def _gate_ffns(model, config):
  """Every FFN (dense and expert) becomes T5's gated-GELU FFN (wi_0, wi_1, wo), random."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import T5Config  # pylint: disable=g-import-not-at-top
  from transformers.models.switch_transformers import modeling_switch_transformers as st
  from transformers.models.t5.modeling_t5 import T5DenseGatedActDense
  t5 = T5Config(d_model=config.d_model, d_ff=config.d_ff, dropout_rate=0.0,
                feed_forward_proj="gated-gelu")
  assert t5.dense_act_fn == "gelu_new"  # T5's gated-gelu is the tanh approximation
  targets = [(parent, name) for parent in model.modules()
             for name, child in parent.named_children()
             if isinstance(child, st.SwitchTransformersDenseActDense)]
  generator = torch.Generator().manual_seed(1)
  for parent, name in targets:
    ffn = T5DenseGatedActDense(t5)
    with torch.no_grad():
      for w in (ffn.wi_0, ffn.wi_1, ffn.wo):
        w.weight.normal_(0.0, w.weight.shape[1] ** -0.5, generator=generator)
    setattr(parent, name, ffn)


def _forward(model, torch):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ENCODER_TOKENS, dtype=torch.long),
                attention_mask=torch.tensor(ENCODER_TOKENS != 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(DECODER_TOKENS, dtype=torch.long))
  return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


@pytest.fixture(scope="session")
def hf_case(tmp_path_factory):
  """Factory: hf_case(name, capacity) -> Case (cached)."""
  pytest.importorskip("transformers")
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import (SwitchTransformersConfig,  # pylint: disable=g-import-not-at-top
                            SwitchTransformersForConditionalGeneration)
  from transformers.models.switch_transformers import modeling_switch_transformers as st
  cache = {}

  def make(name, capacity=NEVER_BINDS):
    if (name, capacity) in cache:
      return cache[name, capacity]
    path = str(tmp_path_factory.mktemp(f"{name}_c{capacity}"))
    if capacity != NEVER_BINDS:  # same weights, another expert_capacity in config.json
      base = make(name)
      shutil.rmtree(path)
      shutil.copytree(base.path, path)
      with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
      config["expert_capacity"] = capacity
      with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
      model = base.model
      for module in model.modules():
        if isinstance(module, st.SwitchTransformersTop1Router):
          module.expert_capacity = capacity
      logits, encoded = _forward(model, torch)
      for module in model.modules():
        if isinstance(module, st.SwitchTransformersTop1Router):
          module.expert_capacity = NEVER_BINDS
      cache[name, capacity] = Case(path, None, logits, encoded)
      return cache[name, capacity]
    kwargs = dict(CASES[name])
    proj = kwargs.pop("feed_forward_proj", None)
    config = SwitchTransformersConfig(**_DIMS, **kwargs, expert_capacity=capacity)
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(config).eval()
    # One input embedding for both stacks, as the releases (and transformers 4.x) have it;
    # transformers 5.x makes separate ones when tie_word_embeddings=False.
    model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
    if proj is not None:
      _gate_ffns(model, config)
    model.save_pretrained(path, safe_serialization=True)
    if proj is not None:
      with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
      saved["feed_forward_proj"] = proj  # T5's key: transformers' Switch config has none
      with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(saved, f)
    logits, encoded = _forward(model, torch)
    cache[name, capacity] = Case(path, model, logits, encoded)
    return cache[name, capacity]

  return make
