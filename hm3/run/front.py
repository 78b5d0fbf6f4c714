"""A run's outputs, written one way for both kinds of run (:mod:`hm3.run.directory` has the layout).

Given the candidates a front is chosen from (their stored validation scores), :func:`write_front`
takes the non-dominated set, scores each front point on the test split through the evaluation
session (so from the store when already there), writes one point file per front point that runs
anywhere (absolute model paths: ``hm3 merge`` for a recipe, ``hm3 export`` for either), and the
tables. The caller adds what only its kind of run knows to the summary.

Scores here are the session's utilities (higher is better on every axis), so the tables, the summary
and the plot can be read and compared the same way for every objective. For an objective whose raw
metric is better when lower, its ``<name>_val``/``<name>_test`` columns hold ``1 - raw`` (``-raw`` for
an unbounded metric such as perplexity: :func:`objectives.base.utility_map`), and the tables add the
raw metric as ``<name>_val_raw``/``<name>_test_raw``; the summary says which objectives these are and
how (``higher_is_better``, ``utility_maps``, ``score_orientation``) and the plot's axis labels say so too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hm3.atomic import atomic_write_text
from hm3.errors import RunFileError, StoreError
from hm3.eval.session import MERGE_KIND, EvaluationSession, MergeCandidate, PathCandidate
from hm3.merge.inmemory import MERGE_DTYPE
from hm3.report import plot_front, write_csv
from hm3.run.directory import (
    CANDIDATES_FILE,
    FRONT_FILE,
    LEVEL1_DIR,
    PLOT_FILE,
    POINTS_DIR,
    REFINE_EVENT,
    RUN_FORMAT,
    SUMMARY_FILE,
    read_candidates,
    read_front,
    read_summary,
    rewrite_hint,
    summary_utility_maps,
)
from hm3.search.pareto import non_dominated, protocol_hypervolume
from hm3.search.references import reference_points, reference_scores
from hm3.search.run_config import RunConfig
from hm3.store import RunStore
from objectives.base import IDENTITY, utility

ORIENTATION_NOTE = ("score columns and hypervolumes are utilities (higher is better): for an objective whose "
                    "raw metric is better when lower, 1 - raw (-raw when unbounded: utility_maps); its raw metric "
                    "is in the <name>_val_raw and <name>_test_raw columns")
HV_PROTOCOL = ("objectives normalised to (f - base) / (ideal - base), ideal = best expert per task; "
               "reference point = base model (0); pymoo HV")


@dataclass(frozen=True)
class CandidateRow:
    """A candidate the front is chosen from: its store id, level, kind and validation scores."""

    point: int
    level: int
    kind: str
    validation: np.ndarray


def stored_row(session: EvaluationSession, point: int, level: int, kind: str) -> CandidateRow:
    """A candidate of the run with its stored validation scores (a store without them is inconsistent)."""
    scores = session.stored_scores(point, session.validation)
    if scores is None:
        raise StoreError(f"run store {session.store.path} is inconsistent: candidate {point} of the run has no "
                         "stored validation scores")
    return CandidateRow(point, level, kind, scores)


def with_refinements(session: EvaluationSession, rows: Sequence[CandidateRow]) -> list[CandidateRow]:
    """``rows`` and the merges that preference requests refined (``hm3 request --refine``), each
    candidate once: a refinement that beats the front joins it."""
    out = {r.point: r for r in rows}
    for event in session.store.events(REFINE_EVENT, fields=("candidate",)):
        cid = int(event.payload["candidate"])
        if cid not in out:
            out[cid] = stored_row(session, cid, 1, MERGE_KIND)
    return list(out.values())


@dataclass(frozen=True)
class WrittenFront:
    """What :func:`write_front` chose and wrote: the front's ids and the summary's keys about it."""

    front_ids: list[int]
    summary: dict[str, Any]
    candidates: np.ndarray  # validation scores of every candidate
    front: np.ndarray  # and of the front points, in front_ids order
    front_paths: np.ndarray  # which front points are level-2 paths

    def plot(self, out_dir: Path, summary: Mapping[str, Any]) -> Path:
        return plot(out_dir, summary, self.candidates, self.front, self.front_paths, self.front_ids)


def write_front(session: EvaluationSession, cfg: RunConfig, out_dir: Path, rows: Sequence[CandidateRow],
                base: np.ndarray, ideal: np.ndarray, *, log: Callable[[str], None],
                refinements: bool = True) -> WrittenFront:
    """front.csv, candidates.csv and points/ in ``out_dir``, for the front of ``rows`` and (with
    ``refinements``, a run's own outputs) the merges that requests refined."""
    import pandas as pd  # here: a preference request imports this module and needs no pandas at budget 0

    names = session.objective_names
    lower = {n: how for n, how in zip(names, session.utility_maps, strict=True) if how != IDENTITY}
    searched = len(rows)
    if refinements:
        rows = with_refinements(session, rows)
    Y = np.stack([r.validation for r in rows])
    front = [rows[i] for i in non_dominated(Y)]
    log(f"front: {len(front)} of {len(rows)} candidates; scoring them on the test split")
    refs_test, base_t, ideal_t = reference_points(session, cfg.search_space, session.test)
    refs_val = reference_scores(session, cfg.search_space, session.validation)
    table = []
    recipes = [session.store.candidate(row.point)[1] for row in front]
    candidates = [MergeCandidate(recipe) if row.kind == MERGE_KIND else PathCandidate.from_recipe(recipe)
                  for row, recipe in zip(front, recipes, strict=True)]
    tested = session.score_many(candidates, session.test)
    for row, recipe, scored in zip(front, recipes, tested, strict=True):
        y_test = scored.scores
        file = write_point_file(out_dir, row.point, row.kind, recipe, session.store, cfg)
        table.append(_table_row(row, names, lower) | _score_columns(names, y_test, "test", lower)
                     | {"file": str(file.relative_to(out_dir))})
    df = pd.DataFrame(table).sort_values(f"{names[0]}_val", ascending=False)
    write_csv(df, out_dir / FRONT_FILE)
    write_csv(pd.DataFrame([_table_row(r, names, lower) for r in rows]), out_dir / CANDIDATES_FILE)
    test_front = df[[f"{n}_test" for n in names]].to_numpy()
    summary = {
        "run_format": RUN_FORMAT,
        "objectives": names,
        "candidates": len(rows),
        "front_size": len(front),
        # front.csv's point ids: front.csv is written first, so readers tell a rewrite cut between the two
        "front_points": sorted(r.point for r in front),
        "front_levels": {str(lv): int(sum(r.level == lv for r in front)) for lv in (1, 2)},
        "hv_validation": protocol_hypervolume(Y, base, ideal),
        "hv_test_front": protocol_hypervolume(test_front, base_t, ideal_t) if len(test_front) else 0.0,
        "reference_validation": {r: v.tolist() for r, v in refs_val.items()},
        "reference_test": {r: v.tolist() for r, v in refs_test.items()},
        "base_validation": np.asarray(base).tolist(),
        "ideal_validation": np.asarray(ideal).tolist(),
        "hv_protocol": HV_PROTOCOL,
        "placement_this_process": dict(session.placement),
        "higher_is_better": dict(zip(names, map(bool, session.higher_is_better), strict=True)),
        "utility_maps": dict(zip(names, session.utility_maps, strict=True)),
    }
    if lower:
        summary["score_orientation"] = ORIENTATION_NOTE
    if len(rows) > searched:
        summary["refined_merges"] = len(rows) - searched
    return WrittenFront(front_ids=[r.point for r in front], summary=summary, candidates=Y,
                        front=np.stack([r.validation for r in front]),
                        front_paths=np.array([r.kind != MERGE_KIND for r in front]))


def _table_row(row: CandidateRow, names: Sequence[str], lower: Mapping[str, str]) -> dict[str, Any]:
    return {"point": row.point, "level": row.level, "kind": row.kind} | _score_columns(
        names, row.validation, "val", lower)


def _score_columns(names: Sequence[str], utilities: np.ndarray, split: str,
                   lower: Mapping[str, str]) -> dict[str, float]:
    """``<name>_<split>`` utilities, then the raw metric of the lower-is-better ones (``lower``: name -> map;
    each map is its own inverse)."""
    columns = {f"{n}_{split}": float(v) for n, v in zip(names, utilities, strict=True)}
    return columns | {f"{n}_{split}_raw": utility(columns[f"{n}_{split}"], how) for n, how in lower.items()}


def axis_labels(summary: Mapping[str, Any]) -> list[str]:
    """The objectives' names as plot axes, marked where the axis is ``1 - raw`` or ``-raw`` of a lower-is-better
    metric."""
    names = summary["objectives"]
    return [n if how == IDENTITY else f"{n} ({how}; raw: lower is better)"
            for n, how in zip(names, summary_utility_maps(summary, names), strict=True)]


def write_point_file(out_dir: Path, point: int, kind: str, recipe: dict[str, Any], store: RunStore,
                     cfg: RunConfig) -> Path:
    """``points/point-N.yml`` (a merge recipe ``hm3 merge`` runs) or ``point-N.json`` (a path)."""
    if kind == MERGE_KIND:
        file = out_dir / POINTS_DIR / f"point-{point}.yml"
        atomic_write_text(file, yaml.safe_dump(recipe_with_paths(recipe, cfg.models), sort_keys=False))
    else:
        file = out_dir / POINTS_DIR / f"point-{point}.json"
        atomic_write_text(file, json.dumps(path_point_file(recipe, store, cfg), indent=2))
    return file


def recipe_with_paths(recipe: dict, models: Mapping[str, str]) -> dict:
    """A stored recipe (model refs) as a file ``hm3 merge`` runs anywhere (absolute model and Fisher file
    paths: a search stores its Fisher files' paths as it wrote them, relative where RUN_DIR was given
    relative), merged in the dtype it was scored in: a search merges in float32 whatever the models' dtype,
    so a recipe that names none gets ``dtype: float32`` (without it, models stored in bfloat16 would be
    merged in bfloat16)."""
    out = dict(recipe)
    out.setdefault("dtype", MERGE_DTYPE)
    out["base_model"] = str(Path(models[recipe["base_model"]]).resolve())
    out["models"] = [_with_paths(m, models) for m in recipe["models"]]
    return out


def _with_paths(entry: dict[str, Any], models: Mapping[str, str]) -> dict[str, Any]:
    """One ``models:`` entry with its model's absolute path, and its Fisher file's (if any)."""
    out = entry | {"model": str(Path(models[entry["model"]]).resolve())}
    params = entry.get("parameters") or {}
    if isinstance(params.get("fisher"), str):
        out["parameters"] = params | {"fisher": str(Path(params["fisher"]).resolve())}
    return out


def path_point_file(recipe: dict[str, Any], store: RunStore, cfg: RunConfig) -> dict[str, Any]:
    """A front path as a self-contained file: hops, expert directories and the frame (a recipe or the base)."""
    frame = recipe["frame"]
    frame_recipe = None if frame == "base" else recipe_with_paths(store.candidate(int(frame))[1], cfg.models)
    return {
        "path": recipe["path"],
        "experts": {ref: str(Path(cfg.models[ref]).resolve()) for ref in recipe["experts"]},
        "frame": frame,
        "frame_recipe": frame_recipe,
        "base_model": str(Path(cfg.models[cfg.search_space.base_model]).resolve()),
    }


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2))


def plot(out_dir: Path, summary: Mapping[str, Any], candidates: np.ndarray, front: np.ndarray,
         front_paths: np.ndarray, front_ids: Sequence[int]) -> Path:
    """front.png: every candidate, the front (``front_paths`` marks its level-2 paths, ``front_ids``
    labels its points), the references, and level 1's hypervolume after each evaluation."""
    return plot_front(
        out_dir / PLOT_FILE, axis_labels(summary), candidates=candidates, front=front,
        references={r: np.array(v) for r, v in summary["reference_validation"].items()},
        title=plot_title(summary), paths=front_paths, front_ids=list(front_ids), hv_trace=level1_trace(out_dir, summary),
    )


def level1_trace(run_dir: Path, summary: Mapping[str, Any]) -> list[float]:
    """Level 1's hypervolume after each evaluation: a level-1 search's own, a two-level run's level 1's
    ([] when level 1 was skipped)."""
    if "hv_trace_validation" in summary:
        file, trace, kind = run_dir / SUMMARY_FILE, summary["hv_trace_validation"], "level1"
    else:
        file, kind = run_dir / LEVEL1_DIR / SUMMARY_FILE, "two-level"
        if not file.is_file():
            return []
        trace = read_summary(file, keys=(), regenerate=rewrite_hint(run_dir, kind)).get("hv_trace_validation", [])
    if not isinstance(trace, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in trace):
        raise RunFileError(f"{file}: corrupt run summary (hv_trace_validation is not a list of finite numbers); "
                           f"{rewrite_hint(run_dir, kind)}")
    return [float(v) for v in trace]


def plot_title(summary: Mapping[str, Any]) -> str:
    if summary.get("run_kind", "two-level" if "level2_paths" in summary else "level1") == "level1":
        return f"level 1 ({summary['optimizer']}, {summary['evaluations']} evaluations, validation)"
    return f"two-level front ({summary['candidates']} candidates, validation)"


def replot(run_dir: str | Path) -> Path:
    """front.png of a finished run again, from its tables and summary."""
    run_dir = Path(run_dir)
    df, summary = read_front(run_dir)
    cols = [f"{n}_val" for n in summary["objectives"]]
    candidates = read_candidates(run_dir)
    every = df if candidates is None else candidates  # a level-1 search of before candidates.csv: its front
    return plot(run_dir, summary, every[cols].to_numpy(), df[cols].to_numpy(), (df["level"] == 2).to_numpy(),
                df["point"].tolist())
