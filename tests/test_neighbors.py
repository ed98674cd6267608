"""Item neighbours: cosine of co-consumption, the per-user cap, votes and leave-one-out."""

from __future__ import annotations

import numpy as np

from metarec import neighbors as nbmod
from metarec.neighbors import ItemNeighbors, votes


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
    nb = ItemNeighbors.from_events(np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]), 3,
                                   n_neighbors=2)
    assert nb.count.tolist() == [1.0, 2.0, 1.0]
    assert nb.index[2].tolist() == [1, -1]


def test_votes_sum_the_neighbours_of_recent_positive_items_by_age() -> None:
    nb = ItemNeighbors(np.array([[1, 2], [0, -1], [0, 1]], np.int32),
                       np.array([[0.5, 0.2], [0.5, 0.0], [0.2, 0.3]], np.float32),
                       np.array([4.0, 2.0, 2.0], np.float32))
    hist = np.array([[-1, 0, 2], [1, 2, 0]])
    weights = np.array([[0.0, 1.0, -1.0], [1.0, 1.0, 1.0]], np.float32)
    index, value = nb.votes(hist, weights, np.array([0.25, 0.5, 1.0], np.float32))
    dense = votes(index, value, 3)
    # Row 0: item 0 votes (age weight 0.5); the dislike of item 2 does not.
    np.testing.assert_allclose(dense[0], [0.0, 0.25, 0.1], rtol=1e-6)
    # Row 1: items 1 (0.25), 2 (0.5) and 0 (1.0).
    np.testing.assert_allclose(dense[1], [0.25 * 0.5 + 0.5 * 0.2, 0.5 * 0.3 + 0.5,
                                          0.2], rtol=1e-6)


def test_leaving_a_user_out_takes_exactly_one_pair_count_away() -> None:
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    items = np.array([0, 1, 0, 1, 0, 1, 0, 2])
    nb = ItemNeighbors.from_events(users, items, 3, n_neighbors=2)
    hist = np.array([[0]])
    leave = (nb.index[hist] == 1)  # user 0 later takes item 1: its pair with 0 is theirs
    index, value = nb.votes(hist, np.ones((1, 1), np.float32), np.ones(1, np.float32),
                            leave_out=leave)
    # C_01 drops from 3 to 2; the counts n_0 = 4 and n_1 = 3 still include the user.
    dense = votes(index, value, 3)[0]
    np.testing.assert_allclose(dense[1], 2 / np.sqrt(4 * 3), rtol=1e-6)
    np.testing.assert_allclose(dense[2], 1 / np.sqrt(4 * 1), rtol=1e-6)  # not theirs
