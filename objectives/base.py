"""What an objective is: data splits + prompt format + decoding + scorer.

An objective knows nothing about models. Evaluators (``hm3.eval``) turn its
examples into model calls according to its :attr:`Objective.decoding`, then
hand the raw outputs back to :meth:`Objective.score` and
:meth:`Objective.aggregate`. Scores are in [0, 1] so objectives can share one
Pareto front and one hypervolume protocol.

Orientation rule: an objective whose metric is better when lower (an error rate, a normalised
perplexity) sets :attr:`Objective.higher_is_better` to False and still scores in [0, 1]. The run
store and ``hm3 eval`` keep that raw metric; everything that ranks candidates -- searches, fronts,
hypervolumes, preference requests -- sees its :func:`utility`, ``1 - score``, so every axis is
maximised and the base-to-ideal normalisation and the hypervolume reference keep their meaning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One item of a task.

    ``target`` is the reference answer (used by scorers and, for Fisher
    estimation, as the continuation whose log-likelihood is differentiated).
    ``choices`` is set for multiple-choice objectives only.
    """

    id: str
    prompt: str
    target: str
    choices: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Generate:
    """Greedy generation of at most ``max_new_tokens``, cut at the first stop string."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogLikelihood:
    """Pick the choice with the highest log-likelihood given the prompt."""

    length_normalized: bool = False


Decoding = Generate | LogLikelihood


class Objective(ABC):
    """A task hm3 optimises for.

    Subclasses set :attr:`name` (``"zoo:math"``, ``"gsm8k"`` …) and
    :attr:`decoding`, and implement :meth:`examples` and :meth:`score`.
    """

    name: str
    decoding: Decoding
    description: str = ""
    #: False for a metric where lower is better (an error rate in [0, 1]): searches maximise its
    #: :func:`utility` instead (module docstring).
    higher_is_better: bool = True
    #: Format every prompt with the evaluated model's chat template (one user message, then the
    #: assistant's turn) before it is tokenised: :func:`hm3.eval.backend.chat_prompt`.
    chat_template: bool = False

    @abstractmethod
    def examples(self, split: str) -> Sequence[Example]:
        """All examples of ``split`` (one of :data:`SPLITS`), in a fixed order."""

    @abstractmethod
    def score(self, example: Example, output: str) -> float:
        """Score of one output in [0, 1].

        ``output`` is the generated text after stop-string truncation, or the
        chosen choice's text for log-likelihood objectives.
        """

    def aggregate(self, examples: Sequence[Example], outputs: Sequence[str]) -> float:
        """Task score over a set of examples; the mean of per-example scores unless a
        metric is corpus-level (chrF)."""
        if not examples:
            raise ValueError(f"{self.name}: cannot aggregate zero examples")
        return sum(self.score(e, o) for e, o in zip(examples, outputs, strict=True)) / len(examples)


def utility(score: float, higher_is_better: bool) -> float:
    """What a search maximises for a raw ``score``: the score itself, or ``1 - score`` when lower is
    better. The map is its own inverse, so it also turns a utility back into the raw metric."""
    if higher_is_better:
        return score
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"a lower-is-better score must lie in [0, 1] to be turned into a utility, got {score}")
    return 1.0 - score


class HarnessObjective(Objective):
    """An objective whose examples are lm-evaluation-harness requests (:mod:`objectives.lmeval`).

    Its task decides the requests (loglikelihood, generate_until), the filters and the metric, and the
    metric may be corpus-level, so it is scored as a set: the evaluator answers :meth:`requests` with a
    backend (:mod:`hm3.eval.harness`) and hands them to :meth:`score_answered`; :meth:`score` and
    :meth:`aggregate` are never used. :attr:`decoding` still describes the examples (prompt, target,
    choices) the way Fisher estimation reads them.
    """

    @abstractmethod
    def requests(self, examples: Sequence[Example]) -> list[list[Any]]:
        """Fresh, unanswered lm-eval ``Instance`` objects for each example, in order."""

    @abstractmethod
    def score_answered(self, examples: Sequence[Example], requests: Sequence[Sequence[Any]]) -> tuple[float, list[str]]:
        """(score in [0, 1], one output text per example) from the answered :meth:`requests`."""

    def score_answered_samples(self, examples: Sequence[Example], requests: Sequence[Sequence[Any]]
                               ) -> tuple[float, list[str], list[dict[str, Any]]]:
        """:meth:`score_answered`, and a record per example for ``--log-samples`` (:mod:`hm3.samples`): the
        example, its output, and whatever per-document detail the task gives (here none: override it)."""
        score, outputs = self.score_answered(examples, requests)
        return score, outputs, [{"example_id": e.id, "prompt": e.prompt, "output": o, "target": e.target}
                                for e, o in zip(examples, outputs, strict=True)]

    def score(self, example: Example, output: str) -> float:
        raise TypeError(f"objective {self.name!r} is scored as a set of lm-eval requests (score_answered)")
