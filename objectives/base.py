"""What an objective is: data splits + prompt format + decoding + scorer.

An objective knows nothing about models. Evaluators (``hm3.eval``) turn its
examples into model calls according to its :attr:`Objective.decoding`, then
hand the raw outputs back to :meth:`Objective.score` and
:meth:`Objective.aggregate`. Scores are in [0, 1] so objectives can share one
Pareto front and one hypervolume protocol.

Orientation rule: an objective whose metric is better when lower sets
:attr:`Objective.higher_is_better` to False; one whose lower-is-better metric is not confined to
[0, 1] (perplexity, bits per byte, TER) also sets :attr:`Objective.bounded` to False. The run store
and ``hm3 eval`` keep the raw metric; everything that ranks candidates -- searches, fronts,
hypervolumes, preference requests -- sees its :func:`utility` (``1 - raw``, or ``-raw`` when
unbounded), so every axis is maximised and the base-to-ideal normalisation and the hypervolume
reference keep their meaning.
"""

from __future__ import annotations

import math
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
    """Pick the choice with the highest log-likelihood given the prompt; ``length_normalized`` divides it by
    the choice's length in characters first, as lm-eval's ``acc_norm`` (:func:`hm3.eval.evaluate.choice_length`)."""

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
    #: False for a metric where lower is better (an error rate, a perplexity): searches maximise its
    #: :func:`utility` instead (module docstring).
    higher_is_better: bool = True
    #: Whether a lower-is-better metric lies in [0, 1] (an error rate); False for an unbounded one
    #: (perplexity, bits per byte, TER). It decides the :func:`utility_map`.
    bounded: bool = True
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


#: The maps from a raw score to a utility, by the name run summaries record them under.
IDENTITY, COMPLEMENT, NEGATION = "raw", "1 - raw", "-raw"
UTILITY_MAPS = (IDENTITY, COMPLEMENT, NEGATION)


def utility_map(higher_is_better: bool, bounded: bool = True) -> str:
    """Which map turns an objective's raw score into its utility.

    Every consumer of utilities ranks them after the HV protocol's per-objective normalisation,
    ``(u - base) / (ideal - base)`` (:func:`hm3.search.pareto.normalise`), or by dominance; both are
    unchanged by adding a constant to an axis or scaling it by a positive factor. So any map that is
    affine with a negative slope ranks, normalises and scalarises a lower-is-better metric exactly as
    the metric itself, read upside down -- which a nonlinear map (``1/raw``, ``-log raw``) would not:
    it would stretch some perplexity differences over others before normalisation. ``1 - raw`` keeps
    a metric in [0, 1] in [0, 1] (an error rate reads as an accuracy); for an unbounded metric it
    would suggest a scale it does not have, so ``-raw`` (valid for any finite value) is used.
    """
    if higher_is_better:
        return IDENTITY
    return COMPLEMENT if bounded else NEGATION


def utility(score: float, how: str) -> float:
    """What a search maximises for a raw ``score`` under the map ``how`` (:func:`utility_map`). Each
    map is its own inverse, so this also turns a utility back into the raw metric."""
    if how == IDENTITY:
        return score
    if how == COMPLEMENT:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"a lower-is-better score in [0, 1] must lie in [0, 1] to be turned into a utility "
                             f"(1 - raw), got {score}; an unbounded metric sets bounded = False")
        return 1.0 - score
    if how == NEGATION:
        if not math.isfinite(score):
            raise ValueError(f"a lower-is-better score must be finite to be turned into a utility, got {score}")
        return -score
    raise ValueError(f"unknown utility map {how!r}; one of {', '.join(UTILITY_MAPS)}")


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
