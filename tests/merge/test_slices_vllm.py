"""A depth up-scaled ``slices:`` merge (more layers than its sources) served by vLLM, against transformers.

``hm3 merge`` writes a 7-layer model from 4-layer sources (layers [0, 4) then [1, 4)); vLLM must build
the new depth from ``config.json`` and give transformers' greedy tokens and log-likelihoods. Tiny random
Llamas in float32 with head size 64 (vLLM's CPU attention refuses small heads). Skipped where vLLM is not
installed; one engine at a time in the process (each start costs seconds).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from hm3.checkpoint.synthetic import build_random_causal_lm, build_random_llama
from hm3.cli import main
from hm3.errors import CheckpointError
from hm3.eval.hf import HFBackend
from hm3.eval.vllm import VLLMBackend
from tests.eval.tiny_lm import HEADS, HIDDEN, VOCAB_SIZE, save_char_tokenizer

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

DEPTH, RANGES = 4, ((0, 4), (1, 4))  # the sources' depth; the slices' layer ranges
NEW_DEPTH = sum(end - start for start, end in RANGES)  # 7
PROMPTS = ["hello", "a much longer prompt than the others", "x", "12+34=", "the cat sat on"]
REQUESTS = [("hello", " world"), ("", "abc"), ("Question: 2+2\nAnswer:", " 4"), ("q", "a long continuation")]


# Qwen2.5-like (tied head, grouped KV heads, q/k/v biases); per-layer ``layer_types`` and a
# ``max_window_layers`` sized for the source's depth are in its config
QWEN2 = {"model_type": "qwen2", "hidden_size": HIDDEN, "num_hidden_layers": DEPTH, "num_attention_heads": HEADS,
         "num_key_value_heads": 1, "intermediate_size": 2 * HIDDEN, "vocab_size": VOCAB_SIZE,
         "tie_word_embeddings": True, "use_sliding_window": False, "max_window_layers": DEPTH}


def _source(directory: Path, seed: int, tied: bool = False, qwen2: bool = False) -> Path:
    if qwen2:
        path = build_random_causal_lm(directory, QWEN2, seed=seed)
    else:
        path = build_random_llama(directory, hidden_size=HIDDEN, num_layers=DEPTH, num_heads=HEADS,
                                  vocab_size=VOCAB_SIZE, tie_word_embeddings=tied, seed=seed)
    # transformers loads a qwen2 directory's tokenizer as Qwen2Tokenizer, which appends <|endoftext|>:
    # one character fewer keeps the tokenizer within the embedding
    save_char_tokenizer(path, vocab_size=VOCAB_SIZE - 1 if qwen2 else VOCAB_SIZE)
    return path


def _upscale(root: Path, name: str, first: Path, second: Path) -> Path:
    """``hm3 merge`` of a passthrough recipe: ``first``'s layers [0, 4), then ``second``'s [1, 4)."""
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(m), "layer_range": list(r)}]} for m, r in zip((first, second), RANGES, strict=True)
    ]}
    (root / f"{name}.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["merge", str(root / f"{name}.yml"), str(root / name)]) == 0
    return root / name


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Sources (Llamas ``a``, ``b``, tied ``ta``, ``tb``; Qwen2s ``qa``, ``qb``) and four up-scaled merges:
    ``one`` takes both ranges from ``a``; ``two`` the second from ``b``; ``tied`` and ``qwen2`` are ``two``
    of the tied Llamas and of the Qwen2s."""
    root = tmp_path_factory.mktemp("dus_vllm")
    src = {"a": _source(root / "a", 0), "b": _source(root / "b", 1),
           "ta": _source(root / "ta", 0, tied=True), "tb": _source(root / "tb", 1, tied=True),
           "qa": _source(root / "qa", 0, qwen2=True), "qb": _source(root / "qb", 1, qwen2=True)}
    return src | {"one": _upscale(root, "one", src["a"], src["a"]),
                  "two": _upscale(root, "two", src["a"], src["b"]),
                  "tied": _upscale(root, "tied", src["ta"], src["tb"]),
                  "qwen2": _upscale(root, "qwen2", src["qa"], src["qb"])}


@pytest.fixture(scope="module")
def hf(models) -> dict[str, HFBackend]:
    return {k: HFBackend.from_pretrained(models[k], batch_size=4) for k in ("a", "one", "two", "tied", "qwen2")}


@pytest.fixture(scope="module")
def engine(models):
    backend = VLLMBackend(models["one"], batch_size=8)
    yield backend
    backend.close()


def _engine_depth(backend: VLLMBackend) -> tuple[int, int]:
    """(layers in vLLM's model config, decoder layers vLLM built)."""
    config = backend.llm.llm_engine.model_config.hf_config.num_hidden_layers
    built = backend.llm.apply_model(lambda model: len(model.model.layers))
    return config, built[0]


def _check_against_hf(backend: VLLMBackend, reference: HFBackend) -> None:
    assert backend.generate(PROMPTS, max_new_tokens=24) == reference.generate(PROMPTS, max_new_tokens=24)
    assert backend.loglikelihood(REQUESTS) == pytest.approx(reference.loglikelihood(REQUESTS), rel=1e-4, abs=1e-4)


def test_the_upscaled_merge_has_the_slices_depth_in_its_config_and_in_vllm(models, engine, hf):
    for name in ("one", "two", "tied", "qwen2"):
        assert json.loads((models[name] / "config.json").read_text())["num_hidden_layers"] == NEW_DEPTH
    assert json.loads((models["qwen2"] / "config.json").read_text())["layer_types"] == ["full_attention"] * NEW_DEPTH
    assert _engine_depth(engine) == (NEW_DEPTH, NEW_DEPTH)
    assert hf["one"].model.config.num_hidden_layers == NEW_DEPTH


def test_vllm_generates_and_scores_the_upscaled_merge_as_transformers(engine, hf):
    _check_against_hf(engine, hf["one"])
    # the extra layers matter: the 4-layer source scores differently (a 4-layer engine would match it)
    assert engine.loglikelihood(REQUESTS) != pytest.approx(hf["a"].loglikelihood(REQUESTS), rel=1e-3, abs=1e-3)


def test_an_upscaled_state_of_the_same_depth_swaps_into_the_live_engine(engine, models, hf):
    """Swapping changes weights, never the depth: another 7-layer merge loads in place, a 4-layer
    source is refused by name before the engine is touched."""
    assert hf["two"].loglikelihood(REQUESTS) != pytest.approx(hf["one"].loglikelihood(REQUESTS), rel=1e-3, abs=1e-3)
    with pytest.raises(CheckpointError, match=rf"missing tensors model\.layers\.{DEPTH}\."):
        engine.load_state(load_file(models["a"] / "model.safetensors"))
    engine.load_state(load_file(models["two"] / "model.safetensors"))
    _check_against_hf(engine, hf["two"])
    engine.load_state(load_file(models["one"] / "model.safetensors"))
    _check_against_hf(engine, hf["one"])


@pytest.mark.parametrize("name", ["tied", "qwen2"])
def test_a_tied_two_model_upscaled_merge_runs_in_a_fresh_engine(engine, models, hf, name):
    """Tied sources (a Llama pair; a Qwen2 pair, whose config also carries per-layer entries): the merge
    keeps no lm_head (the head is the first slice's embedding). Closes the module's engine: keep after
    its users."""
    engine.close()
    assert "lm_head.weight" not in load_file(models[name] / "model.safetensors")
    backend = VLLMBackend(models[name], batch_size=8)
    try:
        assert _engine_depth(backend) == (NEW_DEPTH, NEW_DEPTH)
        _check_against_hf(backend, hf[name])
    finally:
        backend.close()
