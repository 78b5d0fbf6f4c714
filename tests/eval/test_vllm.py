"""The vLLM backend, for real, against the transformers backend on tiny random models in float32.

The engine tests skip only where vLLM is not installed (the head-size check runs everywhere). Run them
in the vLLM environment: ``.venv/bin/python -m pytest tests/eval/test_vllm.py``. One engine is shared
by the module (each start costs seconds); the last test closes it and starts a fresh one.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import VOCAB_SIZE, build_tiny_lm, save_char_tokenizer

from hm3.errors import BackendError, CheckpointError
from hm3.eval.backend import LM_HEAD, cut_at_stop, open_backend
from hm3.eval.evaluate import evaluate_objective
from hm3.eval.hf import HFBackend
from hm3.eval.vllm import CPU_HEAD_SIZES, VLLMBackend, check_head_dim, head_dim_of
from objectives.choice import ChoiceObjective
from objectives.registry import get_objective
from objectives.translation import TranslationObjective

pytestmark = pytest.mark.vllm
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

PROMPTS = ["hello", "a much longer prompt than the others", "x", "12+34=", "the cat sat on", "hello there"]
# Longer than one KV block (128 tokens on CPU): only full blocks enter vLLM's prefix cache, so only
# prompts like these can show stale keys/values after a weight reload.
LONG_PROMPTS = [
    ("the quick brown fox jumps over the lazy dog. " * 4) + tail for tail in ("one", "two", "three")
]
REQUESTS = [("hello", " world"), ("", "abc"), ("Question: 2+2\nAnswer:", " 4"), ("q", "a long continuation")]


def test_head_dim_from_config_and_check_names_model_size_and_supported_sizes(tmp_path):
    assert head_dim_of({"hidden_size": 64, "num_attention_heads": 4}) == 16
    assert head_dim_of({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}) == 32
    assert head_dim_of({"text_config": {"hidden_size": 128, "num_attention_heads": 2}}) == 64
    assert head_dim_of({"num_attention_heads": 2}) is None
    check_head_dim(tmp_path, 32, CPU_HEAD_SIZES)
    check_head_dim(tmp_path, 16, None)  # no known limit (e.g. on a GPU): nothing to refuse
    with pytest.raises(BackendError, match=rf"{tmp_path}: head_dim 16 .*supported head sizes: 32, 64, 80"):
        check_head_dim(tmp_path, 16, CPU_HEAD_SIZES)


@needs_vllm
def test_unsupported_head_dim_is_refused_before_the_engine_starts(tmp_path):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the head-size limit is vLLM's CPU attention's")
    from hm3.checkpoint.synthetic import build_random_llama

    model = build_random_llama(tmp_path / "m", hidden_size=64, num_heads=4, vocab_size=VOCAB_SIZE)  # head_dim 16
    save_char_tokenizer(model, vocab_size=VOCAB_SIZE)
    with pytest.raises(BackendError, match=rf"{model}: head_dim 16 is not supported"):
        VLLMBackend(model)



@needs_vllm
@pytest.mark.parametrize("platform", ["none", "gpu"])
def test_a_vllm_build_without_its_device_is_refused_before_the_engine_starts(tmp_path, monkeypatch, platform):
    """A GPU build of vLLM where no GPU is visible (no driver: vLLM detects no platform; or a GPU hidden by
    CUDA_VISIBLE_DEVICES, as Ray hides one from a worker that reserves none) fails deep inside the engine
    with a bare RuntimeError; hm3 names the cause instead."""
    import vllm.platforms
    from vllm.platforms.interface import PlatformEnum, UnspecifiedPlatform

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    gpu_build = type("GPUBuild", (UnspecifiedPlatform,), {"_enum": PlatformEnum.CUDA, "device_type": "cuda"})
    monkeypatch.setattr(vllm.platforms, "_current_platform",
                        UnspecifiedPlatform() if platform == "none" else gpu_build())
    model = build_tiny_lm(tmp_path / "m")
    with pytest.raises(BackendError, match=r"vLLM .* GPU.*--backend hf"):
        VLLMBackend(model)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("vllm_models")
    return {"a": build_tiny_lm(root / "a", seed=0), "b": build_tiny_lm(root / "b", seed=1)}


@pytest.fixture(scope="module")
def hf(models) -> dict[str, HFBackend]:
    return {k: HFBackend.from_pretrained(d, batch_size=4) for k, d in models.items()}


@pytest.fixture(scope="module")
def engine(models):
    backend = open_backend("vllm", models["a"], batch_size=8)
    yield backend
    backend.close()


def test_open_backend_gives_a_vllm_engine(engine):
    assert isinstance(engine, VLLMBackend) and engine.name == "vllm"
    assert engine.live_parameters() is None
    assert engine.generate([], max_new_tokens=4) == [] and engine.loglikelihood([]) == []


def test_generation_equals_hf_token_for_token(engine, hf):
    """One character per token, so equal texts are equal token sequences."""
    got = engine.generate(PROMPTS, max_new_tokens=24)
    assert got == hf["a"].generate(PROMPTS, max_new_tokens=24)
    assert all(len(o) > 0 for o in got)


def test_stop_strings_equal_hf(engine, hf):
    full = engine.generate(PROMPTS, max_new_tokens=16)
    stop = [full[0][2], full[1][5]]
    got = engine.generate(PROMPTS, max_new_tokens=16, stop=stop)
    assert got == hf["a"].generate(PROMPTS, max_new_tokens=16, stop=stop)
    assert got[0] == full[0][: full[0].index(stop[0])]


def test_stop_strings_that_begin_in_the_prompt_equal_hf(engine, hf):
    """vLLM searches stop strings in the new text only; so must hf (a prompt ending in "\\n" and a stop
    "\\n\\n" must not end an answer whose first token is "\\n")."""
    full = engine.generate(PROMPTS, max_new_tokens=16)
    stop = [PROMPTS[0][-1] + full[0][0], PROMPTS[2][-1] + full[2][0]]
    got = engine.generate(PROMPTS, max_new_tokens=16, stop=stop)
    assert got == hf["a"].generate(PROMPTS, max_new_tokens=16, stop=stop)
    assert got == [cut_at_stop(o, stop) for o in full]


def test_loglikelihood_close_to_hf(engine, hf):
    got = engine.loglikelihood(REQUESTS)
    assert got == pytest.approx(hf["a"].loglikelihood(REQUESTS), rel=1e-4, abs=1e-4)


def test_objective_scores_agree_with_hf(engine, hf, tmp_path):
    translation = tmp_path / "tr.jsonl"
    translation.write_text(
        "".join(
            json.dumps({"source": s, "target": t, "split": "test"}) + "\n"
            for s, t in [("the cat", "le chat"), ("a dog", "un chien"), ("red", "rouge")]
        )
    )
    choice = tmp_path / "mc.jsonl"
    choice.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": 0, "split": "test"}) + "\n"
            for q, c in [("1+2", ["3", "4", "x"]), ("sky", ["blue", "green"])]
        )
    )
    for objective in (TranslationObjective(translation), ChoiceObjective(choice)):
        from_vllm = evaluate_objective(engine, objective, "test")
        from_hf = evaluate_objective(hf["a"], objective, "test")
        assert from_vllm.outputs == from_hf.outputs
        assert from_vllm.score == from_hf.score


def test_chat_template_prompts_agree_with_hf(engine, hf, tmp_path):
    """A chat=true objective reaches vLLM (and hf) as the templated prompt. Each backend is compared with
    itself on the prompt written by hand: 256 greedy tokens of a random model drift apart between the two
    engines' float kernels, which the other tests here bound on shorter outputs."""
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "#### 1", "split": "test"}) + "\n"
                            for q in ("1+1", "the cat")))
    objective = get_objective(f"gsm8k:{data},chat=true")
    by_hand = [f"<user>Question: {q}\nAnswer:\n<assistant>" for q in ("1+1", "the cat")]
    for backend in (engine, hf["a"]):
        backend.tokenizer.chat_template = template
        try:
            chat = evaluate_objective(backend, objective, "test").outputs
        finally:
            backend.tokenizer.chat_template = None
        assert list(chat) == backend.generate(by_hand, max_new_tokens=256, stop=objective.decoding.stop)


def test_bad_state_is_refused_before_reload(engine, models, hf):
    good = load_file(models["b"] / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors model\.norm\.weight"):
        engine.load_state({k: v for k, v in good.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        engine.load_state({**good, "model.norm.weight": torch.zeros(3)})
    broken = {**good, "model.norm.weight": torch.full_like(good["model.norm.weight"], float("nan"))}
    with pytest.raises(CheckpointError, match=r"non-finite values in 'model\.norm\.weight'"):
        engine.load_state(broken)  # vLLM shows no logits: its weights are checked before the swap
    assert engine.generate(PROMPTS, max_new_tokens=8) == hf["a"].generate(PROMPTS, max_new_tokens=8)


def test_reload_then_fresh_engine(engine, models, hf):
    """In-place reload (after the prefix cache holds the old weights' keys/values) equals a fresh
    engine on the new weights, and both equal transformers. Closes the module's engine: keep after its users."""
    prompts = PROMPTS + LONG_PROMPTS
    engine.generate(prompts, max_new_tokens=8)  # fill the prefix cache with the old weights' KV
    engine.load_state(load_file(models["b"] / "model.safetensors"))
    reloaded = engine.generate(prompts, max_new_tokens=24)
    reloaded_ll = engine.loglikelihood(REQUESTS)
    assert reloaded == hf["b"].generate(prompts, max_new_tokens=24)
    assert reloaded != hf["a"].generate(prompts, max_new_tokens=24)
    engine.close()
    fresh = VLLMBackend(models["b"], batch_size=8)
    try:
        assert fresh.generate(prompts, max_new_tokens=24) == reloaded
        assert fresh.loglikelihood(REQUESTS) == pytest.approx(reloaded_ll, rel=1e-5, abs=1e-5)
    finally:
        fresh.close()


def test_reload_into_a_tied_embedding_model_updates_the_head(tmp_path, engine):
    """SmolLM2-style tied head (``tie_word_embeddings``, no lm_head.weight in the checkpoint): after a
    reload the logits must come from the new embedding. vLLM's CPU head computes from a prepacked copy
    of the weight, so without the backend's fix the swapped model matched neither a nor b. Runs after
    test_reload_then_fresh_engine has closed the module's engine (one engine per process at a time)."""
    engine.close()  # already closed when the whole module runs; needed when this test runs alone
    tied = {k: build_tiny_lm(tmp_path / k, seed=s, tie_word_embeddings=True) for k, s in (("a", 0), ("b", 1))}
    state = {k: load_file(d / "model.safetensors") for k, d in tied.items()}
    embedding = "model.embed_tokens.weight"
    assert LM_HEAD not in state["b"] and not torch.equal(state["a"][embedding], state["b"][embedding])
    hf = {k: HFBackend.from_pretrained(d, batch_size=4) for k, d in tied.items()}
    prompts = PROMPTS + LONG_PROMPTS
    texts = {k: b.generate(prompts, max_new_tokens=24) for k, b in hf.items()}
    scores = {k: b.loglikelihood(REQUESTS) for k, b in hf.items()}
    # the two models are told apart by both checks (tied random models mostly echo their input,
    # so the log-likelihoods are the sharper one)
    assert texts["a"] != texts["b"] and scores["a"] != pytest.approx(scores["b"], rel=1e-3, abs=1e-3)
    backend = VLLMBackend(tied["a"], batch_size=8)
    try:
        assert backend.generate(prompts, max_new_tokens=24) == texts["a"]
        for swap_to in ("b", "a"):  # and back: the head follows every swap
            backend.load_state(state[swap_to])
            assert backend.generate(prompts, max_new_tokens=24) == texts[swap_to]
            assert backend.loglikelihood(REQUESTS) == pytest.approx(scores[swap_to], rel=1e-4, abs=1e-4)
    finally:
        backend.close()



def test_generation_stops_at_the_generation_config_eos_ids_only_as_hf(tmp_path, engine):
    """EOS is the generation config's set (:func:`hm3.eval.backend.generation_eos_ids`) on both backends. vLLM
    also stops at the tokenizer's own EOS unless told to ignore it, which would end answers early where a
    model's generation_config.json lists other ids (here the tokenizer's EOS is a character the model writes,
    the generation config keeps ``</s>``)."""
    engine.close()  # one engine per process at a time
    model = build_tiny_lm(tmp_path / "m", seed=0)
    plain = HFBackend.from_pretrained(model, batch_size=4).generate(PROMPTS, max_new_tokens=24)
    written = next(c for c in plain[0][2:] if c.strip())  # a visible character the model generates
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "eos_token": written}))
    assert json.loads((model / "generation_config.json").read_text())["eos_token_id"] == 2
    hf = HFBackend.from_pretrained(model, batch_size=4)
    assert hf.tokenizer.eos_token == written and hf.eos_ids == {2}
    want = hf.generate(PROMPTS, max_new_tokens=24)
    backend = VLLMBackend(model, batch_size=8)
    try:
        assert backend.generate(PROMPTS, max_new_tokens=24) == want
    finally:
        backend.close()



def test_the_engine_s_own_context_length_bounds_prompts(tmp_path, engine):
    """vLLM takes a model's context length as the smallest of several config keys (``seq_length``,
    ``max_seq_len``, ... beside ``max_position_embeddings``), where lm-eval's rule, which the backends
    share, reads the first of three: a prompt longer than the engine reads must be left-truncated as any
    long prompt is, not refused by the engine mid-evaluation."""
    engine.close()  # one engine per process at a time
    model = build_tiny_lm(tmp_path / "m", seed=0)
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    assert config["max_position_embeddings"] == 256
    config_path.write_text(json.dumps({**config, "max_seq_len": 64}))
    long = LONG_PROMPTS[0]
    assert len(long) > 64
    backend = VLLMBackend(model, batch_size=8)
    try:
        assert backend.max_length == 64
        # one token per character: the last 56 characters (BOS and all before them cut) leave room for 8 new
        assert backend.generate([long], max_new_tokens=8) == backend.generate([long[-56:]], max_new_tokens=8)
        with pytest.raises(BackendError, match="reads at most 64 tokens"):
            backend.loglikelihood([(long, " x")])
    finally:
        backend.close()


@pytest.mark.slow  # two engine worker processes start (~20 s)
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism over 2 CPU workers needs 2 cores")
def test_a_weight_swap_reaches_every_tensor_parallel_worker(engine, models, hf, monkeypatch):
    """With ``tensor_parallel_size: 2`` the engine's workers are other processes, each holding half of each
    layer: a swap must reach both (its tensors cross a process boundary) and give transformers' outputs.
    vLLM's CPU workers each need cores of their own; on one NUMA node they are named explicitly."""
    engine.close()  # one engine per process at a time
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    backend = VLLMBackend(models["a"], batch_size=8, tensor_parallel_size=2)
    try:
        assert backend.generate(PROMPTS, max_new_tokens=12) == hf["a"].generate(PROMPTS, max_new_tokens=12)
        backend.load_state(load_file(models["b"] / "model.safetensors"))
        swapped = backend.generate(PROMPTS, max_new_tokens=12)
        assert swapped == hf["b"].generate(PROMPTS, max_new_tokens=12)
        assert swapped != hf["a"].generate(PROMPTS, max_new_tokens=12)
        assert backend.loglikelihood(REQUESTS) == pytest.approx(hf["b"].loglikelihood(REQUESTS), rel=1e-4, abs=1e-4)
    finally:
        backend.close()
