"""The transformers backend against plain, unbatched transformers calls on tiny random models."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import build_tiny_lm, save_char_tokenizer

from hm3.checkpoint.synthetic import build_random_llama
from hm3.errors import BackendError, CheckpointError
from hm3.eval.backend import cut_at_stop, encode_pair, open_backend
from hm3.eval.hf import HFBackend

PROMPTS = ["hello", "a much longer prompt than the others", "x", "12+34=", "the cat sat on"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    return {
        "a": build_tiny_lm(root / "a", seed=0),
        "b": build_tiny_lm(root / "b", seed=1),
        "tied_a": build_tiny_lm(root / "tied_a", seed=2, tie_word_embeddings=True),
        "tied_b": build_tiny_lm(root / "tied_b", seed=3, tie_word_embeddings=True),
    }


@pytest.fixture(scope="module")
def backend_a(models) -> HFBackend:
    return HFBackend.from_pretrained(models["a"], batch_size=2)


def test_batched_generation_equals_one_by_one(backend_a):
    batched = backend_a.generate(PROMPTS, max_new_tokens=12)
    single = [backend_a.generate([p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(o) > 0 for o in batched)  # random weights rarely emit EOS this early


def test_generation_matches_manual_greedy_loop(backend_a):
    """Token by token argmax without cache or padding: the reference the batched path must equal."""
    model, tok = backend_a.model, backend_a.tokenizer
    prompt = PROMPTS[1]
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(10):
            nxt = int(
                model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits[0, -1].argmax()
            )
            if nxt in backend_a.eos_ids:
                break
            new.append(nxt)
    assert backend_a.generate([prompt], max_new_tokens=10) == [tok.decode(new, skip_special_tokens=True)]


def test_stop_strings_cut_output(backend_a):
    full = backend_a.generate(PROMPTS, max_new_tokens=16)
    stop = full[0][3]  # a character the first output is known to contain
    stopped = backend_a.generate(PROMPTS, max_new_tokens=16, stop=[stop, "\x00never"])
    assert stopped == [cut_at_stop(o, [stop]) for o in full]
    assert stopped[0] == full[0][: full[0].index(stop)]


def test_a_stop_string_spanning_prompt_and_output_does_not_stop_generation(backend_a):
    """Stop strings are searched in the new text only (as vLLM and lm-eval's HFLM do): a prompt ending in
    "\\n" and a stop "\\n\\n" must not end an answer whose first token is "\\n"."""
    full = backend_a.generate(PROMPTS, max_new_tokens=16)
    stops = [p[-1] + o[0] for p, o in zip(PROMPTS, full, strict=True)]  # the prompt's last char + the first new one
    for prompt, out, stop in zip(PROMPTS, full, stops, strict=True):
        assert backend_a.generate([prompt], max_new_tokens=16, stop=[stop]) == [cut_at_stop(out, [stop])]
    assert backend_a.generate(PROMPTS, max_new_tokens=16, stop=stops[:1]) == [cut_at_stop(o, stops[:1]) for o in full]


def test_generation_stays_greedy_whatever_the_models_generation_config_says(models, backend_a, tmp_path):
    """A generation_config.json's sampling and penalty settings (Qwen2.5-Instruct ships do_sample and
    repetition_penalty 1.05) must not change greedy answers: only its EOS ids are read, as vLLM reads it."""
    model = shutil.copytree(models["a"], tmp_path / "a")
    (model / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_k": 20,
         "repetition_penalty": 5.0, "no_repeat_ngram_size": 2, "min_new_tokens": 4}))
    configured = HFBackend.from_pretrained(model, batch_size=2)
    assert configured.generate(PROMPTS, max_new_tokens=16) == backend_a.generate(PROMPTS, max_new_tokens=16)
    assert configured.model.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


def test_cut_at_stop_takes_earliest_stop():
    assert cut_at_stop("abcXdefYg", ["Y", "X"]) == "abc"
    assert cut_at_stop("abc", ["", "z"]) == "abc"
    assert cut_at_stop("Xabc", ["X"]) == ""


def _manual_loglikelihood(backend: HFBackend, context: str, continuation: str) -> float:
    ctx, cont = encode_pair(backend.tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(backend.model(ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


def test_loglikelihood_equals_manual_forward(backend_a):
    requests = [
        ("hello", " world"),
        ("", "abc"),
        ("Question: 2+2\nAnswer:", " 4"),
        ("q", "a long continuation"),
    ]
    got = backend_a.loglikelihood(requests)
    want = [_manual_loglikelihood(backend_a, c, t) for c, t in requests]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert all(v < 0 for v in got)


def test_requests_reading_the_same_input_share_a_row_and_each_equals_its_own_forward(backend_a):
    """Choices that differ only in their last token are read from one row; requests whose contexts split one
    input at different places read different spans of it. Each answer must equal a forward of its own."""
    encoded = {c + t: encode_pair(backend_a.tokenizer, c, t) for c, t in [("Q: 12", " ab"), ("Q: 12 a", "b")]}
    assert len({tuple(ctx + cont[:-1]) for ctx, cont in encoded.values()}) == 1  # one input, split twice
    requests = [("Q: 12", " ab"), ("Q: 12", " ac"), ("Q: 12", " ad"), ("Q: 12 a", "b"), ("Q: 9", " ab")]
    rows = []
    hook = backend_a.model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                                     with_kwargs=True)
    try:
        got = backend_a.greedy_loglikelihood(requests)
    finally:
        hook.remove()
    assert sum(rows) == 2  # "Q: 12 a" (four requests) and "Q: 9 a"
    want = [_manual_loglikelihood(backend_a, c, t) for c, t in requests]
    assert [score for score, _ in got] == pytest.approx(want, rel=1e-5, abs=1e-5)
    for (context, continuation), (_, greedy) in zip(requests, got, strict=True):
        ctx, cont = encode_pair(backend_a.tokenizer, context, continuation)
        with torch.no_grad():
            picks = backend_a.model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1].argmax(-1)
        assert greedy == (picks.tolist() == cont)


def test_encode_pair_moves_trailing_space_and_conditions_empty_context(backend_a):
    tok = backend_a.tokenizer
    ctx, cont = encode_pair(tok, "Answer: ", "4")
    assert tok.decode(cont) == " 4"
    ctx, cont = encode_pair(tok, "", "ab")
    assert ctx == [tok.bos_token_id]
    with pytest.raises(BackendError, match="empty continuation"):
        encode_pair(tok, "x", "")


def _logits(backend: HFBackend, text: str) -> torch.Tensor:
    with torch.no_grad():
        return backend.model(**backend.tokenizer(text, return_tensors="pt")).logits


@pytest.mark.parametrize(("src", "dst"), [("a", "b"), ("tied_a", "tied_b")])
def test_load_state_in_place_equals_fresh_load(models, src, dst):
    backend = HFBackend.from_pretrained(models[src], batch_size=3)
    fresh = HFBackend.from_pretrained(models[dst], batch_size=3)
    ptrs = {n: p.data_ptr() for n, p in backend.live_parameters().items()}
    before = _logits(backend, PROMPTS[1])
    backend.load_state(load_file(models[dst] / "model.safetensors"))
    assert {n: p.data_ptr() for n, p in backend.live_parameters().items()} == ptrs
    assert torch.equal(_logits(backend, PROMPTS[1]), _logits(fresh, PROMPTS[1]))
    after = backend.generate(PROMPTS, max_new_tokens=8)
    assert after == fresh.generate(PROMPTS, max_new_tokens=8)
    assert not torch.equal(before, _logits(backend, PROMPTS[1]))  # different weights really were loaded
    assert backend.loglikelihood([("hi", " there")]) == fresh.loglikelihood([("hi", " there")])


def test_tied_model_keeps_head_tied_and_accepts_only_equal_lm_head(models):
    backend = HFBackend.from_pretrained(models["tied_a"])
    state = load_file(models["tied_b"] / "model.safetensors")
    assert "lm_head.weight" not in state and "lm_head.weight" not in backend.live_parameters()
    backend.load_state({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()})
    assert backend.model.lm_head.weight is backend.model.model.embed_tokens.weight
    assert torch.equal(backend.model.lm_head.weight, state["model.embed_tokens.weight"])
    with pytest.raises(CheckpointError, match="tied"):
        backend.load_state({**state, "lm_head.weight": torch.zeros_like(state["model.embed_tokens.weight"])})


def test_live_parameters_are_the_model_tensors(models):
    backend = HFBackend.from_pretrained(models["a"])
    params = backend.live_parameters()
    before = _logits(backend, "abc")
    with torch.no_grad():
        params["model.norm.weight"].mul_(2.0)
    assert not torch.equal(before, _logits(backend, "abc"))


def test_load_state_refuses_bad_states_and_leaves_model_unchanged(models):
    backend = HFBackend.from_pretrained(models["a"])
    good = load_file(models["b"] / "model.safetensors")
    before = _logits(backend, "abc")
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors model\.norm\.weight"):
        backend.load_state(missing)
    with pytest.raises(CheckpointError, match="unexpected tensors extra.bias"):
        backend.load_state({**good, "extra.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        backend.load_state({**good, "model.norm.weight": torch.zeros(3)})
    assert torch.equal(before, _logits(backend, "abc"))


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path):
    model_dir = build_random_llama(tmp_path / "small_vocab", hidden_size=32, vocab_size=64, seed=0)
    save_char_tokenizer(model_dir)  # 128 tokens for a 64-row embedding
    with pytest.raises(CheckpointError, match=f"{model_dir}.*tokenizer has 128 tokens.*vocab_size is 64"):
        HFBackend.from_pretrained(model_dir)


def test_missing_tokenizer_or_model_dir_is_refused(tmp_path, models):
    bare = tmp_path / "bare"
    shutil.copytree(models["a"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(CheckpointError, match=f"{bare}: no usable tokenizer"):
        HFBackend.from_pretrained(bare)
    with pytest.raises(CheckpointError, match="does not exist"):
        HFBackend.from_pretrained(tmp_path / "nowhere")


def test_generate_argument_checks(backend_a):
    with pytest.raises(BackendError, match="max_new_tokens"):
        backend_a.generate(["x"], max_new_tokens=0)
    with pytest.raises(BackendError, match="not a single string"):
        backend_a.generate("x", max_new_tokens=2)


def test_open_backend_dispatch(models):
    backend = open_backend("hf", models["a"], batch_size=4)
    assert backend.name == "hf" and backend.batch_size == 4
    with pytest.raises(BackendError, match="unknown backend 'tgi'"):
        open_backend("tgi", models["a"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_open_backend_vllm_without_vllm_is_a_clear_error(models):
    with pytest.raises(BackendError, match="not importable"):
        open_backend("vllm", models["a"])


@pytest.mark.parametrize("which", ["a", "tied_a"])
def test_live_parameter_names_are_the_checkpoint_names(models, which):
    """The in-memory merge path addresses tensors by checkpoint name: both sets must coincide."""
    from hm3.checkpoint.reader import open_checkpoint

    with open_checkpoint(models[which]) as ckpt:
        names = set(ckpt.tensor_names())
        shapes = {n: tuple(ckpt.shape(n)) for n in names}
    params = HFBackend.from_pretrained(models[which]).live_parameters()
    assert set(params) == names
    assert {n: tuple(p.shape) for n, p in params.items()} == shapes


def test_empty_request_lists_give_empty_answers(backend_a):
    assert backend_a.generate([], max_new_tokens=4) == []
    assert backend_a.loglikelihood([]) == []


def test_an_empty_prompt_is_conditioned_on_eos_alone_and_in_a_batch(tmp_path):
    """With a tokenizer that adds no BOS (GPT-2's, Qwen's) an empty prompt has no tokens: alone it
    crashed inside the model, in a batch it was answered from a fully masked row. Like an empty
    log-likelihood context, it is conditioned on the EOS token (the BOS where there is one)."""
    path = build_random_llama(tmp_path / "m", hidden_size=128, num_layers=2, num_heads=2, vocab_size=128, seed=0)
    save_char_tokenizer(path, bos=False)
    backend = HFBackend.from_pretrained(path, batch_size=4)
    from_eos = backend.generate(["</s>"], max_new_tokens=6)
    assert backend.generate([""], max_new_tokens=6) == from_eos
    assert backend.generate(["", "a longer prompt"], max_new_tokens=6)[0] == from_eos[0]


def _nan_model(models, tmp_path) -> Path:
    from safetensors.torch import save_file

    nan = tmp_path / "nan"
    shutil.copytree(models["a"], nan)
    weights = load_file(nan / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    return nan


def test_a_model_with_nan_weights_is_refused_not_scored(models, tmp_path, capsys):
    """NaN weights give NaN logits, whose argmax is token 0: scored as if real (0.0, exit 0) before."""
    from hm3.cli import main
    from tests.conftest import _questions

    nan = _nan_model(models, tmp_path)
    backend = HFBackend.from_pretrained(nan)
    with pytest.raises(BackendError, match="non-finite logits"):
        backend.loglikelihood([("ab", "c")])
    with pytest.raises(BackendError, match="non-finite logits"):
        backend.generate(["ab"], max_new_tokens=3)
    data = _questions(tmp_path / "q.jsonl", seed=0)
    assert main(["eval", str(nan), "--objectives", f"choice:{data}", "--split", "validation"]) != 0
    err = capsys.readouterr().err
    assert "non-finite logits" in err and str(nan) in err and "Traceback" not in err
