"""Attention experts: SwitchHead and Mixture of Attention heads (MoA).

Both have `MultiHeadDotProductAttention`'s call signature and key/value cache protocol, so gin
puts them in a stack's self-attention (`SparseEncoder.self_attention` /
`SparseDecoder.self_attention`; cross-attention stays dense). Routing is per token (no capacity,
no token competes with another), so a decoder's outputs at position i never depend on later
tokens and one-token decoding steps equal the full-length call.

SwitchHead (Csordas, Piekos, Irie, Schmidhuber 2023, arXiv:2312.07987, sec. 3), per head h of N,
with E value experts and E output experts and non-competitive sigmoid selection:

    s_src = sigmoid(x_j W_src^h),  s_dst = sigmoid(x_i W_dst^h)          [E] each
    V_j^h = sum_{e in topk(s_src)} s_src[e] x_j W_V^{h,e}          (key/value token j)
    y_i   = sum_h sum_{e in topk(s_dst)} s_dst[e] (A^h V^h)_i W_O^{h,e}   (query token i)

Queries and keys are dense; gates are the chosen sigmoids, not renormalised. The paper adds no
balance regulariser (its released sweeps set the entropy regulariser to 0), so the layer's
load-balancing loss is 0. Defaults E=5, k=3 are the authors' WikiText-103 config (2 heads).

MoA (Zhang et al. 2022, arXiv:2210.05144, sec. 3): E attention experts, each with its own query
W_q^e [D, H] and output W_o^e [H, D]; key and value projections [D, H] are shared, so the cache
holds one head's K and V. Per query token t: p = softmax(x_t W_g); the top-k experts G_t;
w_e = p_e / sum_{G_t} p (renormalised); y_t = sum_{e in G_t} w_e softmax(q_t^e K^T) V W_o^e.
Aux losses (sec. 3.3): load balance E * sum_e f_e P_e (f_e: fraction of the k * T choices that
go to e, P_e: mean router probability over the T real tokens of the batch; 1 when balanced)
and router z-loss mean_t logsumexp(x_t W_g)^2.

Both follow T5's convention of no 1/sqrt(H) in the logits (folded into the query init), so
E = 1 reduces to `MultiHeadDotProductAttention` (tested). Implementation note: the projections
are computed for all E experts and the unchosen ones get gate 0 (exact, jit-friendly, but E/k
times the paper's projection FLOPs); the attention itself runs only for the chosen MoA heads.
Expert weights carry the logical axis "unmodeled" (replicated): the mesh's 'expert' devices
do data parallelism for attention, and E need not divide the mesh.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.layers import routing
from moe_jax.layers.attention import _NEG_INF, _Projection, _projection_init
from moe_jax.layers.moe import MOE_STATS


def _init(in_axis, out_axis, batch_axis=(), scale=1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=batch_axis)


def _real_tokens(bias_BNLM, batch, length):
  """[B, L] real tokens of a self-attention call: a token is real iff it may attend to itself
  (its diagonal bias entry is not masked); all True when L != M (decoding steps)."""
  if bias_BNLM.shape[-1] != length:
    return jnp.ones((batch, length), bool)
  diag_BL = jnp.diagonal(bias_BNLM[:, 0], axis1=-2, axis2=-1)
  return jnp.broadcast_to(diag_BL > 0.5 * _NEG_INF, (batch, length))


def _top_k_gates(scores_XE, k):
  """Dense [..., E] gates: the k largest scores kept at their experts, 0 elsewhere; + indices."""
  top_XK, expert_XK = routing.top_k_experts(scores_XE, k)
  one_hot_XKE = jax.nn.one_hot(expert_XK, scores_XE.shape[-1], dtype=scores_XE.dtype)
  return jnp.einsum("...K,...KE->...E", top_XK, one_hot_XKE), top_XK, expert_XK


def _expert_load(expert_XK, num_experts, mask_X):
  """[E] fraction of the (real) k-choices that go to each expert."""
  load_XE = jnp.sum(jax.nn.one_hot(expert_XK, num_experts), axis=-2) / expert_XK.shape[-1]
  mask = jnp.broadcast_to(mask_X[..., None], load_XE.shape).astype(jnp.float32)
  axes = tuple(range(load_XE.ndim - 1))
  return jnp.sum(load_XE * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


class _AttentionExperts(nn.Module):
  """Fields, checks and the key/value cache shared by the two attention-expert layers."""
  head_dim: int = 64
  num_experts: int = 8
  k: int = 2
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  float32_logits: bool = True

  # Parameters holding a leading-or-second expert axis (summary: k / E of them are active).
  EXPERT_PARAMS: ClassVar[tuple[str, ...]] = ()
  HAS_BALANCE_LOSS: ClassVar[bool] = True

  def __post_init__(self):
    name = type(self).__name__
    for field in ("head_dim", "num_experts", "k"):
      if getattr(self, field) < 1:
        raise ValueError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
    if self.k > self.num_experts:
      raise ValueError(f"{name}.k={self.k} exceeds {name}.num_experts={self.num_experts}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"{name}.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    super().__post_init__()

  def _cache(self, k_BM, v_BM, decode, decode_position):
    """T5X cache: a full-length call creates zeros; a step writes its token at
    decode_position and returns every cached position (the bias masks unwritten ones)."""
    if not decode:
      return k_BM, v_BM
    stepping = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros_like, k_BM)
    cached_value = self.variable("cache", "cached_value", jnp.zeros_like, v_BM)
    if not stepping:
      return k_BM, v_BM
    if decode_position is None:
      raise ValueError(f"{type(self).__name__}: decoding steps need decode_position")
    start = (0, decode_position) + (0,) * (k_BM.ndim - 2)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_BM, start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_BM, start)
    return cached_key.value, cached_value.value

  def _softmax(self, logits, deterministic):
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    return nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)


class SigmoidSelection(nn.Module):
  """SwitchHead's per-head non-competitive selection (Csordas et al. 2023, sec. 3), float32.

  gates [..., N, E] = sigmoid(x W) at each head's k largest scores, 0 elsewhere (no
  renormalisation); also the top-1 score [..., N] and the choices [..., N, K]. Param `kernel`
  [D, N, E].
  """
  num_heads: int
  num_experts: int
  k: int

  @nn.compact
  def __call__(self, x_XD):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(_init(0, (1, 2)), ("embed", "heads", "unmodeled")),
        (x_XD.shape[-1], self.num_heads, self.num_experts), jnp.float32)
    scores_XNE = jax.nn.sigmoid(jnp.einsum("...D,DNE->...NE", x_XD.astype(jnp.float32), kernel))
    gate_XNE, top_XNK, expert_XNK = _top_k_gates(scores_XNE, self.k)
    return gate_XNE, top_XNK[..., 0], expert_XNK


@gin.configurable(module="moe_jax.layers.attention_experts")
class SwitchHeadAttention(_AttentionExperts):
  """SwitchHead (Csordas et al. 2023, arXiv:2312.07987): per-head value and output experts.

  Params: `query`, `key` [D, N, H] (dense); `value` [N, E, D, H]; `out` [N, E, H, D];
  `value_selection/kernel`, `out_selection/kernel` [D, N, E] (float32). The cache holds keys and the
  expert-mixed values [B, M, N, H] (values depend only on their own token's selection).

  RouterStats: load_balancing_loss = 0 and z_loss = 0 (the paper uses no regulariser; sigmoid
  selection has no partition function); fraction_dropped = 0 (no capacity); expert_load_E:
  fraction of the k choices per (token, head, side) that pick expert index e, averaged over
  heads and the value and output sides; router_confidence: mean top-1 sigmoid score.
  """
  num_heads: int = 2
  num_experts: int = 5
  k: int = 3

  EXPERT_PARAMS: ClassVar[tuple[str, ...]] = ("value", "out")
  HAS_BALANCE_LOSS: ClassVar[bool] = False

  def __post_init__(self):
    if self.num_heads < 1:
      raise ValueError(f"SwitchHeadAttention.num_heads must be >= 1, got {self.num_heads}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_q_BLD, x_kv_BMD, bias_BNLM, deterministic: bool = True, *,
               decode: bool = False, decode_position=None):
    (batch, length, d_model), heads = x_q_BLD.shape, (self.num_heads, self.head_dim)
    if bias_BNLM.shape[1] not in (1, self.num_heads):
      raise ValueError(f"SwitchHeadAttention.num_heads={self.num_heads} differs from the "
                       f"stack's attention bias heads ({bias_BNLM.shape[1]}): bind the stack's "
                       f"num_heads to the same value")
    in_init = _projection_init(0, (1, 2))
    query_init = lambda *a: in_init(*a) / np.sqrt(self.head_dim)
    dense = lambda name, init: _Projection((d_model,), heads, ("embed", "heads", "kv"), init,
                                           self.dtype, name=name)
    q_BLNH = dense("query", query_init)(x_q_BLD)
    k_BMNH = dense("key", in_init)(x_kv_BMD)

    # Source side: each key/value token's own selection mixes its value experts.
    src_BMNE, src_top1_BMN, src_BMNK = SigmoidSelection(
        self.num_heads, self.num_experts, self.k, name="value_selection")(x_kv_BMD)
    w_v = self.param("value", nn.with_logical_partitioning(
        _init(2, 3, (0, 1)), ("heads", "unmodeled", "embed", "kv")),
        (self.num_heads, self.num_experts, d_model, self.head_dim), jnp.float32)
    v_BMNEH = jnp.einsum("BMD,NEDH->BMNEH", x_kv_BMD.astype(self.dtype), w_v.astype(self.dtype))
    v_BMNH = jnp.einsum("BMNE,BMNEH->BMNH", src_BMNE.astype(self.dtype), v_BMNEH)
    k_BMNH, v_BMNH = self._cache(k_BMNH, v_BMNH, decode, decode_position)

    q_BLNH = nn.with_logical_constraint(q_BLNH, ("batch", "length", "heads", "kv"))
    if self.float32_logits:
      q_BLNH, k_BMNH = q_BLNH.astype(jnp.float32), k_BMNH.astype(jnp.float32)
    logits_BNLM = jnp.einsum("BLNH,BMNH->BNLM", q_BLNH, k_BMNH) + bias_BNLM.astype(q_BLNH.dtype)
    weights_BNLM = self._softmax(logits_BNLM, deterministic)
    out_BLNH = jnp.einsum("BNLM,BMNH->BLNH", weights_BNLM, v_BMNH)

    # Destination side: the query token's selection mixes its output experts.
    dst_BLNE, dst_top1_BLN, dst_BLNK = SigmoidSelection(
        self.num_heads, self.num_experts, self.k, name="out_selection")(x_q_BLD)
    w_o = self.param("out", nn.with_logical_partitioning(
        _init((0, 2), 3, (1,)), ("heads", "unmodeled", "kv", "embed")),
        (self.num_heads, self.num_experts, self.head_dim, d_model), jnp.float32)
    out_BLNEH = dst_BLNE.astype(self.dtype)[..., None] * out_BLNH[:, :, :, None, :]
    y_BLD = jnp.einsum("BLNEH,NEHD->BLD", out_BLNEH, w_o.astype(self.dtype))

    real_BL = _real_tokens(bias_BNLM, batch, length)
    real_BM = real_BL if x_kv_BMD.shape[1] == length else jnp.ones(x_kv_BMD.shape[:2], bool)
    load_E = 0.5 * (_expert_load(src_BMNK, self.num_experts, real_BM[..., None])
                    + _expert_load(dst_BLNK, self.num_experts, real_BL[..., None]))
    confidence = 0.5 * (routing._token_mean(src_top1_BMN, real_BM)
                        + routing._token_mean(dst_top1_BLN, real_BL))
    zero = jnp.zeros((), jnp.float32)
    self.sow(MOE_STATS, "router_stats", routing.RouterStats(
        load_balancing_loss=zero, z_loss=zero, fraction_dropped=zero, expert_load_E=load_E,
        router_confidence=jnp.mean(confidence)))
    return y_BLD.astype(self.dtype)


@gin.configurable(module="moe_jax.layers.attention_experts")
class MoaAttention(_AttentionExperts):
  """Mixture of Attention heads (Zhang et al. 2022, arXiv:2210.05144): k of E heads per token.

  Params: `router/w/kernel` [D, E] (float32); `query` [E, D, H]; `key`, `value` [D, H] (shared);
  `out` [E, H, D]. The cache holds the shared keys and values [B, M, H]. A relative position
  bias with one head per expert (the stack's num_heads = num_experts) gives expert e head e's
  bias; a one-head bias (no relative positions) applies to all.

  RouterStats: load_balancing_loss = MoA's E * sum_e f_e P_e over the batch's real tokens
  (1 when balanced; see the module doc); z_loss = router z-loss; fraction_dropped = 0 (no
  capacity); expert_load_E = f_e; router_confidence = mean top-1 router probability.
  `renormalize=True` is the paper's eq. (renormalised top-k gates); the released code leaves
  the raw probabilities (`False`).
  """
  renormalize: bool = True
  router_init: Any = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")

  EXPERT_PARAMS: ClassVar[tuple[str, ...]] = ("query", "out")

  @nn.compact
  def __call__(self, x_q_BLD, x_kv_BMD, bias_BNLM, deterministic: bool = True, *,
               decode: bool = False, decode_position=None):
    (batch, length, d_model), num_experts = x_q_BLD.shape, self.num_experts
    if bias_BNLM.shape[1] not in (1, num_experts):
      raise ValueError(f"MoaAttention.num_experts={num_experts}: the stack's attention bias "
                       f"has {bias_BNLM.shape[1]} heads; bind the stack's num_heads to "
                       f"num_experts so each expert has its own relative position bias")
    logits_BLE = routing.RouterWeights(self.router_init, name="router")(x_q_BLD, num_experts)
    probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
    top_BLK, expert_BLK = routing.top_k_experts(probs_BLE, self.k)
    gate_BLK = top_BLK / jnp.sum(top_BLK, -1, keepdims=True) if self.renormalize else top_BLK

    w_q = self.param("query", nn.with_logical_partitioning(
        lambda *a: _init(1, 2, (0,))(*a) / np.sqrt(self.head_dim), ("unmodeled", "embed", "kv")),
        (num_experts, d_model, self.head_dim), jnp.float32)
    q_BLEH = jnp.einsum("BLD,EDH->BLEH", x_q_BLD.astype(self.dtype), w_q.astype(self.dtype))
    q_BLKH = jnp.take_along_axis(q_BLEH, expert_BLK[..., None], axis=2)
    shared = lambda name: _Projection((d_model,), (self.head_dim,), ("embed", "kv"),
                                      _projection_init(0, 1), self.dtype, name=name)(x_kv_BMD)
    k_BMH, v_BMH = self._cache(shared("key"), shared("value"), decode, decode_position)

    if self.float32_logits:
      q_BLKH, k_BMH = q_BLKH.astype(jnp.float32), k_BMH.astype(jnp.float32)
    mem = k_BMH.shape[1]
    if bias_BNLM.shape[1] == 1:
      bias_BLKM = bias_BNLM[:, 0, :, None, :]
    else:  # each chosen head takes its expert's row of the bias
      bias_BLEM = jnp.broadcast_to(bias_BNLM.swapaxes(1, 2), (batch, length, num_experts, mem))
      bias_BLKM = jnp.take_along_axis(bias_BLEM, expert_BLK[..., None], axis=2)
    logits_BLKM = jnp.einsum("BLKH,BMH->BLKM", q_BLKH, k_BMH) + bias_BLKM.astype(q_BLKH.dtype)
    weights_BLKM = self._softmax(logits_BLKM, deterministic)
    out_BLKH = jnp.einsum("BLKM,BMH->BLKH", weights_BLKM, v_BMH)

    # Gate-weighted outputs scattered to their experts, then each expert's output projection.
    combine_BLKE = (jax.nn.one_hot(expert_BLK, num_experts, dtype=jnp.float32)
                    * gate_BLK[..., None]).astype(self.dtype)
    out_BLEH = jnp.einsum("BLKE,BLKH->BLEH", combine_BLKE, out_BLKH)
    w_o = self.param("out", nn.with_logical_partitioning(
        _init(1, 2, (0,)), ("unmodeled", "kv", "embed")),
        (num_experts, self.head_dim, d_model), jnp.float32)
    y_BLD = jnp.einsum("BLEH,EHD->BLD", out_BLEH, w_o.astype(self.dtype))

    # Balance and z-loss over the batch's real tokens as one group (MoA's batch statistics).
    real_1T = _real_tokens(bias_BNLM, batch, length).reshape(1, -1)
    flat = lambda v: v.reshape((1, batch * length) + v.shape[2:])
    balance = routing.load_balancing_loss(flat(probs_BLE), flat(expert_BLK), real_1T) / self.k
    self.sow(MOE_STATS, "router_stats", routing.RouterStats(
        load_balancing_loss=balance,
        z_loss=routing.router_z_loss(flat(logits_BLE), real_1T),
        fraction_dropped=jnp.zeros((), jnp.float32),
        expert_load_E=_expert_load(flat(expert_BLK), num_experts, real_1T),
        router_confidence=routing._token_mean(flat(top_BLK[..., 0]), real_1T)))
    return y_BLD.astype(self.dtype)
