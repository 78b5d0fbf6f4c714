"""Layer paths: in memory over shared tensors, on disk as a plain HF checkpoint, and every refusal."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hm3.arch.path import (
    MERGEKIT_CONFIG_FILE,
    PATH_FILE,
    LayerPath,
    LayerPool,
    branch_scales_from_input_scales,
    build_path_model,
    export_path,
)
from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.errors import ConfigError, IncompatibleModelsError, OutputExistsError

NUM_LAYERS = 3
MIXED_PATHS = {
    "reorder_repeat_mix": LayerPath(((2, 2), (0, 0), (1, 1), (0, 0), (2, 1))),
    "single_hop": LayerPath(((1, 2),)),
    "deeper_than_models": LayerPath(tuple((t % 3, (2 * t) % NUM_LAYERS) for t in range(7))),
    "scaled": LayerPath(((0, 1), (2, 0), (1, 1), (2, 2)), scales=(0.5, 1.0, 2.0, 1.3)),
}


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> list[Path]:
    """Two experts and a stand-in level-1 merge (last), all fine-tuned from one tiny base."""
    root = tmp_path_factory.mktemp("pool")
    base = build_random_llama(root / "base", hidden_size=32, num_layers=NUM_LAYERS, vocab_size=64, seed=3)
    return [
        build_finetuned_variant(base, root / name, seed=s, scale=0.2)
        for name, s in (("expert0", 11), ("expert1", 12), ("merge", 13))
    ]


@pytest.fixture(scope="module")
def pool(pool_dirs) -> LayerPool:
    return LayerPool.load(pool_dirs)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _load(d: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(d).eval()


@pytest.mark.parametrize("name", list(MIXED_PATHS))
def test_memory_and_disk_give_identical_logits(pool, pool_dirs, ids, tmp_path, name):
    path = MIXED_PATHS[name]
    in_memory = _logits(build_path_model(pool, path), ids)
    out = export_path(pool_dirs, path, tmp_path / "out")
    exported = _load(out)
    assert exported.config.num_hidden_layers == len(path)
    assert [layer.self_attn.layer_idx for layer in exported.model.layers] == list(range(len(path)))
    assert torch.allclose(in_memory, _logits(exported, ids), atol=1e-5, rtol=0)


def test_export_is_the_pool_tensors_renamed(pool_dirs, tmp_path):
    path = MIXED_PATHS["scaled"]
    out = export_path(pool_dirs, path, tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    sources = [load_file(d / "model.safetensors") for d in pool_dirs]
    assert {n for n in tensors if ".layers." in n} == {
        n.replace(".layers.0.", f".layers.{t}.")
        for t in range(len(path))
        for n in sources[2]
        if ".layers.0." in n
    }
    for t, (m, layer) in enumerate(path.hops):
        for leaf in ("self_attn.q_proj.weight", "input_layernorm.weight", "mlp.up_proj.weight"):
            assert torch.equal(
                tensors[f"model.layers.{t}.{leaf}"], sources[m][f"model.layers.{layer}.{leaf}"]
            )
        for leaf in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            want = sources[m][f"model.layers.{layer}.{leaf}"] * path.scales[t]
            assert torch.equal(tensors[f"model.layers.{t}.{leaf}"], want)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(tensors[name], sources[2][name])  # from the merge, whatever the first/last hop
    recorded = json.loads((out / PATH_FILE).read_text())
    assert recorded["hops"] == [list(h) for h in path.hops] and recorded["scales"] == list(path.scales)
    assert (out / MERGEKIT_CONFIG_FILE).is_file()


def test_merge_own_layers_reproduce_the_merge_exactly(pool, pool_dirs, ids, tmp_path):
    identity = LayerPath.of_model(2, NUM_LAYERS)
    merge_logits = _logits(_load(pool_dirs[2]), ids)
    assert torch.equal(_logits(build_path_model(pool, identity), ids), merge_logits)
    out = export_path(pool_dirs, identity, tmp_path / "out")
    assert load_file(out / "model.safetensors").keys() == load_file(pool_dirs[2] / "model.safetensors").keys()
    assert torch.equal(_logits(_load(out), ids), merge_logits)


def test_an_expert_path_with_the_merge_head_differs_from_the_merge(pool, ids):
    """Guards the identity test: a path of another model's layers must change the logits."""
    expert = build_path_model(pool, LayerPath.of_model(0, NUM_LAYERS))
    merge = build_path_model(pool, LayerPath.of_model(2, NUM_LAYERS))
    assert not torch.allclose(_logits(expert, ids), _logits(merge, ids), atol=1e-3)


def test_parameters_are_the_pool_tensors_not_copies(pool):
    path = LayerPath(tuple((t % 3, t % NUM_LAYERS) for t in range(12)))
    model = build_path_model(pool, path)
    pool_ptrs = {t.data_ptr() for s in pool.states for t in s.values()}
    params = dict(model.named_parameters(remove_duplicate=False))
    copied = [n for n, p in params.items() if p.data_ptr() not in pool_ptrs]
    assert copied == []  # so memory does not grow with T: only the rotary buffers are new
    for t, (m, layer) in enumerate(path.hops):
        for leaf in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"):
            got = params[f"model.layers.{t}.{leaf}"]
            assert got.data_ptr() == pool.states[m][f"model.layers.{layer}.{leaf}"].data_ptr()
    assert params["lm_head.weight"].data_ptr() == pool.states[2]["lm_head.weight"].data_ptr()
    assert model.model.layers[0].self_attn.q_proj.weight is not model.model.layers[3].self_attn.q_proj.weight


def test_pool_from_loaded_models_shares_their_parameters(pool_dirs, ids):
    models = [_load(d) for d in pool_dirs]
    pool = LayerPool.from_models(models)
    path = LayerPath(((1, 0), (2, 2)))
    built = build_path_model(pool, path)
    assert (
        built.model.layers[0].mlp.up_proj.weight.data_ptr()
        == models[1].model.layers[0].mlp.up_proj.weight.data_ptr()
    )
    assert built.model.embed_tokens.weight.data_ptr() == models[2].model.embed_tokens.weight.data_ptr()
    assert torch.isfinite(_logits(built, ids)).all()


def test_kv_cache_decoding_matches_a_full_forward(pool, ids):
    model = build_path_model(pool, MIXED_PATHS["reorder_repeat_mix"])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(5))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5, rtol=0)


def test_branch_scale_equals_scaling_the_branch_output_weights(pool_dirs, ids):
    """The hooks in memory implement exactly 'o_proj and down_proj of that hop times w'."""
    path = LayerPath(((0, 1), (1, 2)), scales=(0.25, 3.0))
    pool = LayerPool.load(pool_dirs)
    scaled_states = [dict(s) for s in pool.states]
    for m, layer, w in ((0, 1, 0.25), (1, 2, 3.0)):
        for leaf in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            key = f"model.layers.{layer}.{leaf}"
            scaled_states[m][key] = scaled_states[m][key] * w
    manual = LayerPool.from_states(scaled_states, [pool.config] * 3)
    want = _logits(build_path_model(manual, LayerPath(path.hops)), ids)
    got = _logits(build_path_model(pool, path), ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, _logits(build_path_model(pool, LayerPath(path.hops)), ids), atol=1e-3)


def _input_scaled_logits(
    pool: LayerPool, path: LayerPath, input_scales: tuple[float, ...], ids
) -> torch.Tensor:
    """Sakana's semantics, literally: the hidden state entering hop t is multiplied by s_t."""
    model = build_path_model(pool, path)
    for layer, s in zip(model.model.layers, input_scales, strict=True):
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, s=s: (
                ((args[0] * s, *args[1:]), kwargs)
                if args
                else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s})
            ),
            with_kwargs=True,
        )
    return _logits(model, ids)


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_input_scales_equal_branch_scales_only_up_to_the_norm_eps(pool, ids, eps):
    """The documented equivalence: exact (to float rounding) for eps = 0, visibly off for a large eps."""
    pool = LayerPool.from_states(pool.states, [{**pool.config, "rms_norm_eps": eps}] * 3)
    hops = ((0, 1), (2, 0), (1, 2), (2, 2))
    input_scales = (0.5, 3.0, 0.8, 1.7)
    sakana = _input_scaled_logits(pool, LayerPath(hops), input_scales, ids)
    folded = _logits(
        build_path_model(pool, LayerPath(hops, branch_scales_from_input_scales(input_scales))), ids
    )
    diff = (sakana - folded).abs().max().item()
    if eps == 0.0:
        assert diff < 1e-4
    else:
        assert diff > 1e-3


def test_branch_scales_from_input_scales():
    assert branch_scales_from_input_scales([2.0, 0.5, 4.0]) == (0.5, 1.0, 0.25)
    assert branch_scales_from_input_scales([]) == ()


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "t_max", "needle"),
    [
        (LayerPath(()), 4, "empty layer path"),
        (LayerPath(((0, 0),) * 5), 4, "more than T_max = 4"),
        (LayerPath(((0, 0),)), 0, "T_max must be >= 1"),
        (LayerPath(((3, 0),)), 4, "model index 3 out of range for a pool of 3"),
        (LayerPath(((0, 0), (-1, 0))), 4, "hop 1: model index -1"),
        (LayerPath(((1, 3),)), 4, "layer index 3 out of range for pool model 1 with 3 layers"),
        (LayerPath(((1, -1),)), 4, "layer index -1"),
        (LayerPath(((0, 0), (0, 1)), scales=(1.0, math.nan)), 4, "hop 1: scale nan"),
        (LayerPath(((0, 0),), scales=(math.inf,)), 4, "scale inf"),
        (LayerPath(((0, 0),), scales=(0.0,)), 4, "scale 0.0 must be finite and positive"),
        (LayerPath(((0, 0),), scales=(-1.0,)), 4, "scale -1.0"),
        (LayerPath(((0, 0), (0, 1)), scales=(1.0,)), 4, "1 scales given for a path of 2 hops"),
    ],
)
def test_invalid_paths_are_refused_with_the_reason(pool, pool_dirs, tmp_path, path, t_max, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        path.validate(3, NUM_LAYERS, t_max)
    with pytest.raises(ConfigError, match="T_max|hop|empty|scales given"):
        build_path_model(pool, path, t_max=t_max)
    with pytest.raises(ConfigError):
        export_path(pool_dirs, path, tmp_path / "out", t_max=t_max)
    assert not (tmp_path / "out").exists()


def test_validate_with_per_model_layer_counts():
    LayerPath(((0, 4), (1, 1))).validate(2, [5, 2])
    with pytest.raises(ConfigError, match="layer index 2 out of range for pool model 1 with 2 layers"):
        LayerPath(((0, 4), (1, 2))).validate(2, [5, 2])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"hidden_size": 48}, "hidden_size: .*expert0=32.*other=48"),
        ({"intermediate_size": 96}, "intermediate_size: .*=64.*=96"),
    ],
)
def test_pool_of_different_widths_is_refused_naming_the_sizes(pool_dirs, tmp_path, kwargs, needle):
    other = build_random_llama(
        tmp_path / "other", num_layers=NUM_LAYERS, vocab_size=64, **{"hidden_size": 32, **kwargs}
    )
    dirs = [pool_dirs[0], other, pool_dirs[2]]
    with pytest.raises(IncompatibleModelsError, match="different widths") as err:
        LayerPool.load(dirs)
    assert err.match(needle)
    with pytest.raises(IncompatibleModelsError, match=needle):
        export_path(dirs, LayerPath(((0, 0),)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layer_tensors_differing_without_a_config_difference_are_refused(pool):
    states = [dict(s) for s in pool.states]
    states[1]["model.layers.2.self_attn.q_proj.bias"] = torch.zeros(32)
    with pytest.raises(IncompatibleModelsError, match="layer 2 of pool model model 1 .*q_proj.bias"):
        LayerPool.from_states(states, [pool.config] * 3)


def test_scales_are_refused_for_architectures_not_known_to_be_pre_norm(pool):
    odd = LayerPool.from_states(pool.states, [{**pool.config, "model_type": "gemma2"}] * 3)
    with pytest.raises(ConfigError, match="only defined for pre-norm models.*'gemma2'"):
        build_path_model(odd, LayerPath(((0, 0),), scales=(0.5,)))


def test_existing_output_is_refused_unless_overwrite(pool_dirs, tmp_path, ids):
    out = tmp_path / "out"
    export_path(pool_dirs, LayerPath(((0, 0),)), out)
    with pytest.raises(OutputExistsError, match=str(out)):
        export_path(pool_dirs, LayerPath(((1, 1), (2, 2))), out)
    assert _load(out).config.num_hidden_layers == 1
    export_path(pool_dirs, LayerPath(((1, 1), (2, 2))), out, overwrite=True)
    assert _load(out).config.num_hidden_layers == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left behind


def test_tokenizer_and_generation_files_come_from_the_merge(pool_dirs, tmp_path):
    merge = shutil.copytree(pool_dirs[2], tmp_path / "merge")
    (merge / "tokenizer_config.json").write_text('{"marker": "merge"}')
    out = export_path([pool_dirs[0], merge], LayerPath(((0, 0),)), tmp_path / "out")
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"marker": "merge"}


def test_tied_embeddings_stay_tied_in_memory_and_on_disk(tmp_path, ids):
    base = build_random_llama(
        tmp_path / "base", hidden_size=32, num_layers=2, vocab_size=64, tie_word_embeddings=True, seed=4
    )
    dirs = [build_finetuned_variant(base, tmp_path / f"m{i}", seed=30 + i, scale=0.2) for i in range(2)]
    path = LayerPath(((0, 1), (1, 0), (0, 1)))
    model = build_path_model(LayerPool.load(dirs), path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = export_path(dirs, path, tmp_path / "out")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert torch.allclose(_logits(model, ids), _logits(_load(out), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "path", [MIXED_PATHS["single_hop"], LayerPath(((2, 1), (0, 2)), scales=(0.5, 1.7))], ids=["single", "scaled"]
)
def test_path_state_padded_with_identity_layers_runs_unchanged_at_fixed_depth(pool, pool_dirs, ids, path):
    """A depth-L model loaded with a T < L path's state padded by identity hops gives the path's logits
    (how a fixed-depth engine such as vLLM runs level-2 paths)."""
    from hm3.arch.path import path_state

    fixed = AutoModelForCausalLM.from_pretrained(pool_dirs[-1])  # depth NUM_LAYERS
    state = path_state(pool, path, depth=NUM_LAYERS)
    assert set(state) == set(fixed.state_dict()) and len(path_state(pool, path)) < len(state)
    fixed.load_state_dict(state)
    got, want = _logits(fixed.eval(), ids), _logits(build_path_model(pool, path), ids)
    if path.scales is None:
        assert torch.equal(got, want)  # identity layers add exact zeros
    else:  # the scale folded into weights vs applied to outputs: equal up to rounding
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="more than T_max"):
        path_state(pool, MIXED_PATHS["deeper_than_models"], depth=NUM_LAYERS)
