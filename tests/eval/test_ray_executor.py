"""The Ray executor: workers with their own live models score level 1's batches; this process writes the store.

The Ray tests share one local Ray instance of two CPUs (started and shut down by the module's
fixture); each run's workers are Ray actors on it, each loading the tiny models of ``tests/conftest``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hm3.errors import ConfigError, ExecutorError, ExitCode, Hm3Error, MissingExtraError
from hm3.eval.session import MergeCandidate, PathCandidate
from hm3.run.config import stored_form
from hm3.search.pareto import non_dominated, normalise
from hm3.search.run_config import parse_run_config
from hm3.store import RunStore

ROOT = Path(__file__).resolve().parents[2]
CPUS = 2  # the local Ray instance's


def _config(family, *, budget: int = 4, **evaluation) -> dict:
    _, models, objectives = family
    return {
        "models": models,
        "objectives": objectives,
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
        "optimizer": {"name": "bo-mo", "budget": budget, "options": {"n_init": 2, "num_restarts": 2,
                                                                     "raw_samples": 32, "mc_samples": 32}},
        "evaluation": {"validation_examples": 8, "test_examples": 8, "batch_size": 16} | evaluation,
        "seed": 5,
    }


def _recipe(w1: float, w2: float) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": "base",
            "models": [{"model": "m1", "parameters": {"weight": w1}}, {"model": "m2", "parameters": {"weight": w2}}]}


def _told(run_dir: Path) -> list[tuple[dict, list[float], list[float]]]:
    """(recipe, point, validation scores) of every told candidate of a level-1 run, in order."""
    from hm3.search.level1 import TELL_EVENT

    with RunStore.open(run_dir, readonly=True) as store:
        out = []
        for e in store.events(TELL_EVENT):
            _, recipe = store.candidate(e.payload["candidate"])
            scores = [ev.score for ev in store.evaluations(e.payload["candidate"], split="validation")]
            out.append((recipe, e.payload["x"], scores))
        return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with two CPUs; its workers import this checkout's hm3."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=CPUS, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield ray
    finally:
        ray.shutdown()


# --- the config and the command line -----------------------------------------------------------------


def test_executor_settings_stay_out_of_the_stored_config(tiny_family):
    """A run records what its scores are, not where they were made: a Ray run stores the config a local
    run stores (so either resumes the other), and a local run stores what it did before executors existed."""
    local = parse_run_config(_config(tiny_family))
    ray = parse_run_config(_config(tiny_family, executor="ray", workers=2, ray_address="auto",
                                   resources_per_worker={"num_cpus": 0.5}))
    assert ray.evaluation.workers == 2 and ray.evaluation.resources_per_worker.num_cpus == 0.5
    assert stored_form(ray) == stored_form(local)
    assert not {"executor", "workers", "ray_address", "resources_per_worker"} & set(
        stored_form(local)["level1"]["evaluation"])
    assert parse_run_config(local.canonical()) == local


@pytest.mark.parametrize(
    ("evaluation", "mention"),
    [
        ({"executor": "ray", "workers": 0}, "evaluation.workers: Input should be greater than or equal to 1"),
        ({"workers": 2}, "workers: 2 is a setting of executor: ray"),
        ({"ray_address": "auto"}, "ray_address is a setting of executor: ray"),
        ({"executor": "ray", "resources_per_worker": {"num_cpus": 0}}, "must reserve some num_cpus or num_gpus"),
        ({"executor": "ray", "resources_per_worker": {"cpus": 1}}, "resources_per_worker.cpus: unknown key"),
        ({"executor": "ray", "device": "cuda"}, "device: cuda with executor: ray needs resources_per_worker.num_gpus"),
        ({"executor": "ray", "device": "cuda:1", "resources_per_worker": {"num_gpus": 1}}, "use device: cuda"),
        ({"executor": "dask"}, "evaluation.executor: Input should be 'local' or 'ray'"),
    ],
)
def test_bad_executor_settings_are_refused_naming_the_key(tiny_family, evaluation, mention):
    with pytest.raises(ConfigError, match=mention):
        parse_run_config(_config(tiny_family, **evaluation))


def test_a_fisher_weighted_space_needs_the_local_executor(tiny_family):
    data = _config(tiny_family, executor="ray")
    data["search_space"] |= {"fisher": True}
    data["experts"] = {"m1": data["objectives"][0], "m2": data["objectives"][1]}
    with pytest.raises(ConfigError, match="fisher: true needs evaluation.executor: local"):
        parse_run_config(data)


def test_workers_and_ray_address_flags_set_the_config(tiny_family, tmp_path):
    from hm3.cli import _executor_preset, build_parser
    from hm3.overrides import load_config

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(_config(tiny_family, executor="ray")))
    for argv in (["search", "param", str(path), "run"], ["run", str(path), "run"]):
        args = build_parser().parse_args([*argv, "--workers", "3", "--ray-address", "auto"])
        cfg = load_config(path, parse_run_config, preset=_executor_preset(args))
        assert (cfg.evaluation.workers, cfg.evaluation.ray_address) == (3, "auto")
        plain = load_config(path, parse_run_config, preset=_executor_preset(build_parser().parse_args(argv)))
        assert (plain.evaluation.workers, plain.evaluation.ray_address) == (1, None)


def test_proposals_flag_sets_the_config_and_a_bad_value_is_a_usage_error(tiny_family, tmp_path, capsys):
    """--proposals as evaluation.proposals for both search commands (--set still wins); a value that is not
    batch or async is refused before anything runs."""
    from hm3.cli import _executor_preset, build_parser, main
    from hm3.overrides import load_config

    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(_config(tiny_family, executor="ray", workers=2)))
    for argv in (["search", "param", str(path), "run"], ["run", str(path), "run"]):
        args = build_parser().parse_args([*argv, "--proposals", "async"])
        assert load_config(path, parse_run_config, preset=_executor_preset(args)).evaluation.proposals == "async"
        plain = load_config(path, parse_run_config, preset=_executor_preset(build_parser().parse_args(argv)))
        assert plain.evaluation.proposals == "batch"
        wins = load_config(path, parse_run_config, sets=["evaluation.proposals=batch"],
                           preset=_executor_preset(args))
        assert wins.evaluation.proposals == "batch"
    assert main(["run", str(path), str(tmp_path / "out"), "--proposals", "sync"]) == ExitCode.USAGE
    assert "--proposals: invalid choice: 'sync'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_workers_below_one_are_a_usage_error(capsys):
    from hm3.cli import main

    assert main(["search", "param", "cfg.yml", "run", "--workers", "0"]) == ExitCode.USAGE
    assert "--workers: must be a positive number, got 0" in capsys.readouterr().err


def test_without_ray_installed_the_extra_is_named_before_the_run_directory_is_made(tiny_family, tmp_path,
                                                                                 monkeypatch):
    from hm3.cli import main
    from hm3.search.level1 import run_level1

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails; find_spec finds nothing
    cfg = parse_run_config(_config(tiny_family, executor="ray"))
    with pytest.raises(MissingExtraError, match=r"evaluation.executor: ray needs ray, from hm3's 'ray' extra.*"
                                                r"pip install 'hm3\[ray\]'"):
        run_level1(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(_config(tiny_family)))
    code = main(["-q", "search", "param", str(path), str(tmp_path / "cli"), "--set", "evaluation.executor=ray"])
    assert code == ExitCode.ENVIRONMENT and not (tmp_path / "cli").exists()


def test_check_resources_counts_free_cpus_and_gpus_and_the_largest_node(tiny_family):
    from hm3.eval.ray_executor import check_resources

    def ev(workers: int, **resources):
        return parse_run_config(_config(tiny_family, executor="ray", workers=workers,
                                        resources_per_worker=resources)).evaluation

    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0}]
    check_resources(ev(6), {"CPU": 6.0, "GPU": 1.0}, nodes)  # exactly what is free
    check_resources(ev(2, num_cpus=1, num_gpus=0.5), {"CPU": 2.0, "GPU": 1.0}, nodes)
    with pytest.raises(ExecutorError, match=r"7 worker\(s\).*need 7 CPU\(s\); the Ray cluster has 6 free"):
        check_resources(ev(7), {"CPU": 6.0, "GPU": 1.0}, nodes)
    with pytest.raises(ExecutorError, match=r"need 2 GPU\(s\); the Ray cluster has 1 free"):
        check_resources(ev(2, num_gpus=1), {"CPU": 6.0, "GPU": 1.0}, nodes)
    with pytest.raises(ExecutorError, match=r"no node of the Ray cluster has 5 CPU\(s\) for one worker \(the "
                                            r"largest has 4\)"):
        check_resources(ev(1, num_cpus=5), {"CPU": 6.0}, nodes)
    with pytest.raises(ExecutorError, match=r"no node .* has 1 GPU\(s\)"):
        check_resources(ev(1, num_gpus=1), {"CPU": 6.0}, [{"CPU": 6.0}])


def test_resources_being_released_are_waited_for_briefly(tiny_family):
    """A worker of an executor closed just before frees its CPU a moment later: a start waits for that,
    within a grace period, and refuses after it."""
    from hm3.eval.ray_executor import wait_until_free

    ev = parse_run_config(_config(tiny_family, executor="ray", workers=2)).evaluation
    frees = iter([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}])
    wait_until_free(ev, lambda: next(frees), grace=30)
    assert next(frees, None) is None  # asked until it was free, then no more
    with pytest.raises(ExecutorError, match=r"need 2 CPU\(s\); the Ray cluster has 1 free"):
        wait_until_free(ev, lambda: {"CPU": 1.0}, grace=0.3)


# --- on a local Ray instance -------------------------------------------------------------------------


@pytest.mark.slow  # the Ray instance's start
@pytest.mark.timeout(120)
def test_more_workers_than_free_cpus_are_refused_not_left_waiting(ray_cluster, tiny_family, tmp_path, monkeypatch):
    """An actor Ray cannot place would wait forever: the run is refused before any is created (after the grace
    for resources being released, shortened here from its 10 s)."""
    from hm3.eval import ray_executor
    from hm3.search.level1 import run_level1

    monkeypatch.setattr(ray_executor, "RELEASE_GRACE_S", 1.0)

    cfg = parse_run_config(_config(tiny_family, executor="ray", workers=CPUS + 1))
    with pytest.raises(ExecutorError, match=rf"{CPUS + 1} worker\(s\).*need {CPUS + 1} CPU\(s\); the Ray "
                                            rf"cluster has {CPUS} free"):
        run_level1(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert ray_cluster.is_initialized()  # a Ray instance this process had started is left running


@pytest.mark.slow
def test_an_error_loading_a_workers_model_names_the_worker_and_leaves_no_run_directory(ray_cluster, tiny_family,
                                                                                       tmp_path):
    """The error a local run raises, of the same type (so the same exit code), prefixed by the worker that
    hit it; the workers start before the run directory is made, so nothing is written."""
    from hm3.search.level1 import run_level1

    def failure(**evaluation) -> Exception:
        data = _config(tiny_family, **evaluation)
        data["models"] = data["models"] | {"m2": str(tmp_path / "no-such-model")}
        with pytest.raises(Hm3Error) as caught:
            run_level1(parse_run_config(data), tmp_path / f"run-{len(evaluation)}", progress=False)
        return caught.value

    local, remote = failure(), failure(executor="ray", workers=2)
    assert type(remote) is type(local) and "no-such-model" in str(local)
    assert re.fullmatch(rf"Ray worker [01] \(pid \d+ on node [^)]+\) could not load the model: {re.escape(str(local))}",
                        str(remote)), str(remote)
    assert not (tmp_path / "run-2").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_ray_cannot_place_is_refused_after_the_placement_timeout(ray_cluster, tiny_family):
    """The free-resources check passes, then another job takes the CPUs before the workers are placed: the
    start is refused naming the worker, not left waiting."""
    from hm3.eval.ray_executor import RayExecutor

    cfg = parse_run_config(_config(tiny_family, executor="ray", workers=1))
    executor = RayExecutor.connect(cfg.evaluation, log=lambda message: None)
    executor._placement_timeout = 2.0
    from ray.util.placement_group import placement_group, remove_placement_group

    taken = placement_group([{"CPU": CPUS}])  # another job's reservation of every CPU
    raised: list[BaseException] = []

    def start() -> None:
        try:
            executor.start(cfg)
        except BaseException as err:  # noqa: BLE001 - what the start raised is the test's to check
            raised.append(err)

    try:
        ray_cluster.get(taken.ready())
        # in a thread: a start left waiting blocks inside Ray, where no test timeout can interrupt it
        starter = threading.Thread(target=start, daemon=True)
        starter.start()
        starter.join(30)
        assert raised, "the start was still waiting for Ray to place its worker after 30 s"
        assert isinstance(raised[0], ExecutorError) and re.search(
            r"Ray worker 0 not placed within 2 s: evaluation.workers: 1 worker\(s\).*the Ray cluster has 0 "
            r"CPU\(s\), 0 GPU\(s\) free", str(raised[0])), raised[0]
    finally:
        remove_placement_group(taken)
        executor.close()


def test_an_unreachable_ray_address_is_refused_quickly_naming_it(tiny_family, tmp_path):
    """``ray.init`` retries an address where no cluster answers for minutes; the run is refused at once."""
    import socket

    from hm3.eval.ray_executor import check_reachable

    with socket.socket() as free:  # a port nothing listens on, held so no other process takes it meanwhile
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        began = time.monotonic()
        with pytest.raises(ExecutorError, match=rf"evaluation.ray_address '127.0.0.1:{port}': nothing answers at "
                                                rf"127.0.0.1:{port} within 3 s.*ray start --head"):
            check_reachable(f"127.0.0.1:{port}", timeout=3)
        assert time.monotonic() - began < 3
    with pytest.raises(ExecutorError, match="'ray://127.0.0.1:1'"):
        check_reachable("ray://127.0.0.1:1", timeout=3)
    with pytest.raises(ExecutorError, match="not auto, host:port or ray://host:port"):
        check_reachable("somewhere", timeout=3)
    for resolved_by_ray in (None, "auto", "local"):
        check_reachable(resolved_by_ray, timeout=3)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}", timeout=3)


def test_a_ray_address_other_than_the_cluster_this_process_joined_is_refused(tiny_family, monkeypatch):
    """Ray already initialised in this process (by its caller) is the Ray the run uses: a ``ray_address`` that
    names another cluster is refused naming both, not silently ignored; one naming the same cluster (this
    node by its loopback name too) is used, and one that cannot be compared (auto, ray://) is said in the log."""
    from types import SimpleNamespace

    from hm3.eval.ray_executor import RayExecutor

    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray is started: the cluster is described
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="10.0.0.7:6379"))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4.0}}])
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "init", lambda **_: pytest.fail("Ray is initialised already: not to be joined again"))

    def connect(address: str | None) -> list[str]:
        ev = parse_run_config(_config(tiny_family, executor="ray", ray_address=address)).evaluation
        logs: list[str] = []
        executor = RayExecutor.connect(ev, log=logs.append)
        assert not executor._started_ray  # the caller's Ray: left running on close
        return logs

    for other in ("10.0.0.8:6379", "10.0.0.7:6380"):
        with pytest.raises(ExecutorError, match=rf"evaluation.ray_address '{other}'.*already connected to the Ray "
                                                r"cluster at 10.0.0.7:6379"):
            connect(other)
    assert connect("10.0.0.7:6379") == connect("127.0.0.1:6379") == connect(None) == []
    for unchecked in ("auto", "ray://10.0.0.9:10001"):
        (line,) = connect(unchecked)
        assert unchecked in line and "10.0.0.7:6379" in line


def test_hm3_refuses_an_unreachable_ray_address_and_writes_nothing(tiny_family, tmp_path, monkeypatch):
    from hm3.cli import main
    from hm3.eval import ray_executor

    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray_executor, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process (another test's Ray may run)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(_config(tiny_family, executor="ray")))
    codes: list[int] = []
    argv = ["-q", "search", "param", str(path), str(tmp_path / "run"), "--ray-address", "127.0.0.1:1"]
    # in a thread: ray.init on an address where nothing answers blocks inside Ray for minutes
    runner = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    runner.start()
    runner.join(30)
    assert codes == [ExitCode.ENVIRONMENT] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_one_ray_worker_finds_what_a_local_run_finds(ray_cluster, labelled_family, tmp_path):
    """Same seed: a local run and a Ray run with one worker evaluate the same candidates, in the same
    order, to the same scores (the worker merges and scores in its own process)."""
    from hm3.search.level1 import run_level1

    local = run_level1(parse_run_config(_config(labelled_family)), tmp_path / "local", progress=False)
    remote = run_level1(parse_run_config(_config(labelled_family, executor="ray")), tmp_path / "ray",
                        progress=False)
    assert _told(tmp_path / "ray") == _told(tmp_path / "local")
    assert len(_told(tmp_path / "local")) == 4
    assert remote.candidate_ids == local.candidate_ids and np.array_equal(remote.Y, local.Y)
    assert remote.front_ids == local.front_ids
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["placement_this_process"] | {"executor": "ray", "workers": "1"} == \
        summary["placement_this_process"]
    assert summary["evaluated_examples_this_process"] == local.summary["evaluated_examples_this_process"]


@pytest.mark.slow
def test_two_workers_score_each_candidate_once_in_batches_told_in_proposal_order(ray_cluster, labelled_family,
                                                                                 tmp_path):
    from hm3.run.directory import read_front
    from hm3.search.level1 import TELL_EVENT, make_optimizer, run_level1

    cfg = parse_run_config(_config(labelled_family, budget=6, executor="ray", workers=2))
    result = run_level1(cfg, tmp_path / "run", progress=False)
    told = _told(tmp_path / "run")
    assert len(told) == 6

    with RunStore.open(tmp_path / "run", readonly=True) as store:
        # every candidate (3 references, 6 merges) evaluated exactly once per objective and split: one row
        # each, and the examples this process had run through the workers add up to exactly those rows
        rows = store.evaluations()
        keys = [(e.candidate_id, e.objective, e.split) for e in rows]
        assert len(keys) == len(set(keys))
        validation = {(e.candidate_id, e.objective) for e in rows if e.split == "validation"}
        assert len(validation) == 2 * len(store.candidates()) == 2 * 9
        assert sum(e.count for e in rows) == result.summary["evaluated_examples_this_process"]
        assert {e.backend for e in rows} == {"hf"}
        tell_ids = [e.payload["candidate"] for e in store.events(TELL_EVENT)]

    # the points are the optimiser's asks of two at a time, told in the order proposed: replaying the
    # stored scores into a fresh optimiser asks exactly the stored points again
    base, ideal = result.base, result.ideal
    optimizer = make_optimizer(cfg)
    for i in range(0, 6, 2):
        x = optimizer.ask(2)
        assert torch.equal(x, torch.tensor([p for _, p, _ in told[i:i + 2]], dtype=torch.float64))
        optimizer.tell(x, torch.tensor(normalise(np.array([s for _, _, s in told[i:i + 2]]), base, ideal)))

    # the front written is the non-dominated set of the scores read back from the store
    front, summary = read_front(tmp_path / "run")
    Y = np.array([s for _, _, s in told])
    expected = {tell_ids[i] for i in non_dominated(Y)}
    assert set(front["point"]) == expected == set(result.front_ids)
    assert summary["placement_this_process"]["workers"] == "2"
    assert summary["proposals"] == "batch" and "reproducible from the seed" in summary["proposal_order"]
    assert 0 <= summary["worker_idle_share"] < 1 and summary["workers_replaced"] == 0


@pytest.mark.slow
def test_a_batch_scores_each_distinct_candidate_once_and_paths_as_a_local_session(ray_cluster, tiny_family,
                                                                                  tmp_path):
    """The executor session against a local one: the same scores for merges and for a path framed by a
    stored merge (whose recipe a worker is sent), the same layer pool and features; a candidate asked
    twice in one batch is scored once."""
    from hm3.eval.live import LiveModelSession
    from hm3.search.level1 import evaluation_executor, open_session

    cfg = parse_run_config(_config(tiny_family, executor="ray", workers=2))
    local_cfg = parse_run_config(_config(tiny_family))
    log = lambda message: None  # noqa: E731
    with evaluation_executor(cfg, log) as executor, RunStore.open(tmp_path / "ray") as store, \
            RunStore.open(tmp_path / "local") as local_store:
        session = open_session(cfg, store, log, executor)
        local = LiveModelSession(local_cfg, local_store, log=log)
        try:
            a, b = MergeCandidate(_recipe(0.9, 0.2)), MergeCandidate(_recipe(0.1, 0.8))
            scored = session.score_many([a, b, a], session.validation)
            per_candidate = sum(len(v) for v in session.validation.indices.values())
            assert session.evaluated_examples == 2 * per_candidate  # a once, b once
            assert scored[0].candidate == scored[2].candidate != scored[1].candidate
            expected = local.score_many([a, b], local.validation)
            assert [s.scores.tolist() for s in scored] == [s.scores.tolist() for s in (*expected, expected[0])]
            assert session.score(a, session.validation).scores.tolist() == scored[0].scores.tolist()
            assert session.evaluated_examples == 2 * per_candidate  # a store hit

            layout = session.pool_layout()
            assert layout == local.pool_layout()
            path = PathCandidate(_path(layout), scored[1].candidate.id, layout.experts)
            local_path = PathCandidate(path.path, expected[1].candidate.id, layout.experts)
            assert np.array_equal(session.score(path, session.validation).scores,
                                  local.score(local_path, local.validation).scores)
            assert torch.equal(session.layer_features([scored[1].candidate.id, "base"]),
                               local.layer_features([expected[1].candidate.id, "base"]))
        finally:
            session.close()
            local.close()


def _path(layout):
    """Expert 0's first layer, then the frame's remaining layers."""
    from hm3.arch.path import LayerPath

    frame = layout.size - 1
    return LayerPath(hops=[[0, 0], *[[frame, i] for i in range(1, layout.num_layers)]])


@pytest.mark.slow
def test_hm3_run_with_two_ray_workers_writes_what_a_local_run_writes(ray_cluster, labelled_family, tmp_path):
    """The two-level command with --workers 2: level 1's batches, then level 2's paths (framed by level-1
    merges the workers are sent), scored by the workers; with the random optimiser, whose points do not
    depend on the batch, the run's tables are the local run's."""
    from hm3.cli import main

    data = _config(labelled_family) | {"optimizer": {"name": "random", "budget": 4}}
    data["level2"] = {"preferences": 1, "rl": {"offline_episodes": 4, "online_episodes": 2,
                                               "episodes_per_update": 2, "epochs": 1, "data_scale": 0.5}}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(data))
    assert main(["-q", "run", str(path), str(tmp_path / "local")]) == ExitCode.OK
    assert main(["-q", "run", str(path), str(tmp_path / "ray"), "--set", "evaluation.executor=ray",
                 "--workers", "2"]) == ExitCode.OK
    for table in ("front.csv", "candidates.csv", "level1/front.csv"):
        assert (tmp_path / "ray" / table).read_text() == (tmp_path / "local" / table).read_text(), table
    assert ",path," in (tmp_path / "ray" / "candidates.csv").read_text()  # level 2's paths among them
    with RunStore.open(tmp_path / "ray", readonly=True) as store:
        paths = store.candidates("path")
        assert paths and all(store.evaluations(p) for p in paths)  # every episode's path scored by a worker
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["placement_this_process"]["workers"] == "2"


def _episodes(run_dir: Path) -> tuple[list[str], dict[tuple[str, str, str, str], float]]:
    """A run's candidates in the order first stored (level 2's: its episodes' paths in episode order), and
    every stored score keyed by candidate, objective, split and example set (each asserted stored once)."""
    with RunStore.open(run_dir, readonly=True) as store:
        recipes = {ref.id: json.dumps(store.candidate(ref.id)[1], sort_keys=True) for ref in store.candidates()}
        scores: dict[tuple[str, str, str, str], float] = {}
        for e in store.evaluations():
            key = (recipes[e.candidate_id], e.objective, e.split, e.example_set)
            assert key not in scores, key  # a repeated evaluation
            scores[key] = e.score
        return [recipes[i] for i in sorted(recipes)], scores


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_level2_episodes_are_the_same_locally_and_on_one_or_two_workers(ray_cluster, labelled_family, tmp_path,
                                                                        monkeypatch):
    """hm3 run with level 2 locally, on one Ray worker and on two (two episodes scored together per call):
    the same candidates in the same order, the same scores on the same reward subsets, each stored once,
    and the same policy. The summary says how busy level 2 kept the workers. Resumed after its online
    checkpoint is deleted, the two-worker run replays that stage's episodes from the store: nothing is
    evaluated again."""
    from hm3.cli import main
    from hm3.runfiles import read_state

    data = _config(labelled_family) | {"optimizer": {"name": "random", "budget": 2}}
    data["level2"] = {"preferences": 1, "rl": {"offline_episodes": 4, "online_episodes": 4,
                                               "episodes_per_update": 2, "epochs": 1, "data_scale": 0.5}}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(data))
    runs = {"local": [], "one": ["--set", "evaluation.executor=ray", "--workers", "1"],
            "two": ["--set", "evaluation.executor=ray", "--workers", "2"]}
    from hm3.eval.parallel import ExecutorSession

    batches: dict[str, list[int]] = {name: [] for name in runs}  # paths per executor call, per run
    original = ExecutorSession.score_many

    def score_many(self, candidates, plan):
        if isinstance(plan, list):  # level 2's episodes, a reward subset each
            batches[name].append(sum(isinstance(c, PathCandidate) for c in candidates))
        return original(self, candidates, plan)

    monkeypatch.setattr(ExecutorSession, "score_many", score_many)
    for name, flags in runs.items():
        assert main(["-q", "run", str(path), str(tmp_path / name), *flags]) == ExitCode.OK, name
    assert batches == {"local": [], "one": [1] * 8, "two": [2] * 4}  # 4 + 4 episodes, 2 per update
    order, scores = _episodes(tmp_path / "local")
    path_scores = {(k[0], k[3]) for k in scores if '"path"' in k[0] and k[2] == "validation"}
    assert len({example_set for _, example_set in path_scores}) > 1  # DAR: paths scored on different subsets
    for name in ("one", "two"):
        assert _episodes(tmp_path / name) == (order, scores), name
        policy = read_state(tmp_path / name / "level2" / "policy.safetensors", regenerate="")["policy"]
        local = read_state(tmp_path / "local" / "level2" / "policy.safetensors", regenerate="")["policy"]
        assert all(torch.equal(policy[k], local[k]) for k in local), name
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    workers = summary["level2_workers"]
    assert workers["workers"] == 2 and workers["workers_replaced"] == 0
    assert workers["worker_busy_seconds"] > 0 and 0 <= workers["worker_idle_share"] < 1
    assert "level2_workers" not in json.loads((tmp_path / "local" / "summary.json").read_text())
    with RunStore.open(tmp_path / "two", readonly=True) as store:  # no example run twice, even in one batch
        assert sum(e.count for e in store.evaluations()) == summary["evaluated_examples_this_process"]

    (tmp_path / "two" / "level2" / "online-0.safetensors").unlink()
    assert main(["-q", "run", str(path), str(tmp_path / "two"), *runs["two"], "--resume"]) == ExitCode.OK
    assert _episodes(tmp_path / "two") == (order, scores)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["evaluated_examples_this_process"] == 0


# --- the executor session, over a fake executor ------------------------------------------------------


class _ListExecutor:
    """An executor whose jobs finish in the order submitted, each objective scored 0.5 (no models, no Ray);
    ``asked`` is every (recipe, objective, examples) a job asked for."""

    workers, name, backend, placement = 2, "list", "fake", {}

    def __init__(self):
        self.jobs: list = []  # (ticket, job) not yet returned
        self.tickets = 0
        self.asked: list[tuple[str, str, tuple[int, ...]]] = []

    pending = property(lambda self: len(self.jobs))

    def submit(self, job) -> int:
        self.jobs.append((self.tickets, job))
        recipe = json.dumps(job.candidate.stored_recipe(), sort_keys=True)
        self.asked += [(recipe, o, tuple(job.plan.indices[o])) for o in job.objectives]
        self.tickets += 1
        return self.tickets - 1

    def next_done(self):
        from hm3.eval.executor import ObjectiveScore

        ticket, job = self.jobs.pop(0)
        return ticket, [ObjectiveScore(o, 0.5, len(job.plan.indices[o]), 0.0) for o in job.objectives]

    def drain(self):
        """Every job not yet returned: they all count as finished."""
        return [_ListExecutor.next_done(self) for _ in range(len(self.jobs))]

    def close(self) -> None:
        pass


def test_a_batch_asks_each_objectives_example_set_of_a_candidate_once(tiny_family, tmp_path):
    """Level 2 scores one path on two episodes' reward subsets in one batch; where an objective's subsets
    are the same (a split no larger than a subset) its score is asked of one worker, not two -- as a local
    session, scoring one plan after the other, finds it stored -- and each example is counted once."""
    from hm3.eval.parallel import ExecutorSession
    from hm3.search.scoring import SplitPlan

    cfg = parse_run_config(_config(tiny_family))
    executor = _ListExecutor()
    with RunStore.open(tmp_path / "run") as store:
        session = ExecutorSession(cfg, store, executor)
        first, second = session.objective_names
        whole = session.validation
        fewer = SplitPlan(whole.split, {first: whole.indices[first], second: whole.indices[second][:-1]})
        a = MergeCandidate(_recipe(0.9, 0.2))
        scored = session.score_many([a, a], [whole, fewer])
        assert len(executor.asked) == len(set(executor.asked)) == 3  # first once; second on each subset
        assert scored[0].candidate == scored[1].candidate and len(store.evaluations()) == 3
        assert session.evaluated_examples == sum(e.count for e in store.evaluations())


def test_an_async_run_resumed_with_its_budget_spent_leaves_the_points_in_flight_untold(tiny_family, tmp_path):
    """An asynchronous run stopped with a point in flight and resumed with a budget of the points already
    told: that point is beyond the budget, so it is neither scored nor told (telling it would exceed the
    optimiser's budget)."""
    from hm3.eval.parallel import ExecutorSession
    from hm3.search.level1 import ASK_EVENT, TELL_EVENT, make_optimizer, propose_async, told_points

    data = _config(tiny_family, executor="ray", workers=2, proposals="async")
    cfg = parse_run_config(data | {"optimizer": {"name": "random", "budget": 2}})
    optimizer, executor = make_optimizer(cfg), _ListExecutor()
    base, ideal = np.zeros(2), np.ones(2)
    points = torch.rand(3, cfg.search_space.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with RunStore.open(tmp_path / "run") as store:
        for i, x in enumerate(points):  # all three asked, the first two told (and replayed)
            ref = store.add_candidate(cfg.search_space.to_recipe(x), "merge")
            store.add_event(ASK_EVENT, {"candidate": ref.id, "x": x.tolist()})
            if i < 2:
                store.add_event(TELL_EVENT, {"candidate": ref.id, "x": x.tolist()})
                optimizer.tell(x[None], torch.full((1, 2), 0.5, dtype=torch.float64))
        session = ExecutorSession(cfg, store, executor)
        propose_async(optimizer, session, base, ideal, lambda told: None, stop_after=None)
        assert executor.asked == [] and len(told_points(store)) == 2


class _FailingExecutor(_ListExecutor):
    """:class:`_ListExecutor` whose job for ``bad`` fails when collected (as a job whose every worker died, or
    whose evaluation raised, does), the jobs after it finished and not yet collected."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def next_done(self):
        if self.jobs[0][1].candidate == self.bad:
            self.jobs.pop(0)
            raise ExecutorError("a worker failed scoring it")
        return super().next_done()


def test_scores_finished_but_not_collected_when_a_run_stops_are_committed(tiny_family, tmp_path):
    """A run that stops on an error (here one job's) while other workers have finished theirs commits those
    (a resumed run then finds them stored), in a batch and in flight alike: their evaluations are not wasted."""
    from hm3.eval.parallel import ExecutorSession

    cfg = parse_run_config(_config(tiny_family))
    bad, good = MergeCandidate(_recipe(0.9, 0.2)), MergeCandidate(_recipe(0.1, 0.8))
    with RunStore.open(tmp_path / "batch") as store:
        session = ExecutorSession(cfg, store, _FailingExecutor(bad))
        with pytest.raises(ExecutorError, match="failed scoring"):
            session.score_many([bad, good], session.validation)
        good_ref = store.add_candidate(good.stored_recipe(), good.kind)
        assert session.stored_scores(good_ref, session.validation) is not None
        assert len(store.evaluations()) == len(session.objective_names)  # good's, not bad's
    with RunStore.open(tmp_path / "in-flight") as store:
        session = ExecutorSession(cfg, store, _FailingExecutor(bad))
        (_, _), (good_ref, _) = session.submit(bad, session.validation), session.submit(good, session.validation)
        with pytest.raises(ExecutorError, match="failed scoring"):
            session.next_done()
        session.close()
        assert session.stored_scores(good_ref, session.validation) is not None
        assert len(store.evaluations()) == len(session.objective_names)


class _TimedExecutor(_ListExecutor):
    """:class:`_ListExecutor` whose jobs take ``seconds`` each: ``next_done`` waits that long, recording when
    each wait began and ended."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.waits: list[tuple[float, float]] = []

    def next_done(self):
        began = time.perf_counter()
        time.sleep(self.seconds)
        self.waits.append((began, time.perf_counter()))
        return super().next_done()


@pytest.mark.parametrize("optimizer_name", ["random", "bo-mo"])
def test_async_proposals_are_made_while_the_workers_score(tiny_family, tmp_path, optimizer_name):
    """With asynchronous proposals the optimiser is asked while the driver waits for the workers, not after:
    each proposal after the first two (one per idle worker at the start; for bo-mo also its first model-based
    point, which needs a first score) runs during a wait for a score, so a worker that finishes finds its
    next point ready. Every point of the budget is scored once and told once.
    (An optimiser asked only between the waits, as a sequential driver does, overlaps none of them.)"""
    from hm3.eval.parallel import ExecutorSession
    from hm3.search.level1 import make_optimizer, propose_async, told_points

    data = _config(tiny_family, executor="ray", workers=2, proposals="async")
    options = {"n_init": 2, "num_restarts": 2, "raw_samples": 16, "mc_samples": 16} if optimizer_name == "bo-mo" else {}
    cfg = parse_run_config(data | {"optimizer": {"name": optimizer_name, "budget": 7, "options": options}})
    optimizer, executor = make_optimizer(cfg), _TimedExecutor(0.4)
    asks: list[tuple[float, float, int]] = []  # (began, ended, points returned)
    ask_async = optimizer.ask_async

    def slow_ask(n: int) -> torch.Tensor:
        began = time.perf_counter()
        time.sleep(0.15)  # a proposal that costs a good share of a worker's turn
        x = ask_async(n)
        asks.append((began, time.perf_counter(), len(x)))
        return x

    optimizer.ask_async = slow_ask
    with RunStore.open(tmp_path / "run") as store:
        session = ExecutorSession(cfg, store, executor)
        propose_async(optimizer, session, np.zeros(2), np.ones(2), lambda told: None, stop_after=None)
        told = told_points(store)
        assert len(told) == 7 and len({tuple(x) for _, x in told}) == 7
        assert len(executor.asked) == len(set(executor.asked)) == 7 * len(session.objective_names)
    proposals = [(a, b) for a, b, n in asks if n]
    assert len(proposals) == 7
    overlapped = [any(a < w1 and w0 < b for w0, w1 in executor.waits) for a, b in proposals]
    # bo-mo's first model-based point needs a first score, so it is proposed once that score is in
    first = 2 if optimizer_name == "random" else 3
    assert not any(overlapped[:first]) and all(overlapped[first:]), overlapped


# --- faults ------------------------------------------------------------------------------------------


class _Method:
    def __init__(self, answer):
        self.answer = answer

    def remote(self, *args):
        return self.answer(*args)


class _Ref:
    """A call's object ref (hashable, as Ray's are): the answer, or the error its ``get`` raises; a ``running``
    one is never ready."""

    def __init__(self, answer, running: bool = False):
        self.answer, self.running = answer, running


class _FakeActor:
    """A Ray actor stand-in whose ``pool_layout`` and ``score`` calls die (with its Ray's ``error``) while its
    Ray has deaths left to give."""

    def __init__(self, ray, number: int):
        self.where = _Method(lambda: (1000 + number, "node"))
        self.start = _Method(lambda: ray.load_error or ({"device": "cpu"}, "hf"))
        self.pool_layout = _Method(lambda: ray.die(ray.error()) or ray.asked.append(number) or "layout")
        self.score = _Method(lambda ticket, job: _Ref(ray.die(ray.error()) or (ticket, [f"{job} by {number}"], 0.0),
                                                      running=job in ray.running))


class _FakeRay:
    """Just enough of Ray for :class:`RayExecutor` to start workers and ask them (no processes)."""

    def __init__(self, deaths: int, error=None, load_error=None):
        from ray.exceptions import RayActorError

        self.deaths, self.killed, self.started = deaths, [], 0
        self.error, self.load_error = error or RayActorError, load_error
        self.asked: list[int] = []  # the actors that answered a pool question, by number
        self.running: set[str] = set()  # the jobs whose score calls never finish
        self.timeouts: list[float | None] = []  # of each wait

    def die(self, error):
        if self.deaths:
            self.deaths -= 1
            return error
        return None

    def remote(self, _cls):
        ray = self

        class Options:
            def options(self, **_):
                return self

            def remote(self, _cfg):
                ray.started += 1
                return _FakeActor(ray, ray.started)

        return Options()

    def wait(self, refs, num_returns, timeout=None):
        self.timeouts.append(timeout)
        ready = [r for r in refs if not getattr(r, "running", False)][:num_returns]
        return ready, [r for r in refs if not any(r is done for done in ready)]

    def get(self, ref):
        if isinstance(ref, _Ref):
            ref = ref.answer
        if isinstance(ref, Exception):
            raise ref
        return ref

    def kill(self, actor):
        self.killed.append(actor)


@pytest.mark.parametrize("deaths", [0, 2, 3])
def test_a_worker_dying_on_a_pool_question_is_replaced_up_to_max_attempts(deaths):
    """Each worker that dies answering level 2's pool question is killed, replaced and counted, and the
    question asked again; the third worker to die stops the run naming the question."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from hm3.eval.ray_executor import MAX_ATTEMPTS, RayExecutor
    from hm3.search.run_config import EvaluationConfig

    ev = EvaluationConfig(executor="ray", workers=1)
    ray, logs = _FakeRay(deaths), []
    executor = RayExecutor(ev, ray, started_ray=False, log=logs.append)
    executor.start(SimpleNamespace(evaluation=ev))
    if deaths < MAX_ATTEMPTS:
        assert executor.pool_layout() == "layout"
        assert executor.replaced == len(ray.killed) == deaths and ray.started == 1 + deaths
        assert len(executor.worker_pids()) == 1 and sum("died computing" in m for m in logs) == deaths
    else:
        with pytest.raises(ExecutorError,
                           match=f"died computing the layer pool's layout.*{MAX_ATTEMPTS} workers have died"):
            executor.pool_layout()
        assert len(ray.killed) == MAX_ATTEMPTS and executor.replaced == MAX_ATTEMPTS - 1


def test_a_pool_question_asked_while_a_worker_scores_goes_to_an_idle_one():
    """An actor runs one call at a time: a question given to the worker that is scoring would wait behind its
    whole evaluation, while another worker sits idle."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from hm3.eval.ray_executor import RayExecutor
    from hm3.search.run_config import EvaluationConfig

    ev = EvaluationConfig(executor="ray", workers=2)
    ray = _FakeRay(0)
    executor = RayExecutor(ev, ray, started_ray=False, log=lambda message: None)
    executor.start(SimpleNamespace(evaluation=ev))
    executor.submit("a")  # to the first worker, the fake's actor 1
    assert executor.pool_layout() == "layout" and ray.asked == [2]


@pytest.mark.parametrize("deaths", [0, 1])
def test_jobs_finished_and_not_collected_are_drained_without_waiting_for_running_ones(deaths):
    """What a closing run can still commit: the jobs workers finished that no next_done returned, each once;
    one still running is left (waited for only briefly), and one whose worker died gives nothing."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from hm3.eval.ray_executor import RayExecutor
    from hm3.search.run_config import EvaluationConfig

    ev = EvaluationConfig(executor="ray", workers=3)
    ray = _FakeRay(deaths)
    ray.running = {"c"}
    executor = RayExecutor(ev, ray, started_ray=False, log=lambda message: None)
    executor.start(SimpleNamespace(evaluation=ev))
    for job in ("a", "b", "c"):
        executor.submit(job)
    drained = executor.drain()
    assert drained == [(0, ["a by 1"]), (1, ["b by 2"])][deaths:]  # a's worker died when deaths == 1
    assert ray.timeouts[-1] is not None and executor.drain() == []
    assert executor.pending == 1  # c, still running


def _oom() -> Exception:
    """What a call on an actor that Ray's memory monitor killed raises (Ray >= 2.3): not a RayActorError."""
    from ray.exceptions import OutOfMemoryError

    return OutOfMemoryError("Task was killed due to the node running low on memory.")


@pytest.mark.parametrize("kind", ["died", "oom"])
@pytest.mark.parametrize("deaths", [1, 3])
def test_a_worker_that_dies_scoring_is_replaced_and_its_job_returned_once(kind, deaths):
    """A worker that dies holding a job -- its process gone, or killed by Ray's memory monitor because the
    merge ran the node out of memory -- is killed and replaced, and its job given to the next worker: every
    job's scores come back once, from the worker that finished it. A job whose every worker died stops the
    run, saying how many were tried."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from hm3.eval.ray_executor import MAX_ATTEMPTS, RayExecutor
    from hm3.search.run_config import EvaluationConfig

    # the score calls die in the order made: a's first; with one worker, a's next ones too
    ev = EvaluationConfig(executor="ray", workers=2 if deaths < MAX_ATTEMPTS else 1)
    ray, logs = _FakeRay(deaths, error=_oom if kind == "oom" else None), []
    executor = RayExecutor(ev, ray, started_ray=False, log=logs.append)
    executor.start(SimpleNamespace(evaluation=ev))
    tickets = [executor.submit(job) for job in ("a", "b")]
    if deaths < MAX_ATTEMPTS:
        done = dict(executor.next_done() for _ in tickets)
        assert done == {0: ["a by 3"], 1: ["b by 2"]} and executor.pending == 0
        assert executor.replaced == len(ray.killed) == 1 and len(executor.worker_pids()) == 2
        assert sum("died scoring a candidate" in m for m in logs) == 1
    else:
        with pytest.raises(ExecutorError, match=rf"died scoring a candidate.*{MAX_ATTEMPTS} workers have died "
                                                "holding it"):
            while executor.pending:
                executor.next_done()
        assert len(ray.killed) == MAX_ATTEMPTS


def test_a_worker_killed_for_memory_while_loading_its_model_is_named():
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from hm3.eval.ray_executor import RayExecutor
    from hm3.search.run_config import EvaluationConfig

    ev = EvaluationConfig(executor="ray", workers=1)
    executor = RayExecutor(ev, _FakeRay(0, load_error=_oom()), started_ray=False, log=lambda message: None)
    with pytest.raises(ExecutorError, match=r"Ray worker 0 \(pid 1001 on node node\) died while loading the model: "
                                            "Task was killed due to the node running low on memory"):
        executor.start(SimpleNamespace(evaluation=ev))


@pytest.mark.slow
def test_a_worker_killed_before_level2_asks_for_the_pool_is_replaced(ray_cluster, tiny_family):
    """A worker found dead when level 2 asks for the pool's layout or layer features is replaced, and the
    question answered by its replacement as it was before."""
    from hm3.search.level1 import evaluation_executor

    cfg = parse_run_config(_config(tiny_family, executor="ray", workers=1))
    with evaluation_executor(cfg, lambda message: None) as executor:
        layout, features = executor.pool_layout(), executor.layer_features(["base"], {})
        for replaced, ask in enumerate((executor.pool_layout, lambda: executor.layer_features(["base"], {})), 1):
            (pid,) = executor.worker_pids()
            os.kill(pid, signal.SIGKILL)
            answer = ask()
            assert executor.replaced == replaced and executor.worker_pids() != [pid]
            assert answer == layout if replaced == 1 else torch.equal(answer, features)



def _rows_once(run_dir: Path) -> tuple[int, int]:
    """(candidates, validation rows) of a run, asserting each candidate is scored exactly once per objective
    and split (a repeated evaluation would add a row; a lost one would leave a candidate without)."""
    with RunStore.open(run_dir, readonly=True) as store:
        rows = store.evaluations()
        keys = [(e.candidate_id, e.objective, e.split) for e in rows]
        assert len(keys) == len(set(keys))
        candidates = len(store.candidates())
        validation = {(e.candidate_id, e.objective) for e in rows if e.split == "validation"}
        assert len(validation) == 2 * candidates
        return candidates, len(validation)


@pytest.mark.slow
def test_a_worker_killed_mid_evaluation_is_replaced_and_its_candidate_scored_once(ray_cluster, labelled_family,
                                                                                  tmp_path, monkeypatch):
    """SIGKILL to a worker holding a job, mid-run: its candidate goes to another worker, a replacement starts,
    the run completes with each candidate scored once, and what it tells is what an unbroken run tells (the
    batch's order does not depend on which worker scored what)."""
    from hm3.eval.ray_executor import RayExecutor
    from hm3.search.level1 import run_level1

    killed: list[int] = []
    calls = [0]
    original = RayExecutor.next_done

    def next_done(self):
        out = original(self)
        calls[0] += 1
        # the 4th result is the first of level 1's first batch: the other worker is still scoring its merge
        busy = self.worker_pids(busy=True)
        if calls[0] == 4 and busy:
            os.kill(busy[0], signal.SIGKILL)
            killed.append(busy[0])
        return out

    monkeypatch.setattr(RayExecutor, "next_done", next_done)
    cfg = parse_run_config(_config(labelled_family, budget=4, executor="ray", workers=2))
    result = run_level1(cfg, tmp_path / "run", progress=False)
    assert len(killed) == 1
    assert result.summary["workers_replaced"] == 1
    assert _rows_once(tmp_path / "run") == (3 + 4, 2 * (3 + 4))
    with RunStore.open(tmp_path / "run", readonly=True) as store:
        assert sum(e.count for e in store.evaluations()) == result.summary["evaluated_examples_this_process"]
    monkeypatch.setattr(RayExecutor, "next_done", original)
    run_level1(cfg, tmp_path / "unbroken", progress=False)
    assert _told(tmp_path / "run") == _told(tmp_path / "unbroken")


@pytest.mark.slow
def test_scores_ray_workers_finished_are_committed_when_the_session_closes_first(ray_cluster, tiny_family, tmp_path):
    """On real workers: two candidates in flight, both finished and neither collected when the run stops --
    closing the session commits both before the workers are stopped."""
    from hm3.eval.parallel import ExecutorSession
    from hm3.search.level1 import evaluation_executor

    cfg = parse_run_config(_config(tiny_family, executor="ray", workers=2))
    with evaluation_executor(cfg, lambda message: None) as executor, RunStore.open(tmp_path / "run") as store:
        session = ExecutorSession(cfg, store, executor)
        refs = [session.submit(MergeCandidate(_recipe(w, 1 - w)), session.validation)[0] for w in (0.3, 0.6)]
        _, running = ray_cluster.wait(list(executor._running), num_returns=2, timeout=120)
        assert not running
        session.close()
        assert executor.worker_pids() == []
        assert all(session.stored_scores(ref, session.validation) is not None for ref in refs)


def _validation_rows(run_dir: Path) -> int:
    """Validation scores stored so far in a run another process is writing (0 before its store exists)."""
    try:
        with RunStore.open(run_dir, readonly=True) as store:
            return sum(e.split == "validation" for e in store.evaluations())
    except Hm3Error:
        return 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_driver_killed_with_sigkill_resumes_to_the_front_of_an_unbroken_run(ray_cluster, labelled_family,
                                                                              tmp_path, sigkill_hm3):
    """Batch mode: the search process killed with -9 once level 1 has stored a merge's scores (a batch in
    flight), then --resume: the same points told, the same front as a run never interrupted, each
    candidate scored once. Both join this module's Ray instance."""
    from hm3.cli import main

    address = ray_cluster.get_runtime_context().gcs_address
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(_config(labelled_family, budget=4, executor="ray", workers=2)))
    argv = ["-q", "search", "param", str(path)]
    run, unbroken = tmp_path / "run", tmp_path / "unbroken"
    # the references' 3 × 2 scores, then the first merge's: level 1 is scoring its first batch
    sigkill_hm3([*argv, str(run), "--ray-address", address], lambda: _validation_rows(run) >= 2 * 3 + 2,
                pause_at="hm3.store:RunStore.record_evaluation", timeout=200)
    assert not (run / "front.csv").exists() and len(_told(run)) < 4
    assert main([*argv, str(run), "--resume", "--ray-address", address]) == ExitCode.OK
    assert main([*argv, str(unbroken), "--ray-address", address]) == ExitCode.OK
    assert _told(run) == _told(unbroken) and len(_told(run)) == 4
    assert (run / "front.csv").read_text() == (unbroken / "front.csv").read_text()
    assert _rows_once(run)[0] == 3 + 4


# --- asynchronous proposals --------------------------------------------------------------------------


@pytest.mark.slow
def test_async_proposals_score_each_candidate_once_and_say_so_in_the_summary(ray_cluster, labelled_family,
                                                                             tmp_path):
    """Two workers, each given a new point as it finishes: every point asked is told exactly once, every
    candidate scored once, and the summary says the order is not reproducible and how idle the workers were.
    The run is stopped after 3 points and resumed with one more point recorded as in flight (as a killed
    run leaves it): the resumed run scores and tells it, and repeats no stored evaluation."""
    from hm3.search.level1 import ASK_EVENT, run_level1, told_points

    cfg = parse_run_config(_config(labelled_family, budget=6, executor="ray", workers=2, proposals="async"))
    run = tmp_path / "run"
    run_level1(cfg, run, progress=False, stop_after=3)
    assert len(_told(run)) == 3
    in_flight = [0.25] * cfg.search_space.dim
    with RunStore.open(run) as store:
        ref = store.add_candidate(cfg.search_space.to_recipe(torch.tensor(in_flight, dtype=torch.float64)), "merge")
        store.add_event(ASK_EVENT, {"candidate": ref.id, "x": in_flight})
    result = run_level1(cfg, run, resume=True, progress=False)
    assert len(_told(run)) == 6
    assert _rows_once(run) == (3 + 6, 2 * (3 + 6))
    with RunStore.open(run, readonly=True) as store:
        asked, told = told_points(store, ASK_EVENT), told_points(store)
    assert len(asked) == 6 and sorted(asked) == sorted(told) and (ref.id, in_flight) in told
    summary = json.loads((run / "summary.json").read_text())
    assert summary["proposals"] == "async" and "not reproducible" in summary["proposal_order"]
    assert 0 <= summary["worker_idle_share"] < 1 and summary["worker_busy_seconds"] > 0
    assert summary["workers_replaced"] == 0 and summary["evaluations"] == result.summary["evaluations"] == 6


@pytest.mark.slow
def test_a_request_refined_on_ray_workers_is_a_local_refinement(ray_cluster, labelled_family, tmp_path):
    """``hm3 request --refine`` on one Ray worker asks and scores what a local request does; on two it
    proposes two merges at a time and scores each once; the executor flags reach the request."""
    import shutil

    from hm3.cli import _request_executor as request_executor
    from hm3.cli import build_parser
    from hm3.request import answer_request
    from hm3.run.directory import REFINE_EVENT
    from hm3.search.level1 import run_level1

    run_level1(parse_run_config(_config(labelled_family)), tmp_path / "run", progress=False)
    for copy in ("local", "ray1", "ray2"):
        shutil.copytree(tmp_path / "run", tmp_path / copy)
    objectives = json.loads((tmp_path / "run" / "summary.json").read_text())["objectives"]
    prefer = ",".join(f"{n}={w}" for n, w in zip(objectives, (0.7, 0.3), strict=True))

    def refined(run: Path) -> list[tuple[dict, list[float]]]:
        with RunStore.open(run, readonly=True) as store:
            out = []
            for e in store.events(REFINE_EVENT):
                _, recipe = store.candidate(e.payload["candidate"])
                out.append((recipe, [ev.score for ev in store.evaluations(e.payload["candidate"],
                                                                           split="validation")]))
            return out

    local = answer_request(tmp_path / "local", prefer, tmp_path / "out-local", refine=3, progress=False)
    one = answer_request(tmp_path / "ray1", prefer, tmp_path / "out-ray1", refine=3, progress=False,
                         executor={"executor": "ray", "workers": 1})
    assert refined(tmp_path / "ray1") == refined(tmp_path / "local") and len(refined(tmp_path / "local")) == 3
    assert (one.source, one.evaluations, list(one.scores)) == (local.source, local.evaluations, list(local.scores))
    two = answer_request(tmp_path / "ray2", prefer, tmp_path / "out-ray2", refine=3, progress=False,
                         executor={"executor": "ray", "workers": 2})
    with RunStore.open(tmp_path / "ray2", readonly=True) as store:
        events = store.events(REFINE_EVENT)
        assert len(events) == 3
        for e in events:  # each refined merge scored once, on every objective
            assert len(store.evaluations(e.payload["candidate"], split="validation")) == len(objectives)
    assert two.evaluations == len({e.payload["candidate"] for e in events})
    placement = json.loads((tmp_path / "ray2" / "summary.json").read_text())["placement_this_process"]
    assert placement | {"executor": "ray", "workers": "2"} == placement  # written again by the Ray session
    args = build_parser().parse_args(["request", "RUN", "--prefer", prefer, "OUT", "--refine", "2", "--workers", "2",
                                      "--gpus-per-worker", "0.5", "--ray-address", "auto"])
    assert request_executor(args) == {"executor": "ray", "workers": 2, "ray_address": "auto",
                                      "resources_per_worker": {"num_gpus": 0.5, "num_cpus": 1}}
    assert request_executor(build_parser().parse_args(["request", "RUN", "--prefer", prefer, "OUT"])) is None
    with pytest.raises(ConfigError, match="workers: 2 is a setting of executor: ray"):
        answer_request(tmp_path / "ray2", prefer, tmp_path / "out-bad", refine=1, progress=False,
                       executor={"executor": "local", "workers": 2})
    assert not (tmp_path / "out-bad").exists()
