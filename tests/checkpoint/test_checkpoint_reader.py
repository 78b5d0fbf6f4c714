"""Reading HF directories lazily: single file, sharded, .bin and tied embeddings equal transformers' own view."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hm3.checkpoint import check_compatible, open_checkpoint
from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama

SPEC = dict(hidden_size=32, num_layers=3, vocab_size=64, seed=3)


def _reference_state(path) -> dict[str, torch.Tensor]:
    """The state dict as transformers loads it: an independent reader to compare against."""
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _assert_reads_state(path):
    expected = _reference_state(path)
    with open_checkpoint(path) as ckpt:
        names = ckpt.tensor_names()
        assert set(names) | {"lm_head.weight"} == set(expected)
        for name, want in expected.items():
            got = ckpt.get(name)
            assert torch.equal(got, want), name
            if ckpt.has(name):
                assert ckpt.shape(name) == tuple(want.shape)
                assert ckpt.dtype(name) == want.dtype
        return names


def test_single_file_safetensors(tiny_llama):
    names = _assert_reads_state(tiny_llama)
    with open_checkpoint(tiny_llama) as ckpt:
        assert ckpt.format == "safetensors"
        assert {ckpt.shard_of(n) for n in names} == {"model.safetensors"}
        assert ckpt.num_layers == 2
        assert not ckpt.tied_embeddings
        assert ckpt.has("lm_head.weight")


def test_sharded_safetensors_follows_index(tmp_path):
    path = build_random_llama(tmp_path / "sharded", sharded_bytes=20_000, **SPEC)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # the test is only meaningful if it is really sharded
    names = _assert_reads_state(path)
    assert names == list(index)
    with open_checkpoint(path) as ckpt:
        assert all(ckpt.shard_of(n) == index[n] for n in names)
        # lazy: reading one tensor opens only its own shard
        ckpt.get(names[0])
        assert list(ckpt._handles) == [path / index[names[0]]]


def test_bin_checkpoint(tmp_path):
    path = build_random_llama(tmp_path / "bin", save_format="bin", **SPEC)
    assert (path / "pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
    _assert_reads_state(path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.format == "bin"
        assert ckpt.num_layers == 3


def test_tied_embeddings(tmp_path):
    path = build_random_llama(tmp_path / "tied", tie_word_embeddings=True, **SPEC)
    _assert_reads_state(path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.tied_embeddings
        assert not ckpt.has("lm_head.weight")
        assert torch.equal(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight"))
        assert ckpt.shape("lm_head.weight") == (64, 32)


def test_tied_and_untied_models_are_compatible(tmp_path):
    tied = build_random_llama(tmp_path / "tied", tie_word_embeddings=True, **SPEC)
    untied = build_random_llama(tmp_path / "untied", **SPEC)
    with open_checkpoint(tied) as a, open_checkpoint(untied) as b:
        check_compatible([a, b])
        check_compatible([b, a])


def test_same_seed_same_weights_and_variant_is_relative_perturbation(tmp_path):
    a = build_random_llama(tmp_path / "a", **SPEC)
    b = build_random_llama(tmp_path / "b", **SPEC)
    v = build_finetuned_variant(a, tmp_path / "v", seed=1, scale=0.05)
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb, open_checkpoint(v) as cv:
        check_compatible([ca, cb, cv])
        for n in ca.tensor_names():
            assert torch.equal(ca.get(n), cb.get(n))
            rel = (cv.get(n) - ca.get(n)).norm() / ca.get(n).norm()
            assert 0.03 < rel < 0.07, (n, rel)


def test_different_seeds_differ(tmp_path):
    a = build_random_llama(tmp_path / "a", **SPEC)
    v1 = build_finetuned_variant(a, tmp_path / "v1", seed=1)
    v2 = build_finetuned_variant(a, tmp_path / "v2", seed=2)
    name = "model.layers.0.mlp.up_proj.weight"
    with open_checkpoint(v1) as c1, open_checkpoint(v2) as c2:
        assert not torch.equal(c1.get(name), c2.get(name))


def test_sharded_bin_with_index(tmp_path):
    src = build_random_llama(tmp_path / "src", save_format="bin", **SPEC)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    out = tmp_path / "sharded_bin"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    for fname, part in halves.items():
        torch.save({n: state[n] for n in part}, out / fname)
    weight_map = {n: f for f, part in halves.items() for n in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(out) as ckpt:
        assert ckpt.tensor_names() == list(weight_map)
        for n in names:
            assert ckpt.shard_of(n) == weight_map[n]
            assert torch.equal(ckpt.get(n), state[n])


def test_builder_refuses_existing_output(tiny_llama):
    from hm3.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match=str(tiny_llama)):
        build_random_llama(tiny_llama, **SPEC)
