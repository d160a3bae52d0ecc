"""Dropless dispatch (moe_jax.layers.dispatch, MoeLayer.dispatch='dropless').

x [B=2, L=16, D=8], E=4 experts, one group per sequence (S=16). Dropless must equal gather
whenever gather drops nothing, and otherwise equal each token's dense mixture of its chosen
experts, recomputed in float64 numpy from the parameters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import dispatch as dispatch_lib
from moe_jax.layers import moe, noisy_routing, openblas_matmul, routing
from moe_jax.layers.experts import ExpertMlp
from tests.layers.compiler import HAS_COMPILER, NEEDS_COMPILER, OPENBLAS, without_compiler

E, D, F, B, L = 4, 8, 16, 2, 16
S = L

KERNELS = [OPENBLAS if k == "openblas" else k for k in dispatch_lib.GROUPED_MATMULS]


def _jit(f):
  """jax.jit without LLVM's optimisation passes: these programs are tiny, compiling dominates."""
  return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def _layer(router, **kwargs):
  kwargs = {"num_experts": E, "router": router, "expert": ExpertMlp(intermediate_dim=F),
            "max_group_size": S, "min_expert_capacity": 0, "dropless_block_size": 4, **kwargs}
  return moe.MoeLayer(**kwargs)


def _x(seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.RandomState(seed).normal(0, 1, (B, L, D)), dtype)


def _params(seed=0, noisy=False):
  rng = np.random.RandomState(seed)
  normal = lambda scale, *shape: jnp.asarray(rng.normal(0, scale, shape), jnp.float32)
  router = {"router_weights": {"w": {"kernel": normal(1.0, D, E)}}}
  if noisy:
    router["noise_weights"] = {"w": {"kernel": normal(0.3, D, E)}}
  return {"router": router,
          "expert": {"wi": {"kernel": normal(D**-0.5, E, D, F)},
                     "wo": {"kernel": normal(F**-0.5, E, F, D)}}}


def _apply(layer, params, x, mask=None, deterministic=True):
  """-> (y, RouterStats), the routing rng fixed so that noisy routers pick the same experts."""
  y, state = layer.apply({"params": params}, x, mask, deterministic,
                         rngs={routing.ROUTING_RNG: jax.random.key(7)}, mutable=[moe.MOE_STATS])
  return y, state[moe.MOE_STATS]["router_stats"][0]


def _ffn(params, x_D, e):
  """Expert e's ReLU FFN by hand (float64)."""
  wi = np.asarray(params["expert"]["wi"]["kernel"], np.float64)[e]
  wo = np.asarray(params["expert"]["wo"]["kernel"], np.float64)[e]
  return np.maximum(x_D @ wi, 0) @ wo


def _top_k_mixture(params, x, k, mask=None):
  """y_BLD by hand: softmax top-k routing with raw-probability gates, every choice kept."""
  x64 = np.asarray(x, np.float64)
  logits = x64 @ np.asarray(params["router"]["router_weights"]["w"]["kernel"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.zeros(x64.shape)
  for b, t in np.ndindex(B, L):
    if mask is None or mask[b, t]:
      for e in np.argsort(-probs[b, t])[:k]:
        y[b, t] += probs[b, t, e] * _ffn(params, x64[b, t], e)
  return y


ROUTERS = {
    "switch": (routing.SwitchRouter(), "windows"),
    "top2": (routing.TopKRouter(k=2), "blocks"),
    "top2_renormalize_ragged_dot": (routing.TopKRouter(k=2, renormalize=True), "ragged_dot"),
    "noisy_top2": (noisy_routing.NoisyTopKRouter(k=2), "windows"),
}


@pytest.mark.parametrize("name", ROUTERS)
def test_equals_gather_outputs_and_gradients_when_gather_drops_nothing(name):
  router, kernel = ROUTERS[name]
  noisy = name.startswith("noisy")
  # Capacity factor E: C = min(S, ceil(E * k * S / E)) = S, no expert can overflow.
  gather = _layer(router, dispatch="gather", train_capacity_factor=E, eval_capacity_factor=E)
  dropless = _layer(router, dispatch="dropless", grouped_matmul=kernel)
  params, x = _params(noisy=noisy), _x()
  cotangent = jnp.asarray(np.random.RandomState(1).normal(0, 1, (B, L, D)), jnp.float32)

  def loss_and_stats(layer):
    def loss(p, x):
      y, stats = _apply(layer, p, x, deterministic=not noisy)  # noisy: training-time noise
      return jnp.sum(y * cotangent), (y, stats)
    return _jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

  (_, (y_gather, stats_gather)), grads_gather = loss_and_stats(gather)
  (_, (y_dropless, stats_dropless)), grads_dropless = loss_and_stats(dropless)
  assert float(stats_gather.fraction_dropped) == 0.0
  assert float(stats_dropless.fraction_dropped) == 0.0
  assert np.abs(np.asarray(y_gather)).max() > 0.1
  np.testing.assert_allclose(y_dropless, y_gather, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_dropless), jax.tree.leaves(grads_gather)):
    assert np.abs(np.asarray(b)).max() > 1e-3  # every gradient is exercised
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  for field in ("load_balancing_loss", "z_loss", "expert_load_E", "router_confidence"):
    np.testing.assert_allclose(getattr(stats_dropless, field), getattr(stats_gather, field),
                               rtol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_processes_every_token_where_gather_drops(kernel):
  router = routing.TopKRouter(k=2)
  gather = _layer(router, dispatch="gather", eval_capacity_factor=0.5)  # C = 4 of S = 16
  dropless = _layer(router, dispatch="dropless", grouped_matmul=kernel, eval_capacity_factor=0.5)
  params, x = _params(seed=2), _x(seed=2)
  _, stats_gather = _jit(lambda p, x: _apply(gather, p, x))(params, x)
  y, stats = _jit(lambda p, x: _apply(dropless, p, x))(params, x)
  assert float(stats_gather.fraction_dropped) > 0.1
  assert float(stats.fraction_dropped) == 0.0
  np.testing.assert_allclose(y, _top_k_mixture(params, x, k=2), rtol=1e-4, atol=1e-5)


def test_padding_tokens_get_exactly_zero_and_real_ones_their_expert():
  layer = _layer(routing.SwitchRouter(), dispatch="dropless", eval_capacity_factor=0.25)
  params, x = _params(seed=3), _x(seed=3)
  mask = np.ones((B, L), bool)
  mask[0, :5] = False
  mask[1, -3:] = False
  y, stats = _jit(lambda p, x, m: _apply(layer, p, x, m))(params, x, jnp.asarray(mask))
  assert np.all(np.asarray(y)[~mask] == 0.0)
  np.testing.assert_allclose(y, _top_k_mixture(params, x, k=1, mask=mask), rtol=1e-4, atol=1e-5)
  assert float(stats.fraction_dropped) == 0.0
  np.testing.assert_allclose(np.sum(stats.expert_load_E), 1.0, rtol=1e-6)  # real tokens only


def test_bfloat16():
  layer = _layer(routing.TopKRouter(k=2), dispatch="dropless", dtype=jnp.bfloat16,
                 expert=ExpertMlp(intermediate_dim=F, dtype=jnp.bfloat16))
  params, x = _params(seed=4), _x(seed=4)
  y, stats = _jit(lambda p, x: _apply(layer, p, x.astype(jnp.bfloat16)))(params, x)
  assert y.dtype == jnp.bfloat16
  assert stats.load_balancing_loss.dtype == jnp.float32  # router math stays float32
  # bfloat16 inputs, weights and products: ~3 significant digits.
  expected = _top_k_mixture(params, np.asarray(x.astype(jnp.bfloat16), np.float64), k=2)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=5e-2, atol=5e-2)


def test_one_token_decoding_steps_equal_the_full_sequence():
  layer = _layer(routing.TopKRouter(k=2, causal=True), dispatch="dropless", sequence_groups=True)
  params, x = _params(seed=5), _x(seed=5)
  full, _ = _jit(lambda p, x: _apply(layer, p, x))(params, x)
  step = _jit(lambda p, x_B1D: layer.apply({"params": p}, x_B1D, decode=True,
                                              max_decode_length=L, mutable=["cache"])[0])
  for t in (0, 9):
    np.testing.assert_allclose(step(params, x[:, t:t + 1]), full[:, t:t + 1], atol=1e-6)


def test_sort_choices_by_hand():
  # One group of 3 tokens, k=2; token 1's 2nd choice is invalid. E=3, blocks of b=2 rows:
  # expert 0 gets tokens (0, 2) -> rows 0-1; expert 1 nothing; expert 2 tokens (0, 1, 2) ->
  # rows 2-4 and padding row 5. Static bound: ceil((6 + 3 * (2 - 1)) / 2) = 5 blocks.
  choices = routing.TokenChoices(
      expert_GSK=jnp.asarray([[[0, 2], [2, 1], [0, 2]]], jnp.int32),
      gate_GSK=jnp.ones((1, 3, 2)), valid_GSK=jnp.asarray([[[1, 1], [1, 0], [1, 1]]], bool),
      top1_GS=jnp.ones((1, 3)), load_balancing_loss=0.0, z_loss=0.0)
  rows = dispatch_lib.sort_choices(choices, num_experts=3, block_size=2, grouped_matmul="blocks")
  np.testing.assert_array_equal(rows.token_R, [0, 2, 0, 1, 2, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(rows.row_M, [0, 2, 3, 10, 1, 4])
  np.testing.assert_array_equal(rows.expert_N, [0, 2, 2, 3, 3])
  np.testing.assert_array_equal(rows.group_sizes_E, [2, 0, 4])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("loads, block", [
    ((13, 0, 8, 30), 4),   # 13 = 8+4+1, 8, 30 = 16+8+4+2: the remainders in masked windows
    ((0, 0, 51, 0), 4),    # every row on one expert: windows 32+16, the rest reaches back
    ((5, 3, 2, 1), 16),    # every expert below the smallest window: masked windows only
    ((20, 20, 20, 1), 64), # the smallest window is all 64 rows: one masked window each
])
@pytest.mark.parametrize("in_dim, out_dim", [(5, 3), (3, 5)])  # windows' dW masks dy / x
def test_grouped_matmul_by_hand(kernel, loads, block, in_dim, out_dim):
  """SortedRows.matmul: each row times its expert's kernel, and the VJP, for skewed loads,
  empty experts and 3 invalid items (no row), against float64 numpy."""
  rng = np.random.RandomState(sum(loads))
  expert_M = np.concatenate([np.repeat(np.arange(4), loads), [4, 4, 4]])
  rng.shuffle(expert_M)
  rows = dispatch_lib.sort_rows(jnp.asarray(expert_M, jnp.int32), num_experts=4,
                                block_size=block, grouped_matmul=kernel)
  x_MI = rng.normal(0, 1, (len(expert_M), in_dim))
  w_EIO = rng.normal(0, 1, (4, in_dim, out_dim))
  dy_MO = rng.normal(0, 1, (len(expert_M), out_dim))
  valid = expert_M < 4
  want_y = np.where(valid[:, None], np.einsum("mi,mio->mo", x_MI, w_EIO[np.minimum(expert_M, 3)]),
                    0)
  want_dx = np.where(valid[:, None], np.einsum("mo,mio->mi", dy_MO,
                                               w_EIO[np.minimum(expert_M, 3)]), 0)
  want_dw = np.stack([x_MI[expert_M == e].T @ dy_MO[expert_M == e] for e in range(4)])

  def per_item(x_MI, w_EIO):  # rows in, each item's row out (zeros for invalid items)
    x_RI = jnp.take(x_MI, rows.token_R, axis=0, mode="fill", fill_value=0)
    return jnp.take(rows.matmul(x_RI, w_EIO), rows.row_M, axis=0, mode="fill", fill_value=0)

  def y_and_grads(x_MI, w_EIO, dy_MO):
    y, vjp = jax.vjp(per_item, x_MI, w_EIO)
    return (y, *vjp(dy_MO))

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, dx, dw = _jit(y_and_grads)(f32(x_MI), f32(w_EIO), f32(dy_MO))
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start, count, want_windows", [
    (5, 60, [(1, 64)]),           # 64 - 60 <= 64 / 8: one window, reaching back to row 1
    (5, 40, [(5, 32), (37, 8)]),  # exact 32 + 8; 32 - 8 > 32 / 8: no early finish
    (5, 30, [(3, 32)]),           # 32 - 30 <= 4: one window ending at row 35
    (0, 13, [(0, 8), (5, 8)]),    # 8 exact, the 5 left in the smallest window, reaching back
    (2, 3, [(0, 8)]),             # under the smallest window: clamped at row 0, past the end
    (9, 0, []),
])
def test_cover_expert_windows(start, count, want_windows):
  """The windows one expert's rows get from sizes 8..64: each row of the expert owned by exactly
  one window, no other row, and the windows (lo, size) worked out by hand."""
  sizes = [8, 16, 32, 64]
  num_rows = 72
  max_windows = 2 * len(sizes) + 1

  def piece(carry, lo, size, keep):
    owned_R, windows_W2, n = carry
    row = jnp.arange(num_rows)
    inside = (row >= lo) & (row < lo + size)
    if keep is not None:
      inside &= jnp.zeros(num_rows, bool).at[lo + jnp.arange(size)].set(keep[:, 0])
    windows_W2 = windows_W2.at[n].set(jnp.stack([lo, size]))
    return owned_R + inside, windows_W2, n + 1

  init = (jnp.zeros(num_rows, jnp.int32), jnp.zeros((max_windows, 2), jnp.int32), jnp.int32(0))
  owned, windows, n = _jit(lambda s, c: dispatch_lib._cover_expert(s, c, sizes, piece, init))(
      jnp.int32(start), jnp.int32(count))
  row = np.arange(num_rows)
  np.testing.assert_array_equal(owned, (row >= start) & (row < start + count))
  assert [tuple(w) for w in np.asarray(windows)[:int(n)]] == want_windows


@NEEDS_COMPILER
def test_openblas_under_vmap_is_each_element_alone():
  """Three stacks of rows under jax.vmap (sizes differ per element; rows past the last get 0)."""
  rng = np.random.RandomState(9)
  x, w = rng.normal(0, 1, (3, 10, 4)), rng.normal(0, 1, (3, 2, 4, 5))
  sizes = np.asarray([[4, 6], [7, 0], [0, 2]], np.int32)
  y = _jit(jax.vmap(openblas_matmul.grouped_matmul))(jnp.asarray(x, jnp.float32),
                                                     jnp.asarray(w, jnp.float32), sizes)
  want = np.zeros((3, 10, 5))
  for b in range(3):
    start = 0
    for e, n in enumerate(sizes[b]):
      want[b, start:start + n] = x[b, start:start + n] @ w[b, e]
      start += n
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def _check_openblas_segments(x, w, dy, sizes, stride, segments):
  """The kernel's y, dx and dW against float64 numpy: rows [start, start + n) of each
  (expert, start, n) in `segments` times the expert's kernel, every other row 0."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, vjp = jax.vjp(lambda x, w: openblas_matmul.grouped_matmul(x, w, sizes, stride=stride),
                   f32(x), f32(w))
  dx, dw = vjp(f32(dy))
  want_y, want_dx = np.zeros((x.shape[0], w.shape[-1])), np.zeros(x.shape)
  want_dw = np.zeros(w.shape)
  for e, start, n in segments:
    rows = slice(start, start + n)
    want_y[rows], want_dx[rows] = x[rows] @ w[e], dy[rows] @ w[e].T
    want_dw[e] += x[rows].T @ dy[rows]
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


@NEEDS_COMPILER
def test_openblas_splits_large_experts_into_chunks():
  """Experts of 300 and 257 rows (chunks of 256 rows: forward, dx) and a [300, 1000] weight
  gradient (chunks of 262 rows of I), an empty expert in between and 43 rows past the last."""
  rng = np.random.RandomState(10)
  sizes = np.asarray([0, 300, 257, 100, 0], np.int32)
  x, w = rng.normal(0, 1, (700, 300)), rng.normal(0, 1, (5, 300, 1000))
  dy = rng.normal(0, 1, (700, 1000))
  starts = np.cumsum(sizes) - sizes
  _check_openblas_segments(x, w, dy, sizes, 0, [(e, starts[e], n) for e, n in enumerate(sizes)])


@NEEDS_COMPILER
@pytest.mark.parametrize("sizes, stride, extra_rows, in_dim, out_dim", [
    # 4 experts x 2 segments of 6 rows: full, partial, empty, over-full (clipped to 6); expert
    # 3 has no rows (dW 0); 5 rows past the last segment.
    ([6, 2, 0, 9, 3, 0, 0, 0], 6, 5, 7, 5),
    # 2 experts x 2 segments: 300 and 257 rows (chunks of 256 rows), dW in chunks of 262 rows
    # of I.
    ([300, 257, 10, 0], 300, 0, 300, 1000),
])
def test_openblas_strided_segments_by_hand(sizes, stride, extra_rows, in_dim, out_dim):
  """Capacity buffers (stride > 0), 2 segments per expert: segment s starts at row s * stride
  and only its first sizes[s] rows are multiplied (expert s // 2); every other row, whatever
  it holds, is ignored and gets zeros; dW sums an expert's segments."""
  rng = np.random.RandomState(11)
  per_expert = 2
  num_experts = len(sizes) // per_expert
  num_rows = len(sizes) * stride + extra_rows
  x, dy = rng.normal(0, 1, (num_rows, in_dim)), rng.normal(0, 1, (num_rows, out_dim))
  w = rng.normal(0, 1, (num_experts, in_dim, out_dim))
  segments = [(s // per_expert, s * stride, min(n, stride)) for s, n in enumerate(sizes)]
  _check_openblas_segments(x, w, dy, np.asarray(sizes, np.int32), stride, segments)


@NEEDS_COMPILER
def test_openblas_multiplies_bfloat16_in_float32():
  """bfloat16 rows and kernels are multiplied in float32 and only the result is rounded: the
  same bits as the float32 product of the same values, cast."""
  rng = np.random.RandomState(12)
  x = jnp.asarray(rng.normal(0, 1, (12, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(0, 1, (2, 64, 8)), jnp.bfloat16)
  sizes = np.asarray([5, 7], np.int32)
  y = openblas_matmul.grouped_matmul(x, w, sizes)
  want = openblas_matmul.grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(want.astype(jnp.bfloat16), np.float32))


def test_openblas_segments_must_be_a_multiple_of_the_experts():
  with pytest.raises(ValueError, match="3 segment sizes are not a multiple of the 2 experts"):
    openblas_matmul.grouped_matmul(jnp.zeros((6, 4)), jnp.zeros((2, 4, 5)),
                                   jnp.asarray([2, 2, 2]), stride=2)


def test_weight_window_sizes_bound_the_waste():
  # Multiples of 8, each max(last + 8, 1.25 * last rounded up to 8), capped at the rows.
  assert dispatch_lib._weight_window_sizes(100, 8) == [8, 16, 24, 32, 40, 56, 72, 96, 100]
  for num_rows, granule in ((100, 8), (4096, 8), (1000, 32), (5, 8)):
    sizes = dispatch_lib._weight_window_sizes(num_rows, granule)
    for n in range(1, num_rows + 1):  # the window an expert of n rows takes
      size = next(s for s in sizes if s >= n)
      assert size - n < n / 4 + granule, (num_rows, granule, n, size)


@pytest.mark.parametrize("num_choices, num_experts, given, kernel, want", [
    (4096, 8, None, "windows", 8),     # the defaults: 8 rows for windows, 128 for blocks
    (4096, 8, None, "blocks", 128),
    (96, 32, None, "blocks", 4),       # 3 rows per expert: the power of two >= 3
    (4096, 8, 1000, "windows", 512),   # a given size, capped the same way
    (4096, 8, 16, "blocks", 16),
    (4096, 8, None, "ragged_dot", 1),  # no padding
    (4096, 8, None, "openblas", 1),
])
def test_dropless_block_size(num_choices, num_experts, given, kernel, want):
  assert dispatch_lib.dropless_block_size(num_choices, num_experts, given, kernel) == want


@pytest.mark.parametrize("kwargs, culprit", [
    ({"router": routing.ExpertChoiceRouter()}, "ExpertChoiceRouter"),
    ({"grouped_matmul": "dense"}, r"MoeLayer\.grouped_matmul"),
    ({"dropless_block_size": 0}, r"MoeLayer\.dropless_block_size"),
])
def test_bad_config_is_refused_by_name(kwargs, culprit):
  with pytest.raises(ValueError, match=culprit):
    _layer(**{"router": routing.SwitchRouter(), "dispatch": "dropless", **kwargs})


def test_openblas_unavailable_is_refused_by_name_and_not_the_default(monkeypatch, tmp_path):
  """Without a C++ compiler the openblas kernel cannot be built: asking for it names the layer
  field and the compiler; the CPU default falls back to windows."""
  with without_compiler(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"MoeLayer\.grouped_matmul='openblas'.*no-such-compiler"):
      _layer(router=routing.SwitchRouter(), dispatch="dropless", grouped_matmul="openblas")
    assert dispatch_lib.default_grouped_matmul() == "windows"
  assert dispatch_lib.default_grouped_matmul() == ("openblas" if HAS_COMPILER else "windows")


@pytest.mark.parametrize("mesh_shape, kernel", [((2, 4, 1), "blocks"), ((1, 4, 2), "windows"),
                                                ((2, 2, 2), "ragged_dot"), ((4, 1, 2), "blocks"),
                                                pytest.param((1, 4, 2), "openblas",
                                                             marks=NEEDS_COMPILER)])
def test_expert_parallel_equals_one_device(mesh_shape, kernel):
  """On 8 devices (data, expert, model) the dropless layer, whose rows move to their expert's
  shard by explicit all-to-all, gives one device's outputs, aux losses and gradients (params
  and inputs), with expert weights split over 'expert' and their hidden dim over 'model'."""
  from moe_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  layer = _layer(routing.TopKRouter(k=2), dispatch="dropless", grouped_matmul=kernel,
                 max_group_size=4)  # 8 groups on every mesh: the same balance loss
  rng = np.random.RandomState(6)  # 8 sequences of 4 tokens: a row per group, per shard
  params, x = _params(seed=6), jnp.asarray(rng.normal(0, 1, (8, 4, D)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(8, 4)) > 0.2)

  def loss(p, x):
    y, stats = _apply(layer, p, x, mask, deterministic=False)
    return jnp.sum(y * y) + stats.load_balancing_loss, (y, stats)

  grad = lambda: jax.grad(loss, argnums=(0, 1), has_aux=True)
  (want_grads, (want_y, want_stats)) = _jit(grad())(params, x)
  mesh = partitioning.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), partitioning.axis_rules():
    specs = nn.get_partition_spec(jax.eval_shape(layer.init, jax.random.key(0), x))["params"]
    shard = lambda tree, spec: jax.device_put(tree, jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(s)), spec,
        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)))
    p_sharded = shard(params, specs)
    x_sharded = jax.device_put(x, partitioning.batch_sharding(mesh))
    step = _jit(grad())
    hlo = step.lower(p_sharded, x_sharded).compile().as_text()
    (grads, (y, stats)) = step(p_sharded, x_sharded)
  np.testing.assert_allclose(y, want_y, atol=1e-5)
  np.testing.assert_allclose(stats.load_balancing_loss, want_stats.load_balancing_loss, atol=1e-6)
  assert float(stats.fraction_dropped) == 0.0
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  # Rows travel by all-to-all over 'expert' (in and back, forward and backward); expert
  # weights never leave their shard.
  assert (hlo.count(" all-to-all(") >= 4) == (mesh.shape["expert"] > 1)
  assert " all-gather(" not in hlo
