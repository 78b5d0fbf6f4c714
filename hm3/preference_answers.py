"""What a budget-0 ``hm3 request`` answers for each setting of a report's preference sliders.

A report's sliders give each objective an integer weight ``0..steps``; a setting stands for
``hm3 request RUN --prefer math=3,code=1,... OUT`` with those weights. Its answer is computed here,
in Python, by :func:`hm3.request.budget_zero_choice` -- the function ``hm3 request`` itself calls,
on a preference parsed by the request's own parser -- and the page only looks it up.

Why not compute it in the browser: besides the front points (a weighted sum), a budget-0 request
weighs the pretrained level-2 policy's greedy path for λ (a neural network's rollout) and the level-1
BO posterior's proposal (GP predictions on a 1024-point grid, decoded to a recipe); a JavaScript copy
of either would be a second implementation that drifts from the one requests run. Settings that are
multiples of each other (1,2 and 2,4) are one preference once normalised, so each direction is
answered once, and ``steps`` shrinks with the number of objectives to keep the table small.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

from hm3.request import budget_zero_choice, load_policy, parse_preference, preference_names
from hm3.run.directory import FinishedRun
from hm3.search.posterior import load_posterior
from hm3.store import RunStore

MAX_DIRECTIONS = 260  # each costs one policy rollout (~20 ms on a lightly loaded 2-core machine)
MAX_STEPS = 10


@dataclass(frozen=True)
class PreferenceAnswer:
    weights: tuple[int, ...]  # the slider setting, reduced (gcd 1)
    prefer: str  # the --prefer text it stands for
    lam: list[float]
    source: str  # what hm3 request prints after "answer:"
    kind: str  # "merge" or "path"
    candidate: int | None  # the store's id of the answer, when the store holds it
    scores: list[float]  # validation scores: stored, or predicted for an unevaluated answer
    score: float  # what it was chosen by: Σ λ_k f̂_k, or its lower bound for an estimate or a prediction
    recipe: dict[str, Any]
    basis: str  # where ``scores`` come from: "measured" (a front point), "estimated" (a policy path), "predicted"


def slider_steps(k: int, cap: int = MAX_DIRECTIONS) -> int:
    """The finest slider (largest ``steps`` up to :data:`MAX_STEPS`) whose directions number ``cap`` at most."""
    steps = 1
    while steps < MAX_STEPS and len(directions(k, steps + 1)) <= cap:
        steps += 1
    return steps


def directions(k: int, steps: int) -> list[tuple[int, ...]]:
    """Integer weight vectors in ``{0..steps}^k``, not all zero, each direction once (gcd 1)."""
    return [w for w in itertools.product(range(steps + 1), repeat=k) if any(w) and reduce(math.gcd, w) == 1]


def prefer_text(objectives: Sequence[str], weights: Sequence[int]) -> str:
    """``math=3,code=1,translation=0``: the ``--prefer`` text of a slider setting."""
    return ",".join(f"{n}={w}" for n, w in zip(preference_names(objectives), weights, strict=True))


def budget_zero_answers(run_dir: Path, run: FinishedRun, steps: int) -> list[PreferenceAnswer]:
    """The budget-0 answer of every slider direction of ``run`` (read by :func:`hm3.run.directory.read_finished_run`)."""
    import torch

    posterior = load_posterior(run.level1_dir)
    # One torch thread for the policy's rollouts: its layers are tiny, and on a loaded 2-core machine one
    # thread ran them >10x faster than two. At these layer sizes torch's outputs are bitwise the same with
    # one thread and with two, so the answers stay those of an ``hm3 request`` with its default threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _answers(run_dir, run, steps, posterior)
    finally:
        torch.set_num_threads(threads)


def _answers(run_dir: Path, run: FinishedRun, steps: int, posterior: dict[str, Any] | None) -> list[PreferenceAnswer]:
    answers = []
    policy = load_policy(run_dir) if run.kind == "two-level" else None
    with RunStore.open(run_dir, readonly=True) as store:
        for weights in directions(len(run.names), steps):
            prefer = prefer_text(run.names, weights)
            lam, _ = parse_preference(prefer, run.names)
            best = budget_zero_choice(run, store, lam, posterior, policy, notes=[])
            recipe = best.stored_recipe(store)
            candidate = best.candidate
            if candidate is None:  # the policy's path (stored subset scores) or the posterior's merge (never evaluated)
                found = store.find_candidate(recipe)
                candidate = found.id if found is not None else None
            answers.append(PreferenceAnswer(weights=weights, prefer=prefer, lam=lam.tolist(), source=best.source,
                                            kind=best.kind, candidate=candidate, scores=[float(v) for v in best.scores],
                                            score=float(best.score), recipe=recipe, basis=best.scores_are))
    return answers
