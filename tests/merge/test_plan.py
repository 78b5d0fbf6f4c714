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
from hm3.merge.plan import SourceTensor, dare_generator, plan_merge


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


# --- resolve_jobs: every parameter of every tensor, from the recipe alone ---------------------------------------

NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.2.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight"]


def _jobs(method: str, parameters: dict | None, weights: list, **extra) -> dict[str, object]:
    from hm3.merge.methods import get_method
    from hm3.merge.plan import resolve_jobs

    recipe = {"merge_method": method, "models": [{"model": f"m{i}", "parameters": {"weight": w}}
                                                 for i, w in enumerate(weights)], **extra}
    if parameters:
        recipe["parameters"] = parameters
    config = parse_merge_config(recipe)
    jobs = resolve_jobs(config, get_method(method), tensor_names=NAMES, num_layers=3,
                        input_refs=[m.model for m in config.models])
    return {job.name: job for job in jobs}


def test_global_parameters_follow_tensor_filters_and_depth_gradients():
    jobs = _jobs("task_arithmetic", {"lambda": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 2.0}]}, [1, 1],
                 base_model="b")
    assert [jobs[n].layer for n in NAMES] == [None, 0, 0, 2, 2]
    # mlp tensors: the gradient at t = layer / 2; the rest: the unfiltered value
    assert [jobs[n].params["lambda"] for n in NAMES] == [2.0, 0.0, 2.0, 1.0, 2.0]


def test_per_model_parameters_follow_tensor_filters():
    from hm3.merge.methods import get_method
    from hm3.merge.plan import resolve_jobs

    config = parse_merge_config({"merge_method": "task_arithmetic", "base_model": "b", "models": [
        {"model": "m0", "parameters": {"weight": [{"filter": "self_attn", "value": 0.25}, {"value": [1.0, 0.0]}]}},
        {"model": "m1", "parameters": {"weight": 0.5}}]})
    jobs = {j.name: j for j in resolve_jobs(config, get_method("task_arithmetic"), tensor_names=NAMES, num_layers=3,
                                            input_refs=["m0", "m1"])}
    assert [jobs[n].model_params[0]["weight"] for n in NAMES] == [1.0, 1.0, 0.25, 0.0, 0.25]
    assert all(jobs[n].model_params[1]["weight"] == 0.5 for n in NAMES)


def test_values_are_read_by_their_parameters_types_as_mergekit_reads_them():
    """PyYAML reads ``5e-1`` (no dot) as a string; mergekit 0.1.5 reads each value (and each gradient end) of a number
    parameter as its type, so such a recipe merges there and means the same here."""
    import yaml

    from hm3.merge.methods import get_method
    from hm3.merge.plan import resolve_jobs

    config = parse_merge_config(yaml.safe_load("""
        merge_method: ties
        base_model: b
        models:
          - {model: m0, parameters: {weight: 5e-1, density: [1e-1, 0.5]}}
          - {model: m1, parameters: {weight: 1, density: "1"}}
        parameters: {lambda: [2, 2]}
    """))
    jobs = {j.name: j for j in resolve_jobs(config, get_method("ties"), tensor_names=NAMES, num_layers=3,
                                            input_refs=["m0", "m1"])}
    assert [jobs[n].model_params[0]["density"] for n in NAMES] == [0.1, 0.1, 0.1, 0.5, 0.5]
    assert all(jobs[n].model_params[0]["weight"] == 0.5 and jobs[n].model_params[1]["density"] == 1.0
               for n in NAMES)
    assert all(jobs[n].params["lambda"] == 2.0 for n in NAMES)
    karcher = parse_merge_config({"merge_method": "karcher", "models": [{"model": "m0", "parameters": {"weight": 1}},
                                                                        {"model": "m1", "parameters": {"weight": 1}}],
                                  "parameters": {"max_iter": [5, 5], "tol": "1e-6"}})
    job = resolve_jobs(karcher, get_method("karcher"), tensor_names=NAMES[:1], num_layers=3,
                       input_refs=["m0", "m1"])[0]
    assert job.params["max_iter"] == 5 and job.params["tol"] == 1e-6
    with pytest.raises(ConfigError, match="parameter 'weight' .* must be a number, got 'half'"):
        _jobs("linear", None, ["half", 1])
    with pytest.raises(ConfigError, match="parameter 'lambda' .* must be a number, got 'nan'"):
        _jobs("task_arithmetic", yaml.safe_load("lambda: nan"), [1, 1], base_model="b")  # finite numbers only


def test_only_a_normalised_linear_merge_refuses_weights_that_sum_to_zero():
    with pytest.raises(ConfigError, match=r"^linear with normalize: the model weights sum to 0 \(tensor model\.embed_tokens\.weight\)$"):
        _jobs("linear", None, [0.5, -0.5])
    assert _jobs("linear", {"normalize": False}, [0.5, -0.5])  # nothing divides by the sum
    assert _jobs("task_arithmetic", {"normalize": True}, [0.5, -0.5], base_model="b")  # not a linear merge


def test_multislerp_with_normalized_weights_refuses_weights_that_sum_to_zero():
    """Dividing the weights by a zero sum makes every merged tensor NaN: refused by tensor and depth."""
    with pytest.raises(ConfigError, match="^multislerp with normalize_weights: the model weights sum to 0 "
                                          r"\(tensor model\.layers\.2\.mlp\.up_proj\.weight\)$"):
        _jobs("multislerp", None, [1.0, [0.0, -1.0]], base_model="b")
    assert _jobs("multislerp", {"normalize_weights": False}, [0.5, -0.5])  # nothing divides by the sum


# --- plan_merge: dtypes, tokenizer source, seed, inputs ---------------------------------------------------------


def _plan_of(family, **extra):
    recipe = _recipe(family, "task_arithmetic", [None, None]) | extra
    return plan_merge(parse_merge_config(recipe))


def test_dtypes_are_parsed_and_the_output_config_says_the_output_dtype(family):
    plan = _plan_of(family, dtype="float32", out_dtype="bfloat16")
    assert (plan.compute_dtype, plan.out_dtype) == (torch.float32, torch.bfloat16)
    assert plan.output_config["torch_dtype"] == "bfloat16"
    assert [c.path for c in plan.checkpoints] == [family["base"], family["m1"], family["m2"]]
    assert plan.reference is plan.checkpoints[0]  # the base: the output's config and tokenizer come from it
    assert {job.name for job in plan.jobs} == set(plan.reference.tensor_names())
    for job in plan.jobs:  # every job reads its own name from the base and from each input, in the recipe's order
        assert job.base == SourceTensor(0, job.name) and job.inputs == (SourceTensor(1, job.name),
                                                                        SourceTensor(2, job.name))
    plan.close()
    plan = _plan_of(family, dtype="float16")  # no out_dtype: the output is written in the compute dtype
    assert plan.out_dtype == torch.float16 and plan.output_config["torch_dtype"] == "float16"
    plan.close()
    plan = _plan_of(family)
    assert plan.compute_dtype is None and plan.output_config.get("torch_dtype") == plan.reference.config.get(
        "torch_dtype")
    plan.close()
    with pytest.raises(ConfigError, match="^'out_dtype': unknown dtype 'float8'"):
        _plan_of(family, out_dtype="float8")
    with pytest.raises(ConfigError, match="^'dtype': unknown dtype 'half'"):
        _plan_of(family, dtype="half")


def test_base_over_models_without_tokenizers_plans_as_without_one_and_union_needs_the_base_tokenizer(family):
    """(Vocabularies that differ: tests/merge/test_tokenizers.py.)"""
    plan = _plan_of(family, tokenizer_source="base")
    assert plan.tokenizer is None and all(job.rows is None for job in plan.jobs)
    plan.close()
    with pytest.raises(ConfigError, match="^tokenizer_source 'union': the base model .* has no tokenizer files"):
        _plan_of(family, tokenizer_source="union")


def test_the_seed_is_the_callers_then_the_recipes_then_the_default(family):
    from hm3.merge.plan import DEFAULT_SEED

    recipe = parse_merge_config(_recipe(family, "task_arithmetic", [None, None]) | {"seed": 7})
    for seed, expected in ((3, 3), (None, 7)):
        plan = plan_merge(recipe, seed=seed)
        assert plan.seed == expected
        plan.close()
    plan = _plan_of(family)
    assert plan.seed == DEFAULT_SEED
    plan.close()


def test_an_unknown_parameter_is_refused_with_every_parameter_the_method_knows():
    """A typo is named with the method's whole parameter list, so the user sees the right spelling."""
    from hm3.merge.plan import plan_merge

    for recipe, message in [
        ({"merge_method": "linear", "models": [{"model": "m0", "parameters": {"weight": 1, "wieght": 2}}]},
         "unknown parameter 'models[0] (m0).parameters.wieght' for merge_method 'linear'; known: normalize, weight"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "m0", "parameters": {"weight": 1}}],
          "parameters": {"lamda": 1}},
         "unknown parameter 'parameters.lamda' for merge_method 'ties'; known: density, fisher, int8_mask, lambda, "
         "normalize, rescale, rescale_mode, weight"),
    ]:
        with pytest.raises(ConfigError) as err:
            plan_merge(parse_merge_config(recipe))
        assert str(err.value) == message


def test_a_jobs_lead_is_its_base_else_its_first_input():
    """The output takes the lead's shape and dtype (with no dtype in the recipe): the base where the method has
    one, even when the first model is stored in another dtype, else the first model."""
    from hm3.merge.plan import TensorJob

    base, first, second = SourceTensor(0, "w"), SourceTensor(1, "w"), SourceTensor(2, "w")
    with_base = TensorJob(name="w", layer=None, params={}, model_params=({}, {}), base=base, inputs=(first, second))
    without = TensorJob(name="w", layer=None, params={}, model_params=({}, {}), inputs=(first, second))
    assert with_base.lead == base and without.lead == first
