"""lm-eval tasks on a real model: hm3's scores against lm-evaluation-harness's own, and the cost of a candidate.

On SmolLM2-135M-Instruct (imported without a hub, ``hm3 zoo import-smollm2``), two lm-eval tasks defined
over local data written here (a multiple-choice task and a generation task with a regex filter; seeded
two-operand arithmetic) are scored for several candidate models two ways:

* **hm3**: the ``lm-eval:TASK,include_path=DIR`` objectives through hm3's hf backend, one model loaded once;
  each candidate's weights are swapped in place (``load_state``), as a search does;
* **lm-eval**: ``simple_evaluate`` with its own ``HFLM`` built from the candidate's model directory, i.e. the
  model reloaded per candidate, as a search that calls lm-eval per candidate does (mergekit-evolve, mergenetic).

Both score the tasks' test documents. The script checks that the two give the same score for every
candidate and task, and reports the seconds per candidate of each and their ratio. The candidates are
SmolLM2 and seeded perturbations of it (``base + scale · rms · N(0, 1)`` per tensor), written to disk once,
outside the timed region for both sides: a merge's write is not part of either evaluator's cost.

Usage::

    hm3 zoo import-smollm2 runs/smollm2
    python experiments/bench_lmeval.py [--smol-dir runs/smollm2] [--candidates 3] [--docs 40] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)
import yaml

TASKS = ("hm3_bench_mc", "hm3_bench_gen")
#: what each side's scoring gives: (scores by task, seconds in all, seconds of the swap or the reload)
Scored = tuple[dict[str, float], float, float]
#: lm-eval's metric key of each task (metric,filter): what is compared with hm3's objective score
METRIC = {"hm3_bench_mc": "acc,none", "hm3_bench_gen": "exact_match,number"}
OPS = (("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b))


def arithmetic_docs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` seeded questions "What is A OP B?" with the answer and three wrong choices near it."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        name, op = rng.choice(OPS)
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        answer = op(a, b)
        wrong = rng.sample([d for d in range(answer - 4, answer + 5) if d != answer], 3)
        choices = [str(c) for c in [answer, *wrong]]
        rng.shuffle(choices)
        docs.append({"question": f"What is {a} {name} {b}?", "answer": str(answer), "choices": choices,
                     "gold": choices.index(str(answer))})
    return docs


def write_tasks(folder: Path, docs: int) -> None:
    """Two task YAMLs over local JSONL files (lm-eval's ``include_path`` mechanism): validation and test
    documents from disjoint seeds."""
    data = folder / "data"
    data.mkdir(parents=True)
    files = {}
    for split, seed in (("validation", 1), ("test", 2)):
        path = data / f"{split}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in arithmetic_docs(docs, seed)))
        files[split] = str(path)
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": files}, "validation_split": "validation",
              "test_split": "test", "num_fewshot": 0, "doc_to_text": "Question: {{question}}\nAnswer:"}
    mc = {"task": "hm3_bench_mc", **common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
          "doc_to_target": "gold", "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    gen = {"task": "hm3_bench_gen", **common, "output_type": "generate_until", "doc_to_target": "{{answer}}",
           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False, "temperature": 0.0},
           "filter_list": [{"name": "number", "filter": [{"function": "regex", "regex_pattern": r"(-?\d+)"},
                                                         {"function": "take_first"}]}],
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    for task in (mc, gen):
        (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def hm3_scores(backend, objectives, state) -> tuple[dict[str, float], float, float]:
    """Swap ``state`` in and score every objective on its test documents: (scores by task, seconds in all,
    seconds of the swap)."""
    from hm3.eval.evaluate import evaluate_objective

    start = time.perf_counter()
    backend.load_state(state)
    swapped = time.perf_counter()
    scores = {task: evaluate_objective(backend, objective, "test").score for task, objective in objectives.items()}
    return scores, time.perf_counter() - start, swapped - start


def lmeval_scores(model_dir: Path, task_manager, batch_size: int) -> tuple[dict[str, float], float, float]:
    """lm-eval end to end on a model directory, the model loaded anew: (scores by task, seconds in all,
    seconds of building its ``HFLM``)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=batch_size, dtype="float32")
    loaded = time.perf_counter()
    run = simple_evaluate(model=lm, tasks=list(TASKS), bootstrap_iters=0, task_manager=task_manager)
    seconds = time.perf_counter() - start
    return {task: float(run["results"][task][METRIC[task]]) for task in TASKS}, seconds, loaded - start


def scored_rows(candidates: list[Path], states: list[Any], rounds: int, ours: Callable[[Any], Scored],
                theirs: Callable[[Path], Scored]) -> list[dict[str, Any]]:
    """Every candidate scored by hm3 (``ours``, from its weights) and by lm-eval (``theirs``, from its
    directory), ``rounds`` times: one row each. The side that goes first alternates from candidate to
    candidate and, for each candidate, from round to round, so the drift of a shared machine (and whatever
    one side leaves warm for the other) hits both alike."""
    rows = []
    for rnd in range(rounds):
        for k, (path, state) in enumerate(zip(candidates, states, strict=True)):
            hm3_first = (rnd + k) % 2 == 0
            if hm3_first:
                (a, a_s, swap_s), (b, b_s, reload_s) = ours(state), theirs(path)
            else:
                (b, b_s, reload_s), (a, a_s, swap_s) = theirs(path), ours(state)
            rows.append({"round": rnd, "candidate": k, "first": "hm3" if hm3_first else "lm-eval",
                         "hm3": a, "lm_eval": b, "hm3_s": round(a_s, 3),
                         "lm_eval_s": round(b_s, 3), "hm3_swap_s": round(swap_s, 4),
                         "lm_eval_reload_s": round(reload_s, 3), "equal": a == b})
            print(f"round {rnd} candidate {k}: hm3 {a} in {a_s:.1f} s, lm-eval {b} in {b_s:.1f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smol-dir", type=Path, default=Path("runs/smollm2"))
    p.add_argument("--candidates", type=int, default=3, help="SmolLM2 itself and N-1 perturbations of it")
    p.add_argument("--docs", type=int, default=40, help="documents per split of each task")
    p.add_argument("--rounds", type=int, default=1, help="times each candidate is scored by each side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work", type=Path, default=None, help="folder for the tasks and candidates (default: temporary)")
    harness.add_out_arguments(p, "bench_lmeval")
    args = p.parse_args(argv)
    if not (args.smol_dir / "config.json").is_file():
        print(f"no model at {args.smol_dir}: import it with  hm3 zoo import-smollm2 {args.smol_dir}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="hm3-bench-lmeval-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_datasets")  # datasets' Arrow copies stay in the work folder

    import torch

    from hm3.checkpoint.reader import open_checkpoint
    from hm3.checkpoint.synthetic import build_finetuned_variant
    from hm3.eval.hf import HFBackend
    from objectives.registry import get_objective

    torch.set_num_threads(args.threads)
    tasks = work / "tasks"
    if not tasks.exists():
        write_tasks(tasks, args.docs)
    candidates = [args.smol_dir]
    for k in range(1, args.candidates):
        out = work / f"candidate{k}"
        if not out.exists():
            build_finetuned_variant(args.smol_dir, out, seed=k, scale=0.02)
        candidates.append(out)
    states = []
    for path in candidates:
        with open_checkpoint(path) as ckpt:
            states.append({name: ckpt.get(name) for name in ckpt.tensor_names()})

    from lm_eval.tasks import TaskManager

    objectives = {task: get_objective(f"lm-eval:{task},include_path={tasks}") for task in TASKS}
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    start = time.perf_counter()
    backend = HFBackend.from_pretrained(args.smol_dir, batch_size=args.batch_size)
    load_s = time.perf_counter() - start
    rows = scored_rows(candidates, states, args.rounds, lambda state: hm3_scores(backend, objectives, state),
                       lambda path: lmeval_scores(path, manager, args.batch_size))
    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    ours_mean, theirs_mean = mean("hm3_s"), mean("lm_eval_s")
    result = {
        "benchmark": "bench_lmeval", **harness.provenance(argv),
        "model": "SmolLM2-135M-Instruct (hm3 zoo import-smollm2)", "tasks": list(TASKS), "docs_per_split": args.docs,
        "candidates": args.candidates, "rounds": args.rounds, "batch_size": args.batch_size, "threads": args.threads,
        "hm3_model_load_s": round(load_s, 2), "rows": rows,
        "summary": {"scores_equal": all(r["equal"] for r in rows), "hm3_s_per_candidate": round(ours_mean, 2),
                    "lm_eval_s_per_candidate": round(theirs_mean, 2), "ratio": round(ours_mean / theirs_mean, 3),
                    "hm3_swap_s": round(mean("hm3_swap_s"), 4), "lm_eval_reload_s": round(mean("lm_eval_reload_s"), 3),
                    "swap_to_reload_ratio": round(mean("hm3_swap_s") / mean("lm_eval_reload_s"), 4)},
    }
    path = harness.write_results(harness.out_path(args, "bench_lmeval"), result)
    print(json.dumps(result["summary"]), file=sys.stderr)
    print(path)
    return 0 if result["summary"]["scores_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
