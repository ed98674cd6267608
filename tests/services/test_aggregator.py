"""The aggregator in-process, against the real broker and Redis.

Why in-process: what the aggregator promises is in :meth:`Aggregator.cycle` (fold the
consumers' partial sums into ``θ0``, publish a version, announce it) and in when it decides
to run one (:meth:`Aggregator.due`); driving those directly, with its window filled from a
real topic and its partial sums, versions and requests in a real Redis, checks both without
waiting for a schedule. Training runs for real, but tiny (dimension 8, two steps).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from metarec.config import Settings
from metarec.core.model import MetaModel
from metarec.core.reptile import PartialSums
from metarec.local.devservices import LOCAL_GROUP_CONFIG
from metarec.services import aggregator as aggregator_module
from metarec.services.aggregator import OPERATOR_REQUEST, Aggregator
from metarec.services.store import RedisStore
from metarec.training.trainer import MetaTrainer
from tests.kafka_read import read_records
from tests.monitoring_series import expected_of, exported

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("books", "music")
DIM = 8
HISTORY = 20
EVENTS_PARTITIONS = 2


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    seen: Callable[[], object] | None = None,
) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` and the last ``seen``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            detail = f"; last seen: {seen()}" if seen is not None else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(0.1)


def event_records(n: int, *, start: int = 0, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """``n`` valid ``(user, event)`` pairs over two domains, stamped just before now."""
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000) - 60_000
    out = []
    for k in range(start, start + n):
        user = f"u{int(rng.integers(12))}"
        domain = DOMAINS[int(user[1:]) % 2]
        out.append(
            (
                user,
                {
                    "user": user,
                    "item": f"{domain}-{int(rng.integers(15))}",
                    "type": ["click", "like", "dislike"][k % 3],
                    "ts": now + k,
                    "domain": domain,
                },
            )
        )
    return out


@pytest.fixture
def settings(
    kafka_bootstrap: str,
    redis_url: str,
    key_prefix: str,
    make_topic: Callable[..., str],
    make_group_id: Callable[[], str],
) -> Settings:
    """Settings of a fresh deployment: its own topics, groups and key prefix."""
    return Settings.from_env(
        {},
        {
            "kafka_bootstrap": kafka_bootstrap,
            "redis_url": redis_url,
            "key_prefix": key_prefix,
            "group_id": make_group_id(),
            "aggregator_group_id": make_group_id(),
            "events_topic": make_topic(EVENTS_PARTITIONS),
            "items_topic": make_topic(1),
            "users_topic": make_topic(1),
            "dlq_topic": make_topic(1),
            "model_topic": make_topic(1),
            "history_length": HISTORY,
            "aggregate_interval_s": 3600,
        },
    )


@pytest.fixture
def make_aggregator(settings: Settings) -> Iterator[Callable[..., Aggregator]]:
    """Factory: an :class:`Aggregator` with a tiny trainer; ``settings`` changes as keywords."""
    made: list[Aggregator] = []

    def make(learning_rate: float = 0.02, **changes: object) -> Aggregator:
        trainer = MetaTrainer(
            dim=DIM,
            history_length=HISTORY,
            max_steps=2,
            batch_size=64,
            learning_rate=learning_rate,
            seed=0,
        )
        agg = Aggregator(settings.replace(**changes) if changes else settings, trainer)
        made.append(agg)
        return agg

    try:
        yield make
    finally:
        for agg in made:
            agg.stop()
            agg.consumer.close()
            agg.producer.flush(5)


@pytest.fixture
def store(settings: Settings, redis_client: redis.Redis[bytes]) -> RedisStore:
    return RedisStore(redis_client, settings.key_prefix)


def publish(
    settings: Settings, records: Sequence[tuple[str, bytes]], topic: str | None = None
) -> None:
    """Send ``(key, value)`` records keyed like every metarec producer (murmur2)."""
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "partitioner": "murmur2_random",
            "linger.ms": "5",
        }
    )
    failed: list[str] = []

    def done(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    for key, value in records:
        producer.produce(
            topic or settings.events_topic, key=key.encode(), value=value, on_delivery=done
        )
    assert producer.flush(30) == 0 and not failed, f"delivery failed: {failed[:3]}"


def publish_events(settings: Settings, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
    publish(settings, [(user, json.dumps(e).encode()) for user, e in records])


def read_all(settings: Settings, topic: str, partitions: int, n: int) -> list[Any]:
    """The first ``n`` records of ``topic``, read without a group (``assign``)."""
    return read_records(settings.kafka_bootstrap, topic, partitions, n)


def initial_model(theta0: np.ndarray[Any, Any]) -> MetaModel:
    model = MetaModel.initial(DIM, history_length=HISTORY, domains=DOMAINS, seed=1)
    model.theta0 = theta0.astype(np.float32)
    return model


class Runner(threading.Thread):
    """``Aggregator.run`` on a thread, stopped (and joined) by the test in any case."""

    def __init__(self, agg: Aggregator, max_cycles: int | None) -> None:
        super().__init__(daemon=True)
        self.agg, self.max_cycles = agg, max_cycles
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.agg.run(max_cycles=self.max_cycles)
        except BaseException as exc:  # re-raised in the test's thread
            self.error = exc

    def running(self) -> bool:
        """True while it runs; fails the test at once if it stopped (and why)."""
        if not self.is_alive():
            pytest.fail(f"the aggregator stopped unexpectedly: {self.error!r}")
        return True

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            self.agg.stop()
            self.join(10)
            pytest.fail(f"the aggregator did not finish within {timeout}s")
        if self.error is not None:
            raise self.error


# --- one cycle ---------------------------------------------------------------------------------


def test_a_cycle_folds_the_partial_sums_publishes_and_announces(
    make_aggregator: Callable[..., Aggregator], settings: Settings, store: RedisStore
) -> None:
    # Training with a zero learning rate leaves θ0 exactly where folding put it.
    agg = make_aggregator(learning_rate=0.0)
    records = event_records(200)
    publish_events(settings, records)
    # Records the consumers dead-letter are kept out of the window as well.
    future = dict(records[0][1], ts=int(time.time() * 1000) + 3 * 86_400_000)
    publish(settings, [("u1", json.dumps(future).encode()), ("u2", b"[" * 50_000)])
    agg.ingest(read_all(settings, settings.events_topic, EVENTS_PARTITIONS, len(records) + 2))
    assert len(agg.window) == len(records)

    theta0 = np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM) / 10
    v1 = store.publish_model(initial_model(theta0).to_bytes())
    # What two consumers' partitions accumulated: Σ w·(θ_u − θ0(u)) and Σ w per domain row.
    rng = np.random.default_rng(3)
    parts = []
    for partition, rows, weights in ((0, [0, 1, 0], [3.0, 1.0, 2.0]), (1, [1, 1], [4.0, 1.0])):
        p = PartialSums.zeros(2, DIM)
        deltas = rng.standard_normal((len(rows), DIM))
        p.add(rows, deltas, weights)
        parts.append(p)
        store.commit_batch(
            settings.events_topic, partition, None, 5, states={}, recs={}, recs_ttl_s=0, partials=p
        )
    total = parts[0].merge(parts[1])
    expected = theta0 + total.sums / total.weights[:, None]

    version = agg.cycle(reason="test")
    assert version == v1 + 1 == store.current_model_version()
    model = MetaModel.from_bytes(store.load_model_blob(version))
    assert model.dim == DIM and len(model.item_ids) == len({e["item"] for _, e in records})
    for row, domain in enumerate(DOMAINS):
        got = model.theta0[model.domains.index(domain)]
        np.testing.assert_allclose(
            got,
            expected[row],
            rtol=0,
            atol=1e-5,
            err_msg=f"θ0[{domain}] is not θ0 + the weighted mean",
        )
    # The partial sums were taken: reset in Redis, not folded twice.
    assert store.take_partials(settings.events_topic) == []
    assert not list(store.client.scan_iter(match=store.key("partials", "*")))

    [notice_msg] = read_all(settings, settings.model_topic, 1, 1)
    notice = json.loads(notice_msg.value())
    assert notice_msg.key() == str(version).encode()
    assert notice["version"] == version and notice["reason"] == "test"
    assert notice["events"] == len(records)
    assert notice["folded_weight"] == pytest.approx(float(total.weights.sum()))
    # The version's history, as `metarec model list` shows it.
    history = store.model_meta(version) or {}
    assert (history["reason"], history["parent"]) == ("test", version - 1)
    window = history["window"]
    assert window["events"] == len(records) and window["first_ts"] <= window["last_ts"]
    assert history["training_seconds"] > 0 and history["steps"] >= 0


# --- when a cycle runs --------------------------------------------------------------------------


def test_a_now_request_makes_a_cycle_due(
    make_aggregator: Callable[..., Aggregator], settings: Settings, store: RedisStore
) -> None:
    agg = make_aggregator(min_events_for_model=50)
    records = event_records(60)
    publish_events(settings, records)
    agg.ingest(read_all(settings, settings.events_topic, EVENTS_PARTITIONS, len(records)))
    store.publish_model(initial_model(np.zeros((2, DIM), np.float32)).to_bytes())
    assert agg.due() is None, "a cycle is due with a model and the next one an hour away"

    env = {k: v for k, v in os.environ.items() if not k.startswith("METAREC_")}
    env.update(
        {
            "METAREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "METAREC_REDIS_URL": settings.redis_url,
            "METAREC_KEY_PREFIX": settings.key_prefix,
        }
    )
    out = subprocess.run(
        [sys.executable, "-m", "metarec.cli", "aggregate", "--now"],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    reason = agg.due()
    assert reason == OPERATOR_REQUEST, "metarec aggregate --now did not make a cycle due"

    version = agg.cycle(reason=reason)
    assert version == 2 == store.current_model_version()
    assert agg.due() is None, "the request must be used up by the cycle it asked for"


def test_an_operator_can_watch_the_aggregator(
    make_aggregator: Callable[..., Aggregator],
    settings: Settings,
    store: RedisStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agg = make_aggregator(min_events_for_model=50)
    records = event_records(60)
    publish_events(settings, records)
    agg.ingest(read_all(settings, settings.events_topic, EVENTS_PARTITIONS, len(records))[:30])
    store.request_aggregation(OPERATOR_REQUEST)
    with caplog.at_level(logging.INFO, logger=aggregator_module.log.name):
        assert agg.due() is None
        agg.report(time.monotonic())
    # A request that cannot run yet says why, in a log line.
    waiting = [r for r in caplog.records if r.getMessage() == "aggregation requested; waiting"]
    assert len(waiting) == 1
    assert waiting[0].why == (
        "the window holds 30 events; a model needs 50 (METAREC_MIN_EVENTS_FOR_MODEL)"
    )
    stats = [r for r in caplog.records if r.getMessage() == "aggregator stats"]
    assert [(r.window_events, r.cycles, r.last_cycle) for r in stats] == [(30, 0, None)]

    agg.ingest(read_all(settings, settings.events_topic, EVENTS_PARTITIONS, len(records))[30:])
    reason = agg.due()
    assert reason == "first model" and agg.cycle(reason=reason) == 1
    agg.report(time.monotonic())
    text = agg.metrics.exposition().decode()
    # Its own series, not the consumer's.
    assert "metarec_events_applied_total" not in text and "metarec_lag" not in text
    assert 'metarec_aggregator_cycles_total{outcome="published",reason="first"} 1.0' in text
    assert "\nmetarec_aggregator_window_events 60.0\n" in text
    assert "\nmetarec_aggregator_events_since_cycle 0.0\n" in text
    assert "\nmetarec_aggregator_cycle_seconds_count 1.0\n" in text
    assert "\nmetarec_aggregator_training_loss NaN\n" not in text
    assert (
        float(text.split("\nmetarec_aggregator_last_success_timestamp_seconds ")[1].split()[0]) > 0
    )


def test_a_running_aggregator_serves_what_the_dashboard_and_alerts_query(
    make_aggregator: Callable[..., Aggregator],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agg = make_aggregator(metrics_port=port, min_events_for_model=10_000)
    runner = Runner(agg, max_cycles=None)
    runner.start()

    def page() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    try:
        wait_until(lambda: runner.running() and bool(page()), 30.0, "/metrics", lambda: "")
        text = page()
    finally:
        agg.stop()
        runner.join(10)
    assert expected_of("aggregator") <= exported(text), expected_of("aggregator") - exported(text)
    assert not {n for n in exported(text) if n.startswith("metarec_events")}


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_the_first_model_comes_as_soon_as_the_window_is_large_enough(
    make_aggregator: Callable[..., Aggregator], settings: Settings, store: RedisStore, assignor: str
) -> None:
    enough = 80
    fresh_topic = f"{settings.model_topic}-new"  # not created: the aggregator makes it
    agg = make_aggregator(
        min_events_for_model=enough,
        model_topic=fresh_topic,
        kafka_options={"partition.assignment.strategy": assignor},
    )
    records = event_records(enough)
    publish_events(settings, records[:-1])
    runner = Runner(agg, max_cycles=1)
    runner.start()
    try:
        wait_until(
            lambda: runner.running() and len(agg.window) == enough - 1,
            30.0,
            f"the aggregator to read {enough - 1} events",
            lambda: len(agg.window),
        )
        time.sleep(1.0)  # several turns of its loop with one event too few
        assert store.current_model_version() is None, "a model came before the window was full"
        publish_events(settings, records[-1:])
        runner.finish(timeout=60)
    finally:
        agg.stop()
        runner.join(10)
    assert store.current_model_version() == 1
    model = MetaModel.from_bytes(store.load_model_blob(1))
    assert model.info["events"] == enough
    # With one partition, so that notices keep the versions' order.
    topics = (
        AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10).topics
    )
    assert len(topics[fresh_topic].partitions) == 1


def test_a_rebalance_rebuilds_the_window_instead_of_doubling_it(
    make_aggregator: Callable[..., Aggregator], settings: Settings
) -> None:
    agg = make_aggregator(min_events_for_model=10**6)  # never trains: only the window counts
    records = event_records(100)
    publish_events(settings, records)
    # The assignments it gets, seen from its own callback (its consumer is not
    # thread-safe, so the test thread cannot ask it).
    assignments: list[int] = []
    rewind = agg._rewind

    def recording(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        rewind(consumer, partitions)
        assignments.append(len(partitions))

    agg._rewind = recording  # type: ignore[method-assign]
    runner = Runner(agg, max_cycles=None)
    runner.start()
    other = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": settings.aggregator_group_id,
            **LOCAL_GROUP_CONFIG,
        }
    )
    try:
        wait_until(
            lambda: runner.running() and len(agg.window) == len(records),
            30.0,
            "the window to fill",
            lambda: len(agg.window),
        )
        # A second member joins the aggregator's group and leaves again: two rebalances,
        # after which the aggregator owns (and has re-read) every partition again.
        other.subscribe([settings.events_topic, settings.items_topic, settings.users_topic])
        deadline = time.monotonic() + 30
        while not other.assignment():
            assert time.monotonic() < deadline, "the second member got no partition"
            other.consume(10, 0.2)
        other.close()
        every = EVENTS_PARTITIONS + 2  # and the items and users topics
        wait_until(
            lambda: runner.running() and len(assignments) >= 3 and assignments[-1] == every,
            30.0,
            "the aggregator to own every partition again",
            lambda: assignments,
        )
        wait_until(
            lambda: runner.running() and len(agg.window) >= len(records),
            10.0,
            "the window to refill",
            lambda: len(agg.window),
        )
        time.sleep(1.0)
        assert len(agg.window) == len(records), "the window holds events twice"
    finally:
        agg.stop()
        runner.finish(timeout=30)


def test_a_drift_request_on_too_few_events_to_judge_keeps_the_window_and_the_floor(
    make_aggregator: Callable[..., Aggregator], settings: Settings, store: RedisStore
) -> None:
    agg = make_aggregator(min_events_for_model=40)
    old, new = event_records(60), event_records(50, start=60, seed=1)
    publish_events(settings, old + new[:30])
    agg.ingest(read_all(settings, settings.events_topic, EVENTS_PARTITIONS, 90))
    store.publish_model(initial_model(np.zeros((2, DIM), np.float32)).to_bytes())
    # A consumer saw live quality drop, dating the change at the first new event.
    store.request_aggregation("drift in domain 'books'", since_ts=new[0][1]["ts"])
    assert store.training_floor() == new[0][1]["ts"]
    assert agg.due() is None, "30 events of the new regime are too few to train on"

    publish_events(settings, new[30:])
    everything = read_all(settings, settings.events_topic, EVENTS_PARTITIONS, 110)
    agg.ingest([m for m in everything if json.loads(m.value())["ts"] >= new[30][1]["ts"]])
    reason = agg.due()
    assert reason == "drift in domain 'books'"
    version = agg.cycle(reason=reason)
    assert version == 2
    model = MetaModel.from_bytes(store.load_model_blob(2))
    # 110 events of a few users hold no held-out events of the new regime to judge a
    # model of it by: the whole window keeps serving and the floor waits in Redis.
    assert model.info["drift"] == "undecided" and model.info["events"] == len(old) + len(new)
    assert model.info["floor_ts"] is None and store.training_floor() == new[0][1]["ts"]
    notice = json.loads(read_all(settings, settings.model_topic, 1, 1)[0].value())
    assert not notice["fresh_start"] and notice["floor_ts"] == new[0][1]["ts"]
    # An earlier date reported later (another consumer) does not move the floor back.
    store.request_aggregation("drift in domain 'books'", since_ts=new[0][1]["ts"] - 1000)
    assert store.training_floor() == new[0][1]["ts"]
