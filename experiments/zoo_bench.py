"""What the zoo benchmarks share: their common command-line options and the start-up checks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import harness

#: where a benchmark's plot goes by default: named like its results file
PLOTS = harness.REPO / "docs" / "benchmarks"


def add_zoo_bench_args(p: argparse.ArgumentParser, name: str, *, validation: int = 64, test: int = 200) -> None:
    """--zoo, --seeds, example counts, --work named after the benchmark, --out/--label/--plot, --threads, --quiet."""
    p.add_argument("--zoo", default="builtin:micro", help="builtin:NAME (a zoo shipped with hm3) or a zoo directory")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--validation-examples", type=int, default=validation)
    p.add_argument("--test-examples", type=int, default=test)
    p.add_argument("--work", type=Path, default=Path(f"runs/{name}"))
    harness.add_out_arguments(p, name)
    p.add_argument("--plot", type=Path, default=None,
                   help="plot file (default: beside --out, or docs/benchmarks/ for the default results file)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(benchmark=name)


def prepare(args: argparse.Namespace) -> bool:
    """Set torch's threads, resolve ``--zoo`` to a folder and ``--out``/``--plot`` to files; False (after
    saying why) when the zoo folder holds no zoo."""
    if args.plot is None:
        args.plot = args.out.with_suffix(".png") if args.out else PLOTS / f"{harness.out_path(args, args.benchmark).stem}.png"
    args.out = harness.out_path(args, args.benchmark)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from hm3.zoo.shipped import resolve_zoo

    args.zoo = resolve_zoo(args.zoo)
    if not (args.zoo / "zoo.json").is_file():
        print(f"no zoo at {args.zoo}: use builtin:micro, or build one with  hm3 zoo build {args.zoo}", file=sys.stderr)
        return False
    args.work.mkdir(parents=True, exist_ok=True)
    return True


def check_reused(run_dir: Path, stored: dict[str, Any]) -> None:
    """Refuse to read a finished arm back from ``run_dir`` unless its store recorded ``stored`` (the arm's
    config as :func:`hm3.run.config.stored_form` gives it): an arm's directory is named by a few of its
    settings only (optimiser, seed, budget), so another call with the same ``--work`` and, say, another
    ``--validation-examples`` would otherwise report the earlier call's numbers as its own."""
    from hm3.run.config import stored_config
    from hm3.store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        store.check_config(stored, recorded=stored_config(store))


def zoo_record(zoo: Path) -> dict[str, Any]:
    """What a result file must say about the zoo it ran on: its spec *and* this build's own scores.

    The spec hash names a recipe, not weights (float kernels differ between CPUs), so two builds
    with one hash can score differently; the score matrix and the quality bar identify the build.
    """
    manifest = json.loads((zoo / "zoo.json").read_text())
    return {"path": str(zoo), "spec": manifest.get("spec"), "spec_hash": manifest.get("spec_hash"),
            "scores_validation": manifest.get("scores_validation"), "ties_best": manifest.get("ties_best"),
            "quality_bar": manifest.get("quality_bar"), "build_seconds": manifest.get("build_seconds")}


def plot_hv_curves(curves: dict[str, list[list[float]]], path: Path, *, log_x: bool = False) -> None:
    """Hypervolume against evaluations, one line per label: the mean over its traces (each cut to the
    shortest) with the min-max band of the seeds around it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from hm3.report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, traces in curves.items():
        n = min(len(t) for t in traces)
        values = np.array([t[:n] for t in traces])
        x = np.arange(1, n + 1)
        ax.plot(x, values.mean(0), label=label, lw=1.5)
        ax.fill_between(x, values.min(0), values.max(0), alpha=0.15)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume (validation, hm3 protocol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
