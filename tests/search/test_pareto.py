"""Pareto set and hm3's HV protocol against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from hm3.errors import ConfigError
from hm3.search.pareto import (
    degenerate_objectives,
    hypervolume,
    non_dominated,
    normalisation_span,
    normalise,
    protocol_hypervolume,
    weighted_normalised,
)


def test_non_dominated_keeps_trade_offs_and_drops_dominated():
    F = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0]])
    # [0.4, 0.4] is dominated by [0.5, 0.5]; the duplicate of [1, 0] is kept
    assert non_dominated(F).tolist() == [0, 1, 2, 4]


def test_non_dominated_3d_and_empty():
    F = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0.5, 0.5, 0.4]], dtype=float)
    assert non_dominated(F).tolist() == [0, 1, 2, 3]
    assert non_dominated(np.zeros((0, 3))).tolist() == []


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([[0.5, 0.5]], 0.25),  # single point: its box
        ([[1.0, 0.5], [0.5, 1.0]], 0.5 + 0.5 - 0.25),  # two boxes overlapping in [0,.5]^2
        ([[1.0, 0.5], [0.5, 1.0], [0.4, 0.4]], 0.75),  # dominated point adds nothing
        ([[1.0, 0.5], [-0.2, 2.0]], 0.5),  # below the reference on one axis: nothing
        ([[0.0, 0.7]], 0.0),  # on the reference: nothing
    ],
)
def test_hypervolume_2d(points, expected):
    assert hypervolume(np.array(points)) == pytest.approx(expected)


def test_hypervolume_3d():
    single = np.array([[0.5, 0.4, 0.2]])
    assert hypervolume(single) == pytest.approx(0.04)
    # two boxes: 1×1×0.5 and 0.5×0.5×1; overlap 0.5×0.5×0.5
    two = np.array([[1.0, 1.0, 0.5], [0.5, 0.5, 1.0]])
    assert hypervolume(two) == pytest.approx(0.5 + 0.25 - 0.125)
    assert hypervolume(np.vstack([two, [[0.2, 0.2, 0.2]]])) == pytest.approx(0.625)
    assert hypervolume(np.vstack([two, [[2.0, 2.0, -0.1]]])) == pytest.approx(0.625)


def test_hypervolume_with_explicit_reference():
    assert hypervolume(np.array([[2.0, 3.0]]), ref=np.array([1.0, 1.0])) == pytest.approx(2.0)


def test_normalise_puts_base_at_zero_and_ideal_at_one():
    base, ideal = np.array([10.0, 0.2]), np.array([30.0, 0.6])
    F = np.array([[10.0, 0.2], [30.0, 0.6], [20.0, 0.4]])
    assert normalise(F, base, ideal) == pytest.approx(np.array([[0, 0], [1, 1], [0.5, 0.5]]))


def test_normalise_guards_ideal_equal_to_base():
    out = normalise(np.array([[0.5, 0.7]]), np.array([0.5, 0.5]), np.array([1.0, 0.5]))
    assert np.all(np.isfinite(out))
    assert out[0].tolist() == pytest.approx([0.0, 0.2])


def test_protocol_hypervolume_counts_only_merges_beating_the_base():
    base, ideal = np.array([0.3, 0.3]), np.array([0.7, 0.5])
    F = np.array([[0.5, 0.4], [0.8, 0.2]])  # 2nd point is below base on objective 2
    assert protocol_hypervolume(F, base, ideal) == pytest.approx(0.5 * 0.5)


def test_bad_shapes_raise_config_errors():
    with pytest.raises(ConfigError, match="matrix"):
        non_dominated(np.array([1.0, 2.0]))
    with pytest.raises(ConfigError, match="NaN"):
        hypervolume(np.array([[np.nan, 1.0]]))
    with pytest.raises(ConfigError, match="one entry per objective"):
        normalise(np.zeros((1, 2)), np.zeros(3), np.ones(2))


def test_normalise_keeps_direction_when_no_expert_beats_the_base():
    """A saturated task (ideal below base) stays in raw units, higher still better — found on the
    small zoo, where a 0.42 translation score was normalised to +46 through the negative gap."""
    base, ideal = np.array([0.1, 0.996]), np.array([0.5, 0.983])
    F = normalise(np.array([[0.3, 0.418], [0.3, 0.99]]), base, ideal)
    assert F[0, 0] == pytest.approx(0.5) and F[0, 1] == pytest.approx(0.418 - 0.996)
    assert F[1, 1] > F[0, 1]


# --- edges that mutation testing found unchecked ------------------------------------------------------------


def test_non_dominated_of_one_point_and_of_none_index_arrays():
    assert non_dominated(np.array([[0.3, 0.1]])).tolist() == [0]
    empty = non_dominated(np.zeros((0, 2)))
    assert np.array(["a", "b"])[empty].tolist() == []  # an integer index array, usable as one


def test_hypervolume_of_no_points_is_zero():
    assert hypervolume(np.zeros((0, 2))) == 0.0
    assert protocol_hypervolume(np.zeros((0, 2)), np.zeros(2), np.ones(2)) == 0.0


def test_reference_and_bounds_may_be_given_as_rows():
    """A base or ideal read as a 1×k row (a row of a score table) means the same as a flat vector."""
    assert hypervolume(np.array([[2.0, 3.0]]), ref=np.array([[1.0, 1.0]])) == pytest.approx(2.0)
    base, ideal = np.array([[10.0, 0.2]]), np.array([[30.0, 0.6]])
    assert normalise(np.array([[20.0, 0.4]]), base, ideal)[0].tolist() == pytest.approx([0.5, 0.5])
    assert normalisation_span(base, ideal).tolist() == pytest.approx([20.0, 0.4])
    assert degenerate_objectives(np.array([[0.5, 0.5]]), np.array([[0.9, 0.5]])) == [1]


def test_weighted_normalised_is_lambda_dot_the_normalised_scores():
    base, ideal = np.array([10.0, 0.2]), np.array([30.0, 0.6])
    # normalised [0.75, 0.25]: 0.4·0.75 + 0.6·0.25
    assert weighted_normalised(np.array([0.4, 0.6]), np.array([25.0, 0.3]), base, ideal) == pytest.approx(0.45)


def test_degenerate_objectives_are_those_no_expert_beats_by_more_than_the_tolerance():
    base = np.array([0.5, 0.5, 0.5, 0.0])
    ideal = np.array([0.7, 0.5, 0.4, 1e-12])
    assert degenerate_objectives(base, ideal) == [1, 2, 3]  # a gap of exactly 1e-12 is degenerate too
    assert normalisation_span(base, ideal).tolist() == pytest.approx([0.2, 1.0, 1.0, 1.0])
    assert degenerate_objectives(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == []


def test_error_messages_name_what_is_wrong():
    with pytest.raises(ConfigError, match="^scores hold NaN or Inf values$"):
        non_dominated(np.array([[np.inf, 1.0]]))
    with pytest.raises(ConfigError, match="^normalised scores hold NaN or Inf values$"):
        hypervolume(np.array([[np.nan, 1.0]]))
    with pytest.raises(ConfigError, match=r"^normalised scores must be an \(n points × k objectives\) matrix"):
        hypervolume(np.array([1.0, 2.0]))
    with pytest.raises(ConfigError, match="^reference point has 3 entries, expected 2$"):
        hypervolume(np.array([[1.0, 2.0]]), ref=np.zeros(3))
    with pytest.raises(ConfigError, match="NaN"):  # a missing score (None) is not a number
        non_dominated(np.array([[0.5, None]]))
