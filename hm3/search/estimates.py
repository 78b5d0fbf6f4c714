"""What the run store knows of a candidate scored on example subsets: its mean and a lower bound.

Level 2 scores paths on Dynamic Average Reward subsets of a few examples each, and a path met in
several episodes has several such scores. A budget-0 request ranks the policy's path by them
against measured front points and must not be fooled by one lucky subset, so it compares the
count-weighted mean *minus one standard error*. Scores lie
in [0, 1], so the standard error of a mean over n examples is at most 0.5/√n (a Bernoulli score at
p = 0.5); on hm3's normalised scale it is divided by each objective's span (base to best expert).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from hm3.search.pareto import normalisation_span, normalise
from hm3.store import CandidateRef, RunStore

Estimate = tuple[np.ndarray, np.ndarray]  # (count-weighted mean score, examples behind it), per objective


def stored_estimate(
    store: RunStore, candidate: CandidateRef | int, objectives: Sequence[str], split: str = "validation"
) -> Estimate | None:
    """The mean of every ``split`` score stored for ``candidate``, per objective, or None if an
    objective has none."""
    return stored_estimates(store, objectives, split, [candidate]).get(
        candidate if isinstance(candidate, int) else candidate.id
    )


def stored_estimates(
    store: RunStore, objectives: Sequence[str], split: str = "validation",
    candidates: Sequence[CandidateRef | int] | None = None,
) -> dict[int, Estimate]:
    """:func:`stored_estimate` of many candidates (all with stored scores when ``candidates`` is None)
    from one pass over the store."""
    wanted = None if candidates is None else {c if isinstance(c, int) else c.id for c in candidates}
    sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    if wanted is not None and len(wanted) == 1:  # one candidate: let SQLite filter
        rows = store.evaluations(next(iter(wanted)), split=split)
    else:
        rows = store.evaluations(split=split)
    for e in rows:
        if wanted is not None and e.candidate_id not in wanted:
            continue
        acc = sums[e.candidate_id][e.objective]
        acc[0] += e.score * e.count
        acc[1] += e.count
    out: dict[int, Estimate] = {}
    for cid, by_objective in sums.items():
        if all(by_objective[o][1] > 0 for o in objectives):
            counts = np.array([by_objective[o][1] for o in objectives])
            out[cid] = (np.array([by_objective[o][0] for o in objectives]) / counts, counts)
    return out


def lower_bound(lam: np.ndarray, estimate: Estimate, base: np.ndarray, ideal: np.ndarray) -> float:
    """``Σ_k λ_k f̂_k`` of an estimate minus one (worst-case) standard error of that sum."""
    means, counts = estimate
    value = float(np.dot(lam, normalise(np.asarray(means, dtype=float)[None], base, ideal)[0]))
    se = 0.5 / np.sqrt(np.maximum(np.asarray(counts, dtype=float), 1.0)) / normalisation_span(base, ideal)
    return value - float(np.sqrt(np.sum((np.asarray(lam) * se) ** 2)))
