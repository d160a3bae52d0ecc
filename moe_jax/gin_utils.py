"""T5X-style gin flags: --gin_file and --gin_bindings (repeatable), --gin.NAME=VALUE,
--gin_search_paths."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import importlib.util
import inspect
import logging
import os
import re
import tokenize
from typing import Sequence

import gin
from absl import logging as absl_logging

import moe_jax.models  # noqa: F401  (registers the configurables)
import moe_jax.objectives  # noqa: F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (os.path.join(REPO_ROOT, "configs"), REPO_ROOT)


def did_you_mean(name: str, candidates) -> str:
  """' (did you mean X?)' for the closest candidates, '' when none is close."""
  close = difflib.get_close_matches(name, sorted(set(candidates)), n=3)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _resolve(gin_file: str, search_paths: Sequence[str]) -> str:
  for base in ("",) + tuple(search_paths):
    path = os.path.join(base, gin_file) if base else gin_file
    if os.path.isfile(path):
      return path
  known = [os.path.relpath(f, base) for base in search_paths
           for f in glob.glob(os.path.join(base, "**", "*.gin"), recursive=True)]
  raise FileNotFoundError(f"gin file {gin_file!r} not found{did_you_mean(gin_file, known)}; "
                          f"looked in the current directory and {list(search_paths)}")


def _configurable_names() -> list[str]:
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  return [selector.rsplit(".", 1)[-1] for selector, _ in registry.items()]


def _with_suggestion(error: ValueError) -> ValueError:
  """gin's ValueError for a misspelled configurable or parameter, first line only, with the
  closest names; other errors unchanged."""
  first = str(error).splitlines()[0] if str(error) else ""
  match = re.match(r"No configurable matching '([^']+)'", first)
  if match:
    name = match.group(1).rsplit("/", 1)[-1]
    return ValueError(first + did_you_mean(name, _configurable_names()))
  match = re.match(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", first)
  if match:
    registry = gin.config._REGISTRY  # pylint: disable=protected-access
    configurable = registry.get_match(match.group(1))
    try:
      params = list(inspect.signature(configurable.wrapped).parameters) if configurable else []
    except (TypeError, ValueError):
      params = []
    return ValueError(first + did_you_mean(match.group(2), params))
  match = re.match(r"No bindings specified for '([^'/]+)/gin.macro'", first)
  if match:  # gin appends the whole config to this one
    return ValueError(f"macro %{match.group(1)} is used but never bound"
                      f"{did_you_mean(match.group(1), _macro_names())}")
  return error


def _macro_names() -> list[str]:
  return re.findall(r"^([A-Za-z_]\w*) = ", gin.config_str(), re.MULTILINE)


def check_macros_used(bindings: Sequence[str]) -> None:
  """A macro bound on the command line that nothing reads is a misspelling (gin would accept
  `--gin.TRAIN_STEP=10` silently and train the default number of steps)."""
  config = gin.config_str()
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if re.fullmatch(r"[A-Za-z_]\w*", name) and not re.search(rf"%{name}\b", config):
      others = [m for m in _macro_names() if m != name]
      raise ValueError(f"--gin.{name}: no gin file reads the macro {name}"
                       f"{did_you_mean(name, others)}")


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
              search_paths: Sequence[str] = ()) -> None:
  """Clears gin, then parses files (found via search paths) and bindings, finalizing the config.

  Misspelled configurables, parameters or macros and unknown files raise here, before any
  model is built or compiled.
  """
  search_paths = tuple(search_paths) + DEFAULT_SEARCH_PATHS
  gin.clear_config()
  for path in search_paths:
    gin.add_config_file_search_path(path)
  files = [_resolve(f, search_paths) for f in gin_files]
  with _quiet_include_probing(), _no_namespace_package_includes():
    try:
      gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=True)
    except ValueError as e:
      raise _with_suggestion(e) from e
    except (SyntaxError, tokenize.TokenError) as e:
      culprit = next((b for b in gin_bindings if not _parses(b)), None)
      where = (f"binding {culprit!r}" if culprit else
               f"one of {[os.path.basename(f) for f in files]}")
      raise ValueError(f"gin cannot parse {where}: {e}") from e


def _parses(binding: str) -> bool:
  try:
    parser = gin.config_parser.ConfigParser(binding, gin.config.ParserDelegate(skip_unknown=True))
    parser.parse_statement()
    return True
  except (SyntaxError, tokenize.TokenError):
    return False


@contextlib.contextmanager
def _no_namespace_package_includes():
  """gin also looks for `include 'runs/pretrain.gin'` inside a Python package named `runs`; when
  a directory of that name sits on sys.path (a `runs/` MODEL_DIR in the working directory, say)
  it is a namespace package without a file, and gin crashes with a TypeError. While parsing,
  such packages count as not found, so the search goes on to our config directories."""
  find_spec = importlib.util.find_spec

  def find_spec_with_a_file(name, package=None):
    spec = find_spec(name, package)
    return spec if spec is None or spec.origin is not None else None

  importlib.util.find_spec = find_spec_with_a_file
  try:
    yield
  finally:
    importlib.util.find_spec = find_spec


class _DropPathNotFound(logging.Filter):
  def filter(self, record):
    return not record.getMessage().startswith("Path not found:")


@contextlib.contextmanager
def _quiet_include_probing():
  """gin logs an ERROR for every search path an include is not under; only a miss everywhere
  is an error, and gin raises that itself."""
  noise = _DropPathNotFound()
  logging.getLogger().addFilter(noise)
  try:
    yield
  finally:
    logging.getLogger().removeFilter(noise)


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable), relative to the search paths")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="gin binding 'NAME = VALUE' (repeatable, T5X's flag), the same as "
                      "--gin.NAME=VALUE")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated extra directories to find gin files in")


RECORDED_CONFIG = "config.gin"


def recorded_config(checkpoint_path: str) -> str | None:
  """The operative config (MODEL_DIR/config.gin) that training recorded beside a checkpoint
  path (a MODEL_DIR, its checkpoints/ directory or one step directory), or None."""
  path = os.path.abspath(os.path.expanduser(checkpoint_path))
  for _ in range(3):
    if os.path.isfile(os.path.join(path, RECORDED_CONFIG)):
      return os.path.join(path, RECORDED_CONFIG)
    path = os.path.dirname(path)
  return None


def _has_model() -> bool:
  try:
    gin.query_parameter("build_network.network")
    return True
  except ValueError:
    return False


def parse_flags(argv: Sequence[str], parser: argparse.ArgumentParser | None = None,
                model_from_checkpoint: bool = False):
  """Parses argv; `--gin.NAME=VALUE` and `--gin_bindings` become bindings, applied in the
  order given (a later one wins). Returns (args, bindings); parses gin.

  model_from_checkpoint: when no --gin_file configures a model, the run's recorded config
  (`<CHECKPOINT_PATH's MODEL_DIR>/config.gin`) is parsed first, so the files and bindings
  given still win (evaluation and inference).
  """
  parser = parser or argparse.ArgumentParser()
  add_gin_flags(parser)
  args, rest = parser.parse_known_args(argv)
  # Order matters when a name is bound twice: walk argv, not the two kinds separately.
  bindings, extra = [], iter(args.gin_bindings)
  unknown = [flag for flag in rest if not (flag.startswith("--gin.") and "=" in flag)]
  if unknown:
    parser.error(f"unrecognized argument {unknown[0]!r} (gin bindings are --gin.NAME=VALUE or "
                 f"--gin_bindings='NAME = VALUE')")
  for i, flag in enumerate(argv):
    if flag.startswith("--gin.") and "=" in flag:
      bindings.append(flag[len("--gin."):])
    elif flag.startswith("--gin_bindings=") or (flag == "--gin_bindings" and i + 1 < len(argv)):
      bindings.append(next(extra))
  bindings.extend(extra)  # given under an abbreviation argparse accepted
  if not args.gin_file:
    parser.error("at least one --gin_file is required")
  search = [p for p in args.gin_search_paths.split(",") if p]
  parse_gin(args.gin_file, bindings, search)
  if model_from_checkpoint and not _has_model():
    checkpoint_path = gin.query_parameter("%CHECKPOINT_PATH")
    recorded = recorded_config(checkpoint_path)
    if recorded is None:
      raise FileNotFoundError(
          f"no --gin_file configures a model and CHECKPOINT_PATH {checkpoint_path!r} has no "
          f"recorded {RECORDED_CONFIG} beside it: pass the model's gin file, e.g. "
          f"--gin_file=models/switch_t5_tiny.gin")
    absl_logging.info("No model --gin_file given: using the run's recorded config %s", recorded)
    parse_gin([recorded] + list(args.gin_file), bindings, search)
  check_macros_used(bindings)
  return args, bindings
