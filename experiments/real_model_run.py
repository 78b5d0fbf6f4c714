"""The whole product on a real model: SmolLM2-135M-Instruct experts through `hm3 run`, `export`, `request`.

The tiny zoo (2 layers, 64 wide, a character tokenizer, untied head) cannot show how hm3 behaves on
a real architecture. SmolLM2-135M-Instruct can, without a hub: 30 layers, grouped-query attention
(9 heads, 3 key/value heads), tied input and output embeddings, a BPE tokenizer, 135M parameters.

1. **Experts.** SmolLM2 (imported once with `hm3 zoo import-smollm2 DIR`) is fine-tuned briefly on
   the train split of each of ``--tasks`` (zoo tasks; loss on the answer tokens; the zoo's own
   training loop, ``hm3.zoo.train``). The base is SmolLM2 itself. Each expert is written atomically
   and reused when its settings match.
2. **The two-level run** through the CLI, as a user types it: `hm3 run CONFIG RUN_DIR` (level 1:
   bo-mo over DARE-TIES; level 2: the λ-conditioned policy over paths of up to ``--t-max`` of the 30
   layers), then `hm3 front RUN_DIR`.
3. **Checks.** Every front point is exported (`hm3 export`), loaded from disk by a fresh `hm3 eval`
   on the run's backend (transformers or vLLM) and scored again on the run's validation examples:
   the scores must equal the run's stored ones. A budget-0 `hm3 request` is timed as a fresh
   process and its checkpoint scored the same way. ``--mode rmm`` runs level 2 in RMM mode;
   ``--name`` keeps runs with other settings apart; ``--rl KEY=VALUE`` sets any other
   ``level2.rl`` value (e.g. ``path_prior=frame-order``), ``--level2 KEY=VALUE`` any other
   ``level2`` value (e.g. ``keep_best=3``).
4. **Level 1 alone** (``--level1-only``): the same config without level 2, through
   `hm3 search param`, with ``--budget`` set by the caller (e.g. the two-level run's level-1
   evaluations plus its level-2 cost in full-evaluation equivalents, which every run's JSON reports
   as ``cost``). It is the ablation the two-level run must beat at equal cost; level-1-only runs have
   no `hm3 export` or `hm3 request`, so they are not checked from disk.

Prints and saves (JSON) the expert and base scores, each stage's wall time, the front, the checks
and the children's peak resident memory. Usage::

    .venv/bin/hm3 zoo import-smollm2 runs/smollm2
    .venv/bin/python experiments/real_model_run.py --smol-dir runs/smollm2 [--backend hf|vllm]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import yaml

from hm3.atomic import atomic_write_text
from hm3.store import Evaluation, RunStore

HM3 = str(Path(sys.executable).parent / "hm3")


def train_expert(smol: Path, task: str, out: Path, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Fine-tune SmolLM2 on ``zoo:task``'s train split into ``out`` (reused if its settings match);
    returns the seconds spent (0 when reused)."""
    from objectives.zoo import zoo_objective

    settings = {"base": str(smol.resolve()), "task": task, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seed": seed}
    return fine_tune(smol, lambda: zoo_objective(task).examples("train"), out, settings, label=task)


def fine_tune(base: Path, examples, out: Path, settings: dict[str, Any], *, label: str, device: Any = "cpu",
              autocast: Any = None) -> float:
    """Fine-tune ``base`` on ``examples()`` (loss on the answer tokens, the zoo's loop) with
    ``settings`` (steps, batch_size, lr, seed and whatever identifies the data) into ``out``,
    written atomically with the settings beside; reused when they match. Seconds spent (0 when reused).

    ``device`` is where it trains; ``autocast`` a dtype for the forward pass (:func:`hm3.zoo.train.train`).
    The weights stay float32 and are saved in float32 either way. Neither is part of the reuse check:
    a caller whose experts must differ by device puts it in ``settings``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hm3.zoo.train import encode_examples, train

    marker = out / "hm3_expert.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return 0.0
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = settings["steps"]
    train(model, encode_examples(tokenizer, examples()), steps=steps, batch_size=settings["batch_size"],
          lr=settings["lr"], seed=settings["seed"], pad_id=pad, warmup=max(1, steps // 10),
          log=lambda m: print(f"[expert {label}]{m}", file=sys.stderr, flush=True), autocast=autocast)
    model.to("cpu")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / "hm3_expert.json", json.dumps(settings, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return time.perf_counter() - start


def hm3(*argv: str) -> tuple[float, str]:
    """Run an hm3 command as a fresh process; (seconds, stdout). Its progress and errors go to stderr."""
    start = time.perf_counter()
    done = subprocess.run([HM3, *argv], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"hm3 {' '.join(argv)} failed (rc {done.returncode}); its stderr is above")
    return time.perf_counter() - start, done.stdout


def scores_from_disk(model_dir: Path, objectives: list[str], n: int, backend: str) -> list[float]:
    """``hm3 eval`` of a checkpoint on the first ``n`` validation examples (a fresh process, from disk)."""
    _, out = hm3("eval", str(model_dir), "--objectives", ",".join(objectives), "--split", "validation",
                 "--limit", str(n), "--backend", backend, "--json")
    by_name = {r["objective"]: r["score"] for r in json.loads(out)["results"]}
    return [by_name[o] for o in objectives]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smol-dir", type=Path, default=Path("runs/smollm2"))
    p.add_argument("--work", type=Path, default=Path("runs/real_model_run"))
    harness.add_out_arguments(p, "real_model_run")
    p.add_argument("--tasks", default="math,code")
    p.add_argument("--expert-steps", type=int, default=40)
    p.add_argument("--expert-batch", type=int, default=16)
    p.add_argument("--expert-lr", type=float, default=1e-4)
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    p.add_argument("--mode", default="hm3", choices=("hm3", "rmm"), help="level-2 mode")
    p.add_argument("--name", default="", help="suffix of the run's directories under --work (other settings)")
    p.add_argument("--budget", type=int, default=12, help="level-1 evaluations")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (the experts stay the same)")
    p.add_argument("--validation-examples", type=int, default=32)
    p.add_argument("--test-examples", type=int, default=64)
    p.add_argument("--t-max", type=int, default=30)
    p.add_argument("--offline-episodes", type=int, default=8)
    p.add_argument("--online-episodes", type=int, default=4)
    p.add_argument("--rl", action="append", default=[], metavar="KEY=VALUE",
                   help="another level2.rl setting, e.g. path_prior=frame-order (repeatable; YAML values)")
    p.add_argument("--level2", action="append", default=[], metavar="KEY=VALUE",
                   help="another level2 setting, e.g. keep_best=3 (repeatable; YAML values)")
    p.add_argument("--level1-only", action="store_true",
                   help="level 1 alone (`hm3 search param`, no level 2) with --budget evaluations")
    args = p.parse_args(argv)
    if not (args.smol_dir / "config.json").is_file():
        print(f"no model at {args.smol_dir}: import it with  hm3 zoo import-smollm2 {args.smol_dir}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    objectives = [f"zoo:{t}" for t in tasks]
    seconds: dict[str, float] = {}

    experts = {t: args.work / "experts" / t for t in tasks}
    for i, (task, out) in enumerate(experts.items()):
        seconds[f"expert_{task}"] = train_expert(args.smol_dir, task, out, steps=args.expert_steps,
                                                 batch_size=args.expert_batch, lr=args.expert_lr, seed=i + 1)

    config = {
        "models": {"base": str(args.smol_dir.resolve()), **{t: str(d.resolve()) for t, d in experts.items()}},
        "objectives": objectives,
        "search_space": {"base_model": "base", "models": tasks, "dare": True, "rescale_mode": "l1",
                         "weight_bounds": [0.0, 1.0], "density_bounds": [0.2, 1.0]},
        "optimizer": {"name": "bo-mo", "budget": args.budget},
        "evaluation": {"backend": args.backend, "validation_examples": args.validation_examples,
                       "test_examples": args.test_examples, "batch_size": 32},
        "seed": args.seed,
        "level2": {"pool": "experts+merge", "preferences": 2,
                   "rl": {"offline_episodes": args.offline_episodes, "online_episodes": args.online_episodes,
                          "episodes_per_update": 4, "epochs": 4, "dar": True, "data_scale": 0.25,
                          "t_max": args.t_max}},
    }
    if args.mode != "hm3":
        config["level2"]["rl"]["mode"] = args.mode
    for option, section in (("--rl", config["level2"]["rl"]), ("--level2", config["level2"])):
        for item in getattr(args, option[2:]):
            key, sep, value = item.partition("=")
            if not sep or not key:
                p.error(f"{option} {item!r}: expected KEY=VALUE")
            section[key] = yaml.safe_load(value)
    if args.level1_only:
        del config["level2"]
    tag = "-".join(x for x in (args.backend, "level1" if args.level1_only else "",
                               "" if args.mode == "hm3" or args.level1_only else args.mode, args.name,
                               f"s{args.seed}" if args.seed else "") if x)
    run_dir = args.work / f"run-{tag}"
    args.out = harness.out_path(args, "real_model_run", tag)
    config_file = args.work / f"config-{tag}.yml"
    atomic_write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    resume = ["--resume"] if (run_dir / "hm3.sqlite").exists() else []
    if args.level1_only:
        seconds["hm3_search_param"], out = hm3("search", "param", str(config_file), str(run_dir), *resume)
        print(out)
        return write_result(args, config, seconds, run_dir, objectives, read_front(run_dir), checks=None,
                            request=None)
    seconds["hm3_run"], _ = hm3("run", str(config_file), str(run_dir), *resume)
    seconds["hm3_front"], front_table = hm3("front", str(run_dir))
    print(front_table)

    front = read_front(run_dir)
    checks = []
    for row in front:
        out_dir = args.work / f"export-{tag}-{row['point']}"
        secs, _ = hm3("export", str(run_dir), "--point", row["point"], str(out_dir), "--overwrite")
        stored = [float(row[f"{o}_val"]) for o in objectives]
        from_disk = scores_from_disk(out_dir, objectives, args.validation_examples, args.backend)
        config_json = json.loads((out_dir / "config.json").read_text())
        checks.append({"point": int(row["point"]), "level": int(row["level"]), "kind": row["kind"],
                       "stored_validation": stored, "exported_validation": from_disk, "equal": stored == from_disk,
                       "num_hidden_layers": config_json["num_hidden_layers"],
                       "tie_word_embeddings": config_json.get("tie_word_embeddings"), "export_seconds": secs})
        print(f"[check] point {row['point']} (level {row['level']}): stored {stored} exported {from_disk} "
              f"{'equal' if stored == from_disk else 'DIFFERENT'}", flush=True)

    prefer = ",".join(f"{t}={w}" for t, w in zip(tasks, [0.7] + [0.3 / max(1, len(tasks) - 1)] * (len(tasks) - 1),
                                                   strict=True))
    request_dir = args.work / f"request-{tag}"
    seconds["hm3_request"], request_out = hm3("request", str(run_dir), "--prefer", prefer, str(request_dir),
                                              "--overwrite")
    record = json.loads((request_dir / "hm3_request.json").read_text())
    request_scores = scores_from_disk(request_dir, objectives, args.validation_examples, args.backend)
    predicted = [record["validation_scores"][o] for o in objectives]

    request = {"prefer": prefer, "answer": record["answer"], "kind": record["kind"],
               "predicted_validation": predicted, "measured_from_disk": request_scores,
               "equal": predicted == request_scores, "stdout": request_out}
    return write_result(args, config, seconds, run_dir, objectives, front, checks=checks, request=request)


def read_front(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a finished run's ``front.csv``."""
    with open(run_dir / "front.csv") as f:
        return list(csv.DictReader(f))


def validation_cost(run_dir: Path, n_objectives: int, n_examples: int) -> dict[str, Any]:
    """Validation examples the run scored, by candidate kind, and in full-evaluation equivalents.

    A full evaluation is every objective on the run's ``n_examples`` validation examples; DAR
    episodes score subsets, so level 2's cost is its examples divided by that.
    """
    with RunStore.open(run_dir, readonly=True) as store:
        kind_of = {c.id: c.kind for c in store.candidates()}
        by_kind: dict[str, list[Evaluation]] = {}
        for e in store.evaluations(split="validation"):
            by_kind.setdefault(kind_of[e.candidate_id], []).append(e)
    full = n_objectives * n_examples
    return {kind: {"evaluations": len(rows), "examples": sum(e.count for e in rows),
                   "full_evaluation_equivalents": round(sum(e.count for e in rows) / full, 2),
                   "seconds": round(sum(e.seconds for e in rows), 1)} for kind, rows in sorted(by_kind.items())}


def write_result(args, config: dict[str, Any], seconds: dict[str, float], run_dir: Path, objectives: list[str],
                 front: list[dict[str, str]], *, checks: list[dict[str, Any]] | None,
                 request: dict[str, Any] | None) -> int:
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "benchmark": "real_model_run",
        **harness.provenance(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": config,
        "references_validation": summary["reference_validation"],
        "seconds": seconds,
        "summary": {k: v for k, v in summary.items() if k.startswith("hv") or k in (
            "candidates", "evaluations", "front_size", "front_levels", "level2_paths", "wall_seconds_this_process")},
        "cost": validation_cost(run_dir, len(objectives), args.validation_examples),
        "front": front,
        "export_checks": checks,
        "request": request,
        "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    harness.write_results(args.out, result)
    print(json.dumps({k: result[k] for k in ("references_validation", "seconds", "summary", "cost")}, indent=1))
    if checks is None:
        print(f"level 1 alone: not checked from disk; -> {args.out}")
        return 0
    ok = all(c["equal"] for c in checks) and request is not None and request["equal"]
    print(f"export and request checks: {'all equal' if ok else 'SOME DIFFER'}; -> {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
