"""No config reads ``true``/``false`` as a number (hm3.config_model): each config file kind, and the rule itself."""

from __future__ import annotations

from typing import Any, Literal

import pytest
import yaml

from hm3.config import parse_merge_config
from hm3.config_model import misplaced_boolean
from hm3.errors import ConfigError
from hm3.run.config import parse_two_level_config
from hm3.search.run_config import parse_run_config

Scalar = bool | int | float | str


@pytest.mark.parametrize(
    ("value", "annotation", "misplaced"),
    [
        (True, int, True), (False, float, True), (True, int | None, True), (True, bool, False), (True, Scalar, False),
        (True, Any, False), (True, Literal[True, "x"], False), (True, str, False), (1, int, False), (0.5, float, False),
        ([True], list[float], True), ([1.0, 2], list[float], False), ({"a": True}, dict[str, float], True),
        ({"a": 1}, dict[str, float], False), ([[0.1, True]], int | list[list[float]], True),
        ([[0.1, 0.9]], int | list[list[float]], False), ([False, 1.0], tuple[float, float] | list[tuple[float, float]], True),
        ([(0.0, 1.0), (True, 1.0)], tuple[float, float] | list[tuple[float, float]], True), ([(1, True)], list[tuple[int, int]], True),
        ((1, True), tuple[int, ...], True), ([True], list[Scalar], False), ("x", list[int], False),
    ],
)
def test_a_boolean_is_misplaced_exactly_where_a_number_but_no_boolean_goes(value, annotation, misplaced):
    assert misplaced_boolean(value, annotation) is misplaced


def _level1(**changes: Any) -> dict[str, Any]:
    data = yaml.safe_load("""
models: {b: /models/base, m1: /models/math, m2: /models/code}
search_space: {models: [m1, m2], base_model: b, weight_bounds: [0.0, 1.0]}
optimizer: {name: random, budget: 4}
objectives: [zoo:math, zoo:code]
evaluation: {backend: hf, validation_examples: 8}
""")
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        node[key] = value
    return data


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"optimizer__budget": True}, "budget"),
        ({"evaluation__validation_examples": True}, "validation_examples"),
        ({"search_space__weight_bounds": [False, 1.0]}, "weight_bounds"),
        ({"seed": False}, "seed"),
    ],
)
def test_a_run_config_with_a_boolean_for_a_number_is_refused_naming_the_key(changes, key):
    parse_run_config(_level1(), source="run.yml")  # the config without the slip is fine
    with pytest.raises(ConfigError, match=f"(?s)run.yml.*{key}.*boolean"):
        parse_run_config(_level1(**changes), source="run.yml")


@pytest.mark.parametrize(("section", "key"), [({"preferences": True}, "preferences"),
                                              ({"keep_best": True}, "keep_best"),
                                              ({"rl": {"offline_episodes": True}}, "offline_episodes")])
def test_a_level2_section_with_a_boolean_for_a_number_is_refused(section, key):
    with pytest.raises(ConfigError, match=f"(?s){key}.*boolean"):
        parse_two_level_config({**_level1(), "level2": section}, source="two.yml")


def test_a_merge_recipe_keeps_booleans_where_mergekit_takes_them_and_refuses_them_for_a_seed():
    recipe = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 1.0}}],
              "parameters": {"normalize": True, "int8_mask": False}}
    assert parse_merge_config(recipe).parameters["normalize"] is True
    with pytest.raises(ConfigError, match="(?s)seed.*boolean"):
        parse_merge_config({**recipe, "seed": True}, source="recipe.yml")


@pytest.mark.parametrize("section", [[], 0, "", False, "hm3"])
def test_a_level2_section_that_is_not_a_mapping_is_refused_not_read_as_the_defaults(section):
    with pytest.raises(ConfigError, match="(?s)two.yml.*level2: Input should be a valid dictionary"):
        parse_two_level_config({**_level1(), "level2": section}, source="two.yml")


def test_an_empty_level2_section_takes_every_default():
    assert parse_two_level_config({**_level1(), "level2": None}) == parse_two_level_config(_level1())
