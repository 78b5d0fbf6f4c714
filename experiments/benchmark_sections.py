"""Every benchmark of ``docs/BENCHMARKS.md``: one :class:`Section` each, in page order.

To add a benchmark: write its script on :mod:`harness` (so its results file carries date, commit,
machine and command), then add one ``Section`` here: a title, a few sentences on what is measured
and why, and a function from the current results to tables. Numbers come only from the results
files, never from this text. ``python experiments/report_benchmarks.py`` rewrites the page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import harness
from benchmark_report import (
    Result,
    Results,
    Section,
    Target,
    git_last_change,
    mean,
    num,
    plot_of,
    ratio,
    sources,
    table,
    verdict,
)

TASKS = ("math", "code", "translation")
SHIPPED_ZOO = harness.REPO / "hm3" / "zoo" / "shipped" / "micro" / "zoo.json"


def per_task(values: dict[str, float], spec: str = ".2f", tasks: tuple[str, ...] = TASKS) -> str:
    return " / ".join(num(values.get(t), spec) for t in tasks)


def percent(values: dict[str, float], tasks: tuple[str, ...] = TASKS) -> str:
    return " / ".join(f"{values[t]:.0%}" for t in tasks)


def zoo_text(zoo_build: dict[str, Any] | None) -> str:
    """Which zoo build a result ran on: its spec hash, its quality bar, and whether it scores as the shipped zoo."""
    if not zoo_build:
        return "zoo not recorded"
    shipped = json.loads(SHIPPED_ZOO.read_text())
    same = zoo_build.get("scores_validation") == shipped["scores_validation"]
    bar = (zoo_build.get("quality_bar") or {}).get("ok")
    return (f"zoo spec `{zoo_build.get('spec_hash')}`, quality bar {'met' if bar else 'not met'}, "
            + ("the same validation scores as the shipped micro zoo" if same else "**not** the shipped micro zoo's "
               "weights (another build, with other scores)"))


# --- the shipped zoo -----------------------------------------------------------------------------------------


def render_shipped_zoo(results: Results) -> str:
    from hm3.zoo.build import expert_margin  # the bar's own definition

    m = json.loads(SHIPPED_ZOO.read_text())
    val, test = m["scores_validation"], m["scores_test"]
    rows = [[name, *(num(val[name][t]) for t in TASKS), *(num(test[name][t]) for t in TASKS)] for name in val]
    best, best_test = m["ties_best"], m["ties_best_test"]
    weights = "/".join(f"{w:g}" for w in best["weights"])
    rows.append([f"best TIES merge of the bar's grid (w = {weights})", *(num(best[t]) for t in TASKS),
                 *(num(best_test[t]) for t in TASKS)])
    checks = m["quality_bar"]["checks"]
    bar = [[t, num(checks[t]["expert_margin"], ".2f"), f"{checks[t]['ties_gain_kept']:.0%}",
            num(expert_margin(test, t), ".2f"), f"{best_test['gain_kept'][t]:.0%}", verdict(checks[t]["ok"])]
           for t in TASKS]
    date, commit = git_last_change(SHIPPED_ZOO)
    thresholds = m["quality_bar"]["thresholds"]
    return "\n\n".join([
        table(["model", "validation: math", "code", "translation", "test: math", "code", "translation"], rows),
        table(["task", "expert margin (validation)", "merge keeps (validation)", "expert margin (test)",
               "merge keeps (test)", "bar (validation)"], bar),
        f"Bar: expert margin ≥ {thresholds['expert_margin']}, merge keeps ≥ {thresholds['ties_gain_kept']:.0%} of "
        f"each expert's gain; judged on validation: **{verdict(m['quality_bar']['ok'])}**.",
        f"- [`hm3/zoo/shipped/micro/zoo.json`](../hm3/zoo/shipped/micro/zoo.json): committed {date or '–'} in "
        f"`{commit or '–'}`; built in {m['build_seconds']:.0f} s at load {m['load_average']}, spec "
        f"`{m['spec_hash']}`; `hm3 zoo build DIR --size micro --seed 0`",
    ])


# --- zoo recipe variants -------------------------------------------------------------------------------------


ZOO_VARIANTS = ("deep", "default", "specialist", "cheaper", "deep4", "deep4b", "wide4", "lr4")  # the recipe's seeds first, then what was tried beside it


def _variant_rows(r: Result) -> list[dict[str, Any]]:
    """A variants file's builds: the early files are a bare list of them."""
    return r.data if isinstance(r.data, list) else r.get("rows", [])


def render_zoo_variants(results: Results) -> str:
    found = sorted(results.of("zoo_variants"),
                   key=lambda r: (ZOO_VARIANTS.index(r.label) if r.label in ZOO_VARIANTS else len(ZOO_VARIANTS), r.label))
    parts = []
    for r in found:
        rows = _variant_rows(r)
        met = sum(x["bar_met"] for x in rows)
        parts.append(f"**{r.label}** ({met} of {len(rows)} builds meet the bar)" + (f": {r.get('note')}" if r.get("note")
                                                                                    else ""))
        parts.append(table(
            ["variant", "seed", "bar", "margins, validation (m / c / t)", "merge keeps, validation",
             "margins, test", "merge keeps, test", "build s"],
            [[x["variant"], x["seed"], verdict(x["bar_met"]), per_task(x["margin_validation"]),
              percent(x["kept_validation"]), per_task(x["margin_test"]), percent(x["kept_test"]),
              num(x["build_seconds"], ".0f")] for x in rows]))
    if not found:
        return ""
    parts.append(sources(found, {
        "default": "python experiments/zoo_variants.py '{\"default\": {}}' --seeds 0,1,2 "
                   "--out experiments/results/zoo_variants_default.json",
        "cheaper": "python experiments/zoo_variants.py '{\"w32\": {\"hidden_size\": 32, \"num_heads\": 1, "
                   "\"intermediate_size\": 128}, \"b32\": {\"batch_size\": 32}, \"steps67\": {\"base_steps\": 400, "
                   "\"expert_steps\": 170}, \"inter128\": {\"intermediate_size\": 128}}' "
                   "--out experiments/results/zoo_variants_cheaper.json"}))
    return "\n\n".join(parts)


def zoo_recipe_targets(results: Results) -> list[Target]:
    """A recipe that meets the quality bar for at least 4 of seeds 0-4: the best recipe built for all five."""
    seeds: dict[str, dict[int, bool]] = {}
    for r in results.of("zoo_variants"):
        for x in _variant_rows(r):
            seeds.setdefault(f"{r.label}: {x['variant']}", {})[x["seed"]] = x["bar_met"]
    whole = {name: sum(met.values()) for name, met in seeds.items() if set(range(5)) <= set(met)}
    if not seeds:
        return []
    name = "a zoo recipe meets the quality bar for ≥ 4 of seeds 0-4"
    if not whole:
        return [(name, f"no recipe built for all five seeds ({len(seeds)} tried)", False)]
    best = max(whole, key=whole.__getitem__)
    return [(name, f"{whole[best]} of 5 at best ({best.split(': ')[1]}; {len(seeds)} recipes tried, "
                   f"{len(whole)} built for all five seeds)", whole[best] >= 4)]


def render_zoo_bar_noise(results: Results) -> str:
    found = sorted(results.of("zoo_bar_noise"), key=lambda r: str(r.get("date") or r.date))
    if not found:
        return ""
    latest = found[-1]
    rows = latest.get("rows", [])
    held = [x["bar_met_share"] for x in rows if x["bar_met"]]
    parts = [f"{latest.get('resamples')} paired resamples of each build's validation examples "
             f"({', '.join(sorted({str(x['examples']) for x in rows}))} per task). A build that meets the bar "
             + (f"holds it in {min(held):.0%}-{max(held):.0%} of the resamples" if held else "(none here)")
             + "; the standard errors (±) are the example choice's alone, before any seed's.",
             table(["build", "seed", "bar", "holds in (resamples)", "margins, validation (m / c / t)",
                    "merge keeps, validation", "margin ok (resamples)", "keeps ok (resamples)"],
                   [[Path(x["zoo"]).name, x["seed"], verdict(x["bar_met"]), f"{x['bar_met_share']:.0%}",
                     " / ".join(f"{x['margins'][t]:.2f} ± {x['margin_se'][t]:.2f}" for t in TASKS),
                     " / ".join(f"{x['kept'][t]:.0%} ± {x['kept_se'][t]:.0%}" for t in TASKS),
                     percent(x["margin_ok_share"]), percent(x["kept_ok_share"])] for x in rows]),
             sources([latest])]
    return "\n\n".join(parts)


def render_zoo_gain_scaling(results: Results) -> str:
    latest = results.one("zoo_gain_scaling")
    if latest is None:
        return ""
    rows = latest.get("rows", [])
    scales = [f"{a}" for a in latest.get("scales", [])]
    at = {a: sorted(x["lone_kept"][t][a] for x in rows for t in TASKS) for a in scales}
    summary = "; ".join(f"at {a}, {min(v):.0%} to {max(v):.0%} (median {v[len(v) // 2]:.0%})" for a, v in at.items())
    more = sum(x["merge_kept"][t] > x["lone_kept_at_merge_weight"][t] for x in rows for t in TASKS)
    parts = [f"Share of each expert's gain that the expert alone keeps at scale α, over {len(rows)} builds and "
             f"their 3 tasks: {summary}. The bar's merge keeps more than its expert alone at the same weight in "
             f"{more} of the {len(rows) * len(TASKS)} cases.",
             table(["build", "seed", "bar", "the merge's weights (m / c / t)", "lone expert at that weight",
                    "the merge keeps", *(f"lone expert at {a}" for a in scales)],
                   [[Path(x["zoo"]).name, x["seed"], verdict(x["bar_met"]), per_task(x["merge_weights"]),
                     percent(x["lone_kept_at_merge_weight"]), percent(x["merge_kept"]),
                     *(percent({t: x["lone_kept"][t][a] for t in TASKS}) for a in scales)] for x in rows]),
             sources([latest])]
    return "\n\n".join(parts)


# --- the README's two commands --------------------------------------------------------------------------------


def _suite_results(results: Results) -> dict[str, Result]:
    """Each command's newest measurement (suite, demo, quick): a run may time only some of them (``--what``),
    and is saved under a label of its own, so an older run's other commands stay on the page."""
    latest: dict[str, Result] = {}
    for r in sorted(results.of("bench_test_suite"), key=lambda r: str(r.get("date") or r.date)):
        for kind in r.get("summary", {}):
            latest[kind] = r
    return latest


#: a pytest result line: a run that prints one ran every test it collected, failures included
_PYTEST_RESULT = re.compile(r"\d+ (passed|failed)")


def failed_runs(r: Result, kind: str) -> int:
    """Runs of ``kind`` in ``r`` that did not run the whole command: exited non-zero with no pytest result line
    (set-up, ruff or pytest itself stopped it early), so their time is not the command's. A suite with failing
    tests still runs every test (no ``-x``): its time counts, and :func:`failing_tests` names it."""
    return sum(x.get("exit_code", 0) != 0 and not (kind != "demo" and _PYTEST_RESULT.search(x.get("summary") or ""))
               for x in r.get("runs") if x["kind"] == kind)


def failing_tests(r: Result, kind: str) -> str:
    """"baseline: 3 failed" for the complete runs of ``kind`` whose suite had failing tests, else ""."""
    found = [f"{x['checkout']}: {m.group(0)}" for x in r.get("runs") if x["kind"] == kind and x.get("exit_code")
             for m in [re.search(r"\d+ failed", x.get("summary") or "")] if m]
    return "; ".join(dict.fromkeys(found))  # once, however many rounds it failed in


def _failed(n: int) -> str:
    return f"{n} run{'s' if n > 1 else ''} failed"


def render_test_suite(results: Results) -> str:
    latest = _suite_results(results)
    if not latest:
        return ""
    names = {"suite": "`scripts/test.sh` (ruff + the whole suite)", "demo": "`scripts/demo.sh`",
             "quick": '`scripts/test.sh -m "not slow"`'}
    rows = []
    for kind in ("suite", "demo", "quick"):
        if kind not in latest:
            continue
        r = latest[kind]
        commits = {k: v[:7] for k, v in r.get("commits").items()}
        runs = {c: [x for x in r.get("runs") if x["kind"] == kind and x["checkout"] == c] for c in ("baseline", "current")}
        s = r.get("summary")[kind]
        current = f"`{commits['current']}`: " + " / ".join(f"{x['seconds']:.0f}" for x in runs["current"])
        failed = failed_runs(r, kind)
        invalid = f"not judged: {_failed(failed)} (its time is not the command's)" if failed else None
        failing = failing_tests(r, kind)
        failing = f" (failing tests, every test run: {failing})" if failing else ""
        if kind == "quick":
            rows.append([names[kind], "–", current, "–",
                         invalid or f"≤ {s['target_s']:.0f} s: {verdict(s['met'])}{failing}"])
        else:
            rows.append([names[kind], f"`{commits['baseline']}`: " + " / ".join(f"{x['seconds']:.0f}" for x in runs["baseline"]),
                         current, ratio(s["ratio"]), invalid or f"≤ 0.50×: {verdict(s['ratio'] <= 0.5)}{failing}"])
    used = sorted({r.name: r for r in latest.values()}.values(), key=lambda r: r.name)
    floor = suite_cpu_floor(latest)
    summaries = ["; ".join(f"{x['kind']} at `{r.get('commits')[x['checkout']][:7]}`: `{x['summary']}`"
                           for x in r.get("runs") if x["kind"] in ("suite", "quick"))
                 for r in used if any(x["kind"] in ("suite", "quick") for x in r.get("runs"))]
    return "\n\n".join([
        table(["command", "baseline (s, per round)", "measured commit (s, per round)", "ratio of means", "target"], rows),
        *([floor] if floor else []),
        "pytest's summaries, in order: " + " — ".join(summaries),
        sources(used),
    ])


def suite_cpu_floor(latest: dict[str, Result]) -> str:
    """What the suite's CPU time says of its wall-time target, where the newest suite timing recorded it: the
    machine's CPU time per run (every process: pytest's workers, Ray's actors, vLLM engines, subprocesses)
    spread over its cores is the least wall time in which that work can finish there."""
    r = latest.get("suite")
    cpu = r.get("summary")["suite"].get("cpu") if r else None
    if not cpu:
        return ""
    cores, baseline_mean = r.get("cores"), r.get("summary")["suite"]["baseline_mean_s"]
    commits = {k: v[:7] for k, v in r.get("commits").items()}
    text = (f"CPU time the whole machine used per run of the suite (mean): `{commits['baseline']}` "
            f"{cpu['baseline']['mean_busy_core_s']:.0f} core-seconds, `{commits['current']}` "
            f"{cpu['current']['mean_busy_core_s']:.0f}. Spread over the {cores} cores, the baseline's work needs at "
            f"least {cpu['baseline']['floor_s']:.0f} s and the measured suite's cannot finish in less than "
            f"{cpu['current']['floor_s']:.0f} s, "
            f"{cpu['current']['floor_s'] / baseline_mean:.2f}× the baseline's mean wall time (the target: 0.50×, "
            f"{0.5 * baseline_mean:.0f} s)")
    quick = latest.get("quick")
    quick_cpu = quick.get("summary")["quick"].get("cpu") if quick and quick.name == r.name else None
    if quick_cpu:
        text += (f"; the tests not marked slow alone use {quick_cpu['current']['mean_busy_core_s']:.0f} "
                 f"core-seconds, at least {quick_cpu['current']['floor_s']:.0f} s")
    return text + "."


# --- merge engine -------------------------------------------------------------------------------------------


#: bench_merge's methods as the page names them; ``_sfc64``: hm3 with ``mask_rng: sfc64`` (the others: the default)
MERGE_METHOD_NAMES = {"ties": "TIES", "dare_ties": "DARE-TIES", "slerp": "SLERP", "della": "DELLA",
                      "della_linear": "DELLA-linear"}


def _merge_run_name(key: str) -> str:
    """``hm3_dare_ties_sfc64`` → ``hm3 DARE-TIES (mask_rng sfc64)``; ``floor_ties_round`` → ``floor (TIES rounds)``."""
    if key.startswith("floor_"):
        method = key.removeprefix("floor_").removesuffix("_round")
        return f"floor ({MERGE_METHOD_NAMES.get(method, method)} rounds)"
    tool, _, method = key.partition("_")
    return f"{tool} {_merge_method_name(method)}"


def _merge_method_name(key: str) -> str:
    method = key.removesuffix("_sfc64")
    name = MERGE_METHOD_NAMES.get(method, method)
    return f"{name} (mask_rng sfc64)" if key.endswith("_sfc64") else name


def render_merge(results: Results) -> str:
    r = results.one("bench_merge")
    if r is None:
        return ""
    med, ratios, inmem = r.get("median"), r.get("ratios"), r.get("in_memory")
    raw = r.get("raw")
    rows = [[_merge_run_name(k), ", ".join(f"{x:.2f}" for x in raw[k]["wall_s"]), num(v["wall_s"], ".2f"),
             num(v["peak_rss_mb"], ".0f")] for k, v in med.items()]

    def floor_vs_mergekit(key: str) -> str:
        method = key.removesuffix("_sfc64")
        floor, peer = med.get(f"floor_{method}_round"), med.get(f"mergekit_{method}")
        return ratio(floor["wall_s"] / peer["wall_s"], ".3f") if floor and peer else "–"

    ratio_rows = [[_merge_method_name(k), ratio(x["wall_vs_mergekit"], ".3f"), verdict(x["wall_vs_mergekit"] <= 0.25),
                   ratio(x["rss_vs_mergekit"], ".3f"), verdict(x["rss_vs_mergekit"] <= 1), ratio(x["wall_vs_floor"]),
                   floor_vs_mergekit(k)]
                  for k, x in ratios.items()]
    load = ""
    if r.get("load_average_before") is not None:
        before, after = r.get("load_average_before"), r.get("load_average_after")
        load = (f" Load average (1 / 5 / 15 min) {' / '.join(f'{x:.1f}' for x in before)} at the start and "
                f"{' / '.join(f'{x:.1f}' for x in after)} at the end: the machine was shared with other work.")
    per_candidate = ", ".join(f"{_merge_method_name(k.removesuffix('_per_candidate_s'))} {v:.2f} s"
                              for k, v in inmem.items() if k.endswith("_per_candidate_s"))
    return "\n\n".join([
        f"Three Llama checkpoints of {r.get('params_per_model') / 1e6:.1f} M parameters each, {r.get('reps')} "
        f"rounds, {r.get('torch_threads')} torch threads.{load}",
        table(["run", "wall s (rounds)", "median wall s", "median peak RSS MB"], rows),
        table(["hm3 / mergekit", "wall time", "≤ 0.25×", "peak RSS", "≤ 1×", "hm3 / floor wall time",
               "floor / mergekit wall time"], ratio_rows),
        "The last column is the least wall-time ratio any hm3 merge of three models can reach with this reader "
        "and writer: the floor starts Python and torch, reads the three models and writes one, and only the merge "
        "math is left to make faster. Where it is close to 0.25×, the target leaves the merge math almost no time. "
        "SLERP reads two models, not three, so it can finish below this floor.",
        f"In-memory path (a candidate merged into a live model, as the searches do): base and task vectors "
        f"loaded once in {inmem['load_once_s']:.2f} s, then per candidate **{per_candidate}**.",
        sources([r]),
    ])


# --- evaluators ----------------------------------------------------------------------------------------------


def render_eval(results: Results) -> str:
    found = results.of("bench_eval")
    if not found:
        return ""
    parts = []
    zoo_runs = [r for r in found if r.get("zoo")]
    for r in zoo_runs:
        z = r.get("zoo")
        s = z["summary"]
        parts.append(f"Small zoo (spec `{z['spec_hash']}`, {z['size']}): one candidate = weight swap + "
                     f"{len(z['objectives'])} objectives × {z['examples_per_objective']} validation examples; medians "
                     f"(`{r.name}`).")
        parts.append(table(["", "hf", "vLLM"], [
            ["seconds per candidate", num(s["hf_candidate_s"], ".2f"), num(s["vllm_candidate_s"], ".2f")],
            ["generation tokens/s", num(s["hf_tokens_per_s"], ".0f"), num(s["vllm_tokens_per_s"], ".0f")],
            ["weight swap (`load_state`), ms", num(s["hf_load_state_s"] * 1e3, ".1f"),
             num(s["vllm_load_state_s"] * 1e3, ".1f")],
            ["reload (a fresh backend), s", num(s["hf_reload_s"], ".3f"), num(s["vllm_reload_s"], ".2f")],
            ["reload / swap (target ≥ 20×)", f"{s['hf_reload_over_swap']:.0f}× — {verdict(s['hf_reload_over_swap'] >= 20)}",
             f"{s['vllm_reload_over_swap']:.0f}× — {verdict(s['vllm_reload_over_swap'] >= 20)}"],
        ]))
        parts.append(f"Scores identical between hf and vLLM for every candidate: {num(all(s['scores_agree']))}.")
    rows = []
    for r in found:
        smol = r.get("smollm2")
        if not smol:
            continue
        command = " ".join(r.get("command") or []) if isinstance(r.get("command"), list) else r.get("command") or ""
        mode = smol.get("vllm_mode") or ("compiled" if "--vllm-compile" in command else "eager")
        for dtype, d in smol["by_dtype"].items():
            s = d["summary"]
            x = s["vllm_over_hf_tokens_per_s"]
            rows.append([f"`{r.label}`", smol["prompts"], smol.get("hf_batch_size") or smol["prompts"], mode, dtype,
                         num(s["hf_tokens_per_s"], ".0f"), num(s["vllm_tokens_per_s"], ".0f"),
                         f"{x:.2f}× — {verdict(x >= 2)}", num(all(s["outputs_identical"])),
                         f"{s['hf_open_over_swap']:.0f}× / {s['vllm_open_over_swap']:.0f}×"])
    parts.append("SmolLM2-135M-Instruct (imported with `hm3 zoo import-smollm2`), greedy chat answers of up to "
                 "64 new tokens; medians over the repetitions:")
    parts.append(table(["results", "prompts", "hf batch", "vLLM", "dtype", "hf tok/s", "vLLM tok/s",
                        "vLLM / hf (target ≥ 2×)", "same outputs", "reload / swap: hf / vLLM (target ≥ 20×)"], rows))
    parts.append(sources(found))
    return "\n\n".join(parts)


def test_suite_targets(results: Results) -> list[Target]:
    out: list[Target] = []
    for kind, x in sorted(_suite_results(results).items()):
        s = x.get("summary")[kind]
        failed = failed_runs(x, kind)  # a failed run's time is not the command's: the target is not met by it
        note = f", {_failed(failed)}" if failed else ""
        if kind == "quick":
            out.append(('`scripts/test.sh -m "not slow"` ≤ 3 minutes', f"{s['current_mean_s']:.0f} s{note}",
                        s["met"] and not failed))
        else:
            out.append((f"`scripts/{'test' if kind == 'suite' else 'demo'}.sh` ≤ 0.5× the baseline's time",
                        ratio(s["ratio"]) + note, s["ratio"] <= 0.5 and not failed))
    return out


def merge_targets(results: Results) -> list[Target]:
    r = results.one("bench_merge")
    if r is None:
        return []
    ratios = r.get("ratios")
    rss = [x["rss_vs_mergekit"] for x in ratios.values()]
    return [*((f"merge ≤ 0.25× mergekit's wall time ({_merge_method_name(k)})", ratio(x["wall_vs_mergekit"], ".3f"),
               x["wall_vs_mergekit"] <= 0.25) for k, x in ratios.items()),
            ("merge peak memory ≤ mergekit's", f"{ratio(min(rss))} to {ratio(max(rss))}", max(rss) <= 1)]


def eval_targets(results: Results) -> list[Target]:
    rows: list[Target] = []
    for r in results.of("bench_eval"):
        z = (r.get("zoo") or {}).get("summary")
        if z:
            rows.append(("weight swap ≥ 20× faster than a reload (small zoo: hf / vLLM)",
                         f"{z['hf_reload_over_swap']:.0f}× / {z['vllm_reload_over_swap']:.0f}×",
                         min(z["hf_reload_over_swap"], z["vllm_reload_over_swap"]) >= 20))
        smol = r.get("smollm2")
        if smol and "float32" in smol["by_dtype"] and "compiled" not in r.label:
            x = smol["by_dtype"]["float32"]["summary"]["vllm_over_hf_tokens_per_s"]
            rows.append((f"vLLM ≥ 2× transformers' tokens/s (SmolLM2, {smol['prompts']} prompts, hf batch "
                         f"{smol.get('hf_batch_size') or smol['prompts']})", ratio(x), x >= 2))
    return rows


def render_lmeval(results: Results) -> str:
    r = results.one("bench_lmeval")
    if r is None:
        return ""
    s = r.get("summary")
    rows = [[str(x["round"]), str(x["candidate"]),
             " / ".join(num(x["hm3"][t], ".3f") for t in r.get("tasks")),
             " / ".join(num(x["lm_eval"][t], ".3f") for t in r.get("tasks")), num(x["equal"]),
             num(x["hm3_s"], ".2f"), num(x["hm3_swap_s"] * 1e3, ".1f"), num(x["lm_eval_s"], ".2f"),
             num(x["lm_eval_reload_s"], ".2f")] for x in r.get("rows")]
    return "\n\n".join([
        f"{r.get('model')}; tasks {', '.join(f'`{t}`' for t in r.get('tasks'))} ({r.get('docs_per_split')} test "
        f"documents each), {r.get('candidates')} candidates × {r.get('rounds')} rounds, batch {r.get('batch_size')}, "
        f"{r.get('threads')} threads (`{r.name}`).",
        table(["round", "candidate", "hm3 score (mc / gen)", "lm-eval score (mc / gen)", "equal", "hm3 s",
               "of it swap, ms", "lm-eval s", "of it reload, s"], rows),
        f"Seconds per candidate: hm3 {num(s['hm3_s_per_candidate'], '.2f')}, lm-eval {num(s['lm_eval_s_per_candidate'], '.2f')}: "
        f"**{ratio(s['ratio'])}**; the model's swap against lm-eval's reload: {num(s['hm3_swap_s'] * 1e3, '.1f')} ms "
        f"against {num(s['lm_eval_reload_s'], '.2f')} s ({ratio(s['swap_to_reload_ratio'], '.4f')}).",
        *([] if all("first" in x for x in r.get("rows")) else [
            "**Order not alternated, to be rerun**: hm3 scored every candidate before lm-eval did, so any drift "
            "of the shared machine or warmth one side leaves the other lands on one side only; the seconds' "
            "ratio may carry that order. (The scores' equality is unaffected.)"]),
        sources([r]),
    ])


def lmeval_targets(results: Results) -> list[Target]:
    r = results.one("bench_lmeval")
    if r is None:
        return []
    return [("lm-eval objectives: hm3's score equals lm-eval's own `HFLM` score (SmolLM2, every candidate and task)",
             num(r.get("summary")["scores_equal"]), bool(r.get("summary")["scores_equal"]))]


# --- level 1 -------------------------------------------------------------------------------------------------


def search_table(r: Result, keys: list[str] | None = None) -> str:
    t = r.get("table")
    budgets = sorted({int(k) for row in t.values() for k in row if k.isdigit()})
    rows = []
    for key, row in t.items():
        if keys is not None and key not in keys:
            continue
        cells = []
        for n in budgets:
            cell = row.get(str(n))
            if cell is None:
                cells.append("")
            elif n in (r.get("budget"), r.get("long_budget")):
                cells.append(f"**{cell['mean']:.3f}** ({cell['min']:.3f}–{cell['max']:.3f})")
            else:
                cells.append(num(cell["mean"]))
        rows.append([f"`{key}`", *cells, num(row["hv_test_front"])])
    return table(["optimiser", *(f"HV@{n}" for n in budgets), "test HV of the final front"], rows)


def search_target(r: Result) -> str:
    t = r.get("target")
    reach = (t.get("evaluations_to_reach_bo_mo") or {}).get("evaluations", {})
    never = f"not within {r.get('long_budget')}"
    reach_text = ", ".join(f"`{k}` {never if v is None else v}" for k, v in reach.items())
    return (f"`bo-mo` at {r.get('budget')} evaluations reaches **{ratio(t['ratio_bo_to_random'])}** the HV of `random` "
            f"and **{ratio(t['ratio_bo_to_nsga2'])}** that of `nsga2` at {r.get('long_budget')} (target ≥ 1× both: "
            f"{verdict(t['met'])}). Evaluations each peer's mean trace needs to reach `bo-mo`'s HV@{r.get('budget')}: "
            f"{reach_text}.")


def render_search(results: Results) -> str:
    parts = []
    for r in results.of("bench_search_param"):
        fisher = [k for k in r.get("table") if "fisher" in k]
        head = (f"**{r.get('validation_examples')} validation examples per task** (`{r.label}`; "
                f"{zoo_text(r.get('zoo_build'))}; seeds {', '.join(map(str, r.get('seeds')))}):")
        if fisher:
            parts += [f"**Fisher weighting** (`{r.label}`, {r.get('validation_examples')} validation examples; DF-Merge's "
                      "diagonal Fisher on DARE-TIES):", search_table(r, ["bo-mo", *fisher])]
            continue
        parts += [head, search_table(r), search_target(r)]
        plot = plot_of(r)
        if plot:
            parts.append(plot)
    found = results.of("bench_search_param")
    if not found:
        return ""
    base = ("OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_search_param.py --zoo runs/zoo-micro "
            "--validation-examples {n} --test-examples 200 --optimizers random,nsga2,bo-mo {ablation} --threads 1 "
            "--quiet --work runs/bsp{n} --out experiments/results/bench_search_param_{label}.json")
    parts.append(sources(found, {
        "v200": base.format(n=200, ablation="--no-fisher-ablation", label="v200"),
        "v64": base.format(n=64, ablation="--no-fisher-ablation", label="v64"),
        "v200_fisher": base.format(n=200, ablation="--no-design-ablation", label="v200_fisher")}))
    return "\n\n".join(parts)


def search_targets(results: Results) -> list[Target]:
    rows = []
    for r in results.of("bench_search_param"):
        t = r.get("target")
        if "ratio_bo_to_random" in t and not any("fisher" in k for k in r.get("table")):
            rows.append((f"level 1: `bo-mo`@{r.get('budget')} ≥ `random`, `nsga2`@{r.get('long_budget')} in HV "
                         f"({r.get('validation_examples')} validation examples)",
                         f"{ratio(t['ratio_bo_to_random'])} / {ratio(t['ratio_bo_to_nsga2'])}", t["met"]))
    return rows


# --- two levels on the zoo -----------------------------------------------------------------------------------


ARM_NAMES = {"level1": "level 1 alone", "both": "both levels", "both-nodar": "both levels, no DAR",
             "level2-only": "level 2 alone (experts, base frame)", "level2-only-nodar": "level 2 alone, no DAR"}


def arm_rows(r: Result) -> list[list[str]]:
    share = r.get("args")["level1_share"]
    rows = []
    for name, t in r.get("table").items():
        seeds = " / ".join(f"{a['hv_validation']:.3f}" for a in r.get("arms")[name])
        l1 = "whole budget" if name == "level1" else ("none" if name.startswith("level2") else f"{share:g}")
        rows.append([ARM_NAMES.get(name, name), l1, f"**{t['hv_validation']:.3f}** ({seeds})", num(t["hv_test_front"]),
                     num(t["full_evaluation_equivalents"], ".1f"), num(t["level2_evaluations"], ".0f"),
                     num(t["level2_examples"], ".0f")])
    return rows


ARM_HEADERS = ["arm", "level-1 share", "HV validation: mean (seeds)", "HV test", "full-evaluation equivalents",
               "level-2 evaluations", "level-2 examples"]


def request_rows(r: Result, run: str, label: str) -> list[list[str]]:
    key = "request" if run == "both" else f"request_{run}_run"
    t = r.get("targets").get(key)
    if not t:
        return []
    rows = [x for x in r.get("requests") if x.get("run", "both") == run]
    below = sum(x["ratio"] < 0.95 for x in rows)
    out = [[label, "budget 0", f"**{t['mean_ratio']:.3f}** / {t['min_ratio']:.3f} ({below} of {len(rows)} < 0.95)",
            f"{t['test']['mean_ratio']:.3f} / {t['test']['min_ratio']:.3f}" if t.get("test") else "–",
            f"{t['mean_seconds_in_process']:.2f} in the process, {t['mean_seconds_cli']:.2f} as a fresh `hm3 request`"]]
    for n, x in (t.get("refined") or {}).items():
        tx = (t.get("test") or {}).get("refined", {}).get(n)
        below_n = sum(q["refined"][n]["ratio"] < 0.95 for q in rows if n in q.get("refined", {}))
        out.append([label, f"`--refine {n}`", f"{x['mean_ratio']:.3f} / {x['min_ratio']:.3f} ({below_n} < 0.95)",
                    f"{tx['mean_ratio']:.3f} / {tx['min_ratio']:.3f}" if tx else "–", f"{x['mean_seconds']:.1f}"])
    return out


def arm_costs(r: Result) -> str:
    """Each DAR level-2 arm's full-evaluation equivalents against level 1 alone's in the same run, as the stores
    counted them ("" without a level-1 arm). The no-DAR arms run the DAR arms' episodes by design."""
    t = r.get("table")
    if "level1" not in t:
        return ""
    l1 = t["level1"]["full_evaluation_equivalents"]
    return ", ".join(f"{ARM_NAMES.get(a, a)} {x['full_evaluation_equivalents']:.1f} "
                     f"({x['full_evaluation_equivalents'] / l1:.2f}×)" for a, x in t.items()
                     if a != "level1" and not a.endswith("nodar"))


def cost_note(r: Result) -> str:
    """What a two-level result says about its arms' costs; for a file planned before the arms were costed
    alike (no ``cost_planning`` in it), that the comparison was not at equal cost and must be rerun."""
    t = r.get("table")
    l1 = t.get("level1", {}).get("full_evaluation_equivalents")
    spent = (f"the level-2 arms with DAR spent {arm_costs(r)} full-evaluation equivalents against level 1 alone's "
             f"{l1:.1f}" if l1 else "this run has no level-1 arm: level 1 alone is another run's")
    if r.get("cost_planning"):
        return f"Costs (`{r.label}`): {spent}."
    flaws = ["costed a DAR episode at the data scale s rather than at the round(s·n)/n of the examples it scores"]
    if any(a.startswith("level2-only") for a in t):
        flaws.insert(0, "charged level 2 alone the reference scores (base and experts) that level 1 alone gets "
                        "outside its budget")
    ablation = (" The DAR ablation's arms run the same episodes with and without DAR, so its ratios are not "
                "affected." if any(a.endswith("nodar") for a in t) else "")
    return (f"**Not at equal cost (`{r.label}`), to be rerun**: its level-2 episodes were planned with an earlier "
            f"accounting, which {' and '.join(flaws)}; {spent}.{ablation}")


def level1_arm(r: Result, found: list[Result]) -> tuple[dict[str, Any], Result] | None:
    """The level-1-alone row ``r`` is judged against, and the result it comes from: ``r``'s own when it has
    that arm (side by side), else the first result that has one."""
    own = [r] if "level1" in r.get("table") else []
    source = next(iter(own + [x for x in found if "level1" in x.get("table")]), None)
    return (source.get("table")["level1"], source) if source is not None else None


def render_two_level(results: Results) -> str:
    found = [r for r in results.of("bench_two_level", r"share\d+")]
    if not found:
        return ""
    parts = [f"{zoo_text(found[0].get('zoo_build'))}; {found[0].get('args')['validation_examples']} validation and "
             f"{found[0].get('args')['test_examples']} test examples per task; budget "
             f"{found[0].get('args')['budget']} full-evaluation equivalents per arm; DAR data scale "
             f"{found[0].get('args')['data_scale']}; T_max {found[0].get('args')['t_max']}; seeds "
             f"{found[0].get('args')['seeds']}."]
    rows = [row for r in found for row in arm_rows(r)]
    parts.append(table(ARM_HEADERS, rows))
    for r in found:
        both = r.get("table").get("both")
        level1 = level1_arm(r, found)
        if both and level1 is not None:
            hv1, own = level1[0]["hv_validation"], level1[1]
            elsewhere = "" if own is r else f" (level 1 alone from `{own.label}`, another run: not side by side)"
            parts.append(f"Level-1 share {r.get('args')['level1_share']:g}: two levels reach HV {both['hv_validation']:.3f} "
                         f"against {hv1:.3f} for level 1 alone{elsewhere} — two levels beating level 1 at equal cost: "
                         f"{verdict(both['hv_validation'] > hv1)}.")
        parts.append(cost_note(r))
    for r in found:
        plot = plot_of(r)
        if plot:
            parts.append(plot)
    req = []
    for r in found:
        share = r.get("args")["level1_share"]
        req += request_rows(r, "both", f"two-level run, level-1 share {share:g}")
        req += request_rows(r, "level1", "level-1 search, whole budget")
    if req:
        ded = next(r.get("targets")["request"] for r in found if "request" in r.get("targets"))
        parts.append(f"**Preference requests** against a dedicated search for the same λ (`df-merge` on Σλf, "
                     f"{found[0].get('args')['dedicated_budget']} merge evaluations, then "
                     f"{found[0].get('args')['dedicated_episodes']} level-2 episodes; "
                     f"{ded['mean_dedicated_seconds']:.0f} s on average): the ratio of Σ_k λ_k f̂_k, over 3 λ × 3 "
                     "seeds; target ≥ 0.95 for each request, in < 5 s.")
        parts.append(table(["runs answering", "answer", "validation: mean / worst", "test: mean / worst", "seconds"],
                           req))
        for r in found:
            for run, key in (("both", "request"), ("level1", "request_level1_run")):
                t = r.get("targets").get(key)
                if t and t.get("dedicated_merges_to_match"):
                    matched = ", ".join("never" if n is None else str(n) for n in t["dedicated_merges_to_match"])
                    parts.append(f"Dedicated-search evaluations needed to match each budget-0 answer "
                                 f"({'level-1 search' if run == 'level1' else 'two-level run'}, `{r.label}`): "
                                 f"{matched} (\"never\": the answer beat all of them).")
    parts.append(sources(found, {
        "share050": "OMP_NUM_THREADS=2 .venv/bin/python experiments/bench_two_level.py --zoo runs/zoo-micro4 "
                    "--validation-examples 128 --test-examples 200 --data-scale 0.05 --t-max 4 --threads 2 --quiet "
                    "--arms level1,both --request-runs both,level1 --retime-cli --work runs/b2l_z4 "
                    "--out experiments/results/bench_two_level_zoo4_level1_requests.json",
        "share075": "OMP_NUM_THREADS=2 .venv/bin/python experiments/bench_two_level.py --zoo runs/zoo-micro4 "
                    "--validation-examples 128 --test-examples 200 --data-scale 0.05 --t-max 4 --threads 2 --quiet "
                    "--arms both --level1-share 0.75 --work runs/b2l_z4_s075 "
                    "--out experiments/results/bench_two_level_zoo4_share075.json"}))
    return "\n\n".join(parts)


def two_level_targets(results: Results) -> list[Target]:
    rows = []
    found = results.of("bench_two_level", r"share\d+")
    for r in found:
        both = r.get("table").get("both")
        level1 = level1_arm(r, found)
        if both and level1 is not None:
            l1, own = level1
            cost = both["full_evaluation_equivalents"] / l1["full_evaluation_equivalents"]
            caveats = ([] if r.get("cost_planning") else [f"at {cost:.2f}× level 1's cost: rerun"]) + (
                [] if own is r else [f"level 1 from `{own.label}`, another run"])
            rows.append((f"two levels beat level 1 alone at equal cost (micro zoo, level-1 share "
                         f"{r.get('args')['level1_share']:g})",
                         f"HV {both['hv_validation']:.3f} vs {l1['hv_validation']:.3f}"
                         + (f" ({'; '.join(caveats)})" if caveats else ""),
                         both["hv_validation"] > l1["hv_validation"]))
    for r in found:
        for key, what in (("request", f"two-level run, share {r.get('args')['level1_share']:g}"),
                          ("request_level1_run", "level-1 search")):
            t = r.get("targets").get(key)
            if t:
                rows.append((f"budget-0 request ≥ 0.95 of a dedicated search, each ({what})",
                             f"mean {t['mean_ratio']:.3f}, worst {t['min_ratio']:.3f}", t["min_ratio"] >= 0.95))
                rows.append((f"budget-0 request < 5 s as a fresh process ({what})",
                             f"{t['mean_seconds_cli']:.2f} s on average", t["mean_seconds_cli"] < 5))
    return rows


def render_dar(results: Results) -> str:
    r = results.one("bench_two_level", "dar")
    if r is None:
        return ""
    a = r.get("args")
    parts = [f"{zoo_text(r.get('zoo_build'))}; {a['validation_examples']} validation examples per task, DAR data "
             f"scale {a['data_scale']}, level-1 share {a['level1_share']:g}, budget {a['budget']} full-evaluation "
             f"equivalents, seeds {a['seeds']}.", table(ARM_HEADERS, arm_rows(r)), cost_note(r)]
    for arm in ("both", "level2-only"):
        d = r.get("targets").get(f"dar_{arm}")
        if d:
            met = d["level2_example_reduction"] >= 10 and d["hv_loss_fraction"] <= 0.02
            target = f" (target ≥ 10× for ≤ 2%: {verdict(met)})" if arm == "both" else ""
            parts.append(f"DAR, {ARM_NAMES[arm]}: **{d['level2_example_reduction']:.1f}× fewer level-2 examples** for "
                         f"{d['hv_loss_fraction']:.1%} of the HV{target}.")
    plot = plot_of(r)
    if plot:
        parts.append(plot)
    parts.append(sources([r], {"dar": "OMP_NUM_THREADS=1 .venv/bin/python experiments/bench_two_level.py "
                                      "--zoo runs/zoo-micro --validation-examples 128 --test-examples 200 "
                                      "--data-scale 0.05 --t-max 4 --threads 1 --quiet --work runs/bench_two_level_full "
                                      "--out experiments/results/bench_two_level_full_v128.json"}))
    return "\n\n".join(parts)


def dar_targets(results: Results) -> list[Target]:
    r = results.one("bench_two_level", "dar")
    d = r.get("targets").get("dar_both") if r else None
    if not d:
        return []
    return [("DAR: ≥ 10× fewer level-2 examples for ≤ 2% HV loss",
             f"{d['level2_example_reduction']:.1f}× for {d['hv_loss_fraction']:.1%}",
             d["level2_example_reduction"] >= 10 and d["hv_loss_fraction"] <= 0.02)]


# --- the level-2 bound ---------------------------------------------------------------------------------------


def render_ceiling(results: Results) -> str:
    found = results.of("level2_ceiling")
    if not found:
        return ""
    runs = {r.label.split("_")[0]: r for r in results.of("bench_two_level", r"share\d+")}
    alone = {a["seed"]: a["hv_validation"] for a in runs["share050"].get("arms")["level1"]} if "share050" in runs else {}
    rows, by_split = [], {}
    for r in found:
        split, seed = r.label.split("_")
        seed_n = int(seed[1:])
        run = runs.get(split)
        as_run = next((a["hv_validation"] for a in run.get("arms")["both"] if a["seed"] == seed_n), None) if run else None
        best = r.get("hv_union_best_k_paths")
        row = [f"{int(split[5:]) / 100:g} ({r.get('level1')['merges']} merges)", seed_n, num(alone.get(seed_n)),
               num(r.get("level1")["hv_validation"]), num(as_run), num(best.get("6")), num(best.get("12")),
               f"{r.get('hv_union'):.3f} ({r.get('path_evaluations')})"]
        rows.append(row)
        by_split.setdefault(split, []).append((alone.get(seed_n), r.get("level1")["hv_validation"], r.get("hv_union")))
    parts = [table(["level-1 share", "seed", "level 1 alone (whole budget)", "both: its merges", "both: as run",
                    "+ best 6 paths", "+ best 12 paths", "+ every path of ≤ 2 hops (full evaluations)"], rows)]
    for split, xs in by_split.items():
        a, m, u = (mean(x[i] for x in xs if x[i] is not None) for i in range(3))
        parts.append(f"Level-1 share {int(split[5:]) / 100:g}: every short path lifts the mean HV from {m:.3f} to "
                     f"{u:.3f}, against {a:.3f} for level 1 alone — it closes {(u - m) / (a - m):.0%} of the gap.")
    longer = [(r, r.get("longer_paths_sample")) for r in found if r.get("longer_paths_sample")]
    for r, s in longer:
        parts.append(f"Longer paths (`{r.label}`): {s['path_evaluations']} random paths of {s['hops'][0]}–{s['hops'][1]} "
                     f"hops ({s['per_frame']} per frame): {s['union_front_longer_paths']} reached the union front; HV "
                     f"{s['hv_union_with_longer']:.3f}.")
    reruns = sorted({f"`{runs[split].get('args')['work']}`" for r in found
                     for split in [r.label.split("_")[0]]
                     if split in runs and Path(str(r.get("run"))).parent != Path(runs[split].get("args")["work"])})
    if reruns:
        parts.append(f"\"both: as run\" is from the current two-level results ({', '.join(reruns)}), which rerun "
                     "the runs the bounds were computed on (the file names below) with level 2 planned at level 1 "
                     "alone's cost; their level-1 merges, which frame the paths, are the same merges.")
    unequal = [f"`{r.label}`" for r in runs.values() if not r.get("cost_planning")]
    if unequal:
        parts.append(f"\"both: as run\" comes from {' and '.join(unequal)}, whose level-2 episodes were not planned "
                     "at level 1 alone's cost (above); the level-1 merges the paths are framed by are unaffected.")
    commands = {f"share{s}_s{n}": (f"OMP_NUM_THREADS=1 .venv/bin/python experiments/level2_ceiling.py "
                                   f"runs/{'b2l_z4' if s == '050' else 'b2l_z4_s075'}/both-s{n} --t-max 2 --threads 1"
                                   + (" --longer 100 --longer-t-max 4" if (s, n) == ("050", 0) else ""))
                for s in ("050", "075") for n in range(3)}
    parts.append(sources(found, commands))
    return "\n\n".join(parts)


# --- SmolLM2 -------------------------------------------------------------------------------------------------

_RUN = ".venv/bin/python experiments/real_model_run.py"
_PRIOR = "--rl path_prior=frame-order --rl epsilon=0.05"
_KEEP3 = f"--offline-episodes 48 --online-episodes 16 {_PRIOR} --level2 keep_best=3 --name prior-long-keep3"
_OUT = "--out experiments/results/real_model_run"
#: the commands of the SmolLM2 results files that predate recorded command lines, by label
SMOL_COMMANDS = {
    "hf": f"OMP_NUM_THREADS=2 {_RUN}",
    "vllm": f"OMP_NUM_THREADS=2 {_RUN} --backend vllm {_OUT}_vllm.json",
    "hf-rmm": f"OMP_NUM_THREADS=2 {_RUN} --mode rmm {_OUT}_rmm.json",
    "hf-long": f"OMP_NUM_THREADS=1 {_RUN} --mode hm3 --name long --offline-episodes 48 --online-episodes 16 "
               f"{_OUT}_hm3_long.json",
    "hf-rmm-long": f"OMP_NUM_THREADS=1 {_RUN} --mode rmm --name long --offline-episodes 48 --online-episodes 16 "
                   f"{_OUT}_rmm_long.json",
    "hf-prior": f"{_RUN} --name prior {_PRIOR} {_OUT}_hm3_prior.json",
    "hf-prior-m05": f"{_RUN} --name prior-m05 {_PRIOR} --rl critic_margin=0.05 {_OUT}_hm3_prior_m05.json",
    "hf-prior-long": f"{_RUN} --name prior-long {_PRIOR} --offline-episodes 48 --online-episodes 16 "
                     f"{_OUT}_hm3_prior_long.json",
    "hf-prior-long-keep3": f"{_RUN} {_KEEP3} {_OUT}_hm3_prior_long_keep3_s0_resumed.json",
    "hf-prior-long-keep3-s1": f"OMP_NUM_THREADS=2 {_RUN} {_KEEP3} --seed 1 {_OUT}_hm3_prior_long_keep3_s1.json",
    "hf-prior-long-keep3-s2": f"OMP_NUM_THREADS=2 {_RUN} {_KEEP3} --seed 2 {_OUT}_hm3_prior_long_keep3_s2.json",
    "hf-level1-eq38": f"OMP_NUM_THREADS=2 {_RUN} --level1-only --budget 38 --name eq38 {_OUT}_level1_eq38.json",
    "hf-level1-eq-s1": f"OMP_NUM_THREADS=2 {_RUN} --level1-only --budget 39 --name eq --seed 1 {_OUT}_level1_eq_s1.json",
    "hf-level1-eq-s2": f"OMP_NUM_THREADS=2 {_RUN} --level1-only --budget 38 --name eq --seed 2 {_OUT}_level1_eq_s2.json",
    "hf-l1-24-keep3": f"{_RUN} --budget 24 --offline-episodes 16 --online-episodes 8 {_PRIOR} --level2 keep_best=3 "
                      f"--name l1-24-keep3 {_OUT}_hm3_l1_24_keep3.json",
}


def request_seconds(r: Result) -> str:
    """Seconds of the fresh `hm3 request` process, and of the answer inside it (from its own report)."""
    request = r.get("request") or {}
    inside = re.search(r"evaluations?, ([\d.]+) s ->", request.get("stdout", ""))
    return f"{r.get('seconds')['hm3_request']:.1f} / {inside[1] if inside else '–'}"


def front_levels(r: Result) -> str:
    levels = r.get("summary").get("front_levels") or {}
    return f"{levels.get('1', 0)} / {levels.get('2', 0)}"


def rl_settings(r: Result) -> dict[str, Any]:
    return ((r.get("config") or {}).get("level2") or {}).get("rl") or {}


def render_smol_product(results: Results) -> str:
    found = results.of("real_model_run", r"hf|vllm|hf-rmm")
    if not found:
        return ""
    refs = found[0].get("references_validation")
    names = [o.split(":")[1] for o in found[0].get("config")["objectives"]]
    parts = [f"Validation scores of the reference models ({found[0].get('args')['validation_examples']} examples "
             "per task):", table(["model", *names], [[k, *(num(x) for x in v)] for k, v in refs.items()])]
    rows = []
    for r in found:
        checks = r.get("export_checks") or []
        s = r.get("summary")
        rows.append([f"`{r.label}`", r.get("config")["evaluation"]["backend"], rl_settings(r).get("mode", "hm3"),
                     num(r.get("seconds")["hm3_run"], ".0f"), front_levels(r),
                     f"{s['hv_validation']:.3f} / {s['hv_test_front']:.3f}",
                     f"{sum(c['equal'] for c in checks)} of {len(checks)}", num((r.get("request") or {}).get("equal")),
                     request_seconds(r), num(r.get("children_peak_rss_mib") / 1024, ".1f")])
    parts.append(table(["run", "backend", "level-2 mode", "`hm3 run` s", "front: level 1 / level 2",
                        "HV validation / test", "exported points score as stored", "request answer scores as stored",
                        "request s: fresh process / answer", "children's peak RSS GiB"], rows))
    parts.append(sources(found, SMOL_COMMANDS))
    return "\n\n".join(parts)


MODE_RUNS = ("hf", "hf-long", "hf-rmm", "hf-rmm-long", "hf-prior", "hf-prior-m05", "hf-prior-long",
             "hf-prior-long-keep3")


def render_smol_modes(results: Results) -> str:
    found = [r for r in (results.one("real_model_run", label) for label in MODE_RUNS) if r is not None]
    if not found:
        return ""
    rows = []
    for r in found:
        rl, level2, s = rl_settings(r), r.get("config")["level2"], r.get("summary")
        episodes = f"{rl['offline_episodes']} + {rl['online_episodes']} × {level2['preferences']}"
        answer = (r.get("request") or {}).get("answer", "–")
        rows.append([f"`{r.label}`", rl.get("mode", "hm3"), rl.get("path_prior", "none"), rl.get("epsilon", "–"),
                     rl.get("critic_margin", "default"), level2.get("keep_best", "–"), episodes, front_levels(r),
                     f"{s['hv_validation']:.3f} ({num(s.get('hv_validation_level1'))} / {num(s.get('hv_validation_level2'))})",
                     num(s["hv_test_front"]), answer])
    return "\n\n".join([
        table(["run", "mode", "path prior", "ε", "critic margin", "keep_best", "episodes: offline + online × λ",
               "front: level 1 / level 2", "HV validation (level-1 points / level-2 points)", "HV test",
               "budget-0 answer (math=0.7, code=0.3)"], rows),
        sources(found, SMOL_COMMANDS),
    ])


def render_smol_ablation(results: Results) -> str:
    r = results.one("real_model_ablation")
    if r is None:
        return ""
    rows = []
    for x in r.get("rows"):
        hv, ht, vs = x["hv_validation"], x["hv_test_front"], x["validation_seconds"]
        rows.append([x["seed"], x["level1_budget_alone"],
                     f"{x['two_level']['level1_evaluations']} + {x['two_level']['path_equivalents']:g}",
                     f"**{hv['level1_alone']:.3f}**" if hv["level1_alone"] >= hv["both"] else num(hv["level1_alone"]),
                     f"{hv['both']:.3f} ({hv['both_level1_part']:.3f} / {hv['both_level2_part']:.3f})",
                     num(ht["level1_alone"]), num(ht["both"]), f"{vs['level1_alone']:.0f} / {vs['both']:.0f}"])
    s = r.get("summary")
    rows.append(["mean", "", "", f"**{s['hv_validation']['level1_alone']:.3f}**", num(s["hv_validation"]["both"]),
                 num(s["hv_test_front"]["level1_alone"]), num(s["hv_test_front"]["both"]), ""])
    parts = [table(["seed", "level 1 alone: merges", "two levels: merges + path equivalents",
                    "HV validation: level 1 alone", "two levels (level-1 / level-2 points)", "HV test: level 1 alone",
                    "two levels", "validation scoring s: alone / two levels"], rows),
             f"Two levels beat level 1 alone on validation on {s['seeds_where_both_wins_validation']} of "
             f"{len(r.get('rows'))} seeds (target: on average — {verdict(s['both_beats_level1_alone_validation'])})."]
    small = results.one("real_model_run", "hf-l1-24-keep3")
    extra = [r]
    if small:
        cost = small.get("cost")
        s2 = small.get("summary")
        parts.append(f"A smaller level-2 share (seed 0, `{small.label}`): {cost['merge']['full_evaluation_equivalents']:g}"
                     f" merges + {cost['path']['full_evaluation_equivalents']:g} path equivalents reach HV "
                     f"{s2['hv_validation']:.3f} on validation (level-1 points {s2['hv_validation_level1']:.3f}) and "
                     f"{s2['hv_test_front']:.3f} on test.")
        extra.append(small)
    parts.append(sources(extra, {"": "python experiments/real_model_ablation.py --pairs TWO_S0.json:ONE_S0.json,"
                                      "TWO_S1.json:ONE_S1.json,TWO_S2.json:ONE_S2.json (the runs below)",
                                  **SMOL_COMMANDS}))
    pairs = results.of("real_model_run", r"hf-prior-long-keep3(-s\d)?|hf-level1-eq.*")
    parts.append("The pairs (two levels, then level 1 alone with the two-level run's cost as its budget):\n\n"
                 + sources(pairs, SMOL_COMMANDS))
    return "\n\n".join(parts)


def smol_targets(results: Results) -> list[Target]:
    r = results.one("real_model_ablation")
    if r is None:
        return []
    s = r.get("summary")
    return [("two levels beat level 1 alone at equal cost (SmolLM2-135M, 3 seeds)",
             f"HV {s['hv_validation']['both']:.3f} vs {s['hv_validation']['level1_alone']:.3f}",
             s["both_beats_level1_alone_validation"])]


# --- robustness ----------------------------------------------------------------------------------------------


def render_red_team(results: Results) -> str:
    r = results.one("red_team")
    if r is None:
        return ""
    rows = [[g, f"{x['handled']} of {x['cases']}"] for g, x in r.get("by_group").items()]
    rows.append(["**all**", f"**{r.get('handled')} of {r.get('cases')}**"])
    return "\n\n".join([table(["group", "handled"], rows), sources([r])])


def render_sandbox(results: Results) -> str:
    r = results.one("red_team_sandbox")
    if r is None:
        return ""
    rows = [[f"`{m['mode']}`", f"{len(m['fake_passes'])} of {m['tricks']}", num(m["genuine_solution_passes"]),
             f"{len(m['escapes'])} of {m['attacks']}" + (f": {', '.join(m['escapes'])}" if m["escapes"] else "")]
            for m in r.get("modes")]
    return "\n\n".join([table(["mode", "fake passes", "a genuine solution passes", "escapes"], rows), sources([r])])


# --- the compositional benchmark ---------------------------------------------------------------------------


COMPOSITIONAL = ("composite", "math", "language")


def compositional_seed_verdict(seed: str, arms: dict[str, Any]) -> str:
    """One seed against the targets: HV of two levels against level 1 alone on both splits, and the best
    composite score two levels found against the best level-1 merge's (the +0.05 target)."""
    two, one = arms["two_levels"], arms["level1_alone"]
    beats = {split: two[f"hv_{split}"] > one[f"hv_{split}"] for split in ("validation", "test")}
    lift = two["best_composite"]["validation"] - one["best_composite"]["validation"]
    return (f"Seed {seed}: two levels {'beat' if all(beats.values()) else 'do not beat'} level 1 alone in HV "
            f"(validation {num(two['hv_validation'])} vs {num(one['hv_validation'])}, test "
            f"{num(two['hv_test'])} vs {num(one['hv_test'])}); their best composite score is "
            f"{lift:+.3f} against level 1 alone's on validation (target +0.05: "
            f"{verdict(lift >= 0.05)}).")


CPU_FLOAT32 = {"device": "cpu", "dtype": "float32", "batch_size": 32}


def level2_alone_short(arms: dict[str, Any]) -> bool:
    """Whether a seed's level-2-alone arm ran the two-level run's episode counts (the plan before it was
    given that run's whole cost: with no level-1 stage it then spent only the two-level run's level-2 share)."""
    if not {"two_levels", "level2_alone"} <= set(arms):
        return False
    episodes = [arms[a]["config"]["level2"]["rl"]["offline_episodes"] for a in ("two_levels", "level2_alone")]
    return episodes[0] == episodes[1] and arms["two_levels"]["level1_evaluations"] > 0


def render_compositional(results: Results) -> str:
    """The build's score matrix, then each finished arm of the ablation (a partial report while it runs)."""
    found = results.of("compositional_ablation", "(partial)?")
    if not found:
        return ""
    r = found[-1] if len(found) == 1 else next(x for x in found if x.label == "")
    matrix = r.get("score_matrix")
    ev = r.get("evaluation")  # absent from results made before devices were an option: cpu, float32
    where = f"; scored in {ev['dtype']} on {ev['device']}" if ev and ev != CPU_FLOAT32 else ""
    parts = [f"Score matrix of the build (first {r.get('settings')['validation_examples']} validation and "
             f"{r.get('settings')['test_examples']} test examples{where}; composite and math: exact match, "
             "language: chrF/100):",
             table(["model", *(f"{t}, validation" for t in COMPOSITIONAL), *(f"{t}, test" for t in COMPOSITIONAL)],
                   [[model, *(num(row["validation"][f"compositional:{t}"]) for t in COMPOSITIONAL),
                     *(num(row["test"][f"compositional:{t}"]) for t in COMPOSITIONAL)]
                    for model, row in matrix.items()])]
    build = r.get("build") or {}
    seconds = build.get("seconds", {})
    if seconds:
        parts.append("Build cost: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in seconds.items())
                     + f" (`{build.get('command')}`, {build.get('date')}, commit `{build.get('commit', '')[:7]}`).")
    rows, short = [], []
    for seed, arms in r.get("per_seed").items():
        if level2_alone_short(arms):
            short.append(seed)
        for arm, a in arms.items():
            name = arm.replace("_", " ") + (" (†)" if arm == "level2_alone" and seed in short else "")
            rows.append([seed, name, num(a["hv_validation"]), num(a["hv_test"]),
                         num(a["best_composite"]["validation"]), num(a["best_composite"]["test"]),
                         num(a["cost_equivalents"], ".1f")])
    if r.label == "partial":
        done = [seed for seed, arms in r.get("per_seed").items() if {"two_levels", "level1_alone"} <= set(arms)]
        # a partial record is a snapshot: the page cannot know whether the ablation still runs, only when it was taken
        parts.append(f"**The ablation is unfinished**: the arms it had finished by {r.date} "
                     "(it resumes per arm and per evaluation: `python experiments/compositional/ablation.py "
                     "--work runs/compositional --seeds 0,1,2`). "
                     f"The targets ask for 3 of 3 seeds; {len(done)} "
                     f"{'has' if len(done) == 1 else 'have'} both two levels and level 1 alone.")
        parts.extend(compositional_seed_verdict(seed, r.get("per_seed")[seed]) for seed in done)
    parts.append(table(["seed", "arm", "HV validation", "HV test", "best composite, validation", "its test score",
                        "cost (full evaluations)"], rows))
    if short:
        parts.append("(†) **Not at equal cost, to be rerun**: level 2 alone ran the two-level run's episode counts, "
                     "so with no level-1 stage it spent only that run's level-2 share of the budget (the cost column); "
                     "it is now planned at the two-level run's whole cost. Rerun: remove `seed-S/level2_alone*` "
                     "under `runs/compositional/ablation/`, then `python experiments/compositional/ablation.py "
                     "--work runs/compositional --seeds 0,1,2`.")
    if r.label == "partial":
        swaps = next((arms["swaps"] for arms in r.get("per_seed").values() if "swaps" in arms), None)
        if swaps:
            parts.append("The layer swaps, (k₁, k₂) = the language expert's bottom k₁ and top k₂ layers in the math "
                         "expert (validation; composite / math / language):\n\n" + table(
                             ["swap", "composite", "math", "language", "composite, test"],
                             [[k, *(num(x) for x in v["validation"]), num(v["test"][0])]
                              for k, v in swaps["swaps"].items()]))
    parts.append(sources([r]))
    return "\n\n".join(parts)


# --- mutation testing ----------------------------------------------------------------------------------------


MUTATION_TARGET = 0.85
MUTATED_MODULES = ("hm3/merge/ops.py", "hm3/merge/methods.py", "hm3/merge/plan.py", "hm3/search/pareto.py",
                   "hm3/search/space.py", "hm3/eval/subsets.py")


def render_mutation(results: Results) -> str:
    """Per module: mutants, kills (those found only by the fresh-process recheck apart), the score."""
    r = results.one("mutation")
    if r is None:
        return ""
    modules = r.get("modules")
    rows = []
    for name in MUTATED_MODULES:
        m = modules.get(name)
        if m is None:
            rows.append([f"`{name}`", "not run", "", "", "", "", ""])
            continue
        rows.append([f"`{name}`", f"`{m['commit']}`", str(m["mutants"]), str(m["killed"]),
                     str(len(m.get("killed_on_recheck", []))), str(len(m["survived"])),
                     f"{m['score']:.1%} " + verdict(m["score"] >= MUTATION_TARGET)])
    parts = [table(["module", "commit", "mutants", "killed", "of them on the recheck", "survivors",
                    f"score (≥ {MUTATION_TARGET:.0%})"], rows)]
    judged = r.get("equivalent_survivors") or {}
    notes = [f"- `{name}`, {what}: {why}" for name, found in judged.items() for what, why in found.items()]
    if notes:
        parts.append("Survivors judged equivalent (counted as survivors all the same):\n\n" + "\n".join(notes))
    parts.append(sources([r]))
    return "\n\n".join(parts)


def mutation_targets(results: Results) -> list[Target]:
    r = results.one("mutation")
    modules = r.get("modules") if r is not None else {}
    return [(f"mutation score of `{name}` ≥ {MUTATION_TARGET:.0%}", f"{modules[name]['score']:.1%}",
             modules[name]["score"] >= MUTATION_TARGET) for name in MUTATED_MODULES if name in modules]


# --- parallel evaluation -------------------------------------------------------------------------------------


def render_parallel(results: Results) -> str:
    parts = []
    t = results.one("bench_parallel", "throughput")
    if t is not None:
        rows = [[name, num(row["evaluations_per_second"], ".2f"), num(row["loop_seconds"], ".1f"),
                 num(row.get("worker_busy_seconds", row["loop_seconds"]) / row["evaluations"], ".2f"),
                 num(row["startup_seconds"], ".1f"), num(row["reference_seconds"], ".1f"),
                 f"{row['worker_idle_share']:.1%}" if "worker_idle_share" in row else "–"]
                for name, row in t.get("setups").items()]
        target = t.get("target")
        parts += [f"**Throughput** ({t.get('evaluations')} `random` candidates per set-up, "
                  f"{t.get('validation_examples')} validation examples per task; {zoo_text(t.get('zoo_build'))}; "
                  f"load average {t.get('load_average_start')[0]:g} at the start and {t.get('load_average_end')[0]:g} "
                  "at the end, on 2 cores shared with other jobs):",
                  table(["set-up", "evaluations / s", "loop s", "s an evaluator spends per evaluation",
                         "start-up s (not in the rate)",
                         "reference scores s (not in the rate)", "worker idle share"], rows),
                  f"2 Ray workers against one 1-thread local evaluator: **{ratio(target['speedup_vs_local_1_thread'])}**; "
                  f"against one 2-thread local evaluator: **{ratio(target['speedup_vs_local_2_threads'])}**. "
                  "A Ray worker's seconds per evaluation are those it measured itself; where they exceed the 1-thread "
                  "local evaluator's, the workers ran slower each than one process alone did, which is the share of "
                  "the 2 cores the other jobs left them."]
    h = results.one("bench_parallel", "hv")
    if h is not None:
        q, budget = h.get("q"), h.get("budget")
        by_arm: dict[int, list[dict[str, Any]]] = {}
        for run in h.get("runs"):
            by_arm.setdefault(run["q"], []).append(run)
        rows = [["sequential (q = 1)" if arm == 1 else f"q = {arm}",
                 f"**{h.get('hv_at_budget')[str(arm)]['mean']:.3f}** ("
                 + " / ".join(f"{r['hv_trace_validation'][budget - 1]:.3f}" for r in runs) + ")",
                 num(mean(r["loop_seconds"] / r["evaluations"] for r in runs), ".1f")]
                for arm, runs in sorted(by_arm.items())]
        parts += [f"**Hypervolume per evaluation** (`bo-mo`, {budget} evaluations, seeds "
                  f"{', '.join(map(str, h.get('seeds')))}, {h.get('validation_examples')} validation examples per "
                  f"task; {zoo_text(h.get('zoo_build'))}). Driven by {h.get('driver')}:",
                  table(["arm", f"HV@{budget}: mean (seeds)", "s per evaluation (BO step included; runs in parallel on the shared machine)"], rows),
                  f"q = {q} reaches **{ratio(h.get('target')['ratio_q_to_sequential'])}** of sequential `bo-mo`'s "
                  "mean HV at the same number of evaluations."]
        plot = plot_of(h)
        if plot:
            parts.append(plot)
    i = results.one("bench_parallel", "idle")
    if i is not None:
        parts += idle_parts(i, f"{i.get('validation_examples')} validation examples per task; "
                               f"{zoo_text(i.get('zoo_build'))}", "a micro-zoo candidate")
    smol = results.one("bench_parallel", "idle-smollm2")
    if smol is not None:
        pool = smol.get("pool")
        parts += idle_parts(smol, f"{smol.get('validation_examples')} validation examples per task; base "
                               f"{pool['base']}, experts synthetic variants of it "
                               f"({pool['experts']['math'].removeprefix('synthetic: ').rsplit(', seed', 1)[0]}, "
                               "one seed each): their scores mean nothing, only what scoring a 135M-parameter model "
                               "costs",
                            "a SmolLM2 candidate")
    found = [r for r in (t, h, i, smol) if r is not None]
    if not found:
        return ""
    parts.append(sources(found))
    return "\n\n".join(parts)


def idle_parts(i: Result, setting: str, candidate: str) -> list[str]:
    """The idle-share table of one ``bench_parallel --part idle`` result, and what it shows."""
    rows = [[f"`{mode}`", f"{run['worker_idle_share']:.1%}" if "worker_idle_share" in run else "–",
             num(run["evaluations_per_second"], ".3f"), num(run["worker_busy_seconds"] / run["evaluations"], ".2f"),
             num(run["proposal_seconds"] / max(1, run["asks"]), ".2f"), num(run["loop_seconds"], ".0f")]
            for mode, run in i.get("runs").items()]
    share = i.get("target")["async_idle_share"]
    run = i.get("runs")["async"]
    ask_ratio = (run["proposal_seconds"] / max(1, run["asks"])) / (run["worker_busy_seconds"] / run["evaluations"])
    bottleneck = ("so where the asks are the bottleneck, as here, it ends later" if ask_ratio >= 0.5 else
                  "a cost that stays hidden while the asks are shorter than the workers' turns")
    return [f"**Worker idle time** (`bo-mo`, {i.get('budget')} evaluations, seed 0, 2 Ray workers of 1 CPU, "
            f"{setting}; load average {i.get('load_average_start')[0]:g} at the start and "
            f"{i.get('load_average_end')[0]:g} at the end). In `batch` mode a worker waits while the driver proposes "
            "the next batch; with `async` the next point is proposed in a thread of its own while the workers score, "
            "so a worker waits only when proposing takes longer than its share of the workers' turn:",
            table(["proposals", "worker idle share", "evaluations / s", "s a worker is busy per evaluation",
                   "s per ask (the driver proposing)", "loop s"], rows),
            f"With asynchronous proposals the workers wait **{share:.1%}** of their time "
            f"(target < {i.get('target')['threshold']:.0%}). There an ask of `bo-mo` (fitting its GPs and "
            f"optimising the acquisition) took {ask_ratio:.2f}× a worker's evaluation of {candidate}, "
            "and one driver proposes for two workers (and shares the 2 cores with them); the share falls as "
            "evaluations get dearer against the asks. `async` asks once per "
            f"point ({run['asks']} asks) where `batch` asks once per batch ({i.get('runs')['batch']['asks']}), "
            f"{bottleneck}."]


def parallel_targets(results: Results) -> list[Target]:
    rows: list[Target] = []
    t = results.one("bench_parallel", "throughput")
    if t is not None:
        target = t.get("target")
        rows.append((f"2 one-thread Ray workers ≥ {target['threshold']:g}× the evaluations/s of one one-thread local "
                     "evaluator (shared machine)", ratio(target["speedup_vs_local_1_thread"]), target["met"]))
    h = results.one("bench_parallel", "hv")
    if h is not None:
        target = h.get("target")
        rows.append((f"`bo-mo` with q = {h.get('q')} ≥ {target['threshold']:g}× sequential `bo-mo`'s HV at "
                     f"{h.get('budget')} evaluations", ratio(target["ratio_q_to_sequential"]), target["met"]))
    i = results.one("bench_parallel", "idle")
    if i is not None:
        target = i.get("target")
        rows.append((f"Ray workers' idle share with asynchronous proposals < {target['threshold']:.0%} "
                     "(micro zoo: an ask costs more than an evaluation)",
                     f"{target['async_idle_share']:.1%}", target["met"]))
    smol = results.one("bench_parallel", "idle-smollm2")
    if smol is not None:
        target = smol.get("target")
        rows.append((f"Ray workers' idle share with asynchronous proposals < {target['threshold']:.0%} "
                     "(SmolLM2-135M pool, synthetic experts)", f"{target['async_idle_share']:.1%}", target["met"]))
    return rows


# --- the page --------------------------------------------------------------------------------------------------


SECTIONS: list[Section] = [
    Section(
        "The shipped micro zoo",
        "The tiny base and experts every default path runs on (`hm3/zoo/shipped/micro`). Training depends on the "
        "CPU's float kernels, so hm3 ships this one build (made on the project's 2-core AMD EPYC machine) instead "
        "of a recipe to retrain; `tests/zoo/test_shipped_zoo.py` rescores it on the machine at hand and checks every "
        "score against the manifest. The quality bar asks for specialised experts, a base below each expert, and "
        "a merge that keeps at least half of every expert's gain: the conditions under which searching merges and "
        "layer paths has something to find. The numbers below are read from the manifest.",
        render_shipped_zoo),
    Section(
        "Zoo recipe variants",
        "`hm3 zoo build`'s default recipe (`deep`) for seeds 0-4, then what was tried on the way: the shipped micro "
        "recipe with other seeds, cheaper schedules (fewer steps, smaller models or batches), and 4-layer variants "
        "in which each task's specialist skill is mostly left out of the base. Each row is a full `hm3 zoo build`; "
        "the bar is judged on validation, and the test columns show how it holds on examples the choice never saw. "
        "Build seconds depend on the load of a shared machine.",
        render_zoo_variants, targets=zoo_recipe_targets),
    Section(
        "How sure a zoo's quality-bar verdict is",
        "The bar is judged on 200 validation examples per task. `experiments/zoo_bar_noise.py` scores a build's "
        "base, experts and the bar's chosen merge on them again (the scores must equal its `zoo.json`), then "
        "resamples the examples with replacement, the same draw for every model, and judges the bar on each "
        "resample with the merge held fixed. What it measures is how much of a verdict the choice of examples "
        "decides; how the weights vary with the seed is the variants' table above.",
        render_zoo_bar_noise),
    Section(
        "How an expert's gain grows with the scale of its task vector",
        "The bar's grid gives each expert a weight of at most 0.55 and asks the merge to keep at least half of its "
        "gain. `experiments/zoo_gain_scaling.py` scores each task's expert alone at scale α (θ_base + α·τ, the "
        "bar's own TIES with one model) on the bar's validation examples. At the merge's own weight, the lone "
        "expert is what the merge would keep with no other expert present; the merge's share beside it shows "
        "what the other experts take away or add.",
        render_zoo_gain_scaling),
    Section(
        "The README's two commands",
        "`scripts/test.sh` and `scripts/demo.sh` timed for one commit against a baseline commit, each in a fresh "
        "clone with its own `.venv` (set up untimed) and its own torch extension cache, alternating between the two "
        "clones so that machine noise hits both alike; each demo runs into a fresh folder with the clone's `runs/` "
        "removed, as on a fresh machine.",
        render_test_suite, targets=test_suite_targets),
    Section(
        "Merge engine: hm3 against mergekit",
        "`hm3 merge` and `mergekit-yaml` on the same recipes, alternating after a warm-up run: TIES and DARE-TIES "
        "(weights 0.6 / 0.4, density 0.5), DELLA (the same, ε 0.1; DELLA-linear too when `--methods` lists it), SLERP (t 0.4, base and one "
        "model), float32. hm3 runs the random methods twice per round, with the default mask generator (`mt19937`, "
        "the draw of every stored recipe) and with `mask_rng: sfc64`. Each run is its own process, with its peak "
        "RSS from `wait4`, and writes a fresh directory (the previous output is removed first, untimed, for every tool); the floor reads the three models and writes one with a single elementwise operation, in "
        "the same rounds. TIES needs only the k-th largest |τ|, so hm3 finds it by radix selection over the float32 "
        "bit patterns instead of sorting; DELLA needs each entry's rank in its row, which hm3 takes from one sort "
        "(numpy's SIMD sort of 64-bit keys: magnitude bits, then column) and its inverse permutation where mergekit "
        "argsorts twice; reading (pread, one tensor at a time), merging and writing (each tensor at its planned offset, its "
        "page-aligned middle past the page cache with O_DIRECT) overlap on separate threads, and the random methods draw each tensor's masks on two more threads while the "
        "tensor before merges. `hm3 merge` freezes the objects its imports made out of Python's garbage collector's "
        "scans, raises glibc's mmap and trim thresholds so that freed tensor buffers are reused, and keeps numpy's "
        "BLAS (which it does not use) on one thread (`hm3/process.py`); the floor runs with the same settings.",
        render_merge, targets=merge_targets),
    Section(
        "Evaluators: transformers and vLLM, weight swap and reload",
        "The two backends in one process, alternating within each round. A search evaluates many candidates on "
        "one live model, so what matters is the cost of a weight swap against a reload, and the generation "
        "throughput once weights are in place. vLLM runs eager (hm3's CPU default) unless the row says compiled; "
        "its advantage grows with the number of sequences in flight, so the rows differ in prompts at once. On a "
        "CPU without native bfloat16 kernels bfloat16 runs emulated, and the two backends' outputs need not agree.",
        render_eval, targets=eval_targets),
    Section(
        "lm-eval objectives: hm3 against lm-evaluation-harness",
        "An lm-eval task is an hm3 objective scored through hm3's own backend (`lm-eval:TASK`), so a search swaps "
        "each candidate's weights into one live model. The same tasks (local YAMLs over seeded arithmetic "
        "questions: one multiple-choice, one generation with a regex filter) are scored for each candidate by hm3 "
        "and by lm-eval's own `simple_evaluate` with its `HFLM` built from the candidate's directory, as a search "
        "calling lm-eval per candidate does. The scores must be equal; the times say what the swap saves. A "
        "135M-parameter model reloads in well under the time its scoring takes (the last column), so scoring "
        "dominates both here; the reload grows with the model and the swap stays a copy. The machine is shared "
        "with other jobs: the two sides alternate per candidate, so its load hits both.",
        render_lmeval, targets=lmeval_targets),
    Section(
        "Level-1 search: hypervolume against evaluations",
        "Every optimiser in the same DARE-TIES space (per-model weight in [0, 1], density in [0.2, 1]) on the micro "
        "zoo, three seeds each, scored on the first N validation examples per task; HV after n evaluations is the "
        "HV of everything evaluated so far, normalised per task between the base (0) and the best expert (1) with "
        "the base as reference point. `bo-mo` starts from the preference design (weights = λ for quasi-random "
        "λ ~ Dirichlet(1)); `bo-mo sobol-design` is the same optimiser with a Sobol initial design. With few "
        "examples per task a validation HV of everything evaluated rewards drawing many noisy points, so the "
        "200-example run is the measurement and the 64-example run a check of that noise.",
        render_search, targets=search_targets),
    Section(
        "Two levels, level 1 alone, and preference requests",
        "The same budget of full-evaluation equivalents (validation examples run through the model ÷ a whole-plan "
        "evaluation) spent by level 1 alone or split between level 1 and level 2 (paths over the experts framed "
        "by the level-1 merge chosen for λ, DAR rewards). Then requests answered from the finished runs, against a "
        "search dedicated to each λ; the test columns use examples neither answer was chosen on.",
        render_two_level, targets=two_level_targets),
    Section(
        "Dynamic Average Reward",
        "The same level-2 episodes with DAR subsets and with whole-plan rewards: how many fewer examples DAR scores "
        "and how much of the front it gives up. Level 2 alone frames paths over the experts with the base model.",
        render_dar, targets=dar_targets),
    Section(
        "How much level 2 could add on the micro zoo",
        "An upper bound rather than a search: for every level-1 front point of a finished two-level run as the "
        "frame, every path of one or two hops over the pool (the experts and the frame) scored on the whole "
        "validation plan. \"Best k\" adds the k paths with the largest HV gains, chosen with hindsight on the same "
        "scores, so it is optimistic: what a level 2 keeping k such paths could reach at most.",
        render_ceiling),
    Section(
        "The whole product on SmolLM2-135M",
        "`experiments/real_model_run.py` runs hm3 through its CLI on a real architecture: SmolLM2-135M-Instruct "
        "(30 layers, grouped-query attention, tied embeddings, a BPE tokenizer) as base, with a math and a code "
        "expert fine-tuned from it for 40 AdamW steps on the zoo tasks. `hm3 run` (12 level-1 evaluations, then "
        "level 2), `hm3 front`, `hm3 export` of every front point and `hm3 eval` of each from disk in a fresh "
        "process, and a budget-0 `hm3 request` scored the same way. The experts are brief fine-tunes and the "
        "budgets tiny: this checks that the product works at this scale, not the quality it reaches there.",
        render_smol_product),
    Section(
        "Level-2 modes on SmolLM2",
        "The same SmolLM2 setup with level 2 as published (HM3 mode: any model's any layer at every step), in "
        "RMM mode (take, skip or go back over the layers in order), and in HM3 mode with the frame-order prior "
        "(`path_prior: frame-order`: a hop is coded by its offset from the next layer in order, so the first path "
        "is the framing merge's own layer order and exploration edits it). `keep_best` also keeps, per λ, the best "
        "paths of the whole run by the lower bound of their stored scores.",
        render_smol_modes),
    Section(
        "Two levels against level 1 alone on SmolLM2",
        "The ablation at equal cost on a 30-layer model, three seeds: a two-level run (12 merges, then level 2 in "
        "HM3 mode with the frame-order prior and `keep_best: 3`), and level 1 alone with a budget of 12 plus the "
        "two-level run's level-2 cost in full-evaluation equivalents (read from its run store). "
        "`experiments/real_model_ablation.py` refuses pairs whose seed, models, objectives or plan differ.",
        render_smol_ablation, targets=smol_targets),
    Section(
        "Parallel evaluation on Ray",
        "`evaluation: {executor: ray, workers: N}` scores level 1's candidates on N Ray actors, each with its own live "
        "model; level 1 asks its optimiser for N points at a time and tells them in proposal order. Throughput: "
        "level 1's batch loop with the `random` optimiser (proposals cost nothing, so the rate is the evaluators'), "
        "timed from the first proposal to the last score; Ray's and the actors' start-up and the reference scores "
        "(base and experts) are timed apart (the first set-up's start-up includes the process's imports of the model "
        "code). The machine has 2 cores and was shared with other jobs while it ran "
        "(the load averages say how much), which takes cores from the two workers as from the local evaluator, so "
        "the ratios are those of a busy machine, not of an idle one. Hypervolume: `bo-mo` asked for 4 points at a "
        "time (botorch's sequential greedy q-batch) against one at a time, scored by one local evaluator; load "
        "changes its times, not its scores.",
        render_parallel, targets=parallel_targets),
    Section(
        "Bad inputs and faults",
        "`experiments/red_team.py` runs each case through the real `hm3` CLI on tiny models it builds: a case is "
        "handled when the command exits non-zero with one `hm3: error:` line and no traceback, every protected "
        "file is unchanged, nothing is left behind, and no pickle gadget ran. See [SECURITY.md](SECURITY.md).",
        render_red_team),
    Section(
        "The sandbox for generated code",
        "`experiments/red_team_sandbox.py` runs every early-exit and tampering trick of the test suite against a "
        "failing solution, and escape attacks with the in-process audit hook switched off, in each containment "
        "mode that works on the machine. See [SECURITY.md](SECURITY.md).",
        render_sandbox),
    Section(
        "The compositional benchmark",
        "Where level 2 should pay: a task that needs two skills in sequence (word problems in a generated "
        "pseudo-language, answered in digits), with a language expert and a math expert fine-tuned from "
        "SmolLM2-135M-Instruct, neither on the composite task (`experiments/compositional/`). Arms at equal "
        "cost: two levels (paths framed by the level-1 merge, transition scales and the swap prior), level 1 "
        "alone with the two-level run's whole cost, level 2 alone over the experts with the same cost; beside "
        "them, at its own much lower cost (one evaluation per swap, no search), the layer-swap heuristic of "
        "Bandarkar et al. HV by the documented protocol, normalised per task between the base "
        "and the best expert.",
        render_compositional,
        pending="Built and tested at toy scale (`--toy`, and `tests/test_compositional_benchmark.py`); not yet run "
                "on SmolLM2. `python experiments/compositional/build.py --work runs/compositional`, then "
                "`python experiments/compositional/ablation.py --work runs/compositional --seeds 0,1,2`; both "
                "resume where they stopped. Their docstrings give the expected CPU cost."),
    Section(
        "Mutation testing",
        "How strong the tests of the code whose silent errors cost users most are: mutmut changes one operator, "
        "constant or argument at a time in a module and runs the tests listed for it; a mutant is killed when a "
        "test fails or times out. mutmut switches mutants on at call time in test processes forked after the "
        "package is imported, so `--recheck` runs each survivor again in a fresh interpreter with the mutant "
        "written into the source: that is how mutants of import-time code (the merge-method registry's "
        "decorators) can be killed at all. mutmut also leaves every decorated function unmutated, so the script "
        "stages each one (a registered merge method, a validator, a property) as the assignment its decorator "
        "stands for. Not part of the suite; `scripts/mutation.py`'s docstring says how to run it.",
        render_mutation, targets=mutation_targets,
        pending="`nice -n 15 .venv/bin/python scripts/mutation.py --recheck` (needs the `mutation` extra)."),
]
