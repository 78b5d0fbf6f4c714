"""--log-samples: per-example records of scored candidates, on the shipped micro zoo with tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hm3.cli import main
from hm3.errors import ExitCode, RunFileError
from hm3.eval.evaluate import evaluate_objective
from hm3.eval.hf import HFBackend
from hm3.samples import SAMPLES_DIR, SampleLog, file_stems, read_samples
from hm3.search.level1 import run_level1
from hm3.search.run_config import parse_run_config
from hm3.store import RunStore
from objectives.registry import get_objective

EXAMPLES = 4  # per objective and split: every test here stays at seconds


def _config(zoo: Path, budget: int = 2, **evaluation) -> dict:
    return {"zoo": str(zoo), "search_space": {"dare": False, "weight_bounds": [0.0, 1.0]},
            "optimizer": {"name": "random", "budget": budget},
            "evaluation": {"validation_examples": EXAMPLES, "test_examples": EXAMPLES, "batch_size": 8} | evaluation,
            "seed": 0}


def _files(run: Path) -> set[tuple[int, str]]:
    root = run / SAMPLES_DIR
    return {(int(p.parent.name), p.name) for p in root.glob("*/*.jsonl")} if root.exists() else set()


def _stored(run: Path) -> list:
    with RunStore.open(run, readonly=True) as store:
        return store.evaluations()


def _expected_files(run: Path) -> set[tuple[int, str]]:
    """One file per stored (candidate, objective, split), named as the docs say."""
    rows = _stored(run)
    stems = file_stems(sorted({e.objective for e in rows}))
    return {(e.candidate_id, f"{stems[e.objective]}_{e.split}.jsonl") for e in rows}


def test_objective_names_become_safe_unique_file_names(tmp_path):
    names = ["../../etc/passwd", "a/b", "a:b", ".hidden", "..", "", "zoo:math", "x" * 300]
    log = SampleLog(tmp_path / "s", names)
    paths = [log.path(n, "validation", 7) for n in names]
    for name, path in zip(names, paths, strict=True):
        assert path.parent == tmp_path / "s" / "7", name  # no name leaves the candidate's folder
        assert not path.name.startswith(".") and len(path.name) < 128 and "/" not in path.name, name
    assert len(set(paths)) == len(names)  # a/b and a:b both sanitise to a_b: the hash keeps them apart
    assert log.path("zoo:math", "test").name == "zoo_math_test.jsonl"  # a name that collides with none is kept readable
    assert log.path("a/b", "test").name.startswith("a_b-")
    written = log.write("../../etc/passwd", "test", [{"example_id": "e", "output": "o"}], 7)
    assert written.resolve().is_relative_to((tmp_path / "s").resolve())
    assert read_samples(written) == [{"objective": "../../etc/passwd", "split": "test", "example_id": "e", "output": "o"}]


def test_a_file_keeps_one_record_per_example_across_writes(tmp_path):
    """A candidate scored on other examples of a split (level 2's subsets) adds records; the same examples
    replace theirs; hm3 eval's replace=True starts the file afresh."""
    log = SampleLog(tmp_path, ["m"])
    log.write("m", "validation", [{"example_id": "e1", "output": "a"}, {"example_id": "e2", "output": "b"}], 3)
    path = log.write("m", "validation", [{"example_id": "e2", "output": "B"}, {"example_id": "e3", "output": "c"}], 3)
    assert [(r["example_id"], r["output"]) for r in read_samples(path)] == [("e1", "a"), ("e2", "B"), ("e3", "c")]
    log.write("m", "validation", [{"example_id": "e9", "output": "z"}], 3, replace=True)
    assert [r["example_id"] for r in read_samples(path)] == ["e9"]
    path.write_text('{"example_id": "e1"}\nnot json\n')
    with pytest.raises(RunFileError, match=f"{path.name}:2"):
        log.write("m", "validation", [], 3)


def test_records_are_the_evaluation_outputs_and_average_to_its_score(micro_zoo_dir, tmp_path, capsys):
    """hm3 eval --log-samples DIR: one record per example holding exactly the outputs evaluate_objective
    returns; for a mean-aggregated objective the per-example scores average to the printed score, and
    asking for samples changes no score (corpus chrF included)."""
    model = micro_zoo_dir / "math"
    assert main(["eval", str(model), "--objectives", "zoo:math,zoo:translation", "--split", "validation",
                 "--limit", "6", "--log-samples", str(tmp_path / "out"), "--json"]) == 0
    printed = {r["objective"]: r["score"] for r in json.loads(capsys.readouterr().out)["results"]}
    backend = HFBackend.from_pretrained(model, batch_size=8)
    try:
        for name in ("zoo:math", "zoo:translation"):
            obj = get_objective(name)
            plain = evaluate_objective(backend, obj, "validation", list(range(6)))
            logged = evaluate_objective(backend, obj, "validation", list(range(6)), samples=True)
            assert plain.samples is None and logged.score == plain.score == printed[name]
            records = read_samples(tmp_path / "out" / f"{name.replace(':', '_')}_validation.jsonl")
            assert [r["example_id"] for r in records] == list(plain.example_ids)
            assert [r["output"] for r in records] == list(plain.outputs)
            examples = obj.examples("validation")[:6]
            assert [r["prompt"] for r in records] == [e.prompt for e in examples]
            assert [r["target"] for r in records] == [e.target for e in examples]
            assert [r["score"] for r in records] == [obj.score(e, o) for e, o in zip(examples, plain.outputs,
                                                                                      strict=True)]
        math = read_samples(tmp_path / "out" / "zoo_math_validation.jsonl")
        assert sum(r["score"] for r in math) / len(math) == pytest.approx(printed["zoo:math"], abs=1e-12)
    finally:
        backend.close()


def test_a_log_samples_path_that_is_a_file_is_refused_before_the_model_is_scored(micro_zoo_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    import hm3.eval.backend

    def no_model(*args, **kwargs):
        raise AssertionError("the model was opened before --log-samples was checked")

    monkeypatch.setattr(hm3.eval.backend, "open_backend", no_model)
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    assert main(["eval", str(micro_zoo_dir / "math"), "--objectives", "zoo:math", "--log-samples",
                 str(taken)]) == ExitCode.BAD_INPUT
    assert str(taken) in capsys.readouterr().err and taken.read_text() == "mine\n"


def test_a_mean_objective_is_scored_once_per_example_to_the_same_score(tiny_family):
    """A choice objective keeps the base class's mean: with samples it is scored per example and averaged
    here, which must give exactly the float aggregate() gives, and records carry the choices."""
    _, models, objectives = tiny_family
    backend = HFBackend.from_pretrained(models["m1"], batch_size=16)
    try:
        obj = get_objective(objectives[0])
        plain = evaluate_objective(backend, obj, "validation")
        logged = evaluate_objective(backend, obj, "validation", samples=True)
    finally:
        backend.close()
    examples = obj.examples("validation")
    assert logged.score == plain.score == obj.aggregate(examples, plain.outputs)
    assert 0.0 < plain.score < 1.0  # a mix of right and wrong picks: an off-by-one mean would show
    records = logged.samples
    assert [r["output"] for r in records] == list(plain.outputs)
    assert [r["score"] for r in records] == [float(o == e.target) for e, o in zip(examples, plain.outputs, strict=True)]
    assert sum(r["score"] for r in records) / len(records) == plain.score
    assert [r["choices"] for r in records] == [list(e.choices) for e in examples]


def test_a_search_logs_one_file_per_stored_score_and_none_without_the_flag(micro_zoo_dir, tmp_path):
    plain = tmp_path / "plain"
    run_level1(parse_run_config(_config(micro_zoo_dir)), plain, progress=False)
    assert not (plain / SAMPLES_DIR).exists()

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(_config(micro_zoo_dir)))
    logged = tmp_path / "logged"
    assert main(["search", "param", str(cfg), str(logged), "--log-samples", "--quiet"]) == 0
    assert _files(logged) == _expected_files(logged) and len(_files(logged)) >= 2 * 3  # candidates x objectives x splits
    by_key = {(e.candidate_id, e.objective, e.split): e for e in _stored(logged)}
    stems = file_stems(sorted({k[1] for k in by_key}))
    for (cid, objective, split), ev in by_key.items():
        records = read_samples(logged / SAMPLES_DIR / str(cid) / f"{stems[objective]}_{split}.jsonl")
        assert len(records) == ev.count == len({r["example_id"] for r in records})
        assert {(r["objective"], r["split"]) for r in records} == {(objective, split)}
        if objective != "zoo:translation":  # mean-aggregated: the records average to the stored score
            assert sum(r["score"] for r in records) / len(records) == pytest.approx(ev.score, abs=1e-12)
    # the flag changes no score: the same search without it stored the same numbers
    assert {k: e.score for k, e in by_key.items()} == {(e.candidate_id, e.objective, e.split): e.score
                                                      for e in _stored(plain)}
    # a refining request logs what it scores into the same folder, one file per new score
    before = _files(logged)
    assert main(["request", str(logged), "--prefer", "zoo:math=1", str(tmp_path / "answer"), "--refine", "1",
                 "--log-samples", "--quiet"]) == 0
    assert _files(logged) == _expected_files(logged) and len(_files(logged)) > len(before)


def test_a_crash_between_samples_and_score_then_resume_leaves_one_file_each(micro_zoo_dir, tmp_path, monkeypatch):
    """A run killed after a samples file is written but before its score is committed: the resume scores
    that candidate again and replaces the file; every stored score has exactly one file, no record twice.
    A resume may also turn the flag on (it is not part of the stored config)."""
    run = tmp_path / "run"
    run_level1(parse_run_config(_config(micro_zoo_dir, budget=3)), run, progress=False, stop_after=1)
    assert not (run / SAMPLES_DIR).exists()
    unlogged = _expected_files(run)  # scored before the flag was on: restored from the store later, no samples
    assert unlogged

    commits = {"n": 0}
    record = RunStore.record_evaluation

    def crash_on_third(self, *args, **kwargs):
        commits["n"] += 1
        if commits["n"] == 3:
            raise KeyboardInterrupt  # the process dies here: its samples file is on disk, its score is not
        return record(self, *args, **kwargs)

    monkeypatch.setattr(RunStore, "record_evaluation", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_level1(parse_run_config(_config(micro_zoo_dir, budget=3, log_samples=True)), run, resume=True,
                   progress=False)
    monkeypatch.setattr(RunStore, "record_evaluation", record)
    orphan = _files(run) - _expected_files(run)
    assert len(orphan) == 1  # the file whose score was lost

    run_level1(parse_run_config(_config(micro_zoo_dir, budget=3, log_samples=True)), run, resume=True, progress=False)
    files = _files(run)
    assert orphan <= files and len(files) == len(list((run / SAMPLES_DIR).glob("*/*.jsonl")))
    assert files == _expected_files(run) - unlogged
    for path in (run / SAMPLES_DIR).glob("*/*.jsonl"):
        ids = [r["example_id"] for r in read_samples(path)]
        assert len(ids) == len(set(ids)) == EXAMPLES
    assert not list((run / SAMPLES_DIR).rglob(".*"))  # no temporary file left behind
    # and a resume without the flag is accepted as the same run (nothing is evaluated, nothing written)
    before = {p: p.stat().st_mtime_ns for p in (run / SAMPLES_DIR).glob("*/*.jsonl")}
    run_level1(parse_run_config(_config(micro_zoo_dir, budget=3)), run, resume=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (run / SAMPLES_DIR).glob("*/*.jsonl")} == before


@pytest.mark.e2e
@pytest.mark.slow
def test_kill_9_then_resume_leaves_exactly_one_file_per_stored_score(micro_zoo_dir, tmp_path, sigkill_hm3):
    """A real crash (SIGKILL mid-search) and a resume: one samples file per stored (candidate, objective,
    split), each whole, no record twice, no temporary file left."""
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(_config(micro_zoo_dir, budget=5)))
    run = tmp_path / "killed"

    def some_told() -> bool:
        try:
            with RunStore.open(run, readonly=True) as s:
                return len(s.events("level1_tell")) >= 2
        except Exception:  # no store yet, or its schema is still being written
            return False

    # killed as a score is about to be stored, after two told points: its samples file is on disk, it is not
    sigkill_hm3(["search", "param", str(cfg), str(run), "--log-samples", "--quiet"], some_told,
                pause_at="hm3.store:RunStore.record_evaluation", timeout=240)
    assert len(_files(run) - _expected_files(run)) == 1
    assert main(["search", "param", str(cfg), str(run), "--resume", "--log-samples", "--quiet"]) == 0
    assert _files(run) == _expected_files(run)
    assert len(list((run / SAMPLES_DIR).glob("*/*.jsonl"))) == len(_stored(run))
    for path in (run / SAMPLES_DIR).glob("*/*.jsonl"):
        ids = [r["example_id"] for r in read_samples(path)]
        assert len(ids) == len(set(ids)) == EXAMPLES
    assert not [p for p in (run / SAMPLES_DIR).rglob("*") if p.name.startswith(".")]


class _InProcessExecutor:
    """An executor whose one worker is a live model in this process: ExecutorSession's plumbing, no Ray."""

    workers, name = 1, "in-process"

    def __init__(self, cfg):
        from hm3.eval.live import LiveModel

        self.model = LiveModel(cfg, frame_recipe=lambda cid: {}, log=lambda m: None)
        self.jobs: list = []

    backend = property(lambda self: self.model.backend.name)
    placement = property(lambda self: self.model.placement)
    pending = property(lambda self: len(self.jobs))

    def submit(self, job) -> int:
        self.jobs.append(job)
        return len(self.jobs) - 1

    def next_done(self):
        job = self.jobs.pop(0)
        return 0, self.model.evaluate(job.candidate, job.plan, job.objectives, samples=job.samples)

    def close(self) -> None:
        self.model.close()


def test_an_executor_sessions_workers_send_samples_the_local_session_writes(tiny_family, tmp_path):
    """The parallel session's workers return each score's records with it, and the process that owns the
    store writes them: the same files, record for record, as a local session writes."""
    from hm3.eval.live import LiveModelSession
    from hm3.eval.parallel import ExecutorSession
    from hm3.eval.session import MergeCandidate

    _, models, objectives = tiny_family
    cfg = parse_run_config({"models": models, "objectives": objectives, "seed": 0,
                            "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
                            "evaluation": {"validation_examples": 6, "test_examples": 6, "log_samples": True}})
    recipe = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "m1", "parameters": {"weight": 0.7}}, {"model": "m2", "parameters": {"weight": 0.4}}]}
    written = {}
    for kind in ("local", "executor"):
        with RunStore.open(tmp_path / kind) as store:
            session = (LiveModelSession(cfg, store, log=lambda m: None) if kind == "local"
                       else ExecutorSession(cfg, store, _InProcessExecutor(cfg)))
            try:
                scored = session.score_many([MergeCandidate(recipe)], session.validation)[0]
            finally:
                session.close()
        root = tmp_path / kind / SAMPLES_DIR
        written[kind] = {p.relative_to(root): read_samples(p) for p in root.glob("*/*.jsonl")}
        assert len(written[kind]) == len(objectives) and scored.candidate.id == 1
    assert written["executor"] == written["local"]
