"""The in-memory merger over experts whose vocabularies differ (``tokenizer_source: base``): its merges
equal ``hm3 merge`` of the same recipe, a level-1 search runs over such experts, and without a tokenizer
source they are refused with the remedy named."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hm3.checkpoint.synthetic import build_random_llama
from hm3.config import parse_merge_config
from hm3.errors import ConfigError, IncompatibleModelsError
from hm3.merge.engine import merge_to_disk
from hm3.merge.inmemory import InMemoryMerger

SPECIALS = ["<pad>", "<s>", "</s>"]
BASE_CHARS = list("abcdefghijklmnopqrstuvwxyzABC")  # 29: the base's 32 tokens
# m1 adds a pad-like token (as WizardMath adds [PAD]); m2 orders the base's tokens otherwise, lacks its last
# one ("C": its rows come from the base's) and adds five of its own (as CodeLlama adds infilling tokens)
TOKENS = {
    "base": SPECIALS + BASE_CHARS,
    "m1": SPECIALS + BASE_CHARS + ["<extra>"],
    "m2": SPECIALS + BASE_CHARS[-2::-1] + list("12345"),
}


def _save_tokenizer(directory: Path, tokens: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))


def _family(root: Path, *, tied: bool) -> dict[str, Path]:
    """Base 32 rows, m1 33, m2 36 (each row a token of its own tokenizer)."""
    out = {}
    for seed, (name, tokens) in enumerate(TOKENS.items()):
        out[name] = build_random_llama(root / name, hidden_size=16, num_layers=2, num_heads=2,
                                       vocab_size=len(tokens), tie_word_embeddings=tied, seed=seed)
        _save_tokenizer(out[name], tokens)
    assert [len(t) for t in TOKENS.values()] == [32, 33, 36]
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def family(request, tmp_path_factory) -> dict[str, Path]:
    return _family(tmp_path_factory.mktemp("vocab"), tied=request.param)


def _merger(family, **kw) -> InMemoryMerger:
    return InMemoryMerger(family["base"], [family["m1"], family["m2"]], base_ref="base", model_refs=["m1", "m2"],
                          **kw)


def _recipe(method: str, models=("m1", "m2"), **extra) -> dict:
    params = {"m1": {"weight": 0.7, "density": 0.5}, "m2": {"weight": [0.2, 0.9], "density": 0.6}}
    return {"merge_method": method, "base_model": "base", "seed": 5, "tokenizer_source": "base",
            "models": [{"model": m, "parameters": params[m]} for m in models]} | extra


def _load(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("models", [("m1", "m2"), ("m2",)], ids=["both", "m2-only"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_in_memory_equals_hm3_merge_over_different_vocabularies(family, tmp_path, method, models):
    """Every tensor, embedding and LM head included, as hm3 merge writes it; a recipe over some of the
    experts too (under ``base`` a model's rows do not depend on which others are merged)."""
    recipe = _recipe(method, models)
    merger = _merger(family, tokenizer_source="base")
    merged = merger.merged_state(parse_merge_config(recipe))
    disk = merge_to_disk(parse_merge_config(recipe), tmp_path / "out", config_dir=family["base"].parent).out_dir
    expected = _load(disk)
    assert set(merged) == set(expected)
    for name, t in expected.items():
        assert merged[name].shape == t.shape, name
        torch.testing.assert_close(merged[name], t, atol=1e-6, rtol=0, msg=name)
    rows = merged["model.embed_tokens.weight"].shape[0]
    assert rows == 32 == merger.vocabulary_rows == merger.config["vocab_size"]
    assert json.loads((disk / "config.json").read_text())["vocab_size"] == 32


def test_experts_rows_are_moved_onto_the_base_tokens(family):
    """Independent of the engine: task arithmetic at weight 1 over m2 alone is m2's own row for each base
    token it has (found by its string in m2's tokenizer), and the base's row for the one it lacks."""
    recipe = {"merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "base",
              "models": [{"model": "m2", "parameters": {"weight": 1.0}}]}
    merged = _merger(family, tokenizer_source="base").merged_state(parse_merge_config(recipe))
    base, m2 = _load(family["base"]), _load(family["m2"])
    name = "model.embed_tokens.weight"
    for i, token in enumerate(TOKENS["base"]):
        src = m2[name][TOKENS["m2"].index(token)] if token in TOKENS["m2"] else base[name][i]
        torch.testing.assert_close(merged[name][i], src, atol=1e-6, rtol=0, msg=token)


def test_different_vocabularies_without_a_tokenizer_source_are_refused_naming_the_remedy(family):
    with pytest.raises(IncompatibleModelsError, match=r"base has 32 embedding rows .*m2 has 36 embedding rows.*"
                       r"Set tokenizer_source: base \(search_space.tokenizer_source"):
        _merger(family)


def test_the_recipe_must_say_the_mergers_tokenizer_source(family):
    merger = _merger(family, tokenizer_source="base")
    recipe = _recipe("ties")
    del recipe["tokenizer_source"]
    with pytest.raises(ConfigError, match="give the recipe tokenizer_source: base"):
        merger.merged_state(parse_merge_config(recipe))
    with pytest.raises(ConfigError, match="maps vocabularies onto the base's only"):
        _merger(family, tokenizer_source="union")


def test_a_merger_without_a_tokenizer_source_refuses_a_recipe_that_names_one(tmp_path):
    """A base with more embedding rows than tokens: ``hm3 merge`` with ``tokenizer_source: base`` writes one row
    per token, a merger over the models' own rows keeps them all, so it must not take that recipe as its own."""
    base = build_random_llama(tmp_path / "base", hidden_size=16, num_layers=2, num_heads=2, vocab_size=40, seed=0)
    _save_tokenizer(base, TOKENS["base"])  # 32 tokens over 40 rows
    m1 = build_random_llama(tmp_path / "m1", hidden_size=16, num_layers=2, num_heads=2, vocab_size=40, seed=1)
    recipe = parse_merge_config(_recipe("ties", models=("m1",)))
    merge_to_disk(recipe, tmp_path / "disk", config_dir=tmp_path)
    assert _load(tmp_path / "disk")["model.embed_tokens.weight"].shape[0] == 32
    merger = InMemoryMerger(base, [m1], base_ref="base", model_refs=["m1"])
    with pytest.raises(ConfigError, match="tokenizer_source 'base'.*merges over the models' own rows"):
        merger.merged_state(recipe)


# --- a level-1 search over such experts ---------------------------------------------------------------


def test_level1_search_over_different_vocabularies_exports_the_scored_merge(tiny_family, tmp_path):
    """Two candidates over experts of 129 and 132 rows on a base of 128 tokens and 130 rows: the live
    model is resized to the 128 rows ``base`` keeps, and a front point's exported checkpoint is the merge
    that was scored (its tensors and its scores) with the base's tokenizer."""
    from hm3.cli import main
    from hm3.eval.evaluate import evaluate_objective
    from hm3.eval.hf import HFBackend
    from hm3.search.level1 import run_level1
    from hm3.search.run_config import parse_run_config
    from objectives.registry import get_objective
    from tests.eval.tiny_lm import build_tiny_lm, save_char_tokenizer

    _, _, objectives = tiny_family
    models = {}
    for seed, (name, rows, tokens) in enumerate([("base", 130, 128), ("m1", 129, 129), ("m2", 132, 132)]):
        models[name] = build_tiny_lm(tmp_path / name, seed=seed, vocab_size=rows)
        save_char_tokenizer(models[name], vocab_size=tokens)
    data = {
        "models": {k: str(v) for k, v in models.items()},
        "objectives": objectives,
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False, "tokenizer_source": "base"},
        "optimizer": {"name": "random", "budget": 2},
        "evaluation": {"validation_examples": 6, "test_examples": 6, "batch_size": 16},
        "seed": 1,
    }
    run = tmp_path / "run"
    run_level1(parse_run_config(data), run, progress=False)
    front = pd.read_csv(run / "front.csv")
    names = json.loads((run / "summary.json").read_text())["objectives"]
    row = front.iloc[0]
    recipe = (run / row["file"]).read_text()
    assert "tokenizer_source: base" in recipe
    dest = tmp_path / "exported"
    assert main(["export", str(run), "--point", str(row["point"]), str(dest)]) == 0
    parsed = parse_merge_config(yaml.safe_load(recipe))  # the stored recipe names the models by their paths
    merger = InMemoryMerger(models["base"], [models["m1"], models["m2"]], base_ref=parsed.base_model,
                            model_refs=[m.model for m in parsed.models], tokenizer_source="base")
    scored = merger.merged_state(parsed)
    exported = _load(dest)
    assert exported["model.embed_tokens.weight"].shape[0] == 128
    for name, t in exported.items():
        torch.testing.assert_close(t.float(), scored[name], atol=1e-6, rtol=0, msg=name)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(dest))) == 128  # the base's tokenizer, not an expert's
    backend = HFBackend.from_pretrained(dest, batch_size=16)
    for spec, name in zip(objectives, names, strict=True):
        score = evaluate_objective(backend, get_objective(spec), "validation", list(range(6))).score
        assert score == pytest.approx(row[f"{name}_val"], abs=1e-9)
