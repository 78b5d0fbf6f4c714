"""SearchSpace: vector <-> recipe, layer-group filters, fixed coefficients, config errors."""

from __future__ import annotations

import pytest
import torch

from hm3.errors import ConfigError
from hm3.search.space import SearchSpace, layer_group_filters, parse_search_space

MODELS = ["expert_a", "expert_b", "expert_c"]


def _space(**kw) -> SearchSpace:
    return parse_search_space({"models": MODELS, "base_model": "base", **kw})


def test_dim_bounds_and_names():
    s = _space(weight_bounds=[[0, 1], [0, 2], [0.5, 1]])
    assert s.dim == 6 and s.merge_method == "dare_ties"
    assert s.bounds.shape == (2, 6)
    assert s.bounds[:, 1].tolist() == [0.0, 2.0]
    assert s.bounds[:, 3].tolist() == [0.1, 1.0]  # default density bounds
    assert s.param_names()[0] == "weight[expert_a][g0]" and s.param_names()[3] == "density[expert_a][g0]"
    fixed = _space(density=0.3, dare=False)
    assert fixed.dim == 3 and fixed.merge_method == "ties"


def test_to_recipe_maps_unit_cube_into_bounds():
    s = _space(weight_bounds=[[0, 1], [0, 2], [0.5, 1]], seed=7)
    recipe = s.to_recipe(torch.tensor([0.5, 0.5, 0.0, 0.0, 1.0, 0.5]))
    assert recipe["merge_method"] == "dare_ties" and recipe["base_model"] == "base" and recipe["seed"] == 7
    params = [m["parameters"] for m in recipe["models"]]
    assert [p["weight"] for p in params] == pytest.approx([0.5, 1.0, 0.5])
    assert [p["density"] for p in params] == pytest.approx([0.1, 1.0, 0.55])
    assert "parameters" not in recipe  # l1 rescale is mergekit's default: nothing hm3-only


def test_hm3_only_keys_appear_when_chosen():
    s = _space(rescale_mode="inverse", fisher=True, normalize=True)
    recipe = s.to_recipe(
        torch.full((6,), 0.5), fisher_paths=["fa.safetensors", "fb.safetensors", "fc.safetensors"]
    )
    assert recipe["parameters"] == {"normalize": True, "rescale_mode": "inverse"}
    assert recipe["models"][1]["parameters"]["fisher"] == "fb.safetensors"
    with pytest.raises(ConfigError, match="one Fisher file per model"):
        s.to_recipe(torch.full((6,), 0.5))
    df = _space(fisher=True, df_merge=True, dare=False)
    assert df.dim == 3
    r = df.to_recipe(torch.ones(3), fisher_paths=["a", "b", "c"])
    assert r["merge_method"] == "df_merge" and "density" not in r["models"][0]["parameters"]


def test_round_trip_plain_and_layer_groups():
    for s in (_space(), _space(layer_granularity=2, num_layers=4), _space(density=0.5, dare=False)):
        x = torch.rand(s.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert torch.allclose(s.from_recipe(s.to_recipe(x)), x, atol=1e-12)


def test_layer_group_filters():
    assert layer_group_filters(4, 2) == [["layers.0.", "layers.1."], ["layers.2.", "layers.3."]]
    assert layer_group_filters(3, 3) == [["layers.0.", "layers.1.", "layers.2."]]
    with pytest.raises(ConfigError, match="does not divide"):
        layer_group_filters(5, 2)


def test_layer_group_recipe_resolves_per_layer_in_mergekit():
    """mergekit itself (the oracle) must read the filters as one value per layer group."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration, evaluate_setting

    s = _space(layer_granularity=2, num_layers=12)
    assert s.n_groups == 6 and s.dim == 36
    x = torch.linspace(0, 1, s.dim, dtype=torch.float64)
    recipe = s.to_recipe(x)
    MergeConfiguration.model_validate(recipe)  # mergekit accepts the schema
    values = s.decode(x)
    weight_b = recipe["models"][1]["parameters"]["weight"]
    from mergekit.config import ConditionalParameter

    conds = [ConditionalParameter(**c) for c in weight_b]
    for layer in range(12):
        got = evaluate_setting(f"model.layers.{layer}.mlp.up_proj.weight", conds, validate=float)
        assert got == pytest.approx(values["weight"][1][layer // 2]), layer
    # outside the layers: the first group's value (mergekit's t = 0 rule)
    assert evaluate_setting("model.embed_tokens.weight", conds, validate=float) == pytest.approx(
        values["weight"][1][0]
    )


def test_fixed_coefficients_sets_weights_to_lambda():
    s = _space(layer_granularity=1, num_layers=2)
    x = s.fixed_coefficients([0.2, 0.3, 0.5])
    vals = s.decode(x)
    assert [w for row in vals["weight"] for w in row] == pytest.approx([0.2, 0.2, 0.3, 0.3, 0.5, 0.5])
    assert vals["density"][0] == pytest.approx([0.55, 0.55])  # middle of [0.1, 1]
    assert s.decode(s.fixed_coefficients([0.2, 0.3, 0.5], density=0.9))["density"][2] == pytest.approx(
        [0.9, 0.9]
    )
    with pytest.raises(ConfigError, match="one per model"):
        s.fixed_coefficients([0.5, 0.5])
    with pytest.raises(ConfigError, match="outside its bounds"):
        _space(weight_bounds=[0.0, 0.4]).fixed_coefficients([0.2, 0.3, 0.5])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"weight_bounds": [1.0, 0.0]}, "reversed"),
        ({"density_bounds": [[0.1, 1.0], [0.9, 0.2], [0.1, 1.0]]}, "density_bounds of 'expert_b'.*reversed"),
        ({"weight_bounds": [[0, 1], [0, 1]]}, "2 entries but there are 3 models"),
        ({"density_bounds": [0.0, 1.5]}, r"within \[0.0, 1.0\]"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"layer_granularity": 2}, "needs num_layers"),
        ({"layer_granularity": 3, "num_layers": 4}, "does not divide"),
        ({"df_merge": True}, "df_merge needs fisher"),
        ({"density": 0.0}, "density must lie"),
    ],
)
def test_invalid_spaces(extra, message):
    with pytest.raises(ConfigError, match=message):
        _space(**extra)


def test_invalid_points_and_foreign_recipes():
    s = _space()
    with pytest.raises(ConfigError, match="has 2 coordinates"):
        s.to_recipe([0.5, 0.5])
    with pytest.raises(ConfigError, match=r"density\[expert_a\]\[g0\] = 1.5"):
        s.to_recipe([0.5, 0.5, 0.5, 1.5, 0.5, 0.5])
    recipe = s.to_recipe(torch.full((6,), 0.5))
    with pytest.raises(ConfigError, match="models"):
        s.from_recipe({**recipe, "models": recipe["models"][:2]})
    with pytest.raises(ConfigError, match="merge_method"):
        s.from_recipe({**recipe, "merge_method": "ties"})
    wide = {**recipe, "models": [{"model": m, "parameters": {"weight": 3.0, "density": 0.5}} for m in MODELS]}
    with pytest.raises(ConfigError, match="outside its bounds"):
        s.from_recipe(wide)
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_search_space(["not", "a", "mapping"])
    with pytest.raises(ConfigError, match="base_model: required key is missing"):
        parse_search_space({"models": MODELS})


def test_recipes_are_valid_hm3_merge_configs():
    """The merge engine's own parser accepts every kind of recipe the space writes."""
    from hm3.config import parse_merge_config
    from hm3.merge.parameters import evaluate_setting, resolve

    spaces = [
        _space(),
        _space(rescale_mode="inverse", normalize=False, fisher=True),
        _space(layer_granularity=1, num_layers=3, dare=False),
        _space(fisher=True, df_merge=True, dare=False),
    ]
    for s in spaces:
        x = torch.full((s.dim,), 0.25, dtype=torch.float64)
        fishers = [f"{m}.fisher.safetensors" for m in MODELS] if s.fisher else None
        cfg = parse_merge_config(s.to_recipe(x, fisher_paths=fishers), source="recipe")
        assert cfg.merge_method == s.merge_method and [m.model for m in cfg.models] == MODELS
    layered = spaces[2]
    x = torch.linspace(0, 1, layered.dim, dtype=torch.float64)
    cfg = parse_merge_config(layered.to_recipe(x))
    expected = layered.decode(x)["weight"][2]
    for layer in range(3):
        got = resolve(
            cfg,
            "weight",
            tensor_name=f"model.layers.{layer}.self_attn.q_proj.weight",
            t=0.0,
            model="expert_c",
            default=None,
        )
        assert got == pytest.approx(expected[layer])
    assert evaluate_setting("lm_head.weight", cfg.models[2].parameters["weight"], 0.0) == pytest.approx(
        expected[0]
    )


# --- edges and messages that mutation testing found unchecked -----------------------------------------------


def test_layer_group_filters_of_the_smallest_model_and_refusals():
    assert layer_group_filters(1, 1) == [["layers.0."]]
    for layers, granularity in ((0, 1), (2, 0)):
        with pytest.raises(ConfigError, match=rf"^num_layers \({layers}\) and layer_granularity \({granularity}\) "
                                              r"must be >= 1$"):
            layer_group_filters(layers, granularity)


def test_a_fixed_density_space_names_only_weights():
    assert _space(density=0.3).param_names() == ["weight[expert_a][g0]", "weight[expert_b][g0]", "weight[expert_c][g0]"]


def test_encode_accepts_the_bounds_within_the_tolerance_and_clamps():
    s = _space(density=0.5, weight_bounds=[[0.0, 1.0], [0.0, 1.0], [0.5, 0.5]])  # the last bound is degenerate
    edge = 1e-9  # UNIT_TOLERANCE
    assert s.encode([[0.0], [1.0], [0.5]], None).tolist() == [0.0, 1.0, 0.0]
    assert s.encode([[-edge], [1.0 + edge], [0.5 + edge]], None).tolist() == [0.0, 1.0, 0.0]
    for outside in ([[-2 * edge], [1.0], [0.5]], [[0.0], [1.0 + 3 * edge], [0.5]]):
        with pytest.raises(ConfigError, match="lies outside its bounds"):
            s.encode(outside, None)


def test_encode_refusals_say_what_is_missing():
    s = _space()
    with pytest.raises(ConfigError, match="^this search space searches densities but none were given$"):
        s.encode([[0.5]] * 3, None)
    with pytest.raises(ConfigError, match="^got 5 coefficient values; this search space has 6$"):
        s.encode([[0.5]] * 3, [[0.5]] * 2)


def test_from_recipe_reads_a_parsed_merge_config_too():
    from hm3.config import parse_merge_config

    s = _space(layer_granularity=2, num_layers=4)
    x = torch.linspace(0, 1, s.dim, dtype=torch.float64)
    assert torch.allclose(s.from_recipe(parse_merge_config(s.to_recipe(x))), x, atol=1e-12)


def test_foreign_recipes_are_refused_naming_the_difference():
    s = _space(layer_granularity=2, num_layers=4)
    recipe = s.to_recipe(torch.full((s.dim,), 0.5))
    cases = [
        ({**recipe, "merge_method": "ties"}, "^recipe merge_method 'ties' is not this space's 'dare_ties'$"),
        ({**recipe, "base_model": "other"}, "^recipe base_model 'other' is not 'base'$"),
    ]
    no_weight = [dict(m, parameters={"density": 0.5}) for m in recipe["models"]]
    cases.append(({**recipe, "models": no_weight}, "^recipe model 'expert_a' has no weight$"))
    no_density = [dict(m, parameters={"weight": 0.5}) for m in recipe["models"]]
    cases.append(({**recipe, "models": no_density}, "^recipe model 'expert_a' has no density$"))
    split = [{"filter": "layers.0.", "value": 0.3}, {"filter": "layers.1.", "value": 0.5}, {"value": 0.4}]
    uneven = [dict(m, parameters={"weight": split, "density": 0.5}) for m in recipe["models"]]
    cases.append(({**recipe, "models": uneven}, r"^models\[expert_a\].weight: layers layers.0.…layers.1. do not share "
                                                r"one value \(\['0.3', '0.5'\]\); the recipe does not fit "
                                                r"layer_granularity 2$"))
    text = [dict(m, parameters={"weight": "x", "density": 0.5}) for m in recipe["models"]]
    cases.append(({**recipe, "models": text}, r"^models\[expert_a\].weight: expected a number for this search "
                                              r"space, got 'x'$"))
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            s.from_recipe(bad)


def test_invalid_space_message_lists_every_problem_with_its_key():
    with pytest.raises(ConfigError) as err:
        parse_search_space({"models": ["a", 3], "base_model": "b", "colour": 1, "layer_granularity": 0,
                            "num_layers": 2}, source="cfg.yml")
    assert str(err.value) == ("cfg.yml: invalid search_space:\n  models.1: Input should be a valid string (got 3)\n"
                              "  layer_granularity: Input should be greater than or equal to 1 (got 0)\n"
                              "  colour: unknown key")
    with pytest.raises(ConfigError) as err:
        parse_search_space({"models": ["a"], "base_model": "b", "weight_bounds": [1.0, 0.0]}, source="cfg.yml")
    assert str(err.value) == ("cfg.yml: invalid search_space:\n"
                              "  weight_bounds [1.0, 0.0] is reversed: the lower bound exceeds the upper")
