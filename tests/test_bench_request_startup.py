"""The fresh-process request timing: each checkout goes first as often as the other."""

from __future__ import annotations

import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import bench_request_startup  # noqa: E402


def test_each_checkout_is_timed_first_in_half_the_pairs(tmp_path, monkeypatch):
    """The second process of a pair finds the shared virtual environment's files in the OS cache."""
    order: list[str] = []

    def fake_request(src: Path, run: Path, prefer: str, out: Path) -> tuple[float, str]:
        order.append("baseline" if src == tmp_path / "before" else "this")
        return 1.0, "answer: x"

    monkeypatch.setattr(bench_request_startup, "timed_request", fake_request)
    monkeypatch.setattr(bench_request_startup, "upgrade_posterior_file", lambda d: None)
    monkeypatch.setattr(bench_request_startup.harness, "git_commit", lambda repo=None: "a" * 40)
    assert bench_request_startup.main(["--baseline", str(tmp_path / "before"), "--runs", str(tmp_path / "run"),
                                       "--repeats", "2", "--out", str(tmp_path / "out.json")]) == 0
    firsts = order[::2]
    assert len(firsts) == 6 and firsts.count("baseline") == firsts.count("this") == 3
    assert all({a, b} == {"baseline", "this"} for a, b in zip(order[::2], order[1::2], strict=True))
