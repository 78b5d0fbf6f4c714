"""The evaluation session: the one interface through which searches get candidates scored.

Level 1 (merge coefficients), level 2 (layer paths) and preference requests all need the same
service: *score this candidate on these examples of these objectives, through the run store* --
look the scores up first, evaluate only what is missing, commit each score the moment it exists.
They receive an :class:`EvaluationSession` and know nothing of how it gets there: which model is
loaded, how a merge or a path is put into it, which backend runs it.

Why a protocol and not the class that implements it: there are two. :class:`hm3.eval.live.LiveModelSession`
holds one live model in this process; :class:`hm3.eval.parallel.ExecutorSession` holds none and has
an executor's workers score candidates, each worker with its own live model (:mod:`hm3.eval.executor`).
So a live model keeps all its state on itself -- no module-level state, no globals -- and callers
never reach past this interface to the model, the merger or the backend.

Candidates are plain data (what the store keys them by), so they can be handed to another process:

* :class:`MergeCandidate` -- a merge recipe over the run's model refs;
* :class:`PathCandidate` -- a layer path over the experts plus a *frame* (a stored level-1 merge
  id, or ``"base"``) that supplies embeddings, final norm and head;
* :class:`ReferenceCandidate` -- the base model or one expert, as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from hm3.arch.path import LayerPath
from hm3.search.scoring import SplitPlan
from hm3.store import CandidateRef, RunStore

MERGE_KIND = "merge"
PATH_KIND = "path"
REFERENCE_KIND = "reference"
FrameKey = int | str  # a stored level-1 merge's candidate id, or "base"


@dataclass(frozen=True)
class MergeCandidate:
    """A merge recipe (``hm3 merge`` schema) over the run's model refs."""

    recipe: Mapping[str, Any]
    kind: ClassVar[str] = MERGE_KIND

    def stored_recipe(self) -> dict[str, Any]:
        return dict(self.recipe)


@dataclass(frozen=True)
class PathCandidate:
    """A layer path over the pool ``experts + [frame]`` (the frame is pool index ``len(experts)``)."""

    path: LayerPath
    frame: FrameKey
    experts: tuple[str, ...]
    kind: ClassVar[str] = PATH_KIND

    def stored_recipe(self) -> dict[str, Any]:
        """What the run store keys a path by: hops, scales, pool experts and frame."""
        return {"path": self.path.to_json(), "experts": list(self.experts), "frame": self.frame}

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> PathCandidate:
        data = recipe["path"]
        return cls(LayerPath(hops=data["hops"], scales=data.get("scales")), recipe["frame"],
                   tuple(recipe["experts"]))


@dataclass(frozen=True)
class ReferenceCandidate:
    """The base model or one expert (by its ref), unmerged: the hypervolume protocol's 0 and 1."""

    model: str
    kind: ClassVar[str] = REFERENCE_KIND

    def stored_recipe(self) -> dict[str, Any]:
        return {"reference_model": self.model}


Candidate = MergeCandidate | PathCandidate | ReferenceCandidate


def plans_for(candidates: Sequence[Candidate], plan: SplitPlan | Sequence[SplitPlan]) -> list[SplitPlan]:
    """One plan per candidate: ``plan`` repeated, or the per-candidate plans checked to match in number."""
    if isinstance(plan, SplitPlan):
        return [plan] * len(candidates)
    plans = list(plan)
    if len(plans) != len(candidates):
        raise ValueError(f"{len(candidates)} candidate(s) but {len(plans)} plan(s)")
    return plans


@dataclass(frozen=True)
class Scored:
    """A candidate as stored, and its scores: one per objective, in the session's objective order."""

    candidate: CandidateRef
    scores: np.ndarray


@dataclass(frozen=True)
class PoolLayout:
    """The shape of the layer pool that paths are drawn from: the experts, then the frame."""

    experts: tuple[str, ...]
    num_layers: int  # layers of every pool model
    max_hops: int | None  # longest path the session can run (None: any; a fixed-depth engine: its depth)
    backend: str

    @property
    def size(self) -> int:
        return len(self.experts) + 1


@runtime_checkable
class EvaluationSession(Protocol):
    """Scores candidates on the run's objectives through its run store (module docstring)."""

    #: The run store every score is committed to (the caller's: it also holds the search's events).
    store: RunStore
    #: The objectives' names, in the order of every score vector.
    objective_names: list[str]
    #: Per objective, whether its raw metric is better when higher. Score vectors are utilities (a
    #: lower-is-better score ``s`` appears as ``1 - s``, or ``-s`` when unbounded: :mod:`hm3.search.scoring`);
    #: the store keeps raw.
    higher_is_better: list[bool]
    #: Per objective, the map from raw score to utility (:func:`objectives.base.utility_map`).
    utility_maps: list[str]
    #: The run's fixed example plans: the validation examples searches score on, and the test examples
    #: the final front is reported on.
    validation: SplitPlan
    test: SplitPlan

    @property
    def evaluated_examples(self) -> int:
        """Examples run through a model by this session so far (store hits not counted)."""
        ...

    @property
    def placement(self) -> Mapping[str, str]:
        """Where this session evaluates and merges: device, dtypes, and whether the task vectors are held on
        the device or streamed to it from host memory, and why (a run's summary records it)."""
        ...

    def score(self, candidate: Candidate, plan: SplitPlan) -> Scored:
        """Store ``candidate`` (idempotent) and return its scores on ``plan``: stored ones where the store
        has them, evaluated and committed otherwise."""
        ...

    def score_many(self, candidates: Sequence[Candidate], plan: SplitPlan | Sequence[SplitPlan]) -> list[Scored]:
        """:meth:`score` of each candidate, in the order given (each stored in that order); a session with
        several workers scores them in parallel. ``plan``: one for all, or one per candidate (level 2's
        episodes each score on their own reward subset)."""
        ...

    def stored_scores(self, candidate: CandidateRef | int, plan: SplitPlan) -> np.ndarray | None:
        """The stored scores of ``candidate`` on ``plan``, or None if any objective lacks one (never evaluates)."""
        ...

    def merge_recipe(self, x: torch.Tensor) -> dict[str, Any]:
        """The merge recipe of unit-cube point ``x`` of the run's search space (with DF-Merge's Fisher
        tensors computed, and cached in the run directory, when the space asks for them)."""
        ...

    def pool_layout(self) -> PoolLayout:
        """The layer pool's shape (experts, depth, longest runnable path)."""
        ...

    def layer_features(self, frames: Sequence[FrameKey]) -> torch.Tensor:
        """φ(θ), the level-2 policy's per-layer inputs: ``[pool, layers, features]`` for the experts and
        the mean over ``frames`` in the frame slot (:func:`hm3.arch.pools.layer_features`)."""
        ...

    def close(self) -> None:
        """Release the model and its engine (a vLLM engine holds process-wide state until closed)."""
        ...
