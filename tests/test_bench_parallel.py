"""experiments/bench_parallel.py's pieces: the timed batch loop on the micro zoo, and the HV target's arithmetic."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_parallel  # noqa: E402


def test_the_timed_loop_asks_in_batches_and_traces_the_hv_of_every_evaluation(tmp_path, micro_zoo_dir):
    cfg = bench_parallel.run_config(micro_zoo_dir, "random", 4, 0, 2)
    row = bench_parallel.timed_search(cfg, tmp_path / "run", 2, threads=1)
    assert (row["evaluations"], row["batches"]) == (4, 2)
    assert row["asks"] == 2 and 0 < row["proposal_seconds"] < row["loop_seconds"]  # the driver's asks timed apart
    trace = row["hv_trace_validation"]
    assert len(trace) == 4 and all(b >= a for a, b in zip(trace, trace[1:], strict=False))
    assert row["evaluations_per_second"] == pytest.approx(4 / row["loop_seconds"])
    assert row["startup_seconds"] > 0 and row["reference_seconds"] > 0


def test_the_hv_target_compares_the_q_batch_mean_at_the_budget_with_the_sequential_mean():
    runs = [{"q": 1, "hv_trace_validation": [0.1, 0.4, 0.5]}, {"q": 1, "hv_trace_validation": [0.2, 0.3, 0.7]},
            {"q": 4, "hv_trace_validation": [0.0, 0.2, 0.6]}, {"q": 4, "hv_trace_validation": [0.1, 0.5, 0.5]}]
    s = bench_parallel.hv_summary(runs, 4, 2)  # at 2 evaluations: sequential 0.35, q = 4 0.35
    assert s["target"]["ratio_q_to_sequential"] == pytest.approx(1.0)
    assert s["target"]["met"] is True
    s = bench_parallel.hv_summary(runs, 4, 3)  # at 3: sequential 0.6, q = 4 0.55
    assert s["hv_at_budget"]["4"] == {"mean": pytest.approx(0.55), "min": 0.5, "max": 0.6}
    assert s["target"]["ratio_q_to_sequential"] == pytest.approx(0.55 / 0.6)
    assert s["target"]["met"] is False
    assert s["mean_hv_curves"]["1"] == pytest.approx([0.15, 0.35, 0.6])


def test_the_smollm2_pool_path_makes_its_experts_and_runs_on_named_models(tmp_path, micro_zoo_dir):
    # the micro zoo's base stands in for SmolLM2 (already there, so nothing is imported): the pool's code path
    # makes one synthetic variant per task and the run config names those models instead of a zoo
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(micro_zoo_dir / "base", pool / "base")
    record = bench_parallel.smollm2_pool(pool, lambda m: None)
    assert sorted(record["experts"]) == ["code", "math", "translation"]
    assert all((pool / task / "config.json").is_file() for task in record["experts"])
    cfg = bench_parallel.run_config(micro_zoo_dir, "random", 2, 0, 2, pool=pool)
    assert cfg.search_space.models == ["math", "code", "translation"]
    assert cfg.models["math"] == str((pool / "math").resolve())
    row = bench_parallel.timed_search(cfg, tmp_path / "run", 2, threads=1)
    assert row["evaluations"] == 2
