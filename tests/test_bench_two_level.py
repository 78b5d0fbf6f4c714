"""experiments/bench_two_level.py's equal-cost planning: every arm with level 2 is planned to cost what level 1
alone does, counted the way the store counts it (examples actually scored)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import bench_two_level  # noqa: E402

from hm3.eval.subsets import subset_size  # noqa: E402


def bench_args(**over) -> argparse.Namespace:
    args = dict(zoo=Path("zoo"), budget=80, level1_share=0.5, preferences=3, data_scale=0.05, t_max=4,
                validation_examples=128, test_examples=200)
    return argparse.Namespace(**(args | over))


def planned_equivalents(data: dict, references: int, n: int) -> float:
    """Full-evaluation equivalents a run of ``data`` scores on the validation plan if every episode and every
    kept path (greedy and best per λ) is a new evaluation: the references, the level-1 merges, the level-2
    episodes on their DAR subsets (the product's own subset size) and the kept paths on the whole plan."""
    level2 = data.get("level2")
    if level2 is None:
        return references + data["optimizer"]["budget"]
    rl = level2["rl"]
    merges = 0 if level2["pool"] == "experts" else data["optimizer"]["budget"]
    episodes = rl["offline_episodes"] + level2["preferences"] * rl["online_episodes"]
    per_episode = subset_size(n, rl["data_scale"]) / n if rl["dar"] else 1.0
    return references + merges + episodes * per_episode + 2 * level2["preferences"]


@pytest.mark.parametrize("over", [{}, {"data_scale": 0.1, "validation_examples": 64}, {"level1_share": 0.75},
                                  {"validation_examples": 100, "budget": 120}])
@pytest.mark.parametrize("name", ["level2-only", "both"])
def test_every_dar_arm_is_planned_at_the_cost_of_level1_alone(name, over):
    # the references (base and experts) are scored by every arm alike, so their number must not matter
    args = bench_args(**over)
    n = args.validation_examples
    for references in (4, 5):
        level1 = planned_equivalents(bench_two_level.arm_config(args, "level1", 0), references, n)
        arm = planned_equivalents(bench_two_level.arm_config(args, name, 0), references, n)
        one_episode_per_preference = args.preferences * subset_size(n, args.data_scale) / n
        assert arm == pytest.approx(level1, abs=one_episode_per_preference), (name, references)


def test_the_no_dar_arms_run_the_dar_arms_episodes():
    args = bench_args()
    for dar, nodar in (("both", "both-nodar"), ("level2-only", "level2-only-nodar")):
        a, b = (bench_two_level.arm_config(args, x, 0)["level2"] for x in (dar, nodar))
        assert (a["rl"]["dar"], b["rl"]["dar"]) == (True, False)
        assert {**a["rl"], "dar": None} == {**b["rl"], "dar": None} and a["pool"] == b["pool"]


def test_the_page_says_a_result_planned_the_old_way_was_not_at_equal_cost():
    from benchmark_report import Result
    from benchmark_sections import cost_note

    table = {"level1": {"full_evaluation_equivalents": 84.0}, "both": {"full_evaluation_equivalents": 80.8},
             "both-nodar": {"full_evaluation_equivalents": 438.7}}
    old = Result(Path("bench_two_level_2026-11-30_abcdef0_x.json"), "bench_two_level", "2026-11-30", "abcdef0", "x",
                 {"table": table})
    new = Result(old.path, "bench_two_level", "2026-11-30", "abcdef0", "x",
                 {"table": table, "cost_planning": bench_two_level.COST_PLANNING})
    assert "to be rerun" in cost_note(old) and "both levels 80.8 (0.96×)" in cost_note(old)
    assert "no DAR" not in cost_note(old)  # the DAR ablation's arms run equal episodes, not equal cost
    assert "rerun" not in cost_note(new) and "both levels 80.8 (0.96×)" in cost_note(new)


def test_an_arm_of_an_earlier_call_is_read_back_only_if_it_ran_this_config(tmp_path, micro_zoo_dir):
    # after a change of how arms are planned, an old --work must not pass its arms off as the new plan's
    from hm3.errors import ConfigError

    def level1_arm(args):  # the level-1 arm with random search, 2 merges: the shortest run of the script's
        data = bench_two_level.arm_config(args, "level1", 0) | {"optimizer": {"name": "random", "budget": 2}}
        return bench_two_level.arm(args, "level1", 0, data, False)

    args = bench_args(zoo=micro_zoo_dir, work=tmp_path, validation_examples=8, test_examples=4, quiet=True)
    first = level1_arm(args)
    assert level1_arm(args) == first
    with pytest.raises(ConfigError, match="validation_examples"):
        level1_arm(bench_args(**{**vars(args), "validation_examples": 4}))
