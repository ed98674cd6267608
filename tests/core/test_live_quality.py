"""LiveQuality: exact rolling HR/NDCG, and one drift episode per change."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from metarec.core.live_quality import ALL, MAX_EPISODE_WINDOWS, LiveQuality, RollingMean


def feed(
    q: LiveQuality, domain: str, hits: list[int] | np.ndarray, start_ts: int = 0, users: int = 50
) -> list[int]:
    """Record each hit as rank 0 and each miss as absent, from ``users`` users in turn;
    the timestamps of reported drops."""
    changes = []
    for k, hit in enumerate(hits):
        change = q.update(domain, 0 if hit else -1, start_ts + k, f"u{k % users}")
        if change is not None:
            changes.append(change)
    return changes


def test_rolling_hr_and_ndcg_per_domain_and_overall() -> None:
    q = LiveQuality(k=3, window=3)
    for domain, rank in [("a", 0), ("b", 2), ("a", 5), ("a", 1)]:
        q.update(domain, rank)
    got = q.get()
    # "a" keeps its last three: ranks 0, 5 (a miss at k=3) and 1.
    assert got["a"]["hr"] == pytest.approx(2 / 3)
    assert got["a"]["ndcg"] == pytest.approx((1.0 + 1 / math.log2(3)) / 3)
    assert got["b"]["hr"] == 1.0 and got["b"]["events"] == 1
    # Overall: the last three of all four (b@2, a@5, a@1).
    assert got[ALL]["hr"] == pytest.approx(2 / 3) and got[ALL]["events"] == 4


def test_a_drop_is_reported_once_and_the_episode_ends_on_recovery() -> None:
    rng = np.random.default_rng(0)
    q = LiveQuality(k=10, window=200)
    good = (rng.random(3000) < 0.5).astype(int)
    bad = (rng.random(3000) < 0.05).astype(int)
    assert feed(q, "books", good) == []
    assert "books" not in q.drifting_domains()
    # ADWIN keeps cutting its window while the rate is low; only the first cut is a change.
    changes = feed(q, "books", bad, start_ts=10_000)
    # Dated at ADWIN's flag, reported once the next half window confirms it.
    assert len(changes) == 1 and 10_000 < changes[0] < 10_500, changes
    assert "books" in q.drifting_domains() and q.get()["books"]["drifts"] >= 1
    assert q.baseline("books") == pytest.approx(0.5, abs=0.05)  # the level before the drop
    assert "music" not in q.drifting_domains()
    assert q.drifting_domains() == ["books"]
    feed(q, "books", good[:400], start_ts=20_000)  # back to the level before
    assert "books" not in q.drifting_domains()
    # A later drop is a new change, reported again.
    assert len(feed(q, "books", bad, start_ts=30_000)) == 1


def test_an_episode_that_never_recovers_ends_after_its_cap() -> None:
    q = LiveQuality(k=10, window=50)
    feed(q, "g", [1, 0] * 500)
    assert len(feed(q, "g", [0] * 400, start_ts=5_000)) == 1
    feed(q, "g", [0] * (MAX_EPISODE_WINDOWS * 50), start_ts=6_000)
    assert "g" not in q.drifting_domains()


def test_a_dip_or_one_users_burst_is_not_a_change() -> None:
    rng = np.random.default_rng(2)
    q = LiveQuality(k=10, window=200)
    feed(q, "g", (rng.random(3000) < 0.4).astype(int))
    # A 30% dip is significant for ADWIN, but the lists did not lose half their hits.
    assert feed(q, "g", (rng.random(600) < 0.28).astype(int), start_ts=5_000) == []
    feed(q, "g", (rng.random(2000) < 0.4).astype(int), start_ts=6_000)
    # One user missing everything for hundreds of events, among a few others who do not.
    burst = [0] * 400
    assert feed(q, "g", burst, start_ts=9_000, users=1) == []
    assert q.drifting_domains() == []


def test_a_rise_is_not_a_change() -> None:
    rng = np.random.default_rng(1)
    q = LiveQuality(k=10, window=100)
    low = (rng.random(2000) < 0.05).astype(int)
    high = (rng.random(2000) < 0.6).astype(int)
    assert feed(q, "g", np.r_[low, high]) == []
    assert q.get()["g"]["drifts"] >= 1 and "g" not in q.drifting_domains()


def test_the_rolling_mean_matches_rivers_rolling_mean() -> None:
    from river import stats, utils

    rng = random.Random(3)
    ours, rivers = RollingMean(window=50), utils.Rolling(stats.Mean, window_size=50)
    for _ in range(5000):
        x = rng.choice([0.0, 1.0, 1 / math.log2(rng.randint(2, 30))])
        ours.update(x)
        rivers.update(x)
        assert abs(ours.get() - rivers.get()) < 1e-9
