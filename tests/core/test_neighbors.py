"""Item neighbours: cosine of co-consumption, the per-user cap, votes and leave-one-out."""

from __future__ import annotations

import numpy as np

from metarec.core import neighbors as nbmod
from metarec.core.neighbors import ItemNeighbors, votes


def _cosine(users: np.ndarray, items: np.ndarray, n: int) -> np.ndarray:
    x = np.zeros((int(users.max()) + 1, n))
    x[users, items] = 1.0
    co = x.T @ x
    np.fill_diagonal(co, 0.0)
    count = x.sum(0)
    return co / np.sqrt(np.outer(np.maximum(count, 1), np.maximum(count, 1)))


def test_neighbours_are_the_top_cosines_of_co_consumption() -> None:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 400), rng.integers(0, 12, 400)
    nb = ItemNeighbors.from_events(users, items, 12, n_neighbors=4)
    sim = _cosine(users, items, 12)
    for i in range(12):
        expected = np.sort(sim[i])[::-1][:4]
        np.testing.assert_allclose(nb.weight[i], expected, rtol=1e-5)
        np.testing.assert_allclose(sim[i, nb.index[i]], expected, rtol=1e-5)


def test_a_heavy_user_counts_only_their_most_recent_items(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(nbmod, "MAX_ITEMS_PER_USER", 2)
    # User 0 took items 0, 1, 2 in that order: only 1 and 2 count.
    nb = ItemNeighbors.from_events(
        np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]), 3, n_neighbors=2
    )
    assert nb.index[2].tolist() == [1, -1]  # 2 co-occurs with 1 (user 0) only
    assert nb.index[0].tolist() == [1, -1]  # user 0's item 0 does not count


def test_votes_sum_the_neighbours_of_recent_positive_items_by_age() -> None:
    nb = ItemNeighbors(
        np.array([[1, 2], [0, -1], [0, 1]], np.int32),
        np.array([[0.5, 0.2], [0.5, 0.0], [0.2, 0.3]], np.float32),
    )
    hist = np.array([[-1, 0, 2], [1, 2, 0]])
    weights = np.array([[0.0, 1.0, -1.0], [1.0, 1.0, 1.0]], np.float32)
    index, value = nb.votes(hist, weights, np.array([0.25, 0.5, 1.0], np.float32))
    dense = votes(index, value, 3)
    # Row 0: item 0 votes (age weight 0.5); the dislike of item 2 does not.
    np.testing.assert_allclose(dense[0], [0.0, 0.25, 0.1], rtol=1e-6)
    # Row 1: items 1 (0.25), 2 (0.5) and 0 (1.0).
    np.testing.assert_allclose(dense[1], [0.25 * 0.5 + 0.5 * 0.2, 0.5 * 0.3 + 0.5, 0.2], rtol=1e-6)
