"""`hm3 merge` end to end: outputs that load, DARE determinism, and every bad input.

Each bad input must give a clear message naming what is at fault, a non-zero
exit, and leave no output directory (nor a temporary sibling) behind.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.cli import main
from hm3.errors import ExitCode


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = build_random_llama(root / "base", hidden_size=32, num_layers=2, vocab_size=64, seed=0)
    out = {"base": base}
    for i in (1, 2):
        out[f"m{i}"] = build_finetuned_variant(base, root / f"m{i}", seed=i, scale=0.05)
    return out


def _load(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(zoo, method="ties", **model_params) -> dict:
    params = {"weight": 0.5, "density": 0.5} | model_params
    return {
        "merge_method": method,
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo[m]), "parameters": dict(params)} for m in ("m1", "m2")],
    }


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "recipe.yml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def _run_fail(capsys, tmp_path, recipe_path, *must_mention: str, out_name="out"):
    out = tmp_path / out_name
    code = main(["merge", str(recipe_path), str(out)])
    err = capsys.readouterr().err
    assert code != 0
    for m in must_mention:
        assert m in err, f"{m!r} not in: {err}"
    assert "Traceback" not in err
    if out_name == "out":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "temporary output left behind"
    return err


def test_merged_model_loads_with_finite_logits(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", str(_write(tmp_path, _recipe(zoo, "dare_ties"))), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.arange(10).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()
    assert (out / "config.json").exists() and (out / "hm3_recipe.yml").exists()


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_dare_same_seed_is_deterministic_and_different_seed_differs(zoo, tmp_path, method):
    recipe = _write(tmp_path, _recipe(zoo, method) | {"seed": 3})
    assert main(["merge", str(recipe), str(tmp_path / "a")]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "b")]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "c"), "--seed", "4"]) == 0
    a, b, c = _load(tmp_path / "a"), _load(tmp_path / "b"), _load(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_the_recipe_beside_a_merge_names_the_seed_given_on_the_command_line(zoo, tmp_path):
    """``--seed`` overrides the recipe's; the recipe written beside the model must say the seed that drew its
    masks, so merging that file again gives the same model."""
    recipe = _write(tmp_path, _recipe(zoo, "dare_ties") | {"seed": 3})
    assert main(["merge", str(recipe), str(tmp_path / "a"), "--seed", "4"]) == 0
    assert yaml.safe_load((tmp_path / "a" / "hm3_recipe.yml").read_text())["seed"] == 4
    assert main(["merge", str(tmp_path / "a" / "hm3_recipe.yml"), str(tmp_path / "again")]) == 0
    a, again = _load(tmp_path / "a"), _load(tmp_path / "again")
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_dare_kept_fraction_and_l1_norm(zoo, tmp_path):
    """dare_linear with one model, weight 1: output - base is the DARE'd task vector itself."""
    density = 0.3
    recipe = {
        "merge_method": "dare_linear",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["m1"]), "parameters": {"weight": 1.0, "density": density}}],
        "seed": 11,
    }
    for mode in ("l1", "inverse"):
        recipe["parameters"] = {"rescale_mode": mode}
        out = tmp_path / mode
        assert main(["merge", str(_write(tmp_path, recipe)), str(out)]) == 0
        merged, base, m1 = _load(out), _load(zoo["base"]), _load(zoo["m1"])
        name = "model.layers.0.mlp.up_proj.weight"
        tau = m1[name] - base[name]
        tau_hat = merged[name] - base[name]
        kept = (tau_hat != 0).float().mean().item()
        n = tau.numel()
        assert abs(kept - density) < 4 * math.sqrt(density * (1 - density) / n)
        if mode == "l1":
            torch.testing.assert_close(tau_hat.abs().sum(), tau.abs().sum(), rtol=1e-4, atol=0)
        else:
            mask = tau_hat != 0
            torch.testing.assert_close(tau_hat[mask], tau[mask] / density, rtol=1e-4, atol=1e-6)


def test_export_refuses_what_mergekit_cannot_express(zoo, tmp_path, capsys):
    recipe = _recipe(zoo, "dare_ties") | {"parameters": {"rescale_mode": "inverse"}}
    code = main(["export-mergekit", str(_write(tmp_path, recipe)), str(tmp_path / "mk.yml")])
    assert code != 0 and "inverse" in capsys.readouterr().err
    assert not (tmp_path / "mk.yml").exists()


def test_export_mergekit_runs_the_planners_checks_before_writing(zoo, tmp_path, capsys):
    """DELLA needs density ± epsilon inside (0, 1) for every tensor (mergekit raises halfway through its
    merge otherwise): a depth gradient that leaves it in layer 1 only is refused by export-mergekit as by
    hm3 merge, against the models, and nothing is written or printed."""
    recipe = _recipe(zoo, "della", density=[0.5, 0.9])  # epsilon's default 0.15: layer 1 has 0.9 + 0.15 >= 1
    path = _write(tmp_path, recipe)
    out = tmp_path / "mk.yml"
    out.write_text("earlier\n")
    assert main(["export-mergekit", str(path), str(out), "--overwrite"]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "density ± epsilon must lie strictly between 0 and 1; got density 0.9, epsilon 0.15" in err, err
    assert "model.layers.1." in err and "model.layers.0." not in err
    assert out.read_text() == "earlier\n"
    assert main(["export-mergekit", str(path), "-"]) == ExitCode.BAD_INPUT
    assert capsys.readouterr().out == ""
    assert main(["merge", str(path), str(tmp_path / "merged")]) == ExitCode.BAD_INPUT
    assert "got density 0.9, epsilon 0.15" in capsys.readouterr().err
    for m in recipe["models"]:
        m["parameters"]["epsilon"] = 0.05
    assert main(["export-mergekit", str(_write(tmp_path, recipe)), str(out), "--overwrite"]) == 0
    assert yaml.safe_load(out.read_text())["models"][0]["parameters"]["epsilon"] == 0.05


def test_export_mergekit_refuses_models_hm3_cannot_merge(zoo, tmp_path, capsys):
    recipe = _recipe(zoo)
    recipe["models"][1]["model"] = str(tmp_path / "no_such_model")
    assert main(["export-mergekit", str(_write(tmp_path, recipe)), str(tmp_path / "mk.yml")]) == ExitCode.BAD_INPUT
    assert "no_such_model" in capsys.readouterr().err and not (tmp_path / "mk.yml").exists()
    other = build_random_llama(tmp_path / "other", hidden_size=16, num_layers=2, vocab_size=64, seed=0)
    recipe["models"][1]["model"] = str(other)  # another hidden size: shapes differ
    assert main(["export-mergekit", str(_write(tmp_path, recipe)), str(tmp_path / "mk.yml")]) == ExitCode.BAD_INPUT
    assert "other" in capsys.readouterr().err and not (tmp_path / "mk.yml").exists()


# --- bad input ----------------------------------------------------------------------------------------


def test_missing_config(tmp_path, capsys):
    _run_fail(capsys, tmp_path, tmp_path / "nope.yml", "nope.yml")


def test_missing_model_path(zoo, tmp_path, capsys):
    recipe = _recipe(zoo)
    recipe["models"][1]["model"] = str(tmp_path / "no_such_model")
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "no_such_model")


def test_not_a_model_directory(zoo, tmp_path, capsys):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    recipe = _recipe(zoo)
    recipe["models"][0]["model"] = str(empty)
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "empty_dir")


def test_truncated_safetensors(zoo, tmp_path, capsys):
    bad = build_finetuned_variant(zoo["base"], tmp_path / "truncated", seed=5)
    f = next(bad.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    recipe = _recipe(zoo)
    recipe["models"][0]["model"] = str(bad)
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "truncated")


def test_garbage_safetensors(zoo, tmp_path, capsys):
    bad = build_finetuned_variant(zoo["base"], tmp_path / "garbage", seed=5)
    next(bad.glob("*.safetensors")).write_bytes(b"\x00" * 64)
    recipe = _recipe(zoo)
    recipe["models"][0]["model"] = str(bad)
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "garbage")


@pytest.mark.parametrize(
    "kwargs,mention",
    [
        ({"hidden_size": 48}, "hidden"),
        ({"num_layers": 3}, "layer"),
        ({"vocab_size": 80}, "vocab"),
    ],
)
def test_incompatible_models(zoo, tmp_path, capsys, kwargs, mention):
    spec = {"hidden_size": 32, "num_layers": 2, "vocab_size": 64, "seed": 9} | kwargs
    other = build_random_llama(tmp_path / "other", **spec)
    recipe = _recipe(zoo)
    recipe["models"][1]["model"] = str(other)
    err = _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "other")
    assert mention in err.lower()


def test_different_architecture(zoo, tmp_path, capsys):
    other = build_finetuned_variant(zoo["base"], tmp_path / "arch", seed=5)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["model_type"] = "mistral"
    (other / "config.json").write_text(json.dumps(cfg))
    recipe = _recipe(zoo)
    recipe["models"][1]["model"] = str(other)
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "arch")


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_tensor(zoo, tmp_path, capsys, change):
    other = build_finetuned_variant(zoo["base"], tmp_path / change, seed=5)
    f = next(other.glob("*.safetensors"))
    state = load_file(f)
    if change == "missing":
        del state["model.layers.1.mlp.down_proj.weight"]
        mention = "model.layers.1.mlp.down_proj.weight"
    else:
        state["model.layers.1.extra.weight"] = torch.zeros(2)
        mention = "model.layers.1.extra.weight"
    save_file(state, f, metadata={"format": "pt"})
    recipe = _recipe(zoo)
    recipe["models"][1]["model"] = str(other)
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), mention)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_inputs(zoo, tmp_path, capsys, value):
    other = build_finetuned_variant(zoo["base"], tmp_path / "nan", seed=5)
    f = next(other.glob("*.safetensors"))
    state = load_file(f)
    state["model.layers.0.self_attn.q_proj.weight"][3, 4] = value
    save_file(state, f, metadata={"format": "pt"})
    recipe = _recipe(zoo)
    recipe["models"][1]["model"] = str(other)
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize(
    "params,mention",
    [({"density": 1.5}, "density"), ({"density": -0.1}, "density"), ({"weight": 50.0}, "weight"), ({"weight": "x"}, "weight"),
     ({"gamma": 1.2}, "parameter 'gamma'"), ({"gamma": -0.01}, "parameter 'gamma'"),
     ({"epsilon": 1.5}, "parameter 'epsilon'")],
)
def test_out_of_range_parameters(zoo, tmp_path, capsys, params, mention):
    method = "breadcrumbs_ties" if "gamma" in params else "della" if "epsilon" in params else "ties"
    _run_fail(capsys, tmp_path, _write(tmp_path, _recipe(zoo, method, **params)), mention)


@pytest.mark.parametrize(("method", "params", "mention"), [
    ("sce", {"select_topk": 1.1}, "parameter 'select_topk' (tensor "), ("model_stock", {"filter_wise": 1}, "filter_wise"),
    ("nuslerp", {"nuslerp_row_wise": "yes"}, "nuslerp_row_wise"),
    ("karcher", {"max_iter": 2.5}, "parameter 'max_iter' (tensor "), ("karcher", {"max_iter": -1}, "max_iter"),
    ("karcher", {"tol": 0}, "parameter 'tol' (tensor "),
])
def test_out_of_range_global_parameters(zoo, tmp_path, capsys, method, params, mention):
    recipe = _recipe(zoo, method) | {"parameters": params}
    if method == "karcher":  # merges the listed models: a base_model not among them is refused first
        del recipe["base_model"]
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), mention)


def test_nan_parameter(zoo, tmp_path, capsys):
    _run_fail(capsys, tmp_path, _write(tmp_path, _recipe(zoo) | {"parameters": {"lambda": float("nan")}}), "lambda")


def test_unknown_method(zoo, tmp_path, capsys):
    _run_fail(capsys, tmp_path, _write(tmp_path, _recipe(zoo, "frankenmerge")), "frankenmerge", "ties")


def test_unknown_config_key(zoo, tmp_path, capsys):
    _run_fail(capsys, tmp_path, _write(tmp_path, _recipe(zoo) | {"merge_mehtod": "ties"}), "merge_mehtod")


def test_unknown_parameter(zoo, tmp_path, capsys):
    _run_fail(capsys, tmp_path, _write(tmp_path, _recipe(zoo, densty=0.3)), "densty")


@pytest.mark.parametrize("command", ["merge", "export-mergekit"])
@pytest.mark.parametrize(("change", "mention"), [
    ({"dtype": "flaot16"}, "'dtype': unknown dtype 'flaot16'"),
    ({"parameters": {"densty": 0.3}}, "unknown parameter 'parameters.densty'"),
    ({"parameters": {"normalize": "maybe"}}, "parameter 'normalize'"),
    ({"base_model": "no-such-model"}, "no-such-model"),
])
def test_a_refusal_found_against_the_models_names_the_recipe(zoo, tmp_path, capsys, command, change, mention):
    recipe = _write(tmp_path, _recipe(zoo) | change)
    out = tmp_path / ("out" if command == "merge" else "out.yml")
    assert main([command, str(recipe), str(out)]) == 3
    err = capsys.readouterr().err
    assert f"{recipe}: " in err and mention in err
    assert not out.exists()


def test_missing_weight(zoo, tmp_path, capsys):
    recipe = _recipe(zoo)
    del recipe["models"][0]["parameters"]["weight"]
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "weight", str(zoo["m1"]))


def test_invalid_yaml(tmp_path, capsys):
    _run_fail(capsys, tmp_path, _write(tmp_path, "merge_method: [ties\n"), "recipe.yml")


def test_output_exists_refused_unless_overwrite(zoo, tmp_path, capsys):
    recipe = _write(tmp_path, _recipe(zoo))
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["merge", str(recipe), str(out)]) != 0
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    # a directory of the user's own files is not replaced by --overwrite alone ...
    assert main(["merge", str(recipe), str(out), "--overwrite"]) != 0
    assert "hm3 did not write" in capsys.readouterr().err and (out / "keep.txt").read_text() == "user data"
    # ... only with --force; what hm3 wrote (its marker) or an empty directory is replaced with --overwrite
    assert main(["merge", str(recipe), str(out), "--overwrite", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists() and (out / ".hm3-output").exists()
    assert main(["merge", str(recipe), str(out), "--overwrite"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", str(recipe), str(empty), "--overwrite"]) == 0


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["base", "base/sub", "parent", "recipe dir", "symlink"])
def test_output_over_an_input_is_refused_even_with_force(zoo, tmp_path, capsys, where):
    """``hm3 merge R.yml BASE_DIR --overwrite --force`` and its kin: the output is, lies inside, or
    contains an input (or reaches one through a symlink); refused, the input untouched."""
    import shutil

    base = tmp_path / "models" / "base"
    shutil.copytree(zoo["base"], base)
    data = _recipe(zoo) | {"base_model": str(base)}
    recipe = tmp_path / "recipes" / "r.yml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump(data))
    if where == "symlink":
        (tmp_path / "link").symlink_to(base)
    out = {"base": base, "base/sub": base / "sub", "parent": tmp_path / "models", "recipe dir": recipe.parent,
           "symlink": tmp_path / "link"}[where]
    before = _snapshot(tmp_path / "models")
    assert main(["merge", str(recipe), str(out), "--overwrite", "--force"]) != 0
    err = capsys.readouterr().err
    assert "an input of this command" in err and "Traceback" not in err
    assert _snapshot(tmp_path / "models") == before and recipe.is_file()
    assert not [p for p in tmp_path.rglob(".*tmp-*")], "staging left behind"


def test_console_script_exit_code(zoo, tmp_path):
    """The installed `hm3` command itself exits non-zero without a traceback."""
    exe = Path(sys.executable).parent / "hm3"
    proc = subprocess.run([str(exe), "merge", str(tmp_path / "missing.yml"), str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode != 0 and "missing.yml" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("flags", "code", "mention"),
    [
        (["--device", "bogus"], ExitCode.USAGE, "argument --device: 'bogus' is not a device"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], ExitCode.ENVIRONMENT,
         "hm3: error: --device 'cuda"),
        (["--device", "meta"], ExitCode.USAGE, "use cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], ExitCode.USAGE, "use cpu, cuda or cuda:N"),
        (["--threads", "-1"], ExitCode.USAGE, "argument --threads: must be a positive number"),
        (["--threads", "0"], ExitCode.USAGE, "argument --threads: must be a positive number"),
        (["--threads", "two"], ExitCode.USAGE, "argument --threads: 'two' is not a whole number"),
    ],
)
def test_bad_device_or_threads_is_a_message_not_a_traceback(zoo, tmp_path, capsys, flags, code, mention):
    recipe = _write(tmp_path, _recipe(zoo))
    assert main(["merge", str(recipe), str(tmp_path / "out"), *flags]) == code
    err = capsys.readouterr().err
    assert mention in err and "Traceback" not in err
    assert err.count("\n") == 1 or code == ExitCode.USAGE  # argparse shows the usage above its message
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_base_without_tokenizer_files_gives_a_warning(zoo, tmp_path):
    """The merged model gets its tokenizer from the base; without one there, the output has none and
    generating with it fails later: the command says so, and still writes the model."""
    recipe = _write(tmp_path, _recipe(zoo))
    exe = Path(sys.executable).parent / "hm3"
    proc = subprocess.run([str(exe), "merge", str(recipe), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "hm3: warning:" in proc.stderr and "no tokenizer files" in proc.stderr and str(zoo["base"]) in proc.stderr
    assert (tmp_path / "out" / "config.json").is_file()


def test_export_mergekit_refuses_to_write_over_its_recipe(zoo, tmp_path, capsys):
    recipe = _write(tmp_path, _recipe(zoo))
    before = recipe.read_bytes()
    assert main(["export-mergekit", str(recipe), str(recipe), "--overwrite"]) != 0
    assert "an input of this command" in capsys.readouterr().err and recipe.read_bytes() == before
    assert main(["export-mergekit", str(recipe), str(zoo["base"] / "x.yml")]) != 0
    assert not (zoo["base"] / "x.yml").exists()


@pytest.mark.parametrize(("models", "change", "mentions"), [
    (["m1", "m2"], {}, ["'slerp'", "exactly 1 model besides base_model", "lists 2 besides base_model"]),
    (["m1", "m2"], {"base_model": None}, ["'slerp'", "needs 'base_model'"]),
    (["m1"], {"parameters": {"t": 1.5}}, ["'t'", "must lie in [0, 1], got 1.5"]),
    (["m1"], {"parameters": {}}, ["missing required parameter 't'"]),
])
def test_slerp_bad_input_is_refused_by_name(zoo, tmp_path, capsys, models, change, mentions):
    recipe = {"merge_method": "slerp", "base_model": str(zoo["base"]), "models": [{"model": str(zoo[m])} for m in models],
              "parameters": {"t": 0.5}} | change
    _run_fail(capsys, tmp_path, _write(tmp_path, {k: v for k, v in recipe.items() if v is not None}), *mentions)


def test_model_stock_with_one_model_is_refused(zoo, tmp_path, capsys):
    recipe = {"merge_method": "model_stock", "base_model": str(zoo["base"]), "models": [{"model": str(zoo["m1"])}]}
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "'model_stock' merges at least 2 models besides base_model",
              "lists 1 besides base_model")


def test_della_probabilities_outside_zero_one_are_refused_before_merging(zoo, tmp_path, capsys):
    recipe = _recipe(zoo, "della_linear")
    recipe["models"][1]["parameters"]["density"] = [0.5, 0.9]  # layer 1 of 2: density 0.9 with epsilon 0.15
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "merge_method 'della_linear'", f"model '{zoo['m2']}'",
              "tensor model.layers.1.", "density ± epsilon must lie strictly between 0 and 1; got density 0.9, epsilon 0.15")


def test_nuslerp_with_three_models_is_refused(zoo, tmp_path, capsys):
    recipe = {"merge_method": "nuslerp",
              "models": [{"model": str(zoo[m]), "parameters": {"weight": 1.0}} for m in ("base", "m1", "m2")]}
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "'nuslerp' merges exactly 2 models;", "'models' lists 3:")


def test_export_mergekit_names_the_models_that_store_a_copy_of_their_tied_head(tmp_path, capsys):
    """hm3 merges a stored copy of a tied head as the one tensor it is; mergekit merges it apart under its own
    drop mask. The exported config says so, naming the model that stores it, for a method with drop masks only
    (without one, mergekit's head is merged exactly as its embedding)."""
    base = build_random_llama(tmp_path / "base", hidden_size=32, num_layers=2, vocab_size=64, seed=0,
                              tie_word_embeddings=True)
    plain = build_finetuned_variant(base, tmp_path / "plain", seed=1)
    stored = build_finetuned_variant(base, tmp_path / "stored", seed=2)
    state = load_file(stored / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, stored / "model.safetensors", metadata={"format": "pt"})

    def exported(method: str, expert: Path) -> str:
        recipe = {"merge_method": method, "base_model": str(base),
                  "models": [{"model": str(expert), "parameters": {"weight": 0.5, "density": 0.5}}]}
        assert main(["export-mergekit", str(_write(tmp_path, recipe)), "-"]) == ExitCode.OK
        return capsys.readouterr().out

    text = exported("dare_ties", stored)
    assert f"also store it: {stored}." in text and "its merged head differs from its merged embedding" in text
    assert "also store it" not in exported("dare_ties", plain)
    assert "also store it" not in exported("ties", stored)


def test_multislerp_weights_that_sum_to_zero_are_refused_before_writing(zoo, tmp_path, capsys):
    """Normalising weights that sum to 0 divides by 0: every tensor would be NaN, so nothing is written."""
    recipe = {"merge_method": "multislerp", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo["m1"]), "parameters": {"weight": 1.0}},
                         {"model": str(zoo["m2"]), "parameters": {"weight": -1.0}}]}
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "recipe.yml", "multislerp with normalize_weights",
              "the model weights sum to 0")


@pytest.mark.parametrize(("method", "name", "extra"), [("ramplus_tl", "r", {}), ("nearswap", "t", {"t": 0.01})])
def test_a_method_wide_parameter_set_per_model_is_named_as_unused(zoo, tmp_path, capsys, method, name, extra):
    """A method reads ``r`` or ``t`` from the recipe's (or a slice's) parameters only: set on a model it changes
    nothing, so the merge says so rather than ignoring it in silence."""
    models = ["m1", "m2"] if method == "ramplus_tl" else ["m1"]
    recipe = {"merge_method": method, "base_model": str(zoo["base"]), "parameters": extra,
              "models": [{"model": str(zoo[m])} for m in models]}
    recipe["models"][-1]["parameters"] = {name: 0.5}
    assert main(["merge", "-q", str(_write(tmp_path, recipe)), str(tmp_path / "out")]) == ExitCode.OK
    err = capsys.readouterr().err
    where = f"models[{len(models) - 1}] ({zoo[models[-1]]}).parameters.{name}"
    assert f"{where} is not used per model by merge_method {method!r}" in err, err


def test_parameters_given_to_the_base_listed_among_the_models_are_named_as_unused(zoo, tmp_path, capsys):
    """A method that takes a base drops it from the models it merges (mergekit's rule), so a weight set on it
    changes nothing: the merge names it. Listing the base with no parameters stays quiet (mergekit's idiom)."""
    recipe = {"merge_method": "multislerp", "base_model": str(zoo["base"]),
              "models": [{"model": str(zoo[m]), "parameters": {"weight": 0.5}} for m in ("base", "m1", "m2")]}
    assert main(["merge", "-q", str(_write(tmp_path, recipe)), str(tmp_path / "a")]) == ExitCode.OK
    err = capsys.readouterr().err
    assert (f"models[0] ({zoo['base']}) is base_model, which merge_method 'multislerp' does not merge as a model: "
            "its parameters (weight) are not used") in err, err
    del recipe["models"][0]["parameters"]
    assert main(["merge", "-q", str(_write(tmp_path, recipe)), str(tmp_path / "b")]) == ExitCode.OK
    assert "is base_model" not in capsys.readouterr().err


def test_multislerp_with_an_eps_as_large_as_the_directions_names_eps(zoo, tmp_path, capsys):
    """An eps far above the task vectors' norms shrinks their unit directions below eps: the refusal names eps and
    its value as a cause, not only the weights, and the half-written output is removed."""
    third = build_finetuned_variant(zoo["base"], tmp_path / "m3", seed=3, scale=0.05)
    recipe = {"merge_method": "multislerp", "base_model": str(zoo["base"]), "parameters": {"eps": 1000.0},
              "models": [{"model": str(m), "parameters": {"weight": 0.3}} for m in (zoo["m1"], zoo["m2"], third)]}
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "recipe.yml: tensor 'lm_head.weight'", "below eps 1000",
              "change the weights or eps")


_OWN_PARAMETERS = {"multislerp": {"weight": 0.5}, "ties": {"weight": 0.5, "density": 0.5},
                   "dare_ties": {"weight": 0.5, "density": 0.5}}


@pytest.mark.parametrize("method", ["multislerp", "nearswap", "ram", "ramplus_tl", "arcee_fusion", "ties", "dare_ties"])
def test_a_bfloat16_base_under_float32_models_merges_to_the_bases_dtype(zoo, tmp_path, method):
    """Experts saved in float32 over a base stored in bfloat16 (no ``dtype``): the writer expects each tensor in
    its lead input's dtype, the base's, so every method with a base returns that dtype."""
    base = tmp_path / "base_bf16"
    shutil.copytree(zoo["base"], base)
    state = load_file(base / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in state.items()}, base / "model.safetensors", metadata={"format": "pt"})
    experts = ["m1"] if method in ("nearswap", "arcee_fusion") else ["m1", "m2"]
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(zoo[m]), "parameters": _OWN_PARAMETERS.get(method, {})} for m in experts]}
    if method == "nearswap":
        recipe["parameters"] = {"t": 0.01}
    assert main(["merge", "-q", str(_write(tmp_path, recipe)), str(tmp_path / "out")]) == ExitCode.OK
    merged = _load(tmp_path / "out")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert all(torch.isfinite(t).all() for t in merged.values())


@pytest.mark.parametrize(("recipe_change", "dtype"), [({"r": 1e40, "alpha": 1.0}, None), ({"r": 1e7, "alpha": 1.0}, "float16")])
def test_a_merge_whose_parameters_overflow_a_tensor_is_refused_naming_it(zoo, tmp_path, capsys, recipe_change, dtype):
    """Finite inputs and finite parameters can still overflow (RAM+'s factor 1 + r·ρ past float32's range, or
    past float16's once rounded): the tensor is named and nothing is written, as for NaN or Inf in an input."""
    recipe = {"merge_method": "ramplus_tl", "base_model": str(zoo["base"]), "parameters": recipe_change,
              "models": [{"model": str(zoo[m])} for m in ("m1", "m2")]} | ({"dtype": dtype} if dtype else {})
    _run_fail(capsys, tmp_path, _write(tmp_path, recipe), "recipe.yml", "merge_method 'ramplus_tl' gave NaN/Inf in tensor")
