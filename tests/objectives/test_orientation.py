"""Lower-is-better objectives: the store keeps the raw metric, searches and fronts see ``1 - raw``
(``-raw`` for an unbounded metric such as perplexity)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from hm3.run.front import _score_columns, axis_labels
from hm3.search.estimates import lower_bound, stored_estimate
from hm3.search.pareto import non_dominated, normalise, protocol_hypervolume
from hm3.search.scoring import CandidateScorer, SplitPlan, utilities
from hm3.store import RunStore
from objectives.base import Example, Generate, Objective, utility, utility_map
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
    assert [utility_map(True), utility_map(False), utility_map(False, bounded=False)] == ["raw", "1 - raw", "-raw"]
    assert utility(0.25, "raw") == 0.25 and utility(0.25, "1 - raw") == 0.75
    assert utility(utility(0.375, "1 - raw"), "1 - raw") == 0.375
    assert utility(7.5, "-raw") == -7.5 and utility(utility(7.5, "-raw"), "-raw") == 7.5
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*bounded = False"):
        utility(1.5, "1 - raw")
    with pytest.raises(ValueError, match="must be finite"):
        utility(float("inf"), "-raw")
    with pytest.raises(ValueError, match="unknown utility map 'log'"):
        utility(1.0, "log")
    with pytest.raises(ValueError, match="objective 'err'"):
        utilities([Matches("err", False)], [2.0])
    unbounded = Matches("ppl", False)
    unbounded.bounded = False
    assert utilities([unbounded], [2.0]).tolist() == [-2.0]


def test_an_unbounded_metric_ranks_and_normalises_as_the_metric_read_upside_down():
    """Perplexities (raw, lower is better) of a base, two experts and three merges, beside an accuracy.
    The HV protocol sees the same normalised scores whatever constant the utility adds: -raw here."""
    ppl = np.array([20.0, 12.0, 30.0, 14.0, 25.0, 11.0])  # base, expert 1, expert 2, merges a, b, c
    acc = np.array([0.2, 0.3, 0.6, 0.5, 0.55, 0.1])
    F = np.stack([acc, [utility(p, "-raw") for p in ppl]], axis=1)
    base, ideal = F[0], F[1:3].max(axis=0)  # ideal: the best expert per objective (perplexity 12)
    # normalised by hand: acc (a - 0.2) / 0.4, perplexity (20 - p) / (20 - 12)
    expected = np.stack([(acc - 0.2) / 0.4, (20 - ppl) / 8], axis=1)
    assert np.allclose(normalise(F, base, ideal), expected)
    assert non_dominated(F[3:]).tolist() == [0, 1, 2]  # a: both good, b: best acc, c: best perplexity
    # above the origin (the base) only merge a counts: (0.5 - 0.2)/0.4 * (20 - 14)/8; b and c fall below on one axis
    assert protocol_hypervolume(F[3:], base, ideal) == pytest.approx(0.75 * 0.75)
    assert protocol_hypervolume(F[3:] + [0.0, 5.0], base + [0.0, 5.0], ideal + [0.0, 5.0]) == pytest.approx(0.5625)


def test_a_subset_estimate_cannot_vouch_for_an_unbounded_metric():
    """The worst-case standard error of a mean exists only for scores in [0, 1] (module docstring of
    hm3.search.estimates): with weight on a perplexity the lower bound is -inf, without it the usual one."""
    estimate = (np.array([0.5, -14.0]), np.array([16.0, 16.0]))
    base, ideal = np.array([0.2, -20.0]), np.array([0.6, -12.0])
    maps = ["raw", "-raw"]
    assert lower_bound(np.array([0.5, 0.5]), estimate, base, ideal, maps) == float("-inf")
    # acc alone: 0.75 normalised, minus 0.5/sqrt(16)/0.4
    assert lower_bound(np.array([1.0, 0.0]), estimate, base, ideal, maps) == pytest.approx(0.75 - 0.125 / 0.4)


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
        means, counts = stored_estimate(store, refs[0], ["acc", "err"], utility_maps=["raw", "1 - raw"])
        assert means.tolist() == [0.5, 0.75] and counts.tolist() == [4, 4]
    assert non_dominated(F).tolist() == [0, 2]  # B (most errors) is dominated by A; read raw it would win
    # A and C's union above the origin: 0.5 * 0.75 + (1 - 0.5) * 0.5 (read raw, B and C's would be 0.75)
    assert protocol_hypervolume(F, np.zeros(2), np.ones(2)) == pytest.approx(0.625)


def test_front_tables_add_the_raw_metric_and_the_plot_says_which_axis_is_flipped():
    columns = _score_columns(["acc", "err", "ppl"], np.array([0.5, 0.75, -7.5]), "val",
                             {"err": "1 - raw", "ppl": "-raw"})
    assert columns == {"acc_val": 0.5, "err_val": 0.75, "ppl_val": -7.5, "err_val_raw": 0.25, "ppl_val_raw": 7.5}
    summary = {"objectives": ["acc", "err"], "higher_is_better": {"acc": True, "err": False}}  # before utility_maps
    assert axis_labels(summary) == ["acc", "err (1 - raw; raw: lower is better)"]
    summary = {"objectives": ["acc", "ppl"], "higher_is_better": {"acc": True, "ppl": False},
               "utility_maps": {"acc": "raw", "ppl": "-raw"}}
    assert axis_labels(summary) == ["acc", "ppl (-raw; raw: lower is better)"]
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


class ChoiceErrorCount(ChoiceErrors):
    """An unbounded lower-is-better metric: ten times the error rate (a count of errors per ten questions)."""

    bounded = False

    def score(self, example: Example, output: str) -> float:
        return 10.0 * super().score(example, output)


def test_a_level1_search_fronts_an_error_rate_as_its_utility(tiny_family, tmp_path):
    """The same questions as an accuracy, as a plug-in error rate and as an unbounded error count: on every
    candidate the error rate's utility is the accuracy, its raw column 1 - that; the count's utility is
    -raw, its raw column ten times the error rate; the store keeps the raw metrics, and a budget-0
    request reports them raw."""
    from hm3.request import answer_request
    from hm3.search.level1 import run_level1
    from hm3.search.run_config import parse_run_config

    _, models, (first, second) = tiny_family
    path = second.partition(":")[2]
    errors = f"py:{__name__}:ChoiceErrors,path={path},name=errs"
    count = f"py:{__name__}:ChoiceErrorCount,path={path},name=count"
    cfg = parse_run_config({
        "models": models, "objectives": [first, f"{second},name=acc", errors, count],
        "search_space": {"base_model": "base", "models": ["m1", "m2"], "dare": False},
        "optimizer": {"name": "random", "budget": 3},
        "evaluation": {"validation_examples": 12, "test_examples": 12, "batch_size": 16}, "seed": 1,
    })
    result = run_level1(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["higher_is_better"] == {first: True, "acc": True, "errs": False, "count": False}
    assert summary["utility_maps"] == {first: "raw", "acc": "raw", "errs": "1 - raw", "count": "-raw"}
    assert "score_orientation" in summary
    table = pd.read_csv(tmp_path / "run" / "candidates.csv")
    assert np.allclose(table["errs_val"], table["acc_val"]) and np.allclose(table["errs_val_raw"], 1 - table["acc_val"])
    front = pd.read_csv(tmp_path / "run" / "front.csv")
    assert np.allclose(front["errs_test"], front["acc_test"]) and np.allclose(front["errs_test_raw"], 1 - front["acc_test"])
    assert "acc_val_raw" not in table.columns
    assert np.allclose(table["count_val_raw"], 10 * (1 - table["acc_val"])) and np.allclose(
        table["count_val"], -table["count_val_raw"])
    answer = answer_request(tmp_path / "run", "acc=1", tmp_path / "answer", progress=False)
    record = json.loads((tmp_path / "answer" / "hm3_request.json").read_text())
    scores = record["validation_scores"]
    assert record["raw_validation_scores"] == {"errs": pytest.approx(1 - scores["errs"]),
                                               "count": pytest.approx(-scores["count"])}
    assert scores["count"] == pytest.approx(-10 * (1 - scores["acc"])) and answer.kind == "merge"
    assert any("count: scores are -raw" in n for n in record["notes"])
    with RunStore.open(tmp_path / "run", readonly=True) as store:
        for cid, y in zip(result.candidate_ids, result.Y, strict=True):
            raw = [e.score for e in store.evaluations(cid, "errs", "validation")]
            assert raw == [pytest.approx(1 - y[2])]
