"""The planner on its own: which Fisher files a recipe names and where they are found, the refusals of
a recipe that gives them wrongly, and the per-(seed, tensor, model) DARE generators."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.config import parse_merge_config
from hm3.errors import ConfigError
from hm3.merge.plan import dare_generator, plan_merge


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    base = build_random_llama(root / "base", hidden_size=16, num_layers=1, vocab_size=32, seed=0)
    out = {"root": root, "base": base}
    for i in (1, 2):
        out[f"m{i}"] = build_finetuned_variant(base, root / f"m{i}", seed=i, scale=0.05)
        save_file({"x": torch.ones(1)}, root / f"f{i}.safetensors")
    return out


def _recipe(family, method: str, fishers: list[object | None]) -> dict:
    models = []
    for i, fisher in zip((1, 2), fishers, strict=True):
        params: dict = {"weight": 0.5}
        if fisher is not None:
            params["fisher"] = fisher
        models.append({"model": str(family[f"m{i}"]), "parameters": params})
    base = {} if method == "linear" else {"base_model": str(family["base"])}  # linear merges the listed models
    return {"merge_method": method, **base, "models": models}


def _plan(family, method: str, fishers: list[object | None], config_dir: Path | None = None):
    return plan_merge(parse_merge_config(_recipe(family, method, fishers)), config_dir=config_dir)


def test_fisher_files_are_found_as_given_or_next_to_the_config_in_model_order(family):
    absolute = [str(family["root"] / "f1.safetensors"), str(family["root"] / "f2.safetensors")]
    plan = _plan(family, "df_merge", absolute)
    assert plan.fisher_files == [Path(p) for p in absolute]
    plan.close()
    plan = _plan(family, "df_merge", ["f2.safetensors", "f1.safetensors"], config_dir=family["root"])
    assert plan.fisher_files == [family["root"] / "f2.safetensors", family["root"] / "f1.safetensors"]
    plan.close()
    plan = _plan(family, "task_arithmetic", [None, None])  # none given, none needed
    assert plan.fisher_files is None
    plan.close()


@pytest.mark.parametrize(("method", "fishers", "message"), [
    ("df_merge", [None, None], "^merge_method 'df_merge' needs a 'fisher' file for every model$"),
    ("linear", ["f1.safetensors", "f2.safetensors"], "^merge_method 'linear' does not take 'fisher' parameters$"),
    ("df_merge", ["f1.safetensors", None],
     "^'fisher' is given for some models but not for .*m2: give all or none$"),
    ("df_merge", ["f1.safetensors", 3], r"^model '.*m2': 'fisher' must be a path to a safetensors file, got 3$"),
    ("df_merge", ["f1.safetensors", "nope.safetensors"],
     r"^model '.*m2': Fisher file not found: nope.safetensors$"),
])
def test_fisher_files_given_wrongly_are_refused_by_model(family, method, fishers, message):
    with pytest.raises(ConfigError, match=message):
        _plan(family, method, fishers, config_dir=family["root"])


def test_dare_generators_depend_on_seed_tensor_and_model_only():
    def draw(seed: int, name: str, model: int) -> torch.Tensor:
        return torch.rand(8, generator=dare_generator(seed, name, model))

    assert torch.equal(draw(3, "a.weight", 0), draw(3, "a.weight", 0))  # the same triple: the same draw
    others = [draw(4, "a.weight", 0), draw(3, "b.weight", 0), draw(3, "a.weight", 1)]
    assert all(not torch.equal(draw(3, "a.weight", 0), o) for o in others)
    # the seed is the first 8 bytes of sha256("seed/tensor/model"), read little-endian, without the top bit
    import hashlib

    digest = hashlib.sha256(b"3/a.weight/0").digest()
    expected = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    assert torch.equal(draw(3, "a.weight", 0), torch.rand(8, generator=expected))
