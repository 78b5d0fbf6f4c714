"""Tensor name -> transformer block index, across naming schemes."""

from __future__ import annotations

import pytest

from hm3.checkpoint import layer_index, layer_tensor_names, rename_layer


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.12.mlp.up_proj.weight", 12),
        ("model.layers.0.self_attn.q_proj.weight", 0),
        ("h.3.attn.c_attn.weight", 3),
        ("transformer.h.11.mlp.c_fc.bias", 11),
        ("blocks.7.attn.weight", 7),
        ("gpt_neox.layers.5.attention.dense.weight", 5),
        ("encoder.layer.2.output.dense.weight", 2),
        ("model.embed_tokens.weight", None),
        ("transformer.wte.weight", None),
        ("model.norm.weight", None),
        ("transformer.ln_f.weight", None),
        ("lm_head.weight", None),
        ("model.layers_extra.weight", None),
        ("shh.3.weight", None),
    ],
)
def test_layer_index(name, expected):
    assert layer_index(name) == expected


def test_layer_tensor_names_keeps_order_and_only_that_layer():
    names = [
        "model.embed_tokens.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.norm.weight",
    ]
    assert layer_tensor_names(names, 1) == [
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.input_layernorm.weight",
    ]
    assert layer_tensor_names(names, 10) == ["model.layers.10.mlp.up_proj.weight"]
    assert layer_tensor_names(names, 2) == []


def test_rename_layer():
    assert rename_layer("model.layers.12.mlp.up_proj.weight", 3) == "model.layers.3.mlp.up_proj.weight"
    assert rename_layer("transformer.h.3.attn.c_attn.weight", 10) == "transformer.h.10.attn.c_attn.weight"
    # only the block index changes, not other digits in the name
    assert rename_layer("model.layers.2.mlp.experts.2.w1", 5) == "model.layers.5.mlp.experts.2.w1"


@pytest.mark.parametrize("name,index", [("model.norm.weight", 1), ("model.layers.1.mlp.up_proj.weight", -1)])
def test_rename_layer_refuses_non_layer_or_negative(name, index):
    with pytest.raises(ValueError):
        rename_layer(name, index)
