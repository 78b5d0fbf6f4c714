"""Objective spec strings: resolution, seeds, the listing, and clear errors for bad specs.

The zoo is replaced by a stand-in module so that these tests exercise only the registry's parsing and
lazy import (the zoo's own data is tested in test_zoo*.py).
"""

from __future__ import annotations

import sys
import types

import pytest

from hm3.errors import ConfigError, DataFileError
from objectives.choice import ChoiceObjective
from objectives.gsm8k import Gsm8kObjective
from objectives.humaneval import HumanEvalObjective
from objectives.registry import get_objective, list_objectives, parse_objectives
from objectives.translation import TranslationObjective


@pytest.fixture(autouse=True)
def fake_zoo(monkeypatch):
    """A stand-in ``objectives.zoo`` that records how it was called."""
    calls = []

    def zoo_objective(task: str, *, seed: int = 0):
        calls.append((task, seed))
        return types.SimpleNamespace(name=f"zoo:{task}" + (f"@{seed}" if seed else ""))

    module = types.ModuleType("objectives.zoo")
    module.ZOO_TASKS = ("math", "code", "translation")
    module.zoo_objective = zoo_objective
    monkeypatch.setitem(sys.modules, "objectives.zoo", module)
    return calls


@pytest.fixture
def gsm8k_file(write_jsonl):
    return write_jsonl("g.jsonl", [{"question": "1+1?", "answer": "#### 2"}])


def test_zoo_specs_resolve_lazily_with_seed(fake_zoo):
    assert get_objective("zoo:math").name == "zoo:math"
    assert get_objective(" zoo:code@7 ").name == "zoo:code@7"
    assert fake_zoo == [("math", 0), ("code", 7)]


def test_unknown_zoo_task(fake_zoo):
    with pytest.raises(
        ConfigError, match=r"unknown objective 'zoo:chess'.*zoo:math, zoo:code, zoo:translation"
    ):
        get_objective("zoo:chess")


def test_file_specs(write_jsonl, gsm8k_file):
    translation = write_jsonl("t.jsonl", [{"source": "a", "target": "b"}])
    choice = write_jsonl("c.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": 0}])
    assert isinstance(get_objective(f"gsm8k:{gsm8k_file}"), Gsm8kObjective)
    assert isinstance(get_objective(f"gsm8k={gsm8k_file}"), Gsm8kObjective)  # '=' is an alias
    assert isinstance(get_objective(f"translation:{translation}"), TranslationObjective)
    assert isinstance(get_objective(f"choice:{choice}"), ChoiceObjective)
    assert get_objective(f"gsm8k:{gsm8k_file}").name == f"gsm8k:{gsm8k_file}"
    assert get_objective(f"gsm8k:{gsm8k_file}@3").name == f"gsm8k:{gsm8k_file}@3"


def test_seed_changes_hashed_split(write_jsonl):
    rows = [{"id": str(i), "question": "q", "answer": f"#### {i}"} for i in range(40)]
    path = write_jsonl("g.jsonl", rows)
    seed0 = {e.id for e in get_objective(f"gsm8k:{path}").examples("validation")}
    seed5 = {e.id for e in get_objective(f"gsm8k:{path}@5").examples("validation")}
    assert seed0 != seed5


def test_humaneval_specs(write_jsonl):
    bundled = get_objective("humaneval")
    assert isinstance(bundled, HumanEvalObjective) and bundled.name == "humaneval"
    problem = {
        "task_id": "T/0",
        "prompt": "def f():\n",
        "test": "def check(c): pass",
        "entry_point": "f",
        "split": "test",
    }
    user = get_objective(f"humaneval:{write_jsonl('he.jsonl', [problem])}")
    assert user.name.startswith("humaneval:") and len(user.examples("test")) == 1


def test_parse_objectives_keeps_order(gsm8k_file):
    objectives = parse_objectives(f"zoo:math, gsm8k:{gsm8k_file} ,zoo:translation")
    assert [o.name for o in objectives] == ["zoo:math", f"gsm8k:{gsm8k_file}", "zoo:translation"]


@pytest.mark.parametrize("specs", ["", "zoo:math,,zoo:code", "zoo:math,"])
def test_parse_objectives_rejects_empty_entries(specs):
    with pytest.raises(ConfigError, match="empty entry"):
        parse_objectives(specs)


def test_parse_objectives_rejects_repeats():
    with pytest.raises(ConfigError, match="names zoo:math more than once"):
        parse_objectives("zoo:math,zoo:code, zoo:math")


@pytest.mark.parametrize("spec", ["mmlu", "bleu:foo.jsonl", "zoo", "humaneval=", "gsm8kx:path"])
def test_unknown_objective_lists_known_ones(spec):
    with pytest.raises(ConfigError) as info:
        get_objective(spec)
    message = str(info.value)
    assert repr(spec) in message
    if spec != "humaneval=":
        assert "known objectives: zoo:math" in message and "gsm8k:PATH" in message


def test_file_kind_without_path():
    with pytest.raises(ConfigError, match=r"needs a data file: write gsm8k:PATH"):
        get_objective("gsm8k")


def test_missing_data_file(tmp_path):
    with pytest.raises(DataFileError, match=r"missing\.jsonl does not exist"):
        get_objective(f"choice:{tmp_path / 'missing.jsonl'}")


def test_list_objectives_includes_all_builtins():
    names = [name for name, _ in list_objectives()]
    assert names == [
        "zoo:math",
        "zoo:code",
        "zoo:translation",
        "compositional:language",
        "compositional:math",
        "compositional:composite",
        "humaneval[,K=V...]",
        "gsm8k:PATH[,K=V...]",
        "humaneval:PATH[,K=V...]",
        "translation:PATH[,K=V...]",
        "choice:PATH[,K=V...]",
        "  file options",
        "lm-eval:TASK[,K=V...]",
        "py:MODULE:CLASS[,K=V...]",
    ]
    assert all(description for _, description in list_objectives())
