"""What every experiment script shares: where its results go, and the record of how they were made.

A results file says which benchmark it holds and when, on which commit, on which machine and by
which command it was made; ``experiments/report_benchmarks.py`` builds ``docs/BENCHMARKS.md`` from
those files alone. So every script writes its JSON through :func:`write_results` with
:func:`provenance` in it, to a path named by :func:`results_path`:
``experiments/results/BENCHMARK_DATE_COMMIT[_LABEL].json``. A later run of a benchmark is a new
file beside the earlier ones, never an overwrite; the report shows the latest and git keeps the rest.

Importing this module before torch also lets idle OpenMP workers sleep instead of spinning (a
script's choice for its own process, not a library's): with libgomp's default spin the back-to-back
tensor ops of merging and scoring run many times slower whenever another process holds the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from hm3.atomic import atomic_write_text

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
#: BENCHMARK_YYYY-MM-DD_COMMIT[_LABEL].json: the benchmark's name, the run's date (UTC), its commit
RESULTS_NAME = re.compile(r"^(?P<benchmark>[a-z0-9_]+?)_(?P<date>\d{4}-\d{2}-\d{2})_(?P<commit>[0-9a-f]{7,40})"
                          r"(?:_(?P<label>[A-Za-z0-9_-]+))?\.json$")


def git_commit(repo: Path = REPO) -> str:
    """The full hash of ``repo``'s HEAD; outside a git checkout (a copy of the tree on another machine) the
    ``HM3_COMMIT`` environment variable, set by whoever made the copy, or ""."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    except OSError:
        return os.environ.get("HM3_COMMIT", "")
    return done.stdout.strip() if done.returncode == 0 else os.environ.get("HM3_COMMIT", "")


#: HEAD when this process imported the harness (scripts import it first): the code a run loaded. A run's
#: file is named by it and records it, even if HEAD moves before the run ends (a shared checkout).
START_COMMIT = git_commit()


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model and count, memory, OS, Python and torch versions,
    and the load averages at the time of the call (a shared machine's noise)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    try:
        memory_gib: float | None = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    try:
        torch_version: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": memory_gib, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch_version,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def command(argv: Sequence[str] | None = None) -> str:
    """The command line that ran this script, as a user would type it from the repository root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO)
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", str(script), *args])


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Date (UTC), commit, machine and command of a result: what the benchmark page quotes with it. The
    commit is the one the run started at (:data:`START_COMMIT`); ``commit_at_end`` is added when HEAD has
    moved since, so a reader knows the tree changed under the run."""
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": START_COMMIT,
              "machine": machine(), "command": command(argv)}
    end = git_commit()
    if end != START_COMMIT:
        record["commit_at_end"] = end
    return record


def results_path(benchmark: str, label: str | None = None, *, date: datetime | None = None,
                 commit: str | None = None) -> Path:
    """``experiments/results/BENCHMARK_DATE_COMMIT[_LABEL].json`` for a run made now (by default at the commit
    it started at)."""
    date = date or datetime.now(timezone.utc)
    commit = (commit if commit is not None else START_COMMIT)[:7] or "0000000"
    name = f"{benchmark}_{date:%Y-%m-%d}_{commit}" + (f"_{label}" if label else "") + ".json"
    if not RESULTS_NAME.match(name):
        raise ValueError(f"not a results file name: {name!r} (benchmark: a-z0-9_, label: letters, digits, _ and -)")
    return RESULTS / name


def add_out_arguments(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """``--out`` (the results file) and ``--label`` (what tells this run's variant apart in the default name)."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results JSON (default: experiments/results/{benchmark}_DATE_COMMIT[_LABEL].json)")
    parser.add_argument("--label", default=None, help="the LABEL of the default results file name (e.g. p128)")


def out_path(args: argparse.Namespace, benchmark: str, label: str | None = None) -> Path:
    """The results file of a run parsed with :func:`add_out_arguments` (``label``: the script's own default)."""
    return args.out or results_path(benchmark, args.label or label)


def write_results(path: Path, result: dict[str, Any]) -> Path:
    """Write ``result`` as indented JSON to ``path`` atomically (a reader never sees half a file)."""
    return atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def alternated(items: Sequence[Any], i: int) -> list[Any]:
    """``items`` in order for even ``i``, reversed for odd: whichever of two timed peers runs second
    finds the OS caches (files, libraries) warmed by the first, so each must go first as often."""
    return list(items) if i % 2 == 0 else list(reversed(items))
