"""Per-example sample files (``--log-samples``): what a model answered, so a person can read it.

A score says how well a merge did; its samples say what it answered. With ``--log-samples`` (or
``evaluation.log_samples: true``) every (candidate, objective, split) a run scores gets one JSON Lines
file, one record per example::

    RUN_DIR/samples/<candidate-id>/<objective>_<split>.jsonl

Why these choices:

* JSON Lines, plain data: people hand run directories to each other, and hm3 never executes or
  unpickles anything in one; a sample file is only ever parsed as JSON.
* The file is written whole, atomically (:mod:`hm3.atomic`), just *before* its score is committed
  to the run store: a crash leaves either the whole file or none, and a score the store holds has its
  file (a file without a score is written again, the same, when the resume scores it).
* Records are keyed by example id: a candidate scored again on other examples of the same split
  (level 2's data subsets) adds its records, the same examples replace theirs (greedy answers are
  the same), so no record is ever duplicated, however often a run is resumed.
* An objective name becomes a file name through :func:`file_stems`: characters other than letters,
  digits, ``.``, ``_`` and ``-`` become ``_`` (no ``/``, so no path leaves the folder), a leading dot
  is escaped (no hidden files), and names that would collide get a short hash of the real name.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hm3.atomic import atomic_open
from hm3.errors import RunFileError

SAMPLES_DIR = "samples"
SUFFIX = ".jsonl"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_STEM = 80  # a file name stays far below the 255 bytes file systems allow
Sample = Mapping[str, Any]


def safe_stem(name: str) -> str:
    """``name`` as one file-name component: safe characters only, never hidden, never empty."""
    stem = _UNSAFE.sub("_", name)[:_MAX_STEM]
    if not stem or stem.startswith("."):
        stem = "_" + stem
    return stem


def file_stems(names: Iterable[str]) -> dict[str, str]:
    """Each objective name's file stem: :func:`safe_stem`, with an 8-hex hash of the name appended when
    the stem was shortened or is shared with another name (``a/b`` and ``a:b``), so stems are unique."""
    names = list(dict.fromkeys(names))
    stems = {n: safe_stem(n) for n in names}
    taken: dict[str, int] = {}
    for stem in stems.values():
        taken[stem] = taken.get(stem, 0) + 1
    return {n: s if taken[s] == 1 and len(n) <= _MAX_STEM else f"{s}-{hashlib.sha256(n.encode()).hexdigest()[:8]}"
            for n, s in stems.items()}


def jsonable(value: Any) -> Any:
    """An answer as JSON data (lm-eval's responses are tuples of floats and bools, or strings)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy and torch scalars
        return jsonable(value.item())
    return repr(value)


class SampleLog:
    """Writes the sample files of one folder: ``<folder>/<candidate-id>/`` for a run's candidates, or
    the folder itself for ``hm3 eval`` (one model, no candidates)."""

    def __init__(self, folder: Path, objective_names: Sequence[str]):
        self.folder = Path(folder)
        self.stems = file_stems(objective_names)

    def path(self, objective: str, split: str, candidate: int | None = None) -> Path:
        stem = self.stems.get(objective) or file_stems([*self.stems, objective])[objective]
        where = self.folder if candidate is None else self.folder / str(int(candidate))
        return where / f"{stem}_{safe_stem(split)}{SUFFIX}"

    def write(self, objective: str, split: str, samples: Sequence[Sample], candidate: int | None = None, *,
              replace: bool = False) -> Path:
        """Write ``samples`` (records with an ``example_id``) into their file, atomically, keeping the records
        of other examples already there (module docstring) unless ``replace`` (``hm3 eval``: a file there
        may be another model's); returns the file."""
        path = self.path(objective, split, candidate)
        records = {r["example_id"]: r for r in read_samples(path)} if path.exists() and not replace else {}
        records.update((r["example_id"], {"objective": objective, "split": split, **r}) for r in samples)
        with atomic_open(path, "w") as f:
            for record in records.values():
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The records of a sample file (parsed as JSON, nothing else); a file that is not one is refused."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RunFileError(f"{path}:{number}: not a sample record ({err}); remove the file and hm3 "
                                   "writes it again the next time it scores that candidate") from None
            if not isinstance(record, dict) or "example_id" not in record:
                raise RunFileError(f"{path}:{number}: not a sample record (no example_id); remove the file")
            records.append(record)
    return records
