"""Google's Switch Transformer releases in Hugging Face `transformers` format -> moe_jax.

`from_hf(path)` reads a checkpoint directory (`config.json` plus `model.safetensors` or
`pytorch_model.bin`, either possibly sharded with an `*.index.json`) and returns the configured
`SparseEncoderDecoder` and its params, which reproduce transformers'
`SwitchTransformersForConditionalGeneration` logits. The network expresses transformers'
conventions (`SwitchSpec`): each sequence is its own routing group with a fixed
`expert_capacity`, padding tokens are routed, and layer i is sparse when `i % step == 1`
(or step 1), step = layers // sparse layers. `model_gin` writes the same network as gin.
"""

from __future__ import annotations

import dataclasses
import json
import os
import numpy as np

from moe_jax.convert import weights as weights_lib
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MoeLayer
from moe_jax.layers.routing import SwitchRouter
from moe_jax.models.t5 import (MoeLayout, SparseDecoder, SparseEncoder, SparseEncoderDecoder,
                               sparse_layer_indices)

# transformers' ACT2FN names -> moe_jax activations. HF "gelu" is the exact erf GELU, which
# moe_jax does not implement; T5's "gated-gelu" means the tanh approximation ("gelu_new").
_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "gelu_fast": "gelu", "silu": "silu", "swish": "silu"}
_FEED_FORWARD_PROJ = {"relu": ("relu",), "gated-gelu": ("gelu", "linear"),
                      "gated-silu": ("silu", "linear"), "silu": ("silu",)}


@dataclasses.dataclass(frozen=True)
class SwitchSpec:
  """The hyperparameters of a release, read from its config.json (names are transformers')."""
  vocab_size: int
  d_model: int
  d_kv: int
  num_heads: int
  d_ff: int
  num_layers: int
  num_decoder_layers: int
  encoder_sparse_layers: tuple[int, ...]
  decoder_sparse_layers: tuple[int, ...]
  num_experts: int
  expert_capacity: int
  activations: tuple[str, ...]
  tie_word_embeddings: bool
  relative_attention_num_buckets: int
  relative_attention_max_distance: int
  router_jitter_noise: float
  dropout_rate: float

  @property
  def gated(self) -> bool:
    return len(self.activations) > 1


def hf_sparse_layers(num_layers: int, num_sparse_layers: int) -> tuple[int, ...]:
  """transformers' rule: step = layers // sparse (layers when 0); i sparse iff i % step == 1 or
  step == 1. (So 12 layers with 0 sparse still get layer 1 sparse, exactly as transformers.)"""
  step = num_layers // num_sparse_layers if num_sparse_layers > 0 else num_layers
  if step < 1:
    raise ValueError(f"num_sparse_layers={num_sparse_layers} exceeds num_layers={num_layers}")
  return tuple(i for i in range(num_layers) if step == 1 or i % step == 1)


def _get(config: dict, key: str, kind, default=None, source: str = "config.json"):
  value = config.get(key, default)
  ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
  if not ok:
    raise ValueError(f"{source}: {key}={value!r} must be {getattr(kind, '__name__', kind)}")
  return value


def _activations(config: dict, source: str) -> tuple[str, ...]:
  """feed_forward_proj (T5 convention, decides gating) when present, else dense_act_fn."""
  proj = config.get("feed_forward_proj")
  if proj is not None:
    if proj not in _FEED_FORWARD_PROJ:
      raise ValueError(f"{source}: unsupported feed_forward_proj={proj!r}; moe_jax converts "
                       f"{sorted(_FEED_FORWARD_PROJ)}")
    return _FEED_FORWARD_PROJ[proj]
  act = config.get("dense_act_fn", "relu")
  if act not in _ACTIVATIONS:
    raise ValueError(f"{source}: unsupported dense_act_fn={act!r}; moe_jax converts "
                     f"{sorted(_ACTIVATIONS)} (HF 'gelu' is the exact erf GELU, which moe_jax "
                     f"does not implement)")
  return (_ACTIVATIONS[act],)


def spec_from_config(config: dict, source: str = "config.json") -> SwitchSpec:
  """Validates a SwitchTransformers config.json dict; unsupported values raise naming the key."""
  if config.get("model_type") != "switch_transformers":
    raise ValueError(f"{source}: model_type={config.get('model_type')!r}, expected "
                     f"'switch_transformers'")
  required = {}
  for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_experts",
              "expert_capacity"):
    if key not in config:
      raise ValueError(f"{source}: missing {key!r}")
    required[key] = _get(config, key, int, source=source)
    if required[key] < 1:
      raise ValueError(f"{source}: {key}={required[key]} must be >= 1")
  fixed = {  # values moe_jax's layers implement; others would silently change the numbers
      "router_bias": False, "router_dtype": "float32", "is_encoder_decoder": True,
      "num_selected_experts": 1, "router_type": "tokens_masked",
      "batch_prioritized_routing": False, "add_router_probs": False}
  for key, supported in fixed.items():
    if key in config and config[key] != supported:
      raise ValueError(f"{source}: unsupported {key}={config[key]!r} (moe_jax converts "
                       f"{supported!r})")
  eps = config.get("layer_norm_epsilon", 1e-6)
  if not isinstance(eps, (int, float)) or abs(eps - 1e-6) > 1e-12:
    raise ValueError(f"{source}: unsupported layer_norm_epsilon={eps!r} (moe_jax's RMSNorm "
                     f"uses 1e-6)")
  num_layers = required["num_layers"]
  num_decoder_layers = config.get("num_decoder_layers")
  num_decoder_layers = num_layers if num_decoder_layers is None else _get(
      config, "num_decoder_layers", int, source=source)
  stacks = {}
  for stack, layers in (("encoder", num_layers), ("decoder", num_decoder_layers)):
    sparse = _get(config, f"num_sparse_{stack}_layers", int, 3, source)
    if not 0 <= sparse <= layers:
      raise ValueError(f"{source}: num_sparse_{stack}_layers={sparse} must be in [0, {layers}]")
    stacks[stack] = hf_sparse_layers(layers, sparse)
    step = layers // sparse if sparse else layers
    stored = config.get(f"{stack}_sparse_step")
    if stored is not None and stored != step:
      raise ValueError(f"{source}: {stack}_sparse_step={stored} contradicts "
                       f"num_sparse_{stack}_layers={sparse} (step {step})")
  jitter = config.get("router_jitter_noise", 0.01)
  dropout = config.get("dropout_rate", 0.1)
  for key, value in (("router_jitter_noise", jitter), ("dropout_rate", dropout)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ValueError(f"{source}: {key}={value!r} must be a number in [0, 1)")
  return SwitchSpec(
      vocab_size=required["vocab_size"], d_model=required["d_model"], d_kv=required["d_kv"],
      num_heads=required["num_heads"], d_ff=required["d_ff"], num_layers=num_layers,
      num_decoder_layers=num_decoder_layers, encoder_sparse_layers=stacks["encoder"],
      decoder_sparse_layers=stacks["decoder"], num_experts=required["num_experts"],
      expert_capacity=required["expert_capacity"], activations=_activations(config, source),
      tie_word_embeddings=_get(config, "tie_word_embeddings", bool, True, source),
      relative_attention_num_buckets=_get(config, "relative_attention_num_buckets", int, 32,
                                          source),
      relative_attention_max_distance=_get(config, "relative_attention_max_distance", int, 128,
                                           source),
      router_jitter_noise=float(jitter), dropout_rate=float(dropout))


def read_config(path: str) -> dict:
  """config.json of a checkpoint directory, with FileNotFoundError/ValueError naming the file."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: a transformers checkpoint directory "
                            f"holds config.json beside its weights")
  with open(config_path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path} is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise ValueError(f"{config_path} must hold a JSON object")
  return config


def sparse_layout(num_layers: int, indices: tuple[int, ...]) -> MoeLayout | tuple[int, ...]:
  """MoeLayout.MIXED where it picks the same layers as transformers (steps 1 and 2, every
  release), else the explicit indices."""
  try:
    if sparse_layer_indices(num_layers, len(indices), MoeLayout.MIXED) == indices:
      return MoeLayout.MIXED
  except ValueError:  # MIXED needs the sparse count to divide the layers
    pass
  return indices


def build_network(spec: SwitchSpec, dtype: str = "float32") -> SparseEncoderDecoder:
  """The moe_jax network of `spec` (what `model_gin(spec)` builds through gin)."""
  mlp = MlpBlock(intermediate_dim=spec.d_ff, activations=spec.activations,
                 intermediate_dropout_rate=spec.dropout_rate, dtype=dtype)
  # transformers routes padding too, and each sequence separately with a fixed capacity.
  moe = MoeLayer(
      num_experts=spec.num_experts,
      router=SwitchRouter(jitter_noise=spec.router_jitter_noise, ignore_padding_tokens=False),
      expert=ExpertMlp(intermediate_dim=spec.d_ff, activations=spec.activations,
                       intermediate_dropout_rate=spec.dropout_rate, dtype=dtype),
      sequence_groups=True, expert_capacity=spec.expert_capacity, dtype=dtype,
      dispatch="gather")  # configs/architectures/moe.gin's default
  stack = dict(num_heads=spec.num_heads, head_dim=spec.d_kv, mlp=mlp, moe=moe,
               dropout_rate=spec.dropout_rate, dtype=dtype,
               relative_attention_num_buckets=spec.relative_attention_num_buckets,
               relative_attention_max_distance=spec.relative_attention_max_distance)
  return SparseEncoderDecoder(
      vocab_size=spec.vocab_size, embed_dim=spec.d_model,
      encoder=SparseEncoder(num_layers=spec.num_layers,
                            num_sparse_layers=len(spec.encoder_sparse_layers),
                            sparse_layout=sparse_layout(spec.num_layers,
                                                        spec.encoder_sparse_layers), **stack),
      decoder=SparseDecoder(num_layers=spec.num_decoder_layers,
                            num_sparse_layers=len(spec.decoder_sparse_layers),
                            sparse_layout=sparse_layout(spec.num_decoder_layers,
                                                        spec.decoder_sparse_layers), **stack),
      logits_via_embedding=spec.tie_word_embeddings, dtype=dtype)


def _gin_tuple(values) -> str:
  return repr(tuple(values))


def model_gin(spec: SwitchSpec, title: str, notes: str = "") -> str:
  """gin text of `spec`'s network over configs/architectures (the same graph as build_network)."""
  act = _gin_tuple(spec.activations)
  lines = [f"# {title}", "# Hugging Face transformers' SwitchTransformers conventions. Generated by "
           "moe_jax.convert", "# from the release's config.json: regenerate, don't edit."]
  lines += [f"# {line}" if line else "#" for line in notes.strip().splitlines()]
  lines += [
      "include 'architectures/t5_sparse.gin'",
      "include 'architectures/moe.gin'",
      "",
      f"VOCAB_SIZE = {spec.vocab_size}",
      f"EMBED_DIM = {spec.d_model}",
      f"NUM_HEADS = {spec.num_heads}",
      f"HEAD_DIM = {spec.d_kv}",
      f"MLP_DIM = {spec.d_ff}",
      f"MLP_ACTIVATIONS = {act}",
      f"NUM_ENCODER_LAYERS = {spec.num_layers}",
      f"NUM_DECODER_LAYERS = {spec.num_decoder_layers}",
      "# transformers' rule: layer i is sparse when i % (layers // sparse layers) == 1 (or step 1);",
      "# MoeLayout.MIXED (the default) where it picks the same layers.",
      f"NUM_ENCODER_SPARSE_LAYERS = {len(spec.encoder_sparse_layers)}",
      f"NUM_DECODER_SPARSE_LAYERS = {len(spec.decoder_sparse_layers)}",
  ]
  for stack, layers, indices in (("ENCODER", spec.num_layers, spec.encoder_sparse_layers),
                                 ("DECODER", spec.num_decoder_layers,
                                  spec.decoder_sparse_layers)):
    if sparse_layout(layers, indices) is not MoeLayout.MIXED:
      lines.append(f"{stack}_SPARSE_LAYOUT = {_gin_tuple(indices)}")
  lines += [
      f"NUM_EXPERTS = {spec.num_experts}",
      f"LOGITS_VIA_EMBEDDING = {spec.tie_word_embeddings}",
      f"DROPOUT_RATE = {spec.dropout_rate!r}",
      "",
  ]
  for stack in ("SparseEncoder", "SparseDecoder"):
    lines += [f"{stack}.relative_attention_num_buckets = {spec.relative_attention_num_buckets}",
              f"{stack}.relative_attention_max_distance = {spec.relative_attention_max_distance}"]
  lines += [
      "",
      "# Routing as transformers does it: each sequence is its own group with a fixed number of",
      "# slots per expert, and padding tokens are routed like any other.",
      "MoeLayer.sequence_groups = True",
      f"MoeLayer.expert_capacity = {spec.expert_capacity}",
      "SwitchRouter.ignore_padding_tokens = False",
      f"SwitchRouter.jitter_noise = {spec.router_jitter_noise!r}",
  ]
  return "\n".join(lines) + "\n"


def _linear(reader, name: str, in_dim: int, out_shape: tuple[int, ...]) -> np.ndarray:
  """torch Linear weight [out, in] -> kernel [in, *out_shape]."""
  w = reader.take(name, (int(np.prod(out_shape)), in_dim))
  return np.ascontiguousarray(w.T).reshape((in_dim,) + out_shape)


def _attention(reader, prefix: str, spec: SwitchSpec) -> dict:
  d, heads = spec.d_model, (spec.num_heads, spec.d_kv)
  out = {name: {"kernel": _linear(reader, f"{prefix}.{hf}.weight", d, heads)}
         for name, hf in (("query", "q"), ("key", "k"), ("value", "v"))}
  w_o = reader.take(f"{prefix}.o.weight", (d, heads[0] * heads[1]))
  out["out"] = {"kernel": np.ascontiguousarray(w_o.T).reshape(heads + (d,))}
  return out


def _ffn_names(spec: SwitchSpec) -> list[str]:
  return ["wi"] if not spec.gated else [f"wi_{i}" for i in range(len(spec.activations))]


def _mlp(reader, prefix: str, spec: SwitchSpec) -> dict:
  out = {n: {"kernel": _linear(reader, f"{prefix}.{n}.weight", spec.d_model, (spec.d_ff,))}
         for n in _ffn_names(spec)}
  out["wo"] = {"kernel": _linear(reader, f"{prefix}.wo.weight", spec.d_ff, (spec.d_model,))}
  return out


def _moe(reader, prefix: str, spec: SwitchSpec) -> dict:
  """Per-expert `experts.expert_{e}.*` (transformers 4.x and 5.x) stacked into [E, ...]."""
  e, d, f = spec.num_experts, spec.d_model, spec.d_ff
  expert = {}
  for name, (fan_in, fan_out) in [(n, (d, f)) for n in _ffn_names(spec)] + [("wo", (f, d))]:
    kernel = np.empty((e, fan_in, fan_out), np.float32)
    for i in range(e):
      kernel[i] = reader.take(f"{prefix}.experts.expert_{i}.{name}.weight", (fan_out, fan_in)).T
    expert[name] = {"kernel": kernel}
  router = {"w": {"kernel": _linear(reader, f"{prefix}.router.classifier.weight", d, (e,))}}
  return {"router": {"router_weights": router}, "expert": expert}


def _norm(reader, name: str, spec: SwitchSpec) -> dict:
  return {"scale": reader.take(name, (spec.d_model,))}


def _stack(reader, stack: str, spec: SwitchSpec) -> dict:
  decoder = stack == "decoder"
  num_layers = spec.num_decoder_layers if decoder else spec.num_layers
  sparse = spec.decoder_sparse_layers if decoder else spec.encoder_sparse_layers
  bias = reader.take(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     (spec.relative_attention_num_buckets, spec.num_heads))
  out = {"relpos_bias": {"rel_embedding": np.ascontiguousarray(bias.T)},
         f"{stack}_norm": _norm(reader, f"{stack}.final_layer_norm.weight", spec)}
  for i in range(num_layers):
    block = f"{stack}.block.{i}.layer"
    if decoder:
      layer = {"self_attention": _attention(reader, f"{block}.0.SelfAttention", spec),
               "pre_self_attention_layer_norm": _norm(reader, f"{block}.0.layer_norm.weight", spec),
               "encoder_decoder_attention": _attention(reader, f"{block}.1.EncDecAttention", spec),
               "pre_cross_attention_layer_norm": _norm(reader, f"{block}.1.layer_norm.weight",
                                                       spec)}
    else:
      layer = {"attention": _attention(reader, f"{block}.0.SelfAttention", spec),
               "pre_attention_layer_norm": _norm(reader, f"{block}.0.layer_norm.weight", spec)}
    ff = f"{block}.{2 if decoder else 1}"
    layer["pre_mlp_layer_norm"] = _norm(reader, f"{ff}.layer_norm.weight", spec)
    layer["mlp"] = (_moe if i in sparse else _mlp)(reader, f"{ff}.mlp", spec)
    out[f"layers_{i}"] = layer
  return out


def convert_weights(reader: weights_lib.Reader, spec: SwitchSpec) -> dict:
  """moe_jax params (float32 numpy) from a transformers state dict; every tensor must be used.

  moe_jax has ONE input embedding for both stacks, as the releases were trained (transformers
  4.x ties `encoder/decoder.embed_tokens` to `shared`). Checkpoints may store those copies
  (4.x pickles) or only one of the names (deduplicated safetensors); all stored copies must be
  equal. transformers 5.x unties them when tie_word_embeddings=False: such a checkpoint with
  different tables is refused.
  """
  names = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
  if spec.tie_word_embeddings:
    names.append("lm_head.weight")
  present = [n for n in names if reader.has(n)] or names[:1]  # none: "missing shared.weight"
  embedding = reader.take(present[0], (spec.vocab_size, spec.d_model))
  for name in present[1:]:
    if not np.array_equal(reader.take(name, embedding.shape), embedding):
      raise ValueError(
          f"{reader.source}: {name} differs from {present[0]}; moe_jax shares one embedding "
          f"between encoder, decoder (and tied logits), as the Switch releases do "
          f"(transformers 5.x unties the input embeddings when tie_word_embeddings=False)")
  params = {"token_embedder": {"embedding": embedding},
            "encoder": _stack(reader, "encoder", spec),
            "decoder": _stack(reader, "decoder", spec)}
  if not spec.tie_word_embeddings:
    params["logits_head"] = {"logits_dense": {"kernel": _linear(
        reader, "lm_head.weight", spec.d_model, (spec.vocab_size,))}}
  reader.check_all_used()
  return params


def from_hf(path: str, dtype: str = "float32") -> tuple[SparseEncoderDecoder, dict]:
  """(network, params) of a transformers SwitchTransformers checkpoint directory.

  `network.apply({"params": params}, encoder_input_tokens, decoder_input_tokens)` gives the
  release's logits (float32 params; `dtype` is the activations').
  """
  spec = spec_from_config(read_config(path), os.path.join(path, "config.json"))
  with weights_lib.open_weights(path) as reader:
    params = convert_weights(reader, spec)
  return build_network(spec, dtype), params


def spec_from_hf(path: str) -> SwitchSpec:
  return spec_from_config(read_config(path), os.path.join(path, "config.json"))

