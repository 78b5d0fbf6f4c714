"""experiments/bench_lmeval.py: hm3 and lm-eval take turns going first, so a shared machine's drift hits both alike."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_lmeval  # noqa: E402


def test_the_side_that_scores_a_candidate_first_alternates():
    calls: list[tuple[str, str]] = []

    def ours(state):
        calls.append(("hm3", state))
        return {"t": 0.5}, 1.0, 0.1

    def theirs(path):
        calls.append(("lm-eval", path.name))
        return {"t": 0.5}, 2.0, 0.5

    candidates = [Path("c0"), Path("c1"), Path("c2")]
    rows = bench_lmeval.scored_rows(candidates, ["c0", "c1", "c2"], 2, ours, theirs)
    assert len(rows) == 6 and all(r["equal"] for r in rows)
    pairs = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert all({who for who, _ in pair} == {"hm3", "lm-eval"} and pair[0][1] == pair[1][1] for pair in pairs)
    first = [pair[0][0] for pair in pairs]
    assert first.count("hm3") == first.count("lm-eval") == 3
    assert [r["first"] for r in rows] == first  # each row says which side went first
