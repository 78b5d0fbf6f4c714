"""vLLM engines in Ray workers: each worker holds its own engine and swaps merged weights into it.

Run through the command line (Ray started by hm3 itself, on this machine's CPUs) on the shipped micro
zoo, whose head size the CPU build of vLLM serves.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")]


def _search(config: Path, run: Path, *extra: str) -> dict[str, list[str]]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "hm3.cli", "-q", "search", "param", str(config), str(run), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run / "candidates.csv", newline="") as f:
        return {row["point"]: [row[k] for k in sorted(row) if k.endswith("_val")] for row in csv.DictReader(f)}


def test_vllm_workers_on_ray_score_what_a_local_vllm_engine_scores(tmp_path):
    config = tmp_path / "search.yml"
    config.write_text(yaml.safe_dump({
        "zoo": "builtin:micro", "search_space": {"dare": False}, "optimizer": {"name": "random", "budget": 2},
        "evaluation": {"backend": "vllm", "validation_examples": 8, "test_examples": 4, "batch_size": 8},
        "seed": 1}))
    local = _search(config, tmp_path / "local")
    on_ray = _search(config, tmp_path / "ray", "--workers", "2", "--set", "evaluation.executor=ray")
    assert len(local) == 2 and on_ray == local  # the same candidates, each scored the same by its worker
