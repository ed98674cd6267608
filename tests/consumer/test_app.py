"""The consumer service end to end: real Tansu, real Redis, consumers as real processes.

Why processes: what the consumer promises (an event applied exactly once whatever happens to
the process, fencing of a member that lost its partitions, hot reload without a restart)
only shows when a process can be SIGKILLed half-way, a group can rebalance and a model can
change under it. Each test gets its own topics, consumer group and Redis key prefix
(:class:`System`), and every consumer it starts is killed when it ends.

Every wait is a bounded poll (:func:`wait_until`) whose failure message says what was
awaited, what was seen last, and the tail of the consumers' logs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from consumer.app import ConsumerApp
from consumer.dlq import DEFAULT_TRUNCATE_TO
from metarec.client import Recommendations
from metarec.config import Settings
from metarec.core.events import MAX_ID_BYTES, MAX_RECORD_BYTES, Event, ItemRecord
from metarec.core.model import MetaModel
from metarec.core.user_state import UserState
from metarec.data.registry import load_dataset
from metarec.local.devservices import kcat_env
from metarec.services import dead_letters as dlq
from metarec.services.store import RedisStore
from tests.kafka_read import read_records

REPO = Path(__file__).resolve().parents[2]
RECS_KEYS = {"user", "items", "scores", "model_version", "events", "updated_ms"}
#: Group timings for the crash test: Tansu evicts a SIGKILLed member after its session
#: timeout plus one join window (docs/LOCAL_SERVICES.md), 6 s + 3 s with the defaults;
#: 2 s + 1 s keeps five crashes within the test's time budget.
FAST_GROUP = {"METAREC_KAFKA_SESSION_TIMEOUT_MS": "2000",
              "METAREC_KAFKA_HEARTBEAT_INTERVAL_MS": "200"}
#: Longest wait for consumers to apply everything published (rebalances included).
CATCH_UP_S = 90.0
LOG_TAIL_LINES = 15


# --- waiting ---------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               seen: Callable[[], object] | None = None, interval: float = 0.2,
               procs: Sequence[subprocess.Popen[bytes]] = ()) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` and the last ``seen``.

    Fails at once if one of ``procs`` exits meanwhile: a crashed consumer will not
    catch up, and waiting out the timeout would only hide how it died.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() >= deadline:
            detail = f"; last seen: {seen()}" if seen is not None else ""
            why = (f"pid {dead[0].pid} exited with {dead[0].returncode}" if dead
                   else f"timed out after {timeout:g}s")
            pytest.fail(f"{why} waiting for {what}{detail}")
        time.sleep(interval)


# --- publishing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """Where a record landed, from its delivery report."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Publisher:
    """A plain Kafka producer that keeps every delivery report, keyed like Java (murmur2)."""

    def __init__(self, bootstrap: str, **config: str) -> None:
        self._producer = Producer({
            "bootstrap.servers": bootstrap, "enable.idempotence": "true",
            "partitioner": "murmur2_random", "linger.ms": "5", **config,
        })
        self.delivered: list[Delivery] = []
        self.errors: list[str] = []

    def send(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        self._producer.produce(topic, key=key, value=value, on_delivery=self._done)
        self._producer.poll(0)

    def send_event(self, topic: str, event: Event) -> None:
        self.send(topic, event.user.encode(), json.dumps(event.to_json()).encode())

    def flush(self, timeout: float = 30.0) -> None:
        left = self._producer.flush(timeout)
        assert not self.errors, f"test records failed delivery: {self.errors[:3]}"
        assert left == 0, f"{left} test records still undelivered after {timeout}s"

    def _done(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))
        else:
            self.delivered.append(Delivery(msg.topic(), msg.partition(), msg.offset(),
                                           msg.key(), msg.value()))

    def ends(self, topic: str) -> Counter[int]:
        """Records delivered per partition of ``topic`` (its end, on a fresh topic)."""
        return Counter(d.partition for d in self.delivered if d.topic == topic)

    def per_user(self, topic: str) -> Counter[str]:
        """Events delivered per user (the record key) on ``topic``."""
        return Counter((d.key or b"").decode() for d in self.delivered if d.topic == topic)


def stream(seed: int, limit: int) -> list[Event]:
    """The first ``limit`` events of the bundled synthetic stream (domains, cold items)."""
    return load_dataset("synthetic-small", seed=seed).events[:limit]


def publish_paced(pub: Publisher, topic: str, events: Sequence[Event], rate: float) -> None:
    """Send ``events`` at ``rate`` per second, stamped with the wall clock like a live app."""
    started = time.monotonic()
    for n, event in enumerate(events):
        due = started + n / rate
        if (lag := due - time.monotonic()) > 0:
            time.sleep(lag)
        pub.send_event(topic, Event(event.user, event.item, event.type,
                                    int(time.time() * 1000), event.domain, event.event_id))
    pub.flush()


class Background(threading.Thread):
    """A thread whose exception is re-raised by :meth:`result` (a failed replay fails)."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # re-raised in the test's thread
            self.error = exc

    def result(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"background publisher still running after {timeout}s"
        if self.error is not None:
            raise self.error


# --- the system under test ---------------------------------------------------------------


@dataclass
class System:
    """One deployment: its topics, group, key prefix, and the consumers it runs."""

    bootstrap: str
    redis_url: str
    prefix: str
    group: str
    events: str
    items: str
    users: str
    dlq: str
    model: str
    partitions: int
    store: RedisStore
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METAREC_")}
        env.update({
            "METAREC_KAFKA_BOOTSTRAP": self.bootstrap, "METAREC_REDIS_URL": self.redis_url,
            "METAREC_KEY_PREFIX": self.prefix, "METAREC_GROUP_ID": self.group,
            "METAREC_AGGREGATOR_GROUP_ID": f"{self.group}-aggregator",
            "METAREC_EVENTS_TOPIC": self.events, "METAREC_ITEMS_TOPIC": self.items,
            "METAREC_USERS_TOPIC": self.users, "METAREC_DLQ_TOPIC": self.dlq,
            "METAREC_MODEL_TOPIC": self.model, "METAREC_STATS_INTERVAL_S": "1",
            "METAREC_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
            **self.extra_env, **extra,
        })
        return env

    def settings(self, **extra: str) -> Settings:
        return Settings.from_env({k: v for k, v in self.env(**extra).items()
                                  if k.startswith("METAREC_")})

    # -- processes --

    def start(self, argv: Sequence[str] = ("-m", "consumer"), **extra: str,
              ) -> subprocess.Popen[bytes]:
        """Start ``python argv`` (a consumer by default) with this system's settings."""
        log = (self.log_dir / f"proc-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, *argv], env=self.env(**extra), cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def terminate(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
        """SIGTERM and the exit status; fails if the process does not exit in time."""
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pid {proc.pid} did not exit within {timeout}s of SIGTERM"
                        f"{self.logs()}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def logs(self) -> str:
        """The tail of every process log, for failure messages."""
        parts = []
        for i, proc in enumerate(self.procs):
            path = self.log_dir / f"proc-{i}.log"
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            parts.append(f"\n--- pid {proc.pid} (exit {proc.poll()}) ---\n" + "\n".join(lines))
        return "".join(parts)

    # -- state --

    def offsets(self) -> dict[int, int | None]:
        return self.store.offsets(self.events, list(range(self.partitions)))

    def applied(self) -> int:
        return sum(v or 0 for v in self.offsets().values())

    def wait_applied(self, ends: Mapping[int, int], timeout: float = CATCH_UP_S) -> None:
        """Wait until every partition's stored offset is its end (all events applied)."""
        want = {p: ends.get(p, 0) or None for p in range(self.partitions)}
        running = [p for p in self.procs if p.poll() is None]
        wait_until(lambda: self.offsets() == want, timeout, f"stored offsets {want}",
                   lambda: f"{self.offsets()}{self.logs()}", procs=running)

    def state(self, user: str) -> UserState | None:
        raw = self.store.client.get(self.store.key("user", user))
        return None if raw is None else UserState.from_bytes(raw)

    def recs(self, user: str) -> dict[str, Any] | None:
        raw = self.store.client.get(self.store.recs_key(user))  # what an app does: one GET
        return None if raw is None else dict(json.loads(raw))

    def heartbeat_partitions(self, procs: Sequence[subprocess.Popen[bytes]]
                             ) -> dict[int, list[int]]:
        """The partitions each of ``procs`` reported in its last stats heartbeat."""
        beats = self.store.heartbeats(self.group)
        out: dict[int, list[int]] = {}
        for proc in procs:
            beat = next((b for m, b in beats.items() if m.endswith(f"-{proc.pid}")), None)
            out[proc.pid] = [] if beat is None else list(beat["partitions"])
        return out


@pytest.fixture
def make_system(kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis[bytes],
                key_prefix: str, make_topic: Callable[..., str],
                make_group_id: Callable[[], str], tmp_path: Path,
                ) -> Iterator[Callable[..., System]]:
    """Factory: ``make_system(partitions, **env)``; its processes die with the test."""
    made: list[System] = []

    def make(partitions: int, **extra_env: str) -> System:
        log_dir = tmp_path / f"system-{len(made)}"
        log_dir.mkdir()
        system = System(
            bootstrap=kafka_bootstrap, redis_url=redis_url, prefix=f"{key_prefix}{len(made)}:",
            group=make_group_id(), events=make_topic(partitions), items=make_topic(1),
            users=make_topic(1), dlq=make_topic(1), model=make_topic(1),
            partitions=partitions, store=RedisStore(redis_client, f"{key_prefix}{len(made)}:"),
            log_dir=log_dir, extra_env=dict(extra_env))
        made.append(system)
        return system

    try:
        yield make
    finally:
        for system in made:
            system.close()


# --- checks --------------------------------------------------------------------------------


def check_list(system: System, user: str, *, events: int, catalog: set[str],
               consumed: set[str], top_k: int, model_version: int | None = None) -> None:
    """``recs:{user}`` follows the list contract exactly."""
    recs = system.recs(user)
    assert recs is not None, f"no list for user {user!r}"
    assert set(recs) == RECS_KEYS, f"keys of recs:{user}: {sorted(recs)}"
    assert recs["user"] == user
    assert isinstance(recs["items"], list) and all(isinstance(i, str) for i in recs["items"])
    assert isinstance(recs["scores"], list)
    assert all(isinstance(s, float) for s in recs["scores"]), recs["scores"]
    for name in ("model_version", "events", "updated_ms"):
        assert type(recs[name]) is int, f"{name} of recs:{user} is {recs[name]!r}"
    assert recs["events"] == events, f"recs:{user} counts {recs['events']} events, not {events}"
    assert len(recs["items"]) == len(recs["scores"]) <= top_k
    assert len(set(recs["items"])) == len(recs["items"]), f"duplicates in {recs['items']}"
    assert set(recs["items"]) <= catalog, f"not in the catalog: {set(recs['items']) - catalog}"
    assert not set(recs["items"]) & consumed, f"consumed items listed for {user}"
    assert recs["scores"] == sorted(recs["scores"], reverse=True), recs["scores"]
    assert abs(recs["updated_ms"] - time.time() * 1000) < 600_000, recs["updated_ms"]
    if model_version is not None:
        assert recs["model_version"] == model_version, recs


def check_exactly_once(system: System, per_user: Mapping[str, int]) -> None:
    """Every user's stored state counts exactly the events published for them."""
    wrong = {}
    for user, n in per_user.items():
        state = system.state(user)
        got = None if state is None else state.n_events
        if got != n:
            wrong[user] = (got, n)
    assert not wrong, f"(applied, published) differ for {len(wrong)} users: " \
                      f"{dict(list(wrong.items())[:10])}"


def make_model(items: Sequence[str], domains: Sequence[str], *, dim: int = 8,
               seed: int = 0) -> MetaModel:
    """A small model that knows ``items`` (random embeddings): enough to adapt and rank."""
    rng = np.random.default_rng(seed)
    model = MetaModel.initial(dim, history_length=20, domains=tuple(domains), seed=seed)
    n = len(items)
    model.item_ids = list(items)
    model.item_emb = rng.standard_normal((n, dim)).astype(np.float32)
    model.item_ctx = rng.standard_normal((n, dim)).astype(np.float32)
    model.item_bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    model.item_count = np.full(n, 5.0, np.float32)
    model.theta0 = (0.1 * rng.standard_normal(model.theta0.shape)).astype(np.float32)
    return model


# --- 1. a foreign client -------------------------------------------------------------------


def foreign_produce(bootstrap: str, topic: str,
                    records: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Publish ``(key, JSON object)`` records with kafka-python: a client that shares no
    code with the consumer's librdkafka, keyed and partitioned like Java's."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for key, value in records:
            producer.send(topic, key=key.encode(), value=json.dumps(value).encode())
        producer.flush(timeout=60)
    finally:
        producer.close()


def kcat_produce(env: Mapping[str, str], bootstrap: str, topic: str,
                 records: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Publish ``(key, JSON object)`` records with kcat, keyed and partitioned like Java."""
    lines = "".join(f"{key}\t{json.dumps(value)}\n" for key, value in records)
    out = subprocess.run(
        ["kcat", "-b", bootstrap, "-P", "-t", topic, "-K", "\t",
         "-X", "partitioner=murmur2_random"],
        input=lines.encode(), env=dict(env), capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, f"kcat failed ({out.returncode}): {out.stderr.decode()[-2000:]}"


@pytest.mark.parametrize("client", [
    "kafka-python",
    pytest.param("kcat", marks=pytest.mark.skipif(
        shutil.which("kcat") is None, reason="kcat not installed (an extra check; CI has it)")),
])
def test_lists_from_a_foreign_client_follow_the_contract(
        make_system: Callable[..., System], tmp_path: Path, client: str) -> None:
    system = make_system(3, METAREC_TOP_K="5")
    env = kcat_env(tmp_path / "kcat-shim")

    def publish(topic: str, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
        if client == "kcat":
            kcat_produce(env, system.bootstrap, topic, records)
        else:
            foreign_produce(system.bootstrap, topic, records)

    now = int(time.time() * 1000)
    catalog_only = [f"book-{j}" for j in range(8)]  # described, never clicked
    publish(system.items, [
        (item, {"item": item, "domain": "books", "features": ["genre:x", f"n:{j % 3}"],
                "ts": now}) for j, item in enumerate(catalog_only)])
    rng = random.Random(7)
    records: list[tuple[str, dict[str, Any]]] = []
    consumed: dict[str, set[str]] = {}
    for n in range(60):
        user = f"user-{rng.randrange(9)}"
        domain = "books" if user[-1] in "0123" else "music"
        item = f"{domain}-item-{rng.randrange(12)}"
        event: dict[str, Any] = {"user": user, "item": item,
                                 "type": rng.choice(["click", "click", "like", "dislike"])}
        if n % 2:  # ts and domain are optional in the contract
            event["ts"] = now + n
        if domain != "books" or n % 3:
            event["domain"] = domain
        records.append((user, event))
        consumed.setdefault(user, set()).add(item)
    publish(system.events, records)
    per_user = Counter(key for key, _ in records)

    proc = system.start()
    wait_until(lambda: system.applied() == len(records), CATCH_UP_S,
               f"all {len(records)} {client} events applied",
               lambda: f"{system.offsets()}{system.logs()}", procs=[proc])
    catalog = set(catalog_only) | {e["item"] for _, e in records}
    for user, n in per_user.items():
        check_list(system, user, events=n, catalog=catalog, consumed=consumed[user],
                   top_k=5, model_version=0)
    check_exactly_once(system, per_user)
    # The registry holds the described items and those first seen in events, nothing else.
    keys = [k.decode() for k in system.store.client.hkeys(system.store.key("items", "index"))]
    assert set(keys) == catalog
    # A user without a list is shown their domain's fallback, which the consumers write:
    # what a newcomer to that domain is served (here, without a model: its trending items).
    reader = Recommendations(system.store.client, prefix=system.store.prefix)
    for domain in ("books", "music"):
        def written(d: str = domain) -> bool:
            return reader.get("never-seen", d) is not None

        wait_until(written, 30.0, f"the {domain} fallback list", procs=[proc])
        shown = reader.get("never-seen", domain)
        assert shown is not None and shown.source == "fallback" and shown.domain == domain
        assert 0 < len(shown.items) <= 5 and len(set(shown.items)) == len(shown.items)
        assert all(item.startswith(domain[:4]) for item in shown.items), shown.items
        assert shown.scores == sorted(shown.scores, reverse=True)


# --- 2. crash safety --------------------------------------------------------------------------


def test_sigkilled_consumers_apply_every_event_exactly_once(
        make_system: Callable[..., System], kafka_bootstrap: str) -> None:
    system = make_system(4, **FAST_GROUP)
    events = stream(seed=11, limit=3000)
    users = {e.user for e in events}
    domains = sorted({e.domain for e in events})
    items = sorted({e.item for e in events})
    # A model first, so that every applied event also lands in the partial sums.
    system.store.publish_model(make_model(items, domains).to_bytes())
    pub = Publisher(kafka_bootstrap)
    replay = Background(lambda: publish_paced(pub, system.events, events, rate=130.0))
    rng = random.Random(2024)
    kills = mid_stream = 0
    replay.start()
    try:
        while kills < 5:
            proc = system.start()
            before = system.applied()

            def busy(before: int = before) -> bool:
                # It wrote something, so it is at work; or there is nothing left to do.
                return system.applied() > before or (
                    not replay.is_alive() and system.applied() == len(events))

            wait_until(busy, 60.0, f"consumer {kills + 1} to apply events",
                       lambda: f"{system.offsets()}{system.logs()}", interval=0.05,
                       procs=[proc])
            time.sleep(rng.uniform(0.0, 0.6))  # a random moment of its work
            assert proc.poll() is None, f"consumer died by itself{system.logs()}"
            mid_stream += system.applied() < len(events)
            system.kill(proc)
            kills += 1
        final = system.start()
    finally:
        replay.result(timeout=120)
    assert mid_stream >= 3, f"only {mid_stream} of the kills came while events were in flight"
    system.wait_applied(pub.ends(system.events))
    assert final.poll() is None, f"final consumer died{system.logs()}"

    per_user = pub.per_user(system.events)
    assert sum(per_user.values()) == len(events) and set(per_user) == users
    check_exactly_once(system, per_user)
    assert sum(v or 0 for v in system.offsets().values()) == len(events)
    # The consumer weighs each user by the events applied: each event counts once.
    partials = system.store.take_partials(system.events)
    weight = sum(float(p.weights.sum()) for p in partials)
    assert weight == pytest.approx(len(events), abs=1e-6), (weight, len(events))
    missing = [u for u in users if system.recs(u) is None]
    assert not missing, f"users without a list: {missing[:10]}"


# --- 3. scale out and in --------------------------------------------------------------------


def owned(system: System, procs: Sequence[subprocess.Popen[bytes]]) -> list[int]:
    """Every partition the ``procs`` report owning, with repeats (sorted)."""
    return sorted(p for parts in system.heartbeat_partitions(procs).values() for p in parts)


def test_consumers_join_and_leave_without_losing_or_repeating_events(
        make_system: Callable[..., System], kafka_bootstrap: str) -> None:
    system = make_system(6)  # the consumer's own group timings (6 s session)
    events = stream(seed=5, limit=3600)
    pub = Publisher(kafka_bootstrap)
    replay = Background(lambda: publish_paced(pub, system.events, events, rate=150.0))
    everything = list(range(6))
    first = system.start()
    replay.start()
    try:
        wait_until(lambda: owned(system, [first]) == everything, 30.0,
                   "the first consumer to own all 6 partitions",
                   lambda: f"{system.heartbeat_partitions([first])}{system.logs()}",
                   procs=[first])
        second, third = system.start(), system.start()
        trio = [first, second, third]
        wait_until(lambda: owned(system, trio) == everything
                   and all(system.heartbeat_partitions(trio).values()), 40.0,
                   "three consumers to share the 6 partitions",
                   lambda: f"{system.heartbeat_partitions(trio)}{system.logs()}", procs=trio)
        assert replay.is_alive(), "the replay ended before the scale-in: nothing was in flight"
        assert system.terminate(second) == 0, f"SIGTERM must be a clean exit{system.logs()}"
        pair = [first, third]
        wait_until(lambda: owned(system, pair) == everything, 40.0,
                   "the two remaining consumers to take over all 6 partitions",
                   lambda: f"{system.heartbeat_partitions(pair)}{system.logs()}", procs=pair)
    finally:
        replay.result(timeout=120)
    ends = pub.ends(system.events)
    assert sorted(ends) == everything  # every partition had traffic
    system.wait_applied(ends)
    assert first.poll() is None and third.poll() is None, f"a consumer died{system.logs()}"
    per_user = pub.per_user(system.events)
    check_exactly_once(system, per_user)
    catalog = {e.item for e in events}
    for user in per_user:
        check_list(system, user, events=per_user[user], catalog=catalog,
                   consumed={e.item for e in events if e.user == user}, top_k=20)


def test_cooperative_rebalancing_keeps_every_event_exactly_once(
        make_system: Callable[..., System], kafka_bootstrap: str) -> None:
    # A documented alternative to the eager default (docs/LOCAL_SERVICES.md); librdkafka
    # refuses a plain assign() in its rebalance callbacks.
    system = make_system(4, METAREC_KAFKA_PARTITION_ASSIGNMENT_STRATEGY="cooperative-sticky")
    events = stream(seed=9, limit=1500)
    pub = Publisher(kafka_bootstrap)
    replay = Background(lambda: publish_paced(pub, system.events, events, rate=100.0))
    first = system.start()
    replay.start()
    try:
        wait_until(lambda: owned(system, [first]) == [0, 1, 2, 3], 30.0,
                   "the first consumer to own all 4 partitions",
                   lambda: f"{system.heartbeat_partitions([first])}{system.logs()}",
                   procs=[first])
        second = system.start()
        pair = [first, second]
        # The sticky assignor balances all three topics' partitions, so each member ends
        # up with some of the events topic.
        wait_until(lambda: owned(system, pair) == [0, 1, 2, 3]
                   and all(system.heartbeat_partitions(pair).values()), 40.0,
                   "two cooperative consumers to share the 4 partitions",
                   lambda: f"{system.heartbeat_partitions(pair)}{system.logs()}", procs=pair)
    finally:
        replay.result(timeout=60)
    system.wait_applied(pub.ends(system.events))
    assert first.poll() is None and second.poll() is None, f"a consumer died{system.logs()}"
    check_exactly_once(system, pub.per_user(system.events))

# --- 4. a zombie's batch --------------------------------------------------------------------


def snapshot(system: System) -> dict[bytes, bytes | None]:
    """Every key of ``system`` except the consumers' heartbeats, as DUMPs."""
    client = system.store.client
    beats = (system.store.key("consumer") + ":").encode(), system.store.key("consumers").encode()
    return {key: client.dump(key) for key in client.scan_iter(match=f"{system.prefix}*")
            if not key.startswith(beats)}


def consume_at_least(consumer: Consumer, n: int, timeout: float = 20.0) -> list[Any]:
    """At least ``n`` records from ``consumer`` (errors and EOF events left out)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"got {len(got)} of {n} records in {timeout}s"
        got += [m for m in consumer.consume(n - len(got), 0.5) if m.error() is None]
    return got


def test_a_zombie_consumer_writes_nothing_and_re_seeks(
        make_system: Callable[..., System], kafka_bootstrap: str) -> None:
    system = make_system(1)
    pub = Publisher(kafka_bootstrap)
    now = int(time.time() * 1000)
    for j in range(40):
        pub.send_event(system.events, Event(f"z{j % 5}", f"item-{j % 7}", "click", now + j))
    pub.flush()
    live = system.start()
    system.wait_applied({0: 40})
    # The zombie: same group and settings, but it still believes it owns partition 0 at
    # offset 15, the last one it wrote before its partitions were given to the live one.
    zombie = ConsumerApp(system.settings(), member="zombie")
    try:
        zombie.consumer.assign([TopicPartition(system.events, 0, 15)])
        zombie._expected[0] = 15
        batch = consume_at_least(zombie.consumer, 10)[:10]
        assert [m.offset() for m in batch] == list(range(15, 25))
        before = snapshot(system)
        zombie.process(batch)  # records the live consumer applied already
        assert snapshot(system) == before, "the zombie's batch changed Redis"
        assert zombie._expected[0] == 40, "the zombie did not re-read the stored offset"
        # It re-seeked to the stored offset: its next records start there, not at 25.
        for j in range(10):
            pub.send_event(system.events, Event(f"z{j % 5}", f"item-{j}", "like", now + 40 + j))
        pub.flush()
        more = consume_at_least(zombie.consumer, 10)
        assert more[0].offset() == 40, f"zombie resumed at {more[0].offset()}, not at 40"
        zombie.process(more)  # races the live consumer: exactly one of them applies them
        system.wait_applied({0: 50})
    finally:
        zombie.consumer.close()
    assert live.poll() is None, f"the live consumer died{system.logs()}"
    check_exactly_once(system, pub.per_user(system.events))


# --- 5. bad input -----------------------------------------------------------------------------


def bad_records(now: int) -> list[tuple[str, bytes | None, str]]:
    """``(key, value, expected words of the error message)`` of records that break the
    contract, each in one way."""
    def event(**fields: Any) -> bytes:
        base: dict[str, Any] = {"user": "bad-user", "item": "i1", "type": "click", "ts": now}
        base.update(fields)
        return json.dumps({k: v for k, v in base.items() if v is not None}).encode()

    pad = "x" * (200 * 1024)
    return [
        ("k-utf8", b'{"user": "\xff\xfe", "item": "i1", "type": "click"}', "not UTF-8"),
        ("k-json", b'{"user": "u", "item": ', "not JSON"),
        ("k-list", b'["u", "i1", "click"]', "must be a JSON object"),
        ("k-number", b"42", "must be a JSON object"),
        ("k-null", None, "not JSON"),
        ("k-no-user", event(user=None), "'user' is missing"),
        ("k-no-item", event(item=None), "'item' is missing"),
        ("k-no-type", event(type=None), "'type'"),
        ("k-item-number", event(item=17), "'item' must be a string"),
        ("k-ts-string", event(ts="1700000000000"), "'ts' must be integer"),
        ("k-empty-user", event(user=""), "'user' must be a non-empty id"),
        ("k-long-id", event(item="i" * (MAX_ID_BYTES + 1)), f"longer than {MAX_ID_BYTES}"),
        ("k-type", event(type="share"), "'type' is 'share'"),
        ("k-future", event(ts=now + 3 * 24 * 3600 * 1000), "in the future"),
        ("k-negative-ts", event(ts=-5), "negative"),
        # A time before 1990 is a unit mistake (seconds) or a test value, not an event.
        ("k-ts-1", event(ts=1), "before the earliest accepted time"),
        ("k-ts-seconds", event(ts=now // 1000), "before the earliest accepted time"),
        # Valid, but keyed by another user: it may sit on another partition than theirs.
        ("k-key-mismatch", event(), "is not the event's user"),
        ("k-huge", event(pad=pad), f"over the {MAX_RECORD_BYTES} limit"),
        ("k-over-1mb", event(pad=pad * 6), f"over the {MAX_RECORD_BYTES} limit"),
        # Under the size limit, but deeper than Python's JSON parser recurses.
        ("k-deep", b"[" * 50_000, ""),
    ]


def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 30.0) -> list[Any]:
    """The first ``n`` records of a one-partition topic."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader",
                       "enable.auto.commit": "false"})
    try:
        reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        return consume_at_least(reader, n, timeout)
    finally:
        reader.close()


def test_bad_records_go_to_the_dlq_unchanged_and_good_ones_are_applied(
        make_system: Callable[..., System], kafka_bootstrap: str) -> None:
    system = make_system(2)
    # The test's producer may send records over 1 MB; the consumer's DLQ producer may not.
    pub = Publisher(kafka_bootstrap, **{"message.max.bytes": "3000000"})
    now = int(time.time() * 1000)
    bad = bad_records(now)
    good = [Event(f"good-{j % 4}", f"item-{j % 5}", "click", now + j) for j in range(2 * len(bad))]
    for j, (key, value, _) in enumerate(bad):
        pub.send_event(system.events, good[2 * j])
        pub.send(system.events, key.encode(), value)
        pub.send_event(system.events, good[2 * j + 1])
    pub.flush()
    proc = system.start()
    system.wait_applied(pub.ends(system.events))
    # Good events after the bad ones are still applied by the same process.
    after = [Event(f"good-{j % 4}", "item-late", "like", now + 100 + j) for j in range(4)]
    for e in after:
        pub.send_event(system.events, e)
    pub.flush()
    system.wait_applied(pub.ends(system.events))
    assert proc.poll() is None, f"the consumer died on bad input{system.logs()}"
    check_exactly_once(system, {u: n for u, n in pub.per_user(system.events).items()
                                if u.startswith("good-")})

    sent = {d.key.decode(): d for d in pub.delivered if d.key and d.key.startswith(b"k-")}
    letters = read_topic(kafka_bootstrap, system.dlq, len(bad))
    assert len(letters) == len(bad), [m.key() for m in letters]
    by_key = {m.key().decode(): m for m in letters}
    for key, value, words in bad:
        msg = by_key.get(key)
        assert msg is not None, f"record {key} is not in the DLQ"
        headers = {k: v for k, v in msg.headers() or []}
        origin = sent[key]
        # A decoder gap (RecursionError) is dead-lettered under its own name.
        allowed = {b"InvalidEvent", b"RecursionError"} if key == "k-deep" else {b"InvalidEvent"}
        assert headers[dlq.ERROR_CLASS] in allowed, (key, headers)
        assert words in headers[dlq.ERROR_MESSAGE].decode(), (key, headers[dlq.ERROR_MESSAGE])
        assert headers[dlq.ORIGINAL_TOPIC] == system.events.encode()
        assert headers[dlq.ORIGINAL_PARTITION] == str(origin.partition).encode(), key
        assert headers[dlq.ORIGINAL_OFFSET] == str(origin.offset).encode(), key
        assert headers[dlq.CONSUMER_GROUP] == system.group.encode()
        if value is not None and len(value) > 1_000_000:
            # Over the DLQ producer's limit: kept cut down, with the original length.
            assert msg.value() == value[:DEFAULT_TRUNCATE_TO]
            assert headers[dlq.VALUE_TRUNCATED] == str(len(value)).encode()
        else:
            assert msg.value() == value, f"record {key} changed on its way to the DLQ"
            assert dlq.VALUE_TRUNCATED not in headers
    wait_until(lambda: sum(b["total_dlq"] for b in system.store.heartbeats(system.group)
                           .values()) == len(bad), 10.0, "the stats to count every dead letter",
               lambda: system.store.heartbeats(system.group), procs=[proc])


# --- 6. hot reload ----------------------------------------------------------------------------


def list_versions(system: System, users: Sequence[str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for user in users:
        recs = system.recs(user)
        out[user] = None if recs is None else recs["model_version"]
    return out


def test_consumers_hot_reload_new_models_and_refresh_lists(
        make_system: Callable[..., System], kafka_bootstrap: str) -> None:
    events = stream(seed=3, limit=300)
    system = make_system(2, METAREC_MIN_EVENTS_FOR_MODEL=str(len(events)))
    pub = Publisher(kafka_bootstrap)
    for e in events:
        pub.send_event(system.events, e)
    pub.flush()
    consumers = [system.start(), system.start()]
    system.wait_applied(pub.ends(system.events))
    per_user = pub.per_user(system.events)
    users = sorted(per_user)
    assert set(list_versions(system, users).values()) == {0}  # popularity before a model

    aggregator = system.start(["-m", "metarec.cli", "aggregate", "--once"])
    try:
        code = aggregator.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"metarec aggregate --once did not publish a model in 120s{system.logs()}")
    assert code == 0, f"metarec aggregate --once exited {code}{system.logs()}"
    assert system.store.current_model_version() == 1
    catalog = {e.item for e in events}
    # No new event: the consumers reload v1 and re-rank their recent users in the background.
    for version in (1, 2):
        if version == 2:
            v2 = MetaModel.from_bytes(system.store.load_model_blob(1))
            v2.theta0 = v2.theta0 + np.float32(0.5)
            assert system.store.publish_model(v2.to_bytes()) == 2

        def moved(version: int = version) -> bool:
            return set(list_versions(system, users).values()) == {version}

        wait_until(moved, 30.0, f"every list to move to model v{version} without new events",
                   lambda: f"{Counter(list_versions(system, users).values())}{system.logs()}",
                   procs=consumers)
        for user in users:
            check_list(system, user, events=per_user[user], catalog=catalog,
                       consumed={e.item for e in events if e.user == user}, top_k=20,
                       model_version=version)
            state = system.state(user)
            assert state is not None and state.model_version == version
            assert state.n_events == per_user[user]
    assert all(c.poll() is None for c in consumers), f"a consumer restarted{system.logs()}"
    # New events are adapted and ranked under v2, for known users and a new one.
    now = int(time.time() * 1000)
    fresh = [Event(users[0], events[0].item, "like", now), Event("newcomer", events[1].item,
                                                                 "click", now)]
    for e in fresh:
        pub.send_event(system.events, e)
    pub.flush()
    system.wait_applied(pub.ends(system.events))
    for user, n in ((users[0], per_user[users[0]] + 1), ("newcomer", 1)):
        recs = system.recs(user)
        assert recs is not None and recs["model_version"] == 2 and recs["events"] == n, recs


# --- 7. live quality drops: the consumer asks for an aggregation ---------------------------


def test_a_drop_in_live_quality_asks_for_a_cycle_on_the_new_regime(
        make_system: Callable[..., System], kafka_bootstrap: str) -> None:
    system = make_system(1)
    # A model whose lists are its item biases alone: the "hit" items in a fixed order.
    hits = [f"hit-{k}" for k in range(30)]
    misses = [f"miss-{k}" for k in range(30)]
    model = make_model(hits + misses, ["books"])
    for table in (model.item_emb, model.item_ctx, model.item_bias):
        table[:] = 0.0
    model.item_bias[:len(hits)] = 100.0 - np.arange(len(hits))
    assert system.store.publish_model(model.to_bytes()) == 1
    # Users first take the top of their list (hits after their first event), then, from
    # ``change`` on, items their lists never show. One event per user per round, each
    # applied before the next: a hit is judged on the list the app could read by then.
    users = [f"u{k}" for k in range(40)]
    base = int(time.time() * 1000) - 3_600_000
    change = base + 1_000_000
    rounds = [[Event(u, hits[k], "click", base + 100 * k + j, "books")
               for j, u in enumerate(users)] for k in range(12)]
    # Enough rounds for the drop to be flagged and then confirmed over half a live window.
    rounds += [[Event(u, misses[k], "click", change + 100 * k + j, "books")
                for j, u in enumerate(users)] for k in range(24)]
    consumer = system.start()
    pub = Publisher(kafka_bootstrap)
    for item in hits + misses:  # the whole catalogue is known from the start
        pub.send(system.items, item.encode(),
                 json.dumps(ItemRecord(item, "books", (), base).to_json()).encode())
    for events in rounds:
        for e in events:
            pub.send_event(system.events, e)
        pub.flush()
        system.wait_applied(pub.ends(system.events))

    wait_until(lambda: system.store.aggregation_request() is not None, 10.0,
               "a request for an aggregation", lambda: f"{system.store.heartbeats(system.group)}"
               f"{system.logs()}", procs=[consumer])
    reason = system.store.aggregation_request()
    assert reason is not None and reason.startswith("drift in domain 'books'"), reason
    floor = system.store.training_floor()
    assert floor is not None and change <= floor <= rounds[-1][-1].ts, (floor, change)
    beat = next(iter(system.store.heartbeats(system.group).values()))
    assert beat["live"]["books"]["drifts"] >= 1

    # Until its lists recover, each new version makes it ask for the next.
    system.store.clear_aggregation_request()
    assert system.store.publish_model(model.to_bytes()) == 2
    wait_until(lambda: (system.store.aggregation_request() or "").startswith(
        "recovering from drift"), 30.0, "a request for the next cycle after reloading v2",
        lambda: f"{system.store.aggregation_request()}{system.logs()}", procs=[consumer])
    assert system.terminate(consumer) == 0


# --- one learner: the consumer writes what metarec eval measures ---------------------------


def test_the_consumer_writes_the_lists_metarec_eval_computes(
        make_system: Callable[..., System], kafka_bootstrap: str) -> None:
    """The services and ``metarec eval`` run one learner.

    One stream goes through the consumer (real broker and Redis) with the aggregator's
    cycles in between, and through the evaluation's in-process learner with the same
    settings; both train the same model versions at the same events, fold the same
    partial sums in, and end with the same lists. The consumer takes one record per batch,
    as the evaluation applies one timestamp group (here: one event) at a time.
    """
    from metarec.data.dataset import Dataset
    from metarec.evaluation.online import OnlineMetarec
    from metarec.evaluation.protocol import encode
    from metarec.services.aggregator import Aggregator
    from metarec.training.trainer import MetaTrainer
    from tests.streams import feed

    first, every, tail = 500, 400, 300
    history = 10
    system = make_system(1, METAREC_BATCH_SIZE="1", METAREC_HISTORY_LENGTH=str(history),
                         METAREC_MIN_EVENTS_FOR_MODEL=str(first),
                         METAREC_RETRAIN_EVENTS=str(every))
    rng = np.random.default_rng(5)
    taste = rng.integers(0, 4, 40)
    base = int(time.time() * 1000) - 3_600_000
    events = []
    for k in range(first + every + tail):
        u = int(rng.integers(0, 40))
        item = int(rng.integers(0, 15)) * 4 + int(taste[u])
        kind = "like" if rng.random() < 0.3 else "dislike" if rng.random() < 0.05 else "click"
        events.append(Event(f"u{u}", f"i{item}", kind, base + 7 * k))

    def trainer() -> MetaTrainer:
        return MetaTrainer(dim=8, history_length=history, batch_size=128, min_steps=20,
                           max_steps=20, seed=0)

    settings = system.settings()
    stream = encode(Dataset("same-stream", events))
    # The evaluation's side: every event its own timestamp group.
    offline = OnlineMetarec(stream, settings=settings, trainer=trainer(), seed=settings.seed)
    # The services' side.
    agg = Aggregator(settings, trainer())
    consumer = system.start()
    pub = Publisher(kafka_bootstrap)

    def same_lists(phase: str) -> None:
        differ = []
        for u in sorted({e.user for e in events[:done]}):
            recs = system.recs(u)
            assert recs is not None
            mine = [offline.learner.catalog.item_id(int(j)) for j in offline.states[u].recs]
            if recs["items"] != mine:
                differ.append((u, recs["items"], mine))
        assert not differ, f"{phase}: {len(differ)} lists differ, e.g. {differ[:2]}"

    done = 0
    try:
        for end in (first, first + every, len(events)):
            feed(offline, stream, done, end)
            for e in events[done:end]:
                pub.send_event(system.events, e)
            pub.flush()
            system.wait_applied(pub.ends(system.events))
            agg.ingest(read_records(kafka_bootstrap, system.events, 1, end - done, done))
            done = end
            reason = agg.due()
            if reason is not None:
                version = agg.cycle(reason=reason)
                # The consumer reloads, then refreshes its users' lists while idle.
                seen = {e.user for e in events[:done]}
                wait_until(lambda v=version, seen=seen: all(
                    (system.recs(u) or {}).get("model_version") == v for u in seen), 60.0,
                    f"every list to come from version {version}", system.logs,
                    procs=[consumer])
            same_lists(f"after {done} events")
    finally:
        agg.consumer.close()
        agg.producer.flush(5)
    assert [t["reason"] for t in offline.trainings] == ["first model", "schedule"]
    assert system.store.current_model_version() == 2
    served = MetaModel.from_bytes(system.store.load_model_blob(2))
    assert offline.model is not None
    np.testing.assert_allclose(served.theta0, offline.model.theta0, rtol=1e-5, atol=1e-6,
                               err_msg="the Reptile folds differ")
    np.testing.assert_allclose(served.item_emb, offline.model.item_emb, rtol=1e-5, atol=1e-6)
    assert system.terminate(consumer) == 0
