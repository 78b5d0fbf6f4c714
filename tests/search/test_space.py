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


# --- the merge method as a searched dimension --------------------------------------------------------------

THREE = ["dare_ties", "della", "breadcrumbs_ties"]


def _point(s, fill: float, method_u: float) -> torch.Tensor:
    x = torch.full((s.dim,), fill, dtype=torch.float64)
    x[-1] = method_u
    return x


def test_a_method_list_adds_each_methods_parameters_once_and_one_method_coordinate():
    from hm3.merge.methods import get_method

    s = _space(methods=THREE)
    assert s.param_names() == [*(f"weight[{m}][g0]" for m in MODELS), *(f"density[{m}][g0]" for m in MODELS),
                               *(f"epsilon[{m}][g0]" for m in MODELS), "lambda",
                               *(f"gamma[{m}][g0]" for m in MODELS), "method"]
    assert s.dim == 3 * 4 + 2
    lo, hi = s.bounds
    registry = {p: get_method("della").model_param(p) or get_method("della").param(p) for p in ("epsilon", "lambda")}
    registry["gamma"] = get_method("breadcrumbs_ties").model_param("gamma")
    names = s.param_names()
    for param, spec in registry.items():
        i = names.index("lambda" if param == "lambda" else f"{param}[expert_b][g0]")
        assert (lo[i].item(), hi[i].item()) == spec.search_bounds
    assert (lo[-1].item(), hi[-1].item()) == (0.0, 1.0)
    # layer groups: per-model parameters get one coordinate per group, a global one (lambda) stays one
    grouped = _space(methods=["della"], layer_granularity=1, num_layers=2)
    assert grouped.dim == 3 * 2 * 3 + 1 and "method" not in grouped.param_names()  # one method: no bin coordinate
    with pytest.raises(ConfigError, match="searches 3 methods"):
        s.merge_method  # noqa: B018


@pytest.mark.parametrize(("u", "method"), [(0.0, "dare_ties"), (1 / 3 - 1e-9, "dare_ties"), (1 / 3, "della"),
                                           (0.5, "della"), (2 / 3, "breadcrumbs_ties"), (1.0, "breadcrumbs_ties")])
def test_the_method_coordinate_is_cut_into_equal_bins(u, method):
    s = _space(methods=THREE)
    x = _point(s, 0.5, u)
    assert s.method_of(x) == method and s.to_recipe(x)["merge_method"] == method


def test_each_point_recipe_holds_its_methods_parameters_only():
    s = _space(methods=THREE, seed=4, rescale_mode="inverse", normalize=True)
    names = s.param_names()
    x = torch.linspace(0.05, 0.95, s.dim, dtype=torch.float64)
    values = dict(zip(names, (s.bounds[0] + x * (s.bounds[1] - s.bounds[0])).tolist(), strict=True))
    for u, method in ((0.1, "dare_ties"), (0.5, "della"), (0.9, "breadcrumbs_ties")):
        x[-1] = u
        recipe = s.to_recipe(x)
        assert recipe["merge_method"] == method and recipe["seed"] == 4 and recipe["base_model"] == "base"
        params = recipe["models"][1]["parameters"]
        assert params["weight"] == pytest.approx(values["weight[expert_b][g0]"])
        assert params["density"] == pytest.approx(values["density[expert_b][g0]"])
        own = {"dare_ties": set(), "della": {"epsilon"}, "breadcrumbs_ties": {"gamma"}}[method]
        assert set(params) == {"weight", "density"} | own
        globals_ = recipe["parameters"]
        assert globals_["normalize"] is True
        # rescale_mode reaches the random drops (DARE, DELLA) only; lambda is della's alone
        assert ("rescale_mode" in globals_) == (method in ("dare_ties", "della"))
        assert set(globals_) - {"normalize", "rescale_mode"} == ({"lambda"} if method == "della" else set())
        if method == "della":
            assert globals_["lambda"] == pytest.approx(values["lambda"])
            assert params["epsilon"] == pytest.approx(values["epsilon[expert_b][g0]"])  # the density leaves room
        if method == "breadcrumbs_ties":
            assert params["gamma"] == pytest.approx(values["gamma[expert_b][g0]"])


def test_della_epsilon_always_leaves_density_plus_minus_epsilon_inside_zero_one():
    """Every point is a della recipe mergekit runs: ρ ± ε strictly inside (0, 1) at any density, the
    searched ε unchanged where the density leaves room, and ε monotone in its coordinate."""
    from mergekit.sparsify import della_magprune

    from hm3.merge.ops import della_problem

    s = _space(methods=["della"], density_bounds=(0.0, 1.0))
    assert s.param_names()[6] == "epsilon[expert_a][g0]"
    # 1 - 2**-53: the float below 1, where ρ + 0.9 (1 - ρ) rounds to 1 (ε then falls back to 0)
    rho = torch.tensor([0.0, 1e-12, 0.02, 0.1, 0.5, 0.85, 0.95, 0.999, 1 - 1e-15, 1 - 2**-53, 1.0], dtype=torch.float64)
    eps_u = torch.linspace(0, 1, 11, dtype=torch.float64)
    tensor = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    for r in rho:
        fitted = []
        for e in eps_u:
            x = torch.full((s.dim,), 0.5, dtype=torch.float64)
            x[3], x[6] = r, e  # density and epsilon of expert_a
            params = s.to_recipe(x)["models"][0]["parameters"]
            density, epsilon = params["density"], params["epsilon"]
            assert della_problem(density, epsilon) is None, (density, epsilon)
            della_magprune(tensor, density=density, epsilon=epsilon)  # mergekit's own check passes
            fitted.append(epsilon)
        if r == 1 - 2**-53:
            assert max(fitted) < 1e-15  # no room to speak of: the rounding fallback (ε = 0) where needed
        else:
            assert fitted == sorted(fitted)
        if 0.2 / 0.9 <= r <= 1 - 0.2 / 0.9:  # room for the whole range [0, 0.2]
            assert fitted == pytest.approx((eps_u * 0.2).tolist())
        elif 0.01 < r < 0.99:
            assert 0 < fitted[-1] < 0.2 and fitted[-1] == pytest.approx(0.9 * min(r, 1 - r))


def test_recipes_of_every_method_round_trip_and_are_valid_merge_configs():
    from hm3.config import parse_merge_config
    from hm3.merge.methods import get_method
    from hm3.merge.plan import resolve_jobs

    spaces = [_space(methods=THREE), _space(methods=["della", "ties", "task_arithmetic", "della_linear"],
                                            layer_granularity=1, num_layers=2, density=0.6),
              _space(methods=["breadcrumbs", "dare_linear"], layer_granularity=2, num_layers=4)]
    tensors = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["lm_head.weight"]
    gen = torch.Generator().manual_seed(1)
    for s in spaces:
        seen = set()
        for _ in range(24):
            x = torch.rand(s.dim, generator=gen, dtype=torch.float64)
            recipe = s.to_recipe(x)
            seen.add(recipe["merge_method"])
            point = s.from_recipe(recipe)
            assert s.method_of(point) == recipe["merge_method"]
            assert _close(s.to_recipe(point), recipe)
            cfg = parse_merge_config(recipe, source="recipe")
            method = get_method(cfg.merge_method)
            resolve_jobs(cfg, method, tensor_names=tensors, num_layers=4, input_refs=MODELS)  # della's check too
        assert seen == set(s.method_names)


def _close(a, b) -> bool:
    """Recipes equal up to float rounding (a point decoded again may differ in the last digit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, abs=1e-12)
    return a == b


def test_the_inactive_coordinates_do_not_change_a_recipe():
    s = _space(methods=THREE)
    x = _point(s, 0.4, 0.1)  # dare_ties: epsilon, lambda and gamma are inactive
    moved = x.clone()
    names = s.param_names()
    for i, name in enumerate(names):
        if name.split("[")[0] in ("epsilon", "lambda", "gamma"):
            moved[i] = 0.9
    assert s.to_recipe(moved) == s.to_recipe(x)
    moved[names.index("weight[expert_a][g0]")] = 0.9
    assert s.to_recipe(moved) != s.to_recipe(x)


def test_a_one_method_list_is_todays_space_and_todays_dump_is_unchanged():
    plain, listed = _space(), _space(methods=["dare_ties"])
    assert listed.dim == plain.dim and listed.param_names() == plain.param_names()
    x = torch.rand(plain.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert listed.to_recipe(x) == plain.to_recipe(x)
    assert _space(methods=["ties"], density=0.4).to_recipe(x[:3]) == _space(dare=False, density=0.4).to_recipe(x[:3])
    # what a run store records: without methods, exactly the keys runs stored before methods existed
    assert list(plain.model_dump()) == ["models", "base_model", "weight_bounds", "density_bounds", "density", "dare",
                                        "rescale_mode", "fisher", "df_merge", "normalize", "layer_granularity",
                                        "num_layers", "seed"]
    assert "methods" not in plain.model_dump_json()
    dumped = _space(methods=THREE, param_bounds={"lambda": [0.8, 1.2]}).model_dump(mode="json")
    assert dumped["methods"] == THREE and dumped["param_bounds"] == {"lambda": [0.8, 1.2]}
    assert parse_search_space(dumped) == _space(methods=THREE, param_bounds={"lambda": [0.8, 1.2]})


def test_a_space_with_mask_rng_names_it_in_every_recipe_and_in_its_dump():
    """A search that picks the sfc64 draw records it where a re-merge reads it: each recipe and the stored space."""
    from hm3.config import parse_merge_config

    x = torch.rand(_space().dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert "mask_rng" not in _space().to_recipe(x)  # unset: recipes as before, merged with mt19937
    fast = _space(mask_rng="sfc64")
    recipe = fast.to_recipe(x)
    assert recipe["mask_rng"] == "sfc64" and parse_merge_config(recipe).mask_rng == "sfc64"
    assert torch.allclose(fast.from_recipe(recipe), x)
    dumped = fast.model_dump(mode="json")
    assert dumped["mask_rng"] == "sfc64" and parse_search_space(dumped) == fast
    with pytest.raises(ConfigError, match="mask_rng"):
        parse_search_space(_space().model_dump(mode="json") | {"mask_rng": "philox"})


def test_param_bounds_replace_the_registrys_ranges():
    s = _space(methods=["della"], param_bounds={"lambda": [0.8, 1.2], "epsilon": [0.0, 0.05]})
    names = s.param_names()
    assert s.bounds[:, names.index("lambda")].tolist() == [0.8, 1.2]
    assert s.bounds[:, names.index("epsilon[expert_c][g0]")].tolist() == [0.0, 0.05]
    assert s.to_recipe(torch.ones(s.dim, dtype=torch.float64))["parameters"]["lambda"] == pytest.approx(1.2)


def test_fixed_coefficients_of_a_method_list_take_the_first_method_and_the_middles():
    s = _space(methods=["della", "dare_ties"])
    recipe = s.to_recipe(s.fixed_coefficients([0.2, 0.3, 0.5]))
    assert recipe["merge_method"] == "della" and recipe["parameters"]["lambda"] == pytest.approx(1.0)
    assert [m["parameters"]["weight"] for m in recipe["models"]] == pytest.approx([0.2, 0.3, 0.5])
    assert recipe["models"][0]["parameters"]["epsilon"] == pytest.approx(0.1)  # density 0.55 leaves room


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"methods": []}, "methods is empty: list one or more of breadcrumbs, breadcrumbs_ties, dare_linear, "
                          "dare_ties, della, della_linear, task_arithmetic, ties"),
        ({"methods": ["dare_ties", "dellla"]}, r"methods: unknown merge method 'dellla'; level 1 searches: "
                                               r"breadcrumbs, .*, ties"),
        ({"methods": ["linear"]}, "'linear' merges the models' own weights without a base, which the in-memory "
                                  "merger that searches use does not hold; level 1 searches: breadcrumbs"),
        ({"methods": ["slerp", "ties"]}, "'slerp' reads the models' own weights, not only task vectors over the base, "
                                         "which the in-memory merger .*; level 1 searches: breadcrumbs, .*, ties$"),
        ({"methods": ["model_stock"]}, "'model_stock' reads the models' own weights, not only task vectors"),
        ({"methods": ["sce"]}, "'sce' has no per-model weights over task vectors"),
        ({"methods": ["df_merge"]}, "'df_merge' needs Fisher tensors"),
        ({"methods": ["ties", "della", "ties"]}, "methods lists 'ties' twice"),
        ({"methods": ["ties", "della"], "fisher": True}, "methods cannot be combined with fisher"),
        ({"methods": ["ties", "della"], "dare": False}, "dare: false has no meaning with methods"),
        ({"param_bounds": {"epsilon": [0, 0.1]}}, r"param_bounds.epsilon: no searched method \(dare_ties\) has"),
        ({"methods": ["della"], "param_bounds": {"gamma": [0, 0.1]}},
         "param_bounds.gamma: no searched method .della. has a parameter 'gamma' to search; they search epsilon, "
         "lambda"),
        ({"methods": ["della"], "param_bounds": {"epsilon": [0.2, 0.1]}}, "param_bounds.epsilon .* is reversed"),
        ({"methods": ["della"], "param_bounds": {"epsilon": [0.0, 1.5]}},
         r"param_bounds.epsilon \[0.0, 1.5\]: epsilon must lie in \[0, 1\], got 1.5"),
        ({"methods": ["della"], "param_bounds": {"lambda": [0.5, float("inf")]}}, "param_bounds.lambda .* must be finite"),
        ({"methods": "della"}, "methods: Input should be a valid list"),
    ],
)
def test_invalid_method_lists(extra, message):
    with pytest.raises(ConfigError, match=message):
        _space(**extra)


def test_a_method_list_without_a_base_model_says_that_its_methods_need_one():
    with pytest.raises(ConfigError, match="base_model is missing: della, ties merge task vectors over a base model"):
        parse_search_space({"models": MODELS, "methods": ["della", "ties"]}, source="cfg.yml")
    with pytest.raises(ConfigError, match="base_model is missing"):
        parse_search_space({"models": MODELS, "base_model": "", "methods": ["della"]})


def test_foreign_recipes_of_a_method_list_are_refused_naming_the_difference():
    s = _space(methods=["dare_ties", "della"])
    della = s.to_recipe(_point(s, 0.5, 0.9))
    with pytest.raises(ConfigError, match=r"^recipe merge_method 'ties' is not one of this space's methods "
                                          r"\(dare_ties, della\)$"):
        s.from_recipe({**della, "merge_method": "ties"})
    no_eps = [dict(m, parameters={"weight": 0.5, "density": 0.5}) for m in della["models"]]
    with pytest.raises(ConfigError, match="^recipe model 'expert_a' has no epsilon$"):
        s.from_recipe({**della, "models": no_eps})
    with pytest.raises(ConfigError, match=r"^recipe parameters.lambda: expected a number for this search space, "
                                          r"got None$"):
        s.from_recipe({**della, "parameters": {}})
    bad_eps = [dict(m, parameters={"weight": 0.5, "density": 0.5, "epsilon": 0.6}) for m in della["models"]]
    with pytest.raises(ConfigError, match="^recipe model 'expert_a': density ± epsilon must lie strictly"):
        s.from_recipe({**della, "models": bad_eps})


def test_encoding_for_a_method_list_refuses_another_method_and_a_short_coefficient_list():
    s = _space(methods=["dare_ties", "della"])
    weights = [[0.5] * s.n_groups for _ in s.models]
    with pytest.raises(ConfigError, match=r"^method 'ties' is not one of this space's \(dare_ties, della\)$"):
        s.encode(weights, weights, method="ties")
    k, g = len(s.models), s.n_groups
    with pytest.raises(ConfigError, match=rf"^got {(k + 1) * g} coefficient values; this search space has "
                                          rf"{2 * k * g} weights and densities$"):
        s.encode(weights, weights[:1])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"weight_bounds": [0.0, float("inf")]}, r"weight_bounds \[0.0, inf\] must be finite"),
        ({"weight_bounds": [float("nan"), 1.0]}, r"weight_bounds \[nan, 1.0\] must be finite"),
        ({"density_bounds": [0.2, float("nan")]}, r"density_bounds \[0.2, nan\] must be finite"),
        ({"weight_bounds": [[0, 1], [0, float("nan")], [0, 1]]}, r"weight_bounds of 'expert_b' \[0.0, nan\] must be finite"),
    ],
)
def test_a_bound_that_is_not_finite_is_refused_whichever_end_it_is(extra, message):
    """NaN passes every range comparison, and an infinite upper bound would be called out of range instead."""
    with pytest.raises(ConfigError, match=message):
        _space(**extra)


# --- the validators, property by property (what mutation testing found unchecked) ---------------------------

TWO = {"models": ["a", "b"], "base_model": "base"}


@pytest.mark.parametrize(("extra", "problem"), [
    ({"models": ["a", "a"]}, "models lists a model twice: ['a', 'a']"),
    ({"models": ["base", "a"]}, "base_model 'base' is also listed under models"),
    ({"density": 1.5}, "density must lie in (0, 1], got 1.5"),
    ({"layer_granularity": 2}, "layer_granularity needs num_layers (the base model's layer count)"),
    ({"df_merge": True}, "df_merge needs fisher: true and dare: false (DF-Merge has no drop step)"),
    ({"df_merge": True, "fisher": True, "dare": True},
     "df_merge needs fisher: true and dare: false (DF-Merge has no drop step)"),
    ({"weight_bounds": [-10.5, 1.0]}, "weight_bounds [-10.5, 1.0] must lie within [-10.0, 10.0]"),
    ({"weight_bounds": [0.0, 10.5]}, "weight_bounds [0.0, 10.5] must lie within [-10.0, 10.0]"),
])
def test_each_refusal_says_exactly_what_is_wrong(extra, problem):
    with pytest.raises(ConfigError) as err:
        parse_search_space({**TWO, **extra})
    assert str(err.value) == f"<config>: invalid search_space:\n  {problem}"


def test_a_method_list_without_a_base_is_refused_naming_the_methods():
    with pytest.raises(ConfigError) as err:
        parse_search_space({"models": ["a"], "methods": ["ties", "della"]})
    assert str(err.value) == ("<config>: invalid search_space:\n  base_model is missing: ties, della merge task "
                              "vectors over a base model; name it (a model of 'models' in the run config, not one "
                              "of search_space.models)")


def test_the_bounds_limits_themselves_are_accepted():
    assert parse_search_space({**TWO, "weight_bounds": [-10.0, 10.0]}).weight_bounds == (-10.0, 10.0)
    assert parse_search_space({**TWO, "density": 1.0}).density == 1.0


def test_input_that_is_not_a_mapping_is_a_validation_error():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="valid dictionary or instance of SearchSpace"):
        SearchSpace.model_validate("x")


def test_a_dump_may_leave_out_the_keys_it_drops_while_unset():
    dumped = parse_search_space(TWO).model_dump(exclude={"methods", "mask_rng", "tokenizer_source", "param_bounds"})
    assert {"methods", "mask_rng", "tokenizer_source", "param_bounds"}.isdisjoint(dumped) and dumped["models"] == ["a", "b"]


@pytest.mark.parametrize(("bounds", "holds"), [((0.0, 1.0), True), ((-1.0, 2.0), True), ((0.0, 0.9), False),
                                               ((0.1, 1.0), False), ([[0.0, 1.0], [0.1, 1.0]], False)])
def test_holds_simplex_when_every_models_weight_bounds_hold_zero_to_one(bounds, holds):
    assert parse_search_space({**TWO, "weight_bounds": bounds}).holds_simplex is holds


def test_a_space_of_two_methods_has_no_single_merge_method():
    s = parse_search_space({**TWO, "methods": ["ties", "della"]})
    with pytest.raises(ConfigError) as err:
        _ = s.merge_method
    assert str(err.value) == "this search space searches 2 methods (ties, della): a point's method is method_of(x)"
