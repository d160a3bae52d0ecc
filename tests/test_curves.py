"""Learning curves from metrics.jsonl (moe_jax.curves): resume dedup, training seconds, seed
statistics, steps to reach the baseline, the plot."""

import json

import numpy as np
import pytest

from moe_jax import curves


def _train(step, loss, seconds_per_step):
  return {"step": step, "loss": loss, "seconds_per_step": seconds_per_step}


def _eval(step, loss):
  return {"step": step, "eval/loss": loss}


# A run logged at 1, 50, 100 (checkpoint at 100) and 150, evaluated at 100, interrupted at
# ~170, resumed from 100: steps 101 (first step after the resume, with the compilation) and 150
# again, then 200.
ROWS = [_train(1, 5.0, 10.0), _train(50, 4.0, 0.2), _train(100, 3.0, 0.2), _eval(100, 3.5),
        _train(150, 2.9, 0.2), _train(101, 3.1, 8.0), _train(150, 2.5, 0.3), _eval(200, 2.0),
        _train(200, 2.2, 0.3)]


def test_a_resumed_run_keeps_the_redone_steps_and_counts_training_seconds():
  got = curves.run_curves(ROWS, ["loss", "eval/loss"])
  # Kept train rows: 1, 50, 100, 101, 150 (the second), 200.
  walls = np.cumsum([10.0 * 1, 0.2 * 49, 0.2 * 50, 8.0 * 1, 0.3 * 49, 0.3 * 50])
  assert [p[0] for p in got["loss"]] == [1, 50, 100, 101, 150, 200]
  assert [p[1] for p in got["loss"]] == [5.0, 4.0, 3.0, 3.1, 2.5, 2.2]
  np.testing.assert_allclose([p[2] for p in got["loss"]], walls)
  # Evaluations take the training seconds of the train record at their step.
  assert got["eval/loss"] == [(100, 3.5, pytest.approx(walls[2])),
                              (200, 2.0, pytest.approx(walls[5]))]


def test_rows_without_training_seconds_are_refused():
  with pytest.raises(ValueError, match="step 50 has no seconds_per_step"):
    curves.run_curves([_train(1, 5.0, 1.0), {"step": 50, "loss": 4.0}], ["loss"])


def _records(model, seed, values, step_seconds=1.0):
  return [dict(study="s", model=model, seed=seed, step=100 * (i + 1), metric="m", value=v,
               wall_s=step_seconds * 100 * (i + 1)) for i, v in enumerate(values)]


def test_seed_statistics_and_steps_to_reach_the_baseline():
  recs = (_records("dense", 0, [0.1, 0.2, 0.3, 0.4]) + _records("dense", 1, [0.1, 0.2, 0.3, 0.6])
          + _records("moe", 0, [0.2, 0.5, 0.7, 0.8], 2.0) + _records("moe", 1, [0.2, 0.3, 0.5]))
  stats = curves.seed_stats(recs, "moe", "m")  # steps logged by both seeds only
  np.testing.assert_array_equal(stats["step"], [100, 200, 300])
  np.testing.assert_allclose(stats["mean"], [0.2, 0.4, 0.6])
  np.testing.assert_allclose(stats["min"], [0.2, 0.3, 0.5])
  np.testing.assert_allclose(stats["max"], [0.2, 0.5, 0.7])
  np.testing.assert_allclose(stats["wall_s"], [150, 300, 450])  # (2 s + 1 s) / 2 per step
  dense, moe = curves.summarize(recs, ["dense", "moe"], "m", "dense", higher_is_better=True)
  assert dense["final_mean"] == pytest.approx(0.5) and dense["last_step"] == 400
  assert dense["steps_to_baseline_final"] == 400 and dense["step_ratio_to_baseline"] == 1.0
  # MoE's mean reaches dense's final 0.5 first at step 300 (0.6): 0.75 of dense's 400 steps.
  assert moe["steps_to_baseline_final"] == 300 and moe["step_ratio_to_baseline"] == 0.75
  assert moe["wall_s_to_baseline_final"] == 450 and moe["final_std"] == pytest.approx(0.1)
  # Against the MoE's final 0.6 (step 300, the last both its seeds logged) dense never gets.
  dense = curves.summarize(recs, ["dense", "moe"], "m", "moe", higher_is_better=True)[0]
  assert dense["steps_to_baseline_final"] is None and dense["step_ratio_to_baseline"] is None
  assert curves.first_step_reaching([1, 2], [0.6, 0.4], 0.5, higher_is_better=False) == 2


def test_plot_and_table(tmp_path):
  recs = _records("dense", 0, [3.0, 2.5]) + _records("moe", 0, [2.9, 2.2])
  for zoom in (None, 200):
    path = curves.plot(recs, ["dense", "moe"], "m", str(tmp_path / f"q{zoom}.png"), "title",
                       zoom_from_step=zoom)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  table = curves.markdown_table([{"model": "moe", "final": 2.2, "x": None}],
                                ["model", "final", "x"])
  assert table.splitlines() == ["| model | final | x |", "|---|---|---|", "| moe | 2.2 | - |"]


def test_records_of_a_metrics_file(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
  recs = curves.records("lm", "dense", 2, str(path), ["eval/loss"])
  assert recs == [dict(study="lm", model="dense", seed=2, step=100, metric="eval/loss",
                       value=3.5, wall_s=pytest.approx(10.0 + 0.2 * 99))]


def test_y_limits_span_the_bands_from_a_step_on():
  recs = (_records("dense", 0, [3.0, 1.70, 1.60]) + _records("dense", 1, [3.2, 1.72, 1.62])
          + _records("moe", 0, [2.9, 1.65, 1.55]))
  # From step 200: dense's band 1.60-1.72 and moe's 1.55-1.65 -> 1.55-1.72, margin 0.0085.
  low, high = curves.y_limits(recs, ["dense", "moe"], "m", 200)
  assert low == pytest.approx(1.55 - 0.0085) and high == pytest.approx(1.72 + 0.0085)
  assert curves.y_limits(recs, ["dense", "moe"], "m", 400) is None
  flat = _records("dense", 0, [2.0, 2.0])  # no spread: a margin of 5% of the value
  assert curves.y_limits(flat, ["dense"], "m", 100) == pytest.approx((1.9, 2.1))
