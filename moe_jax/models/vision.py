"""MoE image classifiers: a ViT with MoE MLPs (V-MoE) and an LSTM over image rows with an MoE.

Both read the image tasks' features (`moe_jax.data.images`), so the T5 trainer, eval and
infer serve them unchanged: `encoder_input_tokens` [B, H*W*C] holds each pixel's 8-bit
intensity + 1 (row-major over H, W, C; 0 is padding), rebuilt here as floats in [-1, 1]; the
label is `decoder_target_tokens` [B, 1] = class + 1. They return float32 logits [B, T, V] with
V = num_classes + 1 and T the decoder length (1), the same at every position. Entry 0 stands
for the padding token, never a class: its logit is fixed at -1e10, so the argmax is always a
class and the trainer's token accuracy is the classification accuracy.

MoE layers are the `moe` template (a `MoeLayer` with any router, or a `SoftMoE`); their aux
losses leave through the one `MOE_STATS` path as in the T5 stacks. Both encoders expose
`sparse_layers` and keep MoE params at `encoder/layers_<i>/mlp/`, as the T5 stacks do, so
`summary` and the mesh checks treat them alike.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import gin
import jax.numpy as jnp

from moe_jax.layers.dense import MlpBlock, default_kernel_init
from moe_jax.layers.normalization import RMSNorm
from moe_jax.models.lstm import Lstm
from moe_jax.models.t5 import MoeLayout, TransformerLayer, sparse_layer_indices

PAD_CLASS_LOGIT = -1e10  # logit of token 0 (padding): finite, so padded targets give 0 * finite
POOLINGS = ("mean", "token")
READOUTS = ("last", "mean")


def images_from_tokens(tokens_BL, image_shape: Sequence[int], owner: str):
  """Pixel tokens [B, H*W*C] (intensity + 1) -> float32 images [B, H, W, C] in [-1, 1]."""
  height, width, channels = image_shape
  if tokens_BL.shape[1] != height * width * channels:
    raise ValueError(
        f"{owner}.image_shape={tuple(image_shape)} needs encoder_input_tokens of length "
        f"{height * width * channels}, got {tokens_BL.shape[1]}: set TASK_FEATURE_LENGTHS="
        f"{{'inputs': {height * width * channels}, 'targets': 1}} (an image fills its row, so "
        f"packing never joins two)")
  pixels = (tokens_BL.astype(jnp.float32) - 1.0) / 255.0
  return (2.0 * pixels - 1.0).reshape(tokens_BL.shape[0], height, width, channels)


class _Classifier(nn.Module):
  """What both classifiers share: image checks, example batch, the head and the pad class."""
  image_shape: Sequence[int] = (8, 8, 1)
  num_classes: int = 10
  dtype: Any = jnp.float32

  # Evaluated by argmax of the logits, not by decoding (moe_jax.inference reads this).
  is_classifier: ClassVar[bool] = True

  def __post_init__(self):
    name = type(self).__name__
    shape = tuple(self.image_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
      raise ValueError(f"{name}.image_shape must be 3 positive ints (H, W, C), got {shape}")
    if self.num_classes < 1:
      raise ValueError(f"{name}.num_classes must be >= 1, got {self.num_classes}")
    super().__post_init__()

  def example_batch(self, batch_size: int = 2, length: int = 8) -> dict:
    """Dummy inputs for `init` / `jax.eval_shape`; an image's length is H*W*C, not `length`."""
    del length
    pixels = math.prod(self.image_shape)
    return {"encoder_input_tokens": jnp.ones((batch_size, pixels), jnp.int32),
            "decoder_input_tokens": jnp.ones((batch_size, 1), jnp.int32)}

  def logits(self, features_BD, decoder_input_tokens):
    """Class scores [B, T, V]: a linear head behind the fixed pad logit.

    The head is not zero-initialised (ViT's choice): Adafactor, the default optimizer, scales
    each update by the parameter's RMS, so a zero kernel would barely move."""
    scores_BK = nn.DenseGeneral(
        self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, ("embed", "unmodeled")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("unmodeled",)),
        name="head")(features_BD.astype(jnp.float32))
    pad_B1 = jnp.full(scores_BK.shape[:1] + (1,), PAD_CLASS_LOGIT, jnp.float32)
    logits_BV = jnp.concatenate([pad_B1, scores_BK], axis=-1)
    length = 1 if decoder_input_tokens is None else decoder_input_tokens.shape[1]
    logits_BTV = jnp.broadcast_to(logits_BV[:, None], (logits_BV.shape[0], length,
                                                       logits_BV.shape[-1]))
    return nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))


@gin.configurable(module="moe_jax.models.vision")
class VisionEncoder(nn.Module):
  """Pre-norm transformer blocks over patches (T5 blocks, no position bias) + final RMSNorm.

  The FFN of the blocks at `sparse_layout` is the `moe` template: V-MoE (Riquelme et al. 2021,
  arXiv:2106.05974) puts MoE layers in every other block ending with the last
  (MoeLayout.MIXED, num_sparse_layers = num_layers / 2) or in the last ones (TOP).
  """
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 16
  mlp: nn.Module = MlpBlock()
  moe: Optional[nn.Module] = None  # a MoeLayer or a SoftMoE
  num_sparse_layers: int = 0
  sparse_layout: MoeLayout | Sequence[int] = MoeLayout.MIXED
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    sparse_layer_indices(self.num_layers, self.num_sparse_layers, self.sparse_layout,
                         "VisionEncoder")
    if self.num_sparse_layers and self.moe is None:
      raise ValueError(f"VisionEncoder.moe must be set when num_sparse_layers="
                       f"{self.num_sparse_layers}")
    super().__post_init__()

  @property
  def sparse_layers(self) -> tuple[int, ...]:
    return sparse_layer_indices(self.num_layers, self.num_sparse_layers, self.sparse_layout)

  # Outside the wrapped methods, like _SparseStack._moe_layer: gin re-evaluates the
  # template's references (@SwitchRouter()) on copy, and they must not attach to this module.
  @nn.nowrap
  def _ffn(self, sparse: bool) -> nn.Module:
    return (self.moe if sparse else self.mlp).copy(parent=None)

  @nn.compact
  def __call__(self, x_BLD, deterministic: bool = True):
    length = x_BLD.shape[1]
    no_bias = jnp.zeros((1, 1, length, length), jnp.float32)  # every patch sees every patch
    x_BLD = nn.with_logical_constraint(x_BLD.astype(self.dtype), ("batch", "length", "embed"))
    sparse = set(self.sparse_layers)
    for i in range(self.num_layers):
      x_BLD = TransformerLayer(self.num_heads, self.head_dim, self._ffn(i in sparse),
                               dropout_rate=self.dropout_rate, dtype=self.dtype,
                               name=f"layers_{i}")(x_BLD, no_bias, None,
                                                   deterministic=deterministic)
    return RMSNorm(dtype=self.dtype, name="encoder_norm")(x_BLD)


@gin.configurable(module="moe_jax.models.vision")
class VisionMoeClassifier(_Classifier):
  """ViT (Dosovitskiy et al. 2020, arXiv:2010.11929) with V-MoE layers (Riquelme et al. 2021).

  Non-overlapping `patch_size` patches -> linear embedding (+ bias) -> + learned position
  embeddings (N(0, 0.02)) -> `encoder` -> pooling -> linear head. `pooling="mean"`: the mean of
  the patch outputs (V-MoE's GAP head); `"token"`: a learned class token (zeros at init, ViT's)
  is prepended and its output read. Both are invariant to permuting the patches when the
  position embeddings are zero and no MoE layer drops a token.
  """
  patch_size: int = 2
  embed_dim: int = 64
  encoder: VisionEncoder = VisionEncoder()
  pooling: str = "mean"

  def __post_init__(self):
    height, width = tuple(self.image_shape)[:2]
    if self.patch_size < 1 or height % self.patch_size or width % self.patch_size:
      raise ValueError(f"VisionMoeClassifier.patch_size={self.patch_size} must divide the "
                       f"image height and width {tuple(self.image_shape)[:2]}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"VisionMoeClassifier.pooling must be one of {POOLINGS}, "
                       f"got {self.pooling!r}")
    super().__post_init__()

  def patches(self, images_BHWC):
    """[B, H, W, C] -> [B, P, p*p*C], patches in row-major order, pixels (row, col, chan)."""
    batch, height, width, channels = images_BHWC.shape
    p = self.patch_size
    x = images_BHWC.reshape(batch, height // p, p, width // p, p, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, (height // p) * (width // p), -1)

  @nn.compact
  def __call__(self, encoder_input_tokens, decoder_input_tokens=None,
               enable_dropout: bool = False):
    images = images_from_tokens(encoder_input_tokens, self.image_shape, "VisionMoeClassifier")
    x_BPD = nn.DenseGeneral(
        self.embed_dim, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(default_kernel_init, ("unmodeled", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="patch_embedding")(self.patches(images).astype(self.dtype))
    if self.pooling == "token":
      token_D = self.param("class_token", nn.with_logical_partitioning(
          nn.initializers.zeros, ("embed",)), (self.embed_dim,), jnp.float32)
      x_BPD = jnp.concatenate(
          [jnp.broadcast_to(token_D.astype(x_BPD.dtype), (x_BPD.shape[0], 1, self.embed_dim)),
           x_BPD], axis=1)
    position_LD = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("length", "embed")), x_BPD.shape[1:], jnp.float32)
    y_BLD = self.encoder(x_BPD + position_LD.astype(x_BPD.dtype),
                         deterministic=not enable_dropout)
    features_BD = y_BLD[:, 0] if self.pooling == "token" else jnp.mean(
        y_BLD.astype(jnp.float32), axis=1)
    return self.logits(features_BD, decoder_input_tokens)


class _ResidualFfn(nn.Module):
  """x + ffn(RMSNorm(x)): a pre-norm residual FFN (here the MoE between the LSTMs)."""
  mlp: nn.Module
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BLD, deterministic: bool = True):
    h = RMSNorm(dtype=self.dtype, name="pre_mlp_layer_norm")(x_BLD)
    return x_BLD + self.mlp(h, None, deterministic=deterministic)


@gin.configurable(module="moe_jax.models.vision")
class LstmRowsEncoder(nn.Module):
  """LSTM (layers_0) -> residual MoE (layers_1) -> LSTM (layers_2) over a sequence of rows.

  The LSTM-MoE-LSTM sandwich of Shazeer et al. 2017 (arXiv:1701.06538, sec. 5.1), with
  `moe_jax.models.lstm.Lstm` layers; with `lstm_after_moe=False` the MoE outputs are the
  features.
  """
  hidden_dim: int = 64
  moe: Optional[nn.Module] = None  # a MoeLayer or a SoftMoE
  lstm_after_moe: bool = True
  dtype: Any = jnp.float32

  sparse_layers: ClassVar[tuple[int, ...]] = (1,)
  num_sparse_layers: ClassVar[int] = 1

  def __post_init__(self):
    if self.moe is None:
      raise ValueError("LstmRowsEncoder.moe must be set (a MoeLayer or SoftMoE template)")
    if self.hidden_dim < 1:
      raise ValueError(f"LstmRowsEncoder.hidden_dim must be >= 1, got {self.hidden_dim}")
    super().__post_init__()

  @nn.nowrap
  def _moe(self) -> nn.Module:
    return self.moe.copy(parent=None)  # outside wrapped methods: see VisionEncoder._ffn

  @nn.compact
  def __call__(self, x_BLR, deterministic: bool = True):
    """Rows [B, L, R] -> [B, L, hidden_dim]."""
    x_BLD = Lstm(self.hidden_dim, dtype=self.dtype, name="layers_0")(x_BLR)
    x_BLD = _ResidualFfn(self._moe(), self.dtype, name="layers_1")(
        x_BLD, deterministic=deterministic)
    if not self.lstm_after_moe:
      return x_BLD
    return Lstm(self.hidden_dim, dtype=self.dtype, name="layers_2")(x_BLD)


@gin.configurable(module="moe_jax.models.vision")
class LstmRowsMoeClassifier(_Classifier):
  """An LSTM reads the image row by row (one time step per row of W*C pixels), an MoE sits on
  its outputs, and a linear head reads the last step (`readout="last"`) or the mean over rows."""
  encoder: Optional[LstmRowsEncoder] = None
  readout: str = "last"

  def __post_init__(self):
    if self.encoder is None:
      raise ValueError("LstmRowsMoeClassifier.encoder must be set, e.g. @LstmRowsEncoder()")
    if self.readout not in READOUTS:
      raise ValueError(f"LstmRowsMoeClassifier.readout must be one of {READOUTS}, "
                       f"got {self.readout!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, encoder_input_tokens, decoder_input_tokens=None,
               enable_dropout: bool = False):
    images = images_from_tokens(encoder_input_tokens, self.image_shape, "LstmRowsMoeClassifier")
    rows_BLR = images.reshape(images.shape[0], images.shape[1], -1)
    y_BLD = self.encoder(rows_BLR, deterministic=not enable_dropout)
    features_BD = y_BLD[:, -1] if self.readout == "last" else jnp.mean(
        y_BLD.astype(jnp.float32), axis=1)
    return self.logits(features_BD, decoder_input_tokens)
