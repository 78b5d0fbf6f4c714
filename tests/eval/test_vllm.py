"""The vLLM backend, for real, against the transformers backend on tiny random models in float32.

Skipped only where vLLM is not installed. Run it in the vLLM environment:
``.venv-vllm/bin/python -m pytest tests/eval/test_vllm.py``. One engine is shared by the module
(each start costs seconds); the last test closes it and starts a fresh one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import build_tiny_lm

pytest.importorskip("vllm")

from hm3.errors import CheckpointError  # noqa: E402
from hm3.eval.backend import open_backend  # noqa: E402
from hm3.eval.evaluate import evaluate_objective  # noqa: E402
from hm3.eval.hf import HFBackend  # noqa: E402
from hm3.eval.vllm import VLLMBackend  # noqa: E402
from objectives.choice import ChoiceObjective  # noqa: E402
from objectives.translation import TranslationObjective  # noqa: E402

PROMPTS = ["hello", "a much longer prompt than the others", "x", "12+34=", "the cat sat on", "hello there"]
# Longer than one KV block (128 tokens on CPU): only full blocks enter vLLM's prefix cache, so only
# prompts like these can show stale keys/values after a weight reload.
LONG_PROMPTS = [
    ("the quick brown fox jumps over the lazy dog. " * 4) + tail for tail in ("one", "two", "three")
]
REQUESTS = [("hello", " world"), ("", "abc"), ("Question: 2+2\nAnswer:", " 4"), ("q", "a long continuation")]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
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


def test_bad_state_is_refused_before_reload(engine, models, hf):
    good = load_file(models["b"] / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors model\.norm\.weight"):
        engine.load_state({k: v for k, v in good.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        engine.load_state({**good, "model.norm.weight": torch.zeros(3)})
    assert engine.generate(PROMPTS, max_new_tokens=8) == hf["a"].generate(PROMPTS, max_new_tokens=8)


def test_reload_then_fresh_engine(engine, models, hf):
    """In-place reload (after the prefix cache holds the old weights' keys/values) equals a fresh
    engine on the new weights, and both equal transformers. Closes the module's engine: keep last."""
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
