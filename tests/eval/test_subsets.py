"""Dynamic Average Reward: the cycling subset iterator and the smoothing rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hm3.errors import ConfigError, SplitTooSmallError
from hm3.eval.subsets import (
    CyclingSubsets,
    DynamicAverageReward,
    epoch_permutation,
    reset_period,
    subset_size,
)
from hm3.store import RunStore


def _draw(subsets: CyclingSubsets, count: int) -> list[list[int]]:
    return [subsets.next_subset() for _ in range(count)]


# ------------------------------------------------------------------ smoothing


def test_smoothing_matches_hand_computed_sequence() -> None:
    # alpha 0.8, N 4, s 0.5 -> reset every 2 episodes (episodes 1, 3, 5).
    dar = DynamicAverageReward(alpha=0.8, n_episodes=4, scale=0.5)
    got = [dar.update(r) for r in [1.0, 2.0, 3.0, 4.0, 5.0]]
    # ep2: a=0.8*2/4=0.4 -> 0.4*1 + 0.6*2; ep4: a=0.8 -> 0.8*3 + 0.2*4
    assert got == pytest.approx([1.0, 1.6, 3.0, 3.2, 5.0])


def test_smoothing_with_longer_period_and_weights_growing_with_i() -> None:
    # alpha 0.5, N 10, s 0.25 -> reset every 4 episodes; a_i = 0.05 i.
    dar = DynamicAverageReward(alpha=0.5, n_episodes=10, scale=0.25)
    got = [dar.update(r) for r in [10.0, 0.0, 0.0, 20.0, 7.0, 9.0]]
    ep2 = 0.1 * 10.0  # a_2 = 0.1
    ep3 = 0.15 * ep2  # a_3 = 0.15
    ep4 = 0.2 * ep3 + 0.8 * 20.0  # a_4 = 0.2
    ep6 = 0.3 * 7.0 + 0.7 * 9.0  # ep5 resets to 7; a_6 = 0.3
    assert got == pytest.approx([10.0, ep2, ep3, ep4, 7.0, ep6])


def test_weight_is_capped_at_alpha_past_the_planned_episodes() -> None:
    dar = DynamicAverageReward(alpha=0.8, n_episodes=2, scale=0.01)
    assert [dar.weight(i) for i in (1, 2, 3, 50)] == pytest.approx([0.4, 0.8, 0.8, 0.8])
    got = [dar.update(r) for r in [0.0, 1.0, 1.0]]
    assert got == pytest.approx([0.0, 0.2, 0.8 * 0.2 + 0.2])


@pytest.mark.parametrize(("scale", "period"), [(1.0, 1), (0.5, 2), (0.3, 3), (0.1, 10), (0.01, 100)])
def test_reset_period_is_round_one_over_s(scale: float, period: int) -> None:
    assert reset_period(scale) == period
    dar = DynamicAverageReward(alpha=0.8, n_episodes=1000, scale=scale)
    rewards = [float(i * i % 17 + 1) for i in range(1, 3 * period + 3)]
    smoothed = [dar.update(r) for r in rewards]
    resets = [i for i, (s, r) in enumerate(zip(smoothed, rewards, strict=True), start=1) if s == r]
    assert resets == list(range(1, len(rewards) + 1, period))


def test_full_data_scale_means_no_smoothing() -> None:
    dar = DynamicAverageReward(n_episodes=5, scale=1.0)
    assert [dar.update(r) for r in [0.1, 0.9, 0.3]] == [0.1, 0.9, 0.3]


def test_smoothing_resumes_exactly() -> None:
    rewards = [0.3, 0.5, 0.2, 0.9, 0.4, 0.6, 0.1, 0.8, 0.7, 0.2]
    straight = DynamicAverageReward(n_episodes=10, scale=0.25)
    expected = [straight.update(r) for r in rewards]

    first = DynamicAverageReward(n_episodes=10, scale=0.25)
    head = [first.update(r) for r in rewards[:6]]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = DynamicAverageReward(n_episodes=10, scale=0.25, state=state)
    assert head + [resumed.update(r) for r in rewards[6:]] == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.0, "n_episodes": 5, "scale": 0.1}, "alpha"),
        ({"n_episodes": 0, "scale": 0.1}, "n_episodes=0"),
        ({"n_episodes": 5, "scale": 0.0}, "data scale"),
        ({"n_episodes": 5, "scale": 1.5}, "data scale"),
    ],
)
def test_bad_smoothing_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DynamicAverageReward(**kwargs)


def test_smoothing_state_from_another_setting_is_refused() -> None:
    state = DynamicAverageReward(n_episodes=10, scale=0.25).state_dict()
    with pytest.raises(ConfigError, match="n_episodes=10"):
        DynamicAverageReward(n_episodes=20, scale=0.25, state=state)


# ------------------------------------------------------------------- subsets


@pytest.mark.parametrize(("n", "scale", "size"), [(100, 0.1, 10), (7, 0.3, 2), (5, 0.01, 1), (3, 1.0, 3)])
def test_subset_size_is_round_scale_n_at_least_one(n: int, scale: float, size: int) -> None:
    assert subset_size(n, scale) == size
    assert len(CyclingSubsets(n, scale, seed=0).next_subset()) == size


def test_each_pass_covers_every_example_once_when_size_divides_n() -> None:
    subsets = CyclingSubsets(12, 0.25, seed=3)
    drawn = _draw(subsets, 4 * 5)  # five passes of four subsets of three
    orders = []
    for p in range(5):
        one_pass = [i for subset in drawn[4 * p : 4 * p + 4] for i in subset]
        assert sorted(one_pass) == list(range(12))
        orders.append(one_pass)
    assert len({tuple(o) for o in orders}) == 5  # reshuffled every pass


def test_subsets_crossing_a_pass_are_distinct_and_every_pass_is_complete() -> None:
    n, size = 10, 3
    subsets = CyclingSubsets(n, None, seed=11, size=size)
    seen_in_pass: dict[int, set[int]] = {}
    for _ in range(40):
        epoch_before = subsets.state_dict()["epoch"]
        subset = subsets.next_subset()
        assert len(subset) == size and len(set(subset)) == size
        assert all(0 <= i < n for i in subset)
        for epoch in range(epoch_before, subsets.state_dict()["epoch"] + 1):
            seen_in_pass.setdefault(epoch, set()).update(subset)
    finished = sorted(seen_in_pass)[:-1]  # the last pass may still be under way
    assert len(finished) >= 10
    assert all(seen_in_pass[e] == set(range(n)) for e in finished)


def test_subsets_are_determined_by_the_seed() -> None:
    a = _draw(CyclingSubsets(50, 0.1, seed=5), 12)
    b = _draw(CyclingSubsets(50, 0.1, seed=5), 12)
    c = _draw(CyclingSubsets(50, 0.1, seed=6), 12)
    assert a == b and a != c


@pytest.mark.parametrize("stop_after", [0, 3, 4, 9])
def test_subsets_resume_exactly(stop_after: int) -> None:
    straight = _draw(CyclingSubsets(13, 0.3, seed=2), 20)
    first = CyclingSubsets(13, 0.3, seed=2)
    head = _draw(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = CyclingSubsets(13, 0.3, seed=2, state=state)
    assert head + _draw(resumed, 20 - stop_after) == straight


def test_state_survives_the_run_store(tmp_path: Path) -> None:
    subsets = CyclingSubsets(20, 0.2, seed=9)
    dar = DynamicAverageReward(n_episodes=8, scale=0.2)
    with RunStore.open(tmp_path) as store:
        for reward in (0.2, 0.4, 0.6):
            subsets.next_subset()
            dar.update(reward)
            store.add_event("dar", {"subsets": subsets.state_dict(), "reward": dar.state_dict()})
    with RunStore.open(tmp_path) as store:
        saved = store.last_event("dar").payload
    resumed_subsets = CyclingSubsets(20, 0.2, seed=9, state=saved["subsets"])
    resumed_dar = DynamicAverageReward(n_episodes=8, scale=0.2, state=saved["reward"])
    assert resumed_subsets.next_subset() == subsets.next_subset()
    assert resumed_dar.update(0.9) == dar.update(0.9)


def test_empty_split_is_refused() -> None:
    with pytest.raises(SplitTooSmallError, match="0 examples"):
        CyclingSubsets(0, 0.1, seed=0)


def test_fixed_size_larger_than_the_split_is_refused() -> None:
    with pytest.raises(SplitTooSmallError, match="subset of 30 examples .* split of 20 examples"):
        CyclingSubsets(20, None, seed=0, size=30)


def test_scale_and_size_are_exclusive_and_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        CyclingSubsets(20, 0.5, seed=0, size=3)
    with pytest.raises(ConfigError, match="exactly one"):
        CyclingSubsets(20, None, seed=0)
    with pytest.raises(ConfigError, match="data scale"):
        CyclingSubsets(20, 0.0, seed=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"n_examples": 21}, "n_examples=20"), ({"seed": 1}, "seed=0"), ({"position": 99}, "epoch/position")],
)
def test_state_from_another_split_or_seed_is_refused(change: dict, message: str) -> None:
    state = {**CyclingSubsets(20, 0.2, seed=0).state_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        CyclingSubsets(20, 0.2, seed=0, state=state)


# ------------------------------------------------------------------- boundaries (each found by mutation testing)


def test_the_smallest_settings_are_accepted() -> None:
    """A one-example split, subsets of 1 and of the whole split, α = 0, N = 1 and s = 1 are all valid."""
    assert CyclingSubsets(1, 1.0, seed=0).next_subset() == [0]
    assert CyclingSubsets(1, None, seed=0, size=1).next_subset() == [0]
    assert sorted(CyclingSubsets(6, None, seed=0, size=6).next_subset()) == list(range(6))
    plain = DynamicAverageReward(alpha=0.0, n_episodes=1, scale=0.5)
    assert [plain.update(r) for r in (0.2, 0.6, 0.4)] == [0.2, 0.6, 0.4]  # a_i = 0: no memory
    assert subset_size(4, 1.0) == 4 and reset_period(1.0) == 1


def test_scales_above_one_are_refused_everywhere() -> None:
    for call in (lambda: subset_size(10, 1.5), lambda: reset_period(1.5), lambda: CyclingSubsets(10, 1.5, seed=0)):
        with pytest.raises(ConfigError, match=r"^data scale must be in \(0, 1\], got 1.5$"):
            call()


def test_the_first_pass_is_the_seeds_pass_zero() -> None:
    """Stored runs resume by (seed, epoch, position): pass 0 must stay the first pass's order."""
    subsets = CyclingSubsets(9, None, seed=4, size=3)
    assert [i for s in _draw(subsets, 3) for i in s] == epoch_permutation(4, 0, 9)
    assert [i for s in _draw(subsets, 3) for i in s] == epoch_permutation(4, 1, 9)


@pytest.mark.parametrize("state", [{"epoch": -1}, {"epoch": "0"}, {"position": -1}, {"position": 1.5}])
def test_a_state_with_an_invalid_epoch_or_position_is_refused(state: dict) -> None:
    good = CyclingSubsets(20, 0.2, seed=0).state_dict()
    with pytest.raises(ConfigError, match="invalid epoch/position"):
        CyclingSubsets(20, 0.2, seed=0, state=good | state)


def test_a_state_at_the_end_of_a_pass_resumes() -> None:
    first = CyclingSubsets(6, None, seed=1, size=3)
    _draw(first, 2)  # exactly one pass
    resumed = CyclingSubsets(6, None, seed=1, size=3, state=first.state_dict() | {"position": 6})
    assert resumed.next_subset() == first.next_subset()


def test_refusals_name_the_stored_and_the_current_value() -> None:
    state = CyclingSubsets(20, 0.2, seed=0).state_dict() | {"n_examples": 21}
    with pytest.raises(ConfigError, match=r"^subset iterator state has n_examples=21 but this run has n_examples=20: "
                                          r"the split, data scale or seed changed since the state was saved$"):
        CyclingSubsets(20, 0.2, seed=0, state=state)
    with pytest.raises(ConfigError, match=r"^give exactly one of a data scale and a fixed subset size$"):
        CyclingSubsets(20, None, seed=0)
    dar = DynamicAverageReward(n_episodes=3, scale=0.5)
    dar.update(0.1)
    with pytest.raises(ValueError, match=r"^DAR got a non-finite reward nan at episode 2$"):
        dar.update(float("nan"))


def test_smoothing_state_holds_its_settings_and_resumes_before_any_episode() -> None:
    dar = DynamicAverageReward(alpha=0.5, n_episodes=4, scale=0.25)
    assert dar.state_dict() == {"alpha": 0.5, "n_episodes": 4, "scale": 0.25, "episode": 0, "smoothed": None}
    fresh = DynamicAverageReward(alpha=0.5, n_episodes=4, scale=0.25, state=dar.state_dict())
    assert fresh.update(0.7) == 0.7
    with pytest.raises(ConfigError, match="scale=0.5"):
        DynamicAverageReward(alpha=0.5, n_episodes=4, scale=0.5, state=dar.state_dict())
