"""The compositional family: the seeded pseudo-language, disjoint splits across tasks, expert data, scorers."""

from __future__ import annotations

import re

import pytest

from hm3.errors import ConfigError
from objectives.compositional import (
    SPLIT_SIZES,
    TASKS,
    VOCABULARY,
    CompositionalObjective,
    expert_training_examples,
    family,
    lexicon,
    to_english,
    to_velan,
)
from objectives.registry import get_objective, list_objectives


def test_the_language_is_a_seeded_bijection_on_a_few_hundred_words_none_english():
    lex = lexicon(0)
    assert len(lex) == len(VOCABULARY) >= 200
    assert len(set(lex.values())) == len(lex)  # invertible
    assert not set(lex.values()) & set(VOCABULARY)  # no pseudo-word is an English word of the vocabulary
    assert lexicon(0) == lex and lexicon(1) != lex


def test_round_trip_keeps_digits_and_punctuation_and_replaces_every_word():
    text = "anna has 12 apples, buys 3 more and then gives 4 to ben. how many apples does anna have now?"
    velan = to_velan(text, 0)
    assert to_english(velan, 0) == text
    assert re.findall(r"\d+|[,.?]", velan) == re.findall(r"\d+|[,.?]", text)
    assert not set(re.findall(r"[a-z]+", velan)) & set(re.findall(r"[a-z]+", text))
    with pytest.raises(ValueError, match="not in the Velan vocabulary"):
        to_velan("anna has a spaceship", 0)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_data_other_seed_other_data(task):
    a, b = CompositionalObjective(task, 0), CompositionalObjective(task, 0)
    assert list(a.examples("test")) == list(b.examples("test"))
    assert list(CompositionalObjective(task, 1).examples("test")) != list(a.examples("test"))


def test_every_item_is_in_exactly_one_task_and_split():
    data = family(0)
    english = {}  # the underlying English text of every item
    for task in TASKS:
        for split, size in SPLIT_SIZES.items():
            items = data[task][split]
            assert len(items) == size and len({e.prompt for e in items}) == size
            for e in items:
                key = e.target if task == "language" else e.meta["english"]
                assert key not in english, (task, split, english.get(key))
                english[key] = (task, split)


def test_composite_is_the_math_task_written_in_the_language():
    composite, math = family(0)["composite"]["validation"], family(0)["math"]["validation"]
    for e in composite[:20]:
        assert e.prompt == f"Solve: {to_velan(e.meta['english'], 0)}\n" and e.target.isdigit()
    assert {e.meta["operation"] for e in composite} == {e.meta["operation"] for e in math} == {
        "add", "sub", "mul", "div", "two-step"}
    for e in math[:50]:  # answers are the arithmetic of the numbers in the problem
        a = [int(x) for x in re.findall(r"\d+", e.meta["english"])]
        op = e.meta["operation"]
        want = {"add": a[0] + a[1], "sub": a[0] - a[1], "mul": a[0] * a[1], "div": a[0] // a[1],
                "two-step": a[0] + a[1] - a[-1]}[op]
        assert int(e.target) == want > 0


def test_expert_data_never_holds_a_composite_or_held_out_item():
    held_out = {e.meta["english"] for t in ("math", "composite") for s in ("validation", "test")
                for e in family(0)[t][s]} | {e.target for s in ("validation", "test") for e in family(0)["language"][s]}
    composite = {e.prompt for s in SPLIT_SIZES for e in family(0)["composite"][s]}
    for expert in ("language", "math"):
        data = expert_training_examples(expert, 0)
        assert data == expert_training_examples(expert, 0)
        texts = {e.target for e in data} | {to_english(e.prompt.split(": ", 1)[1].strip(), 0) for e in data
                                             if e.prompt.startswith("Translate Velan")}
        assert not texts & held_out
        assert not {e.prompt for e in data} & composite
    lang = expert_training_examples("language", 0)
    assert {e.prompt.split(":")[0] for e in lang} == {"Translate Velan to English", "Translate English to Velan",
                                                      "Answer in Velan"}
    assert not any(e.target.isdigit() for e in lang)  # no arithmetic answers for the language expert
    assert len(expert_training_examples("math", 0, n=10)) == 10
    with pytest.raises(ConfigError, match="no compositional expert"):
        expert_training_examples("code", 0)


def test_scoring_and_registry():
    math = get_objective("compositional:math")
    e = math.examples("test")[0]
    assert math.score(e, f" {e.target}\n") == 1.0 and math.score(e, "0") == 0.0
    lang = get_objective("compositional:language@2")
    assert lang.name == "compositional:language@2" and lang.seed == 2
    ex = list(lang.examples("validation")[:4])
    assert lang.aggregate(ex, [x.target for x in ex]) == pytest.approx(1.0)
    untranslated = [x.prompt.split(": ", 1)[1].strip() for x in ex]  # echoing Velan scores low
    assert lang.aggregate(ex, untranslated) < 0.3
    assert {"compositional:composite", "compositional:math", "compositional:language"} <= {
        n for n, _ in list_objectives()}
    with pytest.raises(ConfigError, match="no compositional task"):
        get_objective("compositional:poetry")
