"""Multiple-choice questions from a user's JSONL file, answered by log-likelihood.

Records: ``{"question": str, "choices": [str, ...], "answer": int | str}`` where ``answer`` is the
0-based index of the gold choice or its exact text; optional ``"id"`` / ``"split"`` fields follow
:mod:`objectives.jsonl`.

Prompt: ``"Question: <question>\\nAnswer:"``; each choice is scored as the continuation
``" <choice>"`` (a leading space, as lm-evaluation-harness's default target delimiter), and the
evaluator picks the choice with the highest (unnormalised) log-likelihood. The example's ``choices``
and ``target`` hold those space-prefixed continuations; the score is 1 when the picked choice is the
gold one.
"""

from __future__ import annotations

from typing import Any

from objectives.base import Example, LogLikelihood
from objectives.jsonl import FileObjective, RecordError, require_strings

DECODING = LogLikelihood(length_normalized=False)


def gold_index(choices: list[str], answer: Any) -> int:
    """Index of the gold choice, given as an index or as the choice's text."""
    if isinstance(answer, bool):  # bool is an int subclass; True is not a valid index here
        raise RecordError(f"field answer {answer!r} must be a choice index or a choice's text")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise RecordError(f"field answer {answer} is out of range for {len(choices)} choices")
        return answer
    if isinstance(answer, str):
        if answer not in choices:
            raise RecordError(f"field answer {answer!r} is not one of the choices {choices}")
        return choices.index(answer)
    raise RecordError(f"field answer {answer!r} must be a choice index or a choice's text")


class ChoiceObjective(FileObjective):
    """Multiple-choice JSONL: accuracy of the highest-log-likelihood choice."""

    kind = "choice"
    required = ("question", "choices", "answer")
    decoding = DECODING
    description = "multiple-choice JSONL (question, choices, answer index/text): log-likelihood accuracy"

    @staticmethod
    def to_example(example_id: str, data: dict[str, Any]) -> Example:
        require_strings(data, ("question",))
        question, choices = data["question"], data["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise RecordError("field choices must be a list of at least two strings")
        if len(set(choices)) != len(choices):
            raise RecordError(f"field choices holds duplicates: {choices}")
        continuations = tuple(f" {choice}" for choice in choices)
        return Example(
            id=example_id,
            prompt=f"Question: {question}\nAnswer:",
            target=continuations[gold_index(choices, data["answer"])],
            choices=continuations,
        )

    def score(self, example: Example, output: str) -> float:
        """1.0 when the chosen choice's text is the gold continuation."""
        return float(output == example.target)
