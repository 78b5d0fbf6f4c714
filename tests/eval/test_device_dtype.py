"""Evaluation device and dtype: the run config's keys, bfloat16 evaluation on the CPU against float32,
the merger's residency rule, vLLM's engine settings, and a device this machine lacks refused clearly.

No GPU is needed: CUDA itself is only ever asked whether it is available (patched where a test needs
an answer this machine may not give), and the CUDA paths are checked by reading them, not here.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
import yaml

from hm3.config import parse_merge_config
from hm3.devices import resolve_device, resolve_dtype
from hm3.errors import ConfigError, DeviceError, ExitCode
from hm3.eval.live import LiveModelSession
from hm3.eval.session import MergeCandidate
from hm3.merge.inmemory import RESIDENT_SHARE, choose_residency
from hm3.run.config import migrate_stored_config, stored_form
from hm3.search.run_config import EvaluationConfig, parse_run_config
from hm3.store import RunStore
from objectives.registry import get_objective

GIB = 2**30
# bfloat16 keeps 8 significant bits: each weight and activation is rounded by at most 2^-9 (0.2 %). On the
# tiny family's 2-layer model that moves a continuation's summed log-likelihood by about 0.01 nats (0.002
# to 0.017 measured); 0.1 nats leaves room for other seeds while staying far below how much other weights
# move it (the base instead of the merge scored here: 2 nats on some choices), so a bfloat16 session
# scoring the wrong weights fails.
LOGLIKELIHOOD_TOL = 0.1


def _config(tiny_family, **evaluation) -> dict:
    _, models, objectives = tiny_family
    return {
        "models": models,
        "objectives": objectives,
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
        "evaluation": {"validation_examples": 12, "test_examples": 12, "batch_size": 16} | evaluation,
    }


RECIPE = {"merge_method": "ties", "base_model": "base",
          "models": [{"model": "m1", "parameters": {"weight": 0.7, "density": 0.5}},
                     {"model": "m2", "parameters": {"weight": 0.4, "density": 0.7}}]}


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 units in the last place between two bfloat16 tensors (bit patterns made
    monotonic: negatives mirrored below zero, so -0 and +0 coincide)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


# --- the config ------------------------------------------------------------------------------------


def test_defaults_are_float32_on_the_cpu_and_vllm_engine_defaults():
    ev = EvaluationConfig()
    assert (ev.device, ev.dtype) == ("cpu", "float32")
    assert ev.resolve() == (torch.device("cpu"), torch.float32)
    assert ev.vllm.model_dump() == {"tensor_parallel_size": 1, "gpu_memory_utilization": None, "max_model_len": None}


def test_evaluation_keys_round_trip_through_the_stored_config(tiny_family):
    given = {"device": "cuda:1", "dtype": "bfloat16",
             "vllm": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85, "max_model_len": 4096}}
    cfg = parse_run_config(_config(tiny_family, **given))
    stored = json.loads(json.dumps(stored_form(cfg)))  # as the run store keeps it
    assert {k: stored["level1"]["evaluation"][k] for k in given} == given
    again = parse_run_config(migrate_stored_config(stored, where="test")["level1"])
    assert again == cfg
    assert parse_run_config(yaml.safe_load(yaml.safe_dump(cfg.canonical()))) == cfg


def test_a_format_2_config_reads_as_float32_on_the_cpu(tiny_family):
    """Runs stored before these keys existed evaluated in float32 on the CPU, and resume as such."""
    cfg = parse_run_config(_config(tiny_family))
    stored = stored_form(cfg)
    old = {k: v for k, v in stored["level1"]["evaluation"].items() if k not in ("device", "dtype", "vllm")}
    migrated = migrate_stored_config({"format": 2, "level1": stored["level1"] | {"evaluation": old}}, where="test")
    assert migrated == stored


@pytest.mark.parametrize(("evaluation", "message"), [
    ({"dtype": "fp8"}, r"evaluation\.dtype: .*'float32', 'bfloat16', 'float16' or 'auto'"),
    ({"dtype": "bf16"}, r"evaluation\.dtype: "),
    ({"device": "tpu"}, r"evaluation\.device: 'tpu' is not a device: use cpu, cuda, cuda:N or auto"),
    ({"device": "cuda:x"}, r"evaluation\.device: 'cuda:x' is not a device"),
    ({"device": "GPU"}, r"evaluation\.device: 'GPU' is not a device"),
    ({"vllm": {"gpu_memory_utilization": 1.5}}, r"evaluation\.vllm\.gpu_memory_utilization: "),
    ({"vllm": {"tensor_parallel_size": 0}}, r"evaluation\.vllm\.tensor_parallel_size: "),
    ({"vllm": {"enforce_eager": True}}, r"evaluation\.vllm\.enforce_eager: unknown key"),
])
def test_unknown_devices_dtypes_and_engine_settings_are_refused_naming_the_key(tiny_family, evaluation, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(_config(tiny_family, **evaluation))


# --- resolving against this machine ----------------------------------------------------------------


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_is_cuda_where_available_and_bfloat16_there(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    device = resolve_device("auto", key="evaluation.device")
    assert device == torch.device("cuda" if cuda else "cpu")
    assert resolve_dtype("auto", device, key="evaluation.dtype") == (torch.bfloat16 if cuda else torch.float32)
    assert resolve_dtype("float16", device, key="evaluation.dtype") == torch.float16


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_where_it_is_absent_is_an_environment_error_naming_the_key(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine, wherever the test runs
    with pytest.raises(DeviceError, match=rf"evaluation\.device '{device}': CUDA is not available") as err:
        EvaluationConfig(device=device).resolve()
    assert err.value.exit_code == ExitCode.ENVIRONMENT


def test_search_with_cuda_absent_stops_before_the_run_directory_exists(tiny_family, tmp_path, monkeypatch, capsys):
    from hm3.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tmp_path / "run.yml"
    cfg.write_text(yaml.safe_dump(_config(tiny_family, device="cuda") | {"optimizer": {"name": "random", "budget": 2}}))
    assert main(["search", "param", str(cfg), str(tmp_path / "run"), "--quiet"]) == ExitCode.ENVIRONMENT
    err = capsys.readouterr().err
    assert "evaluation.device 'cuda': CUDA is not available" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_run_with_auto_resumes_only_where_auto_resolves_as_it_did(tiny_family, tmp_path, monkeypatch, capsys):
    """``auto`` passes the config check on any machine; the run records what it resolved to (float32 on the
    CPU here) and a resume that would score in bfloat16 is refused before it evaluates or writes anything."""
    import hm3.search.run_config as run_config
    from hm3.cli import main
    from hm3.run.directory import PLACEMENT_EVENT

    cfg = tmp_path / "run.yml"
    cfg.write_text(yaml.safe_dump(_config(tiny_family, dtype="auto") | {"optimizer": {"name": "random", "budget": 3}}))
    run = tmp_path / "run"
    assert main(["search", "param", str(cfg), str(run), "--quiet", "--budget", "2"]) == 0
    with RunStore.open(run, readonly=True) as store:
        assert [e.payload for e in store.events(PLACEMENT_EVENT)] == [{"device": "cpu", "dtype": "float32"}]
        evaluations = len(store.evaluations())
    written = {n: (run / n).read_bytes() for n in ("front.csv", "candidates.csv", "summary.json")}

    real = run_config.resolve_dtype
    monkeypatch.setattr(run_config, "resolve_dtype",  # a machine where auto means bfloat16, as on a GPU
                        lambda name, device, *, key: torch.bfloat16 if name == "auto" else real(name, device, key=key))
    capsys.readouterr()
    assert main(["search", "param", str(cfg), str(run), "--quiet", "--resume", "--budget", "3"]) == ExitCode.ENVIRONMENT
    err = capsys.readouterr().err
    assert "its scores were computed in float32 on cpu" in err and "bfloat16 on cpu" in err
    with RunStore.open(run, readonly=True) as store:
        assert len(store.evaluations()) == evaluations and len(store.events(PLACEMENT_EVENT)) == 1
    assert {n: (run / n).read_bytes() for n in written} == written

    monkeypatch.setattr(run_config, "resolve_dtype", real)  # back where auto means float32: it resumes
    assert main(["search", "param", str(cfg), str(run), "--quiet", "--resume", "--budget", "3"]) == 0
    with RunStore.open(run, readonly=True) as store:
        assert len(store.evaluations()) > evaluations and len(store.events(PLACEMENT_EVENT)) == 1


# --- the merger's residency ------------------------------------------------------------------------


def test_task_vectors_stay_on_a_gpu_only_when_they_fit_in_its_free_memory():
    cuda = torch.device("cuda:0")
    fits = choose_residency(cuda, 6 * GIB, 1 * GIB, free_bytes=10 * GIB)
    assert fits.resident and fits.mode == "resident" and "7.00 GiB" in fits.reason and "10.00 GiB" in fits.reason
    # 7 GiB needed, the share of 8 GiB free is 6.4 GiB: streamed, and the reason gives both numbers
    tight = choose_residency(cuda, 6 * GIB, 1 * GIB, free_bytes=8 * GIB)
    assert RESIDENT_SHARE * 8 < 7 < RESIDENT_SHARE * 10
    assert not tight.resident and tight.mode == "streamed" and "7.00 GiB" in tight.reason and "8.00 GiB" in tight.reason
    assert choose_residency(torch.device("cpu"), 10**15, 10**15, free_bytes=None).resident


def test_free_gpu_memory_counts_what_torchs_allocator_holds_unused(monkeypatch):
    """Tensors freed in this process stay reserved by torch's caching allocator, which the driver counts as
    used: they are free to this process, so they count."""
    from hm3.merge.inmemory import free_device_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * GIB)
    assert free_device_memory(torch.device("cuda:0")) == 4 * GIB
    assert free_device_memory(torch.device("cpu")) is None


def test_fisher_tensors_stay_on_the_device_only_when_they_fit_beside_the_task_vectors(tiny_family, monkeypatch):
    """The task vectors' residency counted no Fisher: set_fishers decides for them on what is free then,
    holding them in host memory (copied over per tensor) when they do not fit. A device other than the
    CPU is stood in for by "meta", whose tensors have shapes but no storage."""
    from hm3.merge import inmemory

    _, models, _ = tiny_family
    free = {"bytes": 1 << 40}
    monkeypatch.setattr(inmemory, "free_device_memory", lambda device: free["bytes"])
    merger = inmemory.InMemoryMerger(models["base"], [models["m1"], models["m2"]], model_refs=["m1", "m2"],
                                     device="meta")
    assert merger.residency.resident and merger.fisher_residency is None
    fishers = {r: {n: torch.ones_like(t, device="cpu") for n, t in merger.base.items()} for r in ("m1", "m2")}
    two_models = 2 * sum(t.numel() * 4 for t in merger.base.values())
    free["bytes"] = two_models  # the Fishers alone, without a workspace, would take all of it
    merger.set_fishers(fishers)
    assert not merger.fisher_residency.resident and "the Fisher tensors and a merge workspace" in \
        merger.fisher_residency.reason
    assert {t.device.type for f in merger._fishers.values() for t in f.values()} == {"cpu"}
    free["bytes"] = 4 * two_models
    merger.set_fishers(fishers)
    assert merger.fisher_residency.resident
    assert {t.device.type for f in merger._fishers.values() for t in f.values()} == {"meta"}
    # task vectors that did not fit: the Fishers stay in host memory with them, and say so, however much is free
    free["bytes"] = 1
    streamed = inmemory.InMemoryMerger(models["base"], [models["m1"], models["m2"]], model_refs=["m1", "m2"],
                                       device="meta")
    assert not streamed.residency.resident
    free["bytes"] = 1 << 40
    streamed.set_fishers(fishers)
    assert not streamed.fisher_residency.resident and "task vectors are streamed" in streamed.fisher_residency.reason
    assert {t.device.type for f in streamed._fishers.values() for t in f.values()} == {"cpu"}


# --- bfloat16 on the CPU -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sessions(tiny_family, tmp_path_factory):
    """A float32 and a bfloat16 session on the tiny family, each with RECIPE's merge installed."""
    opened = {}
    for dtype in ("float32", "bfloat16"):
        store = RunStore.open(tmp_path_factory.mktemp(dtype) / "run")
        session = LiveModelSession(parse_run_config(_config(tiny_family, dtype=dtype)), store, log=lambda m: None)
        opened[dtype] = (session, session.score(MergeCandidate(RECIPE), session.validation).scores)
    yield opened
    for session, _ in opened.values():
        session.close()
        session.store.close()


def test_a_bfloat16_merge_is_the_float32_merge_cast_to_bfloat16(sessions):
    """The merge is computed in float32 and cast once, as it is written into the bfloat16 model: each
    live tensor lies within one bfloat16 ulp of the float32 merge (merging in bfloat16 misses by
    thousands of ulps on these task vectors)."""
    session, _ = sessions["bfloat16"]
    live = session.backend.live_parameters()
    merged = session.merger.merged_state(parse_merge_config(RECIPE))
    assert all(t.dtype == torch.float32 for t in session.merger.base.values())
    assert set(merged) <= set(live)
    for name, tensor in merged.items():
        assert live[name].dtype == torch.bfloat16, name
        assert int(_ulps(live[name].detach(), tensor.to(torch.bfloat16)).max()) <= 1, name
    assert session.placement == {"device": "cpu", "dtype": "bfloat16", "merge_dtype": "float32",
                                 "task_vectors": "resident", "task_vectors_why": session.merger.residency.reason}


def test_bfloat16_scores_match_float32_within_what_its_rounding_can_flip(sessions):
    """Every choice's log-likelihood moves by less than LOGLIKELIHOOD_TOL, so a pick can change only
    where float32's best two choices are within twice that: each objective's accuracy may differ by
    at most those examples' share, and here by nothing else."""
    f32, scores32 = sessions["float32"]
    b16, scores16 = sessions["bfloat16"]
    for k, name in enumerate(f32.objective_names):
        objective = get_objective(f32.cfg.objectives[k])
        examples = [objective.examples("validation")[i] for i in f32.validation.indices[name]]
        requests = [(e.prompt, c) for e in examples for c in e.choices]
        ll32 = torch.tensor(f32.backend.loglikelihood(requests))
        ll16 = torch.tensor(b16.backend.loglikelihood(requests))
        assert float((ll16 - ll32).abs().max()) < LOGLIKELIHOOD_TOL, name
        top2 = [row.topk(2).values for row in ll32.split([len(e.choices) for e in examples])]
        close = sum(int(best - second < 2 * LOGLIKELIHOOD_TOL) for best, second in top2)
        assert abs(scores16[k] - scores32[k]) <= close / len(examples) + 1e-12, name


# --- vLLM's engine settings ------------------------------------------------------------------------


@pytest.mark.parametrize(("evaluation", "expected"), [
    ({}, {"dtype": "float32", "tensor_parallel_size": 1}),
    ({"dtype": "bfloat16", "vllm": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 256}},
     {"dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 256}),
])
def test_vllm_engine_settings_reach_the_engine(tiny_family, tmp_path, monkeypatch, evaluation, expected):
    """The session opens vLLM's ``LLM`` with the config's dtype and engine settings; those left unset are
    not passed, so vLLM keeps its own defaults. (A stand-in ``LLM`` records them: nothing is loaded.)"""
    import hm3.eval.vllm as hm3_vllm

    calls = []

    def engine(model: str, **kw: object) -> types.SimpleNamespace:
        calls.append(kw)
        return types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=kw.get("max_model_len", 256)))

    fake = types.SimpleNamespace(LLM=engine)
    monkeypatch.setattr(hm3_vllm, "import_vllm", lambda: fake)
    monkeypatch.setattr(hm3_vllm, "check_platform", lambda model_dir: None)
    monkeypatch.setattr(hm3_vllm, "supported_head_sizes", lambda: None)
    cfg = parse_run_config(_config(tiny_family, backend="vllm", **evaluation))
    with RunStore.open(tmp_path / "run") as store:
        session = LiveModelSession(cfg, store, log=lambda m: None)
        assert session.placement["dtype"] == expected["dtype"]
    (kw,) = calls
    assert {k: kw[k] for k in kw if k not in ("seed", "enforce_eager", "max_num_seqs")} == expected
