"""The compositional benchmark at toy scale, end to end: build.py's library (tiny random Llama, two
experts fine-tuned on the generated data, the score matrix) and every arm of ablation.py, resumed."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1] / "experiments" / "compositional"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"compositional_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """Tiny models run ~6x faster on one thread than on a pool contending for two loaded cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_build_and_every_ablation_arm_run_end_to_end_and_resume(tmp_path, one_thread):
    build, ablation = _module("build"), _module("ablation")
    tiny = {"steps": {"language": 2, "math": 2}, "validation_examples": 2, "test_examples": 2}
    manifest = build.build(tmp_path, toy=True, settings=tiny, argv=["--toy"])
    assert set(manifest["score_matrix"]) == {"base", "language", "math"}
    assert manifest["evaluation"] == {"device": "cpu", "dtype": "float32", "batch_size": 32}
    assert manifest["objectives"] == ["compositional:composite", "compositional:math", "compositional:language"]
    for row in manifest["score_matrix"].values():
        assert all(0.0 <= v <= 1.0 for split in ("validation", "test") for v in row[split].values())
    assert build.build(tmp_path, toy=True, settings=tiny)["seconds"]["expert_math"] == 0.0  # reused

    s = {**ablation.TOY, "budget": 2, "validation_examples": 2, "test_examples": 2, "offline_episodes": 2,
         "online_episodes": 2, "episodes_per_update": 2, "swaps": [[1, 1]]}
    arms = ablation.run_seed(manifest, s, 0, tmp_path / "ablation", log=lambda m: None)
    assert set(arms) == set(ablation.ARMS)
    two, one = arms["two_levels"], arms["level1_alone"]
    assert one["config"]["optimizer"]["budget"] == two["level1_evaluations"] + round(two["path_equivalents"])
    assert "level2" not in one["config"] and two["config"]["level2"]["rl"]["transition_scales"] == [0.8]
    assert arms["level2_alone"]["config"]["level2"]["pool"] == "experts"
    for name in ("two_levels", "level1_alone", "level2_alone"):  # every arm evaluates where the build scored
        assert {k: arms[name]["config"]["evaluation"][k] for k in ("device", "dtype", "batch_size")} == \
            manifest["evaluation"]
    assert arms["swaps"]["cost_equivalents"] == 1.0 and "1,1" in arms["swaps"]["swaps"]
    for result in arms.values():
        assert np.isfinite([result["hv_validation"], result["hv_test"], result["best_composite"]["validation"]]).all()
    again = ablation.run_seed(manifest, s, 0, tmp_path / "ablation", log=lambda m: None)  # every arm reused
    assert json.dumps(again, sort_keys=True) == json.dumps(arms, sort_keys=True)
    summary = ablation.summarise({0: arms})
    assert set(summary["mean"]) == set(ablation.ARMS) and summary["seeds"] == 1
    # a partial report reads the finished arms only
    assert json.dumps(ablation.finished_arms(tmp_path / "ablation", 0), sort_keys=True) == json.dumps(arms, sort_keys=True)
    (tmp_path / "ablation" / "seed-0" / "level2_alone.json").rename(tmp_path / "level2_alone.json")
    assert set(ablation.finished_arms(tmp_path / "ablation", 0)) == set(ablation.ARMS) - {"level2_alone"}
    (tmp_path / "level2_alone.json").rename(tmp_path / "ablation" / "seed-0" / "level2_alone.json")
    # the swap arm's references (the build's matrix) are the runs' own; a run that measured others is refused
    ablation.check_refs(tmp_path / "ablation" / "seed-0" / "two_levels", manifest)
    other = json.loads(json.dumps(manifest))
    other["score_matrix"]["math"]["test"]["compositional:math"] += 0.5
    with pytest.raises(SystemExit, match="math on test"):
        ablation.check_refs(tmp_path / "ablation" / "seed-0" / "two_levels", other)

    # the bound: swaps framed by the level-1 merge, scored on a copy (the arm's own cost is untouched)
    bound = _module("bound").swap_bound(tmp_path / "ablation" / "seed-0" / "two_levels", tmp_path / "bound",
                                        k_bottom=[1], k_top=[1], scales=[0.8])
    assert bound["path_evaluations"] == 4 and {r["switch_scale"] for r in bound["swaps"]} == {None, 0.8}
    _check_bound_against_run(bound, tmp_path / "ablation" / "seed-0" / "two_levels")
    cost_again = ablation.validation_cost(tmp_path / "ablation" / "seed-0" / "two_levels", 3, 2)
    assert cost_again == two["cost"]


def _check_bound_against_run(bound: dict, run: Path) -> None:
    """The bound's union is the run's level-1 merges plus its swaps, nothing more or less: its HVs are
    recomputed here from the run's candidates file and references, and the swaps that reach the union
    front are counted by a plain dominance check (not the module's non_dominated)."""
    from hm3.search.pareto import protocol_hypervolume

    summary = json.loads((run / "summary.json").read_text())
    cands = pd.read_csv(run / "candidates.csv")
    y1 = cands[cands["level"] == 1][[f"{o}_val" for o in summary["objectives"]]].to_numpy(float)
    refs = {k: np.array(v) for k, v in summary["reference_validation"].items()}
    base, ideal = refs.pop("base"), np.max(list(refs.values()), axis=0)
    swaps = np.array([r["validation"] for r in bound["swaps"]]).reshape(-1, len(base))
    union = np.concatenate([y1, swaps])
    assert bound["hv_level1"] == pytest.approx(protocol_hypervolume(y1, base, ideal), abs=1e-12)
    assert bound["hv_union"] == pytest.approx(protocol_hypervolume(union, base, ideal), abs=1e-12)

    def dominated(y: np.ndarray) -> bool:
        return any(np.all(o >= y) and np.any(o > y) for o in union)

    assert bound["union_front_swaps"] == sum(not dominated(y) for y in swaps)
    assert bound["best_composite_level1"] == y1[:, 0].max()
    assert bound["best_composite_swap"]["validation"][0] == swaps[:, 0].max()


def test_the_arms_evaluate_in_the_builds_device_and_dtype_and_refuse_others(tmp_path, capsys):
    ablation = _module("ablation")
    manifest = {"models": {}, "objectives": ["a"], "settings": {"validation_examples": 2, "test_examples": 2},
                "evaluation": {"device": "cpu", "dtype": "bfloat16", "batch_size": 8}}
    config = ablation.run_config(manifest, {**ablation.TOY, **manifest["settings"]}, 0, level2=None)
    assert {k: config["evaluation"][k] for k in ("device", "dtype", "batch_size")} == manifest["evaluation"]
    before_devices = {k: v for k, v in manifest.items() if k != "evaluation"}
    older = ablation.run_config(before_devices, {**ablation.TOY, **manifest["settings"]}, 0, level2=None)
    assert older["evaluation"]["dtype"] == "float32"  # a build from before devices: cpu, float32
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit):  # its references were scored in bfloat16: a float32 run would not match them
        ablation.main(["--work", str(tmp_path), "--dtype", "float32", "--partial"])
    assert "rescore it with build.py --dtype float32" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_where_there_is_none_is_refused_before_any_work(tmp_path, capsys):
    from hm3.errors import DeviceError, ExitCode

    build, ablation, bound, campaign = (_module(n) for n in ("build", "ablation", "bound", "campaign"))
    work = tmp_path / "work"
    for main, argv in ((build.main, ["--toy", "--work", str(work)]), (ablation.main, ["--toy", "--work", str(work)]),
                       (bound.main, ["--toy", "--work", str(work)]), (campaign.main, [str(work), "--toy"])):
        assert main([*argv, "--device", "cuda"]) == ExitCode.ENVIRONMENT
        assert "--device 'cuda': CUDA is not available" in capsys.readouterr().err
        assert not work.exists()
    with pytest.raises(DeviceError, match="CUDA is not available"):
        build.build(work, toy=True, device="cuda")
    assert not work.exists()


def _py(code: str) -> list[str]:
    return ["-c", code]


def test_the_campaign_stops_at_its_deadline_resumably_and_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    campaign = _module("campaign")
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    # step one writes the manifest; step two is slow the first time (it is interrupted: its finally block runs),
    # fast the next; the report counts the calls
    one = _py(f"import pathlib; open({str(calls)!r}, 'a').write('one\\n'); "
              f"pathlib.Path({str(out / 'work')!r}, 'manifest.json').write_text('{{}}')")
    two = _py(f"import pathlib, time\np = pathlib.Path({str(tmp_path / 'slow-once')!r})\n"
              f"if not p.exists():\n  p.touch()\n  try:\n    time.sleep(60)\n"
              f"  finally:\n    pathlib.Path({str(tmp_path / 'unwound')!r}).touch()")
    report = _py(f"open({str(calls)!r}, 'a').write('report\\n')")
    monkeypatch.setattr(campaign, "steps", lambda args, o: [campaign.Step("build", one), campaign.Step("two", two)])
    monkeypatch.setattr(campaign, "report_step", lambda args, o: campaign.Step("report", report))
    monkeypatch.setattr(campaign, "GRACE_S", 5.0)
    monkeypatch.setattr(campaign, "REPORT_S", 0.0)
    monkeypatch.setattr(campaign, "MIN_STEP_S", 1.0)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job: the step must still get it
    try:
        assert campaign.main([str(out), "--toy", "--deadline-s", "9"]) == campaign.DEADLINE_EXIT
    finally:
        signal.signal(signal.SIGINT, before)
    status = json.loads((out / "campaign.json").read_text())
    assert status["outcome"] == "deadline" and status["steps"]["build"]["state"] == "done"
    assert status["steps"]["two"]["state"] == "stopped" and (tmp_path / "unwound").exists()  # interrupted, cleanly
    assert calls.read_text() == "one\nreport\n" and (out / "manifest.json").is_file()
    assert "interrupted at the deadline" in (out / "campaign.log").read_text()

    assert campaign.main([str(out), "--toy", "--seeds", "0,1"]) == 2  # other settings: refused, nothing run
    assert "other settings" in capsys.readouterr().err and calls.read_text() == "one\nreport\n"
    assert campaign.main([str(out), "--toy"]) == 0  # resumed: the finished step is not run again
    status = json.loads((out / "campaign.json").read_text())
    assert status["outcome"] == "complete" and status["calls"] == 2 and status["steps"]["two"]["state"] == "done"
    assert calls.read_text() == "one\nreport\nreport\n"


def test_a_failing_step_stops_the_campaign_and_is_named(tmp_path, monkeypatch):
    campaign = _module("campaign")
    monkeypatch.setattr(campaign, "steps", lambda args, o: [campaign.Step("build", _py("raise SystemExit(3)")),
                                                           campaign.Step("never", _py("raise SystemExit(9)"))])
    assert campaign.main([str(tmp_path / "out"), "--toy"]) == 1
    status = json.loads((tmp_path / "out" / "campaign.json").read_text())
    assert status["outcome"] == "failed: build" and status["steps"]["build"] == {"state": "failed", "rc": 3,
                                                                                 "seconds": status["steps"]["build"]["seconds"]}
    assert "never" not in status["steps"] and "report" not in status["steps"]  # no manifest: nothing to report


def test_level2_alone_is_planned_at_the_two_level_runs_whole_cost(tmp_path, monkeypatch):
    """Level 2 alone has no level-1 stage: at the two-level run's episode counts it would spend only that
    run's level-2 share. Its episodes are scaled up to the whole cost, and a result of another plan is not reused."""
    ablation = _module("ablation")
    manifest = {"models": {"base": "b", "language": "l", "math": "m"}, "objectives": ["c", "m", "l"],
                "evaluation": {"device": "cpu", "dtype": "float32", "batch_size": 32}}
    s = {**ablation.REAL, "validation_examples": 64, "test_examples": 128}

    def fake_hm3_arm(manifest, s, seed, run_dir, *, level2, budget=None):
        config = ablation.run_config(manifest, {**s, "budget": budget or s["budget"]}, seed, level2=level2)
        if level2 == "experts+merge":  # the measured costs of the SmolLM2 run's seed 0
            return {"config": config, "cost_equivalents": 85.5, "path_equivalents": 69.5, "level1_evaluations": 16}
        rl = config.get("level2", {}).get("rl", {})
        per_episode = 69.5 / (48 + 2 * 16)  # that run's level-2 cost per episode
        episodes = rl.get("offline_episodes", 0) + s["preferences"] * rl.get("online_episodes", 0)
        return {"config": config, "cost_equivalents": budget or round(episodes * per_episode, 1)}

    monkeypatch.setattr(ablation, "hm3_arm", fake_hm3_arm)
    monkeypatch.setattr(ablation, "swap_arm", lambda *a: {"cost_equivalents": 6.0})
    monkeypatch.setattr(ablation, "check_refs", lambda *a: None)
    monkeypatch.setattr(ablation, "protocol_refs", lambda m: {})
    arms = ablation.run_seed(manifest, s, 0, tmp_path, log=lambda m: None)
    costs = {name: arms[name]["cost_equivalents"] for name in ("two_levels", "level1_alone", "level2_alone")}
    assert costs["level1_alone"] == 86
    assert costs["two_levels"] <= costs["level2_alone"] <= costs["two_levels"] * 1.03, costs
    rl = arms["level2_alone"]["config"]["level2"]["rl"]
    assert (rl["offline_episodes"], rl["online_episodes"]) == (60, 20)  # 48 and 16 times 85.5 / 69.5, rounded up

    stale = json.loads((tmp_path / "seed-0" / "level2_alone.json").read_text())
    stale["config"]["level2"]["rl"]["offline_episodes"] = 48
    (tmp_path / "seed-0" / "level2_alone.json").write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match="another config"):
        ablation.run_seed(manifest, s, 0, tmp_path, log=lambda m: None)


def test_finished_arms_of_the_same_plan_are_reused_whatever_their_evaluation_keys(tmp_path, monkeypatch):
    """Arms finished before the evaluation device was recorded (hours of SmolLM2 work) stay reusable."""
    ablation = _module("ablation")
    record = json.loads((Path(__file__).resolve().parents[1] / "experiments" / "results" /
                         "compositional_ablation_2026-12-04_9890cfa_partial.json").read_text())
    arms = record["per_seed"]["0"]
    manifest = {"models": arms["two_levels"]["config"]["models"], "objectives": arms["two_levels"]["config"]["objectives"]}
    s = {**ablation.REAL, **record["settings"]}
    seed_dir = tmp_path / "seed-0"
    seed_dir.mkdir()
    for name in ("swaps", "two_levels", "level1_alone"):
        (seed_dir / f"{name}.json").write_text(json.dumps(arms[name]))
    monkeypatch.setattr(ablation, "check_refs", lambda *a: None)
    monkeypatch.setattr(ablation, "protocol_refs", lambda m: {})
    ran = []
    monkeypatch.setattr(ablation, "hm3_arm", lambda m, s, seed, run_dir, **k: ran.append(run_dir.name) or
                        {"config": ablation.arm_config(m, s, seed, **k)})
    out = ablation.run_seed(manifest, s, 0, tmp_path, log=lambda m: None)
    assert ran == ["level2_alone"] and out["two_levels"] == arms["two_levels"]
