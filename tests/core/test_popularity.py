"""RecencyPopularity against a brute-force reference, over short and very long time spans."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from metarec.core.popularity import ALL_DOMAINS, MAX_EXPONENT, RecencyPopularity
from metarec.errors import ModelError

HOUR = 3_600_000


Ints = npt.NDArray[np.int64]


def _random_events(
    n: int, seed: int, *, mean_gap: float = HOUR / 4
) -> tuple[Ints, Ints, Ints, npt.NDArray[np.float64]]:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 40, size=n)
    domains = rng.integers(0, 3, size=n)
    ts = np.cumsum(rng.exponential(mean_gap, size=n)).astype(np.int64) + 1_700_000_000_000
    weights = rng.choice([1.0, 2.0, 0.5], size=n)
    return items, domains, ts, weights


def _reference(
    items: npt.NDArray[np.int64],
    domains: npt.NDArray[np.int64],
    ts: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float64],
    *,
    domain: int,
    at: int,
    half_life: float,
    n_items: int,
) -> npt.NDArray[np.float64]:
    """Decay every event from scratch: Σ w · 2^(-(at - ts)/h)."""
    keep = (domains == domain) if domain != ALL_DOMAINS else np.ones(items.size, dtype=bool)
    out = np.zeros(n_items)
    np.add.at(out, items[keep], weights[keep] * 2.0 ** (-(at - ts[keep]) / half_life))
    return out


def test_matches_brute_force_per_domain_and_overall() -> None:
    items, domains, ts, weights = _random_events(500, seed=1)
    pop = RecencyPopularity(half_life_ms=2 * HOUR)
    for t in range(items.size):
        pop.learn_one(int(items[t]), int(domains[t]), int(ts[t]), float(weights[t]))
        if t % 97 == 0 or t == items.size - 1:
            for domain in (ALL_DOMAINS, 0, 1, 2):
                for at in (int(ts[t]), int(ts[t]) + 3 * HOUR):
                    want = _reference(
                        items[: t + 1],
                        domains[: t + 1],
                        ts[: t + 1],
                        weights[: t + 1],
                        domain=domain,
                        at=at,
                        half_life=2 * HOUR,
                        n_items=50,
                    )
                    got = pop.scores(domain, at, 50)
                    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-300)


def test_rescaling_is_stable_over_very_long_spans() -> None:
    # One event per half-life on one item for 20,000 half-lives: the steady state of
    # Σ_k 2^-k is 2, and rescaling must happen many times without overflow or drift.
    half_life = 1000
    pop = RecencyPopularity(half_life_ms=half_life)
    n = 20_000
    assert n > 100 * MAX_EXPONENT
    for k in range(n):
        pop.learn_one(0, 0, k * half_life)
    value = pop.scores(0, (n - 1) * half_life, 1)[0]
    assert value == pytest.approx(2.0, rel=1e-9)
    stored = pop.to_arrays()["counts"]
    assert np.all(np.isfinite(stored))
    assert float(np.max(stored)) <= 2.0 ** (MAX_EXPONENT + 2)


def test_long_gaps_keep_recent_events_exact() -> None:
    items, domains, ts, weights = _random_events(300, seed=2, mean_gap=HOUR * 50)
    pop = RecencyPopularity(half_life_ms=HOUR)  # thousands of half-lives in total
    for t in range(items.size):
        pop.learn_one(int(items[t]), int(domains[t]), int(ts[t]), float(weights[t]))
    at = int(ts[-1])
    want = _reference(
        items, domains, ts, weights, domain=ALL_DOMAINS, at=at, half_life=HOUR, n_items=40
    )
    np.testing.assert_allclose(pop.scores(ALL_DOMAINS, at, 40), want, rtol=1e-9, atol=1e-250)


@pytest.mark.parametrize("mean_gap", [HOUR / 10, HOUR * 20])
def test_learn_many_equals_repeated_learn_one(mean_gap: float) -> None:
    items, domains, ts, weights = _random_events(400, seed=3, mean_gap=mean_gap)
    one = RecencyPopularity(half_life_ms=HOUR)
    for t in range(items.size):
        one.learn_one(int(items[t]), int(domains[t]), int(ts[t]), float(weights[t]))
    many = RecencyPopularity(half_life_ms=HOUR)
    for start in range(0, items.size, 64):  # consumer-sized batches
        sl = slice(start, start + 64)
        many.learn_many(items[sl], domains[sl], ts[sl], weights[sl])
    at = int(ts[-1])
    for domain in (ALL_DOMAINS, 0, 1, 2):
        np.testing.assert_allclose(
            many.scores(domain, at, 40), one.scores(domain, at, 40), rtol=1e-9, atol=1e-250
        )


def test_learn_many_default_weight_and_empty_batch() -> None:
    pop = RecencyPopularity(half_life_ms=1000)
    pop.learn_many([], [], [])
    assert pop.scores(ALL_DOMAINS, 0, 2).tolist() == [0.0, 0.0]
    pop.learn_many([1, 1], [0, 0], [0, 0])
    assert pop.scores(0, 0, 2).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="differ in length"):
        pop.learn_many([1, 2], [0], [0, 0])


def test_domains_are_separate_and_all_is_their_sum() -> None:
    pop = RecencyPopularity(half_life_ms=1000)
    pop.learn_one(0, 0, 0)
    pop.learn_one(1, 1, 0, weight=3.0)
    pop.learn_one(1, 0, 0)
    assert pop.scores(0, 0, 3).tolist() == [1.0, 1.0, 0.0]
    assert pop.scores(1, 0, 3).tolist() == [0.0, 3.0, 0.0]
    assert pop.scores(ALL_DOMAINS, 0, 3).tolist() == [1.0, 4.0, 0.0]
    assert pop.scores(7, 0, 3).tolist() == [0.0, 0.0, 0.0]  # a domain never seen
    with pytest.raises(ValueError, match="domain"):
        pop.scores(-5, 0, 3)


def test_capacity_grows_and_reads_pad_with_zeros() -> None:
    pop = RecencyPopularity(half_life_ms=1000, n_items=2)
    pop.learn_one(5000, 3, 10)
    s = pop.scores(3, 10, 6000)
    assert s.shape == (6000,)
    assert s[5000] == 1.0 and s.sum() == 1.0
    assert pop.scores(3, 10, 10).shape == (10,)


def test_scores_is_a_fresh_array() -> None:
    pop = RecencyPopularity(half_life_ms=1000)
    pop.learn_one(0, 0, 0)
    s = pop.scores(0, 0, 1)
    s[0] = 99.0
    assert pop.scores(0, 0, 1)[0] == 1.0


def test_state_round_trip() -> None:
    items, domains, ts, weights = _random_events(200, seed=4)
    pop = RecencyPopularity(half_life_ms=HOUR)
    pop.learn_many(items, domains, ts, weights)
    arrays = pop.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = RecencyPopularity.from_arrays(arrays)
    at = int(ts[-1]) + HOUR
    for domain in (ALL_DOMAINS, 0, 2):
        np.testing.assert_allclose(back.scores(domain, at, 40), pop.scores(domain, at, 40))
    pop.learn_one(3, 1, at)
    back.learn_one(3, 1, at)
    np.testing.assert_allclose(back.scores(1, at, 40), pop.scores(1, at, 40))
    empty = RecencyPopularity.from_arrays(RecencyPopularity(1000).to_arrays())
    assert empty.scores(ALL_DOMAINS, 0, 3).tolist() == [0.0, 0.0, 0.0]


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="half_life_ms"):
        RecencyPopularity(half_life_ms=0)
    with pytest.raises(ModelError, match="counts"):
        RecencyPopularity.from_arrays({"t_ref": np.array(0)})
    with pytest.raises(ValueError, match="item"):
        RecencyPopularity(1000).learn_one(-1, 0, 0)
