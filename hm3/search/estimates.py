"""What the run store knows of a candidate scored on example subsets: its mean and a lower bound.

Level 2 scores paths on Dynamic Average Reward subsets of a few examples each, and a path met in
several episodes has several such scores. A budget-0 request ranks the policy's path by them
against measured front points and must not be fooled by one lucky subset, so it compares the
count-weighted mean *minus one standard error*. Scores in [0, 1] have a standard error of a mean
over n examples of at most 0.5/√n (a Bernoulli score at p = 0.5); on hm3's normalised scale it is
divided by each objective's span (base to best expert). An unbounded metric (perplexity: utility
map ``-raw``) has no such bound, so a subset estimate cannot vouch for it: where it carries weight,
the lower bound is -inf and only measured scores rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hm3.search.pareto import normalisation_span, weighted_normalised
from hm3.store import CandidateRef, RunStore
from objectives.base import NEGATION, utility

Estimate = tuple[np.ndarray, np.ndarray]  # (count-weighted mean score, examples behind it), per objective


def stored_estimate(
    store: RunStore, candidate: CandidateRef | int, objectives: Sequence[str], split: str = "validation", *,
    utility_maps: Sequence[str] | None = None,
) -> Estimate | None:
    """The count-weighted mean of every ``split`` score stored for ``candidate``, per objective, with
    the number of examples behind it; None if an objective has none.

    The store keeps raw metrics: ``utility_maps`` (per objective, :func:`objectives.base.utility_map`;
    None: all raw) turns the means into the utilities everything else ranks by (each map is affine, so
    the mean of the utilities is the utility of the mean)."""
    rows = store.evaluations(candidate, split=split)
    counts = np.array([sum(e.count for e in rows if e.objective == o) for o in objectives], dtype=float)
    if not np.all(counts > 0):
        return None
    sums = np.array([sum(e.score * e.count for e in rows if e.objective == o) for o in objectives])
    means = sums / counts
    if utility_maps is not None:
        means = np.array([utility(float(m), how) for m, how in zip(means, utility_maps, strict=True)])
    return means, counts


def lower_bound(lam: np.ndarray, estimate: Estimate, base: np.ndarray, ideal: np.ndarray,
                utility_maps: Sequence[str] | None = None) -> float:
    """``Σ_k λ_k f̂_k`` of an estimate minus one (worst-case) standard error of that sum; -inf where an
    unbounded objective (``utility_maps``, module docstring) has weight."""
    if utility_maps is not None and any(w > 0 and how == NEGATION for w, how in zip(lam, utility_maps, strict=True)):
        return float("-inf")
    means, counts = estimate
    se = 0.5 / np.sqrt(np.maximum(np.asarray(counts, dtype=float), 1.0)) / normalisation_span(base, ideal)
    return weighted_normalised(lam, means, base, ideal) - float(np.sqrt(np.sum((np.asarray(lam) * se) ** 2)))
