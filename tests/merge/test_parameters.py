"""Recipe parameter resolution: gradients, filters and precedence as mergekit defines them."""

from __future__ import annotations

import pytest

from hm3.config import parse_merge_config
from hm3.errors import ConfigError
from hm3.merge.parameters import evaluate_setting, layer_position, resolve


def test_layer_position():
    assert layer_position(None, 12) == 0.0
    assert layer_position(0, 5) == 0.0 and layer_position(4, 5) == 1.0 and layer_position(1, 5) == 0.25
    assert layer_position(0, 1) == 1.0  # mergekit's single-layer rule


def test_gradient_interpolates_over_depth():
    assert evaluate_setting("x", [0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert evaluate_setting("x", [0.0, 1.0, 0.0], 0.75) == pytest.approx(0.5)
    assert evaluate_setting("x", [0.2, 0.4], 1.0) == pytest.approx(0.4)


def test_filters_first_match_wins_and_catch_all():
    cfg = parse_merge_config(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "m", "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 0.1}]}}],
            "parameters": {"density": [{"filter": "self_attn", "value": [0.2, 0.6]}]},
        }
    )
    w = cfg.models[0].parameters["weight"]
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", w, 0) == 0.9
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", w, 0) == 0.1
    d = cfg.parameters["density"]
    assert evaluate_setting("model.layers.3.self_attn.q_proj.weight", d, 0.5) == pytest.approx(0.4)
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", d, 0.5) is None


def test_model_parameters_win_over_global():
    cfg = parse_merge_config(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "m", "parameters": {"weight": 0.3}}, {"model": "n"}],
            "parameters": {"weight": 0.8},
        }
    )
    assert resolve(cfg, "weight", tensor_name="t", t=0, model="m", default=None) == 0.3
    assert resolve(cfg, "weight", tensor_name="t", t=0, model="n", default=None) == 0.8
    assert resolve(cfg, "density", tensor_name="t", t=0, model="n", default=1.0) == 1.0


@pytest.mark.parametrize(
    "data,mention",
    [
        ({"merge_method": "ties", "models": []}, "models"),
        ({"merge_method": "ties", "models": [{"model": "m", "paramters": {}}]}, "paramters"),
        ({"models": [{"model": "m"}]}, "merge_method"),
        ({"merge_method": "ties", "models": [{"model": "m"}], "slices": []}, "slices"),
        ({"merge_method": "ties", "models": [{"model": "m", "parameters": {"weight": float("inf")}}]}, "weight"),
        ("just a string", "mapping"),
    ],
)
def test_malformed_configs_are_named(data, mention):
    with pytest.raises(ConfigError, match=mention):
        parse_merge_config(data)
