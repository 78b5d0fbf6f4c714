"""Chat templates: ``chat=true`` objectives (or ``evaluation.chat_template``) ask the model in its template.

The tokenizer is the tiny character-level one of :mod:`tiny_lm` with a chat template set here; the
expected prompts are written out by hand from that template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_lm import build_tiny_lm, save_char_tokenizer

from hm3.errors import BackendError, ConfigError
from hm3.eval.backend import chat_prompt, encode_prompt
from hm3.eval.evaluate import evaluate_objective
from hm3.eval.hf import HFBackend
from objectives.registry import build_objectives, get_objective

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
WITH_BOS = "{{ bos_token }}" + TEMPLATE


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_char_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = TEMPLATE
    return tok


class Recorder:
    """A backend that records what it is asked and answers with fixed text."""

    name = "recorder"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prompts: list[str] = []
        self.requests: list[tuple[str, str]] = []

    def generate(self, prompts, *, max_new_tokens, stop=()):
        self.prompts += prompts
        return ["#### 2"] * len(prompts)

    def loglikelihood(self, requests):
        self.requests += requests
        return [-float(len(cont)) for _, cont in requests]


@pytest.fixture
def files(tmp_path):
    gsm, choice = tmp_path / "g.jsonl", tmp_path / "c.jsonl"
    gsm.write_text(json.dumps({"id": "a", "question": "1+1?", "answer": "#### 2", "split": "validation"}) + "\n")
    choice.write_text(json.dumps({"id": "b", "question": "sky?", "choices": ["blue", "reddish"], "answer": 0,
                                  "split": "validation"}) + "\n")
    return gsm, choice


def test_chat_prompt_is_one_user_message_then_the_assistant_turn(tokenizer):
    assert chat_prompt(tokenizer, "Question: 1+1?\nAnswer:") == "[user]Question: 1+1?\nAnswer:\n[assistant]"


def test_a_template_that_writes_bos_gets_one_bos_not_two(tokenizer):
    tokenizer.chat_template = WITH_BOS
    try:
        text = chat_prompt(tokenizer, "hi")
        ids = encode_prompt(tokenizer, text)
    finally:
        tokenizer.chat_template = TEMPLATE
    assert text == "[user]hi\n[assistant]"
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]


def test_a_tokenizer_without_a_template_is_refused(tokenizer):
    tokenizer.chat_template = None
    try:
        with pytest.raises(BackendError, match="needs a chat template, but the tokenizer of .* has none"):
            chat_prompt(tokenizer, "hi")
    finally:
        tokenizer.chat_template = TEMPLATE


def test_generation_and_loglikelihood_prompts_go_through_the_template(tokenizer, files):
    gsm, choice = files
    for chat in (False, True):
        backend = Recorder(tokenizer)
        flag = ",chat=true" if chat else ""
        score = evaluate_objective(backend, get_objective(f"gsm8k:{gsm}{flag}"), "validation").score
        picked = evaluate_objective(backend, get_objective(f"choice:{choice}{flag}"), "validation").score
        assert score == 1.0 and picked == 1.0  # scored against the original examples either way
        if chat:
            assert backend.prompts == ["[user]Question: 1+1?\nAnswer:\n[assistant]"]
            assert backend.requests == [("[user]Question: sky?\nAnswer:\n[assistant]", " blue"),
                                        ("[user]Question: sky?\nAnswer:\n[assistant]", " reddish")]
        else:
            assert backend.prompts == ["Question: 1+1?\nAnswer:"]
            assert backend.requests[0] == ("Question: sky?\nAnswer:", " blue")


def test_the_run_setting_puts_every_objective_in_the_template(files):
    gsm, choice = files
    objectives = build_objectives([f"gsm8k:{gsm}", f"choice:{choice},chat=false"], chat=True)
    assert [o.chat_template for o in objectives] == [True, True]
    assert [o.chat_template for o in build_objectives([f"gsm8k:{gsm}"])] == [False]


def test_lm_eval_objectives_are_not_put_in_a_template(tokenizer, monkeypatch):
    from objectives.base import HarnessObjective

    class Task(HarnessObjective):
        name, decoding, chat_template = "task", None, True

        def examples(self, split):
            return []

        def requests(self, examples):
            return []

        def score_answered(self, examples, requests):
            return 0.0, []

    monkeypatch.setattr("hm3.eval.evaluate.select_examples", lambda *a: [object()])
    with pytest.raises(ConfigError, match="an lm-eval task builds its own prompts"):
        evaluate_objective(Recorder(tokenizer), Task(), "validation")


def test_the_hf_backend_answers_the_templated_prompt(tmp_path, files):
    gsm, _ = files
    backend = HFBackend.from_pretrained(build_tiny_lm(Path(tmp_path) / "m"), batch_size=2)
    backend.tokenizer.chat_template = TEMPLATE
    chat = evaluate_objective(backend, get_objective(f"gsm8k:{gsm},chat=true"), "validation").outputs
    by_hand = backend.generate(["[user]Question: 1+1?\nAnswer:\n[assistant]"], max_new_tokens=256,
                               stop=("\n\nQuestion:", "Question:"))
    plain = evaluate_objective(backend, get_objective(f"gsm8k:{gsm}"), "validation").outputs
    assert list(chat) == by_hand
    assert list(chat) != list(plain)  # a random model continues the two prompts differently


def _run_config(tiny_family, objectives=None, **evaluation):
    from hm3.search.run_config import parse_run_config

    _, models, specs = tiny_family
    return parse_run_config({"models": models, "objectives": objectives or specs,
                             "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
                             "evaluation": evaluation})


def test_the_run_setting_is_recorded_only_when_on_so_older_runs_resume(tiny_family):
    from hm3.search.run_config import parse_run_config

    off, on = _run_config(tiny_family), _run_config(tiny_family, chat_template=True)
    assert "chat_template" not in off.canonical()["evaluation"]  # what runs recorded before the setting
    assert on.canonical()["evaluation"]["chat_template"] is True
    assert parse_run_config(on.canonical()) == on and parse_run_config(off.canonical()) == off


def test_a_plugin_spec_is_what_the_run_records_and_rebuilds_from(tiny_family):
    from hm3.run.config import migrate_stored_config, stored_form
    from hm3.search.run_config import parse_run_config

    spec = "py:tests.objectives.test_plugins:CountingObjective,size=2,name=errs@3"
    cfg = _run_config(tiny_family, objectives=[*tiny_family[2], spec])
    stored = json.loads(json.dumps(stored_form(cfg)))  # as the run store keeps it
    assert stored["level1"]["objectives"][-1] == spec
    resumed = parse_run_config(migrate_stored_config(stored, where="test")["level1"])
    rebuilt = build_objectives(resumed.objectives)[-1]
    assert (type(rebuilt).__name__, rebuilt.name, rebuilt.size, rebuilt.seed) == ("CountingObjective", "errs", "2", 3)
