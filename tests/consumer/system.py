"""The consumer service as a system under test: real Tansu, real Redis, real processes.

Why processes: what the consumer promises (an event applied exactly once whatever happens to
the process, fencing of a member that lost its partitions, hot reload without a restart)
only shows when a process can be SIGKILLed half-way, a group can rebalance and a model can
change under it. Each test gets its own topics, consumer group and Redis key prefix
(:class:`System`, from the :func:`make_system` fixture), and every consumer it starts is
killed when it ends.

Every wait is a bounded poll (:func:`wait_until`) whose failure message says what was
awaited, what was seen last, and the tail of the consumers' logs. The tests live beside
this module, one file per behaviour.
"""

from __future__ import annotations

import json
import os
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

from metarec.config import Settings
from metarec.core.events import Event
from metarec.core.model import MetaModel
from metarec.core.user_state import UserState
from metarec.data.registry import load_dataset
from metarec.services.store import RedisStore

REPO = Path(__file__).resolve().parents[2]
RECS_KEYS = {"schema_version", "user", "items", "scores", "model_version", "events", "updated_ms"}
#: Group timings for the crash test: Tansu evicts a SIGKILLed member after its session
#: timeout plus one join window (docs/LOCAL_SERVICES.md), 6 s + 3 s with the defaults;
#: 2 s + 1 s keeps five crashes within the test's time budget.
FAST_GROUP = {
    "METAREC_KAFKA_SESSION_TIMEOUT_MS": "2000",
    "METAREC_KAFKA_HEARTBEAT_INTERVAL_MS": "200",
}
#: Longest wait for consumers to apply everything published (rebalances included).
CATCH_UP_S = 90.0
LOG_TAIL_LINES = 15


# --- waiting ---------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    seen: Callable[[], object] | None = None,
    interval: float = 0.2,
    procs: Sequence[subprocess.Popen[bytes]] = (),
) -> None:
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
            why = (
                f"pid {dead[0].pid} exited with {dead[0].returncode}"
                if dead
                else f"timed out after {timeout:g}s"
            )
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
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": "true",
                "partitioner": "murmur2_random",
                "linger.ms": "5",
                **config,
            }
        )
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
            self.delivered.append(
                Delivery(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())
            )

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
        pub.send_event(
            topic,
            Event(
                event.user,
                event.item,
                event.type,
                int(time.time() * 1000),
                event.domain,
                event.event_id,
            ),
        )
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
        env.update(
            {
                "METAREC_KAFKA_BOOTSTRAP": self.bootstrap,
                "METAREC_REDIS_URL": self.redis_url,
                "METAREC_KEY_PREFIX": self.prefix,
                "METAREC_GROUP_ID": self.group,
                "METAREC_AGGREGATOR_GROUP_ID": f"{self.group}-aggregator",
                "METAREC_EVENTS_TOPIC": self.events,
                "METAREC_ITEMS_TOPIC": self.items,
                "METAREC_USERS_TOPIC": self.users,
                "METAREC_DLQ_TOPIC": self.dlq,
                "METAREC_MODEL_TOPIC": self.model,
                "METAREC_STATS_INTERVAL_S": "1",
                "METAREC_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
                **extra,
            }
        )
        return env

    def settings(self, **extra: str) -> Settings:
        return Settings.from_env(
            {k: v for k, v in self.env(**extra).items() if k.startswith("METAREC_")}
        )

    # -- processes --

    def start(
        self,
        argv: Sequence[str] = ("-m", "consumer"),
        **extra: str,
    ) -> subprocess.Popen[bytes]:
        """Start ``python argv`` (a consumer by default) with this system's settings."""
        log = (self.log_dir / f"proc-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, *argv],
            env=self.env(**extra),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
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
            pytest.fail(f"pid {proc.pid} did not exit within {timeout}s of SIGTERM{self.logs()}")

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

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything ``proc`` (started by :meth:`start`) has logged so far."""
        return (self.log_dir / f"proc-{self.procs.index(proc)}.log").read_text(errors="replace")

    def warnings(self, limit: int = 30) -> str:
        """The processes' first WARNING and ERROR lines (dead letters with their reasons,
        conflicts, fencing), which say why a count is off."""
        found: list[str] = []
        for path in sorted(self.log_dir.glob("proc-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if '"level": "WARNING"' in line or '"level": "ERROR"' in line:
                    found.append(f"{path.name}: {line[:400]}")
        return "\n".join(found[:limit])

    # -- state --

    def offsets(self) -> dict[int, int | None]:
        return self.store.offsets(self.events, list(range(self.partitions)))

    def applied(self) -> int:
        return sum(v or 0 for v in self.offsets().values())

    def wait_applied(self, ends: Mapping[int, int], timeout: float = CATCH_UP_S) -> None:
        """Wait until every partition's stored offset is its end (all events applied)."""
        want = {p: ends.get(p, 0) or None for p in range(self.partitions)}
        running = [p for p in self.procs if p.poll() is None]
        wait_until(
            lambda: self.offsets() == want,
            timeout,
            f"stored offsets {want}",
            lambda: f"{self.offsets()}{self.logs()}",
            procs=running,
        )

    def state(self, user: str) -> UserState | None:
        raw = self.store.client.get(self.store.key("user", user))
        return None if raw is None else UserState.from_bytes(raw)

    def recs(self, user: str) -> dict[str, Any] | None:
        raw = self.store.client.get(self.store.recs_key(user))  # what an app does: one GET
        return None if raw is None else dict(json.loads(raw))

    def heartbeat_partitions(
        self, procs: Sequence[subprocess.Popen[bytes]]
    ) -> dict[int, list[int]]:
        """The partitions each of ``procs`` reported in its last stats heartbeat."""
        beats = self.store.heartbeats(self.group)
        out: dict[int, list[int]] = {}
        for proc in procs:
            beat = next((b for m, b in beats.items() if m.endswith(f"-{proc.pid}")), None)
            out[proc.pid] = [] if beat is None else list(beat["partitions"])
        return out


@pytest.fixture
def make_system(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis[bytes],
    key_prefix: str,
    make_topic: Callable[..., str],
    make_group_id: Callable[[], str],
    tmp_path: Path,
) -> Iterator[Callable[..., System]]:
    """Factory: ``make_system(partitions, **env)``; its processes die with the test."""
    made: list[System] = []

    def make(partitions: int, **extra_env: str) -> System:
        log_dir = tmp_path / f"system-{len(made)}"
        log_dir.mkdir()
        system = System(
            bootstrap=kafka_bootstrap,
            redis_url=redis_url,
            prefix=f"{key_prefix}{len(made)}:",
            group=make_group_id(),
            events=make_topic(partitions),
            items=make_topic(1),
            users=make_topic(1),
            dlq=make_topic(1),
            model=make_topic(1),
            partitions=partitions,
            store=RedisStore(redis_client, f"{key_prefix}{len(made)}:"),
            log_dir=log_dir,
            extra_env=dict(extra_env),
        )
        made.append(system)
        return system

    try:
        yield make
    finally:
        for system in made:
            system.close()


# --- checks --------------------------------------------------------------------------------


def check_list(
    system: System,
    user: str,
    *,
    events: int,
    catalog: set[str],
    consumed: set[str],
    top_k: int,
    model_version: int | None = None,
) -> None:
    """``recs:{user}`` follows the list contract exactly."""
    recs = system.recs(user)
    assert recs is not None, f"no list for user {user!r}"
    # One domain in the catalogue: "domain" names it; more: "domains" holds each one's list.
    assert set(recs) - RECS_KEYS in ({"domain"}, {"domains"}), (
        f"keys of recs:{user}: {sorted(recs)}"
    )
    assert set(recs) >= RECS_KEYS, f"keys of recs:{user}: {sorted(recs)}"
    for name, shelf in recs.get("domains", {}).items():
        assert set(shelf) == {"items", "scores"}, (name, shelf)
        assert len(shelf["items"]) == len(shelf["scores"]) <= top_k, (name, shelf)
        assert set(shelf["items"]) <= catalog and not set(shelf["items"]) & consumed, shelf
        assert shelf["scores"] == sorted(shelf["scores"], reverse=True), shelf
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
    assert not wrong, (
        f"(applied, published) differ for {len(wrong)} users: {dict(list(wrong.items())[:10])}"
        f"; the processes' warnings:\n{system.warnings()}"
    )


def make_model(
    items: Sequence[str], domains: Sequence[str], *, dim: int = 8, seed: int = 0
) -> MetaModel:
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


def consume_at_least(consumer: Consumer, n: int, timeout: float = 20.0) -> list[Any]:
    """At least ``n`` records from ``consumer`` (errors and EOF events left out)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"got {len(got)} of {n} records in {timeout}s"
        got += [m for m in consumer.consume(n - len(got), 0.5) if m.error() is None]
    return got


def owned(system: System, procs: Sequence[subprocess.Popen[bytes]]) -> list[int]:
    """Every partition the ``procs`` report owning, with repeats (sorted)."""
    return sorted(p for parts in system.heartbeat_partitions(procs).values() for p in parts)


def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 30.0) -> list[Any]:
    """The first ``n`` records of a one-partition topic."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-reader",
            "enable.auto.commit": "false",
        }
    )
    try:
        reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        return consume_at_least(reader, n, timeout)
    finally:
        reader.close()
