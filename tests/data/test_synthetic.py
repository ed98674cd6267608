"""The synthetic stream: reproducible, well-formed, and carrying the facts it claims."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from metarec.core.events import Event
from metarec.data.dataset import Dataset
from metarec.data.synthetic import SyntheticConfig, SyntheticTruth, generate, generate_with_truth
from metarec.errors import ConfigError

SMALL = SyntheticConfig.small()


@pytest.fixture(scope="module")
def small() -> tuple[Dataset, SyntheticTruth]:
    return generate_with_truth(SMALL, seed=0)


def _moves(ds: Dataset) -> list[dict[str, Any]]:
    moves = ds.scenario["moves"]
    assert isinstance(moves, list)
    return moves


def test_same_seed_same_stream_other_seed_differs() -> None:
    a, b = generate(SMALL, seed=5), generate(SMALL, seed=5)
    assert a.events == b.events
    assert a.items == b.items
    assert a.users == b.users
    assert a.scenario == b.scenario
    assert generate(SMALL, seed=6).events != a.events


def test_size_of_presets(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, _ = small
    assert ds.name == "synthetic-small"
    assert 3000 <= len(ds.events) <= 5000
    full = generate(SyntheticConfig(), seed=0)
    assert 20_000 <= len(full.events) <= 50_000


def test_events_well_formed(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, _ = small
    ts = [e.ts for e in ds.events]
    assert ts == sorted(ts)
    assert ds.scenario["start_ts"] <= ts[0] and ts[-1] <= ds.scenario["end_ts"]  # type: ignore[operator]
    assert {e.domain for e in ds.events} == set(SMALL.domains)
    assert len({e.event_id for e in ds.events}) == len(ds.events)
    per_user: dict[str, list[str]] = defaultdict(list)
    for e in ds.events:
        per_user[e.user].append(e.item)
    assert all(len(items) == len(set(items)) for items in per_user.values()), "re-consumption"
    types = Counter(e.type for e in ds.events)
    assert types["like"] > 0 and types["click"] > 0
    assert set(types) <= {"click", "like", "dislike"}


def test_event_types_follow_affinity(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, truth = small
    vectors = dict(zip(truth.item_ids, truth.item_vectors, strict=True))
    change_ts = ds.scenario["change_ts"]
    changed = set(ds.scenario["changed_users"])  # type: ignore[call-overload]
    by_type: dict[str, list[float]] = defaultdict(list)
    for e in ds.events:
        if e.user not in changed or e.ts < change_ts:  # type: ignore[operator]
            by_type[e.type].append(float(truth.taste(e.user, e.domain) @ vectors[e.item]))
    assert np.mean(by_type["like"]) > np.mean(by_type["click"]) > np.mean(by_type["dislike"])
    assert 0.0 < len(by_type["dislike"]) / len(ds.events) < 0.1
    quiet = generate(dataclasses.replace(SMALL, dislike_rate=0.0), seed=0)
    assert all(e.type != "dislike" for e in quiet.events)


def test_item_and_user_features(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, _ = small
    items = {r.item: r for r in ds.items}
    for e in ds.events[:200]:
        rec = items[e.item]
        assert rec.domain == e.domain
        assert f"domain:{e.domain}" in rec.features
        assert sum(f.startswith("topic:") for f in rec.features) == 2
        assert sum(f.startswith("price:") for f in rec.features) == 1
    with_profile = [u for u in ds.users if u.features]
    assert 0.6 < len(with_profile) / len(ds.users) < 0.95  # profile_rate 0.8
    prefixes = {f.split(":")[0] for u in with_profile for f in u.features}
    assert prefixes == {"interest", "age", "signup", "region"}


def test_items_and_users_arrive_over_time(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, _ = small
    start = ds.scenario["start_ts"]
    item_ts = {r.item: r.ts for r in ds.items}
    user_ts = {r.user: r.ts for r in ds.users}
    late_items = {i for i, t in item_ts.items() if t > start}  # type: ignore[operator]
    assert 0.3 < len(late_items) / len(item_ts) < 0.7  # initial_item_fraction 0.5
    assert all(item_ts[e.item] <= e.ts and user_ts[e.user] <= e.ts for e in ds.events)
    # New items keep being consumed throughout, including in the last quarter of the stream.
    last_quarter = ds.events[3 * len(ds.events) // 4 :]
    assert any(
        e.item in late_items and item_ts[e.item] > ds.events[len(ds.events) // 2].ts
        for e in last_quarter
    )
    # Users arrive over time too: some first act in the second half.
    first: dict[str, int] = {}
    for e in ds.events:
        first.setdefault(e.user, e.ts)
    assert sum(t > ds.events[len(ds.events) // 2].ts for t in first.values()) > 10


def test_activity_is_skewed_and_sessioned(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, _ = small
    per_user: dict[str, list[int]] = defaultdict(list)
    for e in ds.events:
        per_user[e.user].append(e.ts)
    counts = np.array([len(v) for v in per_user.values()])
    assert (counts <= 5).mean() > 0.25
    assert counts.max() >= 5 * np.median(counts)
    gaps = np.concatenate([np.diff(v) for v in per_user.values() if len(v) > 1])
    assert np.median(gaps) < 3_600_000  # most next events come within the hour: sessions


def test_popularity_is_skewed(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, _ = small
    counts = np.array(sorted(Counter(e.item for e in ds.events).values(), reverse=True))
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.25  # the top 10% of items take far more than 10% of events


def test_abrupt_change_is_recorded_and_real(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, truth = small
    change_ts = ds.scenario["change_ts"]
    changed = ds.scenario["changed_users"]
    assert isinstance(change_ts, int) and isinstance(changed, list) and changed
    per_user: dict[str, list[int]] = defaultdict(list)
    for e in ds.events:
        per_user[e.user].append(e.ts)
    assert all(min(per_user[u]) < change_ts <= max(per_user[u]) for u in changed)

    # After the change, changed users' picks no longer follow their original taste.
    vectors = dict(zip(truth.item_ids, truth.item_vectors, strict=True))

    def mean_affinity(users: set[str], after: bool) -> float:
        return float(
            np.mean(
                [
                    truth.taste(e.user, e.domain) @ vectors[e.item]
                    for e in ds.events
                    if e.user in users and (e.ts >= change_ts) == after
                ]
            )
        )

    spanning = {u for u, t in per_user.items() if min(t) < change_ts <= max(t)}
    kept = spanning - set(changed)
    assert mean_affinity(set(changed), after=False) > 1.0
    assert mean_affinity(set(changed), after=True) < 0.5 * mean_affinity(kept, after=True)
    no_change = generate(dataclasses.replace(SMALL, change_at=None), seed=0)
    assert no_change.scenario["change_ts"] is None
    assert no_change.scenario["changed_users"] == []


def test_a_catalogue_change_moves_everyones_picks_at_once() -> None:
    config = dataclasses.replace(SMALL, change_kind="catalog", cross_domain_fraction=0.0)
    ds, truth = generate_with_truth(config, seed=0)
    change_ts = ds.scenario["change_ts"]
    assert isinstance(change_ts, int)
    arrival = {i.item: i.ts for i in ds.items}
    vectors = dict(zip(truth.item_ids, truth.item_vectors, strict=True))
    pop = dict(zip(truth.item_ids, truth.item_log_popularity, strict=True))

    def affinity(after: bool) -> float:
        # Items that existed before the change: those are the ones it reshuffles.
        return float(
            np.mean(
                [
                    truth.taste(e.user, e.domain) @ vectors[e.item]
                    for e in ds.events
                    if (e.ts >= change_ts) == after and arrival[e.item] < change_ts
                ]
            )
        )

    # Picks follow the original item vectors (and popularity) before, not after.
    assert affinity(after=False) > 1.0 and abs(affinity(after=True)) < 0.3
    top_before = Counter(e.item for e in ds.events if e.ts < change_ts).most_common(20)
    assert np.mean([pop[i] for i, _ in top_before]) > np.mean(list(pop.values())) + 1.0
    # Every user active after the change is reached, not a share of them.
    assert len(ds.scenario["changed_users"]) == len(  # type: ignore[arg-type]
        {e.user for e in ds.events if e.ts < change_ts}
        & {e.user for e in ds.events if e.ts >= change_ts}
    )
    # Same seed, same change.
    assert generate(config, seed=0).events == ds.events


def test_cross_domain_moves_match_events(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, truth = small
    moves = _moves(ds)
    assert len(moves) > 20
    by_user: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for e in ds.events:
        by_user[e.user].append((e.ts, e.domain))
    moved = {m["user"] for m in moves}
    for m in moves:
        assert m["from"] != m["to"]
        assert {d for t, d in by_user[m["user"]] if t < m["ts"]} == {m["from"]}
        assert {d for t, d in by_user[m["user"]] if t >= m["ts"]} == {m["to"]}
    assert all(len({d for _, d in v}) == 1 for u, v in by_user.items() if u not in moved)
    # In the new domain their picks follow the linearly mapped taste M_to z_u.
    vectors = dict(zip(truth.item_ids, truth.item_vectors, strict=True))
    affinity = [
        truth.taste(e.user, e.domain) @ vectors[e.item]
        for e in ds.events
        if e.user in moved and e.ts >= _move_ts(moves, e.user)
    ]
    assert np.mean(affinity) > 1.0  # random items average 0
    single = generate(dataclasses.replace(SMALL, domains=("only",)), seed=0)
    assert _moves(single) == []


def _move_ts(moves: list[dict[str, Any]], user: str) -> int:
    return next(int(m["ts"]) for m in moves if m["user"] == user)


def test_profiles_carry_signal(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, _ = small
    topics = {r.item: {f for f in r.features if f.startswith("topic:")} for r in ds.items}
    interests = {
        u.user: {"topic:" + f.split(":")[1] for f in u.features if f.startswith("interest:")}
        for u in ds.users
    }
    users = [e.user for e in ds.events]
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(users)
    hit = np.mean(
        [bool(topics[e.item] & interests[e.user]) for e in ds.events if interests[e.user]]
    )
    base = np.mean(
        [
            bool(topics[e.item] & interests[str(u)])
            for e, u in zip(ds.events, shuffled, strict=True)
            if interests[str(u)]
        ]
    )
    assert hit > 1.5 * base


def _domain_popularity_and(
    ds: Dataset, model: Callable[[Event, np.ndarray], np.ndarray], items: list[str]
) -> tuple[float, float]:
    """Prequential HR@10 of ``model`` and of per-domain popularity, on the same events.

    Before each event of a returning user, both rank the items of the event's domain seen
    so far, minus the user's own, as the evaluation harness does.
    """
    index = {i: k for k, i in enumerate(items)}
    domain_of = {r.item: r.domain for r in ds.items}
    item_domain = np.array([domain_of[i] for i in items])
    counts = np.zeros(len(items))
    history: dict[str, list[int]] = defaultdict(list)
    hits = Counter[str]()
    scored = 0
    for e in ds.events:
        j = index[e.item]
        past = history[e.user]
        if past and counts[j] > 0:
            allowed = (counts > 0) & (item_domain == e.domain)
            allowed[past] = False
            for name, s in (("model", model(e, counts)), ("pop", counts)):
                s = np.where(allowed, s, -np.inf)
                hits[name] += int((s > s[j]).sum() < 10)
            scored += 1
        counts[j] += 1
        past.append(j)
    return hits["model"] / scored, hits["pop"] / scored


def test_oracle_taste_beats_popularity(small: tuple[Dataset, SyntheticTruth]) -> None:
    ds, truth = small
    items = sorted({e.item for e in ds.events})
    pos = {i: k for k, i in enumerate(truth.item_ids)}
    vectors = truth.item_vectors[[pos[i] for i in items]]

    def oracle(e: Event, counts: np.ndarray) -> np.ndarray:
        taste: np.ndarray = vectors @ truth.taste(e.user, e.domain) / SMALL.temperature
        out: np.ndarray = taste + np.log1p(counts)
        return out

    model, pop = _domain_popularity_and(ds, oracle, items)
    assert model > 1.5 * pop, (model, pop)


def test_signal_is_learnable_from_events_alone(small: tuple[Dataset, SyntheticTruth]) -> None:
    """A small implicit-feedback ALS fit on the first 70% of the stream (events only, no
    truth) clearly beats per-domain popularity on the remaining 30%."""
    ds, _ = small
    users = sorted({e.user for e in ds.events})
    items = sorted({e.item for e in ds.events})
    u_index = {u: k for k, u in enumerate(users)}
    i_index = {i: k for k, i in enumerate(items)}
    domain_of = {r.item: r.domain for r in ds.items}
    item_domain = np.array([domain_of[i] for i in items])
    cut = ds.events[int(0.7 * len(ds.events))].ts
    train = np.zeros((len(users), len(items)))
    for e in ds.events:
        if e.ts < cut:
            train[u_index[e.user], i_index[e.item]] = 1.0
    dim, ridge, confidence = 16, 1.0, 10.0
    rng = np.random.default_rng(0)
    user_f = 0.1 * rng.normal(size=(len(users), dim))
    item_f = 0.1 * rng.normal(size=(len(items), dim))
    weights = 1.0 + confidence * train
    for _ in range(8):
        for x, y, r, c in ((user_f, item_f, train, weights), (item_f, user_f, train.T, weights.T)):
            for row in range(x.shape[0]):
                yc = y.T * c[row]
                x[row] = np.linalg.solve(yc @ y + ridge * np.eye(dim), yc @ r[row])
    scores = user_f @ item_f.T
    popularity = train.sum(axis=0)
    hits = Counter[str]()
    tested = 0
    for e in ds.events:
        u, j = u_index[e.user], i_index[e.item]
        if e.ts < cut or not train[u].any() or popularity[j] == 0:
            continue
        allowed = (popularity > 0) & (item_domain == e.domain) & (train[u] == 0)
        for name, s in (("als", scores[u]), ("pop", popularity)):
            s = np.where(allowed, s, -np.inf)
            hits[name] += int((s > s[j]).sum() < 10)
        tested += 1
    assert tested > 200
    assert hits["als"] > 1.3 * hits["pop"], (hits, tested)


@pytest.mark.parametrize(
    "changes",
    [
        {"domains": ()},
        {"domains": ("a", "a")},
        {"n_users": 0},
        {"temperature": 0.0},
        {"change_at": 1.5},
        {"change_kind": "everything"},
        {"profile_rate": -0.1},
        {"n_items": 2, "domains": ("a", "b", "c")},
    ],
)
def test_bad_config_raises(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SyntheticConfig(**changes)
