"""Trending counts on the event clock: exact decay, rebasing, the shared form."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.core.trending import MAX_EXPONENT, Channel, Trending


def channels(*half_lives: float) -> list[Channel]:
    return [Channel(f"c{h:g}", h) for h in half_lives]


def brute_force(batches: list[list[int]], half_lives: tuple[float, ...], n: int) -> np.ndarray:
    """Every event's weight decayed from its batch's tick to the final clock, summed."""
    clock = sum(len(b) for b in batches)
    out = np.zeros((len(half_lives), n))
    tick = 0
    for batch in batches:
        tick += len(batch)
        for item in batch:
            for s, h in enumerate(half_lives):
                out[s, item] += 2.0 ** (-(clock - tick) / h)
    return out


def test_counts_decay_per_scale_with_one_tick_per_batch() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 6, int(rng.integers(1, 5))).tolist() for _ in range(40)]
    t = Trending(channels(2.0, 50.0))
    for batch in batches:
        t.learn_many(batch)
    assert t.clock == sum(len(b) for b in batches)
    np.testing.assert_allclose(t.counts(6), brute_force(batches, (2.0, 50.0), 6), rtol=1e-12)
    np.testing.assert_allclose(t.features(6), np.log1p(t.counts(6)), rtol=1e-6)


def test_a_long_stream_rebases_without_changing_any_count() -> None:
    t = Trending(channels(1.0, 1e6))
    for k in range(int(3 * MAX_EXPONENT)):  # three rebases of the short scale
        t.learn_many([k % 3])
    assert t.to_arrays()["ref"][0] > 0
    counts = t.counts(3)
    assert np.isfinite(counts).all()
    assert counts[0].max() == pytest.approx(1 / (1 - 2.0**-3), rel=1e-9)  # 1 + 1/8 + ...
    assert counts[1].sum() == pytest.approx(3 * MAX_EXPONENT, rel=1e-3)


def test_non_positive_weights_move_the_clock_but_count_nothing() -> None:
    t = Trending(channels(10.0))
    t.learn_many([0, 1, 2], [1.0, 0.0, -1.0])
    assert t.clock == 3
    assert t.counts(3)[0].tolist() == [1.0, 0.0, 0.0]


def test_the_shared_form_round_trips() -> None:
    t = Trending(channels(3.0, 30.0))
    t.learn_many([4, 4, 1])
    back = Trending.from_arrays(t.to_arrays(), t.channels)
    assert back.clock == t.clock and back.channels == t.channels
    np.testing.assert_array_equal(back.counts(5), t.counts(5))


def test_the_newcomers_channel_counts_only_users_first_events() -> None:
    t = Trending([Channel("all", 1e9), Channel("new", 1e9, first_only=True)])
    t.learn_many([0, 1, 1, 2], first=[True, True, False, False])
    counts = t.counts(3).round(6)
    assert counts[0].tolist() == [1.0, 2.0, 1.0] and counts[1].tolist() == [1.0, 1.0, 0.0]
    assert t.increments([5, 5], first=[True, True])[1] == {5: 2.0}


def test_bad_half_lives_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Trending(channels(10.0, 0.0))
