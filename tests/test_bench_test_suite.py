"""The README commands' timing: each clone goes first in every other round, and failed runs are counted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import bench_test_suite  # noqa: E402


def test_each_clone_goes_first_in_every_other_round_and_failures_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_test_suite, "git", lambda *a, **k: a[-1] * 40)
    monkeypatch.setattr(bench_test_suite, "clone", lambda commit, dest: dest)

    def fake_timed(cmd, cwd: Path, log: Path) -> dict:
        busy = 300.0 if cwd.name == "baseline" else next(current_busy)
        return {"seconds": 100.0, "busy_core_seconds": busy, "exit_code": int(cwd.name == "baseline"),
                "load_at_start": 0.0, "summary": ""}

    current_busy = iter([500.0, 700.0])

    monkeypatch.setattr(bench_test_suite, "timed", fake_timed)
    out = tmp_path / "out.json"
    assert bench_test_suite.main(["--baseline", "a", "--current", "b", "--rounds", "2", "--what", "suite",
                                  "--work", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(x["round"], x["checkout"]) for x in result["runs"]] == [
        (0, "baseline"), (0, "current"), (1, "current"), (1, "baseline")]
    assert result["summary"]["suite"]["failed_runs"] == 2
    # each commit's mean CPU time, and that spread over the machine's cores
    cores = result["cores"]
    assert cores == os.cpu_count() and result["summary"]["suite"]["cpu"] == {
        "baseline": {"mean_busy_core_s": 300.0, "floor_s": round(300.0 / cores, 1)},
        "current": {"mean_busy_core_s": 600.0, "floor_s": round(600.0 / cores, 1)}}
