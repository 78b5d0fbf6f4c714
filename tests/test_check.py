"""``hm3 check``: stand-in shapes, bad inputs refused by name, and nothing written outside a temp dir."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml

from hm3.check.models import ModelShape, standin_config
from hm3.check.templates import find_template
from hm3.cli import main

ZOO_LEVEL1 = Path(__file__).parents[1] / "experiments" / "configs" / "zoo_level1.yml"


def _check(capsys: pytest.CaptureFixture, config: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["check", str(config), "--json", "-q", *extra])
    return rc, json.loads(capsys.readouterr().out)


def _write(folder: Path, data: dict) -> Path:
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_standin_keeps_family_depth_gqa_ratio_and_tied_embeddings() -> None:
    # Qwen2.5-1.5B: 12 query heads over 2 key/value heads (ratio 6), 28 layers, tied, MLP 8960/1536 wide
    shape = ModelShape("base", "Qwen/Qwen2.5-1.5B", "test", find_template("Qwen/Qwen2.5-1.5B")[1])
    cfg = standin_config(shape, 128)
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["tie_word_embeddings"]) == ("qwen2", 28, True)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (6, 1, 48)
    assert cfg["intermediate_size"] == 280  # round(8960 / 1536 * 48)
    llama = standin_config(ModelShape("b", "x", "test", find_template("meta-llama/Llama-2-7b-hf")[1]), 128)
    assert (llama["num_attention_heads"], llama["num_key_value_heads"], llama["tie_word_embeddings"]) == (2, 2, False)


def test_templates_match_hub_ids_and_folder_names_only() -> None:
    assert find_template("/models/Qwen2.5-Math-1.5B-Instruct")[0] == "qwen/qwen2.5-math-1.5b-instruct"
    assert find_template("codellama/CodeLlama-7b-hf@main")[0] == "codellama/codellama-7b-hf"
    assert find_template("/models/my-own-model") is None


def test_missing_model_without_template_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _write(tmp_path, {"models": {"base": "/nowhere/my-own-base", "a": "/nowhere/my-own-base"},
                               "objectives": ["zoo:math"], "search_space": {"base_model": "base", "models": ["a"]},
                               "optimizer": {"name": "random", "budget": 4}})
    rc, out = _check(capsys, config)
    assert rc == 3 and not out["passed"]
    assert "models.a: '/nowhere/my-own-base'" in out["error"] and "no known-shape template" in out["error"]


def test_broken_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = yaml.safe_load(ZOO_LEVEL1.read_text())
    data["search_space"]["densty_bounds"] = [0.2, 1.0]
    rc, out = _check(capsys, _write(tmp_path, data))
    assert rc == 3 and "search_space.densty_bounds: unknown key" in out["error"]


def test_bad_yaml_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "config.yml"
    path.write_text("models: [unclosed\n")
    rc, out = _check(capsys, path)
    assert rc == 3 and "not valid YAML" in out["error"]


def test_bad_objective_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = yaml.safe_load(ZOO_LEVEL1.read_text()) | {"objectives": ["zoo:math", "zoo:code", "zoo:translation",
                                                                  "nosuch:thing"]}
    data["zoo"] = str(Path(__file__).parents[1] / "hm3" / "zoo" / "shipped" / "micro")
    rc, out = _check(capsys, _write(tmp_path, data))
    assert rc == 3 and "unknown objective 'nosuch:thing'" in out["error"]


def test_run_dry_run_is_check_and_run_needs_a_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _write(tmp_path, {"models": {"base": "/nowhere/x", "a": "/nowhere/x"}, "objectives": ["zoo:math"],
                               "search_space": {"base_model": "base", "models": ["a"]}})
    assert main(["run", str(config), "--dry-run", "--json", "-q"]) == 3
    assert "no known-shape template" in json.loads(capsys.readouterr().out)["error"]
    assert main(["run", str(config), "-q"]) == 2


@pytest.mark.slow
def test_the_demos_config_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hm3.demo import DEMO_CONFIG

    rc, out = _check(capsys, _write(tmp_path, {"zoo": "builtin:micro", **DEMO_CONFIG}))
    assert rc == 0 and out["passed"], out["error"]
    assert [i["what"] for i in out["items"] if i["status"] == "ok"][-2:] == ["level 1", "level 2"]


@pytest.mark.slow
def test_a_preference_count_written_as_a_float_passes_as_the_run_accepts_it(capsys: pytest.CaptureFixture) -> None:
    rc, out = _check(capsys, ZOO_LEVEL1.parent / "zoo_two_level.yml", "--set", "level2.preferences=4.0")
    assert rc == 0 and out["passed"], out["error"]
    assert any(i["what"] == "level 2" and i["status"] == "ok" for i in out["items"])


@pytest.mark.slow
def test_check_passes_on_the_zoo_and_writes_nothing_outside_a_temp_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    config = _write(work, yaml.safe_load(ZOO_LEVEL1.read_text()))
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    seen = []
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):  # the check's directory is made where tempfile says, and removed
        made = real(*args, **kwargs)
        seen.append(Path(made.name))
        return made

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    zoo_before = _tree(ZOO_LEVEL1.parents[2] / "hm3" / "zoo" / "shipped")
    rc, out = _check(capsys, config)
    assert rc == 0 and out["passed"], out["error"]
    assert any(i["what"] == "level 1" and i["status"] == "ok" for i in out["items"])
    assert seen and all(p.parent == temp for p in seen)
    assert _tree(work) == {"config.yml"} and _tree(temp) == set()
    assert _tree(ZOO_LEVEL1.parents[2] / "hm3" / "zoo" / "shipped") == zoo_before


@pytest.mark.slow
def test_lmeval_task_without_data_stands_in_as_an_lmeval_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "absent.yaml").write_text(yaml.safe_dump({
        "task": "hm3_absent", "dataset_path": "hm3-test/absent-data", "output_type": "multiple_choice",
        "test_split": "test", "doc_to_text": "{{q}}", "doc_to_choice": "choices", "doc_to_target": "gold"}))
    data = yaml.safe_load(ZOO_LEVEL1.read_text())
    data["objectives"] = ["zoo:math", "zoo:code", "zoo:translation", f"lm-eval:hm3_absent,include_path={tasks}"]
    data["optimizer"] = {"name": "random", "budget": 4}
    rc, out = _check(capsys, _write(tmp_path, data))
    assert rc == 0 and out["passed"], out["error"]
    (sub,) = [i for i in out["items"] if i["what"].startswith("objectives[3]")]
    assert "not in the local datasets cache: stand-in multiple_choice lm-eval task" in sub["detail"]
    assert sorted(p.name for p in tasks.iterdir()) == ["absent.yaml"]


def test_an_error_about_an_lmeval_standin_names_its_own_objective(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from hm3.check import CheckReport, _standin_objectives
    from hm3.errors import ExitCode

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for x in "ab":
        (tasks / f"absent_{x}.yaml").write_text(yaml.safe_dump({
            "task": f"hm3_absent_{x}", "dataset_path": "hm3-test/absent-data", "output_type": "multiple_choice",
            "test_split": "test", "doc_to_text": "{{q}}", "doc_to_choice": "choices", "doc_to_target": "gold"}))
    specs = [f"lm-eval:hm3_absent_{x},include_path={tasks}" for x in "ab"]
    report = CheckReport("config.yml")
    chosen = _standin_objectives(specs, tmp_path / "data", report)
    for i, spec in enumerate(specs):
        report.fail(f"objective {chosen[spec]!r} failed", ExitCode.BAD_INPUT)
        assert f"the stand-in data of objectives[{i}] ({spec})" in report.error, report.error
        assert str(tmp_path / "data") not in report.error


def test_a_data_file_with_options_is_read_and_a_stand_in_keeps_them(tmp_path: Path) -> None:
    from hm3.check.objectives import choose_objective
    from hm3.errors import DataFileError
    from objectives.registry import get_objective

    good, bad = tmp_path / "g.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"question": "1 + 1?", "answer": "#### 2", "split": split}) + "\n"
                            for split in ("train", "test")))
    bad.write_text("not json\n")
    spec = f"gsm8k:{good}@2,name=g,fewshot=1"
    assert choose_objective(spec, tmp_path, 0).spec == spec  # the file is here: used as it is
    with pytest.raises(DataFileError, match="bad.jsonl"):
        choose_objective(f"gsm8k:{bad},chat=true", tmp_path, 0)
    choice = choose_objective("gsm8k:absent.jsonl,name=g,chat=true", tmp_path, 0)  # no chat template in a stand-in
    assert choice.spec == f"gsm8k:{choice.path},name=g" and "data file absent.jsonl not found" in choice.note
    eight_shot = choose_objective("gsm8k:absent.jsonl,fewshot=8@3", tmp_path, 1).spec
    assert eight_shot.endswith(",fewshot=8@3") and get_objective(eight_shot).name.endswith("/8shot@3")


def test_t_max_deeper_than_the_models_on_vllm_is_refused(capsys: pytest.CaptureFixture) -> None:
    config = ZOO_LEVEL1.parent / "qwen25_1p5b_two_level.yml"
    rc, out = _check(capsys, config, "--set", "level2.rl.t_max=40")
    assert rc == 3 and "level2.rl.t_max = 40" in out["error"] and "must be <= 28" in out["error"]
    assert "the stand-in for /models/Qwen2.5-1.5B-Instruct" in out["error"] and "hm3-check-" not in out["error"]


def test_shape_comes_from_the_hf_cache_before_any_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hm3.check.models import model_shape
    from tests.hub_cache import add_to_hub_cache

    folder = tmp_path / "model"
    folder.mkdir()
    # a config.json unlike the template of that hub id: 3 layers, 8 heads over 2
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
                                                    "num_hidden_layers": 3, "num_attention_heads": 8,
                                                    "num_key_value_heads": 2, "vocab_size": 100}))
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "Qwen/Qwen2.5-1.5B", folder, "a" * 40, refs=["main"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    shape = model_shape("base", "Qwen/Qwen2.5-1.5B", tmp_path)
    assert shape.source.startswith("config.json at ") and str(cache) in shape.source
    assert shape.config["num_hidden_layers"] == 3
    assert standin_config(shape, 128)["num_attention_heads"] == 4  # ratio 4: 4 heads over 1
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert model_shape("base", "Qwen/Qwen2.5-1.5B", tmp_path).source.startswith("template qwen/qwen2.5-1.5b")


def test_shape_comes_from_the_folder_the_run_would_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hm3.check.models import model_shape
    from hm3.errors import ConfigError

    config_dir, cwd = tmp_path / "configs", tmp_path / "cwd"
    (config_dir / "base").mkdir(parents=True)
    (config_dir / "base" / "config.json").write_text(json.dumps(_llama_shape("base", 150).config))
    (cwd / "base").mkdir(parents=True)  # the run reads ./base, which exists, before configs/base
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError, match=r"models\.base: cannot read base/config\.json"):
        model_shape("base", "base", config_dir)
    (cwd / "base").rmdir()
    assert model_shape("base", "base", config_dir).source == f"config.json at {config_dir / 'base' / 'config.json'}"


def _llama_shape(ref: str, vocab_size: int) -> ModelShape:
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": vocab_size}
    return ModelShape(ref, ref, "test", config)


def test_a_key_a_config_json_leaves_out_compares_as_its_familys_default() -> None:
    from hm3.check.models import shape_conflicts

    saved = _llama_shape("base", 150)  # save_pretrained may leave out a key that holds its default
    explicit = ModelShape("a", "a", "test", saved.config | {"tie_word_embeddings": False})
    tied = ModelShape("b", "b", "test", saved.config | {"tie_word_embeddings": True})
    assert shape_conflicts([saved, explicit]) == []  # Llama's default: untied
    assert shape_conflicts([saved, tied]) == ["tie_word_embeddings: base False, b True"]


def test_standins_of_a_search_over_the_bases_vocabulary_have_the_real_vocab_sizes(tmp_path: Path) -> None:
    """Rows as the models' configs say (as Llama-2 32000, WizardMath 32001, CodeLlama 32016, here smaller), the
    base's toy tokenizer filled up to the base's rows, the experts' first rows the base's perturbed ones."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from hm3.check.models import build_standins, shape_conflicts

    shapes = [_llama_shape("base", 150), _llama_shape("math", 151), _llama_shape("coder", 166)]
    assert shape_conflicts(shapes) == ["vocab_size: base 150, math 151, coder 166"]
    assert shape_conflicts(shapes, own_vocabularies=True) == []
    dirs = build_standins(shapes, "base", tmp_path, seed=0, own_vocabularies=True)
    base = load_file(dirs["base"] / "model.safetensors")
    for ref, rows in (("base", 150), ("math", 151), ("coder", 166)):
        tensors = load_file(dirs[ref] / "model.safetensors")
        assert json.loads((dirs[ref] / "config.json").read_text())["vocab_size"] == rows
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert tensors[name].shape[0] == rows, (ref, name)
            delta = tensors[name][:150] - base[name]
            assert (delta.abs().max() > 0) == (ref != "base") and delta.abs().max() < base[name].abs().max()
    assert len(AutoTokenizer.from_pretrained(str(dirs["base"]))) == 150


def test_a_stand_in_has_its_models_chat_template_where_the_models_files_are_here(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from hm3.check.models import build_standins, model_shape

    template = "{% for m in messages %}U: {{ m['content'] }}\n{% endfor %}A:"
    refs = ("base", "chat", "jinja")
    for ref in refs:
        (tmp_path / ref).mkdir()
        (tmp_path / ref / "config.json").write_text(json.dumps(_llama_shape(ref, 150).config))
    (tmp_path / "chat" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (tmp_path / "jinja" / "chat_template.jinja").write_text(template)  # as newer save_pretrained keeps it
    shapes = [model_shape(ref, str(tmp_path / ref), tmp_path) for ref in refs]
    dirs = build_standins(shapes, "base", tmp_path / "standins", seed=0)
    for ref in ("chat", "jinja"):  # chat=true can be checked
        assert AutoTokenizer.from_pretrained(str(dirs[ref])).chat_template == template, ref
    assert not AutoTokenizer.from_pretrained(str(dirs["base"])).chat_template  # and refused where the model has none


def test_a_search_over_different_vocabularies_without_a_tokenizer_source_names_it(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = Path(__file__).parents[1] / "experiments" / "reproduce" / "hm3_llama2_7b" / "config.yml"
    data = yaml.safe_load(config.read_text())
    del data["search_space"]["tokenizer_source"]
    rc, out = _check(capsys, _write(tmp_path, data))
    assert rc == 3 and "the models differ in vocab_size: base 32000, " in out["error"], out["error"]
    assert all(f"{ref} {rows}" in out["error"] for ref, rows in (("instruct", 32000), ("math", 32001), ("coder", 32016)))
    assert "only the vocabularies differ: set search_space.tokenizer_source: base" in out["error"]
