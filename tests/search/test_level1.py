"""The level-1 driver end to end on tiny models: outputs, re-merge fidelity, config errors, resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from hm3.errors import ConfigError, StoreError
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
    for f in ("front.csv", "summary.json", "front.png", "hm3.sqlite"):
        assert (run / f).exists(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == 5 and len(summary["hv_trace_validation"]) == 5
    front = pd.read_csv(run / "front.csv")
    val_cols = [c for c in front.columns if c.endswith("_val")]
    assert len(val_cols) == 2 and len(front) == summary["front_size"] >= 1
    # the front is the non-dominated set of everything evaluated, as pymoo's own sorting finds it
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    first = NonDominatedSorting().do(-np.asarray(result.Y), only_non_dominated_front=True)
    assert set(front["candidate"]) == {result.candidate_ids[i] for i in first}
    # every front point re-merges from its recipe file (hm3 merge) to the score stored
    row = front.iloc[0]
    merged = merge_to_disk(run / row["recipe"], tmp_path / "remerged").out_dir
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
        ({"name": "bo-mo", "budget": 3}, "budget 3 must exceed the initial design"),
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
    with pytest.raises(ConfigError, match="budget"):
        run_level1(parse_run_config(_config(setup, budget=4)), tmp_path / "r", resume=True, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        run_level1(parse_run_config(_config(setup, budget=3)), tmp_path / "r", progress=False)


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

    sigkill_hm3(["search", "param", str(cfg_path), str(run), "--quiet"], two_told, timeout=240)
    with RunStore.open(run, readonly=True) as s:
        before = {(e.candidate_id, e.objective, e.split) for e in s.evaluations()}
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
    from hm3.search.pareto import normalise
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
    own = float(normalise(np.array([ans.predicted]), base, ideal)[0] @ np.array([0.8, 0.2]))  # the answer's scores
    assert ans.details["weighted_normalised_score"] == pytest.approx(own, abs=1e-9)
    assert own >= float((f_hat @ np.array([0.8, 0.2])).max()) - 1e-12

    refined = answer_request(run, f"{names[0]}=0.8,{names[1]}=0.2", tmp_path / "refined", refine=1, progress=False)
    assert refined.measured is not None
    with RunStore.open(run, readonly=True) as store:
        assert len(store.events("level1_tell")) == 5 and len(store.events("request_merge")) == 1

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
