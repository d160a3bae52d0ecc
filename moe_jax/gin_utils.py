"""T5X-style gin flags: --gin_file and --gin_bindings (repeatable), --gin.NAME=VALUE,
--gin_search_paths."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
from typing import Sequence

import gin

import moe_jax.models  # noqa: F401  (registers the configurables)
import moe_jax.objectives  # noqa: F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (os.path.join(REPO_ROOT, "configs"), REPO_ROOT)


def _resolve(gin_file: str, search_paths: Sequence[str]) -> str:
  for base in ("",) + tuple(search_paths):
    path = os.path.join(base, gin_file) if base else gin_file
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"gin file {gin_file!r} not found; looked in the current directory and "
                          f"{list(search_paths)}")


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
    gin.parse_config_files_and_bindings(files, list(gin_bindings), finalize_config=True)


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


def parse_flags(argv: Sequence[str], parser: argparse.ArgumentParser | None = None):
  """Parses argv; `--gin.NAME=VALUE` and `--gin_bindings` become bindings, applied in the
  order given (a later one wins). Returns (args, bindings); parses gin."""
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
  return args, bindings
