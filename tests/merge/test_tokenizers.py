"""Merges over models whose vocabularies differ: ``tokenizer_source`` (base, union, a model) and the ``tokenizer``
block, against mergekit 0.1.5 on tiny models with tokenizers of their own; the row rules on their own; the
refusals.

The family: ``base`` and ``m1`` (a variant of it) share vocabulary A, whose embedding has two rows more than
the tokenizer has tokens (padding, which a tokenizer-aware merge drops, as mergekit does); ``m2`` and ``m3``
are other random models of the same shapes with vocabularies B and C: some of A's tokens at other ids, some
missing, new ones, and added special tokens (``<tool>`` in both).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hm3.checkpoint.synthetic import build_finetuned_variant, build_random_llama
from hm3.cli import main
from hm3.config import TokenSetting, parse_merge_config
from hm3.errors import ConfigError, IncompatibleModelsError
from hm3.merge.engine import merge_to_disk
from hm3.merge.plan import plan_merge
from hm3.merge.vocab import merged_vocabulary, remap_rows, row_plan

SPECIALS = ("<pad>", "<s>", "</s>")
VOCABS = {  # ordinary tokens after the specials, then added tokens: (content, special)
    "A": ("abcdefgh", []),
    "B": ("hgfxyzab", [("<tool>", True)]),
    "C": ("xyqzcab", [("<tool>", True), ("<eot>", True)]),
}
PADDING = {"A": 2, "B": 0, "C": 0}  # embedding rows past the tokenizer


def _tokenizer(name: str):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    ordinary, added = VOCABS[name]
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *ordinary])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    for content, special in added:
        tok.add_tokens([content], special_tokens=special)
    return tok


def _model(root: Path, name: str, vocab: str, seed: int) -> Path:
    tok = _tokenizer(vocab)
    out = build_random_llama(root / name, hidden_size=16, num_layers=3, vocab_size=len(tok) + PADDING[vocab],
                             seed=seed)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tokenizers")
    base = _model(root, "base", "A", 0)
    m1 = build_finetuned_variant(base, root / "m1", seed=1, scale=0.05)
    _tokenizer("C").save_pretrained(root / "tokenizer_c")  # a tokenizer without a model
    return {"root": str(root), "base": str(base), "m1": str(m1), "m2": str(_model(root, "m2", "B", 2)),
            "m3": str(_model(root, "m3", "C", 3)), "tokenizer_c": str(root / "tokenizer_c")}


def _recipes(f: dict[str, str]) -> dict[str, dict]:
    def task_arithmetic(**extra) -> dict:
        return {
            "merge_method": "task_arithmetic",
            "base_model": f["base"],
            "models": [{"model": f["m1"], "parameters": {"weight": 0.6}}, {"model": f["m2"], "parameters": {"weight": 0.3}},
                       {"model": f["m3"], "parameters": {"weight": 0.4}}],
            "dtype": "float32",
            **extra,
        }

    return {
        "union": task_arithmetic(tokenizer_source="union"),
        "base": task_arithmetic(tokenizer_source="base"),
        "model": task_arithmetic(tokenizer_source=f["m3"]),
        "unmerged_model": {**task_arithmetic(tokenizer_source=f["tokenizer_c"]), "models": [
            {"model": f["m1"], "parameters": {"weight": 0.6}}, {"model": f["m2"], "parameters": {"weight": 0.3}}]},
        "block": {  # no base: the rows of tokens some models lack are their means
            "merge_method": "linear",
            "models": [{"model": f["m2"], "parameters": {"weight": 0.5}}, {"model": f["m3"], "parameters": {"weight": 0.3}},
                       {"model": f["m1"], "parameters": {"weight": 0.2}}],
            "dtype": "float32",
            "tokenizer": {
                "source": "union",
                "pad_to_multiple_of": 8,
                "tokens": {
                    "a": {"source": f["m3"], "force": True},
                    "<new>": {"source": {"kind": "zero"}},
                    "<copy>": {"source": {"kind": "model_token", "model": f["m2"], "token": "x"}},
                    "<row>": {"source": {"kind": "model_token", "model": f["m1"], "token_id": 12}},  # a padding row
                    "z": {"source": f["m2"]},  # m1 lacks it: m2's row, not the mean of m2's and m3's
                },
            },
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": f["m2"],
            "models": [{"model": f["m2"]}, {"model": f["base"]}],
            "parameters": {"t": [0.2, 0.7]},
            "dtype": "float32",
            "tokenizer": {"source": f["base"]},
        },
        "slices": {  # the embedding comes from the base alone and the LM head from m2 alone: each lacks tokens
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": f["base"], "layer_range": [0, 2]}]},
                       {"sources": [{"model": f["m2"], "layer_range": [1, 3]}]}],
            "tokenizer_source": "union",
        },
    }


def _vocab(directory: Path) -> tuple[dict[str, int], dict[str, bool]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    return tok.get_vocab(), {t.content: t.special for t in tok.added_tokens_decoder.values()}


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _by_token(tensors: dict[str, torch.Tensor], vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """The vocabulary tensors' rows keyed by token (padding rows by position), the others as they are."""
    out = {}
    for name, t in tensors.items():
        if name in VOCAB_TENSORS:
            out.update({f"{name}[{tok}]": t[i] for tok, i in vocab.items()})
            out.update({f"{name}[pad {i}]": t[i] for i in range(len(vocab), t.shape[0])})
        else:
            out[name] = t
    return out


@pytest.mark.mergekit
@pytest.mark.parametrize("name", ["union", "base", "model", "unmerged_model", "block", "slerp", "slices"])
def test_hm3_equals_mergekit_over_different_vocabularies(family, tmp_path, name, mergekit_merge):
    """Every tensor within 1e-6 of mergekit's (vocabulary rows compared token by token) and the same tokenizer.

    mergekit appends a union's new tokens in an order that changes from run to run, so there the ids are
    compared for the base's tokens (theirs in both) and as one range for the others; a tokenizer taken
    from one model has the same ids in both.
    """
    recipe = _recipes(family)[name]
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(recipe))
    mk_out, hm_out = tmp_path / "mergekit", tmp_path / "hm3"
    mergekit_merge(cfg, mk_out)
    assert main(["merge", str(cfg), str(hm_out)]) == 0

    ours_vocab, ours_added = _vocab(hm_out)
    theirs_vocab, theirs_added = _vocab(mk_out)
    assert set(ours_vocab) == set(theirs_vocab)
    assert {t for t, special in ours_added.items() if special} == {t for t, special in theirs_added.items() if special}
    source = (recipe.get("tokenizer") or {}).get("source") or recipe.get("tokenizer_source")
    if source != "union":
        assert ours_vocab == theirs_vocab and ours_added == theirs_added
    elif "base_model" in recipe:  # without one, mergekit's base is any of the models (it keeps them in a set)
        base_vocab = _vocab(Path(recipe["base_model"]))[0]
        assert all(ours_vocab[t] == theirs_vocab[t] == i for t, i in base_vocab.items())
        assert ours_added == theirs_added  # the other models' tokens are added tokens in both

    ours, theirs = load_file(hm_out / "model.safetensors"), load_file(mk_out / "model.safetensors")
    assert set(ours) == set(theirs)
    assert {k: t.shape for k, t in ours.items()} == {k: t.shape for k, t in theirs.items()}
    ours, theirs = _by_token(ours, ours_vocab), _by_token(theirs, theirs_vocab)
    assert set(ours) == set(theirs)
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
    print(f"{name}: max |hm3 - mergekit| = {worst:.3g}")
    assert worst <= 1e-6, name
    assert yaml.safe_load((hm_out / "config.json").read_text())["vocab_size"] == \
        yaml.safe_load((mk_out / "config.json").read_text())["vocab_size"]


def test_the_rules_for_each_row(family, tmp_path):
    """The union of A, B and C merged by task arithmetic: each token's row in each model, by hand.

    Tokens some models lack take the base's row where the base has the token, the one model's row where
    only one has it; the padding rows of A are gone.
    """
    recipe = _recipes(family)["union"]
    out = tmp_path / "out"
    merge_to_disk(parse_merge_config(recipe), out)
    vocab, _ = _vocab(out)
    rows = {k: load_file(Path(family[k]) / "model.safetensors")["model.embed_tokens.weight"]
            for k in ("base", "m1", "m2", "m3")}
    own = {k: _vocab(Path(family[k]))[0] for k in rows}

    def row(model: str, token: str) -> torch.Tensor:
        """The row of ``token`` in ``model`` once in the union's vocabulary."""
        if token in own[model]:
            return rows[model][own[model][token]]
        have = [k for k in rows if token in own[k]]
        if "base" in have or len(have) == 1:
            donor = "base" if "base" in have else have[0]
            return rows[donor][own[donor][token]]
        return sum(rows[k][own[k][token]] for k in have) / len(have)  # x and z: in m2 and m3 only

    merged = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert merged.shape[0] == len(vocab) == 3 + 8 + 4 + 2  # specials, A's tokens, x y z q, <tool> <eot>
    for token, i in vocab.items():
        expected = row("base", token) + sum(
            w * (row(k, token) - row("base", token)) for k, w in (("m1", 0.6), ("m2", 0.3), ("m3", 0.4)))
        assert torch.allclose(merged[i], expected, atol=1e-6), token


def test_row_plan_fills_missing_rows_by_mergekits_rules():
    """Hand-made positions: a donor, the base's row, a mean, zeros, a forced source, padding."""
    tokens = {"t0": 0, "t1": 1, "t2": 2, "t3": 3, "t4": 4}
    model_rows = {
        0: {"t0": 0, "t1": 1},            # the base
        1: {"t0": 1, "t1": 0, "t2": 2},
        2: {"t0": 2, "t2": 0, "t4": 1},
    }
    settings = {"t0": TokenSetting(source="m2", force=True)}
    vocab = merged_vocabulary(tokens, model_rows, {0: "b", 1: "m1", 2: "m2"}, {0: 2, 1: 3, 2: 3}, settings,
                              {"b": 0, "m1": 1, "m2": 2}, pad_to_multiple_of=3)
    tensors = [torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 10 * (k + 1) for k, n in enumerate((2, 3, 3))]
    before = [t.clone() for t in tensors]
    out = remap_rows(row_plan(vocab, [0, 1, 2], 0, tensor="emb", input_rows=[2, 3, 3]), tensors)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))  # inputs untouched
    b, m1, m2 = tensors
    t0 = m2[2]  # forced: m2's row in every model
    t1 = b[1]  # base and m1 have it: the base's row where m2 lacks it
    t2 = (m1[2] + m2[0]) / 2  # the base lacks it: the mean of the others'
    t4 = m2[1]  # only m2 has it
    zero = torch.zeros(2)  # t3: no model has it
    expected = [
        [t0, b[1], t2, zero, t4],
        [t0, m1[0], m1[2], zero, t4],
        [t0, t1, m2[0], zero, m2[1]],
    ]
    for k, rows in enumerate(expected):
        assert out[k].shape == (6, 2)
        assert torch.equal(out[k][:5], torch.stack(rows)), k
        assert torch.equal(out[k][5], out[k][:5].mean(dim=0))  # padding: the mean of the model's rows
    # without a base among the inputs, t1 (in b and m1, not m2) is the mean of theirs
    out = remap_rows(row_plan(vocab, [0, 1, 2], None, tensor="emb", input_rows=[2, 3, 3]), tensors)
    assert torch.equal(out[2][1], (b[1] + m1[0]) / 2)


def test_different_vocabularies_without_a_tokenizer_are_refused_by_name(family, tmp_path, capsys):
    recipe = _recipes(family)["union"]
    del recipe["tokenizer_source"]
    with pytest.raises(IncompatibleModelsError) as err:
        plan_merge(parse_merge_config(recipe))
    message = str(err.value)
    assert message.startswith("the models' vocabularies differ: ")
    for ref, rows in (("base", 13), ("m1", 13), ("m2", 12), ("m3", 12)):
        assert f"{family[ref]} has {rows} embedding rows (vocab_size {rows})" in message
    assert "'tokenizer_source' (base, union or a model)" in message
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 3 and not (tmp_path / "out").exists()
    assert "vocabularies differ" in capsys.readouterr().err


@pytest.mark.mergekit
def test_mergekit_refuses_different_vocabularies_without_a_tokenizer_too(family, tmp_path, mergekit_merge):
    recipe = _recipes(family)["union"]
    del recipe["tokenizer_source"]
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="Tensor size mismatch"):
        mergekit_merge(cfg, tmp_path / "out")


def test_a_tokenizer_over_one_vocabulary_leaves_the_rows_as_they_are(family, tmp_path):
    """Models that already share the tokenizer's vocabulary row for row are not rearranged (the same tensors
    as a merge without a tokenizer), and the tokenizer files are the source's, copied."""
    recipe = {"merge_method": "linear", "models": [{"model": family["m2"], "parameters": {"weight": 0.5}},
                                                   {"model": family["m2"], "parameters": {"weight": 0.5}}]}
    recipe["models"][1]["model"] = str(build_finetuned_variant(family["m2"], tmp_path / "v", seed=4, scale=0.1))
    plan = plan_merge(parse_merge_config(recipe | {"tokenizer_source": "base"}))
    assert plan.tokenizer is not None and plan.tokenizer.built is None
    assert all(job.rows is None for job in plan.jobs)
    plan.close()
    merge_to_disk(parse_merge_config(recipe | {"tokenizer_source": "base"}), tmp_path / "a")
    merge_to_disk(parse_merge_config(recipe), tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (Path(family["m2"]) / "tokenizer.json").read_bytes()


def test_only_vocabulary_tensors_are_rearranged_in_the_plan(family):
    plan = plan_merge(parse_merge_config(_recipes(family)["union"]))
    remapped = {job.name for job in plan.jobs if job.rows is not None}
    assert remapped == set(VOCAB_TENSORS)
    embed, head = (next(j for j in plan.jobs if j.name == n) for n in VOCAB_TENSORS)
    assert embed.rows is head.rows  # one rearrangement for the same inputs
    assert plan.output_shape(embed) == (17, 16) and plan.output_config["vocab_size"] == 17
    plan.close()


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"tokenizer": {"source": "union"}}, ConfigError, "give 'tokenizer_source' or a 'tokenizer' block, not both"),
    ({"tokenizer_source": "./no-such-model"}, ConfigError, "model './no-such-model' not found"),
    ({"tokenizer_source": None, "tokenizer": {"source": "union", "tokens": {"q": {"source": "elsewhere"}}}},
     ConfigError, r"tokenizer.tokens\['q'\].source: model 'elsewhere' is not one of the merged models"),
    ({"tokenizer_source": None, "tokenizer": {"source": "union", "tokens": {"q": {"force": True}}}},
     ConfigError, r"tokenizer.tokens\['q'\] gives no source, and .* needs one: it is forced"),
    ({"tokenizer_source": None, "tokenizer": {"source": "union", "tokens": {"q": {"source": "M1"}}}},
     ConfigError, r"tokenizer.tokens\['q'\].source: model .*/m1 has no token 'q'"),
    ({"tokenizer_source": None, "tokenizer": {"source": "base", "tokens": {
        "q": {"source": {"kind": "model_token", "model": "M1", "token_id": 13}}}}},
     ConfigError, r"tokenizer.tokens\['q'\]: row 13 of model .*/m1 is past its 13 rows of "),
    ({"tokenizer_source": None, "tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, ConfigError,
     "pad_to_multiple_of"),
])
def test_bad_tokenizer_settings_are_refused_before_anything_is_written(family, change, error, message):
    recipe = _recipes(family)["union"] | change
    if recipe.get("tokenizer_source") is None:
        recipe.pop("tokenizer_source", None)
    text = yaml.safe_dump(recipe).replace("M1", family["m1"])
    with pytest.raises(error, match=message):
        plan_merge(parse_merge_config(yaml.safe_load(text)))


def test_a_base_tokenizer_longer_than_its_embedding_is_refused(family, tmp_path):
    """mergekit strips such a tokenizer (BPE only); hm3 refuses it by name rather than write a tokenizer whose
    tokens have no rows."""
    small = build_random_llama(tmp_path / "small", hidden_size=16, num_layers=3, vocab_size=8, seed=5)
    _tokenizer("A").save_pretrained(small)  # 11 tokens, 8 rows
    recipe = _recipes(family)["union"] | {"base_model": str(small)}
    with pytest.raises(ConfigError, match=r"has 3 token\(s\) at ids 8..10, past its 8 embedding rows"):
        plan_merge(parse_merge_config(recipe))
    recipe["tokenizer_source"] = family["m2"]  # another tokenizer: the base's extra tokens count as absent
    plan_merge(parse_merge_config(recipe)).close()


def test_base_over_models_without_tokenizer_files_merges_as_before(tmp_path):
    base = build_random_llama(tmp_path / "base", hidden_size=16, num_layers=1, vocab_size=12, seed=0)
    other = build_random_llama(tmp_path / "other", hidden_size=16, num_layers=1, vocab_size=10, seed=1)
    m1 = build_finetuned_variant(base, tmp_path / "m1", seed=1)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": "base",
              "models": [{"model": str(m1), "parameters": {"weight": 1.0}}]}
    plan = plan_merge(parse_merge_config(recipe))
    assert plan.tokenizer is None and all(job.rows is None for job in plan.jobs)
    plan.close()
    recipe["models"].append({"model": str(other), "parameters": {"weight": 1.0}})
    with pytest.raises(IncompatibleModelsError, match="vocabularies differ"):
        plan_merge(parse_merge_config(recipe))
    with pytest.raises(ConfigError, match=r"the base model .*base.* has no tokenizer files"):
        plan_merge(parse_merge_config(recipe | {"tokenizer_source": "union"}))


def test_the_tokenizer_block_exports_to_mergekit_unchanged(family, tmp_path):
    from hm3.merge.export import to_mergekit

    recipe = _recipes(family)["block"]
    assert to_mergekit(parse_merge_config(recipe))["tokenizer"] == recipe["tokenizer"] | {
        "tokens": {k: {"force": False} | v for k, v in recipe["tokenizer"]["tokens"].items()}}


def test_a_model_without_tokenizer_files_is_taken_to_have_the_bases_vocabulary(family, tmp_path):
    """As in mergekit: m1 without its tokenizer files (the base's) merges exactly as m1 with them."""
    import shutil

    bare = Path(shutil.copytree(family["m1"], tmp_path / "m1_bare"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    recipe = _recipes(family)["union"]
    merge_to_disk(parse_merge_config(recipe), tmp_path / "with")
    recipe["models"][0]["model"] = str(bare)
    merge_to_disk(parse_merge_config(recipe), tmp_path / "without")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("with", "without"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _vocab(tmp_path / "with") == _vocab(tmp_path / "without")
