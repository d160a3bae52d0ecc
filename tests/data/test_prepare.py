"""prepare_tiny_shakespeare (moe_jax.data.prepare): offline build, reuse, early clear errors."""

import time

import pytest

from moe_jax.data import paths, prepare, sources


def test_prepared_dataset_is_reused(tfds_dir):
  version_dir = sources.tiny_shakespeare_dir(tfds_dir)
  assert version_dir.endswith("tiny_shakespeare/1.0.0")
  start = time.perf_counter()
  assert prepare.prepare_tiny_shakespeare(tfds_dir, source_file="/nonexistent") == version_dir
  assert time.perf_counter() - start < 1.0


def test_offline_without_source_fails_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(paths, "tiny_shakespeare_source", lambda: None)
  monkeypatch.setattr(prepare, "_online", lambda: False)
  with pytest.raises(RuntimeError, match="no local text and no network.*MOE_JAX_TINY_SHAKESPEARE"):
    prepare.prepare_tiny_shakespeare(str(tmp_path))


def test_wrong_or_missing_source_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="source file not found: '/nonexistent.txt'"):
    prepare.prepare_tiny_shakespeare(str(tmp_path / "tfds"), "/nonexistent.txt")
  wrong = tmp_path / "input.txt"
  wrong.write_text("To be, or not to be\n")
  with pytest.raises(ValueError, match="is not the text TFDS tiny_shakespeare is built from"):
    prepare.prepare_tiny_shakespeare(str(tmp_path / "tfds"), str(wrong))


def test_env_vars_set_the_paths(monkeypatch, tmp_path):
  monkeypatch.setenv(paths.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  monkeypatch.setenv(paths.TINY_SHAKESPEARE_ENV, str(tmp_path / "ts.txt"))
  monkeypatch.setenv(paths.MULTI30K_DIR_ENV, str(tmp_path / "m30k"))
  assert paths.tfds_data_dir() == str(tmp_path / "tfds")
  assert paths.tiny_shakespeare_source() == str(tmp_path / "ts.txt")
  assert paths.multi30k_dir() == str(tmp_path / "m30k")
  monkeypatch.delenv(paths.TFDS_DIR_ENV)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert paths.tfds_data_dir() == str(tmp_path / "tensorflow_datasets")


def test_reading_an_unprepared_dataset_builds_it(tmp_path, tiny_shakespeare_source, caplog):
  """As tfds.load(download=True) would, from the local copy, saying so in the log."""
  caplog.set_level("INFO")
  text = sources.load_tiny_shakespeare_text("validation", str(tmp_path))
  assert len(text) > 50_000  # the 56 kB validation split
  assert sources.tiny_shakespeare_dir(str(tmp_path)).startswith(str(tmp_path))
  assert any(f"building it from the local copy {tiny_shakespeare_source}" in r.getMessage()
             for r in caplog.records)


def test_reading_unprepared_data_offline_without_source_fails_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(paths, "tiny_shakespeare_source", lambda: None)
  monkeypatch.setattr(prepare, "_online", lambda: False)
  with pytest.raises(RuntimeError, match=f"in '{tmp_path}': no local text and no network"):
    sources.load_tiny_shakespeare_text("train", str(tmp_path))
