"""Models named by hub id (``org/name``, ``org/name@revision``) resolve through the local Hugging Face cache.

The cache is built in the test (tests/hub_cache.py) and checked with ``huggingface_hub``'s own
``scan_cache_dir``; every test runs offline (tests/conftest.py), as no test may reach a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hm3.checkpoint import open_checkpoint
from hm3.checkpoint.hub import HubRef, hub_cache_dir, is_hub_name, parse_hub_ref, resolve_model
from hm3.checkpoint.synthetic import build_random_llama
from hm3.cli import main
from hm3.errors import ConfigError, ExitCode
from tests.hub_cache import add_to_hub_cache

BASE, EXPERT, SHARDED = "hm3-zoo/micro-base", "hm3-zoo/micro-expert", "acme/sharded"
C0, C1, C2, C3 = ("0" * 39 + "a", "1" * 39 + "b", "2" * 39 + "c", "3" * 39 + "d")


@pytest.fixture(scope="module")
def hub(tmp_path_factory, micro_zoo_dir) -> dict[str, Path]:
    """An HF home whose hub cache holds the micro zoo's base (main), its math expert (main) and its code
    expert (tag v2) as two revisions of one model, and a sharded checkpoint (an index and its shards)."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf_home" / "hub"
    sharded = build_random_llama(root / "sharded", hidden_size=16, num_layers=2, vocab_size=32, sharded_bytes=8000)
    add_to_hub_cache(cache, BASE, micro_zoo_dir / "base", C0, refs=["main"])
    add_to_hub_cache(cache, EXPERT, micro_zoo_dir / "math", C1, refs=["main"])
    add_to_hub_cache(cache, EXPERT, micro_zoo_dir / "code", C2, refs=["v2"])
    add_to_hub_cache(cache, SHARDED, sharded, C3, refs=["main"])
    return {"root": root, "home": root / "hf_home", "cache": cache, "sharded": sharded, **{
        m: micro_zoo_dir / m for m in ("base", "math", "code")}}


@pytest.fixture
def offline(hub, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub["cache"]


def _snapshot(hub, repo_id: str, commit: str) -> Path:
    return hub["cache"] / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub["cache"])
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {BASE, EXPERT, SHARDED} and {r.repo_type for r in info.repos} == {"model"}
    revisions = {rev.commit_hash: set(rev.refs) for rev in repos[EXPERT].revisions}
    assert revisions == {C1: {"main"}, C2: {"v2"}}
    files = {f.file_name for rev in repos[EXPERT].revisions for f in rev.files}
    assert files == {p.name for p in hub["math"].iterdir()}
    assert len(next(iter(repos[SHARDED].revisions)).files) == len(list(hub["sharded"].iterdir()))


@pytest.mark.parametrize(("ref", "expected"), [
    ("org/name", HubRef("org/name")),
    ("Qwen/Qwen2.5-1.5B-Instruct", HubRef("Qwen/Qwen2.5-1.5B-Instruct")),
    ("org/name@v1.0", HubRef("org/name", "v1.0")),
    ("org/name@" + C1, HubRef("org/name", C1)),
    ("name", None),  # no namespace: a local folder more likely than a canonical hub model
    ("a/b/c", None),
    ("/abs/dir", None),
    ("./dir", None),
    ("../dir", None),
    ("~/dir", None),
    ("org/name@", None),
    ("org/name@a@b", None),
    ("org/na--me", None),  # the hub forbids '--' and '..'
])
def test_what_counts_as_a_hub_id(ref, expected):
    assert parse_hub_ref(ref) == expected


@pytest.mark.parametrize(("ref", "repo_id", "commit"), [
    (BASE, BASE, C0),
    (EXPERT, EXPERT, C1),  # main
    (f"{EXPERT}@main", EXPERT, C1),
    (f"{EXPERT}@v2", EXPERT, C2),  # a tag
    (f"{EXPERT}@{C2}", EXPERT, C2),  # a commit
])
def test_a_hub_id_resolves_to_its_revisions_snapshot(hub, offline, ref, repo_id, commit):
    assert resolve_model(ref) == _snapshot(hub, repo_id, commit)
    assert is_hub_name(ref)


def test_a_sharded_snapshot_reads_through_its_links_to_the_blobs(hub, offline):
    snapshot = resolve_model(SHARDED)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    with open_checkpoint(snapshot) as ckpt:
        theirs = _tensors(hub["sharded"])
        assert sorted(ckpt.tensor_names()) == sorted(theirs)
        assert len({ckpt.shard_of(name) for name in theirs}) > 1
        for name in theirs:
            assert torch.equal(ckpt.get(name), theirs[name]), name


def test_hf_home_gives_the_cache_when_hf_hub_cache_is_unset(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(hub["home"]))
    assert hub_cache_dir() == hub["cache"]
    assert resolve_model(f"{EXPERT}@v2") == _snapshot(hub, EXPERT, C2)


def test_without_either_variable_the_cache_is_huggingface_hubs_default(hub, monkeypatch):
    from huggingface_hub import constants

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    assert hub_cache_dir() == hub["cache"] and resolve_model(BASE) == _snapshot(hub, BASE, C0)


def test_hf_hub_offline_set_after_huggingface_hub_was_imported_keeps_hm3_off_the_network(hub, monkeypatch):
    from huggingface_hub import HfApi, constants

    def no_network(*args, **kwargs):
        raise AssertionError("a hub request was made")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported while online
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(HfApi, "repo_info", no_network)
    monkeypatch.setattr(HfApi, "list_repo_tree", no_network)
    assert resolve_model(f"{EXPERT}@v2") == _snapshot(hub, EXPERT, C2)
    with pytest.raises(ConfigError, match="downloading is off"):
        resolve_model("acme/nowhere")


def test_a_local_directory_wins_over_the_hub(hub, offline, tmp_path, monkeypatch):
    local = tmp_path / "hm3-zoo" / "micro-base"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(BASE) == Path(BASE) and not is_hub_name(BASE)
    monkeypatch.chdir(hub["root"])
    assert resolve_model(BASE, config_dir=tmp_path) == local and not is_hub_name(BASE, tmp_path)
    assert resolve_model(BASE) == _snapshot(hub, BASE, C0)


def test_a_model_in_no_cache_names_every_place_tried_and_that_downloading_is_off(offline, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_model("acme/nowhere", config_dir=tmp_path)
    message = str(err.value)
    for part in ("'acme/nowhere' not found", "acme/nowhere,", str(tmp_path / "acme" / "nowhere"),
                 f"not in the HF cache {offline}", "downloading is off (HF_HUB_OFFLINE)"):
        assert part in message, message


def test_a_revision_not_in_the_cache_is_named_with_the_revisions_that_are(offline):
    with pytest.raises(ConfigError) as err:
        resolve_model(f"{EXPERT}@v9")
    message = str(err.value)
    assert f"holds '{EXPERT}' but not at revision 'v9'" in message, message
    assert f"main -> {C1[:12]}" in message and f"v2 -> {C2[:12]}" in message, message
    assert "downloading is off" in message


def test_with_downloads_allowed_the_error_says_so_and_why_the_download_failed(hub, monkeypatch):
    """Online, with a hub endpoint that refuses connections at once (nothing leaves the machine)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConfigError) as err:
        resolve_model("acme/nowhere")
    message = str(err.value)
    assert "not in the HF cache" in message and "downloading was allowed (" in message, message
    assert resolve_model(f"{EXPERT}@v2") == _snapshot(hub, EXPERT, C2)  # the hub unreachable: the cache serves


def test_a_path_that_is_no_hub_id_is_refused_as_a_path(offline, tmp_path):
    with pytest.raises(ConfigError, match=r"model 'a/b/c' not found \(looked in a/b/c, .*\); it is not a hub id"):
        resolve_model("a/b/c", config_dir=tmp_path)


# --- where hm3 reads models ------------------------------------------------------------------------------


def _recipe(base: str, first: str, second: str) -> dict:
    return {"merge_method": "ties", "base_model": base, "dtype": "float32",
            "models": [{"model": first, "parameters": {"weight": 0.7, "density": 0.6}},
                       {"model": second, "parameters": {"weight": 0.4, "density": 0.5}}]}


@pytest.mark.parametrize("spelling", [
    (BASE, EXPERT, f"{EXPERT}@v2"),
    (f"{BASE}@main", f"{EXPERT}@{C1}", f"{EXPERT}@{C2}"),
])
def test_a_recipe_naming_hub_models_merges_as_the_same_recipe_by_path(hub, offline, tmp_path, spelling):
    by_path = tmp_path / "by_path.yml"
    by_path.write_text(yaml.safe_dump(_recipe(str(hub["base"]), str(hub["math"]), str(hub["code"]))))
    by_hub = tmp_path / "by_hub.yml"
    by_hub.write_text(yaml.safe_dump(_recipe(*spelling)))
    assert main(["merge", str(by_path), str(tmp_path / "a")]) == 0
    assert main(["merge", str(by_hub), str(tmp_path / "b")]) == 0
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], _tensors(hub["math"])[k]) for k in a)  # a real merge of both experts
    assert yaml.safe_load((tmp_path / "b" / "hm3_recipe.yml").read_text())["base_model"] == spelling[0]
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (hub["base"] / "tokenizer.json").read_bytes()


def test_merging_a_revision_the_cache_lacks_fails_naming_it(hub, offline, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_recipe(BASE, EXPERT, f"{EXPERT}@v3")))
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "not at revision 'v3'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_run_config_file_names_hub_models_and_keeps_their_snapshots(hub, offline, tmp_path):
    from hm3.overrides import load_config
    from hm3.search.run_config import parse_run_config

    config = {"models": {"base": BASE, "math": EXPERT, "code": f"{EXPERT}@v2"},
              "objectives": ["zoo:math", "zoo:code"],
              "search_space": {"base_model": "base", "models": ["math", "code"]}}
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path, parse_run_config)
    assert cfg.models == {"base": str(_snapshot(hub, BASE, C0)), "math": str(_snapshot(hub, EXPERT, C1)),
                          "code": str(_snapshot(hub, EXPERT, C2))}
    assert parse_run_config(cfg.canonical()) == cfg  # the stored config reads back without the hub
    config["models"]["code"] = f"{EXPERT}@v7"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"^{path}: models\.code: model '{EXPERT}@v7' not found: .*'v7'"):
        load_config(path, parse_run_config)


def test_eval_scores_a_hub_model_as_its_directory(hub, offline, capsys):
    args = ["--objectives", "zoo:code", "--limit", "2", "--json"]
    assert main(["eval", str(hub["code"]), *args]) == 0
    by_path = json.loads(capsys.readouterr().out)
    assert main(["eval", f"{EXPERT}@v2", *args]) == 0
    by_hub = json.loads(capsys.readouterr().out)
    assert by_hub["model"] == str(_snapshot(hub, EXPERT, C2))
    assert [r["score"] for r in by_hub["results"]] == [r["score"] for r in by_path["results"]]
    assert main(["eval", "hm3-zoo/absent", *args]) == ExitCode.BAD_INPUT
    assert "'hm3-zoo/absent' not found" in capsys.readouterr().err
