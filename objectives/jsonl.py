"""Users' task data files: JSONL records, checked line by line, and their train/validation/test splits.

Every file-backed objective (gsm8k, humaneval, translation, choice) reads its data here so that a bad
file fails the same way everywhere: a :class:`~hm3.errors.DataFileError` that names the file, the line
number and what is wrong, never a raw ``json`` traceback.

Split rule (documented for users):

* a record's optional ``"split"`` field (``"train"``, ``"validation"`` or ``"test"``) wins;
* otherwise the record is assigned to ``validation`` or ``test`` by hashing ``seed`` and its id:
  :data:`VALIDATION_FRACTION` (one half) of such records go to validation, the rest to test. Records
  never land in ``train`` by hashing: training data must be marked explicitly.

The assignment depends only on (seed, id), not on file order, so adding records never moves old ones
between splits. The id is the record's id field (``"id"``, or ``"task_id"`` for HumanEval) when given,
else a hash of the record's content, so identical records share a split instead of leaking across.
The search scores on validation and reports on test.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hm3.errors import DataFileError
from objectives.base import SPLITS, Example, Objective

VALIDATION_FRACTION = 0.5


@dataclass(frozen=True)
class Record:
    """One parsed line: its 1-based line number (for error messages) and its JSON object."""

    line: int
    data: dict[str, Any]


class RecordError(ValueError):
    """Raised by an adapter's record converter; :func:`load_examples` adds the file and line number."""


def require_strings(data: Mapping[str, Any], names: Sequence[str]) -> None:
    """Raise :class:`RecordError` naming every field of ``names`` that is present but not a string."""
    wrong = [name for name in names if name in data and not isinstance(data[name], str)]
    if wrong:
        raise RecordError(f"field(s) {', '.join(wrong)} must be strings")


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[Record]:
    """All records of a JSONL (or ``.jsonl.gz``) file; blank lines are skipped.

    Each non-blank line must be a JSON object holding every field in ``required``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist or is not a file")
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    records.append(Record(number, _parse_line(path, number, text, required)))
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataFileError(f"cannot read data file {path}: {exc}") from exc
    if not records:
        raise DataFileError(f"data file {path} holds no records")
    return records


def _parse_line(path: Path, number: int, text: str, required: Sequence[str]) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}, line {number}: bad JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise DataFileError(f"{path}, line {number}: expected a JSON object, got {type(data).__name__}")
    missing = [name for name in required if name not in data]
    if missing:
        raise DataFileError(f"{path}, line {number}: missing required field(s) {', '.join(missing)}")
    return data


def record_id(data: Mapping[str, Any], id_field: str = "id") -> str:
    """The record's own id if it has one, else a short hash of its canonical JSON content."""
    if id_field in data:
        return str(data[id_field])
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False)
    return "sha-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def hashed_split(example_id: str, seed: int) -> str:
    """``validation`` or ``test`` for a record without a split field, fixed by (seed, id) alone."""
    digest = hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if fraction < VALIDATION_FRACTION else "test"


def record_split(record: Record, example_id: str, seed: int, path: Path) -> str:
    """The split a record belongs to: its ``split`` field if present (checked), else :func:`hashed_split`."""
    split = record.data.get("split")
    if split is None:
        return hashed_split(example_id, seed)
    if split not in SPLITS:
        raise DataFileError(f"{path}, line {record.line}: split {split!r} is not one of {', '.join(SPLITS)}")
    return split


def load_examples(
    path: str | Path,
    required: Sequence[str],
    to_example: Callable[[str, dict[str, Any]], Example],
    *,
    seed: int = 0,
    id_field: str = "id",
) -> dict[str, tuple[Example, ...]]:
    """Read ``path`` and turn each record into an :class:`Example`, grouped by split (file order kept).

    ``to_example(example_id, data)`` raises :class:`RecordError` for a record whose fields are present
    but wrong; the message is reported with the file and line number. Duplicate ids get a ``#n``
    suffix so every example id is unique; the split hash reads the id without it, so records split by
    hashing land with the first occurrence (a record's own ``split`` field still wins).
    """
    path = Path(path)
    by_split: dict[str, list[Example]] = {name: [] for name in SPLITS}
    seen: dict[str, int] = {}
    for record in read_jsonl(path, required):
        base_id = record_id(record.data, id_field)
        count = seen.get(base_id, 0)
        seen[base_id] = count + 1
        example_id = base_id if count == 0 else f"{base_id}#{count + 1}"
        try:
            example = to_example(example_id, record.data)
        except RecordError as exc:
            raise DataFileError(f"{path}, line {record.line}: {exc}") from exc
        by_split[record_split(record, base_id, seed, path)].append(example)
    return {name: tuple(items) for name, items in by_split.items()}


def fewshot_examples(by_split: Mapping[str, Sequence[Example]], n: int, seed: int, *,
                     where: str) -> tuple[list[Example], dict[str, tuple[Example, ...]]]:
    """(the ``n`` few-shot examples, the splits without them).

    Shots come from the train split when it has any records (which keeps them), else from validation,
    where they are then removed from the scored examples. Which ``n`` is fixed by hashing (seed, id), like the split
    rule: independent of file order, and stable when records are added. Copies of a shot (a repeated record:
    same prompt and target under another id) leave validation and test too, so none is scored with its own
    answer among the shots.
    """
    pool_split = "train" if by_split.get("train") else "validation"
    pool = list(by_split.get(pool_split, ()))
    if n > len(pool):
        raise DataFileError(f"{where}: fewshot={n} needs {n} examples, but its {pool_split} split (where shots "
                            f"come from when train is empty) holds {len(pool)}")
    ranked = sorted(pool, key=lambda e: hashlib.sha256(f"{seed}\0fewshot\0{e.id}".encode()).digest())
    shots = ranked[:n]
    chosen = {e.id for e in shots}
    solved = {(e.prompt, e.target, e.choices) for e in shots}
    rest = {split: items if split == "train" else
            tuple(e for e in items if e.id not in chosen and (e.prompt, e.target, e.choices) not in solved)
            for split, items in by_split.items()}
    return shots, rest


class FileObjective(Objective):
    """An objective whose examples come from one user data file.

    Subclasses set :attr:`kind` (the spec prefix, ``"gsm8k"`` …), :attr:`required` (the fields every
    record must hold) and implement :meth:`to_example`; reading, checking and splitting are shared.
    """

    kind: str
    required: tuple[str, ...]
    id_field = "id"

    def __init__(self, path: str | Path, *, seed: int = 0, name: str | None = None, chat: bool = False,
                 fewshot: int = 0) -> None:
        self.path = Path(path)
        self.name = name or f"{self.kind}:{path}"
        self.chat_template = chat
        self._by_split = load_examples(
            self.path, self.required, self.to_example, seed=seed, id_field=self.id_field
        )
        if fewshot:
            self._by_split = self._with_shots(fewshot, seed)

    def shot(self, example: Example) -> str:
        """One solved example as a few-shot demonstration: its prompt, its target, a blank line (the
        adapters whose prompt and target need a separator override this)."""
        return f"{example.prompt}{example.target}\n\n"

    def _with_shots(self, n: int, seed: int) -> dict[str, tuple[Example, ...]]:
        """Every split's prompts behind ``n`` solved examples (:func:`fewshot_examples`); shots drawn from
        validation leave it, so no example is scored with its own answer in the prompt."""
        shots, by_split = fewshot_examples(self._by_split, n, seed, where=f"{self.name} (data file {self.path})")
        prefix = "".join(self.shot(e) for e in shots)
        return {split: items if split == "train" else tuple(dataclasses.replace(e, prompt=prefix + e.prompt)
                                                             for e in items)
                for split, items in by_split.items()}

    @staticmethod
    @abstractmethod
    def to_example(example_id: str, data: dict[str, Any]) -> Example:
        """The example for one record; raises :class:`RecordError` for fields present but wrong."""

    def examples(self, split: str) -> Sequence[Example]:
        """The examples of ``split``; an unknown or empty split is a user error naming the file."""
        if split not in SPLITS:
            raise DataFileError(f"{self.name}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        examples = self._by_split[split]
        if not examples:
            sizes = ", ".join(f"{name}: {len(items)}" for name, items in self._by_split.items())
            hint = ' (mark training records with "split": "train")' if split == "train" else ""
            raise DataFileError(
                f"{self.name}: data file {self.path} has no {split!r} examples ({sizes}){hint}"
            )
        return examples
