"""GSM8K-format grade-school maths from a user's JSONL file, scored by numeric answer match.

Records: ``{"question": str, "answer": str}`` where ``answer`` ends with ``#### <number>`` (the GSM8K
convention). The whole answer is the example's target (the continuation Fisher estimation uses); the
number after ``####`` is what outputs are scored against. Optional ``"id"`` and ``"split"`` fields
follow :mod:`objectives.jsonl`.

Prompt (zero-shot): ``"Question: <question>\\nAnswer:"``; greedy generation of up to 256 tokens, cut
at the next ``Question:``.

Scoring follows lm-evaluation-harness's gsm8k: if the output holds a strict ``#### N`` answer, N is
taken; otherwise the *last* number in the output ("flexible-extract"). Numbers are normalised before
comparison (``$`` and thousands commas dropped, a trailing ``.`` dropped, and compared as decimals so
``1234.0`` equals ``1234``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from objectives.base import Example, Generate
from objectives.jsonl import FileObjective, RecordError, require_strings

DECODING = Generate(max_new_tokens=256, stop=("\n\nQuestion:", "Question:"))

# A number must contain a digit: optional sign and $, digits with thousands commas, optional decimals.
_NUMBER = re.compile(r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_STRICT = re.compile(r"####\s*(-?\$?[\d.,]+)")


def normalize_number(text: str) -> Decimal | None:
    """The numeric value of an extracted answer, or None if it is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_answer(output: str) -> Decimal | None:
    """The model's answer: the strict ``#### N`` if present, else the last number in ``output``."""
    strict = _STRICT.search(output)
    if strict and (value := normalize_number(strict.group(1))) is not None:
        return value
    numbers = _NUMBER.findall(output)
    return normalize_number(numbers[-1]) if numbers else None


def target_number(answer: str) -> str:
    """The gold number after the final ``####`` of a GSM8K answer (raises RecordError if absent)."""
    head, sep, tail = answer.rpartition("####")
    if not sep:
        raise RecordError("field answer does not end with '#### <number>'")
    if normalize_number(tail) is None:
        raise RecordError(f"field answer: {tail.strip()!r} after '####' is not a number")
    return tail.strip()


def prompt_for(question: str) -> str:
    """The zero-shot prompt; the model continues after ``Answer:``."""
    return f"Question: {question}\nAnswer:"


class Gsm8kObjective(FileObjective):
    """GSM8K-format JSONL: exact numeric match of the model's final answer."""

    kind = "gsm8k"
    required = ("question", "answer")
    decoding = DECODING
    description = "GSM8K-format maths JSONL (question, answer '#### N'): numeric match, flexible extract"

    @staticmethod
    def to_example(example_id: str, data: dict[str, Any]) -> Example:
        require_strings(data, ("question", "answer"))
        answer = data["answer"]
        # The full worked answer is the target (the continuation Fisher estimation differentiates);
        # the scorer compares against the number after its '####', kept in meta.
        return Example(
            id=example_id,
            prompt=prompt_for(data["question"]),
            target=answer,
            meta={"number": target_number(answer)},
        )

    def shot(self, example: Example) -> str:
        """A solved question for few-shot prompts: the worked answer after ``Answer:``, then a blank line."""
        return f"{example.prompt} {example.target}\n\n"

    def score(self, example: Example, output: str) -> float:
        """1.0 when the extracted answer equals the gold number, else 0.0 (also for no number)."""
        predicted = extract_answer(output)
        return float(predicted is not None and predicted == normalize_number(example.meta["number"]))
