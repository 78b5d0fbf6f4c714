"""Scoring candidates through one loaded model, with every score remembered in the run store.

A candidate is anything the store can hash (a merge recipe, a layer path, a
reference model). :meth:`CandidateScorer.score` asks the store first and only
when some objective is missing calls ``install`` — which puts the candidate's
weights into the live model — and evaluates. A resumed run therefore never
re-merges or re-scores what a crashed run already committed.

This is where a raw metric becomes what searches maximise: the store keeps each objective's raw
score, and both functions that hand scores to a session (:func:`stored_scores`,
:meth:`CandidateScorer.score`) return *utilities* -- ``1 - score`` (or ``-score`` when unbounded)
for an objective whose ``higher_is_better`` is False (:func:`objectives.base.utility_map`). Every
session goes through them, so fronts, hypervolumes, references and requests see one orientation
without knowing there are two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hm3.eval.backend import Backend
from hm3.eval.evaluate import evaluate_objective, select_examples
from hm3.samples import SampleLog
from hm3.store import CandidateRef, RunStore, ref_id
from objectives.base import Objective, utility, utility_map


@dataclass(frozen=True)
class SplitPlan:
    """Which examples of which split a score is computed on (fixed for a whole run)."""

    split: str
    indices: Mapping[str, list[int]]  # objective name -> example indices


def first_n(objectives: Sequence[Objective], split: str, n: int | None) -> SplitPlan:
    """The first ``n`` examples of ``split`` of every objective (all when ``n`` is None)."""
    indices = {}
    for obj in objectives:
        total = len(obj.examples(split))
        indices[obj.name] = list(range(total if n is None else min(n, total)))
    return SplitPlan(split=split, indices=indices)


def example_ids(obj: Objective, plan: SplitPlan) -> list[str]:
    """The ids of ``obj``'s examples in ``plan`` (what a stored score is keyed by)."""
    return [e.id for e in select_examples(obj, plan.split, plan.indices[obj.name])]


def utility_maps(objectives: Sequence[Objective]) -> list[str]:
    """Per objective, the map from its raw score to its utility (:func:`objectives.base.utility_map`)."""
    return [utility_map(o.higher_is_better, o.bounded) for o in objectives]


def utilities(objectives: Sequence[Objective], raw: Sequence[float]) -> np.ndarray:
    """Raw scores (one per objective, in order) as the utilities searches maximise; the same map turns
    utilities back into raw scores (it is its own inverse)."""
    out = []
    for obj, how, value in zip(objectives, utility_maps(objectives), raw, strict=True):
        try:
            out.append(utility(float(value), how))
        except ValueError as err:
            raise ValueError(f"objective {obj.name!r}: {err}") from None
    return np.array(out, dtype=float)


def stored_scores(store: RunStore, objectives: Sequence[Objective], candidate: CandidateRef | int,
                  plan: SplitPlan) -> np.ndarray | None:
    """Stored scores of every objective on ``plan`` as utilities, in order, or None if any is missing."""
    out = []
    for obj in objectives:
        ev = store.get_evaluation(candidate, obj.name, plan.split, example_ids(obj, plan))
        if ev is None:
            return None
        out.append(ev.score)
    return utilities(objectives, out)


class CandidateScorer:
    """Scores candidates through the store (module docstring); with a ``samples`` log, each evaluation's
    per-example records are written (:mod:`hm3.samples`) just before its score is committed."""

    def __init__(self, backend: Backend, objectives: Sequence[Objective], store: RunStore,
                 samples: SampleLog | None = None):
        self.backend = backend
        self.objectives = list(objectives)
        self.store = store
        self.samples = samples
        self.evaluated_examples = 0  # examples actually run through the model (not cache hits)
        self.cache_hits = 0

    def cached(self, candidate: CandidateRef | int, plan: SplitPlan) -> np.ndarray | None:
        """Stored scores of every objective, or None if any is missing."""
        return stored_scores(self.store, self.objectives, candidate, plan)

    def score(self, candidate: CandidateRef | int, install: Callable[[], None], plan: SplitPlan) -> np.ndarray:
        """Utilities (one per objective, in objective order) of ``candidate`` on ``plan``; the store gets
        the raw scores."""
        installed = False
        scores = []
        for obj in self.objectives:
            ran = False

            def compute(obj=obj) -> tuple[float, int]:
                nonlocal installed, ran
                if not installed:
                    install()
                    installed = True
                result = evaluate_objective(self.backend, obj, plan.split, plan.indices[obj.name],
                                            samples=self.samples is not None)
                if self.samples is not None:
                    self.samples.write(obj.name, plan.split, result.samples or (), ref_id(candidate))
                self.evaluated_examples += result.count
                ran = True
                return result.score, result.count

            ids = example_ids(obj, plan)
            ev = self.store.evaluate_cached(candidate, obj.name, plan.split, ids, compute, backend=self.backend.name)
            self.cache_hits += 0 if ran else 1
            scores.append(ev.score)
        return utilities(self.objectives, scores)
