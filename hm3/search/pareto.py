"""Pareto fronts and hm3's hypervolume protocol — identical for every optimiser.

All scores here are MAXIMISED (accuracy, BLEU, pass@1, …), one column per objective.

The HV protocol
---------------
1. **Normalise** each objective between the base model and the ideal point:
   ``f̂_k = (f_k − base_k) / (ideal_k − base_k)``, where ``ideal_k`` is the best score any
   single expert reaches on task k (HM3's z*). The base model sits at 0, the best
   expert at 1 on every axis, so tasks on different scales (BLEU vs accuracy) weigh
   the same, and HV values are comparable across optimisers, seeds and model families.
2. **Reference point = 0** in normalised space, i.e. the base model itself. Merging
   exists to add the experts' skills to the base; a merge that is worse than the base
   on some task has destroyed a capability the user already had for free, so it
   should earn no credit however good it is elsewhere. The base is also the one point
   every method can reach (all coefficients zero), which makes the reference
   method-independent, unlike the nadir of whichever front was found.
3. **Clip** normalised scores below 0 to 0 (a point below the reference on any axis
   contributes no volume), then compute HV with pymoo's exact indicator.

With this protocol a single merge matching every expert on its own task has HV 1.
"""

from __future__ import annotations

import numpy as np

from hm3.errors import ConfigError
from hm3.extras import extra_imports

with extra_imports("search", "Pareto fronts and hypervolumes"):
    from pymoo.indicators.hv import HV
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

#: At or below this gap between ideal and base an objective is treated as degenerate (see ``normalise``).
DEGENERATE_SPAN = 1e-12


def _as_matrix(F: np.ndarray, what: str = "scores") -> np.ndarray:
    F = np.asarray(F, dtype=float)
    if F.ndim != 2:
        raise ConfigError(f"{what} must be an (n points × k objectives) matrix, got shape {F.shape}")
    if not np.all(np.isfinite(F)):
        raise ConfigError(f"{what} hold NaN or Inf values")
    return F


def non_dominated(F: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the rows of ``F`` that no other row dominates (maximisation).

    Exact duplicates do not dominate each other, so both copies are kept.
    """
    F = _as_matrix(F)
    if len(F) == 0:
        return np.zeros(0, dtype=int)
    # pymoo sorts for minimisation
    front = NonDominatedSorting().do(-F, only_non_dominated_front=True)
    return np.sort(np.asarray(front, dtype=int))


def normalise(F: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Map scores so that ``lower`` (the base model) → 0 and ``upper`` (the ideal point) → 1.

    An objective on which no expert beats the base (``upper <= lower``: the experts are equal
    to it, or worse, as on a saturated task) has no natural scale; it is left in raw units
    (span 1) rather than divided by ~0 or by a negative gap, which would let noise dominate
    or flip the objective's direction (a worse score counted as better).
    """
    F = _as_matrix(F)
    lower = np.asarray(lower, dtype=float).reshape(-1)
    upper = np.asarray(upper, dtype=float).reshape(-1)
    k = F.shape[1]
    if lower.shape != (k,) or upper.shape != (k,):
        raise ConfigError(
            f"base scores ({lower.size}) and ideal point ({upper.size}) need one entry per objective ({k})"
        )
    return (F - lower) / normalisation_span(lower, upper)


def normalisation_span(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Per-objective divisor of :func:`normalise`: ``upper − lower``, or 1 where that is not positive."""
    span = np.asarray(upper, dtype=float).reshape(-1) - np.asarray(lower, dtype=float).reshape(-1)
    return np.where(span <= DEGENERATE_SPAN, 1.0, span)


def weighted_normalised(lam: np.ndarray, raw: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """``Σ_k λ_k f̂_k`` of one score vector: the scalarisation requests and level-2 rewards rank by."""
    return float(np.dot(lam, normalise(np.asarray(raw, dtype=float)[None], lower, upper)[0]))


def degenerate_objectives(lower: np.ndarray, upper: np.ndarray) -> list[int]:
    """Objectives on which no expert beats the base (left in raw units by :func:`normalise`)."""
    span = np.asarray(upper, dtype=float).reshape(-1) - np.asarray(lower, dtype=float).reshape(-1)
    return [int(i) for i in np.nonzero(span <= DEGENERATE_SPAN)[0]]


def hypervolume(F_norm: np.ndarray, ref: np.ndarray | None = None) -> float:
    """Hypervolume dominated by maximised points ``F_norm`` above ``ref`` (default: the origin).

    Points are clipped to ``ref`` from below first, so a point below the reference on
    any objective adds nothing; an empty set has HV 0.
    """
    F = _as_matrix(F_norm, "normalised scores")
    k = F.shape[1]
    ref = np.zeros(k) if ref is None else np.asarray(ref, dtype=float).reshape(-1)
    if ref.shape != (k,):
        raise ConfigError(f"reference point has {ref.size} entries, expected {k}")
    if len(F) == 0:
        return 0.0
    clipped = np.maximum(F, ref)
    useful = clipped[np.all(clipped > ref, axis=1)]
    if len(useful) == 0:
        return 0.0
    # pymoo minimises: negate points and reference
    return float(HV(ref_point=-ref)(-useful))


def protocol_hypervolume(F: np.ndarray, base: np.ndarray, ideal: np.ndarray) -> float:
    """hm3's HV of raw scores ``F``: normalised between base and ideal, reference = the base."""
    return hypervolume(normalise(F, base, ideal))
