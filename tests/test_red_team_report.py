"""experiments/red_team.py: a run of some cases (``--only``) must not stand on the benchmark page for all of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import harness  # noqa: E402
import red_team  # noqa: E402
from benchmark_report import Results  # noqa: E402


def test_a_run_of_some_cases_does_not_supersede_the_run_of_all_of_them(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setattr(red_team, "build_lab", lambda root: None)  # the cases are stand-ins: no lab needed
    monkeypatch.setattr(red_team, "CASES", [red_team.Case("alpha", "g", None), red_team.Case("beta", "g", None)])
    monkeypatch.setattr(red_team, "judge", lambda case, lab: {"case": case.name, "group": case.group, "exit": 1,
                                                               "handled": True, "checks": {}, "seconds": 0.0})
    assert red_team.main([]) == 0
    assert red_team.main(["--only", "alpha"]) == 0
    page = Results.read(tmp_path).one("red_team")
    assert (page.get("cases"), page.get("handled")) == (2, 2)
    partial = [json.loads(p.read_text()) for p in tmp_path.glob("*.json") if json.loads(p.read_text())["cases"] == 1]
    assert len(partial) == 1 and partial[0]["only"] == "alpha"
