"""``slices:`` recipes: layer ranges stacked into a new model, merged per slice by the streaming engine.

Against mergekit (the oracle) on depth up-scaling, frankenmerges and multi-source slices; an exported
layer path merged back to the exported tensors; which source layers and settings make each output
layer; and every bad input refused by name before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from hm3.checkpoint import open_checkpoint
from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.cli import main
from hm3.config import parse_merge_config
from hm3.errors import ConfigError
from hm3.merge.plan import SourceTensor, plan_merge
from hm3.merge.slices import slice_groups


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer base, two fine-tunes of it, and a 3-layer model of the same width."""
    root = tmp_path_factory.mktemp("slices")
    base = build_random_llama(root / "base", hidden_size=32, num_layers=4, vocab_size=64, seed=0)
    out = {"root": root, "base": base}
    for i in (1, 2):
        out[f"m{i}"] = build_finetuned_variant(base, root / f"m{i}", seed=i, scale=0.1)
    out["short"] = build_random_llama(root / "short", hidden_size=32, num_layers=3, vocab_size=64, seed=9)
    return out


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(model_dir) as ckpt:
        return {n: ckpt.get(n) for n in ckpt.tensor_names()}


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _src(family, model: str, start: int, end: int, **parameters) -> dict:
    out: dict = {"model": str(family[model]), "layer_range": [start, end]}
    return out | ({"parameters": parameters} if parameters else {})


def _merge(tmp_path: Path, recipe: dict, name: str = "hm3") -> Path:
    assert main(["merge", str(_write(tmp_path / f"{name}.yml", recipe)), str(tmp_path / name)]) == 0
    return tmp_path / name


# --- against mergekit ----------------------------------------------------------------------------------------


def _oracle_recipes(f) -> dict[str, dict]:
    return {
        # depth up-scaling: layers 1 and 2 taken twice
        "upscale": {"merge_method": "passthrough", "dtype": "float32",
                    "slices": [{"sources": [_src(f, "base", 0, 3)]}, {"sources": [_src(f, "base", 1, 4)]}]},
        # embeddings from the first slice's model, final norm and head from the last one's; scales by tensor
        # (a filter, and a gradient over the slice) and on a whole layer
        "frankenmerge": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [_src(f, "m1", 0, 2)]},
            {"sources": [_src(f, "short", 1, 3, scale=[{"filter": "o_proj", "value": [0.5, 1.5]}, {"value": 1.0}])]},
            {"sources": [_src(f, "m2", 3, 4)], "parameters": {"scale": 0.8}},
        ]},
        # TIES per slice: base among each slice's sources, per-source, per-slice and global parameters,
        # sources at different offsets, and a gradient that runs over each slice on its own. A source's
        # filters match the tensor read from it: m2's "layers.2." is output layer 1 (its layer 2)
        "ties": {"merge_method": "ties", "base_model": str(f["base"]), "dtype": "float32",
                 "parameters": {"normalize": False, "density": 0.6},
                 "slices": [
                     {"sources": [_src(f, "base", 0, 2), _src(f, "m1", 0, 2, weight=[0.2, 0.9]),
                                  _src(f, "m2", 1, 3, weight=[{"filter": "layers.2.", "value": 0.9}, {"value": 0.5}],
                                       density=0.3)]},
                     {"sources": [_src(f, "base", 2, 4), _src(f, "m1", 2, 4, weight=0.7),
                                  _src(f, "m2", 2, 4, weight=[{"filter": "mlp", "value": 0.9}, {"value": 0.1}])],
                      "parameters": {"lambda": 0.5, "density": 0.9}},
                 ]},
        # a slice's own base_model wins over the recipe's
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "float32",
                            "slices": [
                                {"sources": [_src(f, "base", 0, 2), _src(f, "m1", 0, 2, weight=0.6)]},
                                {"sources": [_src(f, "m1", 2, 4), _src(f, "m2", 2, 4, weight=1.0)],
                                 "base_model": str(f["m1"])},
                            ]},
        # the last slice has more sources than the first: mergekit merges the tensors after the layers
        # from as many of the last slice's sources as the first slice has (here m1's alone)
        "linear_uneven": {"merge_method": "linear", "dtype": "float32", "slices": [
            {"sources": [_src(f, "m1", 0, 2, weight=1.0)]},
            {"sources": [_src(f, "m1", 2, 4, weight=0.3), _src(f, "m2", 2, 4, weight=0.7)]},
        ]},
    }


@pytest.mark.mergekit
@pytest.mark.parametrize("case", ["upscale", "frankenmerge", "ties", "task_arithmetic", "linear_uneven"])
def test_slices_equal_mergekit(family, tmp_path, mergekit_merge, case):
    recipe = _oracle_recipes(family)[case]
    ours = _merge(tmp_path, recipe)
    mergekit_merge(_write(tmp_path / "mk.yml", recipe), tmp_path / "mk")
    mine, theirs = _tensors(ours), _tensors(tmp_path / "mk")
    assert set(mine) == set(theirs)
    worst = max((mine[n] - theirs[n]).abs().max().item() for n in mine)
    assert worst <= 1e-6, f"max |hm3 - mergekit| = {worst}"
    depth = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in recipe["slices"])
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == depth
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"] == depth


@pytest.mark.mergekit
def test_an_exported_slice_rescale_gives_way_to_the_recipes_rescale_mode(family, tmp_path, mergekit_merge):
    """hm3 takes ``rescale_mode`` (here the recipe's, by module) before a slice's ``rescale``, which applies only
    where its filters miss; mergekit reads the slice's ``rescale`` first, so the export must carry the recipe's
    choice into it."""
    ties = _oracle_recipes(family)["ties"]
    recipe = ties | {"parameters": ties["parameters"] | {"rescale_mode": [{"filter": "mlp", "value": "none"}]},
                     "slices": [ties["slices"][0] | {"parameters": {"rescale": True}}, ties["slices"][1]]}
    ours = _merge(tmp_path, recipe)
    assert main(["export-mergekit", str(_write(tmp_path / "hm3.yml", recipe)), str(tmp_path / "mk.yml")]) == 0
    mergekit_merge(tmp_path / "mk.yml", tmp_path / "mk")
    mine, theirs = _tensors(ours), _tensors(tmp_path / "mk")
    worst = {n: (mine[n] - theirs[n]).abs().max().item() for n in mine}
    assert max(worst.values()) <= 1e-6, {n: w for n, w in worst.items() if w > 1e-6}


def test_a_depth_upscaled_model_loads_with_its_new_depth_and_finite_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _merge(tmp_path, _oracle_recipes(family)["upscale"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    assert logits.shape == (1, 10, 64) and torch.isfinite(logits).all()
    mine, base = _tensors(out), _tensors(family["base"])
    for out_layer, src_layer in enumerate([0, 1, 2, 1, 2, 3]):  # [0, 3) then [1, 4)
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(mine[name.format(out_layer)], base[name.format(src_layer)])
    assert torch.equal(mine["lm_head.weight"], base["lm_head.weight"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "mixed"])
def test_an_exported_layer_path_merges_back_to_the_exported_tensors(family, tmp_path, dtype):
    """Scales are folded in float32 on export and computed in the models' dtype by the merge: bfloat16 too,
    and each tensor in its own model's dtype where they differ (bfloat16 experts in a float32 frame: a
    search's merge, written in the float32 it was scored in)."""
    from hm3.arch.path import MERGEKIT_CONFIG_FILE, LayerPath, export_path

    pool = [family["m1"], family["m2"], family["base"]]  # the last is the frame: embeddings, norm and head
    if dtype != "float32":
        base = build_random_llama(tmp_path / "base", hidden_size=32, num_layers=4, vocab_size=64, seed=3,
                                  dtype=torch.bfloat16)
        pool = [build_finetuned_variant(base, tmp_path / f"m{i}", seed=i, scale=0.1) for i in (1, 2)] + [base]
    if dtype == "mixed":
        pool[-1] = build_random_llama(tmp_path / "frame", hidden_size=32, num_layers=4, vocab_size=64, seed=3)
    path = LayerPath(((0, 3), (2, 0), (1, 1), (0, 3), (1, 2)), scales=(1.0, 0.5, 1.0, 2.5, 0.75))
    exported = export_path(pool, path, tmp_path / "exported")
    assert main(["merge", str(exported / MERGEKIT_CONFIG_FILE), str(tmp_path / "back")]) == 0
    mine, theirs = _tensors(tmp_path / "back"), _tensors(exported)
    assert set(mine) == set(theirs)
    assert [n for n in mine if not torch.equal(mine[n], theirs[n])] == []
    assert all(mine[n].dtype == theirs[n].dtype for n in mine)
    assert {t.dtype for t in mine.values()} == ({torch.float32, torch.bfloat16} if dtype == "mixed"
                                                else {getattr(torch, dtype)})
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_hidden_layers"] == 5


# --- the plan: which source layers and which settings make each output tensor -----------------------------------


def test_groups_give_each_output_layer_its_source_layers_and_depth():
    cfg = parse_merge_config({"merge_method": "linear", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [2, 5]}]},
        {"sources": [{"model": "b", "layer_range": [4, 5]}]},
        {"sources": [{"model": "a", "layer_range": [0, 0]}, {"model": "b", "layer_range": [1, 1]}]},
    ]})
    groups = slice_groups(cfg.slices, {"a": 4, "b": 6})
    assert [(g.part, g.slice, g.layer, g.source_layers, g.t) for g in groups] == [
        ("before", 0, None, (), 0.0),
        ("layer", 0, 0, (0, 2), 0.0), ("layer", 0, 1, (1, 3), 0.5), ("layer", 0, 2, (2, 4), 1.0),
        ("layer", 1, 3, (4,), 1.0),  # a one-layer slice sits at t = 1, as in mergekit
        ("after", 2, None, (), 0.0),
    ]
    assert [s.model for s in groups[0].sources] == ["a", "b"] and [s.model for s in groups[-1].sources] == ["a", "b"]
    assert groups[1].where == "slices[0] (output layer 0)" and groups[-1].where == "slices[2] (tensors after the layers)"


def test_jobs_read_their_source_layers_from_their_slices_models(family):
    cfg = parse_merge_config({"merge_method": "passthrough", "slices": [
        {"sources": [_src(family, "m1", 2, 4)]}, {"sources": [_src(family, "short", 0, 1, scale=0.5)]},
    ]})
    plan = plan_merge(cfg)
    try:
        paths = [c.path for c in plan.checkpoints]
        jobs = {j.name: j for j in plan.jobs}
        where = {n: (paths[j.inputs[0].checkpoint].name, j.inputs[0].name) for n, j in jobs.items()}
        assert where["model.embed_tokens.weight"] == ("m1", "model.embed_tokens.weight")
        assert where["model.layers.0.self_attn.q_proj.weight"] == ("m1", "model.layers.2.self_attn.q_proj.weight")
        assert where["model.layers.1.mlp.up_proj.weight"] == ("m1", "model.layers.3.mlp.up_proj.weight")
        assert where["model.layers.2.mlp.up_proj.weight"] == ("short", "model.layers.0.mlp.up_proj.weight")
        assert where["model.norm.weight"] == where["lm_head.weight"][:1] + ("model.norm.weight",)
        assert where["lm_head.weight"] == ("short", "lm_head.weight")
        assert all(j.base is None and j.layer == 2 for n, j in jobs.items() if ".layers.2." in n)
        assert jobs["model.layers.2.mlp.up_proj.weight"].model_params == ({"scale": 0.5},)
        assert jobs["model.layers.0.mlp.up_proj.weight"].model_params == ({"scale": None},)
        assert jobs["model.norm.weight"].model_params == ({"scale": 0.5},)  # the last slice's settings
        assert plan.reference.path == family["m1"] and plan.output_config["num_hidden_layers"] == 3
        assert jobs["model.layers.0.mlp.up_proj.weight"].lead == SourceTensor(0, "model.layers.2.mlp.up_proj.weight")
    finally:
        plan.close()


def test_a_recipe_base_model_gives_the_output_config_and_is_the_base_of_each_slice(family):
    cfg = parse_merge_config({"merge_method": "task_arithmetic", "base_model": str(family["base"]), "slices": [
        {"sources": [_src(family, "m1", 0, 1, weight=1.0), _src(family, "base", 3, 4)]},
    ]})
    plan = plan_merge(cfg)
    try:
        assert plan.reference.path == family["base"] and plan.output_config["num_hidden_layers"] == 1
        job = next(j for j in plan.jobs if j.name == "model.layers.0.mlp.up_proj.weight")
        assert job.base == SourceTensor(0, "model.layers.3.mlp.up_proj.weight")
        assert job.inputs == (SourceTensor(1, "model.layers.0.mlp.up_proj.weight"),)
    finally:
        plan.close()


def test_layer_types_follow_their_layers_in_the_output_config(family, tmp_path):
    model = tmp_path / "typed"
    shutil.copytree(family["base"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"layer_types": ["a", "b", "c", "d"]}))
    out = _merge(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(model), "layer_range": [1, 4]}]},
        {"sources": [{"model": str(model), "layer_range": [0, 2]}]},
    ]})
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 5 and written["layer_types"] == ["b", "c", "d", "a", "b"]


def test_passthrough_of_a_models_recipe_copies_the_model_times_its_scale(family, tmp_path):
    out = _merge(tmp_path, {"merge_method": "passthrough", "models": [
        {"model": str(family["m1"]), "parameters": {"scale": [{"filter": "down_proj", "value": 2.0}]}}]})
    mine, m1 = _tensors(out), _tensors(family["m1"])
    assert set(mine) == set(m1)
    for n in m1:
        assert torch.equal(mine[n], m1[n] * 2.0 if "down_proj" in n else m1[n]), n


def test_export_mergekit_writes_a_slices_recipe_unchanged(family, tmp_path):
    recipe = _oracle_recipes(family)["ties"] | {"parameters": {"rescale_mode": "l1", "normalize": False}}
    path = _write(tmp_path / "r.yml", recipe)
    assert main(["export-mergekit", str(path), str(tmp_path / "mk.yml")]) == 0
    exported = yaml.safe_load((tmp_path / "mk.yml").read_text())
    assert exported["parameters"] == {"rescale": True, "normalize": False}
    assert exported["slices"] == recipe["slices"]


# --- bad input, named -------------------------------------------------------------------------------------------


def _refused(capsys, tmp_path, recipe: dict, *mentions: str) -> None:
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path / "bad.yml", recipe)), str(out)]) != 0
    err = capsys.readouterr().err
    for m in mentions:
        assert m in err, f"{m!r} not in: {err}"
    assert "Traceback" not in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_a_layer_range_beyond_a_models_depth_is_refused(family, tmp_path, capsys):
    _refused(capsys, tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [_src(family, "base", 0, 4)]}, {"sources": [_src(family, "short", 1, 4)]}]},
        f"slices[1].sources[0] ({family['short']}): layer_range [1, 4] goes beyond the model's 3 layers")


def test_sources_of_different_lengths_in_one_slice_are_refused(family, tmp_path, capsys):
    _refused(capsys, tmp_path, {"merge_method": "linear", "slices": [
        {"sources": [_src(family, "m1", 0, 3, weight=1.0), _src(family, "m2", 1, 3, weight=1.0)]}]},
        "slices[0]: its sources cover different numbers of layers", f"{family['m1']} [0, 3] has 3",
        f"{family['m2']} [1, 3] has 2")


def test_a_scale_on_a_model_type_where_it_is_not_exact_is_refused(family, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(family["base"], odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(config | {"model_type": "gemma2"}))
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(odd), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(odd), "layer_range": [2, 4], "parameters": {"scale": 0.5}}]}]}
    _refused(capsys, tmp_path, recipe, f"slices[1].sources[0] ({odd}): scale 0.5",
             "only defined for pre-norm models", "'gemma2'")
    recipe["slices"][1]["sources"][0]["parameters"]["scale"] = 1.0  # a scale of 1 changes nothing: accepted
    _merge(tmp_path, recipe, "unscaled")


def test_layers_of_another_shape_are_refused_within_a_slice_and_across_slices(family, tmp_path, capsys):
    wide = build_random_llama(tmp_path / "wide", hidden_size=32, num_layers=4, vocab_size=64, intermediate_size=48)
    models = {"m1": family["m1"], "wide": wide}
    _refused(capsys, tmp_path, {"merge_method": "linear", "slices": [
        {"sources": [_src(models, "m1", 0, 2, weight=1.0), _src(models, "wide", 0, 2, weight=1.0)]}]},
        "slices[0] (output layer 0): tensor model.layers.0.mlp.down_proj.weight has different shapes",
        f"{wide} [32, 48]")
    _refused(capsys, tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [_src(models, "m1", 0, 2)]}, {"sources": [_src(models, "wide", 2, 3)]}]},
        "slices[1] (output layer 2): its tensors differ from output layer 0's", "model.layers.0.mlp.down_proj.weight")


def test_layers_whose_shapes_differ_only_in_rows_are_refused(family, tmp_path, capsys):
    narrow = build_random_llama(tmp_path / "narrow", hidden_size=32, num_layers=4, vocab_size=64, num_kv_heads=2)
    models = {"m1": family["m1"], "narrow": narrow}
    _refused(capsys, tmp_path, {"merge_method": "linear", "slices": [
        {"sources": [_src(models, "m1", 0, 2, weight=1.0), _src(models, "narrow", 0, 2, weight=1.0)]}]},
        "slices[0] (output layer 0): tensor model.layers.0.self_attn.k_proj.weight has different shapes in the "
        f"slice's sources: {family['m1']} [32, 32], {narrow} [16, 32]")


def test_a_layer_missing_tensors_is_refused_naming_the_first_four(family, tmp_path, capsys):
    from safetensors.torch import save_file

    pruned = tmp_path / "pruned"
    shutil.copytree(family["m1"], pruned)
    kept = {n: t for n, t in _tensors(pruned).items() if not n.startswith(("model.layers.1.mlp.",
                                                                            "model.layers.1.self_attn."))}
    for f in pruned.glob("*.safetensors*"):
        f.unlink()
    save_file(kept, str(pruned / "model.safetensors"), metadata={"format": "pt"})
    models = {"m1": family["m1"], "pruned": pruned}
    _refused(capsys, tmp_path, {"merge_method": "linear", "slices": [
        {"sources": [_src(models, "m1", 0, 2, weight=1.0), _src(models, "pruned", 0, 2, weight=1.0)]}]},
        f"slices[0] (output layer 1): layer 1 of {pruned} and layer 1 of {family['m1']} hold different tensors: "
        "model.layers.0.mlp.down_proj.weight, model.layers.0.mlp.gate_proj.weight, "
        "model.layers.0.mlp.up_proj.weight, model.layers.0.self_attn.k_proj.weight\n")


def test_models_of_another_architecture_are_refused(family, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(family["m1"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    _refused(capsys, tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [_src(family, "m1", 0, 2)]}, {"sources": [{"model": str(other), "layer_range": [2, 4]}]}]},
        f"models {family['m1']} and {other} are incompatible: model_type 'llama' vs 'mistral'")


def test_relative_model_paths_are_read_from_the_recipes_folder(family, tmp_path):
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": os.path.relpath(family["m1"], tmp_path), "layer_range": [0, 2]}]}]}
    out = _merge(tmp_path, recipe)
    assert torch.equal(_tensors(out)["model.layers.1.mlp.up_proj.weight"],
                       _tensors(family["m1"])["model.layers.1.mlp.up_proj.weight"])


def test_a_method_without_a_base_merges_every_source_and_ignores_base_model(family):
    cfg = parse_merge_config({"merge_method": "linear", "base_model": str(family["base"]), "slices": [
        {"sources": [_src(family, "base", 0, 4, weight=1.0), _src(family, "m1", 0, 4, weight=1.0)]}]})
    plan = plan_merge(cfg)
    try:
        assert plan.jobs and all(j.base is None and len(j.inputs) == 2 for j in plan.jobs)
    finally:
        plan.close()


@pytest.mark.parametrize(("change", "mentions"), [
    (lambda r, f: r["slices"][0]["sources"][0].update(layer_range=[3, 1]),
     ["slices.0.sources.0.layer_range", "[3, 1] is not a layer range"]),
    (lambda r, f: r.update(models=[{"model": str(f["m1"])}]), ["either 'models' or 'slices', not both"]),
    (lambda r, f: r.update(slices=[]), ["'slices' must list at least one slice"]),
    (lambda r, f: r.update(merge_method="ties", base_model=str(f["base"])),
     ["slices[0] (embeddings): merge_method 'ties' takes base_model", "from the slice's sources"]),
    (lambda r, f: r["slices"][0]["sources"].append(_src(f, "m2", 0, 2)),
     ["merge_method 'passthrough' merges exactly 1 model; slices[0] (embeddings) lists 2"]),
    (lambda r, f: r["slices"][0]["sources"].append(_src(f, "m1", 2, 4)),
     ["listed twice among the sources of one slice"]),
    (lambda r, f: r["slices"][0]["sources"][0].update(parameters={"scael": 2}), ["slices[0].sources[0]", "scael"]),
    (lambda r, f: r["slices"][0].update(parameters={"scale": float("nan")}), ["slices[0].parameters.scale"]),
    (lambda r, f: r.update(merge_method="ties", slices=[{"sources": [
        _src(f, "base", 0, 2), _src(f, "m1", 0, 2, weight=1.0, fisher="f.safetensors")]}], base_model=str(f["base"])),
     ["fisher: Fisher weighting is not supported in 'slices' recipes"]),
    (lambda r, f: r.update(modules={}), ["'modules' configs"]),
    (lambda r, f: r.update(merge_method="fisher"),
     ["merge_method 'fisher' needs Fisher files, which 'slices' recipes do not take"]),
    (lambda r, f: r.update(merge_method="ties"),
     ["merge_method 'ties' needs 'base_model' (of the recipe or of slices[0])"]),
    (lambda r, f: r.update(merge_method="ties", base_model=str(f["base"]), slices=[{"sources": [
        _src(f, "m1", 0, 2, weight=1.0), _src(f, "m2", 0, 2, weight=1.0)]}]),
     lambda f: [f"from the slice's sources, which are {f['m1']}, {f['m2']}"]),
    (lambda r, f: r.update(merge_method="linear", slices=[{"sources": [
        _src(f, "m1", 0, 2, weight=1.0), _src(f, "m2", 0, 2)]}]),
     ["missing required parameter 'weight' (slices[0] (embeddings): model '",
      "m2', tensor model.embed_tokens.weight)"]),
    (lambda r, f: r.update(merge_method="ties", base_model=str(f["base"]), slices=[{"sources": [
        _src(f, "base", 0, 2)]}]),
     ["besides base_model; slices[0] (embeddings) lists 0 besides base_model"]),
])
def test_bad_slices_are_refused_by_name(family, tmp_path, capsys, change, mentions):
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [_src(family, "m1", 0, 2)]}]}
    change(recipe, family)
    _refused(capsys, tmp_path, recipe, *(mentions(family) if callable(mentions) else mentions))


def test_the_in_memory_merger_refuses_slices(family):
    from hm3.merge.inmemory import InMemoryMerger

    merger = InMemoryMerger(family["base"], [family["m1"]])
    cfg = parse_merge_config({"merge_method": "task_arithmetic", "base_model": str(family["base"]), "slices": [
        {"sources": [_src(family, "base", 0, 4), _src(family, "m1", 0, 4, weight=1.0)]}]})
    with pytest.raises(ConfigError, match="merge a 'slices' recipe with hm3 merge"):
        merger.merged_state(cfg)
