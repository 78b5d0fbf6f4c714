"""The Ray executor (``evaluation.executor: ray``): each worker is a Ray actor holding its own live model.

Every actor builds a :class:`~hm3.eval.live.LiveModel` from the run's config -- base and experts in
its in-memory merger, one evaluator backend -- and scores the jobs it is given by swapping each
candidate's weights into that model, as a local session does. Jobs go to idle actors through Ray's
``ActorPool``; the results come back to the process that runs the search, which commits them
(:mod:`hm3.eval.parallel`).

Before any actor is created the cluster's free resources are checked against ``workers ×
resources_per_worker``: an actor Ray cannot place waits for resources forever, so a config that
asks for more than there is would hang instead of failing. Ray is started here (a local instance)
only when ``ray_address`` is None and this process has not initialised Ray already; it is then
shut down on close.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from hm3.errors import ExecutorError, Hm3Error
from hm3.eval.executor import ObjectiveScore, ScoreJob
from hm3.eval.session import FrameKey, PoolLayout
from hm3.extras import require
from hm3.search.run_config import EvaluationConfig, RunConfig

NAME = "ray"
#: Seconds a start waits for resources that are being released before it refuses (:func:`wait_until_free`).
RELEASE_GRACE_S = 10.0


class LiveModelWorker:
    """What one Ray actor runs: a live model of the run's config, and the frames it has been sent.

    The model is built by :meth:`start`, not by the constructor, so that an error loading it (a bad
    model, a device the node lacks) comes back from a method call as the error it is."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model: Any = None
        self._frames: dict[int, Mapping[str, Any]] = {}

    def start(self) -> tuple[dict[str, str], str]:
        from hm3.eval.live import LiveModel  # in the actor: the driver loads no model code for it
        from hm3.threads import set_threads

        # torch's threads to the cores the worker reserved (by default torch takes every core of the node,
        # and N workers would each run as many threads as the node has cores)
        set_threads(max(1, math.floor(self.cfg.evaluation.resources_per_worker.num_cpus)))
        self.model = LiveModel(self.cfg, frame_recipe=self._frame_recipe, log=lambda message: None)
        return self.model.placement, self.model.backend.name

    def score(self, ticket: int, job: ScoreJob) -> tuple[int, list[ObjectiveScore]]:
        self._frames.update(job.frames)
        return ticket, self.model.evaluate(job.candidate, job.plan, job.objectives, samples=job.samples)

    def pool_layout(self) -> PoolLayout:
        return self.model.pool_layout()

    def layer_features(self, frames: Sequence[FrameKey], recipes: Mapping[int, Mapping[str, Any]]) -> torch.Tensor:
        self._frames.update(recipes)
        return self.model.layer_features(frames)

    def _frame_recipe(self, candidate_id: int) -> Mapping[str, Any]:
        if candidate_id not in self._frames:
            raise ExecutorError(f"a path's frame, stored merge {candidate_id}, was not sent to this worker")
        return self._frames[candidate_id]


class RayExecutor:
    """:class:`~hm3.eval.executor.Executor` over Ray actors (module docstring). :meth:`connect` joins or
    starts Ray and checks its resources; :meth:`start` creates the workers and loads their models."""

    name = NAME

    def __init__(self, ev: EvaluationConfig, ray: Any, *, started_ray: bool, log: Callable[[str], None]):
        self.workers = ev.workers
        self._ev = ev
        self._ray = ray
        self._started_ray = started_ray
        self._log = log
        self._actors: list[Any] = []
        self._pool: Any = None
        self._tickets = 0
        self._pending = 0
        self._placement: dict[str, str] = {}
        self._backend = ""

    @classmethod
    def connect(cls, ev: EvaluationConfig, *, log: Callable[[str], None]) -> RayExecutor:
        """Ray, joined (``ray_address``) or started here, with room for ``ev.workers`` workers; refused,
        before anything is created, when ray is not installed or the cluster lacks the resources."""
        require("ray", what="evaluation.executor: ray")
        import ray

        started = False
        if not ray.is_initialized():
            where = "a local Ray instance" if ev.ray_address is None else f"the Ray cluster at {ev.ray_address}"
            log(f"starting {where}" if ev.ray_address is None else f"joining {where}")
            try:
                ray.init(address=ev.ray_address, include_dashboard=False, logging_level=logging.WARNING)
            except ConnectionError as err:
                raise ExecutorError(f"evaluation.ray_address {ev.ray_address!r}: no Ray cluster to join "
                                    f"({err})") from None
            started = True
        executor = cls(ev, ray, started_ray=started, log=log)
        try:
            check_node_sizes(ev, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
            wait_until_free(ev, ray.available_resources)
        except BaseException:
            executor.close()
            raise
        return executor

    def start(self, cfg: RunConfig) -> None:
        """Create the workers, each loading its live model of ``cfg`` (in parallel); an error loading one
        is raised here as the error it is."""
        res = cfg.evaluation.resources_per_worker
        remote = self._ray.remote(LiveModelWorker)
        self._log(f"starting {self.workers} Ray worker(s), each with its own model "
                  f"({res.num_cpus:g} CPU, {res.num_gpus:g} GPU each)")
        self._actors = [remote.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(cfg)
                        for _ in range(self.workers)]
        with self._errors():
            started = self._ray.get([a.start.remote() for a in self._actors])
        self._placement, self._backend = started[0]
        from ray.util import ActorPool

        self._pool = ActorPool(self._actors)

    # --- the executor interface --------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def placement(self) -> dict[str, str]:
        return dict(self._placement)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job: ScoreJob) -> int:
        if self._pool is None:
            raise RuntimeError("the Ray executor's workers are not started (RayExecutor.start)")
        ticket = self._tickets
        self._tickets += 1
        self._pool.submit(lambda actor, value: actor.score.remote(*value), (ticket, job))
        self._pending += 1
        return ticket

    def next_done(self) -> tuple[int, list[ObjectiveScore]]:
        if not self._pending:
            raise RuntimeError("no job is pending")
        with self._errors():
            ticket, scores = self._pool.get_next_unordered()
        self._pending -= 1
        return ticket, scores

    def pool_layout(self) -> PoolLayout:
        with self._errors():
            return self._ray.get(self._actors[0].pool_layout.remote())

    def layer_features(self, frames: Sequence[FrameKey], recipes: Mapping[int, Mapping[str, Any]]) -> torch.Tensor:
        with self._errors():
            return self._ray.get(self._actors[0].layer_features.remote(list(frames), dict(recipes)))

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._pool, self._pending = [], None, 0
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._started_ray = False

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """An hm3 error raised in a worker re-raised as itself; a worker that died as an ExecutorError."""
        from ray.exceptions import RayActorError, RayTaskError

        try:
            yield
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, Hm3Error):
                raise cause from None
            raise
        except RayActorError as err:
            raise ExecutorError(f"a Ray worker died ({type(err).__name__}: {str(err).splitlines()[0]}); the "
                                "scores committed so far are in the run store: resume the run") from None


def check_resources(ev: EvaluationConfig, available: Mapping[str, float],
                    nodes: Sequence[Mapping[str, float]]) -> None:
    """Refuse ``ev.workers`` workers the cluster cannot place (Ray would leave such actors waiting, and the
    run hanging): one worker larger than any node, or more CPUs or GPUs in all than are free."""
    check_node_sizes(ev, nodes)
    check_free(ev, available)


def _asked(ev: EvaluationConfig) -> str:
    res = ev.resources_per_worker
    return (f"evaluation.workers: {ev.workers} worker(s) × resources_per_worker {{num_cpus: {res.num_cpus:g}, "
            f"num_gpus: {res.num_gpus:g}}}")


def _per_worker(ev: EvaluationConfig) -> dict[str, float]:
    return {"CPU": ev.resources_per_worker.num_cpus, "GPU": ev.resources_per_worker.num_gpus}


def check_node_sizes(ev: EvaluationConfig, nodes: Sequence[Mapping[str, float]]) -> None:
    """Refuse a worker that no node of the cluster (``nodes``: each one's total resources) can hold."""
    for key, each in _per_worker(ev).items():
        if each and not any(node.get(key, 0) >= each for node in nodes):
            largest = max((node.get(key, 0) for node in nodes), default=0)
            raise ExecutorError(f"{_asked(ev)}: no node of the Ray cluster has {each:g} {key}(s) for one worker "
                                f"(the largest has {largest:g}); lower resources_per_worker")


def check_free(ev: EvaluationConfig, available: Mapping[str, float]) -> None:
    """Refuse workers that need more CPUs or GPUs in all than the cluster has free."""
    for key, each in _per_worker(ev).items():
        need, free = each * ev.workers, available.get(key, 0.0)
        if need > free + 1e-9:
            raise ExecutorError(f"{_asked(ev)} need {need:g} {key}(s); the Ray cluster has {free:g} free: lower "
                                "the workers (--workers) or the resources per worker, or add nodes")


def wait_until_free(ev: EvaluationConfig, available: Callable[[], Mapping[str, float]], *,
                    grace: float = RELEASE_GRACE_S) -> None:
    """:func:`check_free`, allowing ``grace`` seconds for resources still being released (Ray frees a
    stopped actor's CPUs a moment after it is killed, e.g. by an executor closed just before)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            check_free(ev, available())
            return
        except ExecutorError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.25)
