"""The benchmark's workload and report (the measurements themselves are `metarec bench`'s
to print, not a test's to assert)."""

from __future__ import annotations

import json

import numpy as np

from metarec.core.events import decode_event
from metarec.local.bench import BenchConfig, power_law, synthetic_events, to_markdown, user_times


def test_the_workload_is_long_tailed_valid_and_follows_the_mix() -> None:
    rng = np.random.default_rng(0)
    ranks = power_law(50_000, 0.7, 100_000, rng)
    top_share = np.bincount(ranks).max() / ranks.size
    assert 0.005 < top_share < 0.03  # the most active user: about 1% of the events
    cfg = BenchConfig(items=100, mix={"click": 0.5, "dislike": 0.5})
    records = synthetic_events(cfg, 4000, 300, 1_800_000_000_000, rng)
    events = [decode_event(v, event_types={"click": 1, "dislike": -1}) for _, v in records]
    assert all(k == e.user.encode() for (k, _), e in zip(records, events, strict=True))
    assert {e.type for e in events} == {"click", "dislike"}
    assert 0.45 < sum(e.type == "click" for e in events) / len(events) < 0.55
    assert {int(e.item[1:]) for e in events} <= set(range(100))


def test_memory_phase_times_rise_per_user_and_end_now() -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(0, 40, 2000)
    now = 1_800_000_000_000
    ts = user_times(users, now, rng)
    for u in range(40):
        mine = ts[users == u]
        gaps = np.diff(mine)
        assert mine[-1] == now and (gaps >= 1_000).all()  # in event order, a second apart+
        assert (gaps < 120_000).mean() > 0.6 and (gaps >= 3_600_000).any()  # sessions


def test_the_report_shows_every_measure_against_the_smallest_bound() -> None:
    run = {
        "config": {
            "items": 1682,
            "dim": 32,
            "top_k": 20,
            "batch_size": 5000,
            "quick": True,
            "partitions": 4,
        },
        "bounds_per_s": {"kafka_consume_decode": 1e5, "redis_commit": 3e4, "numpy_score_topk": 5e4},
        "bound_name": "redis_commit",
        "smallest_bound_per_s": 3e4,
        "events_per_s": 7500.0,
        "ratio_to_smallest_bound": 0.25,
        "freshness_1_consumers": {"offered_per_s": 5000, "p50_ms": 9, "p99_ms": 20, "max_ms": 30},
        "freshness_2_consumers": {"offered_per_s": 5000, "p50_ms": 8, "p99_ms": 15, "max_ms": 25},
        "memory": [
            {
                "users": 2000,
                "events_per_user": 50,
                "peak_rss_mib": 200.0,
                "redis_bytes_per_user": 1904.0,
            }
        ],
        "big_catalog_events_per_s": 2500.0,
        "big_catalog_quality": {
            "users": 1500,
            "events": 18000,
            "hr10_candidates": 0.099,
            "hr10_exact": 0.1,
        },
        "big_catalog_hr_ratio": 0.99,
        "reload_s": 0.065,
        "training": [{"events": 100_000, "seconds": 10.1, "steps": 25, "device": "CPU:0"}],
    }
    text = to_markdown(run)
    assert "0.25 of the smallest bound (redis_commit)" in text
    assert "7,500 ev/s" in text and "1,904 B/user" in text and "median 65 ms, max 65 ms" in text
    assert "2,500 ev/s" in text and "candidates 0.0990, exact 0.1000" in text
    assert "ratio 0.990" in text
    assert json.loads(json.dumps(run)) == run  # what --json writes round-trips
