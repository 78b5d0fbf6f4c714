"""Multiple-choice adapter: gold by index or text, log-likelihood decoding, accuracy scoring."""

from __future__ import annotations

import pytest

from hm3.errors import DataFileError
from objectives.base import LogLikelihood
from objectives.choice import ChoiceObjective


@pytest.fixture
def objective(write_jsonl):
    rows = [
        {"id": "cap", "question": "Capital of France?", "choices": ["Berlin", "Paris", "Rome"], "answer": 1},
        {"id": "sky", "question": "Sky colour?", "choices": ["green", "blue"], "answer": "blue"},
    ]
    return ChoiceObjective(write_jsonl("mc.jsonl", [dict(row, split="test") for row in rows]))


def test_examples(objective):
    capital, sky = objective.examples("test")
    assert capital.prompt == "Question: Capital of France?\nAnswer:"
    assert capital.choices == (" Berlin", " Paris", " Rome")
    assert capital.target == " Paris"
    assert sky.target == " blue"
    assert isinstance(objective.decoding, LogLikelihood)


def test_scoring(objective):
    capital, sky = objective.examples("test")
    assert objective.score(capital, " Paris") == 1.0
    assert objective.score(capital, " Rome") == 0.0
    assert objective.aggregate([capital, sky], [" Paris", " green"]) == 0.5


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is out of range for 2 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "answer 'c' is not one of the choices"),
        (
            {"question": "q", "choices": ["a", "b"], "answer": True},
            "must be a choice index or a choice's text",
        ),
        ({"question": "q", "choices": ["a"], "answer": 0}, "at least two strings"),
        ({"question": "q", "choices": ["a", "a"], "answer": 0}, "holds duplicates"),
    ],
)
def test_bad_records_name_line(write_jsonl, record, message):
    path = write_jsonl("bad.jsonl", ["", record])
    with pytest.raises(DataFileError, match=rf"bad\.jsonl, line 2: .*{message}"):
        ChoiceObjective(path)
