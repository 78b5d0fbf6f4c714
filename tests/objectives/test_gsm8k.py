"""GSM8K-format adapter: lm-evaluation-harness style answer extraction on a handmade file."""

from __future__ import annotations

import pytest

from hm3.errors import DataFileError
from objectives.base import Example, Generate
from objectives.gsm8k import Gsm8kObjective, extract_answer


@pytest.fixture
def objective(write_jsonl):
    rows = [
        {"id": "a", "question": "How many?", "answer": "12 * 100 + 34 = 1234\n#### 1,234", "split": "test"},
        {"id": "b", "question": "Owed?", "answer": "She owes.\n#### -7", "split": "test"},
        {"id": "c", "question": "Price?", "answer": "#### 2.5", "split": "validation"},
    ]
    return Gsm8kObjective(write_jsonl("gsm8k.jsonl", rows))


def _target(objective, example_id):
    return next(e for s in ("validation", "test") for e in objective.examples(s) if e.id == example_id)


def test_prompt_decoding_and_target(objective):
    example = _target(objective, "a")
    assert example.prompt == "Question: How many?\nAnswer:"
    assert example.target == "12 * 100 + 34 = 1234\n#### 1,234"
    assert example.meta["number"] == "1,234"
    assert objective.decoding == Generate(max_new_tokens=256, stop=("\n\nQuestion:", "Question:"))
    assert objective.name.startswith("gsm8k:")


@pytest.mark.parametrize(
    ("example_id", "output", "expected"),
    [
        ("a", "The answer is $1,234.", 1.0),
        ("a", "12 times 100 is 1200, plus 34 gives 1234.0", 1.0),
        ("a", "The answer is 1234 apples, or maybe 1235", 0.0),  # the LAST number counts
        ("a", "First 1235, then after checking: 1234", 1.0),
        ("a", "#### 1234\nAlso 99 is unrelated", 1.0),  # a strict answer wins over the last number
        ("a", "I do not know.", 0.0),
        ("a", "", 0.0),
        ("b", "She owes -7 dollars.", 1.0),
        ("b", "She owes 7 dollars.", 0.0),
        ("c", "Each costs $2.50.", 1.0),
        ("c", "Each costs 2.", 0.0),
    ],
)
def test_flexible_match(objective, example_id, output, expected):
    assert objective.score(_target(objective, example_id), output) == expected


def test_extract_ignores_non_numbers():
    assert extract_answer("no digits... at all, really.") is None
    assert str(extract_answer("total: 3,000,000.")) == "3000000"


def test_aggregate_is_mean(objective):
    examples = objective.examples("test")
    assert objective.aggregate(examples, ["1234", "wrong"]) == 0.5
    assert isinstance(examples[0], Example)


def test_answer_without_marker_names_line(write_jsonl):
    path = write_jsonl(
        "bad.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q2", "answer": "5"}]
    )
    with pytest.raises(
        DataFileError, match=r"bad\.jsonl, line 2: field answer does not end with '#### <number>'"
    ):
        Gsm8kObjective(path)


def test_non_numeric_target_names_line(write_jsonl):
    path = write_jsonl("bad.jsonl", [{"question": "q", "answer": "#### many"}])
    with pytest.raises(DataFileError, match=r"line 1: .*'many' after '####' is not a number"):
        Gsm8kObjective(path)
