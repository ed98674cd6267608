"""ConsumerStats: rates and exact percentiles per window, reset, bounded memory, one-liner."""

from __future__ import annotations

import json

import numpy as np
import pytest

from consumer.stats import ConsumerStats, _Reservoir, format_line


def test_rates_counts_and_exact_percentiles_over_a_window() -> None:
    rng = np.random.default_rng(1)
    stats = ConsumerStats(interval_s=10.0, now=100.0)
    latencies = rng.uniform(0.001, 0.2, size=37)
    fresh_parts = [rng.exponential(50.0, size=n) for n in rng.integers(0, 300, size=37)]
    for lat, fresh in zip(latencies, fresh_parts, strict=True):
        stats.record_batch(fresh.size + 3, fresh.size, 1, float(lat), fresh)
    stats.set_lag(1234)
    stats.set_model_version(7)
    stats.set_partitions([5, 2])
    s = stats.report(112.5)
    freshness = np.concatenate(fresh_parts)
    assert s["window_s"] == 12.5
    assert s["events"] == freshness.size
    assert s["records"] == freshness.size + 3 * 37
    assert s["batches"] == 37 and s["dlq"] == 37
    assert s["events_per_s"] == pytest.approx(freshness.size / 12.5)
    assert s["batch_latency_ms_p50"] == pytest.approx(np.percentile(latencies * 1000, 50))
    assert s["batch_latency_ms_p99"] == pytest.approx(np.percentile(latencies * 1000, 99))
    assert s["freshness_ms_p50"] == pytest.approx(np.percentile(freshness, 50))
    assert s["freshness_ms_p99"] == pytest.approx(np.percentile(freshness, 99))
    assert (s["lag"], s["model_version"], s["partitions"]) == (1234, 7, [2, 5])
    assert (s["total_events"], s["total_dlq"]) == (freshness.size, 37)
    json.dumps(s)  # the consumer logs it as extra fields: plain Python types only


def test_report_resets_the_window_but_not_totals_or_gauges() -> None:
    stats = ConsumerStats(interval_s=5.0, now=0.0)
    stats.set_lag(10)
    stats.set_model_version(2)
    stats.record_batch(10, 8, 2, 0.5, np.full(8, 100.0))
    stats.report(5.0)
    stats.record_batch(4, 4, 0, 0.1, np.array([1.0, 2.0, 3.0, 4.0]))
    s = stats.report(7.0)
    assert (s["records"], s["events"], s["batches"], s["dlq"]) == (4, 4, 1, 0)
    assert s["window_s"] == 2.0 and s["events_per_s"] == 2.0
    assert s["batch_latency_ms_p50"] == pytest.approx(100.0)
    assert s["freshness_ms_p50"] == pytest.approx(2.5)
    assert (s["total_events"], s["total_dlq"], s["lag"], s["model_version"]) == (12, 2, 10, 2)
    empty = stats.report(8.0)
    assert (empty["events"], empty["batches"], empty["events_per_s"]) == (0, 0, 0.0)
    assert empty["batch_latency_ms_p99"] is None and empty["freshness_ms_p50"] is None


def test_due_follows_the_injected_clock() -> None:
    stats = ConsumerStats(interval_s=10.0, now=50.0)
    assert not stats.due(59.9)
    assert stats.due(60.0)
    stats.report(61.0)
    assert not stats.due(70.9) and stats.due(71.0)
    off = ConsumerStats(interval_s=0, now=0.0)
    assert not off.due(1e9)


def test_non_finite_freshness_is_ignored() -> None:
    stats = ConsumerStats(interval_s=1.0, now=0.0)
    stats.record_batch(3, 3, 0, 0.01, np.array([10.0, np.nan, np.inf]))
    s = stats.report(1.0)
    assert s["freshness_ms_p50"] == 10.0 and s["events"] == 3


def test_negative_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="counts"):
        ConsumerStats(1.0, 0.0).record_batch(-1, 0, 0, 0.1, [])


def test_samples_are_bounded_by_a_uniform_reservoir() -> None:
    stats = ConsumerStats(interval_s=1.0, now=0.0, max_samples=1000, seed=3)
    values = np.arange(50_000, dtype=np.float64)  # uniform 0..49999: p50 ≈ 25,000
    for chunk in np.array_split(values, 37):
        stats.record_batch(chunk.size, chunk.size, 0, 0.01, chunk)
    buffers = [stats._freshness_ms, stats._latency_ms]
    assert all(b._buf.size <= 1000 for b in buffers)
    s = stats.report(1.0)
    assert s["events"] == 50_000
    # A uniform sample of 1000: the median's standard error is ~1.6% of the range.
    assert abs(s["freshness_ms_p50"] - 25_000) < 2_500
    assert s["freshness_ms_p99"] > 45_000


def test_reservoir_is_exact_up_to_capacity_and_uniform_beyond() -> None:
    res = _Reservoir(100, np.random.default_rng(0))
    res.add(np.arange(60.0))
    res.add(np.arange(60.0, 100.0))
    assert np.array_equal(res.values(), np.arange(100.0))
    # Every item of a long stream is kept with probability capacity / n.
    hits = np.zeros(1000)
    for seed in range(400):
        r = _Reservoir(100, np.random.default_rng(seed))
        for chunk in np.array_split(np.arange(1000.0), 7):
            r.add(chunk)
        kept = r.values().astype(int)
        assert np.unique(kept).size == 100
        hits[kept] += 1
    first, last = hits[:500].mean() / 400, hits[500:].mean() / 400
    assert first == pytest.approx(0.1, abs=0.01) and last == pytest.approx(0.1, abs=0.01)


def test_reservoir_is_reproducible_from_the_seed() -> None:
    def run(seed: int) -> list[float]:
        stats = ConsumerStats(interval_s=1.0, now=0.0, max_samples=10, seed=seed)
        stats.record_batch(1000, 1000, 0, 0.01, np.arange(1000.0))
        return [stats.report(1.0)["freshness_ms_p50"]]

    assert run(5) == run(5)


def test_format_line() -> None:
    stats = ConsumerStats(interval_s=1.0, now=0.0)
    stats.set_lag(0)
    stats.set_model_version(3)
    stats.set_partitions([0, 1])
    stats.record_batch(12_345, 12_345, 0, 0.012, np.full(10, 45.0))
    stats.record_batch(0, 0, 0, 0.040, [])
    line = format_line(stats.report(1.0))
    assert line.startswith("12,345 ev/s | lag 0 | batch p50 26 ms p99 40 ms")
    assert line.endswith("| fresh p50 45 ms p99 45 ms | dlq 0 | model v3 | partitions [0,1]")
