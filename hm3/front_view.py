"""What a finished run evaluated, as plain data a report draws: every candidate with its scores, the
front, the reference models and the hypervolume trace, read alike from a two-level ``hm3 run`` and a
level-1 ``hm3 search param`` directory.

Both kinds write ``candidates.csv`` (:mod:`hm3.run.directory`); a level-1 search written before they
shared that layout keeps its candidates in its store only, and is read from there. Which run is
which, and whether it is finished, is :func:`hm3.run.directory.read_finished_run`'s decision, so a
report refuses exactly what a request refuses.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hm3.errors import RunFileError
from hm3.run.directory import CANDIDATES_FILE, FinishedRun, check_candidates, read_finished_run
from hm3.run.front import HV_PROTOCOL, axis_labels, level1_trace
from hm3.search.estimates import stored_estimate
from hm3.search.level1 import told_points
from hm3.store import RunStore


@dataclass(frozen=True)
class EvaluatedPoint:
    """One candidate scored on the whole validation plan."""

    id: int  # the run store's candidate id (front.csv's point/candidate column)
    level: int  # 1: a merge found by level 1; 2: a level-2 layer path
    kind: str  # "merge" or "path"
    validation: tuple[float, ...]  # one per objective, as front.csv's <name>_val (utilities: higher is better)
    test: tuple[float, ...] | None  # measured for front points only
    on_front: bool
    recipe: dict[str, Any]  # as the store keys it (model refs, not paths)


@dataclass(frozen=True)
class RunView:
    run_dir: Path
    command: str  # the command that made the run: "hm3 run" or "hm3 search param"
    objectives: list[str]
    axis_labels: list[str]  # the objectives as plot axes: marked where the score is a lower-is-better metric's utility
    points: list[EvaluatedPoint]
    references: dict[str, list[float]]  # reference models' validation scores
    base: list[float]  # the hypervolume protocol's 0 and 1 (validation)
    ideal: list[float]
    hv_validation: float
    hv_test_front: float
    hv_trace: list[float]  # level 1's hypervolume after each evaluation ([] when level 1 was skipped)
    hv_protocol: str  # how the hypervolumes are normalised and their reference point


def read_run_view(run_dir: str | Path) -> tuple[RunView, FinishedRun]:
    """The :class:`RunView` of a finished run of either kind, and the :class:`FinishedRun` requests read."""
    run_dir = Path(run_dir)
    run = read_finished_run(run_dir)
    check_candidates(run)  # every row is drawn
    summary = json.loads((run_dir / "summary.json").read_text())  # checked by read_finished_run
    two_level = run.kind == "two-level"
    front_test = _front_test_scores(run_dir / "front.csv", run.names)
    with RunStore.open(run_dir, readonly=True) as store:
        listed = (run_dir / CANDIDATES_FILE).is_file()
        scores = _listed_candidates(run_dir, run.names) if listed else _level1_candidates(store, run.names)
        points = [
            EvaluatedPoint(id=cid, level=level, kind=kind, validation=tuple(val), test=front_test.get(cid),
                           on_front=cid in front_test, recipe=store.candidate(cid)[1])
            for cid, (level, kind, val) in scores.items()
        ]
    missing = sorted(set(front_test) - set(scores))
    if missing:
        raise RunFileError(f"{run_dir}: front point(s) {', '.join(map(str, missing))} are not among the run's "
                           "evaluated candidates; the run directory is inconsistent")
    trace = level1_trace(run_dir, summary)  # refused, naming the file, when damaged
    return RunView(
        run_dir=run_dir, command="hm3 run" if two_level else "hm3 search param", objectives=run.names,
        axis_labels=axis_labels(summary),
        points=points, references=summary["reference_validation"], base=run.base.tolist(), ideal=run.ideal.tolist(),
        hv_validation=float(summary["hv_validation"]), hv_test_front=float(summary["hv_test_front"]),
        hv_trace=trace, hv_protocol=str(summary.get("hv_protocol", HV_PROTOCOL)),
    ), run


def _front_test_scores(path: Path, names: list[str]) -> dict[int, tuple[float, ...]]:
    """Front point id -> test scores, from ``front.csv`` of either kind of run."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    id_column = "point" if rows and "point" in rows[0] else "candidate"
    return {int(r[id_column]): tuple(float(r[f"{n}_test"]) for n in names) for r in rows}


def _listed_candidates(run_dir: Path, names: list[str]) -> dict[int, tuple[int, str, list[float]]]:
    """Every candidate the front was chosen from, scored on the whole validation plan (``candidates.csv``)."""
    with (run_dir / "candidates.csv").open(newline="") as f:
        return {int(r["point"]): (int(r["level"]), r["kind"], [float(r[f"{n}_val"]) for n in names])
                for r in csv.DictReader(f)}


def _level1_candidates(store: RunStore, names: list[str]) -> dict[int, tuple[int, str, list[float]]]:
    """Every merge a level-1 search of the earlier layout evaluated. It scores each on its whole
    validation plan and on nothing else, so the mean of the validation scores the store holds for a
    candidate is that score."""
    out: dict[int, tuple[int, str, list[float]]] = {}
    for cid, _ in told_points(store):
        estimate = stored_estimate(store, cid, names)
        if estimate is None:
            raise RunFileError(f"run store {store.path}: evaluated candidate {cid} has no validation scores")
        out[cid] = (1, "merge", estimate[0].tolist())
    return out


def describe(recipe: dict[str, Any]) -> str:
    """A recipe or a layer path in one or a few short lines, for hover text and captions."""
    if "path" in recipe:
        pool = [*recipe["experts"], "frame"]
        frame = "the base model" if recipe["frame"] == "base" else f"merge {recipe['frame']}"
        hops = " → ".join(f"{pool[m]}:L{layer}" for m, layer in recipe["path"]["hops"])
        scales = recipe["path"].get("scales")
        return f"layer path, frame = {frame}: {hops}" + (f" (scales {_short(scales)})" if scales else "")
    lines = [f"{recipe.get('merge_method', '?')} over {recipe.get('base_model', '?')}"]
    for model in recipe.get("models", []):
        params = ", ".join(f"{k} {_short(v)}" for k, v in (model.get("parameters") or {}).items())
        lines.append(f"{model['model']}: {params}")
    if recipe.get("parameters"):
        lines.append(", ".join(f"{k} {_short(v)}" for k, v in recipe["parameters"].items()))
    return "\n".join(lines)


def _short(value: Any) -> str:
    """Numbers to 3 significant digits (lists of them too), anything else as it is."""
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.3g}"
    return str(value)
