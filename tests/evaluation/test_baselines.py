"""Baselines on tiny hand-made streams, plus the contract every recommender must keep."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import numpy as np
import pytest

from metarec.core.events import Event, UserRecord
from metarec.data.dataset import Dataset
from metarec.errors import ConfigError
from metarec.evaluation.baselines import (
    DAY_MS,
    EASE,
    FirstPop,
    ItemKNN,
    OnlineBPRMF,
    Popularity,
    RecentPopularity,
)
from metarec.evaluation.command import METHODS
from metarec.evaluation.online import metarec_factory, metarec_no_meta_factory
from metarec.evaluation.protocol import BASELINES, EncodedStream, encode
from metarec.evaluation.recommender import Interaction, Recommender
from metarec.evaluation.sasrec import SASRec

Make = Callable[[int], Recommender]


def _stream(n: int = 300, seed: int = 0) -> list[Interaction]:
    """Events of 20 users over 30 items, dense-indexed as ``metarec eval`` encodes them."""
    return _interactions(_encoded(n, seed))


def _encoded(n: int = 300, seed: int = 0) -> EncodedStream:
    rng = np.random.default_rng(seed)
    events = [
        Event(
            f"u{int(rng.integers(0, 20))}",
            f"i{int(rng.integers(0, 30))}",
            str(rng.choice(["click", "like"])),
            t * 60_000,
        )
        for t in range(n)
    ]
    # Profiles of 100 users, so that users who never acted (up to index 99) exist.
    users = [UserRecord(f"u{k}", (f"g:{k % 3}",)) for k in range(100)]
    return encode(Dataset("contract", events, users=users))


def _interactions(s: EncodedStream) -> list[Interaction]:
    return [
        Interaction(
            user=int(s.users[t]),
            item=int(s.items[t]),
            ts=int(s.ts[t]),
            domain=int(s.domains[t]),
            weight=float(s.weights[t]),
        )
        for t in range(s.n_events)
    ]


ALL: dict[str, Make] = {
    "pop": lambda seed: Popularity(seed=seed),
    "recent_pop": lambda seed: RecentPopularity(seed=seed),
    "bprmf": lambda seed: OnlineBPRMF(seed=seed),
    "itemknn": lambda seed: ItemKNN(seed=seed),
    "firstpop": lambda seed: FirstPop(seed=seed),
    # Refits a few times on the 300-event stream, so the contract covers the fitted model.
    "ease": lambda seed: EASE(refit_every=70, seed=seed),
    # Small enough to fit in a second, refitted twice on the 300-event stream.
    "sasrec": lambda seed: SASRec(
        dim=8, blocks=1, max_len=8, negatives=16, refit_every=120, min_steps=5, seed=seed
    ),
    # metarec as the services run it, and its ablation: what `metarec eval` compares.
    "metarec": lambda seed: metarec_factory(_encoded(), seed),
    "metarec_no_meta": lambda seed: metarec_no_meta_factory(_encoded(), seed),
}


def test_the_contract_covers_every_method_metarec_eval_compares() -> None:
    assert set(ALL) == set(METHODS)


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
    mf = OnlineBPRMF(
        n_factors=8, n_negatives=3, lr=0.1, l2=0.0, init_std=0.2, weighted=True, seed=5
    )
    assert (mf.n_factors, mf.n_negatives, mf.lr, mf.l2, mf.init_std, mf.weighted, mf.seed) == (
        8,
        3,
        0.1,
        0.0,
        0.2,
        True,
        5,
    )
    knn = ItemKNN(n_recent=5, decay=0.5, pop_weight=0.0, half_life_ms=10, seed=2)
    assert (knn.n_recent, knn.decay, knn.pop_weight, knn.half_life_ms, knn.seed) == (
        5,
        0.5,
        0.0,
        10,
        2,
    )
    fp = FirstPop(first_events=2, seed=4)
    assert (fp.first_events, fp.seed) == (2, 4)
    ease = EASE(lambdas=(1.0, 2.0), refit_every=5, max_items=7, first_events=2, seed=3)
    assert (ease.lambdas, ease.refit_every, ease.max_items, ease.first_events, ease.seed) == (
        (1.0, 2.0),
        5,
        7,
        2,
        3,
    )


def test_baselines_registry_keeps_the_old_order_and_adds_the_new_ones() -> None:
    assert list(BASELINES) == [
        "pop",
        "recent_pop",
        "bprmf",
        "itemknn",
        "firstpop",
        "ease",
        "sasrec",
    ]
    from metarec.core.events import Event
    from metarec.data.dataset import Dataset

    stream = encode(Dataset("toy", [Event("a", "x", "click", 1)]))
    assert isinstance(BASELINES["firstpop"](stream, 0), FirstPop)
    assert isinstance(BASELINES["ease"](stream, 0), EASE)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lambdas": ()},
        {"lambdas": (0.0, 1.0)},
        {"refit_every": 0},
        {"max_items": 0},
        {"first_events": 0},
    ],
)
def test_ease_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        EASE(**kwargs)  # type: ignore[arg-type]


# --- FirstPop ---------------------------------------------------------------------------


def test_firstpop_counts_each_users_first_positive_events_only() -> None:
    events = [
        (0, 5, -1.0),  # a dislike: neither counted nor numbered
        (0, 0, 1.0),
        (0, 0, 2.0),  # a repeat is an event, but the item counts once
        (0, 1, 1.0),
        (0, 2, 1.0),  # user 0's 4th positive event: too late
        (1, 1, 1.0),
        (1, 2, 1.0),
        (1, 3, 1.0),
        (1, 4, 1.0),
        (2, 4, -1.0),
        (2, 1, 1.0),
    ]
    fp, first = FirstPop(), FirstPop(first_events=1)
    for user, item, w in events:
        x = Interaction(user=user, item=item, ts=0, weight=w)
        fp.learn_one(x)
        first.learn_one(x)
    assert fp.score(9, 0, 0, 6).tolist() == [1.0, 3.0, 1.0, 1.0, 0.0, 0.0]
    assert fp.score(0, 0, 0, 6).tolist() == fp.score(9, 0, 0, 6).tolist()
    assert first.score(0, 0, 0, 6).tolist() == [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]


# --- EASE -------------------------------------------------------------------------------


def _histories(events: list[Interaction]) -> dict[int, list[int]]:
    """Each user's distinct positively consumed items, in order of first consumption."""
    hist: dict[int, list[int]] = {}
    for x in events:
        if x.weight > 0 and x.item not in hist.setdefault(x.user, []):
            hist[x.user].append(x.item)
    return hist


def _reference_b(rows: list[list[int]], n: int, lam: float) -> np.ndarray:
    """EASE's B the textbook way: one explicit inverse."""
    x = np.zeros((len(rows), n))
    for u, items in enumerate(rows):
        x[u, items] = 1.0
    p = np.linalg.inv(x.T @ x + lam * np.eye(n))
    b = np.eye(n) - p / np.diag(p)
    return b


def _mixed_stream(n: int = 300, seed: int = 0) -> list[Interaction]:
    """Like :func:`_stream`, with one event in ten a dislike."""
    rng = np.random.default_rng(seed)
    return [
        Interaction(
            user=int(rng.integers(0, 20)),
            item=int(rng.integers(0, 30)),
            ts=t,
            weight=-1.0 if rng.random() < 0.1 else 1.0,
        )
        for t in range(n)
    ]


def test_ease_fit_matches_the_closed_form_and_has_a_zero_diagonal() -> None:
    events = _mixed_stream(200)
    ease = EASE(lambdas=(3.0,), refit_every=200)
    _replay(ease, events)
    assert ease.lambdas_chosen == [3.0]
    hist = _histories(events)
    n = max(max(h) for h in hist.values()) + 1
    assert ease._fit_items.tolist() == sorted({i for h in hist.values() for i in h})
    ref = _reference_b(list(hist.values()), n, 3.0)
    fit = ease._fit_items
    np.testing.assert_allclose(ease._weights, ref[np.ix_(fit, fit)], atol=1e-10)
    assert np.all(np.diag(ease._weights) == 0.0)
    assert np.abs(ease._weights).max() > 0.01


def test_ease_ranks_the_co_occurring_item_first() -> None:
    # Items 0 and 1 always go together; 2 and 3 are twice as popular, on their own.
    events = [Interaction(user=u, item=i, ts=0) for u in range(5) for i in (0, 1)]
    events += [Interaction(user=u, item=i, ts=0) for u in range(5, 15) for i in (2, 3)]
    ease = EASE(refit_every=len(events))
    _replay(ease, events)
    assert len(ease.lambdas_chosen) == 1
    ease.learn_one(Interaction(user=20, item=0, ts=0))
    s = ease.score(20, 0, 0, 4)
    assert int(np.argmax(np.delete(s, 0))) == 0  # item 1, once the user's own item is out
    assert s[1] > max(s[2], s[3]) + 1e-3


def _reference_lambda(events: list[Interaction], grid: tuple[float, ...]) -> float:
    """Leave-last-out HR@10 of every λ with explicit inverses; ties go to the larger λ."""
    hist = _histories(events)
    n = max(max(h) for h in hist.values()) + 1
    train = [h[:-1] if len(h) >= 2 else h for h in hist.values()]
    val = [(h[:-1], h[-1]) for h in hist.values() if len(h) >= 2]
    best_lam, best_hr = 0.0, -1.0
    for lam in sorted(grid):
        b = _reference_b(train, n, lam)
        hits = 0.0
        for rest, target in val:
            s = b[rest].sum(axis=0)
            s[rest] = -np.inf
            greater = int(np.sum(s > s[target]))
            ties = int(np.sum(s == s[target]))
            hits += min(max(10 - greater, 0), ties) / ties
        if hits >= best_hr - 1e-9:
            best_lam, best_hr = lam, hits
    return best_lam


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ease_chooses_lambda_on_the_past_like_the_textbook_computation(seed: int) -> None:
    grid = (0.3, 1.0, 3.0, 10.0, 30.0)
    events = _mixed_stream(400, seed=seed)
    ease = EASE(lambdas=grid, refit_every=200)
    _replay(ease, events)
    assert len(ease.lambdas_chosen) == 2
    assert ease.lambdas_chosen == [
        _reference_lambda(events[:200], grid),
        _reference_lambda(events, grid),
    ]


def test_ease_lambda_ties_go_to_the_larger_value() -> None:
    # Every user consumes the same two items: every λ ranks the held-out item first.
    events = [Interaction(user=u, item=i, ts=0) for u in range(4) for i in (0, 1)]
    ease = EASE(lambdas=(100.0, 1.0, 10.0), refit_every=len(events))
    _replay(ease, events)
    assert ease.lambdas_chosen == [100.0]


def test_ease_new_user_gets_firstpop_order_with_popularity_breaking_ties() -> None:
    events = _mixed_stream(300)
    ease, fp, pop = EASE(refit_every=100), FirstPop(), Popularity()
    for x in events:
        for rec in (ease, fp, pop):
            rec.learn_one(x)
    ease.learn_one(Interaction(user=50, item=3, ts=0, weight=-1.0))  # a dislike: no history
    first, counts = fp.score(0, 0, 0, 32), pop.score(0, 0, 0, 32)
    assert len(np.unique(first)) < first.size  # FirstPop has ties for popularity to break
    for user in (50, 99):
        s = ease.score(user, 0, 0, 32)
        assert np.abs(s).max() < 1e-4
        # Lexicographic (first-event count, count): same pairwise order as the scores.
        before = (first[:, None] > first) | ((first[:, None] == first) & (counts[:, None] > counts))
        np.testing.assert_array_equal(s[:, None] > s, before)


def test_ease_uses_popularity_before_the_first_fit_and_outside_b() -> None:
    events = _mixed_stream(300)
    ease, pop = EASE(refit_every=1000), Popularity()
    for x in events:
        ease.learn_one(x)
        pop.learn_one(x)
    assert ease.lambdas_chosen == []
    np.testing.assert_allclose(ease.score(0, 0, 0, 32), 1e-6 * np.log1p(pop.score(0, 0, 0, 32)))
    capped = EASE(refit_every=300, max_items=5)
    _replay(capped, events)
    assert capped._fit_items.size == 5
    counts = np.bincount([i for h in _histories(events).values() for i in h], minlength=30)
    assert set(capped._fit_items.tolist()) == set(np.argsort(-counts, kind="stable")[:5].tolist())
    s = capped.score(0, 0, 0, 30)
    outside = np.setdiff1d(np.arange(30), capped._fit_items)
    np.testing.assert_allclose(s[outside], 1e-6 * np.log1p(pop.score(0, 0, 0, 30)[outside]))


def test_ease_refits_every_refit_every_events_on_the_past_only() -> None:
    events = _mixed_stream(400)
    ease = EASE(lambdas=(1.0, 10.0), refit_every=100)
    for t, x in enumerate(events[:250]):
        ease.learn_one(x)
        assert len(ease.lambdas_chosen) == (t + 1) // 100  # dislikes count as events too
    # An identical model that stops at the refit: the later events never reach B.
    at_fit = EASE(lambdas=(1.0, 10.0), refit_every=100)
    _replay(at_fit, events[:200])
    np.testing.assert_array_equal(ease._weights, at_fit._weights)
    # A user untouched since the fit keeps their scores, up to the popularity tie-breaker.
    quiet = next(u for u in range(20) if all(x.user != u for x in events[200:250]))
    np.testing.assert_allclose(
        ease.score(quiet, 0, 0, 30), at_fit.score(quiet, 0, 0, 30), atol=1e-5
    )
    # The user's own row moves at once: a new item adds its row of B.
    user = events[0].user
    item = next(
        i for i in at_fit._fit_items.tolist() if i not in _histories(events[:200]).get(user, [])
    )
    before = at_fit.score(user, 0, 0, 30)
    at_fit.learn_one(Interaction(user=user, item=item, ts=0))
    row = np.zeros(30)
    row[at_fit._fit_items] = at_fit._weights[int(np.searchsorted(at_fit._fit_items, item))]
    np.testing.assert_allclose(at_fit.score(user, 0, 0, 30) - before, row, atol=1e-5)


def test_ease_is_deterministic() -> None:
    events = _mixed_stream(400, seed=5)
    a, b = EASE(refit_every=150, seed=1), EASE(refit_every=150, seed=1)
    _replay(a, events)
    _replay(b, events)
    assert a.lambdas_chosen == b.lambdas_chosen and len(a.lambdas_chosen) == 2
    np.testing.assert_array_equal(a._weights, b._weights)
    for user in (0, 7, 99):
        np.testing.assert_array_equal(a.score(user, 0, 0, 30), b.score(user, 0, 0, 30))


def test_ease_chooses_lambda_again_only_when_the_past_has_doubled() -> None:
    grid = (0.3, 1.0, 3.0, 10.0, 30.0)
    events = _mixed_stream(700, seed=1)
    ease = EASE(lambdas=grid, refit_every=100)
    _replay(ease, events)
    at = {n: _reference_lambda(events[:n], grid) for n in (100, 200, 400)}
    # Chosen at 100, 200 and 400 events; the refits between keep the last choice.
    assert ease.lambdas_chosen == [at[100], at[200], at[200], at[400], at[400], at[400], at[400]]
