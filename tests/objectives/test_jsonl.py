"""Reading users' JSONL data files: errors that name file and line, and the split rule."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from hm3.errors import DataFileError
from objectives.base import Example
from objectives.jsonl import VALIDATION_FRACTION, FileObjective, hashed_split, load_examples, read_jsonl


def _example(example_id: str, data: dict) -> Example:
    return Example(id=example_id, prompt=data["q"], target=data["a"])


def _load(path: Path, seed: int = 0) -> dict[str, tuple[Example, ...]]:
    return load_examples(path, ("q", "a"), _example, seed=seed)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataFileError, match=r"nope\.jsonl"):
        read_jsonl(missing)


def test_bad_json_names_file_and_line(write_jsonl):
    path = write_jsonl("bad.jsonl", [{"q": "1", "a": "1"}, "", '{"q": "2", "a": ', {"q": "3", "a": "3"}])
    with pytest.raises(DataFileError, match=r"bad\.jsonl, line 3: bad JSON"):
        read_jsonl(path, ("q", "a"))


def test_missing_field_names_line_and_field(write_jsonl):
    path = write_jsonl("d.jsonl", [{"q": "1", "a": "1"}, {"q": "2"}])
    with pytest.raises(DataFileError, match=r"d\.jsonl, line 2: missing required field\(s\) a"):
        read_jsonl(path, ("q", "a"))


def test_non_object_line(write_jsonl):
    path = write_jsonl("d.jsonl", ["[1, 2]"])
    with pytest.raises(DataFileError, match=r"line 1: expected a JSON object, got list"):
        read_jsonl(path)


def test_blank_lines_ignored_and_line_numbers_kept(write_jsonl):
    path = write_jsonl("d.jsonl", ["", {"q": "1", "a": "1"}, "   ", {"q": "2", "a": "2"}])
    assert [record.line for record in read_jsonl(path)] == [2, 4]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataFileError, match=r"empty\.jsonl holds no records"):
        read_jsonl(path)


def test_gzip_file(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"q": "1", "a": "1"}) + "\n")
    assert read_jsonl(path)[0].data == {"q": "1", "a": "1"}


def test_hashed_split_deterministic_disjoint_and_balanced(write_jsonl):
    rows = [{"id": f"r{i}", "q": str(i), "a": str(i)} for i in range(400)]
    path = write_jsonl("d.jsonl", rows)
    first, again = _load(path), _load(path)
    assert first == again
    validation = {e.id for e in first["validation"]}
    test = {e.id for e in first["test"]}
    assert not validation & test
    assert validation | test == {row["id"] for row in rows}
    assert first["train"] == ()
    assert abs(len(validation) / 400 - VALIDATION_FRACTION) < 0.1
    # Another seed gives another (still complete) assignment.
    other = {e.id for e in _load(path, seed=1)["validation"]}
    assert other != validation


def test_split_does_not_depend_on_file_order(write_jsonl):
    rows = [{"id": f"r{i}", "q": str(i), "a": str(i)} for i in range(50)]
    forward = _load(write_jsonl("f.jsonl", rows))
    backward = _load(write_jsonl("b.jsonl", rows[::-1]))
    assert {e.id for e in forward["test"]} == {e.id for e in backward["test"]}
    assert all(hashed_split(e.id, 0) == "test" for e in forward["test"])


def test_split_field_wins_and_is_checked(write_jsonl):
    rows = [{"q": str(i), "a": str(i), "split": split} for i, split in enumerate(["train", "test", "train"])]
    by_split = _load(write_jsonl("d.jsonl", rows))
    assert [e.prompt for e in by_split["train"]] == ["0", "2"]
    assert [e.prompt for e in by_split["test"]] == ["1"]
    bad = write_jsonl("bad.jsonl", [{"q": "1", "a": "1"}, {"q": "2", "a": "2", "split": "dev"}])
    with pytest.raises(DataFileError, match=r"bad\.jsonl, line 2: split 'dev' is not one of"):
        _load(bad)


def test_ids_without_id_field_are_content_hashes_and_unique(write_jsonl):
    rows = [{"q": "same", "a": "1"}, {"q": "same", "a": "1"}, {"q": "other", "a": "2"}]
    by_split = _load(write_jsonl("d.jsonl", rows))
    ids = [e.id for split in by_split.values() for e in split]
    assert len(ids) == len(set(ids)) == 3
    assert any(i.endswith("#2") for i in ids)


class _QA(FileObjective):
    """The smallest file objective: the shared loading and splitting, nothing task-specific."""

    kind = "qa"
    required = ("q", "a")
    decoding = None
    to_example = staticmethod(_example)

    def score(self, example: Example, output: str) -> float:
        return float(output == example.target)


def test_file_objective_loads_and_names(write_jsonl):
    path = write_jsonl("d.jsonl", [{"q": "1", "a": "1", "split": "test"}])
    objective = _QA(path)
    assert objective.name == f"qa:{path}" and objective.path == path
    assert [e.prompt for e in objective.examples("test")] == ["1"]


def test_empty_split_is_a_clear_error(write_jsonl):
    objective = _QA(write_jsonl("d.jsonl", [{"q": "1", "a": "1", "split": "test"}]))
    with pytest.raises(DataFileError, match=r"d\.jsonl has no 'validation' examples"):
        objective.examples("validation")
    with pytest.raises(DataFileError, match=r"no 'train' examples .*mark training records"):
        objective.examples("train")
    with pytest.raises(DataFileError, match="unknown split 'dev'"):
        objective.examples("dev")
