"""LSTM + MoE language model (Shazeer et al. 2017, arXiv:1701.06538, sec. 5.1 and appendix C.1).

embedding -> LSTM -> MoE -> LSTM [-> MoE -> LSTM ...] -> softmax: `num_layers` LSTMs
(Hochreiter & Schmidhuber 1997, with forget gate: Gers et al. 2000) and an MoE layer between
each consecutive pair (the paper's model: 2 LSTMs, one MoE). Appendix C.1: "for every layer other
than the softmax, we apply dropout to the layer output [...]. After dropout, the output of the
previous layer is added to the layer output", and "the output of the MoE layer is passed through
a sigmoid function before dropout". So, with `dropout` at rate `dropout_rate` (DropProb):

    x = dropout(embed(tokens))
    x = x + dropout(LSTM(x))             for each LSTM
    x = x + dropout(sigmoid(MoE(x)))     between consecutive LSTMs (`moe_sigmoid=False`: no sigmoid)
    logits = x W_softmax

The embedding, each LSTM's units and the MoE's input/output all have `embed_dim` units (the
paper's 512), so the residual sums need no projection. Dropout is per activation and never on
the recurrent connections (Zaremba et al. 2014, arXiv:1409.2329). `moe=None` is the plain
stacked-LSTM baseline. The paper's experts (one ReLU hidden layer of 2 * 512 units), noisy top-k
gating (k = 4; hierarchical: k = 2 per level) and w_importance = w_load = 0.1 are set in
configs/models/lstm_moe_lm.gin; its sampled softmax over a 793k-word vocabulary is a full softmax
over our byte vocabulary here.

Packed sequences: each LSTM's carry restarts from zeros wherever `decoder_segment_ids` changes,
so packed examples never see each other through the recurrence (their MoE routing shares groups
and capacity, as in the sparse transformers). The MoE routes causally: the model is
autoregressive and decodes with `moe_jax.decoding` (see `LstmMoeLanguageModel`).

`bidirectional=True` (non-autoregressive use, e.g. as an encoder of whole sequences: as a
next-token LM it would see its targets): each LSTM is a forward and a backward LSTM of
embed_dim / 2 units whose outputs are concatenated (Schuster & Paliwal 1997), so the layer's
output still has embed_dim units; the router is not made causal and decoding is refused.

Shape letter beyond the glossary: U, an LSTM's units (D; D / 2 per direction when bidirectional).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import gin
import jax.numpy as jnp

from moe_jax.layers.dense import default_kernel_init
from moe_jax.layers.embedding import Embed
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MoeLayer
from moe_jax.layers.noisy_routing import NoisyTopKRouter
from moe_jax.models.t5 import LogitsHead, decoder_padding_mask

_RESIDUAL_AXES = ("batch", "length", "embed")


def segment_starts(segment_ids_BL):
  """[B, L] bool: where a carry restarts (position 0 and wherever the segment id changes)."""
  first_B1 = jnp.ones_like(segment_ids_BL[:, :1], bool)
  return jnp.concatenate([first_B1, segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)


def _step(cell, carry, inputs):
  """One time step of the scan: zero the carry at a segment start, then the LSTM cell."""
  x_BD, start_B = inputs
  carry = tuple(jnp.where(start_B[:, None], 0.0, c) for c in carry)
  return cell(carry, x_BD)


# Loops over axis 1 (time) of the inputs; the cell's parameters are shared by every step.
_scan = nn.scan(_step, variable_broadcast="params", split_rngs={"params": False},
                in_axes=1, out_axes=1)


class Lstm(nn.Module):
  """A unidirectional LSTM over x_BLD whose carry restarts at each segment's first token.

  Params `cell/i{i,f,g,o}/kernel` [D_in, U] and `cell/h{i,f,g,o}/kernel` [U, U] + `bias` [U]:
      i, f, o = sigmoid(x W_i* + h W_h* + b_h*),  g = tanh(x W_ig + h W_hg + b_hg),
      c' = f * c + i * g,  h' = o * tanh(c').
  `reverse=True` reads each segment from its end (the backward half of a bidirectional LSTM).
  The carries (c, h) are float32 whatever `dtype` (the matmuls') is. `decode=True`: the first
  call creates the "cache" collection's `c` and `h` [B, U] (zeros); later calls continue from
  them and store the final carry.
  """
  features: int
  reverse: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL=None, decode: bool = False):
    batch, length, _ = x_BLD.shape
    zeros = lambda: jnp.zeros((batch, self.features), jnp.float32)
    stepping = decode and self.has_variable("cache", "c")
    if decode:
      cached = (self.variable("cache", "c", zeros), self.variable("cache", "h", zeros))
    carry = tuple(v.value for v in cached) if stepping else (zeros(), zeros())
    if self.reverse:
      x_BLD = x_BLD[:, ::-1]
      segment_ids_BL = None if segment_ids_BL is None else segment_ids_BL[:, ::-1]
    if segment_ids_BL is None or stepping:  # a step continues its sequence
      starts_BL = jnp.zeros((batch, length), bool)
    else:
      starts_BL = segment_starts(segment_ids_BL)
    cell = nn.OptimizedLSTMCell(
        self.features, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, ("embed", "mlp")),
        recurrent_kernel_init=nn.with_logical_partitioning(nn.initializers.orthogonal(),
                                                           ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), name="cell")
    carry, y_BLU = _scan(cell, carry, (x_BLD, starts_BL))
    if stepping:
      for variable, value in zip(cached, carry):
        variable.value = value
    return (y_BLU[:, ::-1] if self.reverse else y_BLU).astype(self.dtype)


@gin.configurable(module="moe_jax.models.lstm")
class LstmMoeLanguageModel(nn.Module):
  """LSTM + MoE LM (Shazeer et al. 2017, arXiv:1701.06538); float32 logits [B, L, V].

  Same interface as `SparseDecoderOnly`. Decoding (`decode=True`, `moe_jax.decoding`'s
  protocol): the first call, on full-length [B, T] inputs, creates the "cache" collection (each
  LSTM's carry, each MoE layer's `expert_fill`, the `step` count); each later call takes one
  token per sequence and needs `max_decode_length` = T. Parameters: `token_embedder`,
  `lstm_{i}` (bidirectional: and `lstm_{i}_backward`), `moe_{i}` between lstm_i and
  lstm_{i+1}, `logits_head`.
  """
  vocab_size: int = 384
  embed_dim: int = 64
  num_layers: int = 2
  moe: Optional[MoeLayer] = MoeLayer(router=NoisyTopKRouter(k=4),
                                     expert=ExpertMlp(intermediate_dim=128))
  moe_sigmoid: bool = True
  dropout_rate: float = 0.0
  bidirectional: bool = False
  logits_via_embedding: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    name = type(self).__name__
    if self.num_layers < 1:
      raise ValueError(f"{name}.num_layers must be >= 1, got {self.num_layers}")
    if self.embed_dim < 1 or (self.bidirectional and self.embed_dim % 2):
      raise ValueError(f"{name}.embed_dim must be positive (and even when bidirectional: "
                       f"two LSTMs of embed_dim / 2 units), got {self.embed_dim}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"{name}.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.moe is not None and self.num_layers > 1:
      try:  # the router refuses causal routing by name (expert choice, BPR): fail at build time
        self._moe_layer()
      except ValueError as e:
        raise ValueError(f"{name}.moe.router: {e}") from None
    super().__post_init__()

  @property
  def sparse_layers(self) -> tuple[int, ...]:
    """Indices i of the MoE layers (`moe_{i}`, after LSTM i)."""
    return () if self.moe is None else tuple(range(self.num_layers - 1))

  # Not module methods: gin re-evaluates the template's bound references (@NoisyTopKRouter())
  # when it is copied, and inside a wrapped method those would attach to this module.
  @nn.nowrap
  def _moe_layer(self) -> MoeLayer:
    """An unbound copy of the `moe` template; it routes causally unless bidirectional."""
    if self.bidirectional:
      return self.moe.copy(parent=None)
    return self.moe.copy(parent=None, router=self.moe.router.copy(parent=None, causal=True))

  @nn.nowrap
  def moe_layers(self) -> dict[str, MoeLayer]:
    """'moe_0' -> the MoeLayer template of that layer (for `models.summary`)."""
    return {f"moe_{i}": self.moe for i in self.sparse_layers}

  @nn.nowrap
  def _check_decodable(self) -> None:
    if self.bidirectional:
      raise ValueError(f"{type(self).__name__}.bidirectional=True reads every sequence in both "
                       f"directions, so it cannot decode autoregressively; decode with "
                       f"bidirectional=False")

  @nn.nowrap
  def decoding_network(self) -> "LstmMoeLanguageModel":
    """This network with one MoE routing group per sequence (see `moe_jax.decoding`)."""
    self._check_decodable()
    if self.moe is None or self.moe.sequence_groups:
      return self
    return self.clone(moe=self.moe.clone(sequence_groups=True))

  def example_batch(self, batch_size: int = 2, length: int = 8) -> dict:
    """Dummy inputs for `init` / `jax.eval_shape`."""
    return {"decoder_input_tokens": jnp.ones((batch_size, length), jnp.int32)}

  @nn.compact
  def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
               decoder_positions=None, enable_dropout: bool = False, decode: bool = False,
               max_decode_length: Optional[int] = None):
    """Logits [B, L, V]; `decode=True` steps a cache (see the class docstring)."""
    del decoder_positions  # implied by the recurrence (carries restart at segment starts)
    if decode:
      self._check_decodable()
      stepping = self.has_variable("cache", "step")
      step = self.variable("cache", "step", lambda: jnp.zeros((), jnp.int32))  # tokens decoded
      if stepping:
        if max_decode_length is None or decoder_input_tokens.shape[1] != 1:
          raise ValueError(f"decoding steps take one token [B, 1] and max_decode_length, got "
                           f"length {decoder_input_tokens.shape[1]} and "
                           f"max_decode_length={max_decode_length}")
        step.value = step.value + 1
    deterministic = not enable_dropout
    dropout = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    constrain = lambda y: nn.with_logical_constraint(y, _RESIDUAL_AXES)
    padding_BL = decoder_padding_mask(decoder_input_tokens, decoder_target_tokens,
                                      decoder_segment_ids)
    # Without packing, a backward LSTM must still not read the padding after a sequence.
    segments_BL = padding_BL.astype(jnp.int32) if decoder_segment_ids is None else (
        decoder_segment_ids)
    embedder = Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name="token_embedder")
    x_BLD = constrain(dropout(embedder(decoder_input_tokens)))
    units = self.embed_dim // 2 if self.bidirectional else self.embed_dim
    sparse = set(self.sparse_layers)
    for i in range(self.num_layers):
      y_BLD = Lstm(units, dtype=self.dtype, name=f"lstm_{i}")(x_BLD, segments_BL, decode)
      if self.bidirectional:
        backward_BLD = Lstm(units, reverse=True, dtype=self.dtype,
                            name=f"lstm_{i}_backward")(x_BLD, segments_BL)
        y_BLD = jnp.concatenate([y_BLD, backward_BLD], axis=-1)
      x_BLD = constrain(x_BLD + dropout(y_BLD))
      if i in sparse:
        decode_kw = dict(decode=True, max_decode_length=max_decode_length) if decode else {}
        moe = self._moe_layer().clone(parent=self, name=f"moe_{i}")
        y_BLD = moe(x_BLD, padding_BL, deterministic=deterministic, **decode_kw)
        if self.moe_sigmoid:
          y_BLD = nn.sigmoid(y_BLD)
        x_BLD = constrain(x_BLD + dropout(y_BLD))
    return LogitsHead(self.vocab_size, self.logits_via_embedding, self.dtype,
                      name="logits_head")(x_BLD, embedder)
