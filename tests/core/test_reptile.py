"""Reptile aggregation from per-partition partial sums."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.core.reptile import PartialSums, reptile_update


def test_epsilon_one_is_the_weighted_mean_of_adapted_vectors() -> None:
    rng = np.random.default_rng(0)
    theta0 = rng.standard_normal((2, 3)).astype(np.float32)
    adapted = rng.standard_normal((10, 3))
    domains = rng.integers(0, 2, 10)
    weights = rng.uniform(0.5, 2.0, 10)
    parts = [PartialSums.zeros(2, 3), PartialSums.zeros(2, 3)]
    for k in range(10):
        parts[k % 2].add(
            domains[k : k + 1], adapted[k : k + 1] - theta0[domains[k : k + 1]], weights[k : k + 1]
        )
    new = reptile_update(theta0, parts, epsilon=1.0)
    for g in range(2):
        m = domains == g
        expected = (weights[m, None] * adapted[m]).sum(0) / weights[m].sum()
        np.testing.assert_allclose(new[g], expected, rtol=1e-5)


def test_small_epsilon_moves_part_way_and_untouched_domains_stay() -> None:
    theta0 = np.zeros((2, 2), np.float32)
    p = PartialSums.zeros(2, 2)
    p.add(np.array([0]), np.array([[4.0, -2.0]]), np.array([1.0]))
    new = reptile_update(theta0, [p], epsilon=0.25)
    assert new.tolist() == [[1.0, -0.5], [0.0, 0.0]]


def test_partials_round_trip_bytes_and_grow_with_domains() -> None:
    p = PartialSums.zeros(1, 2)
    p.add(np.array([2]), np.array([[1.0, 2.0]]), np.array([3.0]))
    q = PartialSums.from_bytes(p.to_bytes())
    np.testing.assert_array_equal(q.sums, p.sums)
    np.testing.assert_array_equal(q.weights, [0.0, 0.0, 3.0])
    with pytest.raises(ValueError):
        PartialSums.from_bytes(p.to_bytes()[:-8])


def test_epsilon_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        reptile_update(np.zeros((1, 2)), [], epsilon=0.0)
