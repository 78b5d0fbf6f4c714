"""The two-level run end to end on tiny models: outputs, front, export, requests, bad input, resume."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hm3.arch.level2 import PATH_KIND, merge_for_preference, path_from_recipe, small_reward_subsets
from hm3.arch.path import LayerPath, LayerPool, build_path_model
from hm3.cli import main
from hm3.errors import ConfigError
from hm3.request import answer_request, parse_preference
from hm3.run.config import migrate_stored_config, parse_two_level_config, stored_two_level_config
from hm3.run.directory import read_front
from hm3.run.two_level import check_depth, run_two_level
from hm3.search.estimates import lower_bound, stored_estimate
from hm3.search.level1 import run_level1
from hm3.search.pareto import non_dominated, normalise, protocol_hypervolume
from hm3.search.run_config import parse_run_config
from hm3.store import RunStore

RL = {"offline_episodes": 8, "online_episodes": 4, "episodes_per_update": 4, "epochs": 2, "data_scale": 0.5}


@pytest.fixture(scope="module")
def models(labelled_family):
    _, paths, objectives = labelled_family
    return paths, objectives


def _config(models, **level2) -> dict:
    paths, objectives = models
    return {
        "models": paths,
        "objectives": objectives,
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
        "optimizer": {"name": "random", "budget": 4},
        "evaluation": {"validation_examples": 8, "test_examples": 8, "batch_size": 16},
        "seed": 1,
        "level2": {"preferences": 2, "rl": dict(RL)} | level2,
    }


@pytest.fixture(scope="module")
def finished(models, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    summary = run_two_level(parse_two_level_config(_config(models)), run, progress=False)
    return run, summary


def test_outputs_front_and_both_levels(finished):
    run, summary = finished
    for f in ("front.csv", "candidates.csv", "summary.json", "front.png", "hm3.sqlite", "level2/policy.safetensors",
              "level1/front.csv"):
        assert (run / f).exists(), f
    front, s = read_front(run)
    assert s == json.loads((run / "summary.json").read_text()) and s["front_size"] == len(front)
    val = [c for c in front.columns if c.endswith("_val")]
    cands = pd.read_csv(run / "candidates.csv")
    # the front is exactly the non-dominated set of every candidate of both levels
    all_val = cands[val].to_numpy()
    expected = set(cands["point"].iloc[non_dominated(all_val)])
    assert set(front["point"]) == expected
    assert set(cands["level"]) == {1, 2}
    # each stored HV equals an independent 2-D staircase area over the candidates' normalised scores
    refs = {r: np.array(v) for r, v in s["reference_validation"].items()}
    base, ideal = refs["base"], np.max([refs["m1"], refs["m2"]], axis=0)
    span = np.where(ideal > base, ideal - base, 1.0)  # the protocol: raw units where no expert beats the base
    for key, rows in (("hv_validation", cands), ("hv_validation_level1", cands[cands["level"] == 1]),
                      ("hv_validation_level2", cands[cands["level"] == 2])):
        assert s[key] == pytest.approx(_staircase_area((rows[val].to_numpy(float) - base) / span),
                                       abs=1e-9), key
    assert all(np.isfinite(front[[c.replace("_val", "_test") for c in val]].to_numpy()).ravel())
    assert len(s["level2_paths"]) >= 2


def _staircase_area(points: np.ndarray) -> float:
    """Area dominated by 2-D maximised points above the origin, summed strip by strip (not pymoo)."""
    pts = sorted((max(x, 0.0), max(y, 0.0)) for x, y in points)
    area, best_y = 0.0, 0.0
    for i in range(len(pts) - 1, -1, -1):  # from the largest x down: each strip's height is the best y so far
        x, y = pts[i]
        best_y = max(best_y, y)
        left = pts[i - 1][0] if i > 0 else 0.0
        area += (x - left) * best_y
    return area


def _check_path_scores_against_hf(run: Path, summary: dict, models) -> int:
    """Every stored whole-validation score of a kept path equals scoring its path model from scratch."""
    from hm3.config import parse_merge_config
    from hm3.eval.evaluate import evaluate_objective
    from hm3.eval.hf import HFBackend
    from hm3.merge.inmemory import InMemoryMerger
    from objectives.registry import get_objective

    paths, objectives = models
    merger = InMemoryMerger(paths["base"], [paths["m1"], paths["m2"]], base_ref="base", model_refs=["m1", "m2"])
    experts = [{n: merger.base[n] + merger.deltas[n][k] for n in merger.tensor_names} for k in range(2)]
    backend = HFBackend.from_pretrained(paths["base"], batch_size=16)
    checked = 0
    for cid in map(int, summary["level2_paths"]):
        with RunStore.open(run, readonly=True) as store:
            _, recipe = store.candidate(cid)
            evals = [e for e in store.evaluations(cid) if e.split == "validation" and e.count == 8]
            frame_recipe = None if recipe["frame"] == "base" else store.candidate(int(recipe["frame"]))[1]
        path, _ = path_from_recipe(recipe)
        frame = merger.base if frame_recipe is None else merger.merged_state(parse_merge_config(frame_recipe))
        backend.model = build_path_model(LayerPool.from_states([*experts, frame], [merger.config] * 3), path)
        for e in evals:
            obj = get_objective(next(o for o in objectives if get_objective(o).name == e.objective))
            assert evaluate_objective(backend, obj, "validation", list(range(8))).score == pytest.approx(e.score, abs=1e-9)
            checked += 1
    return checked


def test_level2_paths_are_scored_as_their_models(finished, models):
    run, summary = finished
    assert _check_path_scores_against_hf(run, summary, models) >= 2


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_two_level_run_on_the_vllm_backend(models, tmp_path):
    """Level 2 on vLLM: paths are swapped into the fixed-depth engine padded with identity layers;
    their stored scores equal the hf path models'."""
    data = _config(models, preferences=1) | {"evaluation": {"backend": "vllm", "validation_examples": 8,
                                                          "test_examples": 8, "batch_size": 16}}
    summary = run_two_level(parse_two_level_config(data), tmp_path / "run", progress=False)
    assert _check_path_scores_against_hf(tmp_path / "run", summary, models) >= 2
    too_long = _config(models, rl=RL | {"t_max": 3}) | {"evaluation": data["evaluation"]}
    with pytest.raises(ConfigError, match="t_max must be <= 2"):  # refused before any model is loaded
        run_two_level(parse_two_level_config(too_long), tmp_path / "long", progress=False)
    assert not (tmp_path / "long").exists()


def test_rmm_paths_longer_than_a_fixed_depth_engine_are_refused_before_anything_runs(models, tmp_path):
    """RMM's back move re-takes blocks, so its paths can outgrow the models' depth, which vLLM's engine
    cannot run: refused at the start unless the step cap keeps every path within the depth."""
    evaluation = {"backend": "vllm", "validation_examples": 8, "test_examples": 8, "batch_size": 16}
    rmm = _config(models, rl=RL | {"mode": "rmm"}) | {"evaluation": evaluation}
    with pytest.raises(ConfigError, match="rmm_max_steps <= 3"):
        run_two_level(parse_two_level_config(rmm), tmp_path / "rmm", progress=False)
    assert not (tmp_path / "rmm").exists()
    capped = _config(models, rl=RL | {"mode": "rmm", "rmm_max_steps": 3}) | {"evaluation": evaluation}
    check_depth(parse_two_level_config(capped))  # 3 steps on 2 layers: at most 2 blocks, which the engine runs


def test_front_and_export_cli(finished, tmp_path, capsys):
    run, _ = finished
    assert main(["front", str(run)]) == 0
    out = capsys.readouterr().out
    front = pd.read_csv(run / "front.csv")
    assert "HV validation" in out and str(front["point"].iloc[0]) in out
    from transformers import AutoModelForCausalLM

    for _, row in front.iterrows():
        dest = tmp_path / f"p{row['point']}"
        assert main(["export", str(run), "--point", str(row["point"]), str(dest)]) == 0
        model = AutoModelForCausalLM.from_pretrained(dest)
        assert torch.isfinite(model(torch.arange(5)[None]).logits).all()
        if row["kind"] == PATH_KIND:
            hops = json.loads((run / row["file"]).read_text())["path"]["hops"]
            assert model.config.num_hidden_layers == len(hops)
    assert main(["export", str(run), "--point", "99999", str(tmp_path / "x")]) != 0
    assert "no front point 99999" in capsys.readouterr().err


def _validation_utilities(checkpoint: Path, summary: dict, objectives: list) -> dict[str, float]:
    """A written checkpoint loaded in transformers, scored on the run's validation plan (utilities)."""
    from hm3.eval.evaluate import evaluate_objective
    from hm3.eval.hf import HFBackend
    from objectives.base import utility
    from objectives.registry import get_objective

    backend = HFBackend.from_pretrained(checkpoint, batch_size=16)
    specs = {get_objective(o).name: o for o in objectives}
    return {name: utility(evaluate_objective(backend, get_objective(specs[name]), "validation", list(range(8))).score,
                          how) for name, how in summary["utility_maps"].items()}


def test_exported_front_points_and_materialised_paths_score_what_the_run_stored(finished, models, tmp_path):
    """``hm3 export`` of each front point, and each kept level-2 path written as a point file's checkpoint
    (its frame merge written to disk first), loaded in transformers, score on the validation plan exactly
    what the run stored for them."""
    from hm3.materialise import write_path
    from hm3.run.front import path_point_file

    run, summary = finished
    _, objectives = models
    for _, row in pd.read_csv(run / "front.csv").iterrows():
        dest = tmp_path / f"p{row['point']}"
        assert main(["export", str(run), "--point", str(row["point"]), str(dest)]) == 0
        scores = _validation_utilities(dest, summary, objectives)
        assert scores == {n: pytest.approx(row[f"{n}_val"], abs=1e-9) for n in scores}, row["point"]
    framed = 0
    with RunStore.open(run, readonly=True) as store:
        cfg = stored_two_level_config(store).level1
        points = {int(c): path_point_file(store.candidate(int(c))[1], store, cfg) for c in summary["level2_paths"]}
        stored = {c: {e.objective: e.score for e in store.evaluations(c) if e.split == "validation" and e.count == 8}
                  for c in points}
    for cid, point in points.items():
        framed += point["frame_recipe"] is not None
        scores = _validation_utilities(write_path(point, tmp_path / f"path{cid}"), summary, objectives)
        assert stored[cid] and {n: scores[n] for n in stored[cid]} == pytest.approx(stored[cid], abs=1e-9), cid
    assert framed  # a path over a merge frame is among them


def test_a_path_over_a_merge_frame_exports_configs_that_rebuild_it(finished, tmp_path):
    """The frame merge ``hm3 export`` makes for a level-2 path is scratch, removed once the path is
    written: the exported path's ``mergekit_passthrough.yml`` and ``hm3_path.json`` name no directory
    that is gone, but ``frame`` beside them, with the frame's recipe; ``hm3 merge`` of that recipe and then
    of the config (copied elsewhere, as a user would run it) rebuilds the exported tensors."""
    from safetensors.torch import load_file

    from hm3.arch.path import FRAME_RECIPE_FILE
    from hm3.materialise import write_path
    from hm3.run.front import path_point_file

    run, summary = finished
    with RunStore.open(run, readonly=True) as store:
        cfg = stored_two_level_config(store).level1
        points = [path_point_file(store.candidate(int(c))[1], store, cfg) for c in summary["level2_paths"]]
    point = next(p for p in points if p["frame_recipe"] is not None)
    out = write_path(point, tmp_path / "out" / "path")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["path"]  # the scratch frame is gone
    config = yaml.safe_load((out / "mergekit_passthrough.yml").read_text())
    pool = json.loads((out / "hm3_path.json").read_text())["pool"]
    named = {s["model"] for sl in config["slices"] for s in sl["sources"]}
    assert named <= set(pool) and pool == [*point["experts"].values(), "frame"]
    assert yaml.safe_load((out / FRAME_RECIPE_FILE).read_text()) == point["frame_recipe"]
    rebuild = tmp_path / "rebuild"
    rebuild.mkdir()
    shutil.copy(out / FRAME_RECIPE_FILE, rebuild)
    shutil.copy(out / "mergekit_passthrough.yml", rebuild)
    assert main(["merge", str(rebuild / FRAME_RECIPE_FILE), str(rebuild / "frame")]) == 0
    assert main(["merge", str(rebuild / "mergekit_passthrough.yml"), str(tmp_path / "rebuilt")]) == 0
    rebuilt, exported = load_file(tmp_path / "rebuilt" / "model.safetensors"), load_file(out / "model.safetensors")
    assert rebuilt.keys() == exported.keys() and all(torch.equal(rebuilt[n], exported[n]) for n in exported)


def test_request_budget_0_evaluates_nothing_and_is_fast(finished, tmp_path, capsys):
    run, summary = finished
    with RunStore.open(run, readonly=True) as store:
        before = len(store.evaluations())
    start = time.perf_counter()
    names = summary["objectives"]
    prefer = f"{names[0]}=0.7,{names[1]}=0.3"
    ans = answer_request(run, prefer, tmp_path / "answer", budget=0, progress=False)
    elapsed = time.perf_counter() - start
    with RunStore.open(run, readonly=True) as store:
        assert len(store.evaluations()) == before
    # a front point's scores are stored measurements, a policy path's an estimate from its episodes' stored
    # scores, the posterior's proposal's a prediction
    label = {"front": "measured", "policy": "estimated"}.get(ans.source.split()[0], "predicted")
    assert ans.evaluations == 0 and ans.scores_are == label
    assert (ans.measured if label == "measured" else ans.predicted) is ans.scores
    assert (ans.predicted if label == "measured" else ans.measured) is None
    assert (tmp_path / "answer" / "config.json").is_file()
    record = json.loads((tmp_path / "answer" / "hm3_request.json").read_text())
    assert record["preference"] == {names[0]: pytest.approx(0.7), names[1]: pytest.approx(0.3)}
    assert record["answer"] == ans.source and record["new_evaluations"] == 0
    assert record["scores_are"] == label
    assert list(record["validation_scores"].values()) == pytest.approx(list(ans.scores))
    assert elapsed < 30  # generous: the benchmark measures the real latency
    # the answer is the best predicted option for λ: no front point is better on Σ λ f̂
    front = pd.read_csv(run / "front.csv")
    base, ideal = np.array(summary["base_validation"]), np.array(summary["ideal_validation"])
    lam = np.array([0.7, 0.3])
    f_hat = normalise(front[[f"{n}_val" for n in names]].to_numpy(float), base, ideal)
    best_front = float((f_hat @ lam).max())
    # the score it ranks by is the answer's own scores, normalised and weighted (so the comparison with
    # the front below is about the model written, not about a number the ranking made up)
    own = float(normalise(np.array([ans.scores]), base, ideal)[0] @ lam)
    assert ans.details["weighted_normalised_score"] == pytest.approx(own, abs=1e-9)
    assert own >= best_front - 1e-12
    assert main(["request", str(run), "--prefer", prefer, str(tmp_path / "cli")]) == 0
    assert "0 new evaluations" in capsys.readouterr().out


def test_request_budget_0_in_a_fresh_process_leaves_the_search_libraries_unimported(finished, tmp_path):
    """A fresh ``hm3 request`` pays for every import: budget 0 needs neither the BO stack (the saved
    posterior predictions stand in for the GPs) nor pandas, which cost seconds on a 2-core CPU."""
    import subprocess
    import sys

    run, summary = finished
    names = summary["objectives"]
    script = (
        "import sys\n"
        "from hm3.cli import main\n"
        f"rc = main(['request', {str(run)!r}, '--prefer', '{names[0]}=0.4,{names[1]}=0.6', {str(tmp_path / 'a')!r},"
        " '--quiet'])\n"
        "print(rc, sorted(m for m in ('botorch', 'gpytorch', 'pandas', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    assert (tmp_path / "a" / "config.json").is_file()


def test_request_with_budget_fine_tunes_and_measures(finished, tmp_path):
    run, summary = finished
    names = summary["objectives"]
    with RunStore.open(run, readonly=True) as store:
        before = len(store.evaluations())
    ans = answer_request(run, f"{names[0]}=0.2,{names[1]}=0.8", tmp_path / "tuned", budget=4, progress=False)
    assert ans.measured is not None and ans.evaluations >= 4
    record = json.loads((tmp_path / "tuned" / "hm3_request.json").read_text())
    assert record["scores_are"] == "measured" and record["budget"] == 4
    assert record["new_evaluations"] == ans.evaluations
    assert list(record["validation_scores"].values()) == pytest.approx(list(ans.measured))
    with RunStore.open(run, readonly=True) as store:
        assert len(store.evaluations()) > before
        assert store.events("request")


def test_request_fine_tuning_smooths_rewards_over_its_own_budget(finished, tmp_path, monkeypatch):
    """DAR's a_i = α·i/N plans N episodes: a request fine-tunes for its budget, not the run's online count."""
    import hm3.request

    run, summary = finished
    names = summary["objectives"]
    built, build = [], hm3.request.build_trainer

    def keep(**kwargs):
        built.append(build(**kwargs))
        return built[-1]

    monkeypatch.setattr(hm3.request, "build_trainer", keep)
    budget = RL["online_episodes"] + 2
    answer_request(run, f"{names[0]}=0.3,{names[1]}=0.7", tmp_path / "tuned", budget=budget, progress=False)
    (trainer,) = built
    assert trainer.episode == budget and trainer.env.dar.n_episodes == budget


def test_request_fine_tuning_counts_the_evaluations_it_made(models, tmp_path):
    """With transition scales an episode scores its path once per scale (and a repeat on a subset already
    scored costs nothing): the request reports what the store gained, not one evaluation per episode."""
    run = tmp_path / "run"
    summary = run_two_level(parse_two_level_config(_config(models, rl=RL | {"transition_scales": [0.5]})), run,
                            progress=False)
    names = summary["objectives"]
    with RunStore.open(run, readonly=True) as store:
        before = len(store.evaluations())
    ans = answer_request(run, f"{names[0]}=0.5,{names[1]}=0.5", tmp_path / "tuned", budget=8, progress=False)
    with RunStore.open(run, readonly=True) as store:
        new = {(e.candidate_id, e.example_set) for e in store.evaluations()[before:]}
    assert ans.evaluations == len(new) / len(names)  # one row per objective (bench_two_level counts alike)


def test_request_refine_searches_merges_warm_started_from_the_run(finished, tmp_path, capsys):
    run, summary = finished
    names = summary["objectives"]
    with RunStore.open(run, readonly=True) as store:
        tells = len(store.events("level1_tell"))
        refined_before = len(store.events("request_merge"))
    prefer = f"{names[0]}=0.9,{names[1]}=0.1"
    ans = answer_request(run, prefer, tmp_path / "refined", refine=2, progress=False)
    assert ans.measured is not None and 0 <= ans.evaluations <= 2  # a proposal already stored is not re-scored
    with RunStore.open(run, readonly=True) as store:
        assert len(store.events("level1_tell")) == tells  # level 1's own history is untouched
        refined = store.events("request_merge")[refined_before:]
        assert len(refined) == 2
        # the GP saw every level-1 merge (and earlier refinements), so no initial design was spent
        assert refined[0].payload["warm_start"] == tells + refined_before
        assert store.events("request")[-1].payload["refine"] == 2
    # the answer is the best measured option: nothing on the front or among the refinements beats it
    base, ideal = np.array(summary["base_validation"]), np.array(summary["ideal_validation"])
    lam = np.array([0.9, 0.1])
    front = pd.read_csv(run / "front.csv")
    best_front = float((normalise(front[[f"{n}_val" for n in names]].to_numpy(float), base, ideal) @ lam).max())
    own = float(normalise(np.array([ans.measured]), base, ideal)[0] @ lam)  # the written model's measured scores
    assert ans.details["weighted_normalised_score"] == pytest.approx(own, abs=1e-9)
    assert own >= best_front - 1e-12
    assert (tmp_path / "refined" / "config.json").is_file()
    # the run's front and summary were written again with the refined merges among its candidates
    refined_ids = {e.payload["candidate"] for e in refined}
    candidates = pd.read_csv(run / "candidates.csv")
    after = json.loads((run / "summary.json").read_text())
    assert refined_ids <= set(candidates.loc[candidates["kind"] == "merge", "point"])
    assert after["candidates"] == len(candidates) == summary["candidates"] + after.get("refined_merges", 0)
    assert after["level2_paths"] == summary["level2_paths"] and after["preferences"] == summary["preferences"]
    vals = candidates[[f"{n}_val" for n in names]].to_numpy()
    assert set(pd.read_csv(run / "front.csv")["point"]) == set(candidates["point"].iloc[non_dominated(vals)])
    assert after["hv_validation"] == pytest.approx(protocol_hypervolume(vals, base, ideal))
    assert any("written again" in n for n in ans.notes)
    assert main(["request", str(run), "--prefer", prefer, str(tmp_path / "cli"), "--refine", "-1"]) != 0
    assert "--refine must be >= 0" in capsys.readouterr().err


def test_a_path_predicted_from_few_examples_competes_by_its_lower_bound():
    base, ideal, lam = np.array([0.2, 0.5]), np.array([0.6, 0.9]), np.array([0.75, 0.25])
    means = np.array([0.5, 0.7])
    plain = float(lam @ ((means - base) / (ideal - base)))
    # one standard error of a [0, 1] score over n examples is at most 0.5/√n, per objective's span 0.4
    six = lower_bound(lam, (means, np.array([6.0, 6.0])), base, ideal)
    assert six == pytest.approx(plain - np.sqrt(np.sum((lam * 0.5 / np.sqrt(6) / 0.4) ** 2)))
    many = lower_bound(lam, (means, np.array([1e8, 1e8])), base, ideal)
    assert six < many < plain and many == pytest.approx(plain, abs=1e-4)
    # a front point measured 0.1 lower on the whole plan beats a path seen on 6 examples per task
    assert float(lam @ ((means - 0.1 * 0.4 - base) / (ideal - base))) > six


def test_stored_estimate_is_the_count_weighted_mean_of_every_stored_score_by_hand(tmp_path):
    with RunStore.open(tmp_path / "r", config={"t": 1}, seed=0) as store:
        path = store.add_candidate({"hops": [[0, 0]], "frame": "base"}, PATH_KIND)
        half = store.add_candidate({"hops": [[1, 0]], "frame": "base"}, PATH_KIND)
        for objective, ids, score in [("a", range(4), 0.5), ("a", range(4, 16), 1.0),
                                      ("b", range(2), 0.25), ("b", range(2, 8), 0.75)]:
            store.record_evaluation(path, objective, "validation", list(ids), score=score, count=len(ids), seconds=0)
        store.record_evaluation(path, "a", "test", [0], score=0.0, count=1, seconds=0)  # another split
        store.record_evaluation(half, "a", "validation", [0], score=1.0, count=1, seconds=0)  # nothing on b
        # a: (4·0.5 + 12·1.0)/16 = 0.875 over 16 examples; b: (2·0.25 + 6·0.75)/8 = 0.625 over 8
        means, counts = stored_estimate(store, path, ["a", "b"])
        assert means.tolist() == pytest.approx([0.875, 0.625]) and counts.tolist() == [16, 8]
        by_id = stored_estimate(store, path.id, ["b", "a"])  # an id as well as a CandidateRef; names in order
        assert by_id[0].tolist() == pytest.approx([0.625, 0.875]) and by_id[1].tolist() == [8, 16]
        test_means, test_counts = stored_estimate(store, path, ["a"], split="test")
        assert test_means.tolist() == [0.0] and test_counts.tolist() == [1]
        assert stored_estimate(store, half, ["a", "b"]) is None  # an objective never scored: no estimate
        assert stored_estimate(store, 10**9, ["a"]) is None


def test_paths_met_in_several_episodes_pool_their_subsets(finished):
    run, summary = finished
    with RunStore.open(run, readonly=True) as store:
        counts = [e[1] for p in store.candidates(PATH_KIND)
                  if (e := stored_estimate(store, p, summary["objectives"])) is not None]
    assert counts
    # more examples behind some path than behind another: a path met again adds its new subset's scores
    assert max(int(c.min()) for c in counts) > min(int(c.min()) for c in counts)


def test_preference_parsing():
    objs = ["zoo:math", "zoo:code", "zoo:translation"]
    lam, notes = parse_preference("math=0.6,code=0.3,translation=0.1", objs)
    assert lam.tolist() == pytest.approx([0.6, 0.3, 0.1]) and not notes
    lam, notes = parse_preference("math=3,code=1", objs)
    assert lam.tolist() == pytest.approx([0.75, 0.25, 0]) and any("normalised" in n for n in notes)
    assert any("translation" in n for n in notes)
    for bad, msg in [("physics=1", "unknown objective 'physics'"), ("math=-1", "non-negative"),
                     ("math=0,code=0", "all weights are zero"), ("math", "NAME=WEIGHT"),
                     ("math=1,math=2", "twice"), ("math=x", "not a number"), ("", "empty")]:
        with pytest.raises(ConfigError, match=msg):
            parse_preference(bad, objs)


def test_a_short_name_two_objectives_share_is_refused_not_given_to_the_first():
    objs = ["gsm8k:/data/a.jsonl", "gsm8k:/data/b.jsonl", "zoo:math"]
    with pytest.raises(ConfigError, match="gsm8k.*more than one objective.*gsm8k:/data/a.jsonl.*gsm8k:/data/b.jsonl"):
        parse_preference("gsm8k=1", objs)
    lam, notes = parse_preference("gsm8k:/data/b.jsonl=1,math=1", objs)  # full names, and unshared short ones
    assert lam.tolist() == pytest.approx([0, 0.5, 0.5])
    assert any("gsm8k:/data/a.jsonl" in n for n in notes)  # the objective assumed 0, by a name that says which


def test_a_request_counts_its_evaluations_when_two_objectives_share_example_ids(tmp_path):
    # zoo:math and zoo:math@1 draw their examples from one task: the same ids, so the same example-set keys
    from hm3.request import _evaluations_since

    objectives = ["zoo:math", "zoo:math@1"]
    with RunStore.open(tmp_path, config={"c": 1}, seed=0) as store:
        path = store.add_candidate({"path": [1]}, PATH_KIND)
        for subset in (["math-validation-0"], ["math-validation-1"], ["math-validation-0", "math-validation-1"]):
            for objective in objectives:
                store.record_evaluation(path, objective, "validation", subset, score=0.5, count=len(subset), seconds=0)
        assert _evaluations_since(store, 0) == 3
        assert _evaluations_since(store, 2) == 2


@pytest.mark.parametrize(("text", "expected"), [
    ("math=1e308,code=1e308", [0.5, 0.5, 0]),  # the sum overflows to inf: never λ = 0
    ("math=1.7e308,code=1.7e308,translation=1.7e308", [1 / 3] * 3),
    ("math=1e-320,code=3e-320", [0.25, 0.75, 0]),  # subnormal weights
])
def test_extreme_preference_weights_are_normalised_correctly(text, expected):
    lam, notes = parse_preference(text, ["zoo:math", "zoo:code", "zoo:translation"])
    assert lam.tolist() == pytest.approx(expected) and np.isfinite(lam).all() and lam.sum() == pytest.approx(1)
    assert any("normalised" in n for n in notes)
    with pytest.raises(ConfigError, match="non-negative number"):
        parse_preference("math=1e309", ["zoo:math"])  # inf itself is refused


def test_bad_input(models, finished, tmp_path):
    for level2, msg in [
        ({"rl": {"t_max": 0}}, "t_max must be >= 1"),
        ({"preferences": [[0.5, 0.5, 0.0]]}, "one per objective"),
        ({"preferences": [[0.5, 0.6]]}, "sums to"),
        ({"poool": "experts"}, "level2.poool: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_two_level_config(_config(models, **level2))
    run, _ = finished
    with pytest.raises(ConfigError, match="already holds a run"):
        run_two_level(parse_two_level_config(_config(models)), run, progress=False)
    with pytest.raises(ConfigError, match="differing keys"):
        run_two_level(parse_two_level_config(_config(models, preferences=3)), run, resume=True, progress=False)
    # a run from another format version, and an unfinished run
    other = tmp_path / "other"
    with RunStore.open(other, config={"format": 999, "level1": {}, "level2": {}}, seed=1):
        pass
    with pytest.raises(ConfigError, match="another hm3 version"):
        read_front(other)
    unfinished = tmp_path / "unfinished"
    with RunStore.open(unfinished, config={"format": 1, "level1": {}, "level2": {}}, seed=1):
        pass
    with pytest.raises(ConfigError, match="unfinished run.*--resume"):
        read_front(unfinished)
    with RunStore.open(tmp_path / "l1", config={"models": {}}, seed=1):  # a level-1 search's: read alike
        pass
    with pytest.raises(ConfigError, match="unfinished level-1 search.*hm3 search param .*--resume"):
        read_front(tmp_path / "l1")
    with pytest.raises(ConfigError, match=r"holds a two-level run \(hm3 run\); resume it with hm3 run"):
        level1_only = {k: v for k, v in _config(models).items() if k != "level2"}
        run_level1(parse_run_config(level1_only), run, resume=True, progress=False)


def test_tchebycheff_merge_choice():
    cands = {3: np.array([1.0, 0.0]), 5: np.array([0.0, 1.0]), 7: np.array([0.6, 0.6])}
    assert merge_for_preference(np.array([1.0, 0.0]), cands) == 3
    assert merge_for_preference(np.array([0.0, 1.0]), cands) == 5
    assert merge_for_preference(np.array([0.5, 0.5]), cands) == 7


def test_small_dar_subsets_are_flagged():
    from hm3.search.scoring import SplitPlan

    plan = SplitPlan(split="validation", indices={"a": list(range(128)), "b": list(range(400))})
    assert small_reward_subsets(plan, 0.05) == {"a": 6}  # 0.05 × 400 = 20 examples is enough
    assert small_reward_subsets(plan, 0.125) == {}  # 16 of 128
    assert small_reward_subsets(plan, 0.1, minimum=50) == {"a": 13, "b": 40}


def test_level2_alone_uses_the_base_as_frame(models, tmp_path):
    s = run_two_level(parse_two_level_config(_config(models, pool="experts", preferences=1)), tmp_path / "r",
                      progress=False)
    assert s["front_levels"]["1"] == 0 and s["hv_validation_level1"] == 0.0
    assert all(v["frame"] == "base" for v in s["level2_paths"].values())


@pytest.mark.slow
@pytest.mark.e2e
def test_killed_run_resumes_without_repeating_evaluations(models, tmp_path, sigkill_hm3):
    cfg_path = tmp_path / "cfg.yml"
    data = _config(models, rl=RL | {"offline_episodes": 16})
    cfg_path.write_text(yaml.safe_dump(data))
    reference = run_two_level(parse_two_level_config(data), tmp_path / "reference", progress=False)
    run = tmp_path / "killed"
    # killed during level-2 pretraining, as it saves a checkpoint after its first
    sigkill_hm3(["run", str(cfg_path), str(run), "--quiet"], lambda: (run / "level2" / "pretrain.safetensors").exists(),
                pause_at="hm3.run.two_level:save_state")
    assert not (run / "level2" / "policy.safetensors").exists()  # pretraining had not ended
    with RunStore.open(run, readonly=True) as s:
        before = [(e.candidate_id, e.objective, e.split, e.example_set) for e in s.evaluations()]
    assert main(["run", str(cfg_path), str(run), "--resume", "--quiet"]) == 0
    with RunStore.open(run, readonly=True) as s:
        after = [(e.candidate_id, e.objective, e.split, e.example_set) for e in s.evaluations()]
    with RunStore.open(tmp_path / "reference", readonly=True) as s:
        uninterrupted = [(e.candidate_id, e.objective, e.split, e.example_set) for e in s.evaluations()]
    assert after[: len(before)] == before  # nothing lost
    assert len(after) == len(set(after))  # nothing evaluated twice (the store refuses duplicates anyway)
    assert sorted(after) == sorted(uninterrupted)  # the same evaluations as a run never killed
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["hv_validation"] == pytest.approx(reference["hv_validation"])
    assert pd.read_csv(run / "front.csv")["point"].tolist() == pd.read_csv(tmp_path / "reference" / "front.csv")[
        "point"].tolist()



def _unmatched(expected: object, actual: object, where: str) -> list[str]:
    """Every value set in ``expected`` (a config file's data) at the same place in ``actual``, as a list of
    the places where it is not (dict keys may be missing from ``expected``: those are defaults)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: {actual!r} is not a mapping"]
        return [miss for key, value in expected.items()
                for miss in _unmatched(value, actual.get(key, "<missing>"), f"{where}.{key}")]
    return [] if expected == actual else [f"{where}: file says {expected!r}, parsed {actual!r}"]


@pytest.mark.parametrize("name", ["qwen25_1p5b_two_level.yml", "zoo_two_level.yml"])
def test_shipped_two_level_configs_parse_to_what_their_files_say(name):
    """Each value a shipped config file sets is the parsed config's (read from the file here, not copied
    into the test); its preference design has one row per λ, one column per objective, on the simplex."""
    from hm3.run.config import load_two_level_config

    path = Path(__file__).parents[1] / "experiments/configs" / name
    data = yaml.safe_load(path.read_text())
    cfg = load_two_level_config(path)
    level1, level2 = cfg.canonical()["level1"], cfg.level2.model_dump(mode="json")  # every level-2 key
    given = {k: v for k, v in data.items() if k not in ("level2", "zoo")}  # a zoo expands to models etc.
    assert _unmatched(given, level1, "level1") + _unmatched(data["level2"], level2, "level2") == []
    lams = cfg.preferences()
    assert lams.shape == (data["level2"]["preferences"], len(level1["objectives"]))
    assert np.all(lams >= 0) and np.allclose(lams.sum(axis=1), 1)


def test_level1_posterior_is_saved_and_proposes_a_valid_merge(finished, tmp_path):
    """The saved GPs rebuild without fitting, reproduce the stored scores at the evaluated points,
    and their proposal is a recipe hm3 merges."""
    from hm3.config import parse_merge_config
    from hm3.materialise import write_merge
    from hm3.run.front import recipe_with_paths
    from hm3.search.optimizers.bayes import make_gp
    from hm3.search.posterior import POSTERIOR_FILE, load_posterior, posterior_option, upgrade_posterior_file

    run, summary = finished
    assert (run / "level1" / POSTERIOR_FILE).is_file()
    saved = load_posterior(run / "level1")
    assert saved["X"].shape[0] == 4 and saved["F"].shape == (4, 2)
    gp = make_gp(saved["X"], saved["F"][:, :1])
    gp.load_state_dict(saved["gp_states"][0])
    gp.eval()
    with torch.no_grad():
        mean = gp.posterior(saved["X"]).mean[:, 0]
    assert torch.allclose(mean, saved["F"][:, 0], atol=0.2)  # a GP through noisy points, near them
    with RunStore.open(run, readonly=True) as store:
        cfg = stored_two_level_config(store)
    base, ideal = np.array(summary["base_validation"]), np.array(summary["ideal_validation"])
    bound, recipe, predicted = posterior_option(saved, cfg.level1.search_space, np.array([0.5, 0.5]), base, ideal)
    assert np.isfinite(bound) and predicted.shape == (2,)
    # the saved grid predictions are the GPs' own: a run saved without them (older hm3) rebuilds the
    # GPs and gets the same proposal
    older = {k: saved[k] for k in ("X", "F", "gp_states")}
    again = posterior_option(older, cfg.level1.search_space, np.array([0.5, 0.5]), base, ideal)
    assert again[0] == pytest.approx(bound, abs=1e-9) and again[1] == recipe
    np.testing.assert_allclose(again[2], predicted, atol=1e-9)
    torch.save(older, tmp_path / "posterior.pt")  # as an older hm3 saved it: read with weights_only=True
    assert upgrade_posterior_file(tmp_path) and not upgrade_posterior_file(tmp_path)
    assert not (tmp_path / "posterior.pt").exists()
    upgraded = load_posterior(tmp_path)
    for key in ("grid", "mean", "variance"):
        torch.testing.assert_close(upgraded[key], saved[key])
    parse_merge_config(recipe_with_paths(recipe, cfg.level1.models))
    assert (write_merge(recipe_with_paths(recipe, cfg.level1.models), tmp_path / "m") / "config.json").is_file()



def test_frame_order_prior_runs_and_configs_stored_before_it_read_as_its_default(models, tmp_path):
    """Runs stored before ``path_prior`` existed resume: their stored config (format 1, without the key)
    migrates to the default."""
    default = parse_two_level_config(_config(models)).canonical()
    assert _as_format_1(default)["level2"]["rl"].keys().isdisjoint({"path_prior", "prior_kl", "critic_margin"})
    assert migrate_stored_config(_as_format_1(default), where="-") == default
    cfg = parse_two_level_config(_config(models, rl=RL | {"path_prior": "frame-order"}))
    s = run_two_level(cfg, tmp_path / "r", progress=False)
    with RunStore.open(tmp_path / "r", readonly=True) as store:
        assert store.config()["level2"]["rl"]["path_prior"] == "frame-order"
        assert stored_two_level_config(store) == cfg
    assert s["level2_paths"]


def test_keep_best_ranks_paths_by_the_lower_bound_of_their_stored_scores_by_hand(tmp_path):
    """keep_best = 1, two objectives, base 0 and ideal 1 (the normalised scale is the raw one). The lower
    bound is the mean minus 0.5/√n on the weighted objective."""
    from types import SimpleNamespace

    from hm3.run.two_level import KEPT_EVENT, _kept_by_lower_bound

    table = {  # name: (a score, b score, examples per objective)
        "lucky": (1.0, 0.0, 4),  # λ=(1,0): best mean 1.0, but bound 1.0 − 0.25 = 0.75
        "steady": (0.9, 0.2, 100),  # λ=(1,0): 0.9 − 0.05 = 0.85, the best bound
        "steady_twin": (0.9, 0.2, 100),  # ties with steady: the lower id (steady) wins
        "coder": (0.1, 0.8, 100),  # λ=(0,1): 0.8 − 0.05 = 0.75, the best bound among paths with both scores
    }
    with RunStore.open(tmp_path / "r", config={"t": 1}, seed=0) as store:
        ids = {}
        for name, (a, b, n) in table.items():
            ids[name] = store.add_candidate({"hops": [[0, 0]], "frame": f"frame-of-{name}", "name": name},
                                            PATH_KIND).id
            for objective, score in (("a", a), ("b", b)):
                store.record_evaluation(ids[name], objective, "validation", list(range(n)), score=score, count=n,
                                        seconds=0)
        only_b = store.add_candidate({"hops": [[1, 1]], "frame": "base"}, PATH_KIND)  # no a score: no estimate
        store.record_evaluation(only_b, "b", "validation", list(range(1000)), score=1.0, count=1000, seconds=0)
        merge = store.add_candidate({"merge_method": "ties"}, "merge")  # not a path: never kept by this rule
        for objective in ("a", "b"):
            store.record_evaluation(merge, objective, "validation", list(range(1000)), score=1.0, count=1000,
                                    seconds=0)
        cfg = SimpleNamespace(level2=SimpleNamespace(keep_best=1))
        lams = np.array([[1.0, 0.0], [0.0, 1.0]])
        base, ideal = np.zeros(2), np.ones(2)
        chosen = _kept_by_lower_bound(store, cfg, lams, ["a", "b"], base, ideal)
        assert chosen == {
            ids["steady"]: {"lam": [1.0, 0.0], "frame": "frame-of-steady", "kept_by": "lower bound"},
            ids["coder"]: {"lam": [0.0, 1.0], "frame": "frame-of-coder", "kept_by": "lower bound"},
        }
        # chosen once: scores added later (the final stage's) do not change a resumed run's choice
        store.record_evaluation(ids["lucky"], "a", "validation", list(range(4, 10_000)), score=1.0, count=9_996,
                                seconds=0)
        assert _kept_by_lower_bound(store, cfg, lams, ["a", "b"], base, ideal) == chosen
        assert len(store.events(KEPT_EVENT)) == 1
        assert _kept_by_lower_bound(store, SimpleNamespace(level2=SimpleNamespace(keep_best=0)), lams, ["a", "b"],
                                    base, ideal) == {}


def test_keep_best_paths_are_scored_on_the_whole_plan_and_kept_on_resume(models, tmp_path):
    """keep_best's choice enters the run: scored on the whole validation plan, recorded once, the same
    paths after a resume; a config stored before the key existed (format 1) reads as its default."""
    cfg = parse_two_level_config(_config(models, keep_best=2))
    s = run_two_level(cfg, tmp_path / "r", progress=False)
    with RunStore.open(tmp_path / "r", readonly=True) as store:
        (event,) = store.events("kept_by_lower_bound")
        chosen = {int(c) for c in event.payload}
        assert all(store.candidate(c)[0].kind == PATH_KIND for c in chosen)
    assert 1 <= len(chosen) <= 2 * len(cfg.preferences())
    assert chosen <= {int(c) for c in s["level2_paths"]}
    candidates = pd.read_csv(tmp_path / "r" / "candidates.csv")
    assert chosen <= set(candidates.loc[candidates["level"] == 2, "point"])  # scored on the whole plan
    again = run_two_level(cfg, tmp_path / "r", resume=True, progress=False)
    assert again["level2_paths"] == s["level2_paths"]
    with RunStore.open(tmp_path / "r", readonly=True) as store:
        assert len(store.events("kept_by_lower_bound")) == 1
    plain = parse_two_level_config(_config(models)).canonical()
    assert "keep_best" not in _as_format_1(plain)["level2"] and cfg.canonical()["level2"]["keep_best"] == 2
    assert migrate_stored_config(_as_format_1(plain), where="-") == plain


def test_transition_scales_and_swap_prior_run_and_configs_stored_before_them_read_as_defaults(models, tmp_path):
    """level2.rl.transition_scales scores scaled variants of switching paths; level2.swaps keeps the
    listed swaps per preference; a config stored before either existed (format 1) reads as their
    defaults (old runs resume)."""
    from hm3.arch.path import switch_hops
    from hm3.arch.swaps import layer_swap

    default = parse_two_level_config(_config(models)).canonical()
    old = _as_format_1(default)
    assert "swaps" not in old["level2"] and "transition_scales" not in old["level2"]["rl"]
    assert migrate_stored_config(old, where="-") == default
    cfg = parse_two_level_config(_config(models, swaps=[[1, 0]], preferences=1,
                                         rl=RL | {"transition_scales": [0.5, 2.0]}))
    s = run_two_level(cfg, tmp_path / "r", progress=False)
    with RunStore.open(tmp_path / "r", readonly=True) as store:
        paths = [path_from_recipe(store.candidate(ref.id)[1])[0] for ref in store.candidates(PATH_KIND)]
        assert stored_two_level_config(store) == cfg
    scaled = [p for p in paths if p.scales is not None]
    assert scaled and all(switch_hops(p) for p in scaled)
    assert {LayerPath(p.hops) for p in scaled} <= set(paths)  # each scored plain too, on the same subset
    swaps = [v for v in s["level2_paths"].values() if str(v.get("kept_by", "")).startswith("swap")]
    assert len(swaps) == 2  # one per expert as donor
    assert layer_swap(2, 2, 0, 1, 0) in paths
    with pytest.raises(ConfigError, match=r"level2.swaps: \(2, 1\) does not fit models of 2 layers"):
        run_two_level(parse_two_level_config(_config(models, swaps=[[2, 1]])), tmp_path / "bad", progress=False)
    with pytest.raises(ConfigError, match="more than level2.rl.t_max = 1"):
        run_two_level(parse_two_level_config(_config(models, swaps=[[1, 0]], rl=RL | {"t_max": 1})),
                      tmp_path / "bad", progress=False)


def _as_format_2(stored: dict) -> dict:
    """A stored config as format 2 stored it: no evaluation device, dtype or vLLM engine settings."""
    evaluation = {k: v for k, v in stored["level1"]["evaluation"].items() if k not in ("device", "dtype", "vllm")}
    return stored | {"format": 2, "level1": stored["level1"] | {"evaluation": evaluation}}


def _as_format_1(stored: dict) -> dict:
    """A stored two-level config as format 1 stored it: the level-2 fields added after the first runs
    left out while they hold their defaults (and format 2's additions missing too)."""
    stored = _as_format_2(stored)
    level2 = {k: v for k, v in stored["level2"].items() if (k, v) not in (("keep_best", 0), ("swaps", []))}
    rl_defaults = {"path_prior": "none", "prior_kl": 1.0, "critic_margin": None, "transition_scales": None}
    level2["rl"] = {k: v for k, v in stored["level2"]["rl"].items() if k not in rl_defaults or rl_defaults[k] != v}
    return {"format": 1, "level1": stored["level1"], "level2": level2}


def test_a_run_stored_in_format_1_resumes_and_is_read_as_a_current_one(finished, tmp_path):
    """A two-level run whose store holds a format-1 config resumes under today's config (nothing evaluated
    again) and reads back; a config of a newer format is refused."""
    import shutil
    import sqlite3

    run, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("hm3.lock"))
    # the run as copied: a request --refine in another test may have added merges to its front since it finished
    summary = json.loads((copy / "summary.json").read_text())
    with RunStore.open(copy, readonly=True) as store:
        current = store.config()
        evaluations = len(store.evaluations())
    assert current["format"] == 3 and current["level2"]["keep_best"] == 0
    with sqlite3.connect(copy / "hm3.sqlite") as conn:
        conn.execute("UPDATE run SET config_json=?", (json.dumps(_as_format_1(current)),))
    with RunStore.open(copy, readonly=True) as store:
        assert stored_two_level_config(store) == parse_two_level_config(_config_of(current))
    again = run_two_level(parse_two_level_config(_config_of(current)), copy, resume=True, progress=False)
    assert again["hv_validation"] == pytest.approx(summary["hv_validation"])
    with RunStore.open(copy, readonly=True) as store:
        assert len(store.evaluations()) == evaluations
    with sqlite3.connect(copy / "hm3.sqlite") as conn:
        conn.execute("UPDATE run SET config_json=?", (json.dumps(current | {"format": 4}),))
    with pytest.raises(ConfigError, match="another hm3 version.*format 4"):
        read_front(copy)


def _config_of(stored: dict) -> dict:
    return dict(stored["level1"]) | {"level2": stored["level2"]}


def test_front_and_export_of_a_two_level_run_need_no_rl_extra(finished, tmp_path_factory, tmp_path):
    """Reading a finished run and writing its points (layer paths included) is the search extra's work;
    gymnasium is only for running level 2."""
    from tests.test_extras import hm3_without

    run, _ = finished
    sites = tmp_path_factory.mktemp("sites")
    shown = hm3_without(["gymnasium"], sites, "front", str(run))
    assert shown.returncode == 0, shown.stderr
    candidates = pd.read_csv(run / "front.csv")
    for kind in set(candidates["kind"]):
        point = candidates[candidates["kind"] == kind]["point"].iloc[0]
        written = hm3_without(["gymnasium"], sites, "export", str(run), "--point", str(point), str(tmp_path / kind))
        assert written.returncode == 0, (kind, written.stderr)
        assert (tmp_path / kind / "config.json").is_file()
