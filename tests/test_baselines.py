"""Baselines on tiny hand-made streams, plus the contract every recommender must keep."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import numpy as np
import pytest

from metarec.baselines import DAY_MS, ItemKNN, OnlineBPRMF, Popularity, RecentPopularity
from metarec.recommender import Interaction, Recommender

Make = Callable[[int], Recommender]

ALL: dict[str, Make] = {
    "pop": lambda seed: Popularity(seed=seed),
    "recent_pop": lambda seed: RecentPopularity(seed=seed),
    "bprmf": lambda seed: OnlineBPRMF(seed=seed),
    "itemknn": lambda seed: ItemKNN(seed=seed),
}


def _stream(n: int = 300, seed: int = 0) -> list[Interaction]:
    rng = np.random.default_rng(seed)
    return [
        Interaction(user=int(rng.integers(0, 20)), item=int(rng.integers(0, 30)),
                    ts=t * 60_000, domain=0, weight=float(rng.choice([1.0, 2.0])))
        for t in range(n)
    ]


def _replay(rec: Recommender, events: list[Interaction]) -> None:
    for x in events:
        rec.learn_one(x)


@pytest.mark.parametrize("name", sorted(ALL))
def test_seeded_runs_are_reproducible(name: str) -> None:
    events = _stream()
    a, b = ALL[name](7), ALL[name](7)
    _replay(a, events)
    _replay(b, events)
    for user in (0, 5, 99):
        np.testing.assert_array_equal(a.score(user, 10**9, 0, 30), b.score(user, 10**9, 0, 30))


@pytest.mark.parametrize("name", sorted(ALL))
def test_scores_are_fresh_float_arrays_and_inputs_untouched(name: str) -> None:
    events = _stream()
    before = list(events)
    rec = ALL[name](0)
    _replay(rec, events)
    assert events == before
    s = rec.score(3, 10**9, 0, 40)  # past the items seen: zero-padded, not an error
    assert s.dtype == np.float64 and s.shape == (40,)
    keep = s.copy()
    s[:] = -1.0
    np.testing.assert_array_equal(rec.score(3, 10**9, 0, 40), keep)


@pytest.mark.parametrize("name", sorted(ALL))
def test_pickle_round_trip_keeps_scores(name: str) -> None:
    rec = ALL[name](1)
    _replay(rec, _stream())
    back = pickle.loads(pickle.dumps(rec))
    np.testing.assert_array_equal(back.score(2, 10**9, 0, 30), rec.score(2, 10**9, 0, 30))


@pytest.mark.parametrize("name", sorted(ALL))
def test_empty_model_scores_zero(name: str) -> None:
    assert ALL[name](0).score(0, 0, 0, 5).tolist() == [0.0] * 5


def test_popularity_counts_positive_events_only() -> None:
    pop = Popularity()
    for item, w in [(0, 1.0), (1, 2.0), (1, 1.0), (2, -1.0)]:
        pop.learn_one(Interaction(user=0, item=item, ts=0, weight=w))
    assert pop.score(0, 0, 0, 3).tolist() == [1.0, 2.0, 0.0]


def test_recent_popularity_decays_and_separates_domains() -> None:
    rp = RecentPopularity()  # 7-day half-life
    rp.learn_one(Interaction(user=0, item=0, ts=0, domain=0))
    rp.learn_one(Interaction(user=0, item=1, ts=7 * DAY_MS, domain=1))
    assert rp.score(0, 7 * DAY_MS, 0, 2).tolist() == [0.5, 0.0]
    assert rp.score(0, 7 * DAY_MS, 1, 2).tolist() == [0.0, 1.0]
    overall = RecentPopularity(per_domain=False)
    overall.learn_one(Interaction(user=0, item=0, ts=0, domain=0))
    overall.learn_one(Interaction(user=0, item=1, ts=7 * DAY_MS, domain=1))
    assert overall.score(0, 7 * DAY_MS, 0, 2).tolist() == [0.5, 1.0]


def test_itemknn_ranks_co_consumed_items_first() -> None:
    knn = ItemKNN()
    # Items 0, 1 and 2 go together; 3 and 4 are popular on their own.
    for user in range(5):
        for item in (0, 1, 2):
            knn.learn_one(Interaction(user=user, item=item, ts=0))
    for user in range(5, 15):
        for item in (3, 4):
            knn.learn_one(Interaction(user=user, item=item, ts=0))
    knn.learn_one(Interaction(user=20, item=0, ts=0))
    s = knn.score(20, 0, 0, 5)
    assert min(s[1], s[2]) > max(s[3], s[4])
    # A user with no history is ranked by popularity alone.
    cold = knn.score(99, 0, 0, 5)
    assert min(cold[3], cold[4]) > max(cold[0], cold[1], cold[2])


def test_itemknn_recent_items_vote_more() -> None:
    knn = ItemKNN()
    for user, pair in enumerate([(0, 1), (2, 3)] * 3):
        for item in pair:
            knn.learn_one(Interaction(user=user, item=item, ts=0))
    knn.learn_one(Interaction(user=50, item=0, ts=0))
    knn.learn_one(Interaction(user=50, item=2, ts=0))  # most recent
    s = knn.score(50, 0, 0, 4)
    assert s[3] > s[1]


def test_itemknn_repeat_and_dislike_change_nothing() -> None:
    knn = ItemKNN()
    _replay(knn, [Interaction(user=0, item=0, ts=0), Interaction(user=0, item=1, ts=0)])
    before = knn.score(0, 0, 0, 2)
    knn.learn_one(Interaction(user=0, item=3, ts=0, weight=-1.0))
    knn.learn_one(Interaction(user=1, item=3, ts=0, weight=-1.0))
    np.testing.assert_array_equal(knn.score(0, 0, 0, 2), before)


def test_itemknn_capacity_grows() -> None:
    knn = ItemKNN(capacity=2)
    _replay(knn, [Interaction(user=0, item=i, ts=0) for i in (0, 1, 500)])
    knn.learn_one(Interaction(user=1, item=500, ts=0))
    s = knn.score(1, 0, 0, 501)
    assert s[0] > 0 and s[1] > 0 and s[2] == 0


def test_bprmf_new_user_starts_at_zero() -> None:
    mf = OnlineBPRMF(seed=3)
    _replay(mf, _stream())
    n = 30
    bias = mf._bias[:n]
    # Past the allocated users, or inside the allocation but never learned from: a new
    # user's vector is zero, so the scores are exactly the item biases.
    np.testing.assert_array_equal(mf.score(1000, 0, 0, n), bias)
    np.testing.assert_array_equal(mf.score(25, 0, 0, n), bias)
    mf.learn_one(Interaction(user=1000, item=4, ts=0))
    assert not np.allclose(mf.score(1000, 0, 0, n), mf._bias[:n])


def test_bprmf_learns_a_preference() -> None:
    mf = OnlineBPRMF(seed=0)
    events = [Interaction(user=u, item=i, ts=0) for u in range(40) for i in range(30)]
    _replay(mf, events)  # every item once per user: a uniform background
    for _ in range(30):
        mf.learn_one(Interaction(user=0, item=5, ts=0))
    s = mf.score(0, 0, 0, 30)
    assert int(np.argmax(s)) == 5


def test_bprmf_dislike_pushes_item_down() -> None:
    mf = OnlineBPRMF(seed=0)
    _replay(mf, _stream())
    before = mf.score(0, 0, 0, 30)[7]
    for _ in range(20):
        mf.learn_one(Interaction(user=0, item=7, ts=0, weight=-1.0))
    assert mf.score(0, 0, 0, 30)[7] < before


def test_bprmf_seeds_differ() -> None:
    a, b = OnlineBPRMF(seed=0), OnlineBPRMF(seed=1)
    events = _stream()
    _replay(a, events)
    _replay(b, events)
    assert not np.allclose(a.score(0, 0, 0, 30), b.score(0, 0, 0, 30))


def test_hyperparameters_are_stored_under_their_names() -> None:
    mf = OnlineBPRMF(n_factors=8, n_negatives=3, lr=0.1, l2=0.0, init_std=0.2, weighted=True,
                     seed=5)
    assert (mf.n_factors, mf.n_negatives, mf.lr, mf.l2, mf.init_std, mf.weighted, mf.seed) == (
        8, 3, 0.1, 0.0, 0.2, True, 5)
    knn = ItemKNN(n_recent=5, decay=0.5, pop_weight=0.0, half_life_ms=10, seed=2)
    assert (knn.n_recent, knn.decay, knn.pop_weight, knn.half_life_ms, knn.seed) == (
        5, 0.5, 0.0, 10, 2)
