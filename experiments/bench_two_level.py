"""Two-level benchmark: level 1 alone vs level 2 alone vs both, with and without DAR,
and budget-0 preference requests vs a dedicated search for the same λ.

Every arm runs through the product's own entry points (``run_level1``, ``run_two_level``,
``answer_request``) in its own run directory under ``--work``; a finished arm is read back from its
``bench.json`` (only if its store recorded the config asked for), so an interrupted benchmark resumes.

Budget accounting. The budget ``--budget`` is in *full-evaluation equivalents*: validation examples
run through the model divided by (objectives × ``--validation-examples``), i.e. what the budget would
buy of whole-plan evaluations. Level 1 spends one per merge; a DAR reward costs ``round(s·n)/n`` of
one, so with DAR level 2 runs ~1/s times more episodes for the same cost (RMM's point). Every arm also
scores the references (base and experts) once, outside the budget, as level 1 alone does. Arms with
level 2 get their episode counts from the DAR cost (``level2_section``); the no-DAR arms run the
*same* episodes, which cost ~1/s times more examples: that is the DAR ablation (equal episodes,
examples and HV compared). All counts are read back from the run store (cache hits excluded) and
reported, not assumed: *evaluations* (distinct candidate × example-set, per objective), *evaluated
examples*, full-evaluation equivalents, and the level-2 (path) share of each.

Arms (3 seeds each by default):

* ``level1``: bo-mo with the whole budget;
* ``level2-only``: paths over the experts, framed by the base (``pool: experts``), DAR on / off;
* ``both``: bo-mo with ``--level1-share`` of the budget, then level 2 (HM3), DAR on / off.

HV is the validation HV of the union of everything each arm evaluated on the whole validation
plan (hm3's protocol); the test HV of the final front is reported too.

Requests: for each λ of ``REQUEST_PREFS``, ``hm3 request --budget 0`` on the ``both``+DAR run
(timed in-process and as a CLI subprocess) vs a *dedicated search* for that λ alone: ``df-merge``
BO on ``Σ λ_k f_k`` with ``--dedicated-budget`` evaluations, followed by online level-2 fine-tuning
from a fresh (not pretrained) policy with λ fixed. Both answers are written as checkpoints and
scored by the same code on the same validation examples; the ratio of their ``Σ_k λ_k f̂_k``
(normalised scores) is reported with both wall times. The dedicated search's ``df-merge`` runs in the
run's own DARE-TIES space (its GP + log-EI on the λ-weighted score, no Fisher weighting), so the
comparison isolates what answering from a finished run loses against searching again for λ.
Each request is also answered with ``--refine R`` for each R of ``--request-refine`` (R merge
evaluations of λ-scalarised BO warm-started from the run's level-1 data), each on its own copy of the
run, and scored the same way. ``--request-runs level1`` asks the same of the ``level1`` arm's run (a
level-1 search answers requests from its front and BO posterior). And each budget-0 answer is located
on the dedicated search's own trace: how many of its merge evaluations it took to reach the answer's
validation Σλf̂.

Usage::

    .venv/bin/python experiments/bench_two_level.py [--zoo builtin:micro] [--seeds 0,1,2] [--budget 80]
        [--validation-examples 64] [--work runs/bench_two_level] [--out FILE | --label LABEL]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import harness
import numpy as np
from zoo_bench import add_zoo_bench_args, check_reused, prepare, zoo_record

from hm3.atomic import atomic_write_text
from hm3.eval.subsets import subset_size
from hm3.report import save_figure
from hm3.request import REQUEST_RECORD
from hm3.run.config import parse_two_level_config, read_stored_run, stored_form
from hm3.run.two_level import run_two_level
from hm3.search.level1 import run_level1
from hm3.search.pareto import normalise
from hm3.search.posterior import load_posterior, upgrade_posterior_file
from hm3.search.run_config import parse_run_config
from hm3.store import RunStore

REQUEST_PREFS = ([0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.34, 0.33, 0.33])
#: how the arms' level-2 episodes are planned (results files without it were planned otherwise: level 2
#: alone paid the references out of its budget and DAR episodes were costed at ``s``, not ``round(s·n)/n``)
COST_PLANNING = "every arm at level 1 alone's cost: references outside the budget, DAR subsets at round(s*n)/n"


def base_config(args: argparse.Namespace, seed: int, level1_budget: int) -> dict[str, Any]:
    return {
        "zoo": str(args.zoo.resolve()),
        "search_space": {"dare": True, "rescale_mode": "l1", "weight_bounds": [0.0, 1.0],
                         "density_bounds": [0.2, 1.0]},
        "optimizer": {"name": "bo-mo", "budget": level1_budget},
        "evaluation": {"backend": "hf", "validation_examples": args.validation_examples,
                       "test_examples": args.test_examples, "batch_size": 64},
        "seed": seed,
    }


def level2_section(args: argparse.Namespace, pool: str, dar: bool, equivalents: float) -> dict[str, Any]:
    """Level-2 settings spending ``equivalents`` full evaluations *with DAR*: E episodes of one DAR subset
    each, after the 2N whole-plan evaluations of the kept paths. A subset holds ``round(s·n)`` examples
    (the product's :func:`subset_size`), not ``s·n``: planning with ``s`` would leave level 2 short. A
    no-DAR arm runs the same E episodes (so it pays ~1/s times the examples: the DAR ablation compares
    equal episodes)."""
    n = args.preferences
    per_episode = subset_size(args.validation_examples, args.data_scale) / args.validation_examples
    episodes = max(16, round((equivalents - 2 * n) / per_episode))
    offline = episodes // 2
    online = max(1, (episodes - offline) // n)
    return {"pool": pool, "preferences": n,
            "rl": {"dar": dar, "data_scale": args.data_scale, "offline_episodes": offline,
                   "online_episodes": online, "episodes_per_update": 8, "epochs": 4, "t_max": args.t_max}}


def level1_budget(args: argparse.Namespace) -> int:
    """Merges the level-1 stage of a ``both`` arm runs: ``--level1-share`` of the budget, at least 16."""
    return max(16, round(args.budget * args.level1_share))


def arm_config(args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    """The run config of arm ``name`` (module docstring) for ``seed``."""
    if name == "level1":
        return base_config(args, seed, args.budget)
    pool = "experts" if name.startswith("level2-only") else "experts+merge"
    dar = not name.endswith("nodar")
    l1_budget = level1_budget(args)
    # level 1 alone pays its budget plus the references (base and experts); so does every arm here, which
    # scores the same references: level 2 gets what the arm's own level-1 merges leave of the budget
    equivalents = args.budget if pool == "experts" else args.budget - l1_budget
    return base_config(args, seed, l1_budget) | {"level2": level2_section(args, pool, dar, equivalents)}


def evaluations(run_dir: Path, k: int, per_objective: int) -> dict[str, float]:
    """Evaluation counts from the store (module docstring), all and level-2 paths only."""
    with RunStore.open(run_dir, readonly=True) as store:
        rows = [e for e in store.evaluations() if e.split == "validation"]
        paths = {c.id for c in store.candidates("path")}
    level2 = [e for e in rows if e.candidate_id in paths]
    examples = sum(e.count for e in rows)
    return {
        "evaluations": len({(e.candidate_id, e.example_set) for e in rows}) / k,
        "evaluated_examples": examples,
        "full_evaluation_equivalents": examples / (k * per_objective),
        "level2_evaluations": len({(e.candidate_id, e.example_set) for e in level2}) / k,
        "level2_examples": sum(e.count for e in level2),
    }


def arm(args, name: str, seed: int, data: dict[str, Any], two_level: bool) -> dict[str, Any]:
    run_dir = args.work / f"{name}-s{seed}"
    done = run_dir / "bench.json"
    cfg = parse_two_level_config(data, source=name) if two_level else parse_run_config(data, source=name)
    if done.is_file():  # an arm of an earlier call: only if it ran this very config (e.g. these episode counts)
        check_reused(run_dir, cfg.canonical() if two_level else stored_form(cfg))
        return json.loads(done.read_text())
    start = time.perf_counter()
    resume = (run_dir / "hm3.sqlite").exists()
    if two_level:
        s = run_two_level(cfg, run_dir, resume=resume, progress=not args.quiet)
        hv, hv_test, objectives = s["hv_validation"], s["hv_test_front"], s["objectives"]
    else:
        s = run_level1(cfg, run_dir, resume=resume, progress=not args.quiet).summary
        hv, hv_test, objectives = s["hv_validation"], s["hv_test_front"], s["objectives"]
    out = {"arm": name, "seed": seed, "commit": harness.START_COMMIT, "hv_validation": hv, "hv_test_front": hv_test,
           **evaluations(run_dir, len(objectives), args.validation_examples),
           "wall_seconds": time.perf_counter() - start, "resumed": resume,
           "summary": {k: v for k, v in s.items() if k.startswith("hv") or k in ("front_size", "front_levels")}}
    atomic_write_text(done, json.dumps(out, indent=2))
    return out


def score_model(model_dir: Path, objectives: list[str], n: int, split: str = "validation") -> np.ndarray:
    """Scores of the checkpoint in ``model_dir`` on the first ``n`` examples of ``split`` (the runs' plans)."""
    from hm3.eval.evaluate import evaluate_objective
    from hm3.eval.hf import HFBackend
    from objectives.registry import get_objective

    backend = HFBackend.from_pretrained(model_dir, batch_size=64)
    out = []
    for spec in objectives:
        obj = get_objective(spec)
        total = len(obj.examples(split))
        out.append(evaluate_objective(backend, obj, split, list(range(min(n, total)))).score)
    return np.array(out)


def run_references(run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The run's objective names, validation base and ideal, and test reference scores (what the
    request comparisons normalise with), and its objective specs; for a two-level run or a level-1
    search alike (read the way ``hm3 request`` reads them)."""
    from hm3.run.directory import read_finished_run

    run = read_finished_run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return ({"objectives": run.names, "base_validation": run.base.tolist(), "ideal_validation": run.ideal.tolist(),
             "reference_test": summary["reference_test"]}, list(run.config.level1.objectives))


def requests(args, seed: int, run_name: str) -> list[dict[str, Any]]:
    """The budget-0 requests (and their --refine variants) on the ``run_name`` arm's run of ``seed``,
    each compared with the dedicated search for its λ (shared by every arm that answers requests)."""
    from hm3.request import answer_request

    run_dir = args.work / f"{run_name}-s{seed}"
    summary, objectives = run_references(run_dir)
    base, ideal = np.array(summary["base_validation"]), np.array(summary["ideal_validation"])
    # a run saved by an hm3 that kept only the level-1 GPs' state gets their grid predictions (same GPs,
    # same answers), so the fresh-process time is that of a run made today
    upgrade_posterior_file(run_dir / "level1")  # also rewrites an older posterior.pt as a state file
    if run_name == "level1" and load_posterior(run_dir) is None:
        # a level-1 search finished before 'hm3 search param' saved its BO posterior: resuming it
        # replays the stored evaluations (nothing new is scored) and saves the posterior today's would
        with RunStore.open(run_dir, readonly=True) as store:
            stored = read_stored_run(store).level1
        run_level1(stored, run_dir, resume=True, progress=False)
    prefix = "request" if run_name == "both" else f"request-{run_name}"  # "both": the names of earlier results
    rows = []
    for i, lam in enumerate(REQUEST_PREFS):
        lam = np.array(lam) / sum(lam)
        prefer = ",".join(f"{n.split(':')[-1]}={v:.4f}" for n, v in zip(summary["objectives"], lam, strict=True))
        out_dir = args.work / f"{prefix}-s{seed}-{i}"
        record_file = args.work / f"{prefix}-s{seed}-{i}.json"
        ded_dir = args.work / f"dedicated-s{seed}-{i}"
        if record_file.is_file():
            row = json.loads(record_file.read_text())
            changed = add_refined(args, row, run_dir, prefer, objectives, base, ideal, out_dir)
            changed = add_test_comparison(args, row, summary, objectives, out_dir, ded_dir) or changed
            if args.retime_cli:
                row.setdefault("request_cli_seconds_earlier", []).append(row["request_cli_seconds"])
                row["request_cli_seconds"], row["request_cli_answer"] = cli_request(run_dir, prefer, out_dir)
                row["request_cli_timed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                changed = True
            matched = dedicated_merges_to_match(ded_dir, summary, np.array(row["lam"]), row["request_scalarised"])
            if row.get("dedicated_merges_to_match", -1) != matched:
                row["dedicated_merges_to_match"], changed = matched, True
            if changed:
                atomic_write_text(record_file, json.dumps(row, indent=2))
            rows.append(row)
            continue
        ans = answer_request(run_dir, prefer, out_dir, budget=0, overwrite=True, progress=False)
        cli_seconds, cli_answer = cli_request(run_dir, prefer, out_dir)
        req_raw = score_model(out_dir, objectives, args.validation_examples)
        # dedicated search for this λ: df-merge on Σλf, then level 2 online from a fresh policy
        ded_start = time.perf_counter()
        data = base_config(args, seed, args.dedicated_budget)
        data["optimizer"] = {"name": "df-merge", "budget": args.dedicated_budget, "options": {"weights": lam.tolist()}}
        data["level2"] = {"pool": "experts+merge", "preferences": [lam.tolist()],
                          "rl": {"dar": True, "data_scale": args.data_scale, "offline_episodes": 1,
                                 "online_episodes": args.dedicated_episodes, "episodes_per_update": 8, "epochs": 4,
                                 "t_max": args.t_max}}
        resume = (ded_dir / "hm3.sqlite").exists()
        timing = ded_dir / "bench_seconds.json"  # the search's own wall time, kept for re-reads
        ded_cfg = parse_two_level_config(data, source="dedicated")
        if (ded_dir / "summary.json").is_file():  # an earlier call's: only if it searched as asked now
            check_reused(ded_dir, ded_cfg.canonical())
        else:
            run_two_level(ded_cfg, ded_dir, resume=resume, progress=not args.quiet)
            atomic_write_text(timing, json.dumps({"seconds": time.perf_counter() - ded_start, "resumed": resume}))
        ded_seconds = json.loads(timing.read_text())["seconds"]
        ded_point = dedicated_answer(ded_dir, summary, lam)
        ded_raw = np.array([ded_point[f"{n}_val"] for n in summary["objectives"]], dtype=float)
        req_s = float(lam @ normalise(req_raw[None], base, ideal)[0])
        ded_s = float(lam @ normalise(ded_raw[None], base, ideal)[0])
        row = {"run": run_name, "seed": seed, "lam": lam.tolist(), "request_answer": ans.source,
               "request_seconds": ans.seconds,
               "request_cli_seconds": cli_seconds, "request_cli_answer": cli_answer, "request_scalarised": req_s,
               "dedicated_scalarised": ded_s,
               "ratio": req_s / ded_s if ded_s > 0 else None, "dedicated_seconds": ded_seconds,
               "dedicated_point_level": int(ded_point["level"]), "request_raw": req_raw.tolist(),
               "dedicated_raw": ded_raw.tolist(),
               "dedicated_merges_to_match": dedicated_merges_to_match(ded_dir, summary, lam, req_s)}
        add_refined(args, row, run_dir, prefer, objectives, base, ideal, out_dir)
        add_test_comparison(args, row, summary, objectives, out_dir, ded_dir)
        atomic_write_text(record_file, json.dumps(row, indent=2))
        rows.append(row)
    return rows


def cli_request(run_dir: Path, prefer: str, out_dir: Path) -> tuple[float, str]:
    """Wall time of ``hm3 request`` at budget 0 as a fresh process (start-up included), and its answer as
    the request record beside the model names it (the format earlier results stored)."""
    cli_dir = Path(str(out_dir) + "-cli")
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "hm3"), "request", str(run_dir), "--prefer", prefer,
                    str(cli_dir), "--overwrite", "--quiet"], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    record = json.loads((cli_dir / REQUEST_RECORD).read_text())
    return seconds, f"answer: {record['answer']} ({record['kind']})"


def add_refined(args, row: dict[str, Any], run_dir: Path, prefer: str, objectives: list[str], base: np.ndarray,
                ideal: np.ndarray, out_dir: Path) -> bool:
    """Requests with ``--refine R`` for each R of ``--request-refine`` that ``row`` lacks; True if any was added.

    Each runs on its own copy of the run, so one request's refinements never warm-start another's
    (in the product they would: that is the point of storing them).
    """
    from hm3.request import answer_request

    added = False
    refined = row.setdefault("refined", {})
    lam = np.array(row["lam"])
    for r in (int(v) for v in args.request_refine.split(",") if v):
        if str(r) in refined:
            continue
        copy = Path(f"{out_dir}-refine{r}-run")
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("hm3.lock"))
        ans = answer_request(copy, prefer, Path(f"{out_dir}-refine{r}"), refine=r, overwrite=True, progress=False)
        raw = score_model(Path(f"{out_dir}-refine{r}"), objectives, args.validation_examples)
        s = float(lam @ normalise(raw[None], base, ideal)[0])
        refined[str(r)] = {"scalarised": s, "ratio": s / row["dedicated_scalarised"] if row["dedicated_scalarised"] > 0
                           else None, "seconds": ans.seconds, "evaluations": ans.evaluations, "answer": ans.source,
                           "raw": raw.tolist()}
        shutil.rmtree(copy)
        added = True
    return added


def add_test_comparison(args, row: dict[str, Any], summary: dict[str, Any], objectives: list[str],
                        out_dir: Path, ded_dir: Path) -> bool:
    """The request's comparison again on the test split, which neither answer was chosen on; True if
    anything was added.

    Both answers are picked by their validation scores (the dedicated search's as the best of its ~30
    evaluations for this very λ, the request's among a front spread over every λ), so both validation
    scores carry selection bias; their test scores do not. The request's answer (and each
    ``--refine`` answer) is scored here on the first ``--test-examples`` test examples, the dedicated
    search's read from its ``front.csv`` (scored by the run on the same examples). Normalised with
    the test-split base and best expert, as the runs' test HV is.
    """
    if "test" in row:  # only --refine answers added since
        lam, ded_s = np.array(row["lam"]), row["test"]["dedicated_scalarised"]
        missing = [r for r in row.get("refined", {}) if r not in row["test"]["refined"]]
        for r in missing:
            row["test"]["refined"][r] = _test_scored(args, Path(f"{out_dir}-refine{r}"), objectives, summary, lam,
                                                     ded_s)
        return bool(missing)
    lam = np.array(row["lam"])
    ded_point = dedicated_answer(ded_dir, summary, lam)
    ded_raw = np.array([ded_point[f"{n}_test"] for n in summary["objectives"]], dtype=float)
    ded_s = float(lam @ normalise(ded_raw[None], *_test_reference(summary))[0])
    row["test"] = {"dedicated_raw": ded_raw.tolist(), "dedicated_scalarised": ded_s,
                   "request": _test_scored(args, out_dir, objectives, summary, lam, ded_s),
                   "refined": {r: _test_scored(args, Path(f"{out_dir}-refine{r}"), objectives, summary, lam, ded_s)
                               for r in row.get("refined", {})}}
    return True


def dedicated_answer(ded_dir: Path, summary: dict[str, Any], lam: np.ndarray) -> Any:
    """The dedicated search's answer for λ: the row of its ``front.csv`` with the best validation Σλf̂,
    normalised with the ``both`` run's validation base and ideal (``summary``)."""
    import pandas as pd

    front = pd.read_csv(ded_dir / "front.csv")
    return front.iloc[int(np.argmax(validation_scalarised(front, summary, lam)))]


def validation_scalarised(rows: Any, summary: dict[str, Any], lam: np.ndarray) -> np.ndarray:
    """Σλf̂ of each row of a run's ``front.csv`` / ``candidates.csv`` (a DataFrame), its validation
    scores normalised with the validation base and ideal of ``summary``."""
    val = rows[[f"{n}_val" for n in summary["objectives"]]].to_numpy(float)
    return normalise(val, np.array(summary["base_validation"]), np.array(summary["ideal_validation"])) @ lam


def dedicated_merges_to_match(ded_dir: Path, summary: dict[str, Any], lam: np.ndarray, score: float) -> int | None:
    """How many of the dedicated search's merge evaluations it took to reach ``score`` (a request's
    validation Σλf̂): the smallest n whose best-so-far Σλf̂ over its first n merges, in evaluation order
    (``candidates.csv``, by point id), is at least ``score``; None if its merges never do. A budget-0
    answer is then "worth n dedicated evaluations". Normalised like :func:`dedicated_answer`."""
    import pandas as pd

    rows = pd.read_csv(ded_dir / "candidates.csv")
    merges = rows[rows["kind"] == "merge"].sort_values("point")
    best_so_far = np.maximum.accumulate(validation_scalarised(merges, summary, lam))
    reached = np.flatnonzero(best_so_far >= score - 1e-12)
    return int(reached[0]) + 1 if reached.size else None


def _test_reference(summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(base, best expert per task) on the test split: the normalisation of the runs' test HV."""
    refs = {name: np.array(v) for name, v in summary["reference_test"].items()}
    base = refs.pop("base")
    return base, np.max(np.stack(list(refs.values())), axis=0)


def _test_scored(args, model_dir: Path, objectives: list[str], summary: dict[str, Any], lam: np.ndarray,
                 dedicated: float) -> dict[str, Any]:
    """A written answer's test scores, its Σλf̂ and its ratio to the dedicated search's."""
    raw = score_model(model_dir, objectives, args.test_examples, split="test")
    s = float(lam @ normalise(raw[None], *_test_reference(summary))[0])
    return {"raw": raw.tolist(), "scalarised": s, "ratio": s / dedicated if dedicated > 0 else None}


def plot(results: dict[str, list[dict]], requests_rows: list[dict], path: Path) -> None:
    """HV per arm (validation and test, every seed) and request/dedicated score ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if requests_rows else 1, figsize=(11 if requests_rows else 6, 4), squeeze=False)
    ax = axes[0][0]
    names = list(results)
    for offset, key, colour in ((-0.18, "hv_validation", "tab:blue"), (0.18, "hv_test_front", "tab:orange")):
        for i, name in enumerate(names):
            vals = [r[key] for r in results[name]]
            ax.bar(i + offset, float(np.mean(vals)), width=0.34, color=colour,
                   label=key.replace("hv_", "HV ").replace("_front", "") if i == 0 else None)
            ax.scatter([i + offset] * len(vals), vals, s=10, c="k", zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("hypervolume (hm3 protocol)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if requests_rows:
        ax = axes[0][1]
        ratios = [r["ratio"] for r in requests_rows]
        ax.scatter(range(len(ratios)), ratios, c="tab:green", label="validation (answers chosen on it)")
        if all("test" in r for r in requests_rows):
            ax.scatter(range(len(ratios)), [r["test"]["request"]["ratio"] for r in requests_rows], c="tab:purple",
                       marker="x", label="test")
        ax.axhline(0.95, ls="--", c="0.5", label="target 0.95")
        ax.set_xlabel("request (seed × λ)")
        ax.set_ylabel("budget-0 request / dedicated search (Σλf̂)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def request_targets(req_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and worst cases of one run kind's requests against the dedicated searches."""
    return {
        "mean_ratio": mean([r["ratio"] for r in req_rows]),
        "min_ratio": min(r["ratio"] for r in req_rows if r["ratio"] is not None),
        "mean_seconds_in_process": mean([r["request_seconds"] for r in req_rows]),
        "mean_seconds_cli": mean([r["request_cli_seconds"] for r in req_rows]),
        "mean_dedicated_seconds": mean([r["dedicated_seconds"] for r in req_rows]),
        # per request: the dedicated merge evaluations it took to reach the budget-0 answer's
        # validation Σλf̂ (None: never, within its budget)
        "dedicated_merges_to_match": [r["dedicated_merges_to_match"] for r in req_rows],
        # the same comparison on the test split, which neither answer was chosen on
        "test": {
            "mean_ratio": mean([r["test"]["request"]["ratio"] for r in req_rows]),
            "min_ratio": min(r["test"]["request"]["ratio"] for r in req_rows),
            "refined": {r: {"mean_ratio": mean([row["test"]["refined"][r]["ratio"] for row in req_rows]),
                            "min_ratio": min(row["test"]["refined"][r]["ratio"] for row in req_rows)}
                        for r in sorted({r for row in req_rows for r in row["test"]["refined"]}, key=int)
                        if all(r in row["test"]["refined"] for row in req_rows)},
        } if all("test" in r for r in req_rows) else None,
        "refined": {
            r: {"mean_ratio": mean([row["refined"][r]["ratio"] for row in req_rows]),
                "min_ratio": min(row["refined"][r]["ratio"] for row in req_rows),
                "mean_seconds": mean([row["refined"][r]["seconds"] for row in req_rows]),
                "mean_evaluations": mean([row["refined"][r]["evaluations"] for row in req_rows])}
            for r in sorted({r for row in req_rows for r in row.get("refined", {})}, key=int)
            if all(r in row.get("refined", {}) for row in req_rows)
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_zoo_bench_args(p, "bench_two_level")
    p.add_argument("--budget", type=int, default=80, help="evaluations per arm")
    p.add_argument("--level1-share", type=float, default=0.5)
    p.add_argument("--preferences", type=int, default=3)
    p.add_argument("--data-scale", type=float, default=0.1)
    p.add_argument("--t-max", type=int, default=4, help="level-2 T_max (the zoo models have 2 layers)")
    p.add_argument("--dedicated-budget", type=int, default=30)
    p.add_argument("--dedicated-episodes", type=int, default=24)
    p.add_argument("--arms", default="level1,level2-only,level2-only-nodar,both,both-nodar")
    p.add_argument("--no-requests", action="store_true")
    p.add_argument("--retime-cli", action="store_true",
                   help="time the fresh-process `hm3 request` again for requests already recorded (the earlier "
                        "times are kept in the record)")
    p.add_argument("--request-runs", default="both",
                   help="the arms whose runs answer the requests: both, level1 (a level-1 search), or both of them")
    p.add_argument("--request-refine", default="4,8",
                   help="also answer each request with --refine R (merge evaluations), for each R listed")
    args = p.parse_args(argv)
    if not prepare(args):
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    started = time.time()
    results: dict[str, list[dict]] = {}
    req_rows: list[dict] = []
    for seed in seeds:
        for name in arms:
            print(f"[bench] seed {seed}: {name}", file=sys.stderr, flush=True)
            results.setdefault(name, []).append(arm(args, name, seed, arm_config(args, name, seed), name != "level1"))
        if not args.no_requests:
            for run_name in (r for r in args.request_runs.split(",") if r):
                if run_name not in arms:
                    raise SystemExit(f"--request-runs {run_name}: that arm is not in --arms {args.arms}")
                req_rows += requests(args, seed, run_name)
    table = {
        name: {"hv_validation": mean([r["hv_validation"] for r in rows]),
               "hv_validation_min": min(r["hv_validation"] for r in rows),
               "hv_validation_max": max(r["hv_validation"] for r in rows),
               "hv_test_front": mean([r["hv_test_front"] for r in rows]),
               **{key: mean([r[key] for r in rows]) for key in (
                   "evaluations", "evaluated_examples", "full_evaluation_equivalents", "level2_evaluations",
                   "level2_examples")},
               "wall_seconds": mean([r["wall_seconds"] for r in rows]), "seeds": [r["seed"] for r in rows]}
        for name, rows in results.items()
    }
    targets: dict[str, Any] = {}
    if "both" in table and "level1" in table:
        targets["two_levels_beat_level1_hv"] = table["both"]["hv_validation"] > table["level1"]["hv_validation"]
        # what "equal cost" came to, as the stores counted it (kept paths that coincide, and repeats the store
        # answered, leave a level-2 arm below its plan)
        targets["both_cost_over_level1"] = (table["both"]["full_evaluation_equivalents"]
                                            / table["level1"]["full_evaluation_equivalents"])
    for with_dar, without in (("both", "both-nodar"), ("level2-only", "level2-only-nodar")):
        if with_dar in table and without in table:
            a, b = table[with_dar], table[without]
            targets[f"dar_{with_dar}"] = {
                "level2_example_reduction": b["level2_examples"] / a["level2_examples"],
                "hv_loss_fraction": (b["hv_validation"] - a["hv_validation"]) / b["hv_validation"]
                if b["hv_validation"] else None,
            }
    for run_name in dict.fromkeys(r.get("run", "both") for r in req_rows):  # records before --request-runs: both
        rows = [r for r in req_rows if r.get("run", "both") == run_name]
        targets["request" if run_name == "both" else f"request_{run_name}_run"] = request_targets(rows)
    out = {
        "benchmark": "bench_two_level",
        **harness.provenance(argv),
        "zoo": str(args.zoo), "zoo_build": zoo_record(args.zoo),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cost_planning": COST_PLANNING,
        "table": table, "targets": targets, "arms": results, "requests": req_rows,
        # this invocation only: arms finished by an earlier invocation are read back, not re-run
        "this_invocation_wall_seconds": time.time() - started,
    }
    harness.write_results(args.out, out)
    first = req_rows[0].get("run", "both") if req_rows else None  # the plot shows one run kind's requests
    plot(results, [r for r in req_rows if r.get("run", "both") == first], args.plot)
    print(f"{'arm':<20}{'HV val':>10}{'HV test':>10}{'full-eq':>9}{'L2 evals':>9}{'L2 examples':>12}{'seconds':>9}")
    for name, row in table.items():
        print(f"{name:<20}{row['hv_validation']:>10.4f}{row['hv_test_front']:>10.4f}"
              f"{row['full_evaluation_equivalents']:>9.1f}{row['level2_evaluations']:>9.1f}"
              f"{row['level2_examples']:>12.0f}{row['wall_seconds']:>9.0f}")
    print(f"targets: {json.dumps(targets, indent=1)}")
    print(f"-> {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
