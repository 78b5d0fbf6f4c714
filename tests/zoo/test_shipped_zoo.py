"""The micro zoo that ships with hm3: verified on load, portable scores, and the commands that expose it."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import hm3.zoo.shipped as shipped
from hm3.cli import main
from hm3.errors import ConfigError, ExitCode
from hm3.zoo.build import MODELS, ZooManifest, quality_bar, score_models, ties_state
from objectives.zoo import ZOO_TASKS

TOLERANCE = 0.02  # greedy float32 on another CPU may flip a few answers out of 200


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """A writable copy of the shipped zoos' root, installed as the root the package reads."""
    root = tmp_path / "shipped"
    shutil.copytree(shipped.SHIPPED_ROOT, root)
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", root)
    monkeypatch.setattr(shipped, "_verified", set())
    return root / "micro"


def test_the_shipped_zoo_is_complete_and_its_hashes_match(micro_zoo_dir):
    manifest = ZooManifest.read(micro_zoo_dir)
    assert manifest.files == shipped.file_hashes(micro_zoo_dir)
    assert {rel.split("/")[0] for rel in manifest.files} == set(MODELS)
    assert manifest.quality_bar["ok"]


def test_a_corrupted_weight_file_is_refused_naming_it(zoo_copy):
    target = zoo_copy / "math" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"math/model\.safetensors: content does not match"):
        shipped.shipped_zoo("micro")


def test_a_missing_or_extra_file_is_refused(zoo_copy):
    (zoo_copy / "code" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"code/config\.json: missing from the shipped zoo"):
        shipped.shipped_zoo("micro")
    shutil.copy(zoo_copy / "math" / "config.json", zoo_copy / "code" / "config.json")
    (zoo_copy / "base" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"base/notes\.txt: not part of the shipped zoo"):
        shipped.shipped_zoo("micro")


def test_an_edited_manifest_is_refused(zoo_copy):
    """zoo.json says which folder plays which role: swapping two is as wrong as swapping their weights."""
    manifest = json.loads((zoo_copy / "zoo.json").read_text())
    manifest["models"]["base"], manifest["models"]["math"] = "math", "base"
    (zoo_copy / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(ConfigError, match=r"zoo\.json: content does not match the shipped zoo's hash"):
        shipped.shipped_zoo("micro")


def test_unknown_builtin_names_and_old_formats_are_refused(zoo_copy, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown shipped zoo 'nano'; shipped zoos: micro"):
        shipped.resolve_zoo("builtin:nano")
    manifest = json.loads((zoo_copy / "zoo.json").read_text())
    manifest["format"] = 3
    (zoo_copy / "zoo.json").write_text(json.dumps(manifest))
    # an edited manifest is told to be restored: hm3 never writes into the shipped zoo, so no rebuild
    with pytest.raises(ConfigError, match="content does not match") as refused:
        shipped.shipped_zoo("micro")
    assert "reinstall hm3" in str(refused.value) and "zoo build" not in str(refused.value)
    # a package whose shipped zoo predates its zoo format (the digest matches): the format is named
    digest = hashlib.sha256((zoo_copy / "zoo.json").read_bytes()).hexdigest()
    monkeypatch.setitem(shipped.SHIPPED_MANIFEST_SHA256, "micro", digest)
    with pytest.raises(ConfigError, match="a zoo of format 3"):
        shipped.shipped_zoo("micro")
    assert shipped.resolve_zoo("zoo", base_dir=tmp_path) == tmp_path / "zoo"


def test_zoo_path_and_copy_commands(micro_zoo_dir, tmp_path, capsys):
    assert main(["zoo", "path", "micro"]) == 0
    assert capsys.readouterr().out.strip() == str(micro_zoo_dir)
    assert main(["zoo", "copy", "micro", str(tmp_path / "mine")]) == 0
    assert shipped.file_hashes(tmp_path / "mine") == ZooManifest.read(micro_zoo_dir).files
    assert main(["zoo", "copy", "micro", str(tmp_path / "mine")]) == ExitCode.BAD_INPUT  # never over a folder
    assert "already exists" in capsys.readouterr().err
    assert main(["zoo", "path", "tiny"]) == ExitCode.BAD_INPUT


def test_a_run_config_names_the_shipped_zoo(micro_zoo_dir):
    from hm3.search.run_config import parse_run_config

    config = parse_run_config({"zoo": "builtin:micro", "optimizer": {"name": "random", "budget": 2}})
    assert config.models["base"] == str(micro_zoo_dir / "base")
    assert config.objectives == [f"zoo:{t}" for t in ZOO_TASKS]


def test_the_shipped_scores_reproduce_on_this_machine_and_meet_the_bar(micro_zoo_dir):
    """Every score of the manifest within ±0.02 here (greedy float32), and the quality bar on these scores."""
    from hm3.eval.hf import HFBackend

    manifest = ZooManifest.read(micro_zoo_dir)
    n = manifest.spec["eval_examples"]
    states = {m: load_file(micro_zoo_dir / m / "model.safetensors") for m in MODELS}
    backend = HFBackend.from_pretrained(micro_zoo_dir / "base", batch_size=n)
    torch.set_num_threads(2)
    try:
        for split, stored in (("validation", manifest.scores_validation), ("test", manifest.scores_test)):
            measured = score_models(backend, states, split, n)
            for m in MODELS:
                for t in ZOO_TASKS:
                    assert measured[m][t] == pytest.approx(stored[m][t], abs=TOLERANCE), (split, m, t, measured)
            if split == "validation":
                validation = measured
        best = manifest.ties_best
        merged = ties_state(states["base"], [states[t] for t in ZOO_TASKS], best["weights"], best["density"])
        merge_scores = score_models(backend, {"merge": merged}, "validation", n)["merge"]
    finally:
        backend.close()
    for t in ZOO_TASKS:
        assert merge_scores[t] == pytest.approx(best[t], abs=TOLERANCE), (t, merge_scores)
    bar = quality_bar(validation, merge_scores)
    assert bar["ok"], bar


def test_no_output_is_written_into_the_shipped_zoo(zoo_copy, tmp_path, capsys):
    """A copy or a demo into the shipped zoo would fail its hashes forever after (or copy it into itself);
    a demo inside a zoo of one's own would change the zoo it reads."""
    assert main(["zoo", "copy", "micro", str(zoo_copy / "math" / "copy")]) == ExitCode.BAD_INPUT
    assert "lies inside the zoos shipped with hm3" in capsys.readouterr().err
    assert main(["demo", "--out", str(zoo_copy)]) == ExitCode.BAD_INPUT
    assert "lies inside the zoos shipped with hm3" in capsys.readouterr().err
    shipped._verified.clear()
    assert shipped.shipped_zoo("micro") == zoo_copy  # still complete, nothing added
    own = tmp_path / "own"
    shutil.copytree(zoo_copy, own)
    assert main(["demo", "--zoo", str(own), "--out", str(own / "demo")]) == ExitCode.BAD_INPUT
    assert "lies inside an input" in capsys.readouterr().err and not (own / "demo").exists()


def test_no_merge_is_written_beside_the_shipped_models(zoo_copy, tmp_path, capsys):
    """An output in the shipped zoos' folder that is no input of its command (a merge beside the models
    it merges) is refused as well: the next use of the zoo would fail its hashes."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {zoo_copy / 'math'}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {zoo_copy / 'code'}\n    parameters: {{weight: 0.5}}\n")
    assert main(["merge", str(recipe), str(zoo_copy / "merged")]) == ExitCode.BAD_INPUT
    assert "the zoos shipped with hm3" in capsys.readouterr().err
    assert main(["merge", str(recipe), str(tmp_path / "merged")]) == 0  # elsewhere: merged as usual
    shipped._verified.clear()
    assert shipped.shipped_zoo("micro") == zoo_copy
