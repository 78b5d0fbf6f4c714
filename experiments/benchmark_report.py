"""The pieces of the benchmark page: results files, sections, and the markdown they render to.

A **result** is one JSON file under ``experiments/results/`` named ``BENCHMARK_DATE_COMMIT[_LABEL].json``
(:data:`harness.RESULTS_NAME`). Of the files with one benchmark and label, the one with the latest
date is current and the others are superseded: they leave the page (and can leave the tree; git
keeps them). A **section** is one benchmark's part of the page: a title, a short text that says what
is measured and why (no numbers: they come from the files), and a function that turns the current
results into tables. ``benchmark_sections.py`` holds the sections; ``report_benchmarks.py`` writes
the page.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness


@dataclass(frozen=True)
class Result:
    """One results file: where it is, what its name says, and its JSON."""

    path: Path
    benchmark: str
    date: str
    commit: str
    label: str
    data: Any

    @property
    def name(self) -> str:
        return self.path.name

    def get(self, key: str, default: Any = None) -> Any:
        """A top-level value of the JSON (files that hold a bare list have none)."""
        return self.data.get(key, default) if isinstance(self.data, dict) else default


class Results:
    """The current results, by benchmark and label."""

    def __init__(self, results: Iterable[Result]) -> None:
        latest: dict[tuple[str, str], Result] = {}
        # same day: the time the file records (a commit hash in the name says nothing of order), then the name
        for r in sorted(results, key=lambda r: (r.date, str(r.get("date") or ""), r.name)):
            latest[(r.benchmark, r.label)] = r  # a later file of the same benchmark and label supersedes
        self._current = latest

    @classmethod
    def read(cls, folder: Path = harness.RESULTS) -> Results:
        """Every results file in ``folder`` (other files are ignored)."""
        found = []
        for path in sorted(folder.glob("*.json")):
            m = harness.RESULTS_NAME.match(path.name)
            if m:
                found.append(Result(path, m["benchmark"], m["date"], m["commit"], m["label"] or "",
                                    json.loads(path.read_text())))
        return cls(found)

    def of(self, benchmark: str, label: str | None = None) -> list[Result]:
        """The current results of ``benchmark`` (whose label matches the regular expression ``label``),
        by label."""
        return sorted((r for (b, lab), r in self._current.items()
                       if b == benchmark and (label is None or re.fullmatch(label, lab))), key=lambda r: r.label)

    def one(self, benchmark: str, label: str = "") -> Result | None:
        """The current result of ``benchmark`` with exactly this label, if any."""
        return self._current.get((benchmark, label))


#: (what the target asks, what was measured, whether it is met; None when it has no yes-or-no answer)
Target = tuple[str, str, bool | None]


@dataclass(frozen=True)
class Section:
    """One benchmark on the page.

    ``render`` turns the current results into markdown: tables, what they show where that is
    computed from them, and the files they come from (:func:`sources`). It returns "" when there is
    nothing to show, and the page then prints ``pending`` (what has not been run, and how to run it).
    ``targets`` lists the section's targets for the table at the top of the page.
    """

    title: str
    intro: str
    render: Callable[[Results], str]
    targets: Callable[[Results], list[Target]] = lambda results: []
    pending: str = ""

    @property
    def anchor(self) -> str:
        """The GitHub anchor of the section's heading."""
        return re.sub(r"[^\w\- ]", "", self.title.lower()).replace(" ", "-")


# --- markdown ------------------------------------------------------------------------------------------------


def num(x: Any, spec: str = ".3f") -> str:
    """A number for a table cell; "–" when absent."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def ratio(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else f"{x:{spec}}×"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table (cells are written as given: format numbers with :func:`num` first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool | None) -> str:
    return "–" if met is None else ("met" if met else "**not met**")


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# --- provenance ----------------------------------------------------------------------------------------------


def machine_text(machine: Any) -> str:
    """What a results file says about its machine, in a few words."""
    if isinstance(machine, str):
        return machine
    if not isinstance(machine, dict):
        return "not recorded"
    cpus = machine.get("cpus") or machine.get("cpu_count") or machine.get("cores")
    parts = [machine.get("cpu") or "", f"{cpus} cores" if cpus else ""]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']:.0f} GiB")
    platform = machine.get("platform", "")
    if platform and not machine.get("cpu"):
        parts.append(platform.split("-with-")[0])
    load = machine.get("load_average") or machine.get("load_avg_end")
    if load:
        parts.append(f"load average {load[0]:.1f} at the end")
    return ", ".join(p for p in parts if p)


def command_text(result: Result, recorded: dict[str, str]) -> str:
    command = result.get("command")
    if isinstance(command, list):  # an early format: the interpreter's path and sys.argv
        command = " ".join(["python", *command[1:]])
    if command:
        return f"`{command}`"
    if result.label in recorded:
        return f"`{recorded[result.label]}` (as the benchmark page recorded it when the result was added)"
    return "not recorded"


def sources(results: Iterable[Result], recorded: dict[str, str] | None = None) -> str:
    """One line per results file: its date, commit, machine and command.

    ``recorded`` gives, by label, the command of a file written before the scripts recorded their
    command line, as the page recorded it when the result was added."""
    return "\n".join(f"- [`{r.name}`](../experiments/results/{r.name}): {r.date}, commit `{r.commit}`"
                     f"{commit_moved(r)}, {machine_text(r.get('machine'))}; {command_text(r, recorded or {})}"
                     for r in results)


def commit_moved(result: Result) -> str:
    """A note when the file records a commit other than its name's (HEAD moved while the run went: an
    earlier harness recorded the commit at the end), or one it reached by the end; else ""."""
    name = result.commit
    recorded = str(result.get("commit") or "")
    later = [c[:7] for c in (recorded, str(result.get("commit_at_end") or "")) if c and not c.startswith(name)]
    return f" (HEAD at `{later[-1]}` when it ended)" if later else ""


def git_last_change(path: Path) -> tuple[str, str]:
    """(date, short commit) of the last commit that changed ``path``, or ("", "") without git history."""
    try:
        done = subprocess.run(["git", "log", "-1", "--format=%cs %h", "--", str(path)], cwd=harness.REPO,
                              capture_output=True, text=True)
    except OSError:
        return "", ""
    parts = done.stdout.split()
    return (parts[0], parts[1]) if done.returncode == 0 and len(parts) == 2 else ("", "")


def plot_of(result: Result) -> str:
    """A markdown image of the plot saved with ``result`` (docs/benchmarks/STEM.png), or ""."""
    plot = harness.REPO / "docs" / "benchmarks" / f"{result.path.stem}.png"
    return f"![{result.path.stem}](benchmarks/{plot.name})" if plot.is_file() else ""
