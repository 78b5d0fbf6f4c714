"""Executors: the workers that score a session's candidates in parallel, each with its own live model.

A parallel session (:class:`hm3.eval.parallel.ExecutorSession`) keeps the run store in the process
that runs the search -- its only writer -- and hands the scoring to an executor. A job is a
candidate, a split plan and the objectives the store lacks for it; a worker puts the candidate's
weights into its live model (:class:`hm3.eval.live.LiveModel`), scores it, and returns one
:class:`ObjectiveScore` per objective, which the session commits. Jobs and results are plain data,
so a worker can be another process or another machine (:mod:`hm3.eval.ray_executor`).

The interface is small on purpose: :meth:`Executor.submit` hands a job to the next idle worker,
:meth:`Executor.next_done` waits for whichever finishes first, and :func:`score_many` runs a batch
on top of the two. A search that keeps workers busy with new proposals while others are still being
scored, or runs level-2 episodes side by side, needs nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from hm3.eval.session import Candidate, FrameKey, PoolLayout
from hm3.search.scoring import SplitPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreJob:
    """Score ``candidate`` on ``plan`` for ``objectives`` (names; those the run store lacks).

    ``frames``: the recipes of the stored merges a path candidate's frame names (id -> recipe), since
    a worker has no run store to look them up in.
    """

    candidate: Candidate
    plan: SplitPlan
    objectives: tuple[str, ...]
    frames: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    samples: bool = False  # also return each objective's per-example records (--log-samples)


@dataclass(frozen=True)
class ObjectiveScore:
    """One objective's score of a job, as the run store records it."""

    objective: str
    score: float
    count: int  # examples run
    seconds: float
    samples: tuple[dict[str, Any], ...] | None = None  # per-example records, when the job asked for them


@runtime_checkable
class Executor(Protocol):
    """Workers, each with a live model built from the run's config, scoring jobs as they are submitted."""

    #: How many jobs run at once.
    workers: int
    #: What the executor is (``ray``), for the run's summary.
    name: str

    @property
    def backend(self) -> str:
        """The workers' evaluator backend (``hf``), as stored beside each score."""
        ...

    @property
    def placement(self) -> Mapping[str, str]:
        """Where a worker evaluates and merges (:attr:`hm3.eval.session.EvaluationSession.placement`)."""
        ...

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet returned by :meth:`next_done`."""
        ...

    def submit(self, job: ScoreJob) -> int:
        """Queue ``job`` for the next idle worker; returns its ticket (the order of submission, from 0)."""
        ...

    def next_done(self) -> tuple[int, list[ObjectiveScore]]:
        """Wait for the next job to finish, whichever it is: its ticket and scores (one per objective asked)."""
        ...

    def drain(self) -> list[tuple[int, list[ObjectiveScore]]]:
        """The jobs that workers have finished and :meth:`next_done` has not returned (ticket and scores, as
        it returns them), waiting at most briefly for the others: what a run that stops can still commit."""
        ...

    def pool_layout(self) -> PoolLayout:
        """The layer pool's shape, from a worker's live model."""
        ...

    def layer_features(self, frames: Sequence[FrameKey], recipes: Mapping[int, Mapping[str, Any]]) -> torch.Tensor:
        """Level 2's layer features over ``frames`` (``recipes``: those that are stored merges), from a worker."""
        ...

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        ...


def score_many(executor: Executor, jobs: Sequence[ScoreJob],
               on_done: Callable[[int, list[ObjectiveScore]], None] | None = None) -> list[list[ObjectiveScore]]:
    """Every job of a batch scored by ``executor``'s workers, in parallel: results in job order, while
    ``on_done(index, scores)`` sees each job as it finishes (the session commits it there). A batch that
    fails (a job's error, an interrupt) first hands ``on_done`` the jobs other workers had finished, so
    that their evaluations are kept."""
    if executor.pending:
        raise RuntimeError(f"score_many needs an idle executor, {executor.pending} job(s) are still pending")
    index = {executor.submit(job): i for i, job in enumerate(jobs)}
    results: list[list[ObjectiveScore] | None] = [None] * len(jobs)
    try:
        while index:
            ticket, scores = executor.next_done()
            i = index.pop(ticket)
            results[i] = scores
            if on_done is not None:
                on_done(i, scores)
    except BaseException:
        if on_done is not None:
            done = on_done

            def commit(ticket: int, scores: list[ObjectiveScore]) -> None:
                if ticket in index:
                    done(index.pop(ticket), scores)

            salvage(executor, commit)
        raise
    return [r for r in results if r is not None]


def salvage(executor: Executor, commit: Callable[[int, list[ObjectiveScore]], None]) -> None:
    """``commit(ticket, scores)`` of each job the workers finished and no one collected, as a run stops on
    an error; a failure here is logged, not raised, so that the error that stopped the run is the one seen."""
    try:
        for ticket, scores in executor.drain():
            commit(ticket, scores)
    except Exception as err:
        logger.warning(f"finished evaluations could not be committed as the run stopped: {type(err).__name__}: {err}")
