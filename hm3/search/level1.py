"""Level 1: the multi-objective search over merge coefficients, end to end.

``run_level1`` glues the pieces: the run store (every score committed as it arrives), an
evaluation session (:mod:`hm3.eval.session`: one live model in this process, or the workers of a
parallel executor) that scores merges through it, an ask/tell optimiser over the unit cube, and the
run directory's outputs (:mod:`hm3.run.front`: front table, hypervolume, plot, point files).

Batches: the optimiser is asked for ``evaluation.workers`` points at a time (BO: a sequential greedy
q-batch), the batch is scored in parallel, and the points are told in the order they were proposed
-- so a run's candidates depend on its seed and its number of workers, never on which worker
finished first. One worker asks one point at a time, as a local run does.

Scores handed to optimisers are normalised by the HV protocol of
:mod:`hm3.search.pareto` (base model = 0, per-task best expert = 1), so every
optimiser sees the same scale and the same reference point.

Crash and resume: each told point is also recorded as a ``level1_tell`` event
(candidate id and unit-cube point; a batch's events in one transaction, so a replayed history
never ends inside a batch). ``--resume`` replays those events into a
fresh optimiser -- whose asks are a function of the history only -- so the
continued run asks exactly what the uninterrupted one would have, and the
store's cache turns re-scoring of a half-scored candidate into look-ups.
Resuming with a larger budget extends a search the same way: the replayed
optimiser simply has evaluations left.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm3.errors import ConfigError, Hm3Warning, StoreError
from hm3.eval.executor import Executor
from hm3.eval.session import MERGE_KIND, EvaluationSession, MergeCandidate, Scored
from hm3.log import progress_bar, progress_logger
from hm3.run.config import stored_config, stored_form
from hm3.run.directory import FRONT_FILE, check_placement, new_run_discarded_on_refusal, open_run_store
from hm3.run.front import CandidateRow, write_front, write_summary
from hm3.search.optimizers import Optimizer, get_optimizer
from hm3.search.optimizers.random import sobol_points
from hm3.search.pareto import degenerate_objectives, normalise, protocol_hypervolume
from hm3.search.posterior import save_level1_posterior
from hm3.search.preferences import dirichlet_preferences
from hm3.search.references import reference_points
from hm3.search.run_config import RunConfig
from hm3.search.space import SearchSpace
from hm3.store import RunStore

logger = logging.getLogger(__name__)

TELL_EVENT = "level1_tell"
#: A point handed out by asynchronous proposals (before it is sent to a worker; told later by a TELL_EVENT).
ASK_EVENT = "level1_ask"
#: Recorded when a search is resumed with another budget than it last ran with (extended).
BUDGET_EVENT = "budget_changed"


@dataclass
class Level1Result:
    run_dir: Path
    objective_names: list[str]
    X: np.ndarray  # unit-cube points, in evaluation order
    Y: np.ndarray  # raw validation scores
    candidate_ids: list[int]
    front_ids: list[int]
    base: np.ndarray
    ideal: np.ndarray
    hv_trace: list[float]
    summary: dict[str, Any] = field(default_factory=dict)


def make_optimizer(cfg: RunConfig, *, design_budget: int | None = None) -> Optimizer:
    """The configured optimiser, fresh; called once up front so option errors (unknown options, bad
    designs, a budget too small for any design) are refused before any evaluation.

    ``design_budget`` is the budget the search started with (default: the configured one): a search
    extended on resume keeps the initial design it began with.
    """
    k, dim = len(cfg.objectives), cfg.search_space.dim
    options = _optimizer_options(cfg, k, design_budget or cfg.optimizer.budget)
    method = get_optimizer(cfg.optimizer.name)
    if cfg.evaluation.proposals == "async" and not method.supports_async:
        raise ConfigError(f"evaluation.proposals: async: optimizer {cfg.optimizer.name!r} proposes in batches only "
                          "(it must see its points told in the order asked); use proposals: batch, or one of "
                          f"{', '.join(async_optimizers())}")
    return method(dim, k, seed=cfg.seed, budget=cfg.optimizer.budget, **options)


def async_optimizers() -> list[str]:
    """The optimisers that can propose while points are pending (``evaluation.proposals: async``)."""
    from hm3.search.optimizers import OPTIMIZERS

    return [name for name in OPTIMIZERS if get_optimizer(name).supports_async]


def _optimizer_options(cfg: RunConfig, k: int, design_budget: int) -> dict[str, Any]:
    opts = dict(cfg.optimizer.options)
    if cfg.optimizer.name == "hm3-fixed" and "points" not in opts:
        # HM3's own parameter stage: coefficients = λ for λ ~ Dirichlet(1), one per budgeted evaluation.
        n_models = len(cfg.search_space.models)
        if n_models != k:
            raise ConfigError(
                f"hm3-fixed sets each model's coefficient to its task's preference: it needs one expert per "
                f"objective, got {n_models} models and {k} objectives"
            )
        lams = dirichlet_preferences(cfg.optimizer.budget, k, seed=cfg.seed)
        opts["points"] = torch.stack([cfg.search_space.fixed_coefficients(lam.tolist()) for lam in lams])
    from hm3.search.optimizers.bayes import BayesOptimizer  # here: botorch stays out of a request's imports

    optimizer = get_optimizer(cfg.optimizer.name)
    is_bo = issubclass(optimizer, BayesOptimizer)
    design = opts.pop("initial_design", "auto")
    if design not in INITIAL_DESIGNS:
        raise ConfigError(f"optimizer.options.initial_design must be one of {', '.join(INITIAL_DESIGNS)}, "
                          f"got {design!r}")
    if design != "auto" and not is_bo:
        raise ConfigError(f"initial_design is an option of the BO optimisers, not of {cfg.optimizer.name!r}")
    if design == "auto":
        design = "preferences" if is_bo and cfg.search_space.holds_simplex else "sobol"
    if design == "preferences":
        # a longer design starts with the same points (Sobol and the seeded Dirichlet draws are
        # sequences), so a search extended to a larger budget keeps the points it began with
        opts["initial_points"] = preference_design(cfg.search_space, cfg.optimizer.budget, seed=cfg.seed)
    if is_bo and "n_init" not in opts:
        n_init = shrunk_design(optimizer.initial_design_size(cfg.search_space.dim), design_budget)
        if n_init is not None:
            opts["n_init"] = n_init
    return opts


def shrunk_design(default: int, budget: int) -> int | None:
    """The initial design for a budget that does not exceed the default one (None: the default fits).

    Half the budget, at least 2 points: the surrogate gets a design to learn from and as many
    evaluations to use it. Said with a warning, since the surrogate then starts from fewer points
    than its default asks for. Below 3 evaluations there is no room for a design and a model step;
    the optimiser refuses such a budget.
    """
    if default < budget or budget < 3:
        return None
    n_init = max(2, budget // 2)
    warnings.warn(f"a budget of {budget} evaluations does not exceed the default initial design of {default} "
                  f"points: the design shrinks to {n_init}, leaving {budget - n_init} model-based steps "
                  "(optimizer.options.n_init sets it)", Hm3Warning, stacklevel=2)
    return n_init


#: Initial designs of the BO optimisers (``optimizer.options.initial_design``); ``auto`` (the default)
#: is ``preferences`` where every model's weight bounds hold [0, 1], else ``sobol``.
INITIAL_DESIGNS = ("auto", "sobol", "preferences")


def preference_design(space: SearchSpace, n: int, *, seed: int) -> torch.Tensor:
    """``n`` unit-cube points whose weights are λ ~ Dirichlet(1) and whose other coordinates are Sobol.

    HM3's parameter stage merges with coefficients = λ (``hm3-fixed``); as a BO initial
    design those points start the surrogate where merges are known to work (weights on
    the simplex, i.e. a convex combination of the task vectors) instead of spreading
    the first evaluations over the whole box, where large or near-zero weight sums
    waste them. The rest of the space (densities) keeps its space-filling Sobol values,
    and later BO steps search the whole box as before.
    """
    points = sobol_points(space.dim, seed=seed, start=0, n=n)
    lams = dirichlet_preferences(n, len(space.models), seed=seed)
    n_weights = len(space.models) * space.n_groups  # weights come first in the vector layout
    for i, lam in enumerate(lams):
        points[i, :n_weights] = space.fixed_coefficients(lam.tolist())[:n_weights]
    return points


def told_points(store: RunStore, event: str = TELL_EVENT) -> list[tuple[int, list[float]]]:
    """(candidate id, unit-cube point) of every ``event`` (level 1's tells by default), in order;
    a malformed one (a corrupt store) is refused, naming it."""
    told = []
    for e in store.events(event, fields=("candidate", "x")):
        cid, x = e.payload["candidate"], e.payload["x"]
        if not isinstance(cid, int) or not isinstance(x, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in x
        ):
            raise StoreError(f"run store {store.path} is corrupt: {e.kind} event {e.id} has candidate {cid!r} "
                             f"and point {str(x)[:100]}, not an id and a list of numbers")
        told.append((cid, x))
    return told


def run_level1(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Level1Result:
    """Run (or resume) the level-1 search of ``cfg`` in ``run_dir`` and write its outputs.

    A resume may change one setting: ``optimizer.budget``. A larger one extends the search (a
    finished one too). ``stop_after`` ends the process-local loop once that many new evaluations are
    done (a whole batch of ``evaluation.workers`` at a time; used to test resumption); the outputs are
    then not written.
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    optimizer = make_optimizer(cfg)  # unknown optimiser or options: refused before anything is loaded
    log = stderr_logger(progress)
    # likewise a device this machine lacks, a missing Ray, a cluster too small (before the run directory is made)
    made = not run_dir.exists()
    with evaluation_executor(cfg, log) as executor, \
            open_run_store(run_dir, stored_form(cfg), cfg.seed, resume=resume, budget_may_grow=True,
                           inputs=cfg.models.values()) as store:
        initial = stored_config(store)["level1"]["optimizer"]["budget"]
        if initial != cfg.optimizer.budget:
            optimizer = _extended_optimizer(cfg, store, initial, log)
        with new_run_discarded_on_refusal(run_dir, store, new=not resume, made=made):
            session = open_session(cfg, store, log, executor)
        try:
            return search_level1(cfg, session, run_dir, optimizer, resume=resume, progress=progress,
                                 stop_after=stop_after, start=start, log=log)
        finally:
            session.close()  # a vLLM engine holds process-wide state until closed


def _extended_optimizer(cfg: RunConfig, store: RunStore, initial: int, log: Callable[[str], None]) -> Optimizer:
    """The optimiser of a search resumed with another budget than it started with (its initial design
    unchanged); a budget below what the search has already evaluated is refused."""
    done = len(told_points(store))
    if cfg.optimizer.budget < done:
        raise ConfigError(f"{store.path.parent} holds a search of {done} evaluations: resume it with a budget of "
                          f"at least {done}, not {cfg.optimizer.budget}")
    last = store.last_event(BUDGET_EVENT)
    previous = last.payload["to"] if last is not None else initial
    if previous != cfg.optimizer.budget:
        store.add_event(BUDGET_EVENT, {"from": previous, "to": cfg.optimizer.budget})
        log(f"budget {previous} -> {cfg.optimizer.budget} evaluations ({done} done)")
    return make_optimizer(cfg, design_budget=initial)


@contextmanager
def evaluation_executor(cfg: RunConfig, log: Callable[[str], None]) -> Iterator[Executor | None]:
    """The run's parallel executor, its workers started with their models loaded (None for ``executor:
    local``, whose device is checked here instead); closed on leaving, however that happens.

    Called before the run directory is made, so that a device this machine lacks, a missing Ray, a
    cluster too small for the workers or a worker that cannot load its model leave nothing behind."""
    if cfg.evaluation.executor == "local":
        cfg.evaluation.resolve()
        yield None
        return
    # a worker's device is the one Ray gives it, on whichever node: each worker checks its own
    from hm3.eval.ray_executor import RayExecutor

    executor = RayExecutor.connect(cfg.evaluation, log=log)
    try:
        executor.start(cfg)
        yield executor
    finally:
        executor.close()


def open_session(cfg: RunConfig, store: RunStore, log: Callable[[str], None],
                 executor: Executor | None = None) -> EvaluationSession:
    """The evaluation session of a run: one live model in this process, or (given an ``executor`` from
    :func:`evaluation_executor`) the executor's workers, each with its own (started here if not yet)."""
    if executor is None:
        from hm3.eval.live import LiveModelSession  # here: reading a finished run loads no model code

        session: EvaluationSession = LiveModelSession(cfg, store, log=log)
    else:
        from hm3.eval.parallel import ExecutorSession

        executor.start(cfg)
        session = ExecutorSession(cfg, store, executor)
    try:
        check_placement(store, session.placement)
    except BaseException:
        session.close()
        raise
    return session


def stderr_logger(enabled: bool) -> Callable[[str], None]:
    """Progress lines through the ``hm3`` logger (:mod:`hm3.log`), or a no-op."""
    return progress_logger(enabled)


def search_level1(
    cfg: RunConfig,
    session: EvaluationSession,
    out_dir: Path,
    optimizer: Optimizer,
    *,
    resume: bool,
    log: Callable[[str], None],
    progress: bool = True,
    stop_after: int | None = None,
    start: float | None = None,
    refinements: bool = True,
) -> Level1Result:
    """The level-1 loop over an open session (its store may be shared with a two-level run);
    outputs go to ``out_dir`` (with the merges requests refined when they are a run's own outputs:
    ``refinements``). ``optimizer`` is fresh (:func:`make_optimizer`, which the callers run
    before opening anything so option errors come first); the ``level1_tell`` events already in the
    store are replayed into it, which is how a run resumes."""
    start = time.perf_counter() if start is None else start
    store = session.store
    k = len(session.objective_names)
    log("scoring the base model and the experts (reference points)")
    refs_val, base, ideal = reference_points(session, cfg.search_space, session.validation)
    log("validation scores: " + "; ".join(f"{r}={np.round(v, 3).tolist()}" for r, v in refs_val.items()))
    for i in degenerate_objectives(base, ideal):
        logger.warning(f"no expert beats the base on {session.objective_names[i]} (validation); hypervolume and "
                       "rewards use it in raw units, and a merge must not fall below the base there to count")

    if optimizer.n_evaluated:
        raise ValueError("search_level1 needs a fresh optimizer: the run store's history is replayed into it")
    X: list[list[float]] = []
    Y: list[np.ndarray] = []
    ids: list[int] = []
    hv_trace: list[float] = []
    for cid, x in told_points(store):
        if len(x) != cfg.search_space.dim:
            raise StoreError(f"run store {store.path} is corrupt: told point of candidate {cid} has {len(x)} "
                             f"coordinates, this search space {cfg.search_space.dim}")
        y = session.stored_scores(cid, session.validation)
        if y is None:
            raise ConfigError(f"run store is inconsistent: told candidate {cid} has no stored scores")
        # float64 as asked: torch.tensor(list) would make float32, and a model-based optimiser's next
        # point depends on every digit of its history (a resumed run must ask what an uninterrupted one did)
        optimizer.tell(torch.tensor([x], dtype=torch.float64), torch.tensor(normalise(y[None], base, ideal)))
        X.append(x)
        Y.append(y)
        ids.append(cid)
        hv_trace.append(protocol_hypervolume(np.stack(Y), base, ideal))
    if X:
        log(f"resumed: {len(X)} evaluations replayed from the store")

    bar = progress_bar(progress, total=cfg.optimizer.budget, initial=len(X), desc="level 1", unit="eval")

    def record(told: list[tuple[torch.Tensor, Scored]]) -> None:
        """Told points into the history, the hypervolume trace and the progress bar (their events are stored)."""
        for p, s in told:
            X.append(p.tolist())
            Y.append(s.scores)
            ids.append(s.candidate.id)
            hv_trace.append(protocol_hypervolume(np.stack(Y), base, ideal))
        if bar is not None and told:
            bar.set_postfix_str(f"HV {hv_trace[-1]:.4f}")
            bar.update(len(told))

    if cfg.evaluation.proposals == "async":
        propose_async(optimizer, session, base, ideal, record, stop_after=stop_after)
    else:
        propose_in_batches(optimizer, session, cfg.evaluation.workers, base, ideal, record, stop_after=stop_after)
    if bar is not None:
        bar.close()
    Xa, Ya = np.array(X), np.stack(Y) if Y else np.empty((0, k))
    result = Level1Result(
        run_dir=Path(out_dir),
        objective_names=session.objective_names,
        X=Xa,
        Y=Ya,
        candidate_ids=ids,
        front_ids=[],
        base=base,
        ideal=ideal,
        hv_trace=hv_trace,
    )
    if optimizer.remaining > 0:
        return result
    # the BO posterior that budget-0 preference requests draw on (hm3/request.py), before the summary
    # that marks level 1 finished, so a finished level 1 always has it (when it has >= 4 points)
    save_level1_posterior(store, Path(out_dir), dict(zip(ids, Y, strict=True)), base, ideal)
    write_outputs(cfg, session, result, seconds=time.perf_counter() - start, resumed=bool(resume), log=log,
                  refinements=refinements)
    return result


def executor_summary(session: EvaluationSession) -> dict[str, Any]:
    """What a run's summary says of its parallel workers (nothing for a local session): how busy they were
    (:meth:`~hm3.eval.ray_executor.RayExecutor.utilisation`) and how many died and were replaced."""
    from hm3.eval.parallel import ExecutorSession

    if not isinstance(session, ExecutorSession):
        return {}
    executor = session.executor
    stats = dict(getattr(executor, "utilisation", dict)())
    order = ("as workers finished: not reproducible from the seed and workers" if session.cfg.evaluation.proposals
             == "async" else "in proposal order: reproducible from the seed and workers")
    return {"proposals": session.cfg.evaluation.proposals, "proposal_order": order, **stats,
            "workers_replaced": int(getattr(executor, "replaced", 0))}


def propose_in_batches(optimizer: Optimizer, session: EvaluationSession, batch: int, base: np.ndarray,
                       ideal: np.ndarray, record: Callable[[list[tuple[torch.Tensor, Scored]]], None], *,
                       stop_after: int | None) -> None:
    """Level 1's default loop: ``batch`` points asked (one per worker), scored in parallel, then told --
    in the order proposed, whichever worker finished first, so the run's points depend on its seed and
    ``batch`` only (a batch's events in one transaction)."""
    store, new = session.store, 0
    while optimizer.remaining > 0 and (stop_after is None or new < stop_after):
        x = optimizer.ask(batch)
        scored = session.score_many([MergeCandidate(session.merge_recipe(p)) for p in x], session.validation)
        y = np.stack([s.scores for s in scored])
        optimizer.tell(x, torch.tensor(normalise(y, base, ideal)))
        store.add_events(TELL_EVENT, [{"candidate": s.candidate.id, "x": p.tolist()}
                                      for s, p in zip(scored, x, strict=True)])
        record(list(zip(x, scored, strict=True)))
        new += len(x)


def in_flight_asks(store: RunStore) -> list[tuple[int, list[float]]]:
    """(candidate id, point) of the asynchronous proposals that were handed out and never told: those in
    flight when the run stopped, in the order asked."""
    told: dict[tuple[int, tuple[float, ...]], int] = {}
    for cid, x in told_points(store):
        told[(cid, tuple(x))] = told.get((cid, tuple(x)), 0) + 1
    out = []
    for cid, x in told_points(store, ASK_EVENT):
        key = (cid, tuple(x))
        if told.get(key):
            told[key] -= 1
        else:
            out.append((cid, x))
    return out


def propose_async(optimizer: Optimizer, session: EvaluationSession, base: np.ndarray, ideal: np.ndarray,
                  record: Callable[[list[tuple[torch.Tensor, Scored]]], None], *, stop_after: int | None) -> None:
    """``proposals: async``: each point is proposed with the points still being scored as pending
    (:meth:`~hm3.search.optimizers.base.Optimizer.ask_async`) and told as its score arrives.

    Workers do not wait for the driver's proposals: the next point is proposed in a thread of its own
    while the workers score, so a worker that finishes gets it at once (the wait is the proposal's
    remainder only when proposing takes longer than a worker's turn). A proposal made before a score
    arrived does not see it, and the order of tells, and so the points, depend on timing.

    Each point handed out is recorded (``level1_ask``) before its score can be committed, so a resumed run
    re-issues those that were in flight (their stored scores looked up, the rest scored; as many as its
    budget has room for) before proposing anew."""
    from concurrent.futures import Future, ThreadPoolExecutor
    from threading import Lock

    from hm3.eval.parallel import ExecutorSession

    if not isinstance(session, ExecutorSession):
        raise ConfigError("evaluation.proposals: async needs evaluation.executor: ray")
    store, plan, workers = session.store, session.validation, session.executor.workers
    flight: dict[int, list[torch.Tensor]] = {}  # ticket -> points it scores (one, unless proposed twice)
    new = 0
    # the optimiser is asked in the proposer thread and told in this one, never both at once
    lock = Lock()

    def tell(points: list[torch.Tensor], scored: Scored) -> None:
        y = torch.tensor(normalise(scored.scores[None], base, ideal))
        with lock:
            for p in points:
                optimizer.tell(p[None], y)
        store.add_events(TELL_EVENT, [{"candidate": scored.candidate.id, "x": p.tolist()} for p in points])
        record([(p, scored) for p in points])

    def send(p: torch.Tensor, *, asked: bool) -> None:
        candidate = MergeCandidate(session.merge_recipe(p))
        ref, ticket = session.submit(candidate, plan)
        if not asked:
            store.add_event(ASK_EVENT, {"candidate": ref.id, "x": p.tolist()})
        if ticket is None:  # its scores are stored (a resumed run's candidate that had finished)
            stored = session.stored_scores(ref, plan)
            assert stored is not None
            tell([p], Scored(ref, stored))
        else:
            flight.setdefault(ticket, []).append(p)

    def ask_one() -> tuple[torch.Tensor, int]:
        """A point (none while the optimiser needs a first score), and how many scores it was asked with."""
        with lock:
            return optimizer.ask_async(1), optimizer.n_evaluated

    def may_ask() -> bool:
        with lock:
            return optimizer.remaining > 0 and (stop_after is None or new < stop_after)

    for _, x in in_flight_asks(store)[:max(0, optimizer.remaining)]:  # a resumed run's points in flight
        p = torch.tensor(x, dtype=torch.float64)
        optimizer.mark_pending(p[None])
        send(p, asked=True)
    proposer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hm3-propose")
    proposal: Future[tuple[torch.Tensor, int]] | None = None  # the next point, being proposed
    try:
        while True:
            while len(flight) < workers:
                if proposal is None:
                    if not may_ask():
                        break
                    proposal = proposer.submit(ask_one)
                (x, seen), proposal = proposal.result(), None
                if not len(x):
                    with lock:
                        told_since = optimizer.n_evaluated > seen
                    if told_since:
                        continue  # asked before the first score arrived: ask again with it
                    break  # the optimiser needs a first score
                new += 1
                send(x[0], asked=False)
            if not flight:
                if may_ask():
                    raise RuntimeError(f"{optimizer.name}: proposed nothing with no point in flight")
                return
            if proposal is None and may_ask():
                proposal = proposer.submit(ask_one)  # the next worker's point, proposed while the workers score
            ticket, scored = session.next_done()
            tell(flight.pop(ticket), scored)
    finally:
        proposer.shutdown(wait=True)


def write_outputs(cfg: RunConfig, session: EvaluationSession, result: Level1Result, *, seconds: float,
                  resumed: bool, log: Callable[[str], None], refinements: bool = True) -> None:
    """The run directory's outputs (:mod:`hm3.run.front`) over the search's distinct candidates."""
    unique: dict[int, np.ndarray] = {}
    for cid, y in zip(result.candidate_ids, result.Y, strict=True):
        unique[cid] = y
    rows = [CandidateRow(cid, 1, MERGE_KIND, y) for cid, y in unique.items()]
    written = write_front(session, cfg, result.run_dir, rows, result.base, result.ideal, log=log,
                          refinements=refinements)
    result.front_ids = written.front_ids
    result.summary = {
        "run_kind": "level1",
        "optimizer": cfg.optimizer.name,
        "seed": cfg.seed,
        "budget": cfg.optimizer.budget,
        "evaluations": len(result.candidate_ids),
        "distinct_candidates": len(unique),
        **written.summary,
        "hv_trace_validation": result.hv_trace,
        "evaluated_examples_this_process": session.evaluated_examples,
        "wall_seconds_this_process": seconds,
        "resumed": resumed,
        **executor_summary(session),
    }
    write_summary(result.run_dir, result.summary)
    written.plot(result.run_dir, result.summary)
    log(f"wrote {result.run_dir / FRONT_FILE}, candidates.csv, summary.json, front.png, points/ "
        f"(HV {result.summary['hv_validation']:.4f})")
