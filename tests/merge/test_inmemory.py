"""The in-memory merge path equals the disk path and writes into a live model in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.config import parse_merge_config
from hm3.errors import ConfigError
from hm3.merge.engine import merge_to_disk
from hm3.merge.inmemory import InMemoryMerger


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inmem")
    base = build_random_llama(root / "base", hidden_size=32, num_layers=3, vocab_size=64, seed=0)
    return {"base": base, **{f"m{i}": build_finetuned_variant(base, root / f"m{i}", seed=i, scale=0.05) for i in (1, 2, 3)}}


def _recipe(models, method, seed=5):
    return parse_merge_config(
        {
            "merge_method": method,
            "base_model": "base",
            "models": [
                {"model": "m1", "parameters": {"weight": 0.7, "density": 0.5}},
                {"model": "m2", "parameters": {"weight": [0.2, 0.9], "density": 0.6}},
                {"model": "m3", "parameters": {"weight": 0.4, "density": 0.8}},
            ],
            "seed": seed,
        }
    )


@pytest.fixture(scope="module")
def merger(models) -> InMemoryMerger:
    return InMemoryMerger(
        models["base"],
        [models["m1"], models["m2"], models["m3"]],
        base_ref="base",
        model_refs=["m1", "m2", "m3"],
    )


def _load(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic"])
def test_in_memory_equals_disk(models, merger, tmp_path, method):
    recipe = _recipe(models, method)
    disk = tmp_path / "disk"
    merge_to_disk(recipe, disk, config_dir=models["base"].parent)
    on_disk = _load(disk)
    in_mem = merger.merged_state(recipe)
    assert set(in_mem) == set(on_disk)
    for k in on_disk:
        torch.testing.assert_close(in_mem[k], on_disk[k], rtol=0, atol=1e-6)


def test_merge_into_live_model_in_place(models, merger, tmp_path):
    recipe = _recipe(models, "dare_ties")
    model = AutoModelForCausalLM.from_pretrained(models["base"])
    params = dict(model.named_parameters())
    ptrs = {k: v.data_ptr() for k, v in params.items()}
    merger.merge_into({k: v.data for k, v in params.items()}, recipe)
    assert {k: v.data_ptr() for k, v in model.named_parameters()} == ptrs
    disk = tmp_path / "disk"
    merge_to_disk(recipe, disk, config_dir=models["base"].parent)
    fresh = AutoModelForCausalLM.from_pretrained(disk)
    x = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, fresh(x).logits, rtol=0, atol=1e-5)


def test_repeated_merges_do_not_mutate_the_held_task_vectors(models, merger):
    first = merger.merged_state(_recipe(models, "ties"))
    merger.merged_state(_recipe(models, "dare_ties", seed=9))
    again = merger.merged_state(_recipe(models, "ties"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_recipe_naming_unknown_model_is_refused(models, merger):
    recipe = parse_merge_config(
        {"merge_method": "ties", "base_model": "base", "models": [{"model": "m9", "parameters": {"weight": 1.0}}]}
    )
    with pytest.raises(ConfigError, match="m9"):
        merger.merged_state(recipe)


@pytest.mark.parametrize("tokenizer", [{"tokenizer_source": "union"}, {"tokenizer": {"source": "base"}}])
def test_a_recipe_over_another_vocabulary_is_refused(models, merger, tokenizer):
    """A live model's rows cannot change; such a recipe is for hm3 merge (tests/merge/test_tokenizers.py)."""
    recipe = parse_merge_config(
        {"merge_method": "ties", "base_model": "base", "models": [{"model": "m1", "parameters": {"weight": 1.0}}]}
        | tokenizer
    )
    with pytest.raises(ConfigError, match="^the in-memory path merges over the models' own vocabulary"):
        merger.merged_state(recipe)
