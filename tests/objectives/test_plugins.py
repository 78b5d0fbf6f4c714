"""Users' own objective classes: ``py:MODULE:CLASS`` specs and the ``hm3.objectives`` entry point group."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hm3.errors import ConfigError
from objectives.base import Example, Generate, Objective
from objectives.registry import get_objective, list_objectives, parse_objectives

SPEC = f"py:{__name__}:CountingObjective"


class CountingObjective(Objective):
    """A plug-in as a user would write one: options arrive as strings, the seed as an int."""

    decoding = Generate(max_new_tokens=4)
    higher_is_better = False

    def __init__(self, *, seed: int = 0, size: str = "3", word: str = "x") -> None:
        self.seed, self.size, self.word = seed, size, word
        self.name = f"count{size}"

    def examples(self, split: str) -> Sequence[Example]:
        return [Example(id=str(i), prompt=f"{self.word} {i}", target=str(i)) for i in range(int(self.size))]

    def score(self, example: Example, output: str) -> float:
        return float(output != example.target)  # an error rate


class NoDecoding(CountingObjective):
    decoding = None


class NotAnObjective:
    def __init__(self, seed: int = 0) -> None: ...


class Exploding(CountingObjective):
    def __init__(self, *, seed: int = 0) -> None:
        raise RuntimeError("no data here")


def test_a_class_gets_its_options_as_strings_and_the_seed():
    objective = get_objective(f"{SPEC},size=5,word=hi@7")
    assert isinstance(objective, CountingObjective)
    assert (objective.seed, objective.size, objective.word) == (7, "5", "hi")
    assert objective.name == "count5"  # the instance's own name
    assert len(objective.examples("validation")) == 5 and objective.higher_is_better is False


def test_hm3_applies_name_and_chat_itself():
    objective = get_objective(f"{SPEC},name=errors,chat=true")
    assert objective.name == "errors" and objective.chat_template is True
    assert objective.size == "3"  # neither went to the constructor


def test_plugin_options_stay_with_their_spec_in_a_list(tmp_path):
    objectives = parse_objectives(f"{SPEC},size=2,name=a,{SPEC},size=4,name=b")
    assert [(o.name, o.size) for o in objectives] == [("a", "2"), ("b", "4")]


@pytest.mark.parametrize(("spec", "error"), [
    ("py:no_such_module_hm3:X", r"cannot import module 'no_such_module_hm3' \(ModuleNotFoundError"),
    (f"py:{__name__}:Missing", f"module '{__name__}' has no class 'Missing'"),
    (f"py:{__name__}:NotAnObjective", "is not a subclass of objectives.base.Objective"),
    (f"py:{__name__}", "write py:package.module:ClassName"),
    (f"{SPEC},colour=red", r"cannot take seed= and colour="),
    (f"{SPEC},size=2,size=3", "gives size= twice"),
    (f"{SPEC},2nd=x", "unknown option '2nd'"),
    (f"py:{__name__}:NoDecoding", "sets no decoding"),
    (f"py:{__name__}:Exploding", r"Exploding\(...\) failed: RuntimeError: no data here"),
    (f"{SPEC},name=a:b", "may not hold"),
])
def test_plugin_errors_name_the_spec(spec, error):
    with pytest.raises(ConfigError, match=error) as info:
        get_objective(spec)
    assert repr(spec.split(",")[0]) in str(info.value) or spec.split(",")[0] in str(info.value)


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A distribution on sys.path whose entry points register objective classes (as ``pip install`` would)."""

    def install(**entries: str) -> None:
        dist = tmp_path / "my_objectives-0.1.dist-info"
        dist.mkdir(exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-objectives\nVersion: 0.1\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
        (dist / "entry_points.txt").write_text(f"[hm3.objectives]\n{lines}")
        monkeypatch.syspath_prepend(str(tmp_path))

    return install


def test_an_installed_entry_point_works_by_name(installed):
    installed(myobj=f"{__name__}:CountingObjective")
    objective = get_objective("myobj,size=2@1")
    assert isinstance(objective, CountingObjective) and (objective.size, objective.seed) == ("2", 1)
    assert objective.name == "count2"
    assert ("myobj[,K=V...]", f"installed plug-in objective (hm3.objectives entry point {__name__}:CountingObjective)") \
        in list_objectives()


def test_an_entry_point_that_is_not_an_objective_is_refused(installed):
    installed(broken=f"{__name__}:NotAnObjective", gone="no_such_module_hm3:X")
    with pytest.raises(ConfigError, match="'broken'.*is not a subclass of objectives.base.Objective"):
        get_objective("broken")
    with pytest.raises(ConfigError, match="'gone'.*cannot load entry point gone = no_such_module_hm3:X"):
        get_objective("gone")


def test_without_the_entry_point_the_name_is_unknown():
    with pytest.raises(ConfigError, match="unknown objective 'myobj'"):
        get_objective("myobj")


def test_hm3_objectives_lists_the_options_and_installed_plugins(installed, capsys):
    from hm3.cli import main

    installed(myobj=f"{__name__}:CountingObjective")
    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    assert "gsm8k:PATH[,K=V...]" in out and "K: name, chat, fewshot" in out
    assert "humaneval:PATH[,K=V...]" in out and "K: name, chat\n" in out  # no few-shot for HumanEval
    assert "py:MODULE:CLASS[,K=V...]" in out and "myobj[,K=V...]" in out
