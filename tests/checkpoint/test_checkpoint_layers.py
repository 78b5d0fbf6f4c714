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


@pytest.mark.parametrize(("name", "before"), [
    ("model.embed_tokens.weight", True), ("transformer.wte.weight", True), ("transformer.wpe.weight", True),
    ("wte.weight", True), ("gpt_neox.embed_in.weight", True), ("model.decoder.embed_positions.weight", True),
    ("model.norm.weight", False), ("lm_head.weight", False), ("transformer.ln_f.bias", False),
    ("embed_out.weight", False),  # GPT-NeoX's output embedding comes after the layers
    ("model.layers.0.embed_tokens.weight", False),  # inside a layer: not outside it at all
])
def test_input_embeddings_are_the_tensors_before_the_layers(name, before):
    from hm3.checkpoint.layers import is_input_embedding

    assert is_input_embedding(name) is before


def test_a_relayered_config_counts_its_layers_under_its_own_key_and_moves_per_layer_entries():
    from hm3.checkpoint.layers import relayered_config

    llama = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "hidden_size": 8}
    assert relayered_config(llama, [3, 3, 0]) == {"num_hidden_layers": 3, "layer_types": ["d", "d", "a"],
                                                  "hidden_size": 8}
    assert llama["num_hidden_layers"] == 4  # the source config is left alone
    assert relayered_config({"n_layer": 2, "n_embd": 8}, [0, 1, 1]) == {"n_layer": 3, "n_embd": 8}
    assert relayered_config({}, [0]) == {"num_hidden_layers": 1}


def test_scales_are_exact_only_on_pre_norm_model_types():
    from hm3.checkpoint.layers import check_scales_exact
    from hm3.errors import ConfigError

    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        check_scales_exact(model_type)
    with pytest.raises(ConfigError, match=r"^'scale' values are only defined for pre-norm models .*'gemma2'"):
        check_scales_exact("gemma2", "'scale' values")


def test_a_relayered_sliding_window_config_says_which_layers_slide_in_max_window_layers():
    """Qwen2 with sliding windows from layer 2 up (of 4): vLLM reads each layer's attention from
    max_window_layers alone, so it must follow the layers; an order no such number describes is refused."""
    from hm3.checkpoint.layers import relayered_config
    from hm3.errors import ConfigError

    qwen = {"num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 2}
    assert relayered_config(qwen, [0, 1, 1, 2, 3])["max_window_layers"] == 3
    assert relayered_config(qwen, [0, 1])["max_window_layers"] == 2  # no sliding layer left: all full
    assert relayered_config(qwen, [3, 3])["max_window_layers"] == 0
    typed = qwen | {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]}
    assert relayered_config(typed, [0, 0, 1, 2])["max_window_layers"] == 2  # layer_types decide, where present
    with pytest.raises(ConfigError, match="output layer 0.*max_window_layers"):
        relayered_config(qwen, [2, 0])
    off = {"num_hidden_layers": 4, "use_sliding_window": False, "max_window_layers": 2}
    assert relayered_config(off, [0, 1, 2, 3, 3])["max_window_layers"] == 2  # unused without sliding windows
