"""Lower-is-better objectives: the store keeps the raw metric, searches and fronts see ``1 - raw``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from hm3.run.front import _score_columns, axis_labels
from hm3.search.estimates import stored_estimate
from hm3.search.pareto import non_dominated, protocol_hypervolume
from hm3.search.scoring import CandidateScorer, SplitPlan, utilities
from hm3.store import RunStore
from objectives.base import Example, Generate, Objective, utility
from objectives.choice import ChoiceObjective


class Matches(Objective):
    """Four examples; the score of an output is whether it says "right" (accuracy) or not (error rate)."""

    decoding = Generate(max_new_tokens=2)

    def __init__(self, name: str, higher_is_better: bool) -> None:
        self.name, self.higher_is_better = name, higher_is_better

    def examples(self, split: str) -> Sequence[Example]:
        return [Example(id=f"{self.name}{i}", prompt=f"{self.name} {i}", target="right") for i in range(4)]

    def score(self, example: Example, output: str) -> float:
        right = output == "right"
        return float(right if self.higher_is_better else not right)


class Answers:
    """A backend whose installed "model" is a table: how many of each objective's prompts it gets right."""

    name = "fake"
    tokenizer = None

    def __init__(self) -> None:
        self.right: dict[str, int] = {}

    def generate(self, prompts, *, max_new_tokens, stop=()):
        return ["right" if int(p.split()[1]) < self.right[p.split()[0]] else "wrong" for p in prompts]


# (accuracy, error rate) per candidate, as right answers out of 4
CANDIDATES = {"A": {"acc": 2, "err": 3}, "B": {"acc": 2, "err": 0}, "C": {"acc": 4, "err": 2}}


def test_utility_is_its_own_inverse_and_checks_the_range():
    assert utility(0.25, True) == 0.25 and utility(0.25, False) == 0.75 and utility(utility(0.375, False), False) == 0.375
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        utility(1.5, False)
    with pytest.raises(ValueError, match="objective 'err'"):
        utilities([Matches("err", False)], [2.0])


def test_a_lower_is_better_objective_flows_raw_to_the_store_and_utility_to_the_front(tmp_path):
    objectives = [Matches("acc", True), Matches("err", False)]
    backend = Answers()
    plan = SplitPlan("validation", {"acc": [0, 1, 2, 3], "err": [0, 1, 2, 3]})
    with RunStore.open(tmp_path / "run", config={"x": 1}) as store:
        scorer = CandidateScorer(backend, objectives, store)
        refs, scores = [], []
        for key, right in CANDIDATES.items():
            ref = store.add_candidate({"candidate": key}, "merge")
            refs.append(ref)
            scores.append(scorer.score(ref, lambda right=right: backend.right.update(right), plan))
        F = np.stack(scores)
        # raw error rates: A 0.25, B 1.0, C 0.5; utilities 1 - raw
        assert F.tolist() == [[0.5, 0.75], [0.5, 0.0], [1.0, 0.5]]
        assert [store.get_evaluation(r, "err", "validation", [f"err{i}" for i in range(4)]).score
                for r in refs] == [0.25, 1.0, 0.5]
        assert scorer.cached(refs[1], plan).tolist() == [0.5, 0.0]  # a resumed run reads utilities too
        # the subset-score means that requests and level 2 rank paths by read the store's raw scores too
        means, counts = stored_estimate(store, refs[0], ["acc", "err"], higher_is_better=[True, False])
        assert means.tolist() == [0.5, 0.75] and counts.tolist() == [4, 4]
    assert non_dominated(F).tolist() == [0, 2]  # B (most errors) is dominated by A; read raw it would win
    # A and C's union above the origin: 0.5 * 0.75 + (1 - 0.5) * 0.5 (read raw, B and C's would be 0.75)
    assert protocol_hypervolume(F, np.zeros(2), np.ones(2)) == pytest.approx(0.625)


def test_front_tables_add_the_raw_metric_and_the_plot_says_which_axis_is_flipped():
    columns = _score_columns(["acc", "err"], np.array([0.5, 0.75]), "val", ["err"])
    assert columns == {"acc_val": 0.5, "err_val": 0.75, "err_val_raw": 0.25}
    summary = {"objectives": ["acc", "err"], "higher_is_better": {"acc": True, "err": False}}
    assert axis_labels(summary) == ["acc", "err (1 - raw; raw: lower is better)"]
    assert axis_labels({"objectives": ["acc"]}) == ["acc"]  # a run from before orientations


@pytest.mark.slow
def test_hm3_eval_prints_the_raw_metric_and_marks_its_direction(micro_zoo_dir, capsys):
    """A plug-in error rate through ``hm3 eval`` on a real model: the raw score, marked lower-is-better."""
    from hm3.cli import main
    from hm3.eval.evaluate import evaluate_objective
    from hm3.eval.hf import HFBackend
    from objectives.registry import get_objective

    spec = "py:tests.objectives.test_plugins:CountingObjective,size=3,name=errs"
    assert main(["eval", str(micro_zoo_dir / "base"), "--objectives", f"{spec},zoo:math", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    errs = next(line for line in lines if line.startswith("errs "))
    maths = next(line for line in lines if line.startswith("zoo:math "))
    raw = evaluate_objective(HFBackend.from_pretrained(micro_zoo_dir / "base"), get_objective(spec), "validation")
    assert f"score {raw.score:.4f}" in errs and errs.endswith("(lower is better)")
    assert not maths.endswith("(lower is better)")


class ChoiceErrors(ChoiceObjective):
    """A plug-in error rate: the share of a choice file's questions answered wrongly."""

    higher_is_better = False

    def __init__(self, *, seed: int = 0, path: str) -> None:
        super().__init__(path, seed=seed)

    def score(self, example: Example, output: str) -> float:
        return 1.0 - super().score(example, output)


def test_a_level1_search_fronts_an_error_rate_as_its_utility(tiny_family, tmp_path):
    """The same questions as an accuracy and as a plug-in error rate: on every candidate the error
    rate's utility is the accuracy, its raw column 1 - that, and the store keeps the raw error rate."""
    from hm3.search.level1 import run_level1
    from hm3.search.run_config import parse_run_config

    _, models, (first, second) = tiny_family
    path = second.partition(":")[2]
    errors = f"py:{__name__}:ChoiceErrors,path={path},name=errs"
    cfg = parse_run_config({
        "models": models, "objectives": [first, f"{second},name=acc", errors],
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
        "optimizer": {"name": "random", "budget": 3},
        "evaluation": {"validation_examples": 12, "test_examples": 12, "batch_size": 16}, "seed": 1,
    })
    result = run_level1(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["higher_is_better"] == {first: True, "acc": True, "errs": False}
    assert "score_orientation" in summary
    table = pd.read_csv(tmp_path / "run" / "candidates.csv")
    assert np.allclose(table["errs_val"], table["acc_val"]) and np.allclose(table["errs_val_raw"], 1 - table["acc_val"])
    front = pd.read_csv(tmp_path / "run" / "front.csv")
    assert np.allclose(front["errs_test"], front["acc_test"]) and np.allclose(front["errs_test_raw"], 1 - front["acc_test"])
    assert "acc_val_raw" not in table.columns
    with RunStore.open(tmp_path / "run", readonly=True) as store:
        for cid, y in zip(result.candidate_ids, result.Y, strict=True):
            raw = [e.score for e in store.evaluations(cid, "errs", "validation")]
            assert raw == [pytest.approx(1 - y[2])]
