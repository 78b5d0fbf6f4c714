"""Build zoo variants (spec overrides) and tabulate their quality bars: how the micro recipe was tuned.

    .venv/bin/python experiments/zoo_variants.py \
        '{"uniform": {"replay_fraction": 0.35, "replay_weights": {}}, "default": {}}' --seeds 0

Each variant is a full ``hm3 zoo build`` (``build_zoo`` with the overrides) into
``--work/NAME-sSEED``, reused when already built there. Prints and saves (JSON) per
variant and seed: the expert margins and the share of gain the bar's chosen TIES merge
keeps, on validation (what the bar judges) and on test (what the choice never saw). The results
file is rewritten after each build, so an interrupted call keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness

from hm3.zoo.build import build_zoo, expert_margin
from objectives.zoo import ZOO_TASKS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", help='JSON object: name -> spec overrides, e.g. {"v": {"expert_lr": 7e-4}}')
    p.add_argument("--size", default="micro")
    p.add_argument("--seeds", default="0")
    p.add_argument("--work", type=Path, default=Path("runs/zoo_variants"))
    harness.add_out_arguments(p, "zoo_variants")
    args = p.parse_args(argv)
    out = harness.out_path(args, "zoo_variants")
    variants = json.loads(args.variants)
    rows = []
    for name, overrides in variants.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            m = build_zoo(args.work / f"{name}-s{seed}", size=args.size, seed=seed, progress=False, **overrides)
            bar = m.quality_bar
            test_kept = m.ties_best_test["gain_kept"]
            row = {"variant": name, "seed": seed, "overrides": overrides, "spec_hash": m.spec_hash,
                   "bar_met": bar["ok"], "merge": m.ties_best["merge"],
                   "margin_validation": {t: c["expert_margin"] for t, c in bar["checks"].items()},
                   "kept_validation": {t: c["ties_gain_kept"] for t, c in bar["checks"].items()},
                   "margin_test": {t: round(expert_margin(m.scores_test, t), 4) for t in ZOO_TASKS}, "kept_test": test_kept,
                   "build_seconds": m.build_seconds}
            rows.append(row)
            fmt = lambda d: " / ".join(f"{d[t]:.2f}" for t in ZOO_TASKS)  # noqa: E731
            print(f"{name} s{seed}: bar {'met' if bar['ok'] else 'NOT met'} | margins val {fmt(row['margin_validation'])}"
                  f" test {fmt(row['margin_test'])} | kept val {fmt(row['kept_validation'])} test {fmt(test_kept)}"
                  f" | {row['merge']} | {m.build_seconds:.0f} s", flush=True)
            harness.write_results(out, {"benchmark": "zoo_variants", **harness.provenance(argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
