"""Layer swaps and per-transition scales: the family's paths, their materialisation in memory, on disk
and through mergekit, the searched scale in the environment, and refusals where scales are not exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hm3.arch.env import PathEnv
from hm3.arch.path import (
    MERGEKIT_CONFIG_FILE,
    LayerPath,
    LayerPool,
    branch_scales_from_input_scales,
    build_path_model,
    check_scales_exact,
    export_path,
    scale_variants,
    switch_hops,
    with_switch_scales,
)
from hm3.arch.rl_config import Level2Config
from hm3.arch.swaps import averaged_state, layer_swap, swap_paths
from hm3.checkpoint import open_checkpoint
from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.checkpoint.writer import CheckpointWriter
from hm3.errors import ConfigError

LAYERS = 6


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> list[Path]:
    """Language expert, math expert, their average (a blend for transition layers), a merge frame (last)."""
    root = tmp_path_factory.mktemp("swap_pool")
    base = build_random_llama(root / "base", hidden_size=32, num_layers=LAYERS, vocab_size=64, seed=7)
    dirs = [build_finetuned_variant(base, root / n, seed=s, scale=0.2) for n, s in (("lang", 1), ("math", 2))]
    with open_checkpoint(dirs[0]) as a, open_checkpoint(dirs[1]) as b:
        blend = averaged_state({n: a.get(n) for n in a.tensor_names()}, {n: b.get(n) for n in b.tensor_names()})
        config = a.config
    with CheckpointWriter(root / "blend", config=config, tokenizer_from=dirs[0]) as w:
        for name, tensor in blend.items():
            w.add(name, tensor)
    merge = build_finetuned_variant(base, root / "merge", seed=3, scale=0.2)
    return [*dirs, root / "blend", merge]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_swap_is_the_frame_order_with_the_donor_at_both_ends():
    path = layer_swap(LAYERS, frame=3, donor=0, k_bottom=2, k_top=1)
    assert path.hops == ((0, 0), (0, 1), (3, 2), (3, 3), (3, 4), (0, 5))
    assert switch_hops(path) == [2, 5]
    blended = layer_swap(LAYERS, frame=3, donor=0, k_bottom=2, k_top=1, transition=1, blend=2)
    assert [m for m, _ in blended.hops] == [0, 0, 2, 3, 2, 0]
    assert layer_swap(LAYERS, 3, 0, 0, 0) == LayerPath.of_model(3, LAYERS)
    labels = swap_paths(LAYERS, 3, [0, 1], [(1, 1), (2, 0)])
    assert len(labels) == 4 and labels["donor 1 bottom 2 top 0"].hops[:3] == ((1, 0), (1, 1), (3, 2))
    for bad in ({"k_bottom": 4, "k_top": 3}, {"k_bottom": -1, "k_top": 0}):
        with pytest.raises(ConfigError, match="does not fit"):
            layer_swap(LAYERS, 3, 0, **bad)
    with pytest.raises(ConfigError, match="blend"):
        layer_swap(LAYERS, 3, 0, 1, 1, transition=1)


def test_switch_scales_are_sakana_input_scales_at_each_switch():
    path = layer_swap(LAYERS, frame=3, donor=0, k_bottom=2, k_top=1)
    scaled = with_switch_scales(path, 0.5)
    assert scaled.scales == branch_scales_from_input_scales([1, 1, 0.5, 1, 1, 0.5])
    assert with_switch_scales(path, [2.0, 1.0]).scales == branch_scales_from_input_scales([1, 1, 2, 1, 1, 1])
    assert with_switch_scales(LayerPath.of_model(1, 3), 0.5) == LayerPath.of_model(1, 3)  # no switch
    assert with_switch_scales(path, 1.0) == path
    with pytest.raises(ConfigError, match="1 switch scales given for a path with 2 switches"):
        with_switch_scales(path, [0.5])
    assert scale_variants(path, (0.5, 1.0, 2.0)) == [path, with_switch_scales(path, 0.5), with_switch_scales(path, 2.0)]
    assert scale_variants(LayerPath.of_model(0, 3), (0.5,)) == [LayerPath.of_model(0, 3)]


SWAPS = {
    "swap": layer_swap(LAYERS, frame=3, donor=0, k_bottom=2, k_top=1),
    "swap_blend_scaled": layer_swap(LAYERS, frame=1, donor=0, k_bottom=1, k_top=2, transition=1, blend=2,
                                    switch_scale=0.6),
    "framed_by_merge_scaled": with_switch_scales(layer_swap(LAYERS, frame=1, donor=0, k_bottom=2, k_top=1), 1.7),
}


@pytest.mark.parametrize("name", list(SWAPS))
def test_swaps_and_switch_scales_give_equal_logits_in_memory_and_on_disk(pool_dirs, ids, tmp_path, name):
    path = SWAPS[name]
    in_memory = _logits(build_path_model(LayerPool.load(pool_dirs), path), ids)
    exported = AutoModelForCausalLM.from_pretrained(export_path(pool_dirs, path, tmp_path / "out")).eval()
    torch.testing.assert_close(_logits(exported, ids), in_memory, rtol=1e-5, atol=1e-5)
    if path.scales is not None:  # the scale matters: the plain path differs
        plain = _logits(build_path_model(LayerPool.load(pool_dirs), LayerPath(path.hops)), ids)
        assert not torch.allclose(plain, in_memory, atol=1e-3)


@pytest.mark.mergekit
def test_a_scaled_swap_exports_to_mergekit_passthrough_with_scale(pool_dirs, tmp_path, mergekit_merge):
    path = SWAPS["swap_blend_scaled"]
    ours = export_path(pool_dirs, path, tmp_path / "hm3")
    config = (ours / MERGEKIT_CONFIG_FILE).read_text()
    assert "scale" in config and "passthrough" in config
    mergekit_merge(ours / MERGEKIT_CONFIG_FILE, tmp_path / "mk")
    with open_checkpoint(ours) as a, open_checkpoint(tmp_path / "mk") as b:
        assert set(a.tensor_names()) == set(b.tensor_names())
        assert [n for n in a.tensor_names() if not torch.equal(a.get(n), b.get(n))] == []


def test_switch_scales_are_refused_where_not_exact(pool_dirs):
    pool = LayerPool.load(pool_dirs)
    odd = LayerPool.from_states(pool.states, [{**pool.config, "model_type": "gemma2"}] * len(pool.states))
    with pytest.raises(ConfigError, match="only defined for pre-norm models.*'gemma2'"):
        build_path_model(odd, SWAPS["swap_blend_scaled"])
    with pytest.raises(ConfigError, match="'gemma2'"):
        check_scales_exact("gemma2")
    check_scales_exact("llama")


class ScaleLovingScorer:
    """Rewards a scaled path: score 1 for a scale below 1 at the switches, 0.5 plain; records subsets."""

    def __init__(self):
        self.batches: list[list[LayerPath]] = []

    def __call__(self, path):
        return self.score_many([path])[0]

    def score_many(self, paths):
        self.batches.append(list(paths))
        return [np.array([1.0 if p.scales and p.scales[-1] > 1 else 0.5]) for p in paths]


def test_env_searches_the_transition_scale_per_path_on_one_subset():
    scorer = ScaleLovingScorer()
    config = Level2Config(dar=False, transition_scales=(0.5, 2.0))
    env = PathEnv(pool_size=2, num_layers=3, n_objectives=1, scorer=scorer, config=config, lam=np.ones(1))
    env.reset()
    env.step(env.hop_action(0, 0))
    env.step(env.hop_action(1, 1))
    *_, info = env.step(env.stop_action)
    assert len(scorer.batches) == 1 and info["variants"] == 3  # plain, 0.5, 2.0 on one call
    assert info["path"] == with_switch_scales(LayerPath(((0, 0), (1, 1))), 0.5)  # input 0.5 -> branch 2
    assert info["scores"][0] == 1.0
    env.reset()
    env.step(env.hop_action(1, 0))
    *_, info = env.step(env.stop_action)
    assert info["variants"] == 1 and info["path"].scales is None  # no switch: scored once


def test_transition_scales_are_off_by_default_and_validated():
    from pydantic import ValidationError

    assert Level2Config().transition_scales is None
    for bad in ((), (0.0,), (-1.0, 2.0)):
        with pytest.raises(ValidationError, match="transition_scales"):
            Level2Config(transition_scales=bad)


def test_the_best_scaled_path_survives_a_trainer_resume():
    from hm3.arch.level2 import build_trainer

    config = Level2Config(dar=False, transition_scales=(0.5, 2.0), episodes_per_update=4, epochs=1)

    def trainer():
        return build_trainer(pool_size=2, num_layers=3, n_objectives=1, layer_features=torch.randn(2, 3, 4),
                             config=config, scorer=ScaleLovingScorer(), lam=np.ones(1), seed=0)

    first = trainer()
    first.train(8)
    assert first.best is not None and first.best[1].scales is not None
    second = trainer()
    second.load_state_dict(first.state_dict())
    assert second.best[1] == first.best[1]
