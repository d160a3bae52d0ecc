"""Routing report of a trained run: where tokens go, per MoE layer (`scripts/routing_report.py`).

From MODEL_DIR it writes, per MoE layer (`decoder/layers_1/mlp` -> `decoder_layers_1_mlp`):
- `expert_load_<layer>.png`: the training log's `expert_load/<layer>` (metrics.jsonl) as a
  heatmap, step against expert, colour = fraction of routing choices;
- `token_classes_<layer>.png`: per expert, the share of each token class among the tokens it
  processes on a split of the run's task (stacked bars);
and `report.md`: a table per layer (tokens' share per expert, top classes, most common
characters), the router entropy and drop rate measured here, and training's last logged
`fraction_dropped` / `router_confidence`.

How routing is captured: the run's network is rebuilt from its recorded config.gin and the
latest checkpoint (as scripts/eval.py does) and applied to the split's batches with
`capture_intermediates` keeping every Router's output (`RouterOutput`) and its float32
`router_weights` logits (the cosine router's scaled cosine similarities, which it sows as
`routing_scores`). A token's experts are the buffer slots holding it (`token_index_GEC`
where `valid_GEC`; the dropless path's valid `choices`), i.e. what the experts really process
under the eval capacity factor; a token in no slot is dropped. MoeLayer forms groups by
reshaping the [B, L] tokens row-major (`x_BLD.reshape(G, S, D)`), so [G, S] maps back to
[B, L] by the inverse reshape, whatever the group count. Router entropy is that of
softmax(logits) in nats (log E at uniform), averaged over real tokens. Each position is
classed by the token it reads (decoder_input_tokens, or encoder_input_tokens for encoder
layers). Layers inside `nn.scan` (scanned stacks) are not captured.
"""

from __future__ import annotations

import collections
import functools
import os
import string
from typing import Mapping, Optional, Sequence

import numpy as np

from moe_jax import curves

TOKEN_CLASSES = ("letters", "capitals", "digits", "punctuation", "spaces", "newlines", "other")
BYTE_OFFSET = 3  # seqio.ByteVocabulary: ids 0 pad, 1 EOS, 2 UNK, then byte b -> b + 3
TOP_CHARS = 8


def char_class(char: str) -> int:
  """Index into TOKEN_CLASSES of one character ('' and non-ASCII: other)."""
  if len(char) != 1 or not char.isascii():
    return TOKEN_CLASSES.index("other")
  for name, members in (("letters", string.ascii_lowercase), ("capitals", string.ascii_uppercase),
                        ("digits", string.digits), ("punctuation", string.punctuation),
                        ("newlines", "\n\r"), ("spaces", " \t")):
    if char in members:
      return TOKEN_CLASSES.index(name)
  return TOKEN_CLASSES.index("other")


def token_chars(vocab, vocab_size: int) -> list[str]:
  """The character each token id stands for ('' for specials; a piece's first character)."""
  import seqio  # pylint: disable=g-import-not-at-top
  resolved = getattr(vocab, "resolved", vocab)  # ConfiguredVocabulary
  if isinstance(resolved, seqio.ByteVocabulary):
    return [chr(i - BYTE_OFFSET) if BYTE_OFFSET <= i < BYTE_OFFSET + 256 else ""
            for i in range(vocab_size)]
  pieces = []
  for i in range(vocab_size):
    try:
      pieces.append(vocab.decode([i])[:1] if i < vocab.vocab_size else "")
    except Exception:  # pylint: disable=broad-exception-caught  (ids a model pads beyond)
      pieces.append("")
  return pieces


def classify_tokens(tokens, chars: Sequence[str]) -> np.ndarray:
  """TOKEN_CLASSES index of each token id (same shape)."""
  table = np.array([char_class(c) for c in chars], np.int32)
  return table[np.asarray(tokens)]


# ------------------------------------------------------------------------------------------
# The training log.


def read_metrics(model_dir: str) -> list[dict]:
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path!r} not found: is {model_dir!r} a training MODEL_DIR?")
  return curves.read_jsonl(path)


def load_history(records: Sequence[Mapping]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{layer: (steps [T], load [T, E])} of the training records (a resumed run logs some steps
  twice: the record after the resume wins)."""
  by_layer = collections.defaultdict(dict)
  loads = [r for r in records if any(key.startswith("expert_load/") for key in r)]
  for step, record in curves.last_per_step(loads).items():
    for key, value in record.items():
      if key.startswith("expert_load/"):
        by_layer[key[len("expert_load/"):]][step] = value
  return {layer: (np.array(sorted(steps)), np.array([steps[s] for s in sorted(steps)]))
          for layer, steps in by_layer.items()}


def last_training_metrics(records: Sequence[Mapping]) -> dict:
  keys = ("fraction_dropped", "router_confidence")
  train = [r for r in records if "fraction_dropped" in r]
  return {"step": train[-1]["step"], **{k: train[-1][k] for k in keys}} if train else {}


# ------------------------------------------------------------------------------------------
# Routing on a split.


def _is_router_call(module, method_name: str) -> bool:
  from moe_jax.layers import routing  # pylint: disable=g-import-not-at-top
  return method_name == "__call__" and isinstance(module, (routing.Router, routing.RouterWeights))


@functools.lru_cache(maxsize=4)
def _jitted_apply(network):
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax import objectives  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda variables, inputs: network.apply(
      variables, **inputs, capture_intermediates=_is_router_call,
      mutable=["intermediates", objectives.MOE_STATS, *objectives.STATE_COLLECTIONS]))


def positions(layer: str, batch: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """(token read [B*L], real [B*L]) at each position of a layer: encoder layers read encoder
  inputs (real: non-padding), decoder layers decoder inputs (real: a non-padding target; the
  first position reads BOS, id 0)."""
  encoder = layer.startswith("encoder") and "encoder_input_tokens" in batch
  tokens = batch["encoder_input_tokens" if encoder else "decoder_input_tokens"]
  real = batch["encoder_input_tokens" if encoder else "decoder_target_tokens"]
  return np.asarray(tokens).reshape(-1), np.asarray(real).reshape(-1) > 0


def capture_routing(network, variables, batch: Mapping[str, np.ndarray]) -> dict:
  """{layer: (assigned [B*L, E] bool, logits [B*L, E] or None)} of one batch, rows in the
  batch's row-major token order (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from moe_jax import objectives  # pylint: disable=g-import-not-at-top
  from moe_jax.layers import score_routing  # pylint: disable=g-import-not-at-top
  inputs = {k: np.asarray(v) for k, v in objectives.model_inputs(network, batch).items()}
  _, state = _jitted_apply(network)(variables, inputs)
  flat = traverse_util.flatten_dict(jax.device_get(dict(state.get("intermediates", {}))))
  out = {}
  for path, value in flat.items():
    if path[-2:] == ("router", "__call__"):
      layer = "/".join(path[:-2])
      num_tokens = positions(layer, inputs)[0].size
      logits = flat.get(path[:-1] + (score_routing.ROUTING_SCORES,),
                        flat.get(path[:-1] + ("router_weights", "__call__")))
      out[layer] = (_assignment(value[0], num_tokens), None if logits is None else
                    np.asarray(logits[0], np.float64).reshape(num_tokens, -1))
  return out


def _assignment(routes, num_tokens: int) -> np.ndarray:
  """assigned [B*L, E]: whether expert e processes token n (after capacity)."""
  num_experts = np.asarray(routes.stats.expert_load_E).shape[-1]
  if routes.token_index_GEC is None:  # dropless: every valid choice is processed
    one_hot_GSKE = np.eye(num_experts, dtype=bool)[np.asarray(routes.choices.expert_GSK)]
    one_hot_GSKE &= np.asarray(routes.choices.valid_GSK)[..., None]
    return one_hot_GSKE.any(axis=2).reshape(num_tokens, num_experts)
  token_GEC, valid_GEC = np.asarray(routes.token_index_GEC), np.asarray(routes.valid_GEC)
  g, e, c = np.nonzero(valid_GEC)
  assigned_GSE = np.zeros((len(token_GEC), num_tokens // len(token_GEC), num_experts), bool)
  assigned_GSE[g, token_GEC[g, e, c], e] = True
  return assigned_GSE.reshape(num_tokens, num_experts)


def routing_statistics(network, variables, batches, chars: Sequence[str]) -> dict[str, dict]:
  """`summarize_layer` of each MoE layer over `batches`."""
  stats = {}
  for batch in batches:
    for layer, (assigned_NE, logits_NE) in capture_routing(network, variables, batch).items():
      tokens_N, real_N = positions(layer, batch)
      assigned_NE = assigned_NE & real_N[:, None]
      s = stats.setdefault(layer, {"counts_EV": np.zeros((assigned_NE.shape[1], len(chars))),
                                   "tokens": 0, "dropped": 0, "entropy_sum": 0.0,
                                   "has_logits": logits_NE is not None})
      for expert, assigned_N in enumerate(assigned_NE.T):
        s["counts_EV"][expert] += np.bincount(tokens_N[assigned_N],
                                              minlength=len(chars))[:len(chars)]
      s["tokens"] += int(real_N.sum())
      s["dropped"] += int((real_N & ~assigned_NE.any(axis=1)).sum())
      if logits_NE is not None:  # entropy (nats) of softmax(logits)
        logp_NE = logits_NE - np.logaddexp.reduce(logits_NE, axis=-1, keepdims=True)
        s["entropy_sum"] += float(-np.sum(np.exp(logp_NE) * logp_NE, axis=-1)[real_N].sum())
  return {layer: summarize_layer(s, chars) for layer, s in stats.items()}


def summarize_layer(s: Mapping, chars: Sequence[str]) -> dict:
  """Shares of one layer: token_share_E (sums to 1), class_share_EC (each busy expert's row
  sums to 1), class_share_C (all assignments), drop_rate, entropy, top characters."""
  counts_EV = s["counts_EV"]
  table_VC = np.eye(len(TOKEN_CLASSES))[[char_class(c) for c in chars]]
  counts_EC = counts_EV @ table_VC
  per_expert_E = counts_EC.sum(axis=1)
  top = [[(chars[v], int(counts_EV[e, v])) for v in np.argsort(-counts_EV[e], kind="stable")
          [:TOP_CHARS] if counts_EV[e, v] > 0] for e in range(len(counts_EV))]
  return {
      "num_experts": len(counts_EV),
      "tokens": s["tokens"],
      "token_share_E": per_expert_E / max(per_expert_E.sum(), 1.0),
      "class_share_EC": counts_EC / np.maximum(per_expert_E[:, None], 1.0),
      "class_share_C": counts_EC.sum(axis=0) / max(counts_EC.sum(), 1.0),
      "drop_rate": s["dropped"] / max(s["tokens"], 1),
      "entropy": s["entropy_sum"] / max(s["tokens"], 1) if s["has_logits"] else None,
      "top_chars_E": top,
  }


# ------------------------------------------------------------------------------------------
# Pictures and the markdown summary.


def file_stem(layer: str) -> str:
  return layer.replace("/", "_")


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only, no display
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  _pyplot().close(fig)


def plot_load(path: str, layer: str, steps, load_TE) -> None:
  plt = _pyplot()
  load_ET, steps = np.asarray(load_TE).T, np.asarray(steps, float)
  fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * len(load_ET)))
  # One column per logged step, its edges halfway to the neighbours (uneven logs stay honest).
  mesh = ax.pcolormesh(steps, np.arange(len(load_ET)), load_ET, cmap="viridis",
                       shading="nearest")
  fig.colorbar(mesh, ax=ax, label="fraction of routing choices")
  ax.set(xlabel="step", ylabel="expert", yticks=range(len(load_ET)),
         title=f"expert load, {layer} (uniform = {1 / len(load_ET):.3f})")
  _save(fig, path)


def plot_classes(path: str, layer: str, summary: Mapping) -> None:
  plt = _pyplot()
  share_EC, token_share_E = summary["class_share_EC"], summary["token_share_E"]
  experts = np.arange(len(share_EC))
  fig, ax = plt.subplots(figsize=(2 + 0.6 * len(experts), 4.5))
  bottoms_EC = np.cumsum(share_EC, axis=1) - share_EC
  for c, name in enumerate(TOKEN_CLASSES):
    ax.bar(experts, share_EC[:, c], bottom=bottoms_EC[:, c], label=name,
           color=plt.get_cmap("tab10").colors[c])
  ax.set_xticks(experts, [f"{e}\n{100 * token_share_E[e]:.0f}%" for e in experts])
  ax.set(xlabel="expert (its share of the tokens)", ylabel="share of the expert's tokens",
         ylim=(0, 1), title=f"token classes per expert, {layer}")
  ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
  _save(fig, path)


def _show(char: str) -> str:
  """A character as a markdown table cell shows it."""
  if not char:
    return "(special)"
  if char == " ":
    return "space"
  shown = repr(char)[1:-1] if not char.isprintable() else char  # newline -> \\n
  if char == "`":
    return "`` ` ``"
  return "`" + shown.replace("|", "\\|") + "`"


def _classes(share_C, limit: int = len(TOKEN_CLASSES)) -> str:
  """'letters 60%, spaces 18%': the classes of at least 0.5%, largest first."""
  order = np.argsort(-np.asarray(share_C), kind="stable")[:limit]
  return ", ".join(f"{TOKEN_CLASSES[c]} {100 * share_C[c]:.0f}%" for c in order
                   if share_C[c] >= 0.005)


def markdown(model_dir: str, header: Mapping, layers: Mapping[str, dict], history,
             training: Mapping) -> str:
  lines = [f"# Routing report: {model_dir}", "",
           f"Checkpoint step {header['step']}; task `{header['task']}`, split "
           f"`{header['split']}`: {header['batches']} batches. Experts are those that process "
           f"each token under the eval capacity factor; entropy of softmax(router logits) in "
           f"nats; drop rate = share of tokens no expert processes."]
  if training:
    lines.append("")
    lines.append(f"Training's last log (step {training['step']}, means over MoE layers): "
                 f"fraction_dropped {training['fraction_dropped']:.4f}, router_confidence "
                 f"{training['router_confidence']:.3f}.")
  for layer, s in layers.items():
    entropy = ("n/a" if s["entropy"] is None else
               f"{s['entropy']:.3f} (uniform: {np.log(s['num_experts']):.3f})")
    lines += ["", f"## {layer}", "",
              f"{s['num_experts']} experts, {s['tokens']} tokens; router entropy {entropy}; "
              f"drop rate {100 * s['drop_rate']:.2f}%. All tokens: "
              f"{_classes(s['class_share_C'])}.",
              ""]
    stem = file_stem(layer)
    if layer in history:
      lines.append(f"![expert load over training](expert_load_{stem}.png)")
    lines += [f"![token classes per expert](token_classes_{stem}.png)", "",
              "| expert | share of tokens | top classes | most common characters |",
              "|---:|---:|---|---|"]
    for e in range(s["num_experts"]):
      chars = " ".join(_show(c) for c, _ in s["top_chars_E"][e])
      lines.append(f"| {e} | {100 * s['token_share_E'][e]:.1f}% | "
                   f"{_classes(s['class_share_EC'][e], 3)} | {chars} |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# The whole report.


def _query(name: str, default=None):
  """A gin binding of the parsed recorded config, macros resolved."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    value = gin.query_parameter(name)
  except ValueError:
    return default
  while isinstance(value, gin.config.ConfigurableReference) and str(value).startswith("%"):
    value = gin.query_parameter(str(value))
  return value


def load_run(model_dir: str, mesh) -> tuple:
  """(network, variables, task, task_feature_lengths, pack, vocabulary) of a training run: its
  recorded config.gin parsed and its latest checkpoint placed on `mesh` (as scripts/eval.py)."""
  import gin  # pylint: disable=g-import-not-at-top
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from moe_jax.models import build_network  # pylint: disable=g-import-not-at-top
  from moe_jax.train import trainer  # pylint: disable=g-import-not-at-top
  with gin.unlock_config():  # registering its configurables after an earlier parse (as cli)
    from moe_jax import inference  # pylint: disable=g-import-not-at-top
  recorded = gin_utils.recorded_config(model_dir)
  if recorded is None:
    raise FileNotFoundError(f"{model_dir!r} holds no recorded config.gin: not a MODEL_DIR "
                            f"that scripts/train.py wrote")
  gin_utils.parse_gin([recorded])
  network = build_network()
  task, lengths = _query("train.mixture_or_task_name"), _query("train.task_feature_lengths")
  _, vocab = trainer.check_task(task, network)
  variables = {"params": inference.load_params_onto_mesh(network, model_dir, mesh),
               **inference.load_model_state_onto_mesh(network, model_dir, mesh)}
  return network, variables, task, lengths, _query("train.pack", True), vocab


def routing_report(model_dir: str, out_dir: Optional[str] = None, split: str = "validation",
                   max_batches: Optional[int] = 20, batch_size: int = 16) -> dict:
  """Writes the report's PNGs and report.md into `out_dir` (default MODEL_DIR/routing_report);
  returns {"report": path, "layers": {layer: summary}, "files": [paths]}."""
  import jax  # pylint: disable=g-import-not-at-top
  from moe_jax.train import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from moe_jax.train import partitioning, trainer  # pylint: disable=g-import-not-at-top
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
  records = read_metrics(model_dir)
  mesh = partitioning.make_mesh((1, 1, 1))
  with jax.set_mesh(mesh):
    network, variables, task, lengths, pack, vocab = load_run(model_dir, mesh)
    batches = trainer.input_batches(task, lengths, split, batch_size, shuffle=False, seed=0,
                                    num_epochs=1, pack=pack, drop_remainder=False)
    batches = [b for _, b in zip(range(max_batches or 2**62), batches)]
    if not batches:
      raise ValueError(f"{task!r} split {split!r} yielded no batch")
    vocab_size = getattr(network, "vocab_size", vocab.vocab_size)
    layers = routing_statistics(network, variables, batches, token_chars(vocab, vocab_size))
  if not layers:
    raise ValueError(f"{type(network).__name__} of {model_dir!r} has no MoE layer to report")
  out_dir = out_dir or os.path.join(model_dir, "routing_report")
  os.makedirs(out_dir, exist_ok=True)
  history = load_history(records)
  files = []
  for layer, summary in layers.items():
    stem = file_stem(layer)
    if layer in history:
      files.append(os.path.join(out_dir, f"expert_load_{stem}.png"))
      plot_load(files[-1], layer, *history[layer])
    files.append(os.path.join(out_dir, f"token_classes_{stem}.png"))
    plot_classes(files[-1], layer, summary)
  header = {"step": ckpt_lib.resolve_checkpoint_path(model_dir)[1], "task": task,
            "split": split, "batches": len(batches)}
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(markdown(model_dir, header, layers, history, last_training_metrics(records)))
  return {"report": path, "layers": layers, "files": files + [path]}
