"""A run directory: its files, its format checks, and reading a finished run of either kind.

``hm3 search param`` (a level-1 search) and ``hm3 run`` (both levels) write the same layout, so
``hm3 front``, ``hm3 export`` and ``hm3 request`` read either::

    RUN_DIR/
      hm3.sqlite         the run store: config, every candidate and score, events (what resumes)
      front.csv          point, level, kind, <objective>_val..., <objective>_test..., file
      candidates.csv     point, level, kind, <objective>_val...: every candidate the front is chosen from
      summary.json       objectives, the front's point ids, hypervolumes, reference scores, the HV protocol's base and ideal, ...
      front.png          the front plot
      points/            one file per front point: point-N.yml (a merge recipe) or point-N.json (a path)
      fisher/            DF-Merge's Fisher tensors (Fisher-weighted searches)
      samples/           with --log-samples: <candidate-id>/<objective>_<split>.jsonl, what each
                         candidate answered per example (hm3.samples)
      posterior.safetensors     a level-1 search's BO posterior (requests draw on it)
      level1/            a two-level run's level 1: the same layout, and its posterior
      level2/            a two-level run's policy and training checkpoints

A level-1 search written before this layout has ``candidate`` and ``recipe`` columns instead of
``point``, ``kind`` and ``file`` (and ``recipes/`` instead of ``points/``); it is read as if it
had them. Resuming it (``hm3 search param CONFIG RUN_DIR --resume``) rewrites its outputs in this
layout without evaluating anything again.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hm3.errors import ConfigError, DeviceError, Hm3Error, RunFileError, StoreError
from hm3.log import LOG_FILE
from hm3.run.config import RunKind, StoredRun, read_stored_run, stored_config
from hm3.samples import SAMPLES_DIR
from hm3.store import LOCK_FILE, STORE_FILE, RunStore
from objectives.base import utility_map

if TYPE_CHECKING:  # pandas is imported where used: a preference request needs none of it
    import pandas as pd

# STORE_FILE (hm3.sqlite) is the store's own: hm3.store names it, this module reads it from there.
FRONT_FILE = "front.csv"
CANDIDATES_FILE = "candidates.csv"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "front.png"
POINTS_DIR = "points"
FISHER_DIR = "fisher"
LEVEL1_DIR = "level1"
LEVEL2_DIR = "level2"
POLICY_STEM = "policy"  # LEVEL2_DIR/policy.safetensors: a two-level run's pretrained policy
LEGACY_RECIPES_DIR = "recipes"  # a level-1 search's front recipes, before points/
#: What searches write into a run directory besides the store: a new run refuses a directory that
#: holds any of them without a store (a run whose store was lost).
RUN_OUTPUTS = (FRONT_FILE, SUMMARY_FILE, CANDIDATES_FILE, LEGACY_RECIPES_DIR, POINTS_DIR, LEVEL1_DIR, LEVEL2_DIR,
               SAMPLES_DIR, "posterior.safetensors", "posterior.pt")
#: The layout version, recorded in summary.json as ``run_format`` (1: two-level runs before level-1
#: searches shared the layout; a level-1 search of then has none).
RUN_FORMAT = 2
#: A two-level run records each finished stage as this store event.
STAGE_EVENT = "stage_done"
#: A merge a preference request evaluated (``hm3 request --refine``): a candidate of the run's front.
REFINE_EVENT = "request_merge"
#: Where the run's scores were computed (device type and dtype, ``auto`` resolved), recorded when it first opens a
#: session: a resume must compute its scores the same way.
PLACEMENT_EVENT = "evaluation_placement"
#: The command that makes (and resumes) each kind of run.
COMMANDS: dict[RunKind, str] = {"level1": "hm3 search param", "two-level": "hm3 run"}
#: What readers take from summary.json, per kind.
SUMMARY_KEYS: dict[RunKind, tuple[str, ...]] = {
    "level1": ("objectives", "front_size", "reference_validation", "hv_validation", "hv_test_front"),
    "two-level": ("objectives", "front_size", "candidates", "base_validation", "ideal_validation",
                  "reference_validation", "hv_validation", "hv_test_front"),
}


def run_kind(config: dict[str, Any]) -> RunKind:
    """The kind of run a stored config (current format) describes."""
    return "two-level" if "level2" in config else "level1"


def rewrite_hint(run_dir: Path, kind: RunKind) -> str:
    """How a run's outputs are written again from its store."""
    return (f"'{COMMANDS[kind]} CONFIG.yml {run_dir} --resume' writes the run's outputs again from its store "
            "(nothing is evaluated twice)")


# --- opening a run's store for a search ------------------------------------------------------------


def open_run_store(run_dir: Path, config: dict[str, Any], seed: int, *, resume: bool,
                   budget_may_grow: bool = False, inputs: Iterable[str | Path] = ()) -> RunStore:
    """The run's store, writable: a new run needs a fresh ``run_dir``, ``--resume`` an existing one
    recorded with the same ``config`` (a stored config of an older format is migrated before the two
    are compared). With ``budget_may_grow``, ``level1.optimizer.budget`` may differ: a level-1 search
    is extended by resuming it with a larger budget. A ``run_dir`` that is, holds or lies in one of
    ``inputs`` (the run's models) is refused: the run's files would land among a model's."""
    from hm3.outputs import check_not_input

    check_not_input(run_dir, inputs)
    exists = (run_dir / STORE_FILE).exists()
    if exists and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose a new RUN_DIR")
    if resume and not exists:
        raise ConfigError(f"--resume: {run_dir} holds no run to resume ({STORE_FILE} not found)")
    orphans = [] if exists else sorted(n for n in RUN_OUTPUTS if (run_dir / n).exists())
    if orphans:  # a run whose store was lost: a new run here would overwrite what it left
        raise ConfigError(f"{run_dir} holds a run's outputs ({', '.join(orphans)}) but no run store ({STORE_FILE}); "
                          "hm3 will not overwrite them with a new run: choose a new RUN_DIR")
    if not exists:
        return RunStore.open(run_dir, config=config, seed=seed)
    store = RunStore.open(run_dir, seed=seed)
    try:
        recorded = stored_config(store)
        given, held = run_kind(config), run_kind(recorded)
        if given != held:
            raise ConfigError(f"{run_dir} holds a {'level-1 search' if held == 'level1' else 'two-level run'} "
                              f"({COMMANDS[held]}); resume it with {COMMANDS[held]}")
        expected = config
        recorded = _models_made_absolute(recorded, config)
        if budget_may_grow:
            budget = recorded["level1"]["optimizer"]["budget"]
            expected = config | {"level1": _with_budget(config["level1"], budget)}
        store.check_config(expected, recorded=recorded)
    except BaseException:
        store.close()
        raise
    return store


def check_placement(store: RunStore, placement: Mapping[str, str]) -> None:
    """Record where the run's scores are computed, or refuse a resume that would compute them elsewhere.

    The config check already refuses another ``evaluation.device`` or ``dtype`` as written; this one
    catches ``auto``, which resolves anew on each machine: a run started on a GPU in bfloat16 and resumed
    on a CPU in float32 would mix scores that are not comparable in one front. The device is compared by
    type (``cuda:0`` and ``cuda:1`` compute alike); a run recorded before this check records on resume.
    """
    device = str(placement["device"]).split(":")[0]
    found = {"device": device, "dtype": str(placement["dtype"])}
    recorded = store.last_event(PLACEMENT_EVENT)
    if recorded is None:
        store.add_event(PLACEMENT_EVENT, found)
        return
    held = recorded.payload
    if not isinstance(held, dict) or not {"device", "dtype"} <= set(held):
        raise StoreError(f"run store {store.path} is corrupt: its {PLACEMENT_EVENT} event lacks device or dtype "
                         f"(payload {held!r})")
    if {k: held[k] for k in found} != found:
        raise DeviceError(
            f"{store.path.parent}: its scores were computed in {held['dtype']} on {held['device']}, and this "
            f"machine resolves evaluation.device and evaluation.dtype to {found['dtype']} on {found['device']}; "
            "scores computed otherwise are not comparable: resume it where they resolve as they did")


@contextmanager
def new_run_discarded_on_refusal(run_dir: Path, store: RunStore, *, new: bool, made: bool) -> Iterator[None]:
    """A new run refused while its session opens (an objective that does not resolve, a model or backend that
    refuses the config) leaves no run behind: its store would record the refused config, so the corrected
    one could neither start anew in ``run_dir`` nor resume it. ``made``: this command made ``run_dir``."""
    try:
        yield
    except Hm3Error:
        if new:
            store.close()
            for name in (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm", LOCK_FILE, LOG_FILE):
                (run_dir / name).unlink(missing_ok=True)
            if made and not any(run_dir.iterdir()):
                run_dir.rmdir()
        raise


def _models_made_absolute(recorded: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` with each model path it holds relative to the CWD replaced by the given config's path
    where that is the same folder made absolute: runs recorded before model paths were made absolute resume
    from the folder they ran in."""
    held, wanted = recorded["level1"].get("models"), given["level1"].get("models")
    if not isinstance(held, dict) or not isinstance(wanted, dict):
        return recorded
    models = {ref: wanted[ref] if isinstance(p, str) and not Path(p).is_absolute() and isinstance(wanted.get(ref), str)
              and Path(p).absolute() == Path(wanted[ref]) else p for ref, p in held.items()}
    return recorded | {"level1": recorded["level1"] | {"models": models}}


def _with_budget(level1: dict[str, Any], budget: int) -> dict[str, Any]:
    return level1 | {"optimizer": level1["optimizer"] | {"budget": budget}}


# --- reading a finished run ------------------------------------------------------------------------


def summary_utility_maps(summary: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """Per objective, the map from raw score to utility a run's summary records. A summary without
    ``utility_maps`` records only ``higher_is_better``, and its lower-is-better objectives are bounded
    (``1 - raw``)."""
    maps = summary.get("utility_maps", {})
    higher = summary.get("higher_is_better", {})
    return [maps.get(n, utility_map(bool(higher.get(n, True)))) for n in names]


@dataclass(frozen=True)
class FrontPoint:
    """One row of front.csv."""

    point: int  # the candidate's id in the run store
    level: int
    kind: str  # "merge" or "path"
    validation: np.ndarray  # raw validation scores, per objective
    file: str  # its point file, relative to the run directory


@dataclass(frozen=True)
class FinishedRun:
    """A finished run of either kind, as readers need it."""

    run_dir: Path
    config: StoredRun
    summary: dict[str, Any]
    front: tuple[FrontPoint, ...]
    base: np.ndarray  # validation scores of the HV protocol's 0 (base model) and 1 (best expert per task)
    ideal: np.ndarray

    @property
    def kind(self) -> RunKind:
        return self.config.kind

    @property
    def names(self) -> list[str]:
        return list(self.summary["objectives"])

    @property
    def level1_dir(self) -> Path:
        """Where level 1's own outputs (its BO posterior) are."""
        return self.run_dir / LEVEL1_DIR if self.kind == "two-level" else self.run_dir


def read_finished_run(run_dir: str | Path) -> FinishedRun:
    """The finished run in ``run_dir``; unfinished runs and other formats are refused, naming what is
    missing and how to finish them."""
    from hm3.search.references import protocol_points

    run_dir = Path(run_dir)
    stored, kind = _check_finished(run_dir)
    summary = read_summary(run_dir / SUMMARY_FILE, keys=SUMMARY_KEYS[kind], regenerate=rewrite_hint(run_dir, kind))
    names = list(summary["objectives"])
    rows = read_front_table(run_dir / FRONT_FILE, rows=int(summary["front_size"]), regenerate=rewrite_hint(run_dir, kind),
                            columns=tuple(f"{n}_{split}" for split in ("val", "test") for n in names))
    front = tuple(FrontPoint(int(r["point"]), int(r["level"]), r["kind"], np.array([float(r[f"{n}_val"]) for n in names]),
                             r["file"]) for r in rows)
    _check_same_front(run_dir, [p.point for p in front], summary, rewrite_hint(run_dir, kind))
    if "base_validation" in summary and "ideal_validation" in summary:
        base, ideal = np.array(summary["base_validation"]), np.array(summary["ideal_validation"])
    else:  # a level-1 search written before the layout was shared
        refs = {name: np.array(v, dtype=float) for name, v in summary["reference_validation"].items()}
        base, ideal = protocol_points(refs, stored.level1.search_space)
    return FinishedRun(run_dir=run_dir, config=stored, summary=summary, front=front, base=base, ideal=ideal)


def _check_same_front(run_dir: Path, points: list[int], summary: dict[str, Any], regenerate: str) -> None:
    """Refuse a front.csv and summary.json from different writes of the run's outputs (the summary's
    ``front_points``; a summary written before it recorded them is not checked)."""
    recorded = summary.get("front_points")
    if recorded is not None and sorted(points) != sorted(recorded):
        raise RunFileError(f"{run_dir / FRONT_FILE} and {run_dir / SUMMARY_FILE} disagree: the table's front is "
                           f"points {sorted(points)}, the summary's {sorted(recorded)} (a rewrite of the run's outputs "
                           f"was cut short); {regenerate}")


def _check_finished(run_dir: Path) -> tuple[StoredRun, RunKind]:
    """The stored config and kind of a finished run (refused: no store, another format, unfinished)."""
    if not (run_dir / STORE_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory ({STORE_FILE} not found)")
    with RunStore.open(run_dir, readonly=True) as store:
        kind = run_kind(stored_config(store))
        required = (FRONT_FILE, SUMMARY_FILE) + ((CANDIDATES_FILE,) if kind == "two-level" else ())
        missing = [f for f in required if not (run_dir / f).is_file()]
        if missing:
            raise ConfigError(_unfinished(run_dir, kind, missing, store))
        return read_stored_run(store), kind


def _unfinished(run_dir: Path, kind: RunKind, missing: list[str], store: RunStore) -> str:
    finish = f"finish it with: {COMMANDS[kind]} CONFIG.yml {run_dir} --resume"
    if kind == "level1":
        return f"{run_dir} holds an unfinished level-1 search ({', '.join(missing)} missing); {finish}"
    done = sorted(stages_done(store))
    return (f"{run_dir} holds an unfinished run ({', '.join(missing)} missing; stages done: "
            f"{', '.join(done) or 'none'}); {finish}")


def read_front(run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The front table (current columns, whatever the run's age) and summary of a finished run."""
    import pandas as pd

    run = read_finished_run(run_dir)  # refuses an unfinished run, or a truncated or damaged table
    check_candidates(run)
    return _current_columns(pd.read_csv(run.run_dir / FRONT_FILE)), run.summary


def check_candidates(run: FinishedRun) -> None:
    """Refuse a damaged candidates.csv (a finished run's plot and page draw every row of it), as
    :func:`read_front_table` refuses a damaged front: it must hold the summary's ``candidates`` rows,
    every field present, ids integers, scores finite and kinds ``merge`` or ``path``. A run without the table has nothing to check."""
    path = run.run_dir / CANDIDATES_FILE
    if not path.is_file():
        return
    regenerate = rewrite_hint(run.run_dir, run.kind)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path}: cannot read the candidates table ({err}); {regenerate}") from None
    table = list(csv.DictReader(text.splitlines()))
    id_column = "candidate" if table and "point" not in table[0] and "candidate" in table[0] else "point"
    count = run.summary.get("candidates")
    rows = count if type(count) is int else len(table)  # a summary written before it counted them
    required = (id_column, "level", *(("kind",) if id_column == "point" else ()), *(f"{n}_val" for n in run.names))
    problem = _table_problem(text, table, rows, required, id_column, counted="candidates") or next(
        (f"line {i}: kind {r['kind']!r} is neither 'merge' nor 'path'" for i, r in enumerate(table, start=2)
         if id_column == "point" and r["kind"] not in ("merge", "path")), None)  # a page draws those two only
    if problem:
        raise RunFileError(f"{path}: damaged candidates table ({problem}); {regenerate}")


def read_candidates(run_dir: Path) -> pd.DataFrame | None:
    """candidates.csv of a finished run (None for a level-1 search written before it had one)."""
    import pandas as pd

    path = run_dir / CANDIDATES_FILE
    return _current_columns(pd.read_csv(path)) if path.is_file() else None


def _current_columns(df: pd.DataFrame) -> pd.DataFrame:
    """An older level-1 search's table (``candidate``, ``recipe``) with the current columns."""
    if "point" in df.columns or "candidate" not in df.columns:
        return df
    df = df.rename(columns={"candidate": "point", "recipe": "file"})
    df.insert(int(df.columns.get_loc("level")) + 1 if "level" in df.columns else 1, "kind", "merge")
    return df


def read_summary(path: Path, *, keys: tuple[str, ...], regenerate: str) -> dict[str, Any]:
    """A run's ``summary.json``, refused (naming the file and the first problem) when it is not JSON,
    not an object, or lacks one of ``keys``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFileError(f"{path}: corrupt run summary ({err}); {regenerate}") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise RunFileError(f"{path}: corrupt run summary (no {', '.join(missing)}); {regenerate}")
    if problem := _summary_problem(data):
        raise RunFileError(f"{path}: corrupt run summary ({problem}); {regenerate}")
    return data


def _summary_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the summary values readers compute with (objectives, front size, the HV
    protocol's base and ideal), or None: a wrong type there would surface as a traceback far away."""
    names = data.get("objectives")
    if "objectives" in data and (not isinstance(names, list) or not names
                                 or not all(isinstance(n, str) for n in names)):
        return "objectives is not a list of names"
    size = data.get("front_size")
    if "front_size" in data and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        return f"front_size is {size!r}, not a count"
    points = data.get("front_points")
    if "front_points" in data and not (isinstance(points, list) and all(type(p) is int for p in points)):
        return "front_points is not a list of point ids"
    for key in ("base_validation", "ideal_validation"):
        values = data.get(key)
        if key in data and not (isinstance(values, list) and len(values) == len(names or [])
                                and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v) for v in values)):
            return f"{key} is not one finite score per objective"
    return None


def read_front_table(path: Path, *, rows: int, regenerate: str, columns: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of a run's ``front.csv`` (current columns), refused when it is truncated or damaged: it
    must end with a newline, hold exactly ``rows`` rows (the summary's ``front_size``), every field
    present, ids integers and every score column (``*_val``, ``*_test``) a finite number. A front read
    from a cut-off file would answer requests from fewer points without a word."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path}: cannot read the front table ({err}); {regenerate}") from None
    table = list(csv.DictReader(text.splitlines()))
    legacy = bool(table) and "point" not in table[0] and "candidate" in table[0]
    id_column, file_column = ("candidate", "recipe") if legacy else ("point", "file")
    required = (id_column, file_column, "level", *(() if legacy else ("kind",)), *columns)
    problem = _table_problem(text, table, rows, required, id_column)
    if problem:
        raise RunFileError(f"{path}: damaged front table ({problem}); {regenerate}")
    if legacy:
        return [{"point": r.pop("candidate"), "kind": "merge", "file": r.pop("recipe"), **r} for r in table]
    return table


def _table_problem(text: str, table: list[dict[str, str]], rows: int, required: tuple[str, ...],
                   id_column: str, *, counted: str = "front points") -> str | None:
    """What is wrong with a front (or candidates) table, or None."""
    if not text.endswith("\n"):
        return "it does not end with a newline: truncated"
    if len(table) != rows:
        return f"it holds {len(table)} rows but the run's summary counts {rows} {counted}"
    if missing := [c for c in required if table and c not in table[0]]:
        return f"no column {missing[0]!r}"
    for i, row in enumerate(table, start=2):
        if None in row or any(v is None or v == "" for v in row.values()):
            return f"line {i} has missing or extra fields"
        try:
            int(row[id_column])
            bad = [c for c, v in row.items() if c.endswith(("_val", "_test")) and not math.isfinite(float(v))]
        except (KeyError, ValueError) as err:
            return f"line {i}: {err}"
        if bad:
            return f"line {i}: {bad[0]} is not a finite number"
    return None


def stages_done(store: RunStore) -> set[str]:
    """The stages a two-level run has finished."""
    return {e.payload["stage"] for e in store.events(STAGE_EVENT, fields=("stage",))}

