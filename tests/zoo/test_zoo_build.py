"""Building the zoo: layout, loading, manifest, caching, refusal, quality-bar arithmetic, and the bar itself."""

from __future__ import annotations

import json

import pytest
import torch

from hm3.errors import ConfigError, OutputExistsError
from hm3.zoo.build import (
    MODELS,
    TIES_DENSITIES,
    TIES_WEIGHTS,
    ZooManifest,
    best_merge,
    build_zoo,
    quality_bar,
    ties_states,
)
from hm3.zoo.spec import zoo_spec
from objectives.zoo import ZOO_TASKS

# a few optimiser steps: enough to exercise every stage in seconds (its scores mean nothing)
QUICK = dict(base_steps=6, expert_steps=4, eval_examples=4)


@pytest.fixture(scope="module")
def quick_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "zoo"
    return out, build_zoo(out, seed=0, progress=False, **QUICK)


def test_layout_manifest_and_models_load_with_transformers(quick_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, manifest = quick_zoo
    assert ZooManifest.read(out) == manifest
    data = json.loads((out / "zoo.json").read_text())
    assert data["objectives"] == ["zoo:math", "zoo:code", "zoo:translation"]
    assert data["spec_hash"] == zoo_spec("deep", 0, **QUICK).hash()  # the default recipe, four layers
    assert data["spec"]["size"] == "deep" and data["spec"]["num_layers"] == 4
    for split in ("scores_validation", "scores_test"):
        assert set(data[split]) == set(MODELS)
        assert all(set(row) == set(ZOO_TASKS) and all(0 <= v <= 1 for v in row.values()) for row in data[split].values())
    assert len(data["ties_grid"]) == len(TIES_WEIGHTS) ** 3 * len(TIES_DENSITIES) and data["ties_best"]["merge"] in {g["merge"] for g in data["ties_grid"]}
    assert isinstance(data["quality_bar"]["ok"], bool)
    best_test = data["ties_best_test"]  # the bar's chosen merge, scored on the test split too
    assert best_test["merge"] == data["ties_best"]["merge"] and set(best_test["gain_kept"]) == set(ZOO_TASKS)
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(str(out / name))
        tok = AutoTokenizer.from_pretrained(str(out / name))
        assert type(model).__name__ == "LlamaForCausalLM"
        assert (out / name / "model.safetensors").is_file()
        assert model.get_input_embeddings().num_embeddings == len(tok)
    assert not list(out.parent.glob(".*building"))  # no temporary directory left behind


def test_a_zoo_of_another_format_is_refused_with_a_clear_message(quick_zoo, tmp_path):
    out, _ = quick_zoo
    data = json.loads((out / "zoo.json").read_text())
    data["format"] = 4  # as an older hm3 wrote it
    (tmp_path / "zoo.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"a zoo of format 4, but this hm3 reads zoo format \d+; rebuild it"):
        ZooManifest.read(tmp_path)
    (tmp_path / "zoo.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a zoo manifest"):
        ZooManifest.read(tmp_path)


def test_the_manifest_records_every_model_files_hash(quick_zoo):
    from hm3.zoo.shipped import file_hashes

    out, manifest = quick_zoo
    assert manifest.files == file_hashes(out)
    assert {rel.split("/")[0] for rel in manifest.files} == set(MODELS)
    assert f"{MODELS[0]}/model.safetensors" in manifest.files


def test_experts_differ_from_the_base(quick_zoo):
    out, _ = quick_zoo
    base = _weights(out / "base")
    for task in ZOO_TASKS:
        expert = _weights(out / task)
        assert any(not torch.equal(base[k], expert[k]) for k in base)


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_same_spec_is_reused_not_rebuilt(quick_zoo, monkeypatch):
    import hm3.zoo.build as build

    out, manifest = quick_zoo
    monkeypatch.setattr(build, "_build_into", lambda *a, **k: pytest.fail("rebuilt a cached zoo"))
    assert build_zoo(out, seed=0, progress=False, **QUICK) == manifest


def test_cache_dir_builds_once_and_copies_and_builds_are_deterministic(quick_zoo, tmp_path, monkeypatch):
    import hm3.zoo.build as build

    out, manifest = quick_zoo
    first = build_zoo(tmp_path / "a", seed=0, cache_dir=tmp_path / "cache", progress=False, **QUICK)
    assert (tmp_path / "cache" / first.spec_hash / "zoo.json").is_file()
    for name in MODELS:  # a second, independent build of the same spec: the same weights and scores
        a, b = _weights(out / name), _weights(tmp_path / "a" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.scores_validation == manifest.scores_validation
    monkeypatch.setattr(build, "_build_into", lambda *a, **k: pytest.fail("rebuilt a cached zoo"))
    second = build_zoo(tmp_path / "b", seed=0, cache_dir=tmp_path / "cache", progress=False, **QUICK)
    assert second == first and (tmp_path / "b" / "math" / "model.safetensors").is_file()


def test_other_content_is_refused_and_bad_specs_are_config_errors(quick_zoo, tmp_path):
    out, _ = quick_zoo
    with pytest.raises(OutputExistsError, match="does not hold a deep zoo with seed 5"):
        build_zoo(out, seed=5, progress=False, **QUICK)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=str(tmp_path)):
        build_zoo(tmp_path, progress=False, **QUICK)
    with pytest.raises(ConfigError, match="unknown zoo size 'huge'"):
        build_zoo(tmp_path / "x", size="huge")
    with pytest.raises(ConfigError, match="seed"):
        zoo_spec("micro", -1)
    with pytest.raises(ConfigError, match="hiden_size"):
        zoo_spec("micro", 0, hiden_size=3)
    with pytest.raises(ConfigError, match="unknown task 'poetry'"):
        zoo_spec("micro", 0, replay_weights={"poetry": 1.0})
    with pytest.raises(ConfigError, match=r"replay_weights\['code'\] must be a finite number >= 0, got -1"):
        zoo_spec("micro", 0, replay_weights={"code": -1})


def test_spec_hash_changes_with_any_setting():
    a = zoo_spec("micro", 0)
    assert a.hash() == zoo_spec("micro", 0).hash()
    assert len({a.hash(), zoo_spec("micro", 1).hash(), zoo_spec("small", 0).hash(),
                zoo_spec("micro", 0, expert_lr=1e-4).hash(),
                zoo_spec("micro", 0, replay_weights={"code": 0.5}).hash(),
                zoo_spec("micro", 0, expert_frozen_embeddings=True).hash(), zoo_spec("deep", 0).hash()}) == 7


def test_a_setting_added_later_leaves_the_hash_of_every_spec_without_it_as_it_was():
    """The shipped zoo names its build by the hash of a spec that had no expert_frozen_embeddings: at its
    default the setting is left out of the hash, so that build is still found, and still named, as before."""
    import dataclasses
    import hashlib
    import json

    from hm3.zoo.spec import ZOO_FORMAT

    spec = zoo_spec("micro", 0)
    before = {k: v for k, v in dataclasses.asdict(spec).items() if k != "expert_frozen_embeddings"}
    blob = json.dumps({"format": ZOO_FORMAT, **before}, sort_keys=True)
    assert spec.hash() == hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_replay_weights_split_the_replay_between_the_other_tasks():
    from hm3.zoo.train import expert_data

    sets = {t: [([i, j], 0) for j in range(100)] for i, t in enumerate(ZOO_TASKS)}
    even = expert_data(sets, "math", 0.5)  # as many replayed examples as own ones, half from each other task
    assert len(even) == 200 and sum(x[0][0] == 1 for x in even) == 50 and sum(x[0][0] == 2 for x in even) == 50
    assert even == expert_data(sets, "math", 0.5, {})
    skewed = expert_data(sets, "math", 0.5, {"translation": 0.25})  # code gets 4/5 of the replay
    assert sum(x[0][0] == 1 for x in skewed) == 80 and sum(x[0][0] == 2 for x in skewed) == 20
    assert expert_data(sets, "math", 0.5, {"code": 0, "translation": 0}) == sets["math"]


def test_a_replay_its_pool_cannot_fill_is_refused_before_any_training(tmp_path, monkeypatch):
    """Taking fewer items than the quota would fine-tune with less replay than the spec records."""
    import hm3.zoo.train as zoo_train

    sets = {t: [([i, j], 0) for j in range(100 if t == "math" else 30)] for i, t in enumerate(ZOO_TASKS)}
    with pytest.raises(ConfigError, match="replay of 'code' takes 50 items but its pool holds 30"):
        zoo_train.expert_data(sets, "math", 0.5)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the replay was checked")

    monkeypatch.setattr(zoo_train, "train", no_training)
    # without its specialist items, code keeps 507 general ones: fewer than the math expert's code quota
    with pytest.raises(ConfigError, match="replay of 'code'"):
        build_zoo(tmp_path / "zoo", progress=False, specialist_share={"code": 0.0}, **QUICK)


def test_quality_bar_arithmetic_on_a_hand_matrix():
    matrix = {
        "base": {"math": 0.1, "code": 0.1, "translation": 0.4},
        "math": {"math": 0.9, "code": 0.1, "translation": 0.4},
        "code": {"math": 0.2, "code": 0.7, "translation": 0.4},
        "translation": {"math": 0.1, "code": 0.2, "translation": 0.9},
    }
    good = quality_bar(matrix, {"math": 0.5, "code": 0.4, "translation": 0.65})
    assert good["ok"]
    assert good["checks"]["math"]["expert_margin"] == pytest.approx(0.7)
    assert good["checks"]["code"]["ties_gain_kept"] == pytest.approx(0.5)
    assert not quality_bar(matrix, {"math": 0.5, "code": 0.39, "translation": 0.65})["ok"]  # code keeps < 50%
    matrix["code"]["math"] = 0.75  # the code model nearly as good at math as the math expert
    bad = quality_bar(matrix, {"math": 0.5, "code": 0.4, "translation": 0.65})
    assert not bad["ok"] and not bad["checks"]["math"]["ok"] and bad["checks"]["code"]["ok"]


def test_best_merge_is_the_one_with_the_best_worst_task():
    matrix = {
        "base": {"math": 0.0, "code": 0.0, "translation": 0.5},
        "math": {"math": 1.0, "code": 0.0, "translation": 0.5},
        "code": {"math": 0.0, "code": 1.0, "translation": 0.5},
        "translation": {"math": 0.0, "code": 0.0, "translation": 1.0},
    }
    grid = {
        "lopsided": {"math": 1.0, "code": 0.1, "translation": 1.0},  # best total, keeps 10% of code's gain
        "even": {"math": 0.6, "code": 0.5, "translation": 0.8},
        "even, lower total": {"math": 0.5, "code": 0.5, "translation": 0.75},
    }
    assert best_merge(matrix, grid) == "even"


def test_ties_grid_of_identical_experts_recovers_the_expert():
    base = {"w": torch.zeros(4, 4)}
    expert = {"w": torch.arange(16.0).reshape(4, 4) - 8}
    grid = ties_states(base, [expert, expert, expert])
    w = TIES_WEIGHTS
    assert torch.allclose(grid[f"ties d=1.0 w=({w[0]}, {w[0]}, {w[0]})"]["w"], 3 * w[0] * expert["w"])
    # unnormalised: the weighted sum, whatever the mix
    assert torch.allclose(grid[f"ties d=1.0 w=({w[0]}, {w[1]}, {w[-1]})"]["w"], (w[0] + w[1] + w[-1]) * expert["w"])


def test_ties_grid_weights_each_expert_on_its_own():
    """A grid merge of experts that each moved one coordinate moves it by that expert's weight."""
    base = {"w": torch.zeros(3)}
    experts = [{"w": torch.eye(3)[i]} for i in range(3)]
    w = TIES_WEIGHTS
    merged = ties_states(base, experts)[f"ties d=1.0 w=({w[0]}, {w[1]}, {w[2]})"]["w"]
    assert torch.allclose(merged, torch.tensor([w[0], w[1], w[2]]))


def test_general_items_keep_the_data_order_and_a_share_of_the_specialist_items():
    from hm3.zoo.build import general_items
    from objectives.zoo import specialist_item, zoo_objective

    examples = list(zoo_objective("math").examples("train"))[:40]
    ids = list(range(len(examples)))
    assert general_items(examples, ids, "math", 1.0) == ids  # share 1: the whole task, in its own order
    flags = [specialist_item("math", e.prompt) for e in examples]
    assert 0 < sum(flags) < len(flags)  # subtractions are the math specialist skill
    none = general_items(examples, ids, "math", 0.0)
    assert none == [i for i in ids if not flags[i]]
    half = general_items(examples, ids, "math", 0.5)
    specialist_kept = [i for i in half if flags[i]]
    assert len(specialist_kept) == round(sum(flags) * 0.5) and half == sorted(half)
    assert specialist_kept == [i for i in ids if flags[i]][: len(specialist_kept)]  # the first ones


def test_specialist_items_of_each_task():
    from objectives.zoo import lexicon, specialist_item

    assert specialist_item("math", "M 247-8=") and not specialist_item("math", "M 247+8=")
    assert specialist_item("code", "C a=3;b=a-4;c=b+7;print(c)=")
    assert not specialist_item("code", "C a=3;b=a+4;c=b+7;print(c)=")
    words = sorted(lexicon(0))
    assert not specialist_item("translation", f"T {words[0]} {words[1]}=")
    assert specialist_item("translation", f"T {words[0]} {words[-1]}=")
    with pytest.raises(ConfigError, match="unknown zoo task"):
        specialist_item("poetry", "x")


def test_overwrite_force_replaces_a_file_with_the_zoo(micro_zoo_dir, tmp_path, monkeypatch):
    """--overwrite --force on a file: the finished zoo replaces it (the file was found in the way only
    after the build, as an error that threw the build away)."""
    from hm3.cli import main
    from hm3.zoo import build

    monkeypatch.setattr(build, "_build_into", lambda *a, **k: ZooManifest.read(micro_zoo_dir))
    out = tmp_path / "zoo"
    out.write_text("a file in the way\n")
    assert main(["zoo", "build", str(out), "--overwrite", "--force", "-q"]) == 0
    assert (out / "zoo.json").is_file()


@pytest.mark.parametrize(("key", "value", "says"), [
    ("models", "base", "'models' must map model names to folders"),
    ("experts", {"zoo:math": "nowhere"}, "'experts' must map objectives to models of 'models'"),
    ("experts", {"zoo:math": "base", "zoo:code": "math", "zoo:translation": "code", "x": "translation"},
     "no base model"),
    ("objectives", "zoo:math", "'objectives' must be a list"),
])
def test_a_damaged_manifest_is_refused_naming_the_entry(micro_zoo_dir, tmp_path, capsys, key, value, says):
    """A zoo.json of the right format whose entries were edited: refused as bad input, naming the entry,
    when a run config is filled from it (not a traceback)."""
    from hm3.cli import main

    data = json.loads((micro_zoo_dir / "zoo.json").read_text()) | {key: value}
    (tmp_path / "zoo.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=says):
        ZooManifest.read(tmp_path)
    assert main(["demo", "--zoo", str(tmp_path), "--out", str(tmp_path / "demo")]) == 3
    assert says in capsys.readouterr().err and not (tmp_path / "demo").exists()
