"""Scanned stacks and remat (moe_jax.models.scan): the unrolled model's numbers, decoding,
layouts, the parameter name map, and a Switch-Large train step compiled ahead of time."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decoding, gin_utils, objectives
from moe_jax.layers.dense import MlpBlock
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MoeLayer
from moe_jax.layers.routing import SwitchRouter
from moe_jax.models import build_network, scan
from moe_jax.models.decoder_only import SparseDecoderOnly
from moe_jax.models.summary import param_table, summarize
from moe_jax.models.t5 import (MoeLayout, SparseDecoder, SparseEncoder, SparseEncoderDecoder)
from moe_jax.train import checkpoints, optimizers, partitioning, steps

D, F, HEADS, HEAD_DIM, V = 16, 32, 2, 8, 40
# These programs are tiny: skip LLVM's optimisation passes, compiling dominates.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_jit = functools.partial(jax.jit, compiler_options=_FAST)


def _stack(cls, scan_layers, remat_policy="none", num_layers=4, num_sparse_layers=2, **kw):
  # Capacity factor 1: some tokens are dropped, so fraction_dropped is exercised too.
  moe = MoeLayer(num_experts=4, router=SwitchRouter(), expert=ExpertMlp(intermediate_dim=F),
                 train_capacity_factor=1.0, eval_capacity_factor=1.0, min_expert_capacity=1)
  kw.setdefault("mlp", MlpBlock(intermediate_dim=F))
  return cls(num_layers=num_layers, num_sparse_layers=num_sparse_layers, num_heads=HEADS,
             head_dim=HEAD_DIM, moe=moe, scan_layers=scan_layers, remat_policy=remat_policy,
             **kw)


def _encdec(scan_layers, **kw):
  # Encoder MIXED (layers 1, 3 sparse: a [dense, sparse] block scanned twice); decoder: two
  # sparse layers (period 1).
  return SparseEncoderDecoder(
      vocab_size=V, embed_dim=D, encoder=_stack(SparseEncoder, scan_layers, **kw),
      decoder=_stack(SparseDecoder, scan_layers, num_layers=2, num_sparse_layers=2, **kw))


def _decoder_only(scan_layers, **kw):
  return SparseDecoderOnly(vocab_size=V, embed_dim=D,
                           decoder=_stack(SparseDecoder, scan_layers, **kw))


def _batch(network, seed=3):
  tokens = jax.random.randint(jax.random.key(seed), (2, 8), 1, V)
  return {k: tokens for k in network.example_batch()} | {"decoder_target_tokens": tokens}


def _pair(build, **kw):
  """(unrolled net, scanned net, unrolled params, the same params in the scanned layout)."""
  unrolled, scanned = build(False, **kw), build(True, **kw)
  batch = unrolled.example_batch()
  params = nn.unbox(_jit(unrolled.init)(jax.random.key(0), **batch))["params"]
  abstract = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), **batch))["params"]
  return unrolled, scanned, params, scan.match_layout(params, abstract)


@pytest.fixture(scope="module")
def encdec():
  return _pair(_encdec)


@pytest.fixture(scope="module")
def decoder_only():
  return _pair(_decoder_only)


def _loss_and_grads(network, params, batch):
  fn = lambda p: objectives.compute_loss(network, p, batch)
  return _jit(jax.value_and_grad(fn, has_aux=True))(params)


@functools.partial(_jit, static_argnums=0)
def _logits_loss_and_grads(network, params, batch):
  """One compilation per network: logits, (loss, terms) and the loss gradients."""
  logits = network.apply({"params": params}, **objectives.model_inputs(network, batch))
  fn = lambda p: objectives.compute_loss(network, p, batch)
  return logits, jax.value_and_grad(fn, has_aux=True)(params)


def _close(a, b, tol=2e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("name", ["encdec", "decoder_only"])
def test_scan_equals_unrolled(name, request):
  unrolled, scanned, params, scanned_params = request.getfixturevalue(name)
  stack = "encoder" if "encoder" in params else "decoder"  # the MIXED one
  assert "layers_1" not in scanned_params[stack]
  assert scanned_params[stack]["layers"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"].shape \
      == (2, 4, F, D)  # [num_layers / period, E, F, D]
  batch = _batch(unrolled)
  logits, ((loss, terms), grads) = _logits_loss_and_grads(unrolled, params, batch)
  scan_logits, ((scan_loss, scan_terms), scan_grads) = _logits_loss_and_grads(
      scanned, scanned_params, batch)
  _close(scan_logits, logits)
  # Same aux losses and per-layer metrics, under the unrolled names.
  assert sorted(scan_terms) == sorted(terms)
  assert not np.allclose(terms[f"expert_load/{stack}/layers_1/mlp"],
                         terms[f"expert_load/{stack}/layers_3/mlp"])
  assert terms["aux_loss"] > 0 and terms["fraction_dropped"] > 0
  _close(scan_terms, terms)
  np.testing.assert_allclose(scan_loss, loss, rtol=2e-6)
  _close(scan.unstack_layers(scan_grads), grads, 1e-4)


@pytest.fixture(scope="module")
def remat_case():
  """A 2-layer decoder-only LM (both layers sparse: period 1) and its loss gradients."""
  net = _decoder_only(True, num_layers=2)
  batch = _batch(net)
  params = nn.unbox(_jit(net.init)(jax.random.key(1), **net.example_batch()))["params"]
  return batch, params, _loss_and_grads(net, params, batch)[1]


def _loss_fn(policy, scan_layers, batch):
  net = _decoder_only(scan_layers, num_layers=2, remat_policy=policy)
  return lambda p: objectives.compute_loss(net, p, batch)[0]


def _has_remat(loss, params) -> bool:
  jaxpr = str(jax.make_jaxpr(loss)(params))
  return "checkpoint" in jaxpr or "remat" in jaxpr


def test_remat_policies_are_applied(remat_case):
  """Tracing only: every policy but "none" puts the layers under jax.checkpoint."""
  batch, params, _ = remat_case
  assert not _has_remat(_loss_fn("none", True, batch), params)
  for policy in set(scan.REMAT_POLICIES) - {"none"}:
    assert _has_remat(_loss_fn(policy, True, batch), params), policy
  assert _has_remat(_loss_fn("full", False, batch), scan.unstack_layers(params))


# The policies only choose what is stored for the backward pass: gradients are unchanged.
# (Compiled for three of them, to keep the suite fast: full and a dots policy under scan, a
# dots policy without scan.)
@pytest.mark.parametrize("policy,scan_layers", [
    ("full", True), ("dots_with_no_batch_dims_saveable", True), ("dots_saveable", False)])
def test_remat_policy_keeps_gradients(policy, scan_layers, remat_case):
  batch, params, grads = remat_case
  if not scan_layers:
    params = scan.unstack_layers(params)
  got = _jit(jax.grad(_loss_fn(policy, scan_layers, batch)))(params)
  _close(got if scan_layers else scan.stack_layers(got, scan.scan_periods(grads)), grads, 1e-5)


def test_dropout_masks_differ_per_layer():
  """One token through 2 scanned dense layers with hidden-unit dropout: the zero rows of each
  layer's `wo` gradient are its dropped hidden units, which must differ between layers."""
  net = _decoder_only(True, num_layers=2, num_sparse_layers=0,
                      mlp=MlpBlock(intermediate_dim=F, intermediate_dropout_rate=0.5))
  tokens = jnp.array([[5]])
  params = nn.unbox(net.init(jax.random.key(0), tokens))["params"]

  def wo_grad(enable_dropout):
    loss = lambda p: jnp.sum(net.apply({"params": p}, tokens, enable_dropout=enable_dropout,
                                       rngs={"dropout": jax.random.key(7)}) ** 2)
    return np.asarray(_jit(jax.grad(loss))(params)["decoder"]["layers"]["layers_0"]["mlp"]["wo"][
        "kernel"])  # [2 layers, F, D]

  dropped = np.all(wo_grad(True) == 0, axis=-1)  # [2, F]
  assert 0 < dropped[0].sum() < F and 0 < dropped[1].sum() < F  # rate 0.5 of F = 32 units
  assert np.any(dropped[0] != dropped[1])


def test_decoding_with_scan_equals_unrolled(decoder_only):
  unrolled, scanned, params, scanned_params = decoder_only
  # With the key-value / expert-fill cache, which beam search reorders along its batch axis
  # (the scanned cache keeps that axis first).
  kw = dict(beam_size=2, max_decode_length=5, prompt_BP=jnp.array([[3, 4, 0], [7, 0, 0]]))
  beams, scores = decoding.beam_search_jit(unrolled, params, **kw)
  scan_beams, scan_scores = decoding.beam_search_jit(scanned, scanned_params, **kw)
  np.testing.assert_array_equal(scan_beams, beams)
  _close(scan_scores, scores, 1e-4)


def test_layout_without_period_is_refused():
  with pytest.raises(ValueError, match=r"SparseEncoder\.scan_layers=True.*sparse_layout="
                                       r"MoeLayout\.TOP.*no period"):
    _stack(SparseEncoder, True, num_layers=4, num_sparse_layers=1,
           sparse_layout=MoeLayout.TOP)
  _stack(SparseEncoder, True, num_layers=4, num_sparse_layers=2)  # MIXED: period 2
  with pytest.raises(ValueError, match=r"SparseDecoder\.remat_policy='dots'.*dots_saveable"):
    _stack(SparseDecoder, False, remat_policy="dots")


def test_name_map_round_trip_and_fine_tuning(encdec):
  _, _, params, scanned_params = encdec
  host = jax.tree.map(np.asarray, params)
  scanned_host = jax.tree.map(np.asarray, scanned_params)
  jax.tree.map(np.testing.assert_array_equal, scan.unstack_layers(scanned_host), host)
  jax.tree.map(np.testing.assert_array_equal, scan.match_layout(host, scanned_host),
               scanned_host)
  # Layer 3 (block 1, position 1) of the scanned tree is the unrolled layers_3.
  np.testing.assert_array_equal(
      scanned_host["encoder"]["layers"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"][1],
      host["encoder"]["layers_3"]["mlp"]["expert"]["wi"]["kernel"])
  # An unrolled checkpoint fine-tunes a scanned model, and the other way round.
  for target, loaded, expected in ((scanned_host, host, scanned_host),
                                   (host, scanned_host, host)):
    fresh = jax.tree.map(np.zeros_like, target)
    out, report = checkpoints.init_params_from(fresh, loaded)
    jax.tree.map(np.testing.assert_array_equal, out, expected)
    assert not report["fresh"] and len(report["copied"]) == len(jax.tree.leaves(host))


def test_resuming_with_other_scan_layers_is_refused_by_name(encdec):
  _, _, params, scanned_params = encdec
  unrolled_shapes = checkpoints.shape_table(params)
  scanned_shapes = checkpoints.shape_table(scanned_params)
  with pytest.raises(ValueError, match=r"written with scan_layers=False.*set scan_layers=False"):
    checkpoints.check_same_shapes(unrolled_shapes, scanned_shapes, "ckpt", "")
  with pytest.raises(ValueError, match=r"written with scan_layers=True.*set scan_layers=True"):
    checkpoints.check_same_shapes(scanned_shapes, unrolled_shapes, "ckpt", "")


def test_summary_counts_are_the_same_with_scan():
  infos, tables = [], []
  for scan_layers in (False, True):
    gin_utils.parse_gin(["models/switch_tiny.gin"], [f"SCAN_LAYERS={scan_layers}"])
    network = build_network()
    infos.append(summarize(network))
    tables.append(param_table(network))
  assert infos[0] == infos[1] and infos[0]["num_params"] > 0
  assert len(infos[0]["moe_layers"]) == 2
  # Scanned leaves carry the "layers" logical axis, which the rules table maps (replicated).
  assert all(e["axes"][0] == "layers" for p, e in tables[1].items() if "/layers/" in p)
  assert ("layers", None) in partitioning.LOGICAL_AXIS_RULES


def _compile_train_step(network, mesh_shape, batch_size, length):
  """`train_step` lowered and compiled from abstract state and batch (benchmarks/compile_time.py
  times the same thing)."""
  mesh = partitioning.make_mesh(mesh_shape)
  optimizer = optimizers.adafactor(learning_rate=optimizers.rsqrt_schedule())
  # Backend optimisation level 0 halves XLA:CPU's compile time; GSPMD partitioning (and so
  # the all-to-alls) runs all the same.
  return steps.lower_train_step(network, optimizer, mesh, batch_size, length).compile(
      compiler_options=_FAST)


@pytest.mark.slow
def test_switch_large_train_step_compiles_ahead_of_time():
  """The full-size Switch-Large (24 + 24 layers, 128 experts) train step with scan, on a
  simulated 8-device mesh: lowered and compiled from abstract shapes, nothing allocated."""
  gin_utils.parse_gin(["models/switch_large.gin"], ["SCAN_LAYERS=True"])
  network = build_network()
  assert network.encoder.num_layers == 24 and network.decoder.moe.num_experts == 128
  compiled = _compile_train_step(network, (1, 8, 1), batch_size=8, length=32)
  # The expert dispatch is sharded on "expert": GSPMD moves tokens with all-to-alls.
  assert re.search(r"\ball-to-all", compiled.as_text())
