"""MoE -> dense distillation (moe_jax.train.distill): the objective against a float64 numpy
computation, no gradient into the teacher, teacher_weight=0 is the plain loss, gradient
accumulation, the teacher rebuilt from its run's config.gin beside the student's gin config,
the CLI run through runs/distill.gin (init from the teacher, recorded config, exact resume), and
the refusals."""

import functools
import os
import re
import shutil

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from moe_jax import cli, gin_utils, objectives
from moe_jax.layers import routing
from moe_jax.layers.experts import ExpertMlp
from moe_jax.layers.moe import MOE_STATS, MoeLayer
from moe_jax.layers.score_routing import ROUTER_LOAD
from moe_jax.models import build_network
from moe_jax.models.summary import abstract_variables
from moe_jax.train import checkpoints as ckpt_lib
from moe_jax.train import trainer
from moe_jax.train.distill import Distillation, Teacher, distillation_loss, soft_cross_entropy
from moe_jax.train.steps import TrainState, train_step
from tests.train import tiny

Z_LOSS = 1e-4
RNGS = {"dropout": jax.random.key(1), routing.ROUTING_RNG: jax.random.key(2)}


def teacher_network():
  """4 experts (the students have 8 or none); train capacity 0.5 drops tokens, eval 2.0 far
  fewer, so train- and eval-mode logits differ."""
  moe = MoeLayer(num_experts=4, router=routing.SwitchRouter(),
                 expert=ExpertMlp(intermediate_dim=tiny.MLP, activations=tiny.ACTIVATIONS),
                 max_group_size=tiny.GROUP, train_capacity_factor=0.5, eval_capacity_factor=2.0)
  return tiny.network(num_layers=1, num_sparse_layers=1, moe=moe)


@pytest.fixture(scope="module")
def nets():
  """(dense student, its params, MoE teacher, its variables, a padded batch)."""
  student, teacher = tiny.network(num_layers=1, num_sparse_layers=0), teacher_network()
  return (student, _init(student, 0), teacher, {"params": _init(teacher, 1)}, tiny.padded_batch())


def _init(net, seed):
  """Random params of the network's shapes (numpy: compiling `init` costs more than the test)."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(abstract_variables(net)["params"])
  def leaf(path, x):
    names = [k.key for k in path]
    scale = 1.0 if "embedding" in names else 1 / np.sqrt(x.shape[0])  # as flax initialises
    if names[-1] == "scale":
      return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return (scale * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _logsumexp(x):
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def _reference(student_logits, teacher_logits, targets, weight, temperature):
  """(objective, label CE, soft CE) in float64, token means over targets > 0."""
  s, t = np.float64(student_logits), np.float64(teacher_logits)
  w = (targets > 0).astype(np.float64)
  mean = lambda v: np.sum(v * w) / np.sum(w)
  lse = _logsumexp(s)
  ce = mean(lse - np.take_along_axis(s, targets[..., None], -1)[..., 0])
  p = np.exp(t / temperature - _logsumexp(t / temperature)[..., None])
  log_q = s / temperature - _logsumexp(s / temperature)[..., None]
  soft = temperature**2 * mean(-np.sum(p * log_q, -1))
  return weight * soft + (1 - weight) * ce + Z_LOSS * mean(lse**2), ce, soft


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(student, teacher, params, variables, batch):
  """The student's logits and the teacher's in eval and in train mode."""
  teacher_logits = lambda train: teacher.apply(
      variables, **objectives.model_inputs(teacher, batch), enable_dropout=train, rngs=RNGS,
      mutable=[MOE_STATS, ROUTER_LOAD])[0]
  return (student.apply({"params": params}, **objectives.model_inputs(student, batch)),
          teacher_logits(False), teacher_logits(True))


def test_objective_matches_float64_numpy(nets):
  """0.25 * soft + 0.75 * label CE + logit z-loss, from the two models' logits (the teacher's
  in eval mode); `loss` stays the label loss, `distill_loss` is the soft term."""
  student, params, teacher_net, variables, batch = nets
  teacher = Teacher(teacher_net, variables)
  total, terms = jax.jit(lambda p, v: distillation_loss(
      student, p, batch, teacher=teacher, teacher_variables=v, logit_z_loss=Z_LOSS))(
          params, variables)
  student_logits, eval_logits, train_logits = _logits(student, teacher_net, params, variables,
                                                       batch)
  targets = batch["decoder_target_tokens"]
  expected, ce, soft = _reference(student_logits, eval_logits, targets, 0.25, 1.0)
  np.testing.assert_allclose(total, expected, rtol=2e-6)
  np.testing.assert_allclose(terms["distill_loss"], soft, rtol=2e-6)
  np.testing.assert_allclose(terms["cross_entropy"], ce, rtol=2e-6)
  np.testing.assert_allclose(terms["loss"], expected - 0.25 * (soft - ce), rtol=2e-6)
  assert terms["aux_loss"] == 0 and abs(soft - ce) > 1e-2  # the weighting is visible
  # The train-mode teacher (capacity 0.5 drops tokens) would give another soft term.
  assert abs(_reference(student_logits, train_logits, targets, 0.25, 1.0)[2] - soft) > 1e-3
  # Temperature (Hinton et al.): T^2 * CE(softmax(t / T), log_softmax(s / T)).
  np.testing.assert_allclose(
      soft_cross_entropy(student_logits, eval_logits, targets > 0, 2.0),
      _reference(student_logits, eval_logits, targets, 1.0, 2.0)[2], rtol=2e-6)


def test_no_gradient_flows_into_the_teacher(nets):
  """The objective depends on the teacher's params, but its gradient in them is exactly 0."""
  student, params, teacher_net, variables, batch = nets
  teacher = Teacher(teacher_net, variables, teacher_weight=1.0)
  loss = lambda v: distillation_loss(student, params, batch, teacher=teacher,
                                     teacher_variables=v)[0]
  scaled = jax.tree.map(lambda x: 1.5 * x, variables)
  (base, grads), other = jax.jit(lambda v, w: (jax.value_and_grad(loss)(v), loss(w)))(
      variables, scaled)
  assert abs(base - other) > 1e-3
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_zero_teacher_weight_is_the_plain_loss_and_gradient(nets):
  """teacher_weight=0 with an 8-expert student and a 4-expert teacher: the same loss, terms
  (the student's aux losses and expert loads only: the teacher's stats do not leak) and
  gradients as objectives.compute_loss, exactly."""
  _, _, teacher_net, variables, batch = nets
  student = tiny.network(num_layers=1, num_sparse_layers=1)
  params = _init(student, 3)
  teacher = Teacher(teacher_net, variables, teacher_weight=0.0)
  common = {"rngs": RNGS, "enable_dropout": True, "logit_z_loss": Z_LOSS}
  plain = jax.value_and_grad(lambda p: objectives.compute_loss(student, p, batch, **common),
                             has_aux=True)
  distilled = jax.value_and_grad(lambda p, v: distillation_loss(
      student, p, batch, teacher=teacher, teacher_variables=v, **common), has_aux=True)
  ((plain_loss, plain_terms), plain_grads), ((loss, terms), grads) = jax.jit(
      lambda p, v: (plain(p), distilled(p, v)))(params, variables)
  assert plain_terms["aux_loss"] > 0
  assert set(terms) == set(plain_terms) | {"distill_loss"}
  np.testing.assert_array_equal(loss, plain_loss)
  for key, value in plain_terms.items():
    np.testing.assert_array_equal(terms[key], value, err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, grads, plain_grads)


def test_microbatches_equal_the_full_batch(nets):
  """4 microbatches (the teacher's forward sliced with them) give the full batch's terms,
  distill_loss included, and update to ~1e-6 (SGD rate 1; routing groups are sequences)."""
  student, params, teacher_net, variables, batch = nets
  teacher = Teacher(teacher_net, variables)
  opt = optax.sgd(1.0)
  state = TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))

  @functools.partial(jax.jit, static_argnums=3)
  def step(state, batch, variables, num_microbatches):
    return train_step(state, batch, jax.random.key(3), network=student, optimizer=opt,
                      logit_z_loss=Z_LOSS, num_microbatches=num_microbatches,
                      loss_fn=teacher.loss_fn(variables))

  (full_state, full), (micro_state, micro) = (jax.device_get(step(state, batch, variables, m))
                                              for m in (1, 4))
  assert set(full) == set(micro) and full["distill_loss"] > 0
  for key in full:
    np.testing.assert_allclose(micro[key], full[key], atol=1e-6, rtol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
               micro_state.params, full_state.params)


# ------------------------------------------------------------------------------------------
# Through gin and the CLI, from a teacher trained by the CLI.

SIZE = ["--gin.EMBED_DIM=16", "--gin.MLP_DIM=32", "--gin.NUM_HEADS=2", "--gin.HEAD_DIM=8",
        "--gin.NUM_DECODER_LAYERS=1"]
RUN = ["--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
       "--gin.MESH_SHAPE=(1, 1, 1)", "--gin.EVAL_PERIOD=0", "--gin.LOG_EVERY=1",
       "--gin.train.async_checkpoints=False", "--traceback"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tfds_dir):
  """A 2-step switch_tiny run (one layer, an MoE one of 4 experts) through the CLI."""
  del tfds_dir
  model_dir = tmp_path_factory.mktemp("teacher")
  cli.train(["--gin_file=models/switch_tiny.gin", "--gin_file=runs/pretrain.gin", *SIZE,
             "--gin.NUM_DECODER_SPARSE_LAYERS=1", "--gin.NUM_EXPERTS=4",
             "--gin.MoeLayer.max_group_size=32", "--gin.TRAIN_STEPS=2", *RUN,
             f"--gin.MODEL_DIR='{model_dir}'"])
  return str(model_dir)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _student_flags(teacher_dir, model_dir, *extra):
  return ["--gin_file=models/dense_tiny.gin", "--gin_file=runs/distill.gin", *SIZE, *RUN,
          f"--gin.TEACHER_CHECKPOINT='{teacher_dir}'", f"--gin.MODEL_DIR='{model_dir}'", *extra]


def test_teacher_built_from_its_config_beside_the_students(teacher_dir):
  """Under the student's gin config (dense), the teacher network comes from the teacher run's
  config.gin: its param tree is the checkpoint's (an MoE layer of 4 experts), it runs, and the
  student's config and operative config are as they were."""
  flags = [f.replace("--gin.", "") for f in SIZE] + [f"TEACHER_CHECKPOINT='{teacher_dir}'",
                                                      "MODEL_DIR='unused'"]
  gin_utils.parse_gin(["models/dense_tiny.gin", "runs/distill.gin"], flags)
  student, distillation = build_network(), Distillation(teacher_dir)
  before = gin.config_str(), gin.operative_config_str()
  teacher = distillation.load_teacher(student)
  assert (gin.config_str(), gin.operative_config_str()) == before
  assert not any("/mlp/expert/" in k for k in _flat(abstract_variables(student)["params"]))
  tree = ckpt_lib.shape_table(nn.unbox(abstract_variables(teacher.network)["params"]))
  assert tree == ckpt_lib.shape_table(ckpt_lib.load_params(teacher_dir))
  assert tree["decoder/layers_0/mlp/expert/wi_0/kernel"] == [4, 16, 32]
  batch = tiny.padded_batch()
  logits = jax.jit(teacher.logits)(teacher.variables, batch)
  assert logits.shape == (tiny.BATCH, tiny.LENGTH, 384) and np.isfinite(logits).all()


def test_cli_distillation_inits_from_teacher_records_config_and_resumes(teacher_dir, tmp_path,
                                                                       monkeypatch):
  """dense_tiny + runs/distill.gin on 2 devices: step 0 holds the teacher's non-expert params
  (the MoE layer's FFN starts fresh); the teacher's experts are split over the devices;
  config.gin is the dense student's; `loss` is the label loss; resumed from step 2 (checkpoint
  4 removed) it does not re-initialise from the teacher and repeats steps 3 and 4 exactly, with
  the teacher reloaded."""
  inits = []

  def spy(params, *args, **kwargs):
    inits.append(jax.device_get(params))
    return state_from_params(params, *args, **kwargs)
  state_from_params = trainer.state_from_params
  monkeypatch.setattr(trainer, "state_from_params", spy)
  placed = []

  def on_mesh(self, mesh):
    variables, shardings = on_mesh_of(self, mesh)
    placed.append(variables)
    return variables, shardings
  on_mesh_of = Teacher.on_mesh
  monkeypatch.setattr(Teacher, "on_mesh", on_mesh)
  student = tmp_path / "student"
  # Mesh (1, 2, 1): the teacher's 4 experts are split over 2 devices, as its logical axes say.
  flags = _student_flags(teacher_dir, student, "--gin.TRAIN_STEPS=4",
                         "--gin.CHECKPOINT_PERIOD=2", "--gin.MESH_SHAPE=(1, 2, 1)")
  cli.train(flags)

  (init,) = inits
  (variables,) = placed
  expert_kernel = variables["params"]["decoder"]["layers_0"]["mlp"]["expert"]["wi_0"]["kernel"]
  assert [s.data.shape for s in expert_kernel.addressable_shards] == [(2, 16, 32)] * 2
  init, teacher = _flat(init), _flat(ckpt_lib.load_params(teacher_dir))
  np.testing.assert_array_equal(expert_kernel, teacher["decoder/layers_0/mlp/expert/wi_0/kernel"])
  fresh = sorted(k for k in init if k not in teacher)
  assert fresh == [f"decoder/layers_0/mlp/{n}/kernel" for n in ("wi_0", "wi_1", "wo")]
  assert len(init) - len(fresh) >= 5  # embedding, attention, norms
  for key in set(init) - set(fresh):
    np.testing.assert_array_equal(init[key], teacher[key], err_msg=key)

  config = (student / "config.gin").read_text()
  for line in ("train.distillation = @Distillation()", "Distillation.teacher_weight = 0.25",
               f"TEACHER_CHECKPOINT = '{teacher_dir}'", "SparseDecoder.moe = None",
               "NUM_DECODER_SPARSE_LAYERS = 0"):
    assert line in config, line
  assert not re.search(r"^(\S+/)?(MoeLayer|SwitchRouter|ExpertMlp)\.", config, re.MULTILINE)

  records = tiny.read_metrics(student)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for r in records:  # dense: loss = label cross entropy + output-logit z-loss
    np.testing.assert_allclose(r["loss"], r["cross_entropy"] + r["logit_z_loss"], rtol=1e-6)
    assert abs(r["distill_loss"] - r["cross_entropy"]) > 1e-3

  shutil.rmtree(student / ckpt_lib.CHECKPOINT_SUBDIR / "4")
  inits.clear()
  cli.train(flags)
  assert not inits and len(placed) == 2  # no re-initialisation; the teacher loaded again
  resumed = tiny.read_metrics(student)
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 3, 4]
  for key in ("loss", "distill_loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in resumed[4:]], [r[key] for r in records[2:]],
                               atol=1e-6, rtol=0, err_msg=key)


# ------------------------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize("field,value,message", [
    ("teacher_weight", -0.1, "Distillation.teacher_weight must be in [0, 1], got -0.1"),
    ("teacher_weight", 1.5, "Distillation.teacher_weight must be in [0, 1], got 1.5"),
    ("temperature", 0.0, "Distillation.temperature must be a positive number, got 0.0"),
    ("teacher_checkpoint", "", "Distillation.teacher_checkpoint (TEACHER_CHECKPOINT) must name"),
])
def test_invalid_fields_are_refused_by_name(teacher_dir, field, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    Distillation(**{"teacher_checkpoint": teacher_dir, field: value})


def test_missing_teacher_checkpoint_or_config_is_refused(teacher_dir, tmp_path):
  """No directory (from the CLI, before anything runs), no checkpoint in it, or a checkpoint
  without its run's config.gin."""
  with pytest.raises(ValueError, match=r"Distillation.teacher_checkpoint \(TEACHER_CHECKPOINT\)"
                                       r" '/nonexistent/teacher' does not exist"):
    cli.train(_student_flags("/nonexistent/teacher", tmp_path / "run", "--gin.TRAIN_STEPS=1"))
  assert not os.path.exists(tmp_path / "run")
  with pytest.raises(ValueError, match="holds no complete checkpoint"):
    Distillation(str(tmp_path))
  shutil.copytree(os.path.join(teacher_dir, ckpt_lib.CHECKPOINT_SUBDIR),
                  tmp_path / "bare" / ckpt_lib.CHECKPOINT_SUBDIR)
  with pytest.raises(ValueError, match="has no config.gin beside it"):
    Distillation(str(tmp_path / "bare"))


def test_other_vocabulary_is_refused_before_compiling(teacher_dir, tmp_path, monkeypatch):
  def compiled(*args, **kwargs):
    raise AssertionError("compilation started before the teacher was refused")
  for name in ("state_shardings", "init_state", "abstract_state", "train_step"):
    monkeypatch.setattr(trainer, name, compiled)
  student = tiny.network(num_layers=1, num_sparse_layers=0).clone(vocab_size=512)
  with pytest.raises(ValueError, match=r"vocabulary / output size is 384 .* student's is 512"):
    tiny.train(tmp_path, 2, net=student, distillation=Distillation(teacher_dir))
  assert not os.path.exists(tmp_path / "metrics.jsonl")
