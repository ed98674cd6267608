"""The replay tool: pacing, timestamp rewriting, CLI exit codes, and a real replay."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Message

from metarec.config import Settings
from metarec.core.events import Event, ItemRecord, UserRecord
from metarec.data.dataset import Dataset
from producer import EventProducer
from producer.__main__ import main
from producer.replay import ReplayReport, TokenBucket, replay
from tests.kafka_read import drain

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def values(messages: list[Message]) -> list[dict[str, object]]:
    return [json.loads(m.value() or b"") for m in messages]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ; tests pass every setting as a flag instead."""
    import os

    for var in list(os.environ):
        if var.startswith("METAREC_"):
            monkeypatch.delenv(var)


@pytest.fixture
def topic_flags(make_topic: Callable[..., str], kafka_bootstrap: str) -> dict[str, str]:
    return {
        "--kafka-bootstrap": kafka_bootstrap,
        "--events-topic": make_topic(partitions=4),
        "--items-topic": make_topic(partitions=2),
        "--users-topic": make_topic(partitions=2),
    }


def flags(mapping: dict[str, str]) -> list[str]:
    return [part for pair in mapping.items() for part in pair]


def tiny_dataset(n_events: int, gap_ms: int = 10) -> Dataset:
    t0 = 1_600_000_000_000
    events = [Event(f"u{i % 5}", f"i{i % 7}", "click", t0 + i * gap_ms) for i in range(n_events)]
    items = [ItemRecord(f"i{j}", "default", ("tag:x",), t0) for j in range(7)]
    users = [UserRecord(f"u{j}", ("age:25-34",), t0) for j in range(5)]
    return Dataset("tiny", events, items, users)


# --- pacing and reporting, no broker --------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.now += seconds


def test_token_bucket_keeps_the_long_run_rate_exact() -> None:
    t = FakeTime()
    bucket = TokenBucket(rate=1000.0, burst=50, clock=t.clock, wait=t.wait)
    for _ in range(200):  # 10,000 tokens
        bucket.acquire(50)
    # The first burst is free; the other 9,950 tokens take 9.95 s at 1000/s.
    assert t.now == pytest.approx(9.95)


def test_token_bucket_does_not_save_up_more_than_a_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(rate=100.0, burst=10, clock=t.clock, wait=t.wait)
    t.now = 60.0  # a long stall: only one burst may follow at once
    bucket.acquire(10)
    assert t.now == 60.0
    bucket.acquire(10)
    assert t.now == pytest.approx(60.1)


def test_token_bucket_rejects_a_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate=0.0, burst=1)


def test_report_summary_is_one_line() -> None:
    line = ReplayReport(events=1000, invalid=2, items=10, users=20, seconds=4.0).summary("t")
    assert "\n" not in line
    assert "1000 events (2 invalid skipped) to t" in line
    assert "250 events/s" in line


# --- CLI exit codes, no broker ---------------------------------------------------------


def test_config_error_is_one_line_and_exit_2(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", "--data", "synthetic-small", "--top-k", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--top-k" in err and "METAREC_TOP_K" in err


def test_env_typo_is_a_config_error(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METAREC_EVENTS_TOPC", "x")
    assert main(["send", "--user", "u1", "--item", "i1"]) == 2
    assert "did you mean METAREC_EVENTS_TOPIC?" in capsys.readouterr().err


def test_send_with_an_invalid_event_exits_2_without_sending(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "send",
            "--user",
            "u1",
            "--item",
            "i1",
            "--type",
            "purchase",
            "--kafka-bootstrap",
            "127.0.0.1:1",
        ]
    )
    assert status == 2
    assert "'type'" in capsys.readouterr().err


def test_unknown_dataset_exits_2(
    clean_env: None, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    assert main(["replay", "--data", f"{tmp_path}/missing", "--no-progress"]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_rate_and_speedup_are_exclusive(clean_env: None) -> None:
    with pytest.raises(SystemExit) as info:
        main(["replay", "--data", "synthetic-small", "--rate", "10", "--speedup", "2"])
    assert info.value.code == 2


# --- against the real local broker ----------------------------------------------------


@pytest.mark.integration
def test_cli_replays_metadata_then_events_stamped_now(
    clean_env: None,
    topic_flags: dict[str, str],
    kafka_bootstrap: str,
    make_group_id: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from metarec.data.registry import load_dataset

    limit = 300
    dataset = load_dataset("synthetic-small", seed=3)
    before = int(time.time() * 1000)
    status = main(
        [
            "replay",
            "--data",
            "synthetic-small",
            "--seed",
            "3",
            "--limit",
            str(limit),
            "--no-progress",
            *flags(topic_flags),
        ]
    )
    after = int(time.time() * 1000)
    assert status == 0
    out = capsys.readouterr().out
    assert f"replayed {limit} events" in out

    items = drain(kafka_bootstrap, topic_flags["--items-topic"], make_group_id())
    users = drain(kafka_bootstrap, topic_flags["--users-topic"], make_group_id())
    assert len(items) == len(dataset.items)
    assert len(users) == len(dataset.users)
    events = drain(kafka_bootstrap, topic_flags["--events-topic"], make_group_id())
    assert len(events) == limit

    by_partition: dict[int, list[int]] = {}
    for msg, body in zip(events, values(events), strict=True):
        assert msg.key() == str(body["user"]).encode()
        ts = body["ts"]
        assert isinstance(ts, int) and before <= ts <= after  # rewritten to send time
        by_partition.setdefault(msg.partition() or 0, []).append(ts)
    for stamps in by_partition.values():
        assert stamps == sorted(stamps)  # timestamp order kept within each partition
    # The events are the dataset's first ones, per user in the original order.
    sent = [(b["user"], b["item"], b["type"]) for b in values(events)]
    original = [(e.user, e.item, e.type) for e in dataset.events[:limit]]
    assert sorted(sent) == sorted(original)
    for user in {e.user for e in dataset.events[:limit]}:
        assert [s for s in sent if s[0] == user] == [o for o in original if o[0] == user]


@pytest.mark.integration
def test_keep_ts_sends_the_original_timestamps(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    make_group_id: Callable[[], str],
) -> None:
    dataset = tiny_dataset(40)
    settings = Settings.from_env(
        {},
        {
            "kafka_bootstrap": kafka_bootstrap,
            "events_topic": make_topic(partitions=2),
            "items_topic": make_topic(),
            "users_topic": make_topic(),
        },
    )
    report = replay(dataset, EventProducer(settings), rewrite_ts=False)
    assert (report.events, report.items, report.users) == (40, 7, 5)
    got = sorted(
        values(drain(kafka_bootstrap, settings.events_topic, make_group_id())),
        key=lambda b: int(str(b["ts"])),
    )
    assert [b["ts"] for b in got] == [e.ts for e in dataset.events]


@pytest.mark.integration
def test_rate_limit_is_roughly_respected(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    make_group_id: Callable[[], str],
) -> None:
    settings = Settings.from_env(
        {},
        {
            "kafka_bootstrap": kafka_bootstrap,
            "events_topic": make_topic(partitions=2),
            "items_topic": make_topic(),
            "users_topic": make_topic(),
        },
    )
    rate, n = 500.0, 400
    start = time.monotonic()
    report = replay(tiny_dataset(n), EventProducer(settings), rate=rate)
    elapsed = time.monotonic() - start
    assert report.events == n
    # 400 events at 500/s is 0.8 s less one free burst; a loose floor, no ceiling.
    assert elapsed >= 0.5 * n / rate
    assert len(drain(kafka_bootstrap, settings.events_topic, make_group_id())) == n


@pytest.mark.integration
def test_speedup_follows_the_data_clock(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
) -> None:
    settings = Settings.from_env(
        {},
        {
            "kafka_bootstrap": kafka_bootstrap,
            "events_topic": make_topic(),
            "items_topic": make_topic(),
            "users_topic": make_topic(),
        },
    )
    dataset = tiny_dataset(5, gap_ms=1000)  # the data spans 4 s
    start = time.monotonic()
    report = replay(dataset, EventProducer(settings), speedup=8.0)
    elapsed = time.monotonic() - start
    assert report.events == 5
    assert elapsed >= 0.5 * 4.0 / 8.0  # 0.5 s at 8x; a loose floor
