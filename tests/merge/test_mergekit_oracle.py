"""`hm3 merge` against `mergekit-yaml` on the same tiny models and the same configs.

mergekit is the test oracle (dev extra): for the methods both tools have, an
unchanged mergekit config must give mergekit's tensors (max abs diff <= 1e-5).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.cli import main

pytestmark = pytest.mark.mergekit

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oracle")
    base = build_random_llama(root / "base", hidden_size=48, num_layers=3, vocab_size=96, seed=0)
    out = {"base": base}
    for i in (1, 2, 3):
        out[f"m{i}"] = build_finetuned_variant(base, root / f"m{i}", seed=10 + i, scale=0.05)
    return out


@pytest.fixture(scope="module")
def qwen2_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2-style family: grouped-query attention (4 heads, 2 key-value heads), q/k/v biases and tied
    embeddings (no lm_head tensor)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("oracle_qwen2")
    config = Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(root / "base")
    out = {"base": root / "base"}
    for i in (1, 2, 3):
        out[f"m{i}"] = build_finetuned_variant(root / "base", root / f"m{i}", seed=20 + i, scale=0.05)
    return out


def _configs(m: dict[str, Path]) -> dict[str, dict]:
    b, m1, m2, m3 = (str(m[k]) for k in ("base", "m1", "m2", "m3"))
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": m1, "parameters": {"weight": 0.5}},
                {"model": m2, "parameters": {"weight": 0.3}},
                {"model": m3, "parameters": {"weight": 0.2}},
            ],
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.7}},
                {"model": m2, "parameters": {"weight": [0.2, 0.9]}},  # gradient over depth
                {"model": m3, "parameters": {"weight": -0.3}},
            ],
            "parameters": {"lambda": 0.8},
            "dtype": "float32",
        },
        "ties_normalize": {
            "merge_method": "ties",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": m2, "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.4}], "density": 0.7}},
                {"model": m3, "parameters": {"weight": 0.3, "density": [0.2, 0.8, 0.4]}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "ties_no_normalize": {
            "merge_method": "ties",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": m2, "parameters": {"weight": 0.5, "density": 0.3}},
                {"model": m3, "parameters": {"weight": 0.3, "density": 0.9}},
            ],
            "parameters": {"normalize": False, "int8_mask": True},
            "dtype": "float32",
        },
        "ties_defaults": {  # base listed among models: skipped as a task vector, as in mergekit
            "merge_method": "ties",
            "base_model": b,
            "models": [
                {"model": b},
                {"model": m1, "parameters": {"weight": 1.0, "density": 0.4}},
                {"model": m2, "parameters": {"weight": 1.0, "density": 0.4}},
            ],
        },
        "slerp": {  # the shape of the slerp configs people share: t by module over depth
            "merge_method": "slerp",
            "base_model": b,
            "models": [{"model": b}, {"model": m1}],
            "parameters": {"t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]},
            "dtype": "float32",
        },
        "slerp_base_not_listed": {  # mergekit adds the base to the inputs
            "merge_method": "slerp",
            "base_model": b,
            "models": [{"model": m2}],
            "parameters": {"t": 0.35},
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": b,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
            "dtype": "float32",
        },
        "model_stock_filter_wise": {
            "merge_method": "model_stock",
            "base_model": b,
            "models": [{"model": b}, {"model": m1}, {"model": m3}],
            "parameters": {"filter_wise": True},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6, "density": 0.5, "gamma": 0.05}},
                {"model": m2, "parameters": {"weight": [0.2, 0.9], "density": 0.8, "gamma": 0.3}},
                {"model": m3, "parameters": {"weight": 0.4, "density": [0.3, 0.9]}},  # gamma: default 0.01
            ],
            "parameters": {"rescale": True},
            "dtype": "float32",
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6, "density": 0.5, "gamma": 0.05}},
                {"model": m2, "parameters": {"weight": 0.5, "density": 0.4, "gamma": 0.02}},
                {"model": m3, "parameters": {"weight": 0.3, "density": 0.7, "gamma": 0.1}},
            ],
            "parameters": {"normalize": True, "lambda": 1.2},
            "dtype": "float32",
        },
        "nuslerp_base_row_wise": {
            "merge_method": "nuslerp",
            "base_model": b,
            "models": [{"model": m1, "parameters": {"weight": 0.65}}, {"model": m3, "parameters": {"weight": [0.1, 0.8]}}],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "dtype": "float32",
        },
        "nuslerp_no_base": {
            "merge_method": "nuslerp",
            "models": [{"model": m2, "parameters": {"weight": 1.0}}, {"model": m1, "parameters": {"weight": 0.5}}],
            "parameters": {"nuslerp_flatten": False},
        },
        "sce": {
            "merge_method": "sce",
            "base_model": b,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
            "parameters": {"select_topk": [0.2, 0.9]},
            "dtype": "float32",
        },
        "karcher": {  # base_model listed among the models: one of the merged tensors, as in mergekit
            "merge_method": "karcher",
            "base_model": b,
            "models": [{"model": b}, {"model": m1}, {"model": m2}],
            "parameters": {"max_iter": 20, "tol": 1e-6},
            "dtype": "float32",
        },
        "karcher_defaults": {
            "merge_method": "karcher",
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
        },
        "multislerp": {  # with a base: the task vectors' directions
            "merge_method": "multislerp",
            "base_model": b,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5}},
                {"model": m2, "parameters": {"weight": [0.2, 0.9]}},
                {"model": m3, "parameters": {"weight": 0.3}},
            ],
            "dtype": "float32",
        },
        "multislerp_no_base": {
            "merge_method": "multislerp",
            "models": [{"model": m1, "parameters": {"weight": 0.7}}, {"model": m2, "parameters": {"weight": 0.6}}],
            "parameters": {"normalize_weights": False, "eps": 1e-6},
        },
        "multislerp_one_model": {  # base listed among the models: one model left, returned as it is
            "merge_method": "multislerp",
            "base_model": b,
            "models": [{"model": b, "parameters": {"weight": 0.5}}, {"model": m3, "parameters": {"weight": 0.5}}],
        },
        "ram": {
            "merge_method": "ram",
            "base_model": b,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
            "parameters": {"epsilon": [{"filter": "mlp", "value": 0.002}, {"value": 1e-5}]},
            "dtype": "float32",
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": b,
            "models": [{"model": m1}, {"model": m2}],
            "parameters": {"r": 0.3, "epsilon": 0.003},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": b,
            "models": [{"model": b}, {"model": m2}],
            "dtype": "float32",
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": b,
            "models": [{"model": b}, {"model": m1}],
            "parameters": {"t": [{"filter": "mlp", "value": [0.0005, 0.01]}, {"value": 0.002}]},
            "dtype": "float32",
        },
    }


#: the methods added with mergekit parity as their target are held to 1e-6
TIGHT = {"slerp", "slerp_base_not_listed", "model_stock", "model_stock_filter_wise", "breadcrumbs", "breadcrumbs_ties",
         "nuslerp_base_row_wise", "nuslerp_no_base", "sce", "karcher", "karcher_defaults", "multislerp",
         "multislerp_no_base", "multislerp_one_model", "nearswap", "ram", "ramplus_tl",
         "arcee_fusion"}


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties_normalize", "ties_no_normalize", "ties_defaults",
                                  *sorted(TIGHT)])
def test_hm3_equals_mergekit(models, tmp_path, name, mergekit_merge):
    _check_against_mergekit(models, tmp_path, name, mergekit_merge)


@pytest.mark.parametrize("name", sorted(TIGHT - {"multislerp"}))  # mergekit refuses it there: next test
def test_hm3_equals_mergekit_on_a_qwen2_family(qwen2_models, tmp_path, name, mergekit_merge):
    _check_against_mergekit(qwen2_models, tmp_path, name, mergekit_merge)


def _check_against_mergekit(models: dict[str, Path], tmp_path: Path, name: str, mergekit_merge) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_configs(models)[name]))
    mk_out, hm_out = tmp_path / "mergekit", tmp_path / "hm3"
    mergekit_merge(cfg, mk_out)
    assert main(["merge", str(cfg), str(hm_out)]) == 0
    ours, theirs = _load_dir(hm_out), _load_dir(mk_out)
    assert set(ours) == set(theirs)
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    print(f"{name}: max |hm3 - mergekit| = {worst:.3g}")
    assert worst <= (1e-6 if name in TIGHT else 1e-5), f"{name}: max abs diff {worst}"
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k


@pytest.mark.slow
def test_exported_config_runs_in_mergekit(models, tmp_path):
    """hm3-only keys translate (rescale_mode) and the export merges to the same tensors as hm3, through
    the ``mergekit-yaml`` command a user runs."""
    if not MERGEKIT_YAML.exists():
        pytest.skip("mergekit-yaml not installed (dev extra)")
    recipe = _configs(models)["ties_normalize"] | {"seed": 7}
    recipe["parameters"] = {"normalize": True, "rescale_mode": "none"}
    src = tmp_path / "hm3.yml"
    src.write_text(yaml.safe_dump(recipe))
    exported = tmp_path / "mk.yml"
    assert main(["export-mergekit", str(src), str(exported)]) == 0
    data = yaml.safe_load(exported.read_text())
    assert "seed" not in data and data["parameters"] == {"normalize": True, "rescale": False}
    assert "#" not in exported.read_text()  # nothing random: no note
    mk_out = tmp_path / "mk_out"
    proc = subprocess.run([str(MERGEKIT_YAML), str(exported), str(mk_out), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["merge", str(src), str(tmp_path / "hm3_out")]) == 0
    ours, theirs = _load_dir(tmp_path / "hm3_out"), _load_dir(mk_out)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5
    shutil.rmtree(mk_out)


@pytest.mark.parametrize(("method", "parameters"), [
    ("ties", {"rescale_mode": [{"filter": "mlp", "value": "l1"}, {"value": "none"}]}),  # by module
    ("ties", {"rescale_mode": "l1", "rescale": False}),  # both keys: hm3 takes rescale_mode
    ("ties", {"rescale": False, "rescale_mode": "l1"}),
    ("ties", {"rescale_mode": [{"filter": "mlp", "value": "none"}], "rescale": True}),  # rescale where it misses
    ("breadcrumbs", {"rescale_mode": "l1"}),  # not a breadcrumbs parameter: hm3 ignores it, with a warning
])
def test_an_exported_rescale_mode_keeps_its_value_for_every_tensor(models, tmp_path, mergekit_merge, method,
                                                                  parameters):
    """``rescale_mode`` becomes mergekit's ``rescale`` tensor by tensor: a filtered one keeps its filters, and it
    wins over a ``rescale`` beside it as it does in hm3, so mergekit merges the exported config to hm3's tensors."""
    recipe = _configs(models)["ties_no_normalize"] | {"merge_method": method}
    recipe["parameters"] = {"normalize": False, **parameters}
    src, exported = tmp_path / "hm3.yml", tmp_path / "mk.yml"
    src.write_text(yaml.safe_dump(recipe, sort_keys=False))  # the keys in the order given
    assert main(["export-mergekit", str(src), str(exported)]) == 0
    mergekit_merge(exported, tmp_path / "mk_out")
    assert main(["merge", str(src), str(tmp_path / "hm3_out")]) == 0
    ours, theirs = _load_dir(tmp_path / "hm3_out"), _load_dir(tmp_path / "mk_out")
    worst = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours}
    assert max(worst.values()) <= 1e-6, {k: v for k, v in worst.items() if v > 1e-6}


def test_an_exported_filtered_inverse_rescale_is_refused(models, tmp_path, capsys):
    """``inverse`` has no mergekit equivalent under a filter too: refused, naming the key, and nothing written."""
    recipe = _configs(models)["ties_no_normalize"] | {"merge_method": "dare_ties"}
    recipe["parameters"] = {"rescale_mode": [{"filter": "mlp", "value": "inverse"}, {"value": "l1"}]}
    src, exported = tmp_path / "hm3.yml", tmp_path / "mk.yml"
    src.write_text(yaml.safe_dump(recipe))
    assert main(["export-mergekit", str(src), str(exported)]) != 0
    assert "parameters.rescale_mode: inverse" in capsys.readouterr().err and not exported.exists()


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_an_exported_random_merge_names_its_seed_and_the_command_that_repeats_it(models, tmp_path, method,
                                                                                 mergekit_merge):
    """mergekit has no config key for a seed: the export says which seed hm3 used and gives the mergekit-yaml
    command whose --random-seed (mergekit's MergeOptions.random_seed) makes mergekit's merge repeatable."""
    recipe = _configs(models)["ties_no_normalize"] | {"merge_method": method, "seed": 7}
    if method == "della":
        recipe["parameters"]["epsilon"] = 0.05  # densities up to 0.9: ± 0.15 would leave (0, 1)
    src, exported = tmp_path / "hm3.yml", tmp_path / "mk.yml"
    src.write_text(yaml.safe_dump(recipe))
    assert main(["export-mergekit", str(src), str(exported)]) == 0
    notes = [line.removeprefix("# ") for line in exported.read_text().splitlines() if line.startswith("#")]
    assert "with seed 7" in notes[0] and any("differ from hm3's" in line for line in notes)
    command = next(line for line in notes if "mergekit-yaml" in line).split()
    assert command == ["mergekit-yaml", str(exported), "OUTPUT_DIR", "--random-seed", "7"]
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        mergekit_merge(exported, tmp_path / name, random_seed=seed)
        runs[name] = _load_dir(tmp_path / name)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_a_della_config_mergekit_refuses_is_refused_by_export_before_it_writes(models, tmp_path, mergekit_merge,
                                                                               capsys):
    """The translation alone would write it; mergekit then raises halfway through its merge (density ± epsilon
    outside (0, 1) in the last layer). export-mergekit runs hm3 merge's planner first, so it writes nothing."""
    from hm3.config import parse_merge_config
    from hm3.merge.export import to_mergekit

    recipe = _configs(models)["ties_no_normalize"] | {"merge_method": "della", "seed": 7}
    recipe["models"][0]["parameters"]["density"] = [0.5, 0.9]  # epsilon defaults to 0.15 in both tools
    recipe["models"][2]["parameters"]["density"] = 0.5  # (0.9 would be refused in every layer)
    src, exported = tmp_path / "hm3.yml", tmp_path / "mk.yml"
    src.write_text(yaml.safe_dump(recipe))
    translated = tmp_path / "translated.yml"
    translated.write_text(yaml.safe_dump(to_mergekit(parse_merge_config(recipe))))
    with pytest.raises(ValueError, match="Epsilon must be chosen such that density"):
        mergekit_merge(translated, tmp_path / "mk_out")
    assert main(["export-mergekit", str(src), str(exported)]) != 0
    err = capsys.readouterr().err
    assert "got density 0.9, epsilon 0.15" in err and "model.layers.2." in err and not exported.exists()


def test_multislerp_keeps_the_base_where_no_model_changed_a_tensor_and_mergekit_refuses(qwen2_models, tmp_path,
                                                                                       mergekit_merge):
    """The Qwen2 family's attention biases are the base's in every model: three zero task vectors have no mean
    direction, and mergekit refuses the whole merge. hm3 keeps the base there (the other tensors are merged as
    the Llama family's, checked against mergekit above) and changes the tensors the models changed."""
    recipe = _configs(qwen2_models)["multislerp"]
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mergekit_merge(cfg, tmp_path / "mergekit")
    assert main(["merge", str(cfg), str(tmp_path / "hm3")]) == 0
    ours, base = _load_dir(tmp_path / "hm3"), _load_dir(Path(recipe["base_model"]))
    models = [_load_dir(Path(m["model"])) for m in recipe["models"]]
    unchanged = {k for k in base if all(torch.equal(base[k], m[k]) for m in models)}
    assert unchanged and all(torch.equal(ours[k], base[k]) for k in unchanged)
    assert all(not torch.equal(ours[k], base[k]) for k in set(base) - unchanged)
