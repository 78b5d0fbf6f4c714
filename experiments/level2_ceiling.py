"""How much hypervolume *can* level 2 add to a level-1 front? An exhaustive check on a finished run.

For a finished two-level run (``hm3 run`` or an arm of ``bench_two_level.py``), every layer path of
1..``--t-max`` hops over the pool (the K experts + one level-1 merge as the frame) is scored on the
run's whole validation plan, for each level-1 front point as the frame. Reported: the level-1 HV,
the union HV after each frame, the union front's size and how many of its points are paths, and the
number of full evaluations this took. This is the ceiling a level-2 search could reach with paths
that short (minus the luck of the best validation scores among many), to set beside what the RL
search found within its budget.

With ``--longer N``, N random paths of ``--t-max`` + 1 .. ``--longer-t-max`` hops per frame (uniform
length, uniform hops; seeded by the frame's id) are scored too, and reported apart: a sample, not a
ceiling, of what longer paths add (4 hops over 4 pool models × 2 layers are 4 096 paths per frame).

The run directory is copied to ``--work`` first (the original is never written to); scores are
stored there, so an interrupted check resumes from its store. hm3's own code scores the paths
(:class:`hm3.arch.level2.PathEvaluator`, in-memory path models on the hf backend).

Usage::

    .venv/bin/python experiments/level2_ceiling.py RUN_DIR [--t-max 2] [--work runs/level2_ceiling]
        [--out FILE | --label LABEL] [--longer 0 --longer-t-max 4]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import harness
import numpy as np
import torch

from hm3.arch.level2 import PathEvaluator
from hm3.arch.path import LayerPath
from hm3.run.config import stored_two_level_config
from hm3.run.two_level import TwoLevelRun
from hm3.search.level1 import make_optimizer, open_session
from hm3.search.pareto import non_dominated, protocol_hypervolume
from hm3.store import RunStore


@contextmanager
def finished_run(run_dir: Path, work: Path) -> Iterator[tuple[TwoLevelRun, dict[int, np.ndarray], np.ndarray, np.ndarray]]:
    """A finished two-level run copied to ``work`` (the original is never written to), opened: (the run,
    its level-1 candidates' validation scores, base, ideal). Scores added to the copy stay there, so an
    interrupted check resumes from its store."""
    if not work.exists():
        shutil.copytree(run_dir, work, ignore=shutil.ignore_patterns("hm3.lock"))
    with RunStore.open(work) as store:
        cfg = stored_two_level_config(store)
        session = open_session(cfg.level1, store, lambda m: None)
        try:
            run = TwoLevelRun(cfg, work, session, log=lambda m: None, progress=False,
                              optimizer=make_optimizer(cfg.level1))
            scores, base, ideal = run.level1(resume=True)  # read back: level 1 is finished
            yield run, scores, base, ideal
        finally:
            session.close()


def greedy_best_paths(y1: np.ndarray, paths: np.ndarray, base: np.ndarray, ideal: np.ndarray,
                      ks: str) -> dict[str, float]:
    """HV of the level-1 points plus k path points picked greedily by HV gain, for each k in ``ks``."""
    ks_sorted = sorted(int(k) for k in ks.split(","))
    chosen: list[int] = []
    front = y1
    out = {}
    for k in range(1, ks_sorted[-1] + 1):
        current = protocol_hypervolume(front, base, ideal)
        gains = [protocol_hypervolume(np.vstack([front, y]), base, ideal) - current if i not in chosen else -1.0
                 for i, y in enumerate(paths)]
        best = int(np.argmax(gains))
        if gains[best] > 0:
            chosen.append(best)
            front = np.vstack([front, paths[best]])
        if k in ks_sorted:
            out[str(k)] = protocol_hypervolume(front, base, ideal)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished two-level run directory (pool experts+merge)")
    p.add_argument("--t-max", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("runs/level2_ceiling"))
    harness.add_out_arguments(p, "level2_ceiling")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--best-k", default="3,6,12", help="report the HV of level 1 + the best k paths, for these k")
    p.add_argument("--longer", type=int, default=0, help="random paths per frame longer than --t-max")
    p.add_argument("--longer-t-max", type=int, default=4)
    args = p.parse_args(argv)
    if args.longer and args.longer_t_max <= args.t_max:
        p.error(f"--longer-t-max {args.longer_t_max} must exceed --t-max {args.t_max}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with finished_run(args.run, args.work / args.run.name) as (run, scores, base, ideal):
        ids = list(scores)
        y1 = np.stack([scores[i] for i in ids])
        front = [ids[i] for i in non_dominated(y1)]
        layout = run.session.pool_layout()
        evaluator = PathEvaluator(run.session, base=base, ideal=ideal, dar=False, data_scale=1.0, seed=0,
                                  t_max=max(args.t_max, args.longer_t_max if args.longer else 0))
        hops = [(m, layer) for m in range(layout.size) for layer in range(layout.num_layers)]
        paths = [LayerPath(hops=h) for t in range(1, args.t_max + 1) for h in itertools.product(hops, repeat=t)]
        hv1 = protocol_hypervolume(y1, base, ideal)
        print(f"level 1: {len(ids)} merges, front {len(front)}, HV {hv1:.4f}; "
              f"{len(paths)} paths per frame", flush=True)
        union = [y1]
        longer: list[np.ndarray] = []
        frames = []
        for frame in front:
            ys = np.stack([evaluator.raw_scores(path, frame, run.session.validation) for path in paths])
            union.append(ys)
            hv = protocol_hypervolume(np.concatenate(union), base, ideal)
            frames.append({"frame": frame, "paths": len(ys), "hv_paths_alone": protocol_hypervolume(ys, base, ideal),
                           "hv_union_so_far": hv})
            if args.longer:
                rng = np.random.default_rng(frame)
                sample = [LayerPath(hops=tuple(hops[i] for i in rng.integers(len(hops), size=t)))
                          for t in rng.integers(args.t_max + 1, args.longer_t_max + 1, size=args.longer)]
                longer.append(np.stack([evaluator.raw_scores(path, frame, run.session.validation) for path in sample]))
                frames[-1]["hv_union_with_longer_so_far"] = protocol_hypervolume(
                    np.concatenate(union + longer), base, ideal)
            print(f"frame {frame}: union HV {hv:.4f}"
                  + (f", with longer paths {frames[-1]['hv_union_with_longer_so_far']:.4f}" if longer else "")
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
        all_y = np.concatenate(union)
        nd = non_dominated(all_y)
        best_k = greedy_best_paths(y1, all_y[len(y1):], base, ideal, args.best_k)
        if longer:
            with_longer = np.concatenate(union + longer)
            nd_longer = non_dominated(with_longer)
            longer_out = {
                "per_frame": args.longer, "hops": [args.t_max + 1, args.longer_t_max],
                "path_evaluations": args.longer * len(front),
                "hv_union_with_longer": protocol_hypervolume(with_longer, base, ideal),
                "union_front_size": int(len(nd_longer)),
                "union_front_longer_paths": int((nd_longer >= len(all_y)).sum()),
            }
    out = {
        "benchmark": "level2_ceiling",
        **harness.provenance(argv),
        "run": str(args.run), "t_max": args.t_max,
        "validation_examples": {k: len(v) for k, v in run.session.validation.indices.items()},
        "level1": {"merges": len(ids), "front": len(front), "hv_validation": hv1},
        "frames": frames,
        "path_evaluations": len(paths) * len(front),
        "hv_union": protocol_hypervolume(all_y, base, ideal),
        "union_front_size": int(len(nd)),
        "union_front_paths": int((nd >= len(y1)).sum()),
        # the most a search keeping only k paths could add (chosen greedily, with hindsight, on validation)
        "hv_union_best_k_paths": best_k,
        "longer_paths_sample": longer_out if longer else None,
        "seconds": time.perf_counter() - start,
    }
    harness.write_results(harness.out_path(args, "level2_ceiling", args.run.name), out)
    print(f"union HV {out['hv_union']:.4f} vs level 1 {hv1:.4f}; union front {out['union_front_size']} points, "
          f"{out['union_front_paths']} of them paths; {out['path_evaluations']} full path evaluations; "
          f"level 1 + best k paths: {', '.join(f'k={k}: {v:.4f}' for k, v in best_k.items())}")
    if longer:
        print(f"with {out['longer_paths_sample']['path_evaluations']} random paths of {args.t_max + 1}-"
              f"{args.longer_t_max} hops: union HV {longer_out['hv_union_with_longer']:.4f}, "
              f"{longer_out['union_front_longer_paths']} of them on the union front")
    return out


if __name__ == "__main__":
    main()
