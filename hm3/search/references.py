"""The reference models' scores: the hypervolume protocol's 0 (the base model) and 1 (the best expert
on each task), scored through an evaluation session like any candidate (and so kept in the run store)."""

from __future__ import annotations

import numpy as np

from hm3.eval.session import EvaluationSession, ReferenceCandidate
from hm3.search.scoring import SplitPlan
from hm3.search.space import SearchSpace


def reference_scores(session: EvaluationSession, space: SearchSpace, plan: SplitPlan) -> dict[str, np.ndarray]:
    """Scores of the base and of every expert on ``plan``, base first (from the store when there)."""
    refs = [space.base_model, *space.models]
    scored = session.score_many([ReferenceCandidate(ref) for ref in refs], plan)
    return {ref: s.scores for ref, s in zip(refs, scored, strict=True)}


def protocol_points(refs: dict[str, np.ndarray], space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    """(base, ideal) from the reference models' scores: the HV protocol's 0 (the base model) and 1
    (the best expert on each task)."""
    return np.asarray(refs[space.base_model]), np.max(np.stack([refs[r] for r in space.models]), axis=0)


def reference_points(session: EvaluationSession, space: SearchSpace,
                     plan: SplitPlan) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(reference scores, base, ideal) on ``plan``."""
    refs = reference_scores(session, space, plan)
    return refs, *protocol_points(refs, space)
