"""The level-1 driver end to end on tiny models: outputs, re-merge fidelity, config errors, resume."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hm3.errors import ConfigError, Hm3Warning, StoreError
from hm3.eval.evaluate import evaluate_objective
from hm3.eval.hf import HFBackend
from hm3.merge.engine import merge_to_disk
from hm3.search.level1 import make_optimizer, preference_design, run_level1
from hm3.search.optimizers.random import sobol_points
from hm3.search.run_config import parse_run_config
from hm3.store import RunStore
from objectives.registry import get_objective


@pytest.fixture(scope="module")
def setup(tiny_family):
    return tiny_family


def _config(setup, **optimizer) -> dict:
    _, models, objectives = setup
    return {
        "models": models,
        "objectives": objectives,
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": True},
        "optimizer": {"name": "random", "budget": 5} | optimizer,
        "evaluation": {"validation_examples": 12, "test_examples": 12, "batch_size": 16},
        "seed": 3,
    }


def test_level1_outputs_and_front_points_remerge_to_stored_scores(setup, tmp_path):
    cfg = parse_run_config(_config(setup))
    result = run_level1(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for f in ("front.csv", "candidates.csv", "summary.json", "front.png", "hm3.sqlite"):
        assert (run / f).exists(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == 5 and len(summary["hv_trace_validation"]) == 5
    placement = summary["placement_this_process"]
    assert (placement["device"], placement["dtype"], placement["task_vectors"]) == ("cpu", "float32", "resident")
    front = pd.read_csv(run / "front.csv")
    val_cols = [c for c in front.columns if c.endswith("_val")]
    assert len(val_cols) == 2 and len(front) == summary["front_size"] >= 1
    # the front is the non-dominated set of everything evaluated, as pymoo's own sorting finds it
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    first = NonDominatedSorting().do(-np.asarray(result.Y), only_non_dominated_front=True)
    assert set(front["point"]) == {result.candidate_ids[i] for i in first}
    # every front point re-merges from its recipe file (hm3 merge) to the score stored
    row = front.iloc[0]
    merged = merge_to_disk(run / row["file"], tmp_path / "remerged").out_dir
    backend = HFBackend.from_pretrained(merged, batch_size=16)
    for spec, col in zip(cfg.objectives, val_cols, strict=True):
        r = evaluate_objective(backend, get_objective(spec), "validation", list(range(12)))
        assert r.score == pytest.approx(row[col], abs=1e-9)
    assert result.front_ids


def test_config_errors_reported_before_any_evaluation(setup, tmp_path):
    bad = [
        (_config(setup, name="simulated-annealing"), "simulated-annealing"),
        (_config(setup) | {"search_space": {"base_model": "base", "models": ["m1", "m9"]}}, "m9"),
        (_config(setup) | {"search_space": {"base_model": "base", "models": ["m1"], "weight_bounds": [1, 0]}}, "reversed"),
        (_config(setup) | {"objectivs": []}, "objectivs"),
    ]
    for data, mention in bad:
        with pytest.raises(ConfigError, match=mention):
            run_level1(parse_run_config(data), tmp_path / "never", progress=False)
        assert not (tmp_path / "never" / "hm3.sqlite").exists()


@pytest.mark.parametrize(
    ("optimizer", "mention"),
    [
        ({"name": "bo-mo", "budget": 3, "options": {"n_init": 3}}, "budget 3 must exceed the initial design"),
        ({"name": "bo-mo", "budget": 2}, "budget 2 must exceed the initial design"),  # too small to shrink it
        ({"name": "bo-mo", "options": {"initial_design": "latin"}}, "initial_design must be one of"),
        ({"name": "random", "options": {"initial_design": "preferences"}}, "option of the BO optimisers"),
        ({"name": "bo-mo", "options": {"acquisition": "ei"}}, "optimizer.options.acquisition: unknown key"),
    ],
)
def test_optimizer_option_errors_refused_before_any_evaluation(setup, tmp_path, optimizer, mention):
    with pytest.raises(ConfigError, match=mention):
        run_level1(parse_run_config(_config(setup, **optimizer)), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "hm3.sqlite").exists()


def test_preference_design_puts_the_weights_on_the_simplex(setup):
    cfg = parse_run_config(_config(setup, name="bo-mo", budget=20, options={"initial_design": "preferences"}))
    X = preference_design(cfg.search_space, 12, seed=3)
    values = [cfg.search_space.decode(x) for x in X]
    sums = [sum(w for row in v["weight"] for w in row) for v in values]
    assert sums == pytest.approx([1.0] * 12)
    densities = np.array([[d for row in v["density"] for d in row] for v in values])
    assert densities.std(axis=0).min() > 0.1  # densities still spread (Sobol), not fixed
    assert torch.equal(X, preference_design(cfg.search_space, 12, seed=3))  # a pure function of the seed
    first = make_optimizer(cfg).ask(4)  # the run's design: budget-many points, first n_init evaluated
    assert torch.equal(first, preference_design(cfg.search_space, 20, seed=cfg.seed)[:4])


@pytest.mark.parametrize(
    ("weight_bounds", "design", "expected"),
    [
        ([0.0, 1.0], None, "preferences"),  # auto: the simplex fits the bounds
        ([0.0, 0.8], None, "sobol"),  # auto: λ = (1, 0) would fall outside them
        ([0.0, 1.0], "sobol", "sobol"),
    ],
)
def test_initial_design_auto_uses_preferences_where_the_simplex_fits(setup, weight_bounds, design, expected):
    data = _config(setup, name="bo-mo", budget=20, options={"initial_design": design} if design else {})
    data["search_space"]["weight_bounds"] = weight_bounds
    cfg = parse_run_config(data)
    first = make_optimizer(cfg).ask(3)
    if expected == "preferences":
        assert torch.equal(first, preference_design(cfg.search_space, 20, seed=cfg.seed)[:3])
    else:
        assert torch.equal(first, sobol_points(cfg.search_space.dim, seed=cfg.seed, start=0, n=3))


def test_resume_with_a_different_config_names_the_difference(setup, tmp_path):
    run_level1(parse_run_config(_config(setup, budget=3)), tmp_path / "r", progress=False, stop_after=1)
    changed = _config(setup, budget=3)
    changed["evaluation"] = changed["evaluation"] | {"validation_examples": 11}
    with pytest.raises(ConfigError, match=r"differing keys.*evaluation\.validation_examples: 12 -> 11"):
        run_level1(parse_run_config(changed), tmp_path / "r", resume=True, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        run_level1(parse_run_config(_config(setup, budget=3)), tmp_path / "r", progress=False)


@pytest.mark.slow
@pytest.mark.e2e
def test_kill_9_then_resume_loses_and_repeats_nothing(setup, tmp_path, sigkill_hm3):
    cfg_path = tmp_path / "cfg.yml"
    cfg_path.write_text(yaml.safe_dump(_config(setup, budget=6)))
    run = tmp_path / "killed"

    def two_told() -> bool:
        if not (run / "hm3.sqlite").exists():
            return False
        try:
            with RunStore.open(run, readonly=True) as s:
                return len(s.events("level1_tell")) >= 2
        except StoreError:  # the writer is still creating the schema
            return False

    sigkill_hm3(["search", "param", str(cfg_path), str(run), "--quiet"], two_told,
                pause_at="hm3.store:RunStore.record_evaluation", timeout=240)
    with RunStore.open(run, readonly=True) as s:
        before = {(e.candidate_id, e.objective, e.split) for e in s.evaluations()}
        assert len(s.events("level1_tell")) == 2  # killed mid-search, as the third point's first score was to be stored
    assert len(before) >= 2 * 2
    resumed = run_level1(parse_run_config(yaml.safe_load(cfg_path.read_text())), run, resume=True, progress=False)
    with RunStore.open(run, readonly=True) as s:
        rows = s.evaluations()
        tells = s.events("level1_tell")
    keys = [(e.candidate_id, e.objective, e.split) for e in rows]
    assert len(keys) == len(set(keys)), "an evaluation was repeated"
    assert before <= set(keys), "an evaluation was lost"
    assert len(tells) == 6
    straight = run_level1(parse_run_config(yaml.safe_load(cfg_path.read_text())), tmp_path / "straight", progress=False)
    np.testing.assert_allclose(resumed.X, straight.X, rtol=0, atol=0)
    np.testing.assert_allclose(resumed.Y, straight.Y, rtol=0, atol=0)


@pytest.mark.slow
def test_resumed_bo_run_asks_exactly_the_points_of_an_uninterrupted_one(setup, tmp_path):
    """A model-based optimiser's next point depends on every digit of the history it is told: the
    replay after a stop must hand it the float64 points it asked, not float32 copies (which once
    moved a resumed demo's BO step by 4e-4 and its whole front after it)."""
    data = _config(setup, name="bo-mo", budget=5, options={"n_init": 2, "num_restarts": 2, "raw_samples": 16})

    def told(run) -> list[list[float]]:
        with RunStore.open(run, readonly=True) as store:
            return [e.payload["x"] for e in store.events("level1_tell")]

    run_level1(parse_run_config(data), tmp_path / "straight", progress=False)
    run_level1(parse_run_config(data), tmp_path / "stopped", progress=False, stop_after=3)  # design + 1 BO step
    run_level1(parse_run_config(data), tmp_path / "stopped", resume=True, progress=False)
    assert told(tmp_path / "stopped") == told(tmp_path / "straight")


def test_a_level1_search_answers_preference_requests(setup, tmp_path, capsys):
    """``hm3 request`` on an ``hm3 search param`` run: budget 0 from its front and saved BO posterior
    without evaluating; --refine adds merge evaluations; --budget (level-2 fine-tuning) and an
    unfinished search are refused with what to do instead."""
    from hm3.cli import main
    from hm3.request import answer_request
    from hm3.search.pareto import non_dominated, normalise, protocol_hypervolume
    from hm3.search.posterior import POSTERIOR_FILE

    run = tmp_path / "run"
    run_level1(parse_run_config(_config(setup)), run, progress=False)
    assert (run / POSTERIOR_FILE).is_file()  # saved by the level-1 search itself
    summary = json.loads((run / "summary.json").read_text())
    names = summary["objectives"]
    with RunStore.open(run, readonly=True) as store:
        before = len(store.evaluations())
    ans = answer_request(run, f"{names[0]}=0.8,{names[1]}=0.2", tmp_path / "answer", progress=False)
    with RunStore.open(run, readonly=True) as store:
        assert len(store.evaluations()) == before
    assert ans.evaluations == 0 and ans.kind == "merge" and ans.details["frame"] is None
    assert (tmp_path / "answer" / "config.json").is_file()
    # at least as good, by its (predicted) Σλf̂, as every front point; base and ideal as the search's HV
    refs = summary["reference_validation"]
    base, ideal = np.array(refs["base"]), np.max([refs["m1"], refs["m2"]], axis=0)
    front = pd.read_csv(run / "front.csv")
    f_hat = normalise(front[[f"{n}_val" for n in names]].to_numpy(float), base, ideal)
    own = float(normalise(np.array([ans.scores]), base, ideal)[0] @ np.array([0.8, 0.2]))  # the answer's scores
    assert ans.details["weighted_normalised_score"] == pytest.approx(own, abs=1e-9)
    assert own >= float((f_hat @ np.array([0.8, 0.2])).max()) - 1e-12
    # a front point's scores are stored measurements, the posterior's proposal a prediction
    assert ans.scores_are == ("measured" if ans.source.startswith("front point") else "predicted")
    (run / POSTERIOR_FILE).rename(tmp_path / POSTERIOR_FILE)  # without it, only front points answer
    from_front = answer_request(run, f"{names[0]}=0.8,{names[1]}=0.2", tmp_path / "front-only", progress=False)
    (tmp_path / POSTERIOR_FILE).rename(run / POSTERIOR_FILE)
    assert from_front.source.startswith("front point") and from_front.scores_are == "measured"
    assert json.loads((tmp_path / "front-only" / "hm3_request.json").read_text())["scores_are"] == "measured"

    before_refine = set(pd.read_csv(run / "candidates.csv")["point"])
    refined = answer_request(run, f"{names[0]}=0.8,{names[1]}=0.2", tmp_path / "refined", refine=1, progress=False)
    assert refined.measured is not None
    with RunStore.open(run, readonly=True) as store:
        assert len(store.events("level1_tell")) == 5 and len(store.events("request_merge")) == 1
        (new_merge,) = [e.payload["candidate"] for e in store.events("request_merge")]
        new_scores = store.evaluations(new_merge, split="validation")
    # the refinement joined the run's candidates, and the front and summary were written again over them
    candidates = pd.read_csv(run / "candidates.csv")
    after = json.loads((run / "summary.json").read_text())
    assert new_merge in set(candidates["point"]) and after.get("refined_merges", 0) == len({new_merge} - before_refine)
    assert after["candidates"] == len(candidates) == len(before_refine | {new_merge})
    assert [e.score for e in new_scores] == pytest.approx(
        candidates.loc[candidates["point"] == new_merge, [f"{n}_val" for n in names]].to_numpy()[0].tolist())
    vals = candidates[[f"{n}_val" for n in names]].to_numpy()
    front_after = pd.read_csv(run / "front.csv")
    assert set(front_after["point"]) == set(candidates["point"].iloc[non_dominated(vals)])
    assert after["front_size"] == len(front_after) and np.isfinite(front_after.filter(like="_test").to_numpy()).all()
    assert after["hv_validation"] == pytest.approx(protocol_hypervolume(vals, base, ideal))

    assert main(["request", str(run), "--prefer", f"{names[0]}=1", str(tmp_path / "tuned"), "--budget", "2"]) != 0
    assert "no level-2 policy" in capsys.readouterr().err and not (tmp_path / "tuned").exists()

    unfinished = tmp_path / "unfinished"
    run_level1(parse_run_config(_config(setup)), unfinished, progress=False, stop_after=2)
    with pytest.raises(ConfigError, match="unfinished level-1 search.*hm3 search param .*--resume"):
        answer_request(unfinished, f"{names[0]}=1", tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def _finished_cli_run(setup, tmp_path):
    """A finished level-1 search run through the CLI, its config file, and its outputs' bytes."""
    from hm3.cli import main

    cfg_path, run = tmp_path / "cfg.yml", tmp_path / "run"
    cfg_path.write_text(yaml.safe_dump(_config(setup, budget=4)))
    assert main(["search", "param", str(cfg_path), str(run), "--quiet"]) == 0
    return cfg_path, run, _outputs(run)


def _outputs(run):
    """Bytes of a run directory's output files (not the store and its SQLite side files, nor the lock)."""
    return {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and not f.name.startswith("hm3.")}


@pytest.mark.parametrize("damage", ["zero-byte", "schema_version", "event field"])
def test_a_damaged_store_is_refused_on_resume_and_nothing_is_overwritten(setup, tmp_path, capsys, damage):
    """``: > RUN/hm3.sqlite; hm3 search param CHANGED.yml RUN --resume`` and its kin: refused with a
    message, exit non-zero, every output file as it was."""
    import sqlite3

    from hm3.cli import main

    cfg_path, run, before = _finished_cli_run(setup, tmp_path)
    store = run / "hm3.sqlite"
    if damage == "zero-byte":
        for side in ("-wal", "-shm"):
            (run / f"hm3.sqlite{side}").unlink(missing_ok=True)
        store.write_bytes(b"")
        changed = tmp_path / "changed.yml"
        changed.write_text(yaml.safe_dump(_config(setup, budget=5)))
        cfg_path = changed
    else:
        with sqlite3.connect(store) as conn:
            if damage == "schema_version":
                conn.execute("UPDATE meta SET value='v1' WHERE key='schema_version'")
            else:
                conn.execute("UPDATE events SET payload_json='{\"candidate\": 1}' WHERE kind='level1_tell'")
    capsys.readouterr()
    assert main(["search", "param", str(cfg_path), str(run), "--resume", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "hm3: error:" in err and str(store) in err
    assert _outputs(run) == before
    if damage == "zero-byte":
        assert store.stat().st_size == 0


def test_a_new_run_refuses_a_directory_with_outputs_but_no_store(setup, tmp_path, capsys):
    from hm3.cli import main

    cfg_path, run, before = _finished_cli_run(setup, tmp_path)
    for f in run.glob("hm3.sqlite*"):
        f.unlink()
    assert main(["search", "param", str(cfg_path), str(run), "--quiet"]) != 0
    assert "no run store" in capsys.readouterr().err
    assert (run / "summary.json").read_bytes() == before["summary.json"]


def test_front_and_export_accept_a_level1_search(setup, tmp_path, capsys):
    """``hm3 front`` and ``hm3 export`` read a level-1 search like a two-level run: one layout."""
    from hm3.cli import main

    _, run, _ = _finished_cli_run(setup, tmp_path)
    (run / "front.png").unlink()
    capsys.readouterr()
    assert main(["front", str(run)]) == 0
    out = capsys.readouterr().out
    front = pd.read_csv(run / "front.csv")
    summary = json.loads((run / "summary.json").read_text())
    assert list(front.columns[:3]) == ["point", "level", "kind"] and front.columns[-1] == "file"
    assert set(front["kind"]) == {"merge"} and summary["run_kind"] == "level1"
    assert "HV validation" in out and all(str(p) in out for p in front["point"]) and (run / "front.png").is_file()
    names = summary["objectives"]
    for _, row in front.iterrows():
        dest = tmp_path / f"p{row['point']}"
        assert main(["export", str(run), "--point", str(row["point"]), str(dest)]) == 0
        backend = HFBackend.from_pretrained(dest, batch_size=16)  # the exported model scores what the front says
        for spec, name in zip(_config(setup)["objectives"], names, strict=True):
            score = evaluate_objective(backend, get_objective(spec), "validation", list(range(12))).score
            assert score == pytest.approx(row[f"{name}_val"], abs=1e-9)
    assert main(["export", str(run), "--point", "99999", str(tmp_path / "x")]) != 0
    assert "no front point 99999" in capsys.readouterr().err


def test_a_level1_search_of_the_earlier_layout_is_read_and_rewritten(setup, tmp_path, capsys):
    """A search written before level-1 searches shared the run layout (``candidate``/``recipe``
    columns, ``recipes/``, no candidates.csv, its config stored bare): ``front``, ``export`` and
    ``request`` read it; resuming it writes the current layout without evaluating anything."""
    import sqlite3

    from hm3.cli import main

    cfg_path, run, current = _finished_cli_run(setup, tmp_path)
    front = pd.read_csv(run / "front.csv")
    (run / "recipes").mkdir()
    for _, row in front.iterrows():
        (run / row["file"]).rename(run / "recipes" / f"candidate-{row['point']}.yml")
    (run / "points").rmdir()
    old = front.drop(columns=["kind", "file"]).rename(columns={"point": "candidate"})
    old["recipe"] = [f"recipes/candidate-{p}.yml" for p in front["point"]]
    old.to_csv(run / "front.csv", index=False)
    (run / "candidates.csv").unlink()
    summary = json.loads(current["summary.json"])
    for key in ("run_kind", "run_format", "candidates", "front_levels", "base_validation", "ideal_validation"):
        del summary[key]
    (run / "summary.json").write_text(json.dumps(summary))
    with sqlite3.connect(run / "hm3.sqlite") as conn:
        stored = json.loads(conn.execute("SELECT config_json FROM run").fetchone()[0])
        conn.execute("UPDATE run SET config_json=?", (json.dumps(stored["level1"]),))
    with RunStore.open(run, readonly=True) as store:
        evaluations = len(store.evaluations())
        assert "format" not in store.config()

    capsys.readouterr()
    assert main(["front", str(run)]) == 0
    assert all(str(p) in capsys.readouterr().out for p in front["point"])
    point = int(front["point"].iloc[0])
    assert main(["export", str(run), "--point", str(point), str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "config.json").is_file()
    names = summary["objectives"]
    assert main(["request", str(run), "--prefer", f"{names[0]}=1", str(tmp_path / "answer"), "--quiet"]) == 0
    assert (tmp_path / "answer" / "config.json").is_file()

    assert main(["search", "param", str(cfg_path), str(run), "--resume", "--quiet"]) == 0
    with RunStore.open(run, readonly=True) as store:
        assert len(store.evaluations()) == evaluations
    rewritten = pd.read_csv(run / "front.csv")
    assert rewritten.equals(pd.read_csv(io.BytesIO(current["front.csv"])))
    assert (run / "candidates.csv").read_bytes() == current["candidates.csv"]


def test_resuming_a_search_with_a_larger_budget_extends_it(setup, tmp_path, capsys):
    """``hm3 search param CFG RUN --resume --budget N`` extends a finished search: it asks exactly what
    a search made with budget N from the start asked; a budget below what is done is refused."""
    from hm3.cli import main

    cfg_path, run, _ = _finished_cli_run(setup, tmp_path)  # random search, budget 4
    assert main(["search", "param", str(cfg_path), str(run), "--resume", "--budget", "6", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == 6 and summary["budget"] == 6
    straight = run_level1(parse_run_config(_config(setup, budget=6)), tmp_path / "straight", progress=False)
    with RunStore.open(run, readonly=True) as store:
        told = [e.payload["x"] for e in store.events("level1_tell")]
        assert [e.payload for e in store.events("budget_changed")] == [{"from": 4, "to": 6}]
    assert told == straight.X.tolist()
    assert pd.read_csv(run / "front.csv").equals(pd.read_csv(tmp_path / "straight" / "front.csv"))
    capsys.readouterr()
    assert main(["search", "param", str(cfg_path), str(run), "--resume", "--budget", "5", "--quiet"]) != 0
    assert "a search of 6 evaluations: resume it with a budget of at least 6" in capsys.readouterr().err


def test_a_budget_below_the_default_design_shrinks_it_with_a_warning(setup, tmp_path):
    """bo-mo's default design here is 2 (d + 1) = 10 points: a budget of 6 shrinks it to 3 (said so), and
    a search extended later keeps the design it began with."""
    cfg = parse_run_config(_config(setup, name="bo-mo", budget=6))
    with pytest.warns(Hm3Warning, match="design shrinks to 3, leaving 3 model-based steps"):
        assert make_optimizer(cfg).n_init == 3
    extended = parse_run_config(_config(setup, name="bo-mo", budget=20))
    with pytest.warns(Hm3Warning, match="design shrinks to 3"):
        assert make_optimizer(extended, design_budget=6).n_init == 3
    assert make_optimizer(extended).n_init == 10
    explicit = parse_run_config(_config(setup, name="bo-mo", budget=6, options={"n_init": 4}))
    assert make_optimizer(explicit).n_init == 4  # a design the config sets is never changed
    small = _config(setup, name="bo-mo", budget=3, options={"num_restarts": 2, "raw_samples": 16})
    with pytest.warns(Hm3Warning, match="design shrinks to 2"):
        result = run_level1(parse_run_config(small), tmp_path / "r", progress=False)
    assert len(result.candidate_ids) == 3 and result.summary["evaluations"] == 3


def _load_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_a_search_over_two_methods_scores_both_and_merges_back_to_what_it_scored(setup, tmp_path, capsys):
    """``methods: [dare_ties, della]``: candidates of both methods are evaluated and stored under recipes
    that name their method; a resume asks what an uninterrupted search did; a della candidate's recipe
    merged by ``hm3 merge`` (and every front point by ``hm3 export``) gives the very tensors the in-memory
    merger scored. Bitwise: both paths run the same float32 ops on the same float32 task vectors
    (θ_k − θ_base) with the same seeded drop masks, on the CPU, and the tiny models are float32."""
    from hm3.cli import main
    from hm3.config import parse_merge_config
    from hm3.merge.inmemory import InMemoryMerger
    from hm3.run.front import recipe_with_paths

    data = _config(setup, budget=6)
    data["search_space"] = {"base_model": "base", "models": ["m1", "m2"], "methods": ["dare_ties", "della"]}
    cfg = parse_run_config(data)
    assert cfg.search_space.dim == 2 * 3 + 2  # weights, densities, epsilons, lambda, method
    run = tmp_path / "run"
    run_level1(cfg, run, progress=False, stop_after=3)
    resumed = run_level1(cfg, run, resume=True, progress=False)
    straight = run_level1(cfg, tmp_path / "straight", progress=False)
    np.testing.assert_array_equal(resumed.X, straight.X)
    np.testing.assert_array_equal(resumed.Y, straight.Y)
    with RunStore.open(run, readonly=True) as store:
        assert store.config()["level1"]["search_space"]["methods"] == ["dare_ties", "della"]
        recipes = {cid: store.candidate(cid)[1] for cid in resumed.candidate_ids}
        for cid in recipes:
            assert len(store.evaluations(cid, split="validation")) == 2  # both objectives, stored
    assert len(resumed.candidate_ids) == 6
    for x, cid in zip(resumed.X, resumed.candidate_ids, strict=True):
        assert recipes[cid] == cfg.search_space.to_recipe(torch.tensor(x, dtype=torch.float64))
        assert recipes[cid]["merge_method"] == cfg.search_space.method_of(torch.tensor(x, dtype=torch.float64))
    assert {r["merge_method"] for r in recipes.values()} == {"dare_ties", "della"}

    _, models, _ = setup
    merger = InMemoryMerger(models["base"], [models["m1"], models["m2"]], base_ref="base", model_refs=["m1", "m2"])
    della_id = next(cid for cid, r in recipes.items() if r["merge_method"] == "della")
    recipe_file = tmp_path / "della.yml"
    recipe_file.write_text(yaml.safe_dump(recipe_with_paths(recipes[della_id], models)))
    assert main(["merge", str(recipe_file), str(tmp_path / "della-merged")]) == 0
    scored = merger.merged_state(parse_merge_config(recipes[della_id]))
    on_disk = _load_tensors(tmp_path / "della-merged")
    assert set(on_disk) == set(scored)
    for name, tensor in scored.items():
        assert torch.equal(on_disk[name], tensor), name
    backend = HFBackend.from_pretrained(tmp_path / "della-merged", batch_size=16)  # and it scores what was stored
    stored = resumed.Y[resumed.candidate_ids.index(della_id)]
    for spec, score in zip(cfg.objectives, stored, strict=True):
        assert evaluate_objective(backend, get_objective(spec), "validation", list(range(12))).score == score

    front = pd.read_csv(run / "front.csv")
    for point, file in zip(front["point"], front["file"], strict=True):
        assert yaml.safe_load((run / file).read_text())["merge_method"] == recipes[point]["merge_method"]
        dest = tmp_path / f"export-{point}"
        assert main(["export", str(run), "--point", str(point), str(dest)]) == 0
        exported = _load_tensors(dest)
        for name, tensor in merger.merged_state(parse_merge_config(recipes[point])).items():
            assert torch.equal(exported[name], tensor), (point, name)


def test_an_unknown_method_is_refused_before_anything_runs(setup, tmp_path):
    data = _config(setup)
    data["search_space"] = {"base_model": "base", "models": ["m1", "m2"], "methods": ["dare_ties", "slerpp"]}
    with pytest.raises(ConfigError, match="methods: unknown merge method 'slerpp'; level 1 searches: breadcrumbs"):
        parse_run_config(data, source="cfg.yml")


def test_a_bo_design_over_methods_spreads_the_methods_and_keeps_weights_on_the_simplex(setup):
    data = _config(setup, name="bo-mo", budget=20)
    data["search_space"] = {"base_model": "base", "models": ["m1", "m2"], "methods": ["ties", "breadcrumbs_ties"]}
    cfg = parse_run_config(data)
    first = make_optimizer(cfg).ask(4)  # auto: the preference design (the weight bounds hold [0, 1])
    space = cfg.search_space
    assert {space.method_of(x) for x in first} == {"ties", "breadcrumbs_ties"}
    for x in first:
        assert sum(row[0] for row in space.decode(x)["weight"]) == pytest.approx(1.0)


def test_a_model_path_under_a_tilde_is_read_from_the_users_home(tiny_family, tmp_path, monkeypatch):
    """``~/models/base`` in a run config is the home folder's, as merge recipes and ``hm3 check`` read it, not a
    folder called ``~`` beside the config."""
    _, models, objectives = tiny_family
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for ref, path in models.items():
        (home / "models" / ref).symlink_to(path)
    monkeypatch.setenv("HOME", str(home))
    data = {"models": {ref: f"~/models/{ref}" for ref in models}, "objectives": objectives,
            "search_space": {"base_model": "base", "models": ["m1", "m2"]}}
    cfg = parse_run_config(data, source="run.yml", base_dir=tmp_path / "configs")
    assert cfg.models == {ref: str(home / "models" / ref) for ref in models}
