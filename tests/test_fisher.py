"""Diagonal Fisher (DF-Merge): equals hand-rolled autograd, caches, and feeds the merge engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.config import parse_merge_config
from hm3.errors import CheckpointError, ConfigError, DataFileError, FisherError
from hm3.fisher import (
    FisherCache,
    FisherKey,
    cached_fisher_for_coefficient,
    diagonal_fisher,
    fisher_for_coefficient,
    load_fisher,
    save_fisher,
)
from hm3.merge import ops
from hm3.merge.engine import merge_to_disk
from hm3.merge.inmemory import InMemoryMerger
from objectives.base import Example, Generate, LogLikelihood

GEN = [Example("g0", "2+3=", "5"), Example("g1", "Say hi: ", "hello")]
MC = [
    Example("c0", "Sky is ", "blue", choices=("blue", "green", "red!")),
    Example("c1", "1+1=", "2", choices=("2", "11")),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fisher")
    kw = {"hidden_size": 32, "num_layers": 2, "vocab_size": 128}
    base = build_random_llama(root / "base", seed=0, **kw)
    return {
        "base": base,
        "tied": build_random_llama(root / "tied", seed=1, tie_word_embeddings=True, **kw),
        "m1": build_finetuned_variant(base, root / "m1", seed=1, scale=0.2),
        "m2": build_finetuned_variant(base, root / "m2", seed=2, scale=0.2),
    }


@pytest.fixture(scope="module")
def tokenizer():
    """One token per printable ASCII character, BOS first (a Llama-like fast tokenizer, built offline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _model(d: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)


def _hand_grads(model, tokenizer, prompt: str, continuation: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Token-mean log p(continuation | prompt) and its gradient, from full logits (no logits_to_keep).

    The prompt's trailing whitespace is scored with the continuation, as the evaluators do."""
    ctx = tokenizer(prompt.rstrip())["input_ids"]
    ids = tokenizer(prompt + continuation)["input_ids"]
    params = dict(model.named_parameters())
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    picked = torch.stack([logp[j - 1, ids[j]] for j in range(len(ctx), len(ids))]).mean()
    grads = torch.autograd.grad(picked, list(params.values()), allow_unused=True)
    zeroed = {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)
    }
    return float(picked.detach()), zeroed


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-10, msg=name)


def test_generative_fisher_equals_hand_rolled_empirical_fisher(dirs, tokenizer):
    model = _model(dirs["m1"])
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for e in GEN:
        _, grads = _hand_grads(model, tokenizer, e.prompt, e.target)
        for n, g in grads.items():
            expected[n] += g**2 / len(GEN)
    fisher = diagonal_fisher(model, tokenizer, GEN, Generate(max_new_tokens=4))
    _assert_close(fisher, expected)
    assert all(f.dtype == torch.float32 for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0


def test_choice_fisher_is_softmax_weighted_sum_of_choice_fishers(dirs, tokenizer):
    model = _model(dirs["m1"])
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    uniform = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for e in MC:
        scored = [_hand_grads(model, tokenizer, e.prompt, c) for c in e.choices]
        probs = torch.softmax(torch.tensor([s for s, _ in scored]), dim=0)
        assert probs.max() - probs.min() > 1e-3  # non-uniform, so the weighting is really tested
        for p_c, (_, grads) in zip(probs.tolist(), scored, strict=True):
            for n, g in grads.items():
                expected[n] += p_c * g**2 / len(MC)
                uniform[n] += g**2 / len(e.choices) / len(MC)
    fisher = diagonal_fisher(model, tokenizer, MC, LogLikelihood())
    _assert_close(fisher, expected)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(fisher[name], uniform[name], rtol=1e-3)


def test_fisher_is_non_negative_and_leaves_the_model_as_it_was(dirs, tokenizer):
    model = _model(dirs["m1"]).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.model.norm.weight.requires_grad_(False)
    fisher = diagonal_fisher(model, tokenizer, GEN + MC[:1], Generate(4))
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert model.training and not model.model.norm.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_names_restrict_the_estimate_and_unknown_names_are_refused(dirs, tokenizer):
    model = _model(dirs["m1"])
    names = ["model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    part = diagonal_fisher(model, tokenizer, GEN, Generate(4), names=names)
    full = diagonal_fisher(model, tokenizer, GEN, Generate(4))
    assert list(part) == names
    _assert_close(part, {n: full[n] for n in names})
    with pytest.raises(FisherError, match="no_such.weight"):
        diagonal_fisher(model, tokenizer, GEN, Generate(4), names=["no_such.weight"])


def test_tied_lm_head_is_keyed_by_the_embedding_name(dirs, tokenizer):
    model = _model(dirs["tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fisher = diagonal_fisher(model, tokenizer, GEN, Generate(4))
    assert "lm_head.weight" not in fisher and "model.embed_tokens.weight" in fisher
    expected = torch.zeros_like(model.model.embed_tokens.weight)
    for e in GEN:  # the embedding's gradient sums its input and output uses
        expected += _hand_grads(model, tokenizer, e.prompt, e.target)[1]["model.embed_tokens.weight"] ** 2 / 2
    torch.testing.assert_close(fisher["model.embed_tokens.weight"], expected, rtol=1e-4, atol=1e-10)
    by_alias = diagonal_fisher(model, tokenizer, GEN, Generate(4), names=["lm_head.weight"])
    assert list(by_alias) == ["model.embed_tokens.weight"]


def test_bad_examples_are_reported_by_id(dirs, tokenizer):
    model = _model(dirs["m1"])
    with pytest.raises(DataFileError, match="'x1'.*no choices"):
        diagonal_fisher(model, tokenizer, [Example("x1", "a", "b")], LogLikelihood())
    with pytest.raises(DataFileError, match="'x2'.*empty target"):
        diagonal_fisher(model, tokenizer, [Example("x2", "a", "")], Generate(4))
    with pytest.raises(FisherError, match="no examples"):
        diagonal_fisher(model, tokenizer, [], Generate(4))


# --- scaled model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merger(dirs) -> InMemoryMerger:
    return InMemoryMerger(dirs["base"], [dirs["m1"], dirs["m2"]], base_ref="base", model_refs=["m1", "m2"])


def test_fisher_for_coefficient_is_the_fisher_of_the_scaled_model_and_restores_weights(
    dirs, merger, tokenizer
):
    live = _model(dirs["m2"])  # holds some other weights, as a search loop's candidate model would
    before = {n: p.detach().clone() for n, p in live.named_parameters()}
    fisher = fisher_for_coefficient(merger, live, 0, 0.6, tokenizer, MC, LogLikelihood())
    for n, p in live.named_parameters():
        assert torch.equal(p, before[n]), n
    scaled = _model(dirs["base"])
    m1 = _model(dirs["m1"]).state_dict()
    with torch.no_grad():
        for n, p in scaled.named_parameters():
            p.add_(0.6 * (m1[n] - p))
    _assert_close(fisher, diagonal_fisher(scaled, tokenizer, MC, LogLikelihood()))
    assert list(fisher) == merger.tensor_names
    with pytest.raises(ConfigError, match="model_index 2"):
        fisher_for_coefficient(merger, live, 2, 0.6, tokenizer, MC, LogLikelihood())


def test_fisher_files_drive_df_merge_and_uniform_fisher_is_task_arithmetic(dirs, merger, tokenizer, tmp_path):
    live = _model(dirs["base"])
    lam = [0.7, 0.4]
    fishers = [fisher_for_coefficient(merger, live, i, lam[i], tokenizer, GEN, Generate(4)) for i in (0, 1)]
    ones = {n: torch.ones_like(f) for n, f in fishers[0].items()}
    paths = {
        "real": [save_fisher(tmp_path / f"f{i}.safetensors", f) for i, f in enumerate(fishers)],
        "uniform": [save_fisher(tmp_path / f"u{i}.safetensors", ones) for i in (0, 1)],
    }

    def merged(kind: str | None) -> dict[str, torch.Tensor]:
        models = []
        for i, ref in enumerate(("m1", "m2")):
            params = {"weight": lam[i]} | ({"fisher": str(paths[kind][i])} if kind else {})
            models.append({"model": str(dirs[ref]), "parameters": params})
        recipe = {"merge_method": "task_arithmetic", "base_model": str(dirs["base"]), "models": models}
        out = tmp_path / f"out-{kind}"
        merge_to_disk(parse_merge_config(recipe), out)
        return load_file(out / "model.safetensors")

    plain, uniform, weighted = merged(None), merged("uniform"), merged("real")
    for n in merger.tensor_names:
        torch.testing.assert_close(uniform[n], plain[n], rtol=1e-5, atol=1e-6)
        expected = ops.df_merge(merger.base[n], merger.deltas[n], [fishers[0][n], fishers[1][n]], lam)
        torch.testing.assert_close(weighted[n], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        weighted["model.layers.0.mlp.up_proj.weight"], plain["model.layers.0.mlp.up_proj.weight"]
    )


# --- files and cache ---------------------------------------------------------------------------


def test_save_and_load_fisher_round_trip_and_refuse_bad_tensors(tmp_path):
    fisher = {"a": torch.rand(3, 2), "b": torch.rand(4)}
    path = save_fisher(tmp_path / "sub" / "f.safetensors", fisher)
    _assert_close(load_fisher(path), fisher)
    assert [p.name for p in path.parent.iterdir()] == ["f.safetensors"]  # no temp file left behind
    with pytest.raises(FisherError, match="'b'.*negative"):
        save_fisher(tmp_path / "bad.safetensors", {"a": torch.ones(2), "b": -torch.ones(2)})
    assert not (tmp_path / "bad.safetensors").exists()
    save_file({"x": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.safetensors")
    with pytest.raises(FisherError, match="'x'.*non-finite"):
        load_fisher(tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FisherError, match="junk.safetensors"):
        load_fisher(tmp_path / "junk.safetensors")


class _Counter:
    def __init__(self, value: dict[str, torch.Tensor]):
        self.value, self.calls = value, 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.value


def test_key_rounds_the_coefficient_to_1e_3():
    assert FisherKey("m", 0.5004, "t", ("a",)) == FisherKey("m", 0.4996, "t", ["a"])
    assert FisherKey("m", 0.5004, "t", ("a",)) != FisherKey("m", 0.501, "t", ("a",))
    assert FisherKey("m", -0.0001, "t", ()).coefficient == 0.0
    with pytest.raises(ConfigError, match="not finite"):
        FisherKey("m", float("nan"), "t", ())


def test_cache_hit_skips_compute_in_memory_and_on_disk(tmp_path):
    compute = _Counter({"w": torch.rand(5)})
    key = FisherKey("m1", 0.3, "zoo:math", ("e1", "e2"))
    cache = FisherCache.for_run(tmp_path)
    first = cache.get_or_compute(key, compute)
    again = cache.get_or_compute(FisherKey("m1", 0.3002, "zoo:math", ("e1", "e2")), compute)
    assert compute.calls == 1 and torch.equal(first["w"], again["w"])
    assert (tmp_path / "fisher" / key.file_name()).is_file()

    resumed = FisherCache.for_run(tmp_path)  # a new process: memory empty, files remain
    loaded = resumed.get_or_compute(key, _Counter({}))
    assert torch.equal(loaded["w"], first["w"])
    other = _Counter({"w": torch.rand(5)})
    resumed.get_or_compute(FisherKey("m1", 0.3, "zoo:math", ("e1", "e3")), other)
    assert other.calls == 1


def test_cache_recomputes_a_corrupt_or_mismatched_file(tmp_path):
    key = FisherKey("m1", 0.3, "t", ("e1",))
    cache = FisherCache(tmp_path)
    path = cache.path_for(key)
    assert path is not None
    path.write_bytes(b"truncated")
    fresh = _Counter({"w": torch.ones(2)})
    assert torch.equal(FisherCache(tmp_path).get_or_compute(key, fresh)["w"], torch.ones(2))
    save_fisher(path, {"w": torch.zeros(2)}, metadata={"hm3_fisher_key": "something else"})
    again = _Counter({"w": torch.ones(2)})
    FisherCache(tmp_path).get_or_compute(key, again)
    assert fresh.calls == 1 and again.calls == 1
    assert torch.equal(load_fisher(path)["w"], torch.ones(2))


def test_memory_cache_evicts_least_recently_used_by_bytes():
    cache = FisherCache(max_bytes=2 * 40)  # room for two 10-float tensors
    keys = [FisherKey("m", c, "t", ()) for c in (0.1, 0.2, 0.3)]
    counters = [_Counter({"w": torch.rand(10)}) for _ in keys]
    cache.get_or_compute(keys[0], counters[0])
    cache.get_or_compute(keys[1], counters[1])
    cache.get_or_compute(keys[0], counters[0])  # 0 is now the most recent
    cache.get_or_compute(keys[2], counters[2])  # evicts 1
    cache.get_or_compute(keys[0], counters[0])
    cache.get_or_compute(keys[1], counters[1])
    assert [c.calls for c in counters] == [1, 2, 1]
    with pytest.raises(FisherError, match="negative"):
        cache.get_or_compute(FisherKey("m", 0.9, "t", ()), _Counter({"w": -torch.ones(1)}))


def test_cached_fisher_for_coefficient_uses_the_rounded_coefficient(dirs, merger, tokenizer, tmp_path):
    live = _model(dirs["base"])
    cache = FisherCache.for_run(tmp_path)
    a = cached_fisher_for_coefficient(cache, merger, live, 1, 0.2504, tokenizer, "t", GEN[:1], Generate(4))
    b = cached_fisher_for_coefficient(cache, merger, live, 1, 0.2496, tokenizer, "t", GEN[:1], Generate(4))
    direct = fisher_for_coefficient(merger, live, 1, 0.25, tokenizer, GEN[:1], Generate(4))
    _assert_close(a, direct)
    assert all(a[n] is b[n] for n in a)  # second call served from memory
    assert len(list((tmp_path / "fisher").iterdir())) == 1


def test_fishers_set_on_the_in_memory_merger_give_df_merge(dirs, merger, tokenizer):
    live = _model(dirs["base"])
    lam = [0.5, 0.8]
    fishers = {
        ref: fisher_for_coefficient(merger, live, i, lam[i], tokenizer, MC[1:], LogLikelihood())
        for i, ref in enumerate(merger.model_refs)
    }
    recipe = parse_merge_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [
                {"model": ref, "parameters": {"weight": lam[i], "fisher": f"{ref}.safetensors"}}
                for i, ref in enumerate(merger.model_refs)
            ],
        }
    )
    merger.set_fishers(fishers)
    try:
        merged = merger.merged_state(recipe)
    finally:
        merger.set_fishers(None)
    for n in merger.tensor_names:
        expected = ops.df_merge(merger.base[n], merger.deltas[n], [fishers["m1"][n], fishers["m2"][n]], lam)
        torch.testing.assert_close(merged[n], expected, rtol=1e-5, atol=1e-6)


def _ones_with(merger: InMemoryMerger, name: str, tensor: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A uniform Fisher for every tensor of ``merger``, ``name``'s replaced by ``tensor`` (None: left out)."""
    fisher = {n: torch.ones_like(merger.base[n]) for n in merger.tensor_names}
    if tensor is None:
        del fisher[name]
    else:
        fisher[name] = tensor
    return fisher


@pytest.mark.parametrize("bad", ["missing", "row", "vector"])
def test_in_memory_merger_refuses_a_fisher_that_does_not_fit_its_tensors(merger, bad):
    """A Fisher of another shape would broadcast silently against the task vectors (one row's
    importance for every row), and a missing tensor is a bad Fisher, not an internal KeyError."""
    name = "model.layers.0.mlp.up_proj.weight"
    rows, cols = merger.base[name].shape
    wrong = {"missing": None, "row": torch.ones(1, cols), "vector": torch.ones(cols)}[bad]
    fishers = {"m1": _ones_with(merger, name, torch.ones(rows, cols)), "m2": _ones_with(merger, name, wrong)}
    with pytest.raises(FisherError, match=rf"'m2'.*{name}"):
        merger.set_fishers(fishers)


def test_merge_engine_refuses_a_fisher_file_whose_tensor_has_another_shape(dirs, merger, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    good = save_fisher(tmp_path / "good.safetensors", _ones_with(merger, name, torch.ones_like(merger.base[name])))
    cols = merger.base[name].shape[1]
    bad = save_fisher(tmp_path / "bad.safetensors", _ones_with(merger, name, torch.ones(1, cols)))
    models = [{"model": str(dirs[ref]), "parameters": {"weight": 0.5, "fisher": str(path)}}
              for ref, path in (("m1", good), ("m2", bad))]
    recipe = {"merge_method": "df_merge", "base_model": str(dirs["base"]), "models": models}
    with pytest.raises(CheckpointError, match=rf"{name}.*bad.safetensors.*\(1, {cols}\)"):
        merge_to_disk(parse_merge_config(recipe), tmp_path / "out")


def test_point_file_of_a_fisher_weighted_recipe_merges_from_any_directory(dirs, merger, tmp_path, monkeypatch):
    """A search stores its Fisher files' paths as it wrote them (relative where RUN_DIR was given relative);
    the point file names every input absolutely so that ``hm3 merge`` runs it anywhere, Fisher files too."""
    from hm3.run.front import recipe_with_paths

    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    fishers = {ref: {n: torch.rand(merger.base[n].shape, generator=gen) for n in merger.tensor_names}
               for ref in merger.model_refs}
    paths = {ref: save_fisher(Path("run") / "fisher" / f"{ref}.safetensors", f) for ref, f in fishers.items()}
    stored = {"merge_method": "df_merge", "base_model": "base",
              "models": [{"model": ref, "parameters": {"weight": w, "fisher": str(paths[ref])}}
                         for ref, w in (("m1", 0.6), ("m2", 0.3))]}
    point = recipe_with_paths(stored, {ref: str(d) for ref, d in dirs.items()})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    merge_to_disk(parse_merge_config(point), tmp_path / "out")
    merger.set_fishers(fishers)
    try:
        scored = merger.merged_state(parse_merge_config(stored))
    finally:
        merger.set_fishers(None)
    on_disk = load_file(tmp_path / "out" / "model.safetensors")
    for n in merger.tensor_names:
        torch.testing.assert_close(on_disk[n], scored[n], rtol=1e-6, atol=1e-7)
