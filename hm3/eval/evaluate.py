"""Score one objective with one backend: the loop every search and ``hm3 eval`` runs.

The objective decides *what* to ask (its examples and decoding); the backend
answers in batches; the objective scores the answers. Keeping the loop here,
apart from both, means a new objective or a new backend never touches the other.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hm3.errors import ConfigError, DataFileError, SplitTooSmallError
from hm3.eval.backend import Backend, chat_prompt, check_output_count
from objectives.base import Example, Generate, HarnessObjective, LogLikelihood, Objective


@dataclass(frozen=True)
class EvalResult:
    """One objective's score on (a subset of) one split, with what is needed to store or audit it."""

    objective: str
    split: str
    score: float
    count: int
    seconds: float
    example_ids: tuple[str, ...]
    outputs: tuple[str, ...]
    #: Per-example records (:mod:`hm3.samples`) when asked for (``samples=True``), else None.
    samples: tuple[dict[str, Any], ...] | None = None


def evaluate_objective(
    backend: Backend, objective: Objective, split: str, indices: Sequence[int] | None = None, *,
    samples: bool = False,
) -> EvalResult:
    """Score ``objective`` on ``split`` (all examples, or those at ``indices``) with ``backend``; with
    ``samples``, also keep one record per example (prompt, output, target, per-example score)."""
    start = time.perf_counter()
    records = None
    examples = select_examples(objective, split, indices)
    if isinstance(objective, HarnessObjective):  # an lm-eval task: its own requests, filter and metric
        from hm3.eval.harness import answer_and_score

        if objective.chat_template:
            raise ConfigError(f"objective {objective.name!r}: an lm-eval task builds its own prompts; hm3 does "
                              "not put them in a chat template (chat=true / evaluation.chat_template)")

        if samples:
            score, outputs, records = answer_and_score(backend, objective, examples, samples=True)
        else:
            score, outputs = answer_and_score(backend, objective, examples)
    else:
        outputs = model_outputs(backend, objective, examples)
        if samples:
            score, records = _score_with_samples(backend, objective, examples, outputs)
        else:
            score = objective.aggregate(examples, outputs)
    return EvalResult(
        objective=objective.name,
        split=split,
        score=float(score),
        count=len(examples),
        seconds=time.perf_counter() - start,
        example_ids=tuple(e.id for e in examples),
        outputs=tuple(outputs),
        samples=None if records is None else tuple(records),
    )


def _score_with_samples(backend: Backend, objective: Objective, examples: Sequence[Example],
                        outputs: Sequence[str]) -> tuple[float, list[dict[str, Any]]]:
    """The task score, exactly as :meth:`~objectives.base.Objective.aggregate` gives it, and a record per
    example. An objective that keeps the base class's mean is scored once per example and averaged here in
    the same order (the same float; humaneval's tests run once); one with its own aggregate (corpus chrF)
    keeps it, and each example is scored once more for its record."""
    per_example = [objective.score(e, o) for e, o in zip(examples, outputs, strict=True)]
    if type(objective).aggregate is Objective.aggregate:
        score = sum(per_example) / len(examples)
    else:
        score = objective.aggregate(examples, outputs)
    asked = model_examples(backend.tokenizer, objective, examples)  # the prompt as the model saw it
    records = []
    for e, a, output, value in zip(examples, asked, outputs, per_example, strict=True):
        record: dict[str, Any] = {"example_id": e.id, "prompt": a.prompt, "output": output, "target": e.target,
                                  "score": float(value)}
        if e.choices is not None:
            record["choices"] = list(e.choices)
        records.append(record)
    return score, records


def select_examples(objective: Objective, split: str, indices: Sequence[int] | None) -> list[Example]:
    """The examples asked for, refusing indices the split does not have (never silently fewer)."""
    examples = list(objective.examples(split))
    if indices is None:
        chosen = examples
    else:
        bad = [i for i in indices if not 0 <= i < len(examples)]
        if bad:
            raise SplitTooSmallError(
                f"objective {objective.name!r} split {split!r} has {len(examples)} examples; "
                f"indices out of range: {bad[:5]}"
            )
        chosen = [examples[i] for i in indices]
    if not chosen:
        raise SplitTooSmallError(f"objective {objective.name!r} split {split!r}: no examples to evaluate")
    return chosen


def model_examples(tokenizer: Any, objective: Objective, examples: Sequence[Example]) -> list[Example]:
    """The examples as the model is asked them: each prompt in the model's chat template when the objective
    says so (:func:`~hm3.eval.backend.chat_prompt`), else as they are. Scoring still reads the originals."""
    if not objective.chat_template:
        return list(examples)
    return [dataclasses.replace(e, prompt=chat_prompt(tokenizer, e.prompt)) for e in examples]


def model_outputs(backend: Backend, objective: Objective, examples: Sequence[Example]) -> list[str]:
    """One output string per example, produced the way the objective's decoding says."""
    examples = model_examples(backend.tokenizer, objective, examples)
    decoding = objective.decoding
    if isinstance(decoding, Generate):
        outputs = backend.generate(
            [e.prompt for e in examples], max_new_tokens=decoding.max_new_tokens, stop=decoding.stop
        )
        check_output_count("generate", len(outputs), len(examples))
        return list(outputs)
    if isinstance(decoding, LogLikelihood):
        return choose_by_loglikelihood(backend, objective.name, examples, decoding.length_normalized)
    raise TypeError(f"objective {objective.name!r} has unsupported decoding {decoding!r}")


def choose_by_loglikelihood(
    backend: Backend, objective_name: str, examples: Sequence[Example], length_normalized: bool
) -> list[str]:
    """For each example, the choice with the highest log-likelihood given the prompt (first on ties).

    Length normalisation divides by the choice's length in characters, as
    lm-evaluation-harness's ``acc_norm`` does: tokenizer-independent, so hf and
    vLLM (and different models) normalise identically. Like ``acc_norm`` it counts
    the choice without the target delimiter, the one leading space the continuation
    carries (:func:`choice_length`).
    """
    requests: list[tuple[str, str]] = []
    for e in examples:
        if not e.choices:
            raise DataFileError(f"objective {objective_name!r} example {e.id!r} has no choices to score")
        requests += [(e.prompt, c) for c in e.choices]
    scores = backend.loglikelihood(requests)
    check_output_count("loglikelihood", len(scores), len(requests))
    chosen, offset = [], 0
    for e in examples:
        choices = e.choices or ()
        values = scores[offset : offset + len(choices)]
        if length_normalized:
            values = [v / choice_length(c) for v, c in zip(values, choices, strict=True)]
        chosen.append(choices[max(range(len(values)), key=values.__getitem__)])
        offset += len(choices)
    return chosen


def choice_length(continuation: str) -> int:
    """The characters ``acc_norm`` divides by: lm-eval scores ``delimiter + choice`` but normalises by
    ``len(choice)``, so a leading space (the default delimiter) is not counted; at least 1."""
    return max(len(continuation[1:] if continuation.startswith(" ") else continuation), 1)
