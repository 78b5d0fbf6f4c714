"""The ``hm3`` command: parses arguments, calls one library function per subcommand.

Known failures (:class:`hm3.errors.Hm3Error`) become a one-paragraph message
and a non-zero exit; a traceback means a bug in hm3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hm3.errors import Hm3Error, OutputExistsError

Handler = Callable[[argparse.Namespace], int]


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def cmd_merge(args: argparse.Namespace) -> int:
    from hm3.merge.engine import merge_to_disk

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(f"output directory already exists: {out} (use --overwrite to replace it)")
    _set_threads(args.threads)
    report = merge_to_disk(
        args.config, out, overwrite=args.overwrite, device=args.device, seed=args.seed, progress=args.verbose
    )
    print(f"merged {report.tensors} tensors in {report.seconds:.1f} s -> {report.out_dir}")
    return 0


def cmd_export_mergekit(args: argparse.Namespace) -> int:
    import yaml

    from hm3.atomic import atomic_write_text
    from hm3.config import load_merge_config
    from hm3.merge.export import to_mergekit

    data = to_mergekit(load_merge_config(args.config))
    text = yaml.safe_dump(data, sort_keys=False)
    if args.output == "-":
        sys.stdout.write(text)
    else:
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
    run_demo(Path(args.out), overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hm3", description="Hierarchical multi-objective model merging")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("merge", help="merge models from a (mergekit-compatible) recipe YAML")
    m.add_argument("config", help="recipe YAML (mergekit schema + hm3 keys, see docs/RECIPES.md)")
    m.add_argument("output", help="output model directory (must not exist unless --overwrite)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
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

    d = sub.add_parser("demo", help="the embedded default: build tiny models locally and merge them")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo output")
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    return p


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
