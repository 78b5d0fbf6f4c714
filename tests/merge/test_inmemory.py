"""The in-memory merge path equals the disk path and writes into a live model in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.config import parse_merge_config
from hm3.errors import ConfigError
from hm3.merge.engine import merge_to_disk
from hm3.merge.inmemory import InMemoryMerger, in_memory_methods
from hm3.merge.methods import MERGE_METHODS


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


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
def test_a_recipe_in_another_dtype_is_refused(models, merger, key):
    """The merger computes and hands over float32 tensors; ``hm3 merge`` of a recipe that says bfloat16 would
    compute or write others, so the merger must not score it as its own."""
    recipe = parse_merge_config(_recipe(models, "ties").model_dump(exclude_none=True) | {key: "bfloat16"})
    with pytest.raises(ConfigError, match=rf"recipe's {key} 'bfloat16'.*merges in float32"):
        merger.merged_state(recipe)
    assert merger.merged_state(parse_merge_config(recipe.model_dump(exclude_none=True) | {key: "float32"}))


def _any_recipe(method: str):
    """A valid recipe of ``method`` over the merger's models, whatever parameters the method takes."""
    spec = MERGE_METHODS[method]
    names = {p.name for p in spec.model_params}
    models = ["m1"] if spec.max_models == 1 else ["m1", "m2"]
    entries = [{"model": m, "parameters": {k: v for k, v in (("weight", 0.6 + 0.2 * i), ("density", 0.5),
                                                              ("epsilon", 0.1)) if k in names}}
               for i, m in enumerate(models)]
    recipe = {"merge_method": method, "models": entries, "seed": 3}
    if spec.needs_base or spec.optional_base:
        recipe["base_model"] = "base"
    if method == "slerp":
        recipe["parameters"] = {"t": 0.3}
    return parse_merge_config(recipe)


@pytest.mark.parametrize("method", sorted(set(MERGE_METHODS) - {"df_merge", "fisher"}))  # Fisher files: own tests
def test_the_merger_runs_exactly_the_methods_it_declares_and_refuses_the_rest_up_front(models, merger, tmp_path,
                                                                                        method):
    """Every registered method through both paths: where the merger says it runs a method, its merge is
    ``hm3 merge``'s; elsewhere (slerp and model_stock read the models' own weights, which it does not hold)
    it refuses the recipe before merging any tensor, naming the method and the ones it runs."""
    recipe = _any_recipe(method)
    if not MERGE_METHODS[method].in_memory:
        with pytest.raises(ConfigError, match=rf"^merge method '{method}' .*in-memory merger .* it runs "
                                              rf"breadcrumbs, .*, ties \(merge a {method} recipe with hm3 merge\)$"):
            next(merger.iter_merged(recipe))
        return
    merge_to_disk(recipe, tmp_path / "disk", config_dir=models["base"].parent)
    on_disk = _load(tmp_path / "disk")
    in_mem = merger.merged_state(recipe)
    assert set(in_mem) == set(on_disk)
    for k in on_disk:
        torch.testing.assert_close(in_mem[k], on_disk[k], rtol=0, atol=1e-6)


def test_the_methods_the_merger_runs_are_the_task_vector_ones():
    assert in_memory_methods() == ["breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
                                   "della_linear", "df_merge", "sce", "task_arithmetic", "ties"]
    # every method a search space can list is one the merger runs
    assert all(m.in_memory for m in MERGE_METHODS.values() if m.searched is not None)


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory) -> dict[str, Path]:
    """A base and two experts stored in bfloat16, as most hub checkpoints are."""
    root = tmp_path_factory.mktemp("bf16")
    base = build_random_llama(root / "base", hidden_size=32, num_layers=2, vocab_size=64, seed=0,
                              dtype=torch.bfloat16)
    return {"base": base, **{f"m{i}": build_finetuned_variant(base, root / f"m{i}", seed=i, scale=0.05) for i in (1, 2)}}


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_a_front_point_of_bfloat16_models_merges_to_the_tensors_that_were_scored(bf16_models, tmp_path, method):
    """The merger computes in float32 whatever the models' dtype; the point file a run writes for a stored
    recipe (which names no dtype) must make ``hm3 merge`` compute the same float32 tensors, not redo the
    arithmetic in bfloat16."""
    from hm3.run.front import recipe_with_paths

    stored = {"merge_method": method, "base_model": "base",
              "models": [{"model": "m1", "parameters": {"weight": 0.7, "density": 0.5}},
                         {"model": "m2", "parameters": {"weight": 0.4, "density": 0.6}}], "seed": 3}
    merger = InMemoryMerger(bf16_models["base"], [bf16_models["m1"], bf16_models["m2"]], base_ref="base",
                            model_refs=["m1", "m2"])
    scored = merger.merged_state(parse_merge_config(stored))
    merge_to_disk(parse_merge_config(recipe_with_paths(stored, bf16_models)), tmp_path / "point")
    on_disk = _load(tmp_path / "point")
    assert set(on_disk) == set(scored)
    for name, tensor in scored.items():
        assert torch.equal(on_disk[name], tensor), name
    # and the config says so under every key a transformers version reads (5 writes "dtype", 4 "torch_dtype"),
    # or dtype="auto" would load the float32 weights as bfloat16
    config = json.loads((tmp_path / "point" / "config.json").read_text())
    assert {config[k] for k in ("dtype", "torch_dtype") if k in config} == {"float32"}


def test_a_tied_model_that_also_stores_its_head_merges_as_one_that_does_not(tmp_path):
    """transformers ties such a model's head to its embedding (one tensor in the live model) while its files hold
    two. The reader sees one tensor, so a DARE-TIES merge in memory and on disk gives exactly the tensors of the
    same expert saved without the copy (the head is not merged apart under its own mask), and no head."""
    from safetensors.torch import save_file

    from hm3.checkpoint import open_checkpoint

    family = {}
    for name in ("plain", "stored"):
        base = build_random_llama(tmp_path / name / "base", tie_word_embeddings=True, seed=0)
        family[name] = (base, build_finetuned_variant(base, tmp_path / name / "expert", seed=1))
    for path in family["stored"]:  # base and expert both saved with the copy
        state = load_file(path / "model.safetensors")
        assert "lm_head.weight" not in state
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        with open_checkpoint(path) as ckpt:
            assert not ckpt.has("lm_head.weight") and "lm_head.weight" not in ckpt.tensor_names()
            assert torch.equal(ckpt.get("lm_head.weight"), state["model.embed_tokens.weight"])  # the tie, as before

    def recipe(name: str) -> dict:
        base, expert = family[name]
        return {"merge_method": "dare_ties", "base_model": str(base), "seed": 3,
                "models": [{"model": str(expert), "parameters": {"weight": 0.8, "density": 0.5}}]}

    merged = {name: InMemoryMerger(family[name][0], [family[name][1]], base_ref=str(family[name][0]),
                                   model_refs=[str(family[name][1])]).merged_state(parse_merge_config(recipe(name)))
              for name in family}
    assert merged["plain"].keys() == merged["stored"].keys() and "lm_head.weight" not in merged["stored"]
    assert all(torch.equal(merged["plain"][k], merged["stored"][k]) for k in merged["plain"])
    for name in family:
        merge_to_disk(parse_merge_config(recipe(name)), tmp_path / f"out-{name}")
    ours, reference = load_file(tmp_path / "out-stored" / "model.safetensors"), load_file(tmp_path / "out-plain" /
                                                                                       "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_a_tied_config_whose_stored_head_differs_keeps_the_head(tmp_path):
    """A stored head that differs from the embedding is a tensor of its own: the reader shows it."""
    from safetensors.torch import save_file

    from hm3.checkpoint import open_checkpoint

    base = build_random_llama(tmp_path / "base", tie_word_embeddings=True, seed=0)
    state = load_file(base / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"] * 2
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(base) as ckpt:
        assert ckpt.has("lm_head.weight") and torch.equal(ckpt.get("lm_head.weight"), state["lm_head.weight"])
