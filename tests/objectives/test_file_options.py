"""Options after a data-file spec: ``name=``, ``chat=``, ``fewshot=``, and the errors for bad ones."""

from __future__ import annotations

import pytest

from hm3.errors import ConfigError, DataFileError
from objectives.registry import get_objective, parse_objectives


@pytest.fixture
def gsm8k_file(write_jsonl):
    rows = [{"id": f"v{i}", "question": f"{i}+1?", "answer": f"#### {i + 1}", "split": "validation"} for i in range(3)]
    rows += [{"id": "t0", "question": "5+5?", "answer": "#### 10", "split": "test"}]
    rows += [{"id": f"tr{i}", "question": f"{i}*2?", "answer": f"double: #### {2 * i}", "split": "train"}
             for i in range(4)]
    return write_jsonl("g.jsonl", rows)


def test_name_option_names_the_objective(gsm8k_file):
    objective = get_objective(f"gsm8k:{gsm8k_file},name=gsm8k")
    assert objective.name == "gsm8k"
    assert [e.id for e in objective.examples("validation")] == ["v0", "v1", "v2"]


def test_default_names_carry_the_score_changing_options(gsm8k_file):
    assert get_objective(f"gsm8k:{gsm8k_file}").name == f"gsm8k:{gsm8k_file}"  # unchanged without options
    assert get_objective(f"gsm8k:{gsm8k_file},chat=true,fewshot=2@4").name == f"gsm8k:{gsm8k_file}/chat/2shot@4"


def test_seed_after_the_path_or_at_the_end(write_jsonl):
    path = write_jsonl("h.jsonl", [{"id": str(i), "question": "q", "answer": f"#### {i}"} for i in range(30)])
    at_end = get_objective(f"gsm8k:{path},name=g@5")
    after_path = get_objective(f"gsm8k:{path}@5,name=g")
    plain = get_objective(f"gsm8k:{path}@5")
    assert at_end.name == after_path.name == "g"
    ids = [e.id for e in plain.examples("validation")]
    assert [e.id for e in at_end.examples("validation")] == ids == [e.id for e in after_path.examples("validation")]
    with pytest.raises(ConfigError, match="two seeds"):
        get_objective(f"gsm8k:{path}@5,name=g@6")


def test_unknown_option_is_named_with_the_valid_ones(gsm8k_file):
    with pytest.raises(ConfigError) as info:
        get_objective(f"gsm8k:{gsm8k_file},nmae=x")
    message = str(info.value)
    assert "unknown option 'nmae'" in message and "name=, chat=, fewshot=" in message


@pytest.mark.parametrize(("options", "error"), [
    ("name=a b", "may not hold spaces"), ("name=my:task", "may not hold"), ("name=x,name=y", "gives name= twice"),
    ("chat=maybe", "chat= must be true or false"), ("fewshot=-1", "fewshot must be a whole number"),
    ("name=", "option name= is empty"), ("chat", "cannot read option 'chat'"),
])
def test_bad_options(gsm8k_file, options, error):
    with pytest.raises(ConfigError, match=error):
        get_objective(f"gsm8k:{gsm8k_file},{options}")


def test_options_in_a_list_stay_with_their_spec(gsm8k_file, write_jsonl):
    choice = write_jsonl("c.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": 0, "split": "validation"}])
    objectives = parse_objectives(f"gsm8k:{gsm8k_file},name=maths,chat=true,choice={choice},name=mc")
    assert [o.name for o in objectives] == ["maths", "mc"]
    assert [o.chat_template for o in objectives] == [True, False]


def test_a_wrong_option_in_a_list_is_reported_by_its_spec(gsm8k_file):
    with pytest.raises(ConfigError, match="unknown option 'chatt'"):
        parse_objectives(f"gsm8k:{gsm8k_file},chatt=true")


def test_names_must_be_unique_in_a_list(gsm8k_file):
    with pytest.raises(ConfigError, match="names same more than once; give each a distinct name="):
        parse_objectives(f"gsm8k:{gsm8k_file},name=same,gsm8k:{gsm8k_file}@1,name=same")


def test_bundled_humaneval_takes_a_name_but_not_fewshot():
    assert get_objective("humaneval,name=he").name == "he"
    with pytest.raises(ConfigError, match="unknown option 'fewshot'.*options are name=, chat="):
        get_objective("humaneval,fewshot=1")


def test_fewshot_from_train_prefixes_scored_prompts(gsm8k_file):
    plain = get_objective(f"gsm8k:{gsm8k_file}")
    shots = get_objective(f"gsm8k:{gsm8k_file},fewshot=2")
    train = {e.id: e for e in plain.examples("train")}
    for split in ("validation", "test"):
        for bare, shot in zip(plain.examples(split), shots.examples(split), strict=True):
            prefix = shot.prompt[: -len(bare.prompt)]
            assert shot.prompt.endswith(bare.prompt) and shot.target == bare.target
            blocks = prefix.split("\n\n")[:-1]
            assert len(blocks) == 2  # two solved train examples, each "Question: ...\nAnswer: <worked answer>"
            used = [i for i, e in train.items() if f"{e.prompt} {e.target}" in blocks]
            assert len(used) == 2
    assert [e.prompt for e in shots.examples("train")] == [e.prompt for e in plain.examples("train")]


def test_fewshot_choice_is_seeded_and_identical_across_examples(gsm8k_file):
    def prefix(spec, split="validation"):
        examples = get_objective(spec).examples(split)
        bare = get_objective(f"gsm8k:{gsm8k_file}").examples(split)
        return {e.prompt[: -len(b.prompt)] for e, b in zip(examples, bare, strict=True)}

    assert len(prefix(f"gsm8k:{gsm8k_file},fewshot=2")) == 1  # the same shots before every prompt
    assert prefix(f"gsm8k:{gsm8k_file},fewshot=2", "test") == prefix(f"gsm8k:{gsm8k_file},fewshot=2")
    by_seed = {frozenset(prefix(f"gsm8k:{gsm8k_file},fewshot=2@{seed}")) for seed in range(6)}
    assert len(by_seed) > 1  # the seed picks which train examples


def test_fewshot_without_train_holds_shots_out_of_validation(write_jsonl):
    rows = [{"id": f"v{i}", "question": f"{i}?", "answer": f"#### {i}", "split": "validation"} for i in range(5)]
    path = write_jsonl("v.jsonl", rows + [{"id": "t", "question": "t?", "answer": "#### 1", "split": "test"}])
    objective = get_objective(f"gsm8k:{path},fewshot=2")
    scored = objective.examples("validation")
    assert len(scored) == 3
    for example in scored:  # no example sees its own answer among the shots
        assert f"Question: {example.id[1:]}?\nAnswer: #### {example.id[1:]}\n\n" not in example.prompt
    shots = {i for i in range(5) if f"Question: {i}?\nAnswer: #### {i}\n\n" in scored[0].prompt}
    assert len(shots) == 2 and shots.isdisjoint({int(e.id[1:]) for e in scored})
    with pytest.raises(DataFileError, match="fewshot=6 needs 6 examples, but its validation split"):
        get_objective(f"gsm8k:{path},fewshot=6")


def test_fewshot_holds_copies_of_a_shot_out_of_the_scored_splits(write_jsonl):
    """A record repeated in the file (same question and answer, so the same hashed split) is one
    example: when one copy becomes a shot, no other copy may be scored with that answer in its prompt."""
    rows = [{"question": "2+2?", "answer": "#### 4"}] * 3 + [{"question": f"{i}?", "answer": f"#### {i}"}
                                                            for i in range(6)]
    path = write_jsonl("dup.jsonl", rows)
    leaked = 0
    for seed in range(8):
        objective = get_objective(f"gsm8k:{path},fewshot=1@{seed}")
        for split in ("validation", "test"):
            leaked += sum(e.prompt.count("Question: 2+2?\nAnswer:") > 1 for e in objective.examples(split))
    assert leaked == 0


def test_fewshot_shot_format_of_choice_and_translation(write_jsonl):
    choice = write_jsonl("c.jsonl", [
        {"id": "a", "question": "sky?", "choices": ["blue", "red"], "answer": 0, "split": "train"},
        {"id": "b", "question": "grass?", "choices": ["green", "red"], "answer": "green", "split": "validation"}])
    assert get_objective(f"choice:{choice},fewshot=1").examples("validation")[0].prompt == (
        "Question: sky?\nAnswer: blue\n\nQuestion: grass?\nAnswer:")
    pytest.importorskip("sacrebleu")
    pairs = write_jsonl("t.jsonl", [
        {"id": "a", "source": "hund", "target": "dog", "tgt_lang": "English", "split": "train"},
        {"id": "b", "source": "katze", "target": "cat", "tgt_lang": "English", "split": "validation"}])
    assert get_objective(f"translation:{pairs},fewshot=1").examples("validation")[0].prompt == (
        "Translate to English: hund\ndog\n\nTranslate to English: katze\n")
