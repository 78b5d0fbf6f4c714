"""The evaluation session of a parallel executor: workers score, this process keeps the run store.

:class:`ExecutorSession` is the :class:`~hm3.eval.session.EvaluationSession` a search gets when
``evaluation.executor`` is not ``local``. It loads no model: it stores each candidate, looks its
scores up, sends what is missing to the executor's workers (:mod:`hm3.eval.executor`) and commits
each candidate's scores the moment its worker returns them. The process running the search is thus
the store's only writer (SQLite and its lock stay in one place, and a worker may run on a machine
that cannot see the run directory), and a killed run resumes from the store as a local one does.

A batch (:meth:`ExecutorSession.score_many`) is scored in parallel; the scores come back in the
batch's order, whichever worker finished first, so what a search does with them depends on the
batch, not on the timing. An asynchronous search instead keeps every worker busy with
:meth:`ExecutorSession.submit` and takes each candidate as it finishes from
:meth:`ExecutorSession.next_done` (in the order of the timing, which it then says).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hm3.eval.executor import Executor, ObjectiveScore, ScoreJob, salvage, score_many
from hm3.eval.session import Candidate, FrameKey, PathCandidate, PoolLayout, Scored, plans_for
from hm3.samples import SAMPLES_DIR, SampleLog
from hm3.search.run_config import RunConfig
from hm3.search.scoring import SplitPlan, example_ids, first_n, stored_scores, utility_maps
from hm3.store import CandidateRef, RunStore, example_set_key
from objectives.registry import build_objectives


class ExecutorSession:
    """:class:`~hm3.eval.session.EvaluationSession` whose candidates are scored by ``executor``'s workers
    (started, each with its own live model of ``cfg``); it owns the executor and closes it."""

    def __init__(self, cfg: RunConfig, store: RunStore, executor: Executor):
        if cfg.search_space.fisher:  # the run config refuses it too: Fisher tensors need a live model here
            raise ValueError("a Fisher-weighted search space needs a live model in this process")
        self.cfg = cfg
        self.store = store
        self.executor = executor
        self.objectives = build_objectives(cfg.objectives, where="the run config's objectives",
                                           chat=cfg.evaluation.chat_template)
        self.objective_names = [o.name for o in self.objectives]
        self.higher_is_better = [o.higher_is_better for o in self.objectives]
        self.utility_maps = utility_maps(self.objectives)
        self.validation = first_n(self.objectives, "validation", cfg.evaluation.validation_examples)
        self.test = first_n(self.objectives, "test", cfg.evaluation.test_examples)
        self._evaluated = 0
        self._layout: PoolLayout | None = None
        self._submitted: dict[int, tuple[CandidateRef, SplitPlan, ScoreJob]] = {}  # ticket -> job in flight
        self._samples = (SampleLog(store.path.parent / SAMPLES_DIR, self.objective_names)
                         if cfg.evaluation.log_samples else None)

    @property
    def evaluated_examples(self) -> int:
        return self._evaluated

    @property
    def placement(self) -> dict[str, str]:
        """A worker's placement, and the executor and its number of workers."""
        return {**self.executor.placement, "executor": self.executor.name, "workers": str(self.executor.workers)}

    def score(self, candidate: Candidate, plan: SplitPlan) -> Scored:
        return self.score_many([candidate], plan)[0]

    def score_many(self, candidates: Sequence[Candidate], plan: SplitPlan | Sequence[SplitPlan]) -> list[Scored]:
        """Each candidate stored (in the order given) and scored on its plan (``plan``, or one per
        candidate): what the store lacks is scored in parallel, each (candidate, objective, examples) once
        however often it appears -- two plans may share an objective's examples -- and committed as it
        arrives."""
        plans = plans_for(candidates, plan)
        refs = [self.store.add_candidate(c.stored_recipe(), c.kind) for c in candidates]
        jobs: list[ScoreJob] = []
        owners: list[tuple[CandidateRef, SplitPlan]] = []
        asked: set[tuple[int, str, str, str]] = set()  # (candidate, objective, split, example set) in a job
        for candidate, ref, p in zip(candidates, refs, plans, strict=True):
            missing = []
            for o in self.objectives:
                ids = example_ids(o, p)
                key = (ref.id, o.name, p.split, example_set_key(ids))
                if key not in asked and self.store.get_evaluation(ref, o.name, p.split, ids) is None:
                    asked.add(key)
                    missing.append(o.name)
            if missing:
                jobs.append(ScoreJob(candidate, p, tuple(missing), self._frame_recipes(candidate),
                                     samples=self._samples is not None))
                owners.append((ref, p))

        def commit(i: int, scores: list[ObjectiveScore]) -> None:
            ref, p = owners[i]
            self._commit(ref, p, jobs[i].objectives, scores)

        score_many(self.executor, jobs, on_done=commit)
        out = []
        for ref, p in zip(refs, plans, strict=True):
            scores = self.stored_scores(ref, p)
            assert scores is not None  # every missing score was committed above
            out.append(Scored(ref, scores))
        return out

    def submit(self, candidate: Candidate, plan: SplitPlan) -> tuple[CandidateRef, int | None]:
        """``candidate`` stored and, if the store lacks some of its scores on ``plan``, handed to the next
        idle worker: its ref and ticket (None: nothing to score, its scores are stored). A candidate
        already in flight is not sent again: its ticket is returned."""
        ref = self.store.add_candidate(candidate.stored_recipe(), candidate.kind)
        for ticket, (owner, owner_plan, _) in self._submitted.items():
            if owner == ref and owner_plan == plan:
                return ref, ticket
        missing = tuple(o.name for o in self.objectives
                        if self.store.get_evaluation(ref, o.name, plan.split, example_ids(o, plan)) is None)
        if not missing:
            return ref, None
        job = ScoreJob(candidate, plan, missing, self._frame_recipes(candidate), samples=self._samples is not None)
        ticket = self.executor.submit(job)
        self._submitted[ticket] = (ref, plan, job)
        return ref, ticket

    def next_done(self) -> tuple[int, Scored]:
        """The next submitted candidate a worker finishes, whichever it is: its ticket and scores (committed)."""
        ticket, scores = self.executor.next_done()
        ref, plan, job = self._submitted.pop(ticket)
        self._commit(ref, plan, job.objectives, scores)
        stored = self.stored_scores(ref, plan)
        assert stored is not None  # every missing score was just committed
        return ticket, Scored(ref, stored)

    @property
    def in_flight(self) -> int:
        """Candidates submitted and not yet returned by :meth:`next_done`."""
        return len(self._submitted)

    def stored_scores(self, candidate: CandidateRef | int, plan: SplitPlan) -> np.ndarray | None:
        return stored_scores(self.store, self.objectives, candidate, plan)

    def merge_recipe(self, x: torch.Tensor) -> dict[str, Any]:
        return self.cfg.search_space.to_recipe(x)

    def pool_layout(self) -> PoolLayout:
        if self._layout is None:
            self._layout = self.executor.pool_layout()
        return self._layout

    def layer_features(self, frames: Sequence[FrameKey]) -> torch.Tensor:
        recipes = {int(f): self.store.candidate(int(f))[1] for f in frames if f != "base"}
        return self.executor.layer_features(frames, recipes)

    def close(self) -> None:
        """The workers stopped, after committing what they finished that :meth:`next_done` did not return
        (a run stopped by an error while candidates were in flight: a resumed run finds those scores stored)."""
        try:
            salvage(self.executor, self._commit_submitted)
        finally:
            self.executor.close()

    def _commit_submitted(self, ticket: int, scores: Sequence[ObjectiveScore]) -> None:
        if ticket in self._submitted:
            ref, plan, job = self._submitted.pop(ticket)
            self._commit(ref, plan, job.objectives, scores)

    def _frame_recipes(self, candidate: Candidate) -> Mapping[int, Mapping[str, Any]]:
        if isinstance(candidate, PathCandidate) and candidate.frame != "base":
            frame = int(candidate.frame)
            return {frame: self.store.candidate(frame)[1]}
        return {}

    def _commit(self, ref: CandidateRef, plan: SplitPlan, asked: Sequence[str],
                scores: Sequence[ObjectiveScore]) -> None:
        by_name = {s.objective: s for s in scores}
        if set(by_name) != set(asked):
            raise RuntimeError(f"a worker returned scores for {sorted(by_name)}, asked for {sorted(asked)}")
        for obj in self.objectives:
            s = by_name.get(obj.name)
            if s is None:
                continue
            if self._samples is not None:  # before the score: a stored score always has its samples file
                self._samples.write(obj.name, plan.split, s.samples or (), ref.id)
            self.store.record_evaluation(ref, obj.name, plan.split, example_ids(obj, plan), score=s.score,
                                         count=s.count, seconds=s.seconds, backend=self.executor.backend)
            self._evaluated += s.count
