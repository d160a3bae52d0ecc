"""Sparse T5 (v1.1 style): SparseEncoder, SparseDecoder and SparseEncoderDecoder.

RMSNorm pre-norm residual blocks, relative position bias shared within a stack, no biases,
gated or plain FFNs. Each layer's FFN is the dense `mlp` template or, at the layers that
`sparse_layout` picks, the `moe` template (Switch Transformer; Fedus et al. 2021).
`num_sparse_layers=0` is the dense T5 and never builds an MoE layer. The blocks at `mod_layout`
(same rules) can be wrapped in Mixture-of-Depths (`mixture_of_depths`, Raposo et al. 2024).
`scan_layers` / `remat_policy` bound compile time and memory (moe_jax.models.scan).
"""

from __future__ import annotations

import enum
import functools
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from moe_jax.layers.attention import (MultiHeadDotProductAttention, RelativePositionBias,
                                      attention_mask, mask_to_bias)
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.embedding import Embed
from moe_jax.layers.mixture_of_depths import MixtureOfDepths
from moe_jax.layers.moe import MoeLayer
from moe_jax.layers.normalization import RMSNorm
from moe_jax.models import scan


class MoeLayout(enum.Enum):
  """Which layers of a stack are sparse (see `sparse_layer_indices`)."""
  TOP = "top"
  BOTTOM = "bottom"
  MIDDLE = "middle"
  MIXED = "mixed"


gin.constants_from_enum(MoeLayout, module="moe_jax.models.t5")


def sparse_layer_indices(num_layers: int, num_sparse_layers: int,
                         layout: MoeLayout | Sequence[int], owner: str = "stack",
                         fields: tuple[str, str] = ("num_sparse_layers", "sparse_layout")
                         ) -> tuple[int, ...]:
  """Indices of the sparse layers (Flaxformer's rules).

  MIXED: every (num_layers // num_sparse_layers)-th layer, counted so the LAST layer is sparse
  (12 layers, 3 sparse -> 3, 7, 11). TOP: the last ones; BOTTOM: the first ones; MIDDLE: layers
  i with L - S <= 2i < L + S (12, 3 -> 5, 6, 7; 12, 2 -> 5, 6). A sequence of indices names the
  sparse layers directly (e.g. Hugging Face's `i % sparse_step == 1` for steps other than 1, 2).
  `fields` names the count and layout fields in errors (Mixture-of-Depths layers reuse the rule).
  """
  count, layout_field = fields
  if num_layers < 1:
    raise ValueError(f"{owner}.num_layers must be >= 1, got {num_layers}")
  if not 0 <= num_sparse_layers <= num_layers:
    raise ValueError(f"{owner}.{count} must be in [0, num_layers={num_layers}], "
                     f"got {num_sparse_layers}")
  if not isinstance(layout, MoeLayout):
    indices = tuple(layout) if isinstance(layout, (tuple, list)) else None
    if indices is None or not all(isinstance(i, int) for i in indices):
      raise ValueError(f"{owner}.{layout_field} must be a MoeLayout "
                       f"({[m.name for m in MoeLayout]}) or a tuple of layer indices, "
                       f"got {layout!r}")
    if (sorted(set(indices)) != list(indices) or any(not 0 <= i < num_layers for i in indices)
        or len(indices) != num_sparse_layers):
      raise ValueError(f"{owner}.{layout_field}={indices} must be {num_sparse_layers} "
                       f"({count}) increasing layer indices in [0, {num_layers})")
    return indices
  if num_sparse_layers == 0:
    return ()
  if layout is MoeLayout.MIXED:
    if num_layers % num_sparse_layers:
      raise ValueError(f"{owner}.{count}={num_sparse_layers} must divide "
                       f"num_layers={num_layers} for MoeLayout.MIXED")
    every = num_layers // num_sparse_layers
    return tuple(range(every - 1, num_layers, every))
  if layout is MoeLayout.MIDDLE:
    return tuple(i for i in range(num_layers)
                 if num_layers - num_sparse_layers <= 2 * i < num_layers + num_sparse_layers)
  first = 0 if layout is MoeLayout.BOTTOM else num_layers - num_sparse_layers
  return tuple(range(first, first + num_sparse_layers))


class TransformerLayer(nn.Module):
  """One pre-norm T5 block: self-attention [-> cross-attention] -> FFN [-> extra dense FFN].

  Parameter names are flaxformer's (`attention` in the encoder, `self_attention` and
  `encoder_decoder_attention` in the decoder), so T5X checkpoints map over by name.
  """
  num_heads: int
  head_dim: int
  mlp: nn.Module
  decoder: bool = False
  extra_mlp: Optional[nn.Module] = None
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  # An attention template (e.g. SwitchHeadAttention) for the self-attention; None: dense MHA.
  self_attention_template: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, x_BLD, self_bias_BNLM, padding_mask_BL, *, encoded_BMD=None,
               cross_bias_BNLM=None, deterministic: bool = True, decode: bool = False,
               decode_position=None, max_decode_length: Optional[int] = None):
    dropout = lambda y: nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=deterministic)

    def attention(name, norm_name, y, kv, bias, cached=False):
      h = RMSNorm(dtype=self.dtype, name=norm_name)(y)
      if kv is None and self.self_attention_template is not None:  # self-attention only
        layer = self.self_attention_template.clone(parent=self, name=name)
      else:
        layer = MultiHeadDotProductAttention(self.num_heads, self.head_dim, self.dropout_rate,
                                             self.dtype, name=name)
      kv = h if kv is None else kv
      h = layer(h, kv, bias, deterministic, decode=cached, decode_position=decode_position)
      return y + dropout(h)

    if self.decoder:
      x_BLD = attention("self_attention", "pre_self_attention_layer_norm", x_BLD, None,
                        self_bias_BNLM, cached=decode)
      if encoded_BMD is not None:  # recomputed from the encoding (see the attention's doc)
        x_BLD = attention("encoder_decoder_attention", "pre_cross_attention_layer_norm", x_BLD,
                          encoded_BMD, cross_bias_BNLM)
    else:
      x_BLD = attention("attention", "pre_attention_layer_norm", x_BLD, None, self_bias_BNLM)

    # ST-MoE's extra dense FFN runs after the (MoE) FFN, as in Flaxformer.
    ffns = [("mlp", self.mlp)]
    if self.extra_mlp is not None:
      ffns.append(("extra_mlp", self.extra_mlp))
    for name, ffn in ffns:
      h = RMSNorm(dtype=self.dtype, name=f"pre_{name}_layer_norm")(x_BLD)
      # Only MoE layers keep decoding state (their experts' buffer fill).
      decode_kw = (dict(decode=True, max_decode_length=max_decode_length)
                   if decode and isinstance(ffn, MoeLayer) else {})
      h = ffn(h, padding_mask_BL, deterministic=deterministic, **decode_kw)
      x_BLD = nn.with_logical_constraint(x_BLD + dropout(h), ("batch", "length", "embed"))
    return x_BLD


# Static options as fields, so that nn.remat / nn.scan never trace them.
_StaticLayer = scan.with_static_options(TransformerLayer)


class _SparseStack(nn.Module):
  """What SparseEncoder and SparseDecoder share: layout, layers, relative bias, final norm."""
  num_layers: int = 2
  num_heads: int = 4
  head_dim: int = 16
  mlp: nn.Module = MlpBlock()
  moe: Optional[nn.Module] = None  # a MoeLayer, or a SoftMoE (encoders only)
  num_sparse_layers: int = 0
  sparse_layout: MoeLayout | Sequence[int] = MoeLayout.MIXED
  extra_dense_mlp: bool = False  # ST-MoE: a dense FFN beside each MoE layer (Zoph et al. 2022)
  # Attention experts (moe_jax.layers.attention_experts) for every layer's self-attention;
  # None: dense MultiHeadDotProductAttention. Cross-attention stays dense.
  self_attention: Optional[nn.Module] = None
  # Mixture-of-Depths (Raposo et al. 2024): the blocks at `mod_layout` (`sparse_layout`'s rules)
  # process only the tokens this template routes through them.
  mixture_of_depths: Optional[MixtureOfDepths] = None
  num_mod_layers: int = 0
  mod_layout: MoeLayout | Sequence[int] = MoeLayout.MIXED
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dtype: Any = jnp.float32
  # Compile time (moe_jax.models.scan): `nn.scan` over the repeating block of layers (params
  # under `layers/`, stacked on a leading "layers" axis), and per-layer remat.
  scan_layers: bool = False
  remat_policy: str = "none"  # one of scan.REMAT_POLICIES

  is_decoder: ClassVar[bool] = False

  def __post_init__(self):
    owner = type(self).__name__
    sparse_layer_indices(self.num_layers, self.num_sparse_layers, self.sparse_layout, owner)
    if self.num_sparse_layers and self.moe is None:
      raise ValueError(f"{owner}.moe must be set when num_sparse_layers={self.num_sparse_layers}")
    sparse_layer_indices(self.num_layers, self.num_mod_layers, self.mod_layout, owner,
                         ("num_mod_layers", "mod_layout"))
    if self.num_mod_layers and self.mixture_of_depths is None:
      raise ValueError(f"{owner}.mixture_of_depths must be set when "
                       f"num_mod_layers={self.num_mod_layers}")
    scan.check_remat_policy(owner, self.remat_policy)
    if self.scan_layers:
      scan.scan_period(owner, self._layer_pattern(), self.sparse_layout)
    super().__post_init__()

  @nn.nowrap
  def _layer_pattern(self) -> list[tuple[bool, bool, bool]]:
    """What makes layer i differ from others: (sparse, extra dense FFN, MoD-routed)."""
    sparse, routed = set(self.sparse_layers), set(self.mod_layers)
    return [(i in sparse, i in sparse and self.extra_dense_mlp, i in routed)
            for i in range(self.num_layers)]

  @property
  def sparse_layers(self) -> tuple[int, ...]:
    return sparse_layer_indices(self.num_layers, self.num_sparse_layers, self.sparse_layout)

  @property
  def mod_layers(self) -> tuple[int, ...]:
    """Indices of the blocks that Mixture-of-Depths routes."""
    return sparse_layer_indices(self.num_layers, self.num_mod_layers, self.mod_layout)

  # Not a module method: gin re-evaluates the template's bound references (@SwitchRouter())
  # when it is copied, and inside a wrapped method those would attach to this module.
  @nn.nowrap
  def _moe_layer(self) -> nn.Module:
    """An unbound copy of the `moe` template; a decoder's routes causally (a layer without a
    router, e.g. SoftMoE, takes `causal` itself and refuses it if it cannot)."""
    if not self.is_decoder:
      return self.moe.copy(parent=None)
    if not isinstance(self.moe, MoeLayer):
      return self.moe.copy(parent=None, causal=True)
    return self.moe.copy(parent=None, router=self.moe.router.copy(parent=None, causal=True))

  @nn.nowrap
  def _layer(self, i: int, static: dict, **kwargs) -> nn.Module:
    """Layer i (remat-ed per `remat_policy`), with deep copies of the templates: every layer
    owns its parameters."""
    sparse = self._layer_pattern()[i][0]
    ffn = self._moe_layer() if sparse else self.mlp.copy(parent=None)
    extra = self.mlp.copy(parent=None) if sparse and self.extra_dense_mlp else None
    cls = scan.remat_class(_StaticLayer, self.remat_policy, self.scan_layers)
    return cls(self.num_heads, self.head_dim, ffn, decoder=self.is_decoder, extra_mlp=extra,
               dropout_rate=self.dropout_rate, dtype=self.dtype,
               self_attention_template=None if self.self_attention is None
               else self.self_attention.copy(parent=None), **static, **kwargs)

  @nn.compact
  def __call__(self, x_BLD, padding_mask_BL, segment_ids_BL=None, *, encoded_BMD=None,
               encoder_padding_mask_BM=None, encoder_segment_ids_BM=None,
               deterministic: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None):
    """Stack output [B, L, D].

    `decode=True` (decoders; T5X's cache): the first call, on full-length [B, T] inputs,
    creates the "cache" collection; each later call takes one token per sequence, at the next
    position, and needs `max_decode_length` = T.
    """
    if decode and not self.is_decoder:
      raise ValueError(f"{type(self).__name__} has no decoding mode")
    length = x_BLD.shape[1]
    relpos = RelativePositionBias(self.num_heads, bidirectional=not self.is_decoder,
                                  num_buckets=self.relative_attention_num_buckets,
                                  max_distance=self.relative_attention_max_distance,
                                  dtype=self.dtype, name="relpos_bias")
    stepping = decode and self.has_variable("cache", "position")
    position = None
    if decode:  # the position of this step's token (one scalar: sequences step together)
      index = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      position = index.value
    if stepping:
      index.value = position + 1
      if max_decode_length is None or length != 1:
        raise ValueError(f"decoding steps take one token [B, 1] and max_decode_length, got "
                         f"length {length} and max_decode_length={max_decode_length}")
      # The query's row of the full-length causal bias: keys written so far, at any position.
      self_mask = jnp.arange(max_decode_length)[None, None, None, :] <= position
      self_bias = mask_to_bias(self_mask) + relpos(1, max_decode_length, q_offset=position)
    else:
      self_mask = attention_mask(padding_mask_BL, padding_mask_BL, causal=self.is_decoder,
                                 q_segment_BL=segment_ids_BL, kv_segment_BM=segment_ids_BL)
      self_bias = mask_to_bias(self_mask) + relpos(length, length)
    cross_bias = None
    if encoded_BMD is not None:
      cross_bias = mask_to_bias(attention_mask(
          padding_mask_BL, encoder_padding_mask_BM, q_segment_BL=segment_ids_BL,
          kv_segment_BM=encoder_segment_ids_BM))

    x_BLD = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(x_BLD, deterministic=deterministic)
    x_BLD = nn.with_logical_constraint(x_BLD.astype(self.dtype), ("batch", "length", "embed"))
    static = dict(deterministic=deterministic, decode=decode,
                  max_decode_length=max_decode_length)
    step_position = position if stepping else None
    pattern = self._layer_pattern()
    if self.scan_layers:
      p = scan.scan_period(type(self).__name__, pattern, self.sparse_layout)
      x_BLD = scan.scanned_layers(
          [self._layer(i, static, parent=None) for i in range(p)],
          [pattern[i][2] for i in range(p)], self.mixture_of_depths, self.num_layers, static,
          x_BLD, self_bias, padding_mask_BL, encoded_BMD, cross_bias, step_position)
    else:
      for i in range(self.num_layers):
        layer = self._layer(i, static, name=f"layers_{i}")
        if pattern[i][2]:  # the block keeps its parameters at layers_i, its router at mod_i
          layer = functools.partial(
              self.mixture_of_depths.clone(parent=self, name=f"mod_{i}"), layer)
        x_BLD = layer(x_BLD, self_bias, padding_mask_BL, encoded_BMD=encoded_BMD,
                      cross_bias_BNLM=cross_bias, decode_position=step_position, **static)
    x_BLD = RMSNorm(dtype=self.dtype, name="decoder_norm" if self.is_decoder else "encoder_norm")(
        x_BLD)
    return nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(x_BLD, deterministic=deterministic)


@gin.configurable(module="moe_jax.models.t5")
class SparseEncoder(_SparseStack):
  """T5 encoder whose FFNs at `sparse_layout` positions are MoE layers."""


@gin.configurable(module="moe_jax.models.t5")
class SparseDecoder(_SparseStack):
  """Causal T5 decoder (cross-attention when given an encoding); sparse like SparseEncoder."""
  is_decoder: ClassVar[bool] = True

  def __post_init__(self):
    if self.num_sparse_layers and self.moe is not None:
      try:  # the router (expert choice, BPR) or SoftMoE refuses causal routing: fail at build
        self._moe_layer()
      except ValueError as e:
        where = "moe.router" if isinstance(self.moe, MoeLayer) else "moe"
        raise ValueError(f"SparseDecoder.{where}: {e}") from None
    super().__post_init__()


def decoder_padding_mask(decoder_input_tokens, decoder_target_tokens=None,
                         decoder_segment_ids=None):
  """Real decoder positions: targets > 0, else segment ids > 0, else all (inputs start with 0)."""
  if decoder_target_tokens is not None:
    return decoder_target_tokens > 0
  if decoder_segment_ids is not None:
    return decoder_segment_ids > 0
  return jnp.ones(decoder_input_tokens.shape, bool)


class LogitsHead(nn.Module):
  """Decoder output -> float32 logits: tied (embedding^T / sqrt(D), T5) or `logits_dense`.

  `dtype` is the activations'; the logits are computed in float32 either way.
  """
  vocab_size: int
  tied: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y_BLD, embedder: Embed):
    # The projection itself runs in float32 whatever `dtype` is (Flaxformer's output logits).
    y_BLD = y_BLD.astype(jnp.float32)
    if self.tied:
      logits = embedder.attend(y_BLD, dtype=jnp.float32) / jnp.sqrt(y_BLD.shape[-1])
    else:
      logits = nn.DenseGeneral(
          self.vocab_size, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
              ("embed", "vocab")), name="logits_dense")(y_BLD)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


@gin.configurable(module="moe_jax.models.t5")
class SparseEncoderDecoder(nn.Module):
  """T5 encoder-decoder; returns float32 logits [B, L, V] for teacher-forced decoder inputs."""
  vocab_size: int = 384
  embed_dim: int = 64
  encoder: SparseEncoder = SparseEncoder()
  decoder: SparseDecoder = SparseDecoder()
  logits_via_embedding: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    self.token_embedder = Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)
    self.logits_head = LogitsHead(self.vocab_size, self.logits_via_embedding, self.dtype,
                                  name="logits_head")

  def example_batch(self, batch_size: int = 2, length: int = 8) -> dict:
    """Dummy inputs for `init` / `jax.eval_shape`."""
    tokens = jnp.ones((batch_size, length), jnp.int32)
    return {"encoder_input_tokens": tokens, "decoder_input_tokens": tokens}

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=False):
    padding_BM = encoder_input_tokens > 0
    return self.encoder(self.token_embedder(encoder_input_tokens), padding_BM,
                        encoder_segment_ids, deterministic=not enable_dropout)

  def decode(self, encoded_BMD, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens=None, encoder_segment_ids=None, decoder_segment_ids=None,
             enable_dropout=False, decode: bool = False, max_decode_length: Optional[int] = None):
    """Logits [B, L, V] given the encoding; `decode=True` steps a cache (see SparseDecoder)."""
    padding_BL = decoder_padding_mask(decoder_input_tokens, decoder_target_tokens,
                                      decoder_segment_ids)
    y_BLD = self.decoder(self.token_embedder(decoder_input_tokens), padding_BL,
                         decoder_segment_ids, encoded_BMD=encoded_BMD,
                         encoder_padding_mask_BM=encoder_input_tokens > 0,
                         encoder_segment_ids_BM=encoder_segment_ids,
                         deterministic=not enable_dropout, decode=decode,
                         max_decode_length=max_decode_length)
    return self.logits_head(y_BLD, self.token_embedder)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, enable_dropout: bool = False):
    # Positions are implied by relative attention within each (packed) segment.
    del encoder_positions, decoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       enable_dropout)
