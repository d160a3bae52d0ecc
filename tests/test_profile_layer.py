"""benchmarks/profile_layer.py: HLO parsing, charging trace events to the layer's parts."""

import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import profile_layer as pl  # noqa: E402

from moe_jax.layers.experts import ExpertMlp  # noqa: E402
from moe_jax.layers.moe import MoeLayer  # noqa: E402
from moe_jax.layers.routing import SwitchRouter  # noqa: E402


def test_hlo_instructions_reads_opcodes_and_op_names():
  def f(x):
    with jax.named_scope("dispatch"):
      y = jnp.sin(x) @ x
    return jax.lax.fori_loop(0, 3, lambda i, c: c * 2.0, y)  # a while with a tuple type

  text = jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text()
  table = pl.hlo_instructions(text)
  opcodes = {opcode for opcode, _ in table.values()}
  assert "while" in opcodes and "parameter" in opcodes
  scoped = [name for name, (_, op_name) in table.items() if "/dispatch/" in op_name]
  assert scoped, "the named scope reaches the compiled HLO's metadata"


@pytest.mark.parametrize("op_name, expected", [
    ("jit(step)/transpose(jvp(MoeLayer))/expert/wi/ENI,EIO->ENO/dot_general", ("experts", True)),
    ("jit(step)/jvp(MoeLayer)/router/router.route_tokens/softmax", ("router", False)),
    ("jit(step)/jvp(MoeLayer)/dispatch/vmap(jit(_take))/gather", ("dispatch", False)),
    ("jit(step)/transpose(jvp(MoeLayer))/combine/vmap()/select_n", ("combine", True)),
    ("jit(step)/jvp(MlpBlock)/wo/dot_general", ("experts", False)),
    ("jit(step)/jvp(MoeLayer)/MoeLayer._dropless/dispatch/sort", ("dispatch", False)),
    ("jit(step)/transpose(jvp(MlpBlock))/select_n", ("other", True)),
    ("", ("other", False)),
])
def test_classify(op_name, expected):
  assert pl.classify(op_name) == expected


STEP = "jit(train_step)/jvp(SparseDecoderOnly)/decoder/layers_1/layers_1/"


@pytest.mark.parametrize("op_name, expected", [
    (STEP + "mlp/router/router_weights/w/dot_general", "router"),
    (STEP + "mlp/dispatch/vmap(jit(_take))/gather", "dispatch"),
    (STEP + "mlp/expert/wi_0/ENI,EIO->ENO/dot_general", "experts"),
    (STEP + "mlp/combine/scatter-add", "combine"),
    (STEP + "mlp/wi_1/dot_general", "dense mlp"),
    (STEP + "pre_self_attention_layer_norm/mul", "norms"),
    (STEP + "self_attention/query/dot_general", "attention"),
    ("jit(train_step)/jvp(SparseDecoderOnly)/decoder/relpos_bias/gather", "attention"),
    ("jit(train_step)/jvp(SparseDecoderOnly)/logits_head/token_embedder.attend/dot_general",
     "logits+loss"),
    ("jit(train_step)/jvp()/log", "logits+loss"),
    ("jit(train_step)/jvp(SparseDecoderOnly)/token_embedder/jit(_take)/gather", "embedding"),
    ("jit(train_step)/div", "other"),  # the optimizer's update
])
def test_classify_a_train_step(op_name, expected):
  assert pl.classify(op_name, pl.STEP_PARTS)[0] == expected
  assert pl.part_names(pl.STEP_PARTS)[-1] == "other"


TABLE = {"dot.1": ("dot", "jit(step)/jvp(M)/expert/dot_general"),
         "fusion.2": ("fusion", "jit(step)/transpose(jvp(M))/combine/select_n"),
         "while.3": ("while", "jit(step)/jvp(M)/expert/while")}


def _event(name, ts, dur, pid=1, module="jit_step", op=None):
  return {"ph": "X", "pid": pid, "tid": 7, "ts": ts, "dur": dur, "name": name,
          "args": {"hlo_module": module, "hlo_op": op or name}}


def test_op_times_on_a_host_trace():
  events = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      _event("dot.1", 0, 100), _event("fusion.2", 50, 100),   # overlap: busy 0..150
      _event("while.3", 0, 1000),                              # a container: not charged
      _event("dot.1", 400, 100),                               # busy 400..500
      _event("dot.1", 0, 999, module="jit_other"),             # another module
      _event("$python frame", 0, 999),                         # not an instruction
      _event("dot.1", 1000, 100),                              # step 2
      _event("fusion.2", 1100, 50)]
  times, busy = pl.op_times(events, "jit_step", TABLE, steps=2)
  assert times == pytest.approx({"dot.1": 300e-6 / 2, "fusion.2": 150e-6 / 2})
  assert busy == pytest.approx((150 + 100 + 150) * 1e-6 / 2)
  parts = pl.breakdown(times, TABLE)
  assert parts["experts"] == pytest.approx({"forward": 150e-6, "backward": 0.0})
  assert parts["combine"] == pytest.approx({"forward": 0.0, "backward": 75e-6})


def test_op_times_on_a_device_trace_counts_kernels_only():
  events = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      _event("launch", 0, 500, pid=1, op="dot.1"),                  # host side: ignored
      _event("gemm_kernel", 0, 40, pid=2, module="jit_step(42)", op="dot.1"),
      _event("loop_select_fusion", 40, 10, pid=2, op="fusion.2"),
      {"ph": "X", "pid": 2, "tid": 1, "ts": 60, "dur": 5, "name": "cmd_buffer_kernel"}]
  times, busy = pl.op_times(events, "jit_step", TABLE, steps=1)
  assert times == pytest.approx({"dot.1": 40e-6, "fusion.2": 10e-6, pl.UNATTRIBUTED: 5e-6})
  assert busy == pytest.approx(55e-6)
  assert pl.breakdown(times, TABLE)["other"]["forward"] == pytest.approx(5e-6)


def test_profile_charges_a_moe_layer_to_its_parts():
  """On the real thing: a tiny gather MoeLayer's step has router, dispatch, experts and combine
  ops in its CPU trace (MoeLayer's named scopes reach the profile)."""
  import moe_layer as bench  # benchmarks/, on sys.path above
  x = jax.random.normal(jax.random.key(0), (2, 16, 8))
  layer = MoeLayer(num_experts=4, router=SwitchRouter(), expert=ExpertMlp(intermediate_dim=16),
                   dispatch="gather")
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x)["params"])
  args = (params, x, x, jax.random.key(2))
  compiled, _, _ = bench.compile_step(layer, args)
  with tempfile.TemporaryDirectory() as trace_dir:
    wall_s, times, busy_s, table = pl.profile(
        lambda: jax.block_until_ready(compiled(*args)), compiled.as_text(), 2, trace_dir)
  parts = pl.breakdown(times, table)
  for part in ("router", "dispatch", "experts", "combine"):
    assert parts[part]["forward"] > 0, part  # (a small backward op may fuse into a neighbour)
  assert parts["experts"]["backward"] > 0 and parts["router"]["backward"] > 0
  assert 0 < busy_s <= sum(times.values()) + 1e-9 and wall_s > 0
