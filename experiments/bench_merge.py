"""Merge-engine benchmark: hm3 vs mergekit, side by side, plus the I/O floor and the in-memory path.

Builds three ~125M-parameter fp32 Llama checkpoints (a base and two variants)
locally, then times, alternating A B A B … so machine noise hits both alike:

* ``hm3 merge`` vs ``mergekit-yaml`` on the same TIES, DARE-TIES, SLERP, DELLA
  and DELLA-linear recipes (median wall time, peak RSS of each process, and the
  ratios), each writing a fresh directory (the last one removed first,
  untimed); for the random methods hm3 also runs the recipe with
  ``mask_rng: sfc64`` (its faster mask draw; the recipe as given keeps the
  default ``mt19937`` draw), in the same rounds;
* the floor: one process that reads the three models and writes one with a
  single elementwise operation (hm3's reader/writer and ``hm3 merge``'s process
  settings, :mod:`hm3.process`; no merge math);
* the in-memory path: one candidate merged straight into a live model.

Usage: .venv/bin/python experiments/bench_merge.py [--reps 3] [--methods ties,dare_ties,...] [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

from hm3.process import tensor_loop_process

# the floor job runs with `hm3 merge`'s process settings (GC, malloc, BLAS threads), so that it stays a floor
with tensor_loop_process() if "--floor-only" in sys.argv else contextlib.nullcontext():
    import torch
import yaml  # noqa: E402

BIN = Path(sys.executable).parent
MODEL = dict(hidden_size=768, num_layers=12, intermediate_size=2048, vocab_size=24000, num_heads=12)


def build_models(work: Path) -> dict[str, Path]:
    from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama

    paths = {"base": work / "base", "a": work / "a", "b": work / "b"}
    if not (paths["b"] / "config.json").exists():
        print("building 3 Llama models (~125M params each, fp32) ...", flush=True)
        build_random_llama(paths["base"], seed=0, **MODEL)
        build_finetuned_variant(paths["base"], paths["a"], seed=1, scale=0.01)
        build_finetuned_variant(paths["base"], paths["b"], seed=2, scale=0.01)
    return paths


METHODS = ("ties", "dare_ties", "slerp", "della", "della_linear")
#: methods with a random drop mask: hm3 also runs them with its faster mask generator
RANDOM_METHODS = ("dare_ties", "della", "della_linear")


def recipe(paths: dict[str, Path], method: str) -> dict:
    if method == "slerp":  # the shape of the slerp configs people share: the base listed among the models
        return {
            "merge_method": "slerp",
            "base_model": str(paths["base"]),
            "models": [{"model": str(paths["base"])}, {"model": str(paths["a"])}],
            "parameters": {"t": 0.4},
            "dtype": "float32",
        }
    if method.startswith("della"):
        return {
            "merge_method": method,
            "base_model": str(paths["base"]),
            "models": [
                {"model": str(paths["a"]), "parameters": {"weight": 0.6, "density": 0.5, "epsilon": 0.1}},
                {"model": str(paths["b"]), "parameters": {"weight": 0.4, "density": 0.5, "epsilon": 0.1}},
            ],
            "dtype": "float32",
        }
    return {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [
            {"model": str(paths["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(paths["b"]), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "dtype": "float32",
    }


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process (its own rusage via wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def floor_job(paths: dict[str, Path], out: Path) -> None:
    """Read the three models tensor by tensor and write (a + b + c) — no merge math."""
    from hm3.checkpoint import CheckpointWriter, open_checkpoint

    ckpts = [open_checkpoint(paths[k]) for k in ("base", "a", "b")]
    names = ckpts[0].tensor_names()
    layout = [(n, ckpts[0].shape(n), ckpts[0].dtype(n)) for n in names]
    with CheckpointWriter(out, config=ckpts[0].config, overwrite=True, background=True, layout=layout) as w:
        for name in names:
            w.add(name, ckpts[0].get(name) + ckpts[1].get(name) + ckpts[2].get(name))


def in_memory_timing(paths: dict[str, Path], reps: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from hm3.config import parse_merge_config
    from hm3.merge.inmemory import InMemoryMerger

    t0 = time.perf_counter()
    merger = InMemoryMerger(paths["base"], [paths["a"], paths["b"]], base_ref=str(paths["base"]),
                            model_refs=[str(paths["a"]), str(paths["b"])])
    load_s = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    params = {k: v.data for k, v in model.named_parameters()}
    out = {"load_once_s": load_s}
    for method, extra in (("ties", {}), ("dare_ties", {}), ("dare_ties_sfc64", {"mask_rng": "sfc64"})):
        r = parse_merge_config(recipe(paths, method.removesuffix("_sfc64")) | extra)
        times = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            merger.merge_into(params, r)
            times.append(time.perf_counter() - t)
        out[f"{method}_per_candidate_s"] = statistics.median(times[1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hm3-bench-merge")
    harness.add_out_arguments(ap, "bench_merge")
    ap.add_argument("--floor-only", type=Path, help=argparse.SUPPRESS)  # internal: run the floor job
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = build_models(args.work)
    if args.floor_only:
        floor_job(paths, args.floor_only)
        return

    results: dict[str, dict[str, list[float]]] = {}
    load_before = list(os.getloadavg())  # the machine may be shared: the report says how busy it was

    def record(key: str, cmd: list[str], out: Path) -> None:
        """Time ``cmd`` writing into ``out``, removed first and untimed: every tool writes a fresh directory
        (replacing an existing output is work of its own, which none is asked to do here)."""
        subprocess.run(["rm", "-rf", str(out)], check=True)
        wall, rss = run_timed(cmd)
        results.setdefault(key, {"wall_s": [], "peak_rss_mb": []})
        results[key]["wall_s"].append(wall)
        results[key]["peak_rss_mb"].append(rss)
        print(f"  {key:22s} {wall:7.2f} s  {rss:7.0f} MB", flush=True)

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    floor_cmd = [sys.executable, __file__, "--work", str(args.work), "--floor-only", str(args.work / "floor")]
    for method in methods:
        cfg = args.work / f"{method}.yml"
        cfg.write_text(yaml.safe_dump(recipe(paths, method)))
        hm3_out = args.work / f"hm3_{method}"
        hm3_cmd = [str(BIN / "hm3"), "merge", str(cfg), str(hm3_out)]
        fast_cmd = None
        if method in RANDOM_METHODS:  # mergekit refuses hm3's keys, so the variant has its own recipe file
            fast_cfg = args.work / f"{method}_sfc64.yml"
            fast_cfg.write_text(yaml.safe_dump(recipe(paths, method) | {"mask_rng": "sfc64"}))
            fast_cmd = [str(BIN / "hm3"), "merge", str(fast_cfg), str(hm3_out)]
        mk_out = args.work / f"mk_{method}"
        mk_cmd = [str(BIN / "mergekit-yaml"), str(cfg), str(mk_out), "--quiet"]
        print(f"{method}: warm-up, then {args.reps} rounds of hm3, mergekit, floor", flush=True)
        subprocess.run(["rm", "-rf", str(hm3_out)], check=True)
        run_timed(hm3_cmd)  # warm the page cache
        for _ in range(args.reps):
            record(f"hm3_{method}", hm3_cmd, hm3_out)
            if fast_cmd is not None:
                record(f"hm3_{method}_sfc64", fast_cmd, hm3_out)
            record(f"mergekit_{method}", mk_cmd, mk_out)
            record(f"floor_{method}_round", floor_cmd, args.work / "floor")  # the floor measured in the same rounds (same load)

    print("in-memory path (per candidate, into a live LlamaForCausalLM):", flush=True)
    inmem = in_memory_timing(paths, args.reps)

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in results.items()}
    ratios = {}
    for method in methods:
        m, f = med[f"mergekit_{method}"], med[f"floor_{method}_round"]
        for key in (method, f"{method}_sfc64"):
            if f"hm3_{key}" not in med:
                continue
            h = med[f"hm3_{key}"]
            ratios[key] = {
                "wall_vs_mergekit": h["wall_s"] / m["wall_s"],
                "rss_vs_mergekit": h["peak_rss_mb"] / m["peak_rss_mb"],
                "wall_vs_floor": h["wall_s"] / f["wall_s"],
            }
    from hm3.checkpoint import open_checkpoint

    ck = open_checkpoint(paths["base"])
    n_params = sum(torch.Size(ck.shape(n)).numel() for n in ck.tensor_names())
    ck.close()
    report = {
        "benchmark": "bench_merge",
        **harness.provenance(),
        "torch_threads": torch.get_num_threads(),
        "params_per_model": n_params,
        "reps": args.reps,
        "methods": methods,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "raw": results,
        "median": med,
        "ratios": ratios,
        "in_memory": inmem,
    }
    out = harness.write_results(harness.out_path(args, "bench_merge"), report)
    print()
    print(f"{'run':22s} {'median wall s':>14s} {'peak RSS MB':>12s}")
    for k, v in med.items():
        print(f"{k:22s} {v['wall_s']:14.2f} {v['peak_rss_mb']:12.0f}")
    for method, r in ratios.items():
        print(f"{method}: hm3/mergekit wall {r['wall_vs_mergekit']:.3f}x, RSS {r['rss_vs_mergekit']:.3f}x; "
              f"hm3/floor wall {r['wall_vs_floor']:.2f}x")
    print("in-memory:", {k: round(v, 3) for k, v in inmem.items()})
    print(f"saved {out}")


if __name__ == "__main__":
    main()
