"""moe_jax.train.partitioning: mesh shapes, mesh axes, fit checks, the rules table, and that the
MoE layer's activation constraints really reach the compiled program (expert all-to-all)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from moe_jax.layers import routing
from moe_jax.models.summary import param_table
from moe_jax.models.t5 import SparseEncoder, SparseEncoderDecoder
from moe_jax.train import optimizers, partitioning, trainer
from tests.train import tiny


@pytest.mark.parametrize("shape, devices, expected", [
    ((1, -1, 1), 8, (1, 8, 1)),
    ((2, -1, 1), 8, (2, 4, 1)),
    ((-1, 2, 2), 8, (2, 2, 2)),
    ((2, 4, 1), 8, (2, 4, 1)),
    ((1, 1, -1), 1, (1, 1, 1)),
])
def test_resolve_mesh_shape(shape, devices, expected):
  assert partitioning.resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize("shape, devices", [
    ((2, 3, 1), 8),      # 6 != 8 devices
    ((3, -1, 1), 8),     # 8 not divisible by 3
    ((-1, -1, 1), 8),    # two unknowns
    ((0, 8, 1), 8),      # zero
    ((-2, 4, 1), 8),     # negative other than -1
    ((2, 4), 8),         # not 3 axes
    ((2, 4, 1, 1), 8),
    ((4, 4, 1), 8),      # too many devices
])
def test_resolve_mesh_shape_rejects_bad_shapes(shape, devices):
  with pytest.raises(ValueError, match="MESH_SHAPE"):
    partitioning.resolve_mesh_shape(shape, devices)


def test_make_mesh_axes_are_named_and_auto():
  assert jax.device_count() == 8  # tests/conftest.py
  mesh = partitioning.make_mesh((2, 4, 1))
  assert mesh.axis_names == ("data", "expert", "model")
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  # -1 takes the remaining devices; an explicit smaller shape takes the first devices.
  assert dict(partitioning.make_mesh((1, -1, 1)).shape) == {"data": 1, "expert": 8, "model": 1}
  single = partitioning.make_mesh((1, 1, 1))
  assert single.devices.size == 1 and single.devices.flat[0] == jax.devices()[0]
  with pytest.raises(ValueError, match="MESH_SHAPE"):
    partitioning.make_mesh((3, -1, 1))


def test_check_network_fits_mesh():
  mesh = partitioning.make_mesh((2, 4, 1))
  partitioning.check_network_fits_mesh(tiny.network(), mesh, batch_size=8)  # fits
  with pytest.raises(ValueError, match=r"num_experts=6.*expert axis \(4 devices\)"):
    partitioning.check_network_fits_mesh(tiny.network(num_experts=6), mesh, batch_size=8)
  with pytest.raises(ValueError, match=r"BATCH_SIZE=12.*data-parallel size 8"):
    partitioning.check_network_fits_mesh(tiny.network(), mesh, batch_size=12)
  # A dense network has no expert count to check; its batch still must split.
  partitioning.check_network_fits_mesh(tiny.network(num_sparse_layers=0), mesh, batch_size=16)
  with pytest.raises(ValueError, match="BATCH_SIZE=4"):
    partitioning.check_network_fits_mesh(tiny.network(num_sparse_layers=0), mesh, batch_size=4)


def _networks():
  """Every module kind: decoder-only MoE; encoder-decoder with expert-choice encoder MoE,
  top-2 decoder MoE, untied logits, extra dense FFN, dense layers."""
  encdec = SparseEncoderDecoder(
      vocab_size=384, embed_dim=16, logits_via_embedding=False,
      encoder=SparseEncoder(num_layers=2, num_sparse_layers=1, num_heads=2, head_dim=8,
                            mlp=tiny.network().decoder.mlp, extra_dense_mlp=True,
                            moe=tiny.moe_layer(router=routing.ExpertChoiceRouter())),
      decoder=tiny.network(num_sparse_layers=1,
                           router=routing.TopKRouter(k=2)).decoder)
  return {"decoder_only": tiny.network(num_sparse_layers=1), "encoder_decoder": encdec}


@pytest.mark.parametrize("name", ["decoder_only", "encoder_decoder"])
def test_every_param_axis_has_a_rule(name):
  ruled = {logical for logical, _ in partitioning.LOGICAL_AXIS_RULES}
  table = param_table(_networks()[name])
  assert any("/expert/" in path for path in table)
  for path, entry in table.items():
    assert entry["axes"] is not None, f"{path} carries no logical axis names"
    assert len(entry["axes"]) == len(entry["shape"]), path
    missing = set(entry["axes"]) - ruled
    assert not missing, f"{path}: logical axes {missing} have no rule in LOGICAL_AXIS_RULES"


def test_rules_table_is_one_mapping_onto_mesh_axes():
  logical = [name for name, _ in partitioning.LOGICAL_AXIS_RULES]
  assert len(logical) == len(set(logical)), "a logical axis is mapped twice"
  for name, mesh_axes in partitioning.LOGICAL_AXIS_RULES:
    axes = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
    assert set(axes) - {None} <= set(partitioning.MESH_AXES), name
  rules = dict(partitioning.LOGICAL_AXIS_RULES)
  assert rules["batch"] == ("data", "expert") and rules["expert"] == "expert"


def test_expert_params_and_their_optimizer_state_are_sharded_on_expert():
  """Expert kernels [E, D, F] split E over 'expert'; so do their AdamW moments (which XLA
  propagation used to leave replicated on every device)."""
  mesh = partitioning.make_mesh((2, 4, 1))
  opt = optimizers.build_optimizer(optimizers.adamw(1e-3))
  shardings = trainer.state_shardings(tiny.network(), opt, mesh)
  wi = shardings.params["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
  assert wi.spec[0] == "expert"
  (adam,) = [s for s in jax.tree.leaves(shardings.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
              if hasattr(s, "mu")]
  mu = adam.mu["decoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"]
  assert mu.spec == wi.spec and adam.nu["decoder"]["layers_1"]["mlp"]["expert"]["wo"][
      "kernel"].spec[0] == "expert"
  assert adam.count.spec == jax.sharding.PartitionSpec()


def _moe_networks():
  """Two MoE layers each (tiny's 8 experts, 8 x 32 tokens, groups of 32), every router kind."""
  stack = dict(num_layers=1, num_sparse_layers=1, num_heads=2, head_dim=8,
               mlp=tiny.network().decoder.mlp)

  def encoder_decoder(encoder_router, decoder_router):
    return SparseEncoderDecoder(
        vocab_size=384, embed_dim=tiny.EMBED,
        encoder=SparseEncoder(moe=tiny.moe_layer(router=encoder_router), **stack),
        decoder=tiny.network(num_layers=1, num_sparse_layers=1, router=decoder_router).decoder)

  return {
      "switch": tiny.network(),
      "expert_choice_encoder_top2_decoder": encoder_decoder(routing.ExpertChoiceRouter(),
                                                            routing.TopKRouter(k=2)),
      "bpr_top2_encoder_random_top2_decoder": encoder_decoder(
          routing.TopKRouter(k=2, batch_prioritized_routing=True),
          routing.TopKRouter(k=2, second_expert_policy="random")),
      "switch_gather": tiny.network(dispatch="gather"),
      "top2_dropless": tiny.network(router=routing.TopKRouter(k=2), dispatch="dropless"),
  }


@pytest.mark.parametrize("name", ["switch", "expert_choice_encoder_top2_decoder",
                                  "bpr_top2_encoder_random_top2_decoder", "switch_gather",
                                  "top2_dropless"])
def test_expert_sharded_train_step_compiles_to_all_to_all(name):
  """Under jax.set_mesh the MoE layer's constraints ('batch' groups -> 'expert' buffers) make
  GSPMD move tokens with all-to-all; without them it would all-gather the expert weights.
  Routing runs on each shard's own groups for every router: expert choice's top-C over a
  group's tokens used to all-gather the scores of every group (lax.top_k)."""
  mesh = partitioning.make_mesh((2, 4, 1))
  net, opt = _moe_networks()[name], tiny.optimizer()
  tokens = jax.ShapeDtypeStruct((tiny.BATCH, tiny.LENGTH), jnp.int32,
                                sharding=partitioning.batch_sharding(mesh))
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}
  if isinstance(net, SparseEncoderDecoder):
    batch["encoder_input_tokens"] = tokens
  with jax.set_mesh(mesh):
    shardings = trainer.state_shardings(net, opt, mesh)
    step = jax.jit(functools.partial(trainer.train_step, network=net, optimizer=opt),
                   in_shardings=(shardings, partitioning.batch_sharding(mesh),
                                 partitioning.replicated(mesh)),
                   out_shardings=(shardings, partitioning.replicated(mesh)),
                   donate_argnums=(0,))  # exactly as trainer.train jits it
    # Only the partitioned HLO matters here: skip LLVM's optimisation (half the compile time).
    hlo = step.lower(trainer.abstract_state(net, opt, shardings), batch, jax.random.key(0)
                     ).compile(compiler_options={"xla_backend_optimization_level": 0}).as_text()
  # Per MoE layer (2 in each network): one all-to-all into the experts and one back, forward
  # and backward; routing and dispatch stay local to each shard's groups (no all-gather).
  # Dropless (explicit shard_map) also sends each row's expert id forward: 5 per layer.
  assert hlo.count(" all-to-all(") == (10 if name.endswith("dropless") else 8)
  assert " all-gather(" not in hlo, [line for line in hlo.splitlines() if " all-gather(" in line]
