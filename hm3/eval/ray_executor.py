"""The Ray executor (``evaluation.executor: ray``): each worker is a Ray actor holding its own live model.

Every actor builds a :class:`~hm3.eval.live.LiveModel` from the run's config -- base and experts in
its in-memory merger, one evaluator backend -- and scores the jobs it is given by swapping each
candidate's weights into that model, as a local session does. Jobs go to idle actors in the order
submitted; the results come back to the process that runs the search, which commits them
(:mod:`hm3.eval.parallel`).

A worker that dies while it holds a job (its process killed, by Ray's memory monitor too; its node lost)
is replaced by a new actor and the job is re-queued, on whichever worker is idle first. Replacement, not
Ray's ``max_restarts`` / ``max_task_retries``: Ray would restart the actor and re-run the task out of the
driver's sight, so a candidate that kills every worker it is given (a merge that runs the node out of
memory) would be retried without a word, and a restarted actor's failure to load its model would surface
as an opaque actor-creation error. Here the driver sees each death, logs it naming the worker, gives a job at most
:data:`MAX_ATTEMPTS` workers, and starts the replacement exactly as the first workers (its model load
errors named the same way). Nothing is counted twice: a job's scores are returned once, by the one
worker that finished it, and only returned scores are committed.

Starting a worker has two steps with their own failure: Ray must *place* the actor (it waits for
resources forever otherwise, so placement has a time limit, :data:`PLACEMENT_TIMEOUT_S`), then the
actor loads its model (as long as that takes; an error names the worker and the cause).

Before any actor is created the cluster's free resources are checked against ``workers ×
resources_per_worker``: an actor Ray cannot place waits for resources forever, so a config that
asks for more than there is would hang instead of failing. Ray is started here (a local instance)
only when ``ray_address`` is None and this process has not initialised Ray already; it is then
shut down on close. Ray that this process initialised already (its caller did) is the Ray a run uses,
so a ``ray_address`` that names another cluster is refused (:func:`joined_already`).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import math
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
#: Seconds Ray has to place a worker (start its process) before the start is refused, not left waiting.
PLACEMENT_TIMEOUT_S = 120.0
#: Seconds a given ``ray_address`` has to answer before it is refused (``ray.init`` itself retries for minutes).
CONNECT_TIMEOUT_S = 10.0
#: Seconds a closing run waits for jobs still running before it commits those finished (:meth:`RayExecutor.drain`).
DRAIN_TIMEOUT_S = 1.0
#: Workers one job may be given: a job whose workers died this often is not re-queued again.
MAX_ATTEMPTS = 3


class LiveModelWorker:
    """What one Ray actor runs: a live model of the run's config, and the frames it has been sent.

    The model is built by :meth:`start`, not by the constructor, so that an error loading it (a bad
    model, a device the node lacks) comes back from a method call as the error it is."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model: Any = None
        self._frames: dict[int, Mapping[str, Any]] = {}

    def where(self) -> tuple[int, str]:
        """This worker's process id and node address: answered once Ray has placed it (a readiness check)."""
        import os

        import ray

        return os.getpid(), ray.util.get_node_ip_address()

    def start(self) -> tuple[dict[str, str], str]:
        from hm3.eval.live import LiveModel  # in the actor: the driver loads no model code for it
        from hm3.threads import set_threads

        # torch's threads to the cores the worker reserved (by default torch takes every core of the node,
        # and N workers would each run as many threads as the node has cores)
        set_threads(max(1, math.floor(self.cfg.evaluation.resources_per_worker.num_cpus)))
        self.model = LiveModel(self.cfg, frame_recipe=self._frame_recipe, log=lambda message: None)
        return self.model.placement, self.model.backend.name

    def score(self, ticket: int, job: ScoreJob) -> tuple[int, list[ObjectiveScore], float]:
        """The job's scores, and the seconds this worker was busy with it (for the idle share)."""
        began = time.perf_counter()
        self._frames.update(job.frames)
        scores = self.model.evaluate(job.candidate, job.plan, job.objectives, samples=job.samples)
        return ticket, scores, time.perf_counter() - began

    def pool_layout(self) -> PoolLayout:
        return self.model.pool_layout()

    def layer_features(self, frames: Sequence[FrameKey], recipes: Mapping[int, Mapping[str, Any]]) -> torch.Tensor:
        self._frames.update(recipes)
        return self.model.layer_features(frames)

    def _frame_recipe(self, candidate_id: int) -> Mapping[str, Any]:
        if candidate_id not in self._frames:
            raise ExecutorError(f"a path's frame, stored merge {candidate_id}, was not sent to this worker")
        return self._frames[candidate_id]


@dataclass
class _Worker:
    """One actor, numbered in the order started (a replacement gets the next number), and where it runs."""

    number: int
    actor: Any
    pid: int = 0
    node: str = "?"

    def __str__(self) -> str:
        return f"Ray worker {self.number} (pid {self.pid} on node {self.node})"


@dataclass
class _Running:
    worker: _Worker
    ticket: int
    job: ScoreJob


class RayExecutor:
    """:class:`~hm3.eval.executor.Executor` over Ray actors (module docstring). :meth:`connect` joins or
    starts Ray and checks its resources; :meth:`start` creates the workers and loads their models."""

    name = NAME

    def __init__(self, ev: EvaluationConfig, ray: Any, *, started_ray: bool, log: Callable[[str], None],
                 placement_timeout: float = PLACEMENT_TIMEOUT_S):
        self.workers = ev.workers
        self._ev = ev
        self._ray = ray
        self._started_ray = started_ray
        self._log = log
        self._placement_timeout = placement_timeout
        self._cfg: RunConfig | None = None
        self._live: list[_Worker] = []  # started and not known dead
        self._idle: list[_Worker] = []
        self._queue: deque[tuple[int, ScoreJob]] = deque()
        self._running: dict[Any, _Running] = {}  # object ref of a score call -> what it runs
        self._attempts: dict[int, int] = {}  # ticket -> workers it has been given
        self._numbered = 0
        self._tickets = 0
        self._pending = 0
        self._placement: dict[str, str] = {}
        self._backend = ""
        #: Workers replaced after dying with a job (the run's summary records it).
        self.replaced = 0
        self._busy = 0.0  # seconds workers spent scoring, as they measured it
        self._first_submit: float | None = None
        self._last_done: float | None = None

    @classmethod
    def connect(cls, ev: EvaluationConfig, *, log: Callable[[str], None]) -> RayExecutor:
        """Ray, joined (``ray_address``) or started here, with room for ``ev.workers`` workers; refused,
        before anything is created, when ray is not installed, the cluster lacks the resources, or this
        process is connected to another cluster than ``ray_address`` names."""
        require("ray", what="evaluation.executor: ray")
        import ray

        started = False
        if ray.is_initialized():
            if ev.ray_address is not None:
                joined_already(ev.ray_address, _gcs_address(ray), ray.util.get_node_ip_address(), log=log)
        else:
            where = "a local Ray instance" if ev.ray_address is None else f"the Ray cluster at {ev.ray_address}"
            log(f"starting {where}" if ev.ray_address is None else f"joining {where}")
            check_reachable(ev.ray_address)
            try:
                ray.init(address=ev.ray_address, include_dashboard=False, logging_level=logging.WARNING)
            except ConnectionError as err:
                raise ExecutorError(f"evaluation.ray_address {ev.ray_address!r}: no Ray cluster to join "
                                    f"({err})") from None
            started = True
        executor = cls(ev, ray, started_ray=started, log=log)
        try:
            check_node_sizes(ev, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
            wait_until_free(ev, ray.available_resources, grace=RELEASE_GRACE_S)  # read now: a test shortens it
        except BaseException:
            executor.close()
            raise
        return executor

    @property
    def started(self) -> bool:
        return self._cfg is not None

    def start(self, cfg: RunConfig) -> None:
        """Create the workers, each loading its live model of ``cfg`` (in parallel); a worker Ray cannot
        place, or one that cannot load its model, is refused naming it (idempotent for the same ``cfg``)."""
        if self._cfg is not None:
            if cfg != self._cfg:
                raise RuntimeError("the Ray executor's workers were started for another run config")
            return
        res = cfg.evaluation.resources_per_worker
        self._log(f"starting {self.workers} Ray worker(s), each with its own model "
                  f"({res.num_cpus:g} CPU, {res.num_gpus:g} GPU each)")
        self._cfg = cfg
        started = self._launch(cfg, self.workers)
        self._placement, self._backend = started

    def _launch(self, cfg: RunConfig, count: int) -> tuple[dict[str, str], str]:
        """``count`` new workers, placed and their models loaded, added to the idle ones; the first one's
        placement and backend."""
        res = cfg.evaluation.resources_per_worker
        remote = self._ray.remote(LiveModelWorker).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus)
        new = []
        for _ in range(count):
            new.append(_Worker(self._numbered, remote.remote(cfg)))
            self._numbered += 1
        self._live.extend(new)
        self._place(new)
        loads = [w.actor.start.remote() for w in new]
        started = [self._loaded(w, ref) for w, ref in zip(new, loads, strict=True)]
        self._idle.extend(new)
        return started[0]

    def _place(self, new: Sequence[_Worker]) -> None:
        """Wait (at most the placement timeout) until Ray has placed every one of ``new`` and its process
        answers; refused naming the workers it could not place."""
        refs = {w.actor.where.remote(): w for w in new}
        ready, waiting = self._ray.wait(list(refs), num_returns=len(refs), timeout=self._placement_timeout)
        if waiting:
            names = ", ".join(f"Ray worker {refs[r].number}" for r in waiting)
            raise ExecutorError(
                f"{names} not placed within {self._placement_timeout:g} s: {_asked(self._ev)}, and the Ray "
                f"cluster has {_free(self._ray.available_resources())} free (other jobs may hold them; see "
                "`ray status`): lower the workers (--workers) or the resources per worker, or add nodes")
        for ref in ready:
            worker = refs[ref]
            try:
                worker.pid, worker.node = self._ray.get(ref)
            except _deaths() as err:
                raise ExecutorError(f"Ray worker {worker.number} died as it started: {_first_line(err)}") from None

    def _loaded(self, worker: _Worker, ref: Any) -> tuple[dict[str, str], str]:
        """The result of ``worker``'s model load; its failure raised naming the worker and the cause (an hm3
        error as its own type, so the exit code says what kind of problem it is)."""
        from ray.exceptions import RayTaskError

        try:
            return self._ray.get(ref)
        except RayTaskError as err:
            cause = getattr(err, "cause", None) or err
            raise _named(cause, f"{worker} could not load the model") from None
        except _deaths() as err:
            raise ExecutorError(f"{worker} died while loading the model: {_first_line(err)}") from None

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

    def worker_pids(self, *, busy: bool = False) -> list[int]:
        """The live workers' process ids (``busy``: only those holding a job), e.g. to watch them."""
        holding = {r.worker.number for r in self._running.values()}
        return [w.pid for w in self._live if not busy or w.number in holding]

    def submit(self, job: ScoreJob) -> int:
        if self._cfg is None:
            raise RuntimeError("the Ray executor's workers are not started (RayExecutor.start)")
        ticket = self._tickets
        self._tickets += 1
        self._queue.append((ticket, job))
        self._pending += 1
        if self._first_submit is None:
            self._first_submit = time.perf_counter()
        self._dispatch()
        return ticket

    def next_done(self) -> tuple[int, list[ObjectiveScore]]:
        if not self._pending:
            raise RuntimeError("no job is pending")
        while True:
            (ref,), _ = self._ray.wait(list(self._running), num_returns=1)
            run = self._running.pop(ref)
            try:
                with self._errors():
                    ticket, scores, busy = self._ray.get(ref)
            except _WorkerDied as died:
                self._replace(run, died.error)
                continue
            self._finished(run, busy)
            self._pending -= 1
            self._dispatch()
            return ticket, scores

    def utilisation(self) -> dict[str, float]:
        """How busy the workers were between the first job submitted and the last one returned: the
        seconds each spent scoring (summed) and the idle share, the share of the workers' time spent
        waiting for a job (for a search, the proposals; level 1's summary records it)."""
        if self._first_submit is None or self._last_done is None:
            return {"worker_busy_seconds": 0.0, "worker_wall_seconds": 0.0, "worker_idle_share": 0.0}
        wall = self._last_done - self._first_submit
        capacity = wall * self.workers
        idle = max(0.0, 1.0 - self._busy / capacity) if capacity > 0 else 0.0
        return {"worker_busy_seconds": self._busy, "worker_wall_seconds": wall, "worker_idle_share": idle}

    def restart_utilisation(self) -> None:
        """Measure :meth:`utilisation` from the next job on, forgetting the jobs before (a two-level run
        reports its level 2 apart from its level 1, whose summary is already written)."""
        self._busy, self._first_submit, self._last_done = 0.0, None, None

    def pool_layout(self) -> PoolLayout:
        return self._ask("the layer pool's layout", lambda actor: actor.pool_layout.remote())

    def layer_features(self, frames: Sequence[FrameKey], recipes: Mapping[int, Mapping[str, Any]]) -> torch.Tensor:
        return self._ask("the layer features", lambda actor: actor.layer_features.remote(list(frames), dict(recipes)))

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> list[tuple[int, list[ObjectiveScore]]]:
        """The jobs workers finished that :meth:`next_done` has not returned, as it would return them; those
        still running are waited for at most ``timeout`` seconds (a result in transit, one about to finish)
        and left, and a job that failed or whose worker died gives nothing (the run is stopping: nothing is
        re-queued)."""
        if not self._running:
            return []
        ready, _ = self._ray.wait(list(self._running), num_returns=len(self._running), timeout=timeout)
        done = []
        for ref in ready:
            run = self._running.pop(ref)
            self._pending -= 1  # returned here, or given up
            try:
                ticket, scores, busy = self._ray.get(ref)
            except Exception as err:  # a RayTaskError, a dead worker's: its error is not the run's to raise now
                self._log(f"{run.worker}'s last job gave no scores ({type(err).__name__}: {_first_line(err)})")
                continue
            self._finished(run, busy)
            done.append((ticket, scores))
        return done

    def _finished(self, run: _Running, busy: float) -> None:
        """A job's worker is idle again, and its seconds count toward :meth:`utilisation`."""
        self._busy += busy
        self._last_done = time.perf_counter()
        self._idle.append(run.worker)

    def close(self) -> None:
        for worker in self._live:
            self._ray.kill(worker.actor)
        self._live, self._idle, self._running, self._pending = [], [], {}, 0
        self._queue.clear()
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._started_ray = False

    # --- dispatch and faults -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Queued jobs to idle workers, in the order submitted."""
        while self._idle and self._queue:
            worker = self._idle.pop(0)
            ticket, job = self._queue.popleft()
            self._attempts[ticket] = self._attempts.get(ticket, 0) + 1
            self._running[worker.actor.score.remote(ticket, job)] = _Running(worker, ticket, job)

    def _replace(self, run: _Running, error: Exception) -> None:
        """``run``'s worker died: the job back at the queue's head (to the next idle worker) and a new worker
        started in the dead one's place; a job that has now been given :data:`MAX_ATTEMPTS` workers is
        refused instead."""
        dead = run.worker
        self._drop(dead)
        if self._attempts[run.ticket] >= MAX_ATTEMPTS:
            raise ExecutorError(
                f"{dead} died scoring a candidate ({_first_line(error)}): {MAX_ATTEMPTS} workers have died holding "
                "it, and it is not re-queued again (does its merge exhaust a worker's memory?). The scores "
                "committed so far are in the run store: resume the run")
        self._log(f"{dead} died scoring a candidate ({_first_line(error)}): the candidate is re-queued and a "
                  "replacement worker started")
        self._queue.appendleft((run.ticket, run.job))
        self._dispatch()  # to a worker already idle, if one is
        assert self._cfg is not None
        self._launch(self._cfg, 1)
        self.replaced += 1
        self._dispatch()

    def _ask(self, what: str, call: Callable[[Any], Any]) -> Any:
        """``call`` (a remote method call on an actor) answered by a live worker; a worker that dies
        holding it is replaced as one that dies scoring (:meth:`_replace`), and the call given to the next,
        at most :data:`MAX_ATTEMPTS` workers in all."""
        attempt = 0
        while True:
            attempt += 1
            worker = self._any_worker()
            try:
                with self._errors():
                    return self._ray.get(call(worker.actor))
            except _WorkerDied as died:
                self._drop(worker)
                if attempt >= MAX_ATTEMPTS:
                    raise ExecutorError(
                        f"{worker} died computing {what} ({_first_line(died.error)}): {MAX_ATTEMPTS} workers have "
                        "died on it, and it is not asked again (does it exhaust a worker's memory?). The scores "
                        "committed so far are in the run store: resume the run") from None
                self._log(f"{worker} died computing {what} ({_first_line(died.error)}): a replacement worker "
                          "started and asked again")
                assert self._cfg is not None
                self._launch(self._cfg, 1)
                self.replaced += 1

    def _drop(self, worker: _Worker) -> None:
        """A dead ``worker`` out of the live and idle ones, its actor killed (an actor only unreachable would
        otherwise hold its resources)."""
        self._live = [w for w in self._live if w is not worker]
        self._idle = [w for w in self._idle if w is not worker]
        self._ray.kill(worker.actor)

    def _any_worker(self) -> _Worker:
        """An idle worker where there is one: an actor runs one call at a time, so a question given to a
        worker that is scoring waits behind its whole evaluation."""
        if not self._live:
            raise RuntimeError("the Ray executor's workers are not started (RayExecutor.start)")
        return self._idle[0] if self._idle else self._live[0]

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """An hm3 error raised in a worker re-raised as itself; a worker that died as :class:`_WorkerDied`
        (which :meth:`next_done` handles, and elsewhere is an ExecutorError)."""
        from ray.exceptions import RayTaskError

        try:
            yield
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, Hm3Error):
                raise cause from None
            raise
        except _deaths() as err:
            raise _WorkerDied(err) from None


class _WorkerDied(ExecutorError):
    """A worker died holding a call; outside :meth:`RayExecutor.next_done` (which replaces it) a run ends here."""

    def __init__(self, error: Exception):
        super().__init__(f"a Ray worker died ({type(error).__name__}: {_first_line(error)}); the scores committed "
                         "so far are in the run store: resume the run")
        self.error = error


def _deaths() -> tuple[type[Exception], ...]:
    """What a call on a dead worker raises: RayActorError, or OutOfMemoryError where Ray's memory monitor
    killed it (a merge that ran the node out of memory; not a RayActorError)."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    return RayActorError, OutOfMemoryError


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _named(cause: BaseException, what: str) -> BaseException:
    """``cause`` with its message prefixed by ``what``: an hm3 error keeps its type (and exit code), any other
    becomes an :class:`ExecutorError` naming the type."""
    if isinstance(cause, Hm3Error):
        named = copy.copy(cause)
        named.args = (f"{what}: {cause}",)
        return named
    return ExecutorError(f"{what}: {type(cause).__name__}: {_first_line(cause)}")


def _free(available: Mapping[str, float]) -> str:
    return ", ".join(f"{available.get(k, 0.0):g} {k}(s)" for k in ("CPU", "GPU"))


def joined_already(address: str, joined: str | None, node_ip: str, *, log: Callable[[str], None]) -> None:
    """Ray initialised in this process already (by whoever called hm3) is the cluster a run uses: it cannot
    join another without shutting its caller's Ray down. So a ``host:port`` ``ray_address`` that names
    another cluster than ``joined`` (the GCS address this process is connected to) is refused, naming both;
    one that cannot be compared with it (``auto``, ``local``, a Ray Client ``ray://`` address, or Ray not
    saying its address: ``joined`` None) is logged."""
    if joined is None or address in ("auto", "local") or address.startswith("ray://"):
        at = joined or "an address Ray does not say"
        log(f"Ray is initialised in this process already: the run uses its cluster, at {at}, for "
            f"evaluation.ray_address {address!r}")
        return
    if not same_node_and_port(address, joined, node_ip):
        raise ExecutorError(f"evaluation.ray_address {address!r}: this process is already connected to the Ray "
                            f"cluster at {joined}, which the run would use instead: name that address, or none, or "
                            "run hm3 in a process that has not initialised Ray")


def same_node_and_port(address: str, joined: str, node_ip: str) -> bool:
    """Whether ``host:port`` ``address`` names ``joined`` (``ip:port``): the same port, and a host that
    resolves to its IP, or both on this node (``node_ip``, or a loopback name: Ray records a local cluster
    by the node's IP, while a config may say ``127.0.0.1`` or ``localhost``)."""
    host, _, port = address.rpartition(":")
    joined_host, _, joined_port = joined.rpartition(":")
    if port != joined_port:
        return False
    named, at = _resolved(host), _resolved(joined_host)
    here = _resolved(node_ip)

    def on_this_node(ips: set[str]) -> bool:
        return bool(ips & here) or any(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in ips)

    return bool(named & at) or (on_this_node(named) and on_this_node(at))


def _gcs_address(ray: Any) -> str | None:
    """The GCS address of the cluster this process is connected to (None where Ray does not say, as a Ray
    Client connection may not)."""
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # what a Ray Client's runtime context raises for it is not documented
        return None


def _resolved(host: str) -> set[str]:
    """The IP addresses ``host`` names (none when it does not resolve)."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host.strip("[]"), None)}
    except OSError:
        return set()


def check_reachable(address: str | None, *, timeout: float | None = None) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) ``ray_address`` where nothing accepts a connection
    within ``timeout``: ``ray.init`` would retry it for minutes, saying only that it cannot reach the GCS.
    ``auto`` and ``local`` are Ray's to resolve (it fails at once when there is no cluster to find)."""
    if address is None or address in ("auto", "local"):
        return
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ExecutorError(f"evaluation.ray_address {address!r}: not auto, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ExecutorError(f"evaluation.ray_address {address!r}: nothing answers at {host}:{port} within "
                            f"{timeout:g} s ({err}): start the cluster there (`ray start --head`) or fix the "
                            "address") from None


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
