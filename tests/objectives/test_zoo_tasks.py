"""The zoo tasks: seeded generation, disjoint splits, the program interpreter and the scorers."""

from __future__ import annotations

import pytest

from hm3.errors import ConfigError
from objectives.base import Generate
from objectives.zoo import (
    MAX_NEW_TOKENS,
    SPLIT_SIZES,
    ZOO_TASKS,
    lexicon,
    run_program,
    translate,
    zoo_objective,
    zoo_splits,
)


@pytest.mark.parametrize("task", ZOO_TASKS)
def test_same_seed_same_data_other_seed_other_data(task):
    a, b = zoo_objective(task, seed=0), zoo_objective(task, seed=0)
    for split in SPLIT_SIZES:
        assert list(a.examples(split)) == list(b.examples(split))
    assert list(zoo_objective(task, seed=1).examples("test")) != list(a.examples("test"))


@pytest.mark.parametrize("task", ZOO_TASKS)
def test_splits_have_their_sizes_and_share_no_prompt(task):
    obj = zoo_objective(task, seed=3)
    prompts = {split: [e.prompt for e in obj.examples(split)] for split in SPLIT_SIZES}
    for split, size in SPLIT_SIZES.items():
        assert len(prompts[split]) == size
        assert len(set(prompts[split])) == size  # no duplicate inside a split either
    train, val, test = (set(prompts[s]) for s in ("train", "validation", "test"))
    assert not train & val and not train & test and not val & test


@pytest.mark.parametrize("task, tag", [("math", "M "), ("code", "C "), ("translation", "T ")])
def test_prompts_carry_their_task_tag_and_decoding_stops_at_newline(task, tag):
    obj = zoo_objective(task)
    assert obj.name == f"zoo:{task}"
    assert all(e.prompt.startswith(tag) and e.prompt.endswith("=") for e in obj.examples("validation"))
    assert isinstance(obj.decoding, Generate) and obj.decoding.stop == ("\n",)
    assert zoo_objective(task, seed=2).name == f"zoo:{task}@2"


@pytest.mark.parametrize("task", ZOO_TASKS)
def test_max_new_tokens_fits_every_answer_and_its_stop_newline(task):
    """One token per character: a budget shorter than an answer would cap a perfect model's score."""
    obj = zoo_objective(task)
    longest = max(len(e.target) for split in SPLIT_SIZES for e in obj.examples(split))
    assert obj.decoding.max_new_tokens == MAX_NEW_TOKENS[task] == longest + 1


def test_math_targets_are_the_arithmetic_results():
    for e in zoo_objective("math").examples("validation"):
        expr = e.prompt[2:-1]
        op = "+" if "+" in expr else "-"
        left, right = expr.split(op)
        assert int(e.target) == (int(left) + int(right) if op == "+" else int(left) - int(right))


@pytest.mark.parametrize(
    "program, printed",
    [
        ("a=3;b=a+4;print(b)", 7),
        ("a=3;b=a-4;c=b-7;print(c)", -8),
        ("a=9;b=a+a;c=b-a;print(b)", 18),
        ("a=5;print(a)", 5),
        ("x=2;y=x;x=7;print(y)", 2),  # assignment copies the value, later rebinding does not change it
    ],
)
def test_interpreter_on_hand_cases(program, printed):
    assert run_program(program) == printed


@pytest.mark.parametrize(
    "program",
    [
        "a=3;print(b)",  # undefined name
        "a=3;b=a*2;print(b)",  # operator outside the grammar
        "a=3",  # prints nothing
        "__import__('os')",  # not a statement of the grammar
        "a=1;b=a+1+1;print(b)",  # only one operator per expression
        "ab=1;print(ab)",
    ],
)
def test_interpreter_rejects_anything_outside_its_grammar(program):
    with pytest.raises(ValueError):
        run_program(program)


def test_code_targets_come_from_the_interpreter():
    for e in zoo_objective("code").examples("test")[:50]:
        assert e.target == str(run_program(e.prompt[2:-1]))


def test_translation_uses_the_lexicon_and_swaps_adjacent_pairs():
    lex = lexicon(0)
    words = sorted(lex)[:3]
    assert translate(words, 0) == f"{lex[words[1]]} {lex[words[0]]} {lex[words[2]]}"
    assert len(set(lex.values())) == len(lex)  # one target word per source word
    assert lexicon(1) != lex


def test_exact_match_scorer_strips_whitespace_only():
    obj = zoo_objective("math")
    e = obj.examples("test")[0]
    assert obj.score(e, f" {e.target}\n") == 1.0
    assert obj.score(e, e.target + "0") == 0.0
    assert obj.aggregate([e, e], [e.target, "x"]) == 0.5


def test_translation_scorer_is_chrf_over_one_hundred():
    obj = zoo_objective("translation")
    e = obj.examples("test")[0]
    assert obj.score(e, e.target) == pytest.approx(1.0)
    assert obj.score(e, "") == 0.0
    partial = obj.score(e, e.target.split()[0])
    assert 0.0 < partial < 1.0
    assert obj.aggregate([e], [e.target]) == pytest.approx(1.0)


def test_unknown_task_and_split_are_config_errors():
    with pytest.raises(ConfigError, match="zoo task 'poetry'"):
        zoo_splits("poetry", 0)
    with pytest.raises(ConfigError, match="split 'dev'"):
        zoo_objective("math").examples("dev")
