"""``metarec bench``: the consumer against the bounds of this machine, in one run.

Why one command: a throughput figure means little alone. Next to it this prints what the
parts it is made of can do on the same machine, in the same run, against the same broker
and Redis: the raw bounds (librdkafka consume-and-decode of the benchmark's own records;
Redis executing the very commit script one batch issues, with the same keys and sizes;
numpy scoring and top-K over the catalog), then the consumer end to end as deployed (a
real ``python -m consumer`` process with its atomic commits), produce-to-list freshness
with one and with two consumer processes, Redis memory per user and the consumer's peak
RSS as users grow, and the aggregator's meta-training time and publish-to-reload time.

Everything runs on a Tansu broker the command starts and the Redis of ``METAREC_REDIS_URL``
under a fresh key prefix that is deleted at the end. The events are synthetic (users and
items drawn from power laws, types from ``--mix``) so that catalog size, ``d``, ``K`` and
the batch size can be chosen. It prints a Markdown table and, with ``--json OUT``, writes
every number. Measurements, not assertions: nothing here fails on a slow machine.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from metarec.config import Settings
from metarec.core.events import ItemRecord, decode_event
from metarec.core.model import MetaModel
from metarec.core.neighbors import N_NEIGHBORS
from metarec.core.reptile import PartialSums
from metarec.core.trending import CHANNELS
from metarec.core.user_state import UserState, count_guard
from metarec.local.devservices import create_topics, start_broker
from metarec.services.store import RedisStore

__all__ = ["BenchConfig", "run_bench", "to_markdown"]

PARTITIONS = 4


@dataclass(frozen=True)
class BenchConfig:
    """What to measure with (the command's flags)."""

    items: int = 1682
    dim: int = 32
    top_k: int = 20
    batch_size: int = 5000
    mix: dict[str, float] = field(
        default_factory=lambda: {"click": 0.7, "like": 0.25, "dislike": 0.05}
    )
    quick: bool = False
    rate: float = 5000.0
    seed: int = 0
    big_items: int = 100_000

    @property
    def throughput_events(self) -> int:
        return 60_000 if self.quick else 200_000

    @property
    def freshness_s(self) -> float:
        return 10.0 if self.quick else 30.0

    @property
    def user_counts(self) -> tuple[int, ...]:
        return (1_000,) if self.quick else (10_000, 1_000_000)

    @property
    def big_catalog_events(self) -> int:
        return 20_000 if self.quick else 60_000

    @property
    def big_quality_users(self) -> int:
        """Users of the 100k-item synthetic stream the list quality is compared on."""
        return 500 if self.quick else 3_000

    @property
    def training_windows(self) -> tuple[int, ...]:
        return (100_000,) if self.quick else (100_000, 1_000_000)


# --- the workload ---------------------------------------------------------------------------


def power_law(n: int, exponent: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of ranks ``0..n-1`` with ``P(rank) ∝ (rank + 1)^-exponent``."""
    p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return rng.choice(n, size, p=p / p.sum())


#: Activity and popularity laws: the most active of 50k users makes about 1% of the events
#: (MovieLens 100K's most active user: 0.7%); items are as skewed as MovieLens's.
USER_EXPONENT = 0.7
ITEM_EXPONENT = 1.0


def synthetic_events(
    cfg: BenchConfig, n: int, n_users: int, now_ms: int, rng: np.random.Generator
) -> list[tuple[bytes, bytes]]:
    """``n`` keyed event records: power-law users and items, types by ``cfg.mix``."""
    users = power_law(n_users, USER_EXPONENT, n, rng)
    items = power_law(cfg.items, ITEM_EXPONENT, n, rng)
    types = list(cfg.mix)
    kinds = rng.choice(len(types), n, p=np.asarray(list(cfg.mix.values())) / sum(cfg.mix.values()))
    return [
        (
            f"u{u}".encode(),
            json.dumps({"user": f"u{u}", "item": f"i{i}", "type": types[k], "ts": now_ms}).encode(),
        )
        for u, i, k in zip(users.tolist(), items.tolist(), kinds.tolist(), strict=True)
    ]


def bench_model(cfg: BenchConfig, rng: np.random.Generator) -> MetaModel:
    """A served model over the bench's catalog (random vectors and neighbours): the cost of
    serving does not depend on how well the model was trained."""
    model = MetaModel.initial(cfg.dim, history_length=50)
    n = cfg.items
    model.item_ids = [f"i{j}" for j in range(n)]
    model.item_emb = rng.standard_normal((n, cfg.dim)).astype(np.float32)
    model.item_ctx = rng.standard_normal((n, cfg.dim)).astype(np.float32)
    model.item_bias = np.zeros(n, np.float32)
    model.item_count = np.full(n, 5.0, np.float32)
    model.trend_weights[:] = 0.3
    model.knn_weights[:] = 0.5
    model.knn_index = rng.integers(0, n, (n, N_NEIGHBORS)).astype(np.int32)
    model.knn_weight = rng.random((n, N_NEIGHBORS)).astype(np.float32)
    return model


@dataclass
class Env:
    """The broker, Redis and names one bench run uses."""

    bootstrap: str
    redis_url: str
    client: redis.Redis[bytes]
    run: str
    logs: Path

    def settings(self, name: str, cfg: BenchConfig, **extra: str) -> dict[str, str]:
        env = {
            "METAREC_KAFKA_BOOTSTRAP": self.bootstrap,
            "METAREC_REDIS_URL": self.redis_url,
            "METAREC_KEY_PREFIX": f"bench-{self.run}-{name}:",
            "METAREC_GROUP_ID": f"bench-{self.run}-{name}",
            "METAREC_EVENTS_TOPIC": f"bench-{self.run}-{name}.events",
            "METAREC_ITEMS_TOPIC": f"bench-{self.run}-{name}.items",
            "METAREC_USERS_TOPIC": f"bench-{self.run}-{name}.users",
            "METAREC_DLQ_TOPIC": f"bench-{self.run}-{name}.dlq",
            "METAREC_MODEL_TOPIC": f"bench-{self.run}-{name}.model",
            "METAREC_TOP_K": str(cfg.top_k),
            "METAREC_BATCH_SIZE": str(cfg.batch_size),
            "METAREC_LOG_LEVEL": "INFO",
            "METAREC_STATS_INTERVAL_S": "2",
            "METAREC_EVENT_TYPES": ",".join(
                f"{t}:{w:g}"
                for t, w in {"click": 1, "like": 2, "dislike": -1}.items()
                if t in cfg.mix
            ),
            **extra,
        }
        s = Settings.from_env(env)
        create_topics(
            self.bootstrap,
            {
                s.events_topic: PARTITIONS,
                s.items_topic: 1,
                s.users_topic: 1,
                s.dlq_topic: 1,
                s.model_topic: 1,
            },
        )
        return env

    def store(self, env: dict[str, str]) -> RedisStore:
        return RedisStore(self.client, env["METAREC_KEY_PREFIX"])

    def consumer(self, env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("METAREC_")}
        full.update(env)
        with (self.logs / log).open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "consumer"], env=full, stdout=out, stderr=subprocess.STDOUT
            )


def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]], rate: float | None = None
) -> float:
    """Send keyed records (paced at ``rate`` per second in 10 ms steps); seconds taken."""
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": "5",
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": "2000000",
        }
    )
    started = time.perf_counter()
    step = max(1, int((rate or 1e9) / 100))
    for i in range(0, len(records), step):
        for key, value in records[i : i + step]:
            p.produce(topic, value=value, key=key)
        p.poll(0)
        if rate:
            due = started + (i + step) / rate
            while time.perf_counter() < due:
                p.poll(0.002)
    p.flush(120)
    return time.perf_counter() - started


def applied(store: RedisStore, topic: str) -> int:
    return sum(v or 0 for v in store.offsets(topic, list(range(PARTITIONS))).values())


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- the bounds -------------------------------------------------------------------------------


def kafka_bound(env: Env, cfg: BenchConfig, records: list[tuple[bytes, bytes]]) -> float:
    """Records/s one process consumes and decodes (the consumer's own settings' batch)."""
    topic = f"bench-{env.run}-bound.events"
    create_topics(env.bootstrap, {topic: PARTITIONS})
    produce(env.bootstrap, topic, records)
    c = Consumer(
        {
            "bootstrap.servers": env.bootstrap,
            "group.id": f"bench-{env.run}-bound",
            "enable.auto.commit": "false",
            "fetch.wait.max.ms": "20",
            "queued.max.messages.kbytes": "16384",
        }
    )
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    got, started = 0, None
    types = {"click": 1.0, "like": 2.0, "dislike": -1.0}
    deadline = time.monotonic() + 120
    while got < len(records) and time.monotonic() < deadline:
        batch = c.consume(cfg.batch_size, 0.5)
        if started is None and batch:
            started = time.perf_counter()
        for msg in batch:
            if msg.error() is None:
                decode_event(msg.value() or b"", event_types=types)
                got += 1
    elapsed = time.perf_counter() - (started or time.perf_counter())
    c.close()
    return got / elapsed if elapsed > 0 else float("nan")


def redis_bound(env: Env, cfg: BenchConfig, rng: np.random.Generator, repeat: int) -> float:
    """Events/s of the commit script alone: one batch's states, lists, guards, trending
    counts and partial sums, as the consumer sends them (users as distinct as in a batch
    of a long-tailed stream: one per event)."""
    return commit_rate(RedisStore(env.client, f"bench-{env.run}-redis:"), cfg, rng, repeat)


def commit_rate(
    store: RedisStore, cfg: BenchConfig, rng: np.random.Generator, repeat: int
) -> float:
    """:func:`redis_bound` on any store (a Redis Cluster's too)."""
    n = cfg.batch_size // PARTITIONS
    states: dict[str, bytes] = {}
    for u in range(n):
        st = UserState.new(cfg.dim, 50)
        for k in range(50):
            st.record(int(rng.integers(cfg.items)), 1.0, 1_700_000_000_000 + k, "default")
        st.recs = rng.integers(0, cfg.items, cfg.top_k)
        states[f"u{u}"] = st.to_bytes()
    recs = {
        u: json.dumps(
            {
                "user": u,
                "items": [f"i{int(i)}" for i in rng.integers(0, cfg.items, cfg.top_k)],
                "scores": [round(float(x), 5) for x in rng.standard_normal(cfg.top_k)],
                "model_version": 1,
                "events": 50,
                "updated_ms": 1_700_000_000_000,
            }
        ).encode()
        for u in states
    }
    partials = PartialSums.zeros(1, cfg.dim)
    partials.add(np.zeros(n, np.int64), rng.standard_normal((n, cfg.dim)), np.ones(n))
    trending = [{int(i): 1.0 for i in rng.integers(0, cfg.items, n)} for _ in CHANNELS]
    offset: int | None = None
    guards: dict[str, bytes] = {u: b"" for u in states}
    timings = []
    for r in range(repeat):
        started = time.perf_counter()
        store.commit_batch(
            "bench",
            0,
            offset,
            (r + 1) * n,
            states=states,
            recs=recs,
            recs_ttl_s=0,
            partials=partials,
            events=n,
            trending=trending,
            channels=CHANNELS,
            guards=guards,
        )
        timings.append(time.perf_counter() - started)
        offset = (r + 1) * n
        guards = {u: count_guard(UserState.from_bytes(b)) for u, b in states.items()}
    return n / float(np.median(timings))


def scoring_bound(cfg: BenchConfig, rng: np.random.Generator, repeat: int) -> float:
    """Events/s of scoring the whole catalog for a batch and taking each top-K."""
    users = rng.standard_normal((cfg.batch_size, cfg.dim)).astype(np.float32)
    items = rng.standard_normal((cfg.items, cfg.dim)).astype(np.float32)
    chunk = 1024
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        for lo in range(0, cfg.batch_size, chunk):
            scores = users[lo : lo + chunk] @ items.T
            np.argpartition(-scores, cfg.top_k, axis=1)[:, : cfg.top_k]
        timings.append(time.perf_counter() - started)
    return cfg.batch_size / float(np.median(timings))


# --- the consumer ------------------------------------------------------------------------------


def end_to_end(
    env: Env,
    cfg: BenchConfig,
    records: list[tuple[bytes, bytes]],
    model: bytes,
    name: str = "e2e",
    catalog: int = 0,
) -> dict[str, float]:
    """A consumer process drains a filled topic: sustained events/s and its peak RSS.

    ``catalog`` items ``i0 ..`` are registered first, as an items topic would have done
    (otherwise the catalogue is the items the events name).
    """
    settings = env.settings(name, cfg)
    store = env.store(settings)
    for lo in range(0, catalog, 10_000):
        store.describe_items([ItemRecord(f"i{j}") for j in range(lo, min(lo + 10_000, catalog))])
    store.publish_model(model)
    produce(env.bootstrap, settings["METAREC_EVENTS_TOPIC"], records)
    proc = env.consumer(settings, f"{name}.log")
    topic = settings["METAREC_EVENTS_TOPIC"]
    try:
        while applied(store, topic) == 0:
            _alive(proc, env.logs / f"{name}.log")
            time.sleep(0.02)
        t0, n0 = time.perf_counter(), applied(store, topic)
        while (n := applied(store, topic)) < len(records):
            _alive(proc, env.logs / f"{name}.log")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        return {"events_per_s": (n - n0) / elapsed, "peak_rss_mib": peak_rss_mib(proc.pid)}
    finally:
        stop(proc)


def big_catalog(env: Env, cfg: BenchConfig, rng: np.random.Generator) -> dict[str, float]:
    """The consumer end to end on a catalogue of ``cfg.big_items`` (candidate scoring)."""
    big = dataclasses.replace(cfg, items=cfg.big_items)
    model = bench_model(big, rng).to_bytes()
    records = synthetic_events(big, cfg.big_catalog_events, 50_000, int(time.time() * 1000), rng)
    return end_to_end(env, big, records, model, name="big", catalog=big.items)


def big_catalog_quality(cfg: BenchConfig) -> dict[str, Any]:
    """HR@10 of metarec's lists on a 100k-item synthetic stream, scored on candidates
    (``exact_max_items`` 0) and exactly (above the catalogue): the same prequential run as
    ``metarec eval``, seed 0."""
    from metarec.data.registry import SYNTHETIC_SPECS
    from metarec.data.synthetic import generate
    from metarec.evaluation.online import metarec_factory
    from metarec.evaluation.protocol import evaluate

    config = dataclasses.replace(
        SYNTHETIC_SPECS["synthetic-100k-items"],
        n_users=cfg.big_quality_users,
        n_items=cfg.big_items,
    )
    dataset = generate(config, seed=0)
    # Candidates on every list (the catalogue that has appeared in the stream grows past
    # the default threshold only late), against every list scored exactly.
    defaults = Settings.defaults()
    candidates = dataclasses.replace(defaults, exact_max_items=0)
    exact = dataclasses.replace(defaults, exact_max_items=cfg.big_items + 1)
    methods = {
        "candidates": functools.partial(metarec_factory, settings=candidates),
        "exact": functools.partial(metarec_factory, settings=exact),
    }
    started = time.perf_counter()
    report = evaluate(dataset, methods, [0], progress=False, workers=min(2, os.cpu_count() or 1))
    res = report.results
    hr = {name: res[name].buckets["all"].hr for name in methods}
    return {
        "users": config.n_users,
        "events": report.n_events,
        "hr10_candidates": hr["candidates"],
        "hr10_exact": hr["exact"],
        "seconds": {name: res[name].wall_time_s[0] for name in methods},
        "wall_s": time.perf_counter() - started,
    }


def freshness(
    env: Env, cfg: BenchConfig, consumers: int, model: bytes, rng: np.random.Generator
) -> dict[str, float]:
    """Produce-to-list times at ``cfg.rate`` offered, from the consumers' own samples."""
    settings = env.settings(f"fresh{consumers}", cfg, METAREC_BATCH_SIZE="500")
    store = env.store(settings)
    store.publish_model(model)
    procs = [env.consumer(settings, f"fresh{consumers}-{i}.log") for i in range(consumers)]
    topic = settings["METAREC_EVENTS_TOPIC"]
    try:
        deadline = time.monotonic() + 60
        while len(store.heartbeats(settings["METAREC_GROUP_ID"])) < consumers or not all(
            b.get("partitions") for b in store.heartbeats(settings["METAREC_GROUP_ID"]).values()
        ):
            for i, p in enumerate(procs):
                _alive(p, env.logs / f"fresh{consumers}-{i}.log")
            if time.monotonic() > deadline:
                raise RuntimeError("the consumers did not get their partitions in 60 s")
            time.sleep(0.2)
        n = int(cfg.rate * cfg.freshness_s)
        records = synthetic_events(cfg, n, 20_000, int(time.time() * 1000), rng)
        # Stamped as they are sent: freshness is measured from the Kafka record timestamp.
        took = produce(env.bootstrap, topic, records, rate=cfg.rate)
        end = time.monotonic() + 60
        while applied(store, topic) < n and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(2.5)  # one more stats window
    finally:
        for p in procs:
            stop(p)
    windows = []
    for i in range(consumers):
        for line in (env.logs / f"fresh{consumers}-{i}.log").read_text().splitlines():
            if '"stats"' in line:
                stats = json.loads(line).get("stats") or {}
                if stats.get("events") and stats.get("freshness_ms_p50") is not None:
                    windows.append(stats)
    return {
        "offered_per_s": n / took,
        "p50_ms": float(np.median([w["freshness_ms_p50"] for w in windows])),
        "p99_ms": float(max(w["freshness_ms_p99"] for w in windows)),
        "max_ms": float(max(w.get("freshness_ms_max", w["freshness_ms_p99"]) for w in windows)),
    }


def user_times(
    users: npt.NDArray[np.int64], now_ms: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Event times (ms) for a stream of ``users``, rising per user and ending by ``now_ms``:
    clicks 1 s to 2 min apart within a session, 80% of gaps; sessions 1 h to 14 days
    apart, the rest. State size depends on these gaps (they are stored as varints), so
    the memory phase does not give every event the same time."""
    in_session = rng.random(users.size) < 0.8
    gaps = np.where(
        in_session,
        rng.integers(1_000, 120_000, users.size),
        rng.integers(3_600_000, 14 * 86_400_000, users.size),
    )
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    # Per user: time before now = the sum of the gaps after each event.
    after = np.cumsum(gaps[order][::-1])[::-1]
    last_of_user = np.r_[sorted_users[1:] != sorted_users[:-1], True]
    tail = np.minimum.accumulate(np.where(last_of_user, np.arange(users.size), users.size)[::-1])[
        ::-1
    ]
    before_now = after - after[tail]
    out = np.empty(users.size, np.int64)
    out[order] = now_ms - before_now
    return out


def memory(
    env: Env, cfg: BenchConfig, n_users: int, model: bytes, rng: np.random.Generator
) -> dict[str, float]:
    """Peak consumer RSS with ``n_users`` distinct users, and Redis bytes per user
    (``MEMORY USAGE`` of their state and list, averaged over a sample)."""
    settings = env.settings(f"users{n_users}", cfg, METAREC_BATCH_SIZE="500")
    store = env.store(settings)
    store.publish_model(model)
    per_user = max(1, min(50, 1_000_000 // n_users))  # histories as long as a budget allows
    now = int(time.time() * 1000)
    users = np.repeat(np.arange(n_users), per_user)
    rng.shuffle(users)
    items = rng.integers(0, cfg.items, users.size)
    types = list(cfg.mix)
    kinds = rng.choice(
        len(types), users.size, p=np.asarray(list(cfg.mix.values())) / sum(cfg.mix.values())
    )
    ts = user_times(users, now, rng)
    records = [
        (
            f"m{u}".encode(),
            json.dumps({"user": f"m{u}", "item": f"i{i}", "type": types[k], "ts": t}).encode(),
        )
        for u, i, k, t in zip(
            users.tolist(), items.tolist(), kinds.tolist(), ts.tolist(), strict=True
        )
    ]
    topic = settings["METAREC_EVENTS_TOPIC"]
    produce(env.bootstrap, topic, records)
    proc = env.consumer(settings, f"users{n_users}.log")
    try:
        while applied(store, topic) < len(records):
            _alive(proc, env.logs / f"users{n_users}.log")
            time.sleep(0.2)
        rss = peak_rss_mib(proc.pid)
    finally:
        stop(proc)
    sample = rng.choice(n_users, min(n_users, 2000), replace=False)
    sizes = [
        int(env.client.memory_usage(store.key("user", f"m{u}")) or 0)
        + int(env.client.memory_usage(store.recs_key(f"m{u}")) or 0)
        for u in sample.tolist()
    ]
    return {
        "users": n_users,
        "events_per_user": per_user,
        "peak_rss_mib": rss,
        "redis_bytes_per_user": float(np.mean(sizes)),
    }


def training(cfg: BenchConfig, n_events: int, rng: np.random.Generator) -> dict[str, Any]:
    """Seconds of one meta-training from scratch over a window of ``n_events``."""
    from metarec.core.window import EventWindow
    from metarec.training.trainer import MetaTrainer

    window = EventWindow(n_events)
    n_users = max(1000, n_events // 50)
    users = power_law(n_users, USER_EXPONENT, n_events, rng)
    items = power_law(cfg.items, ITEM_EXPONENT, n_events, rng)
    for k, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True)):
        window.append(f"u{u}", f"i{i}", 1_700_000_000_000 + k, 1.0, "default")
    data = window.training_data()
    started = time.perf_counter()
    model = MetaTrainer(dim=cfg.dim).fit(data)
    return {
        "events": n_events,
        "seconds": time.perf_counter() - started,
        "steps": model.info.get("steps"),
        "device": model.info.get("device"),
    }


def reload_time(env: Env, cfg: BenchConfig, model: bytes, repeat: int = 5) -> dict[str, float]:
    """Seconds from publishing a model version to a running consumer serving it (median
    and max over ``repeat`` publishes)."""
    settings = env.settings("reload", cfg)
    store = env.store(settings)
    store.publish_model(model)
    proc = env.consumer(settings, "reload.log")
    group = settings["METAREC_GROUP_ID"]
    log = env.logs / "reload.log"
    times = []
    try:
        while not store.heartbeats(group):
            _alive(proc, log)
            time.sleep(0.1)
        for _ in range(repeat):
            started = time.perf_counter()
            version = store.publish_model(model)
            while f'"version": {version}' not in log.read_text():
                _alive(proc, log)
                time.sleep(0.005)
            times.append(time.perf_counter() - started)
        return {"median_s": float(np.median(times)), "max_s": max(times)}
    finally:
        stop(proc)


def _alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is not None:
        raise RuntimeError(
            f"consumer exited with {proc.returncode}; end of {log}:\n" + log.read_text()[-3000:]
        )


# --- the run -----------------------------------------------------------------------------------


@contextmanager
def bench_env(redis_url: str) -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="metarec-bench-") as tmp:
        work = Path(tmp)
        broker = start_broker(None, work_dir=work, log_file=work / "tansu.log")
        client: redis.Redis[bytes] = redis.Redis.from_url(redis_url)
        env = Env(broker.bootstrap, redis_url, client, uuid.uuid4().hex[:6], work)
        try:
            yield env
        finally:
            broker.stop()
            keys = client.scan_iter(match=f"bench-{env.run}-*", count=10_000)
            while chunk := list(itertools.islice(keys, 10_000)):
                client.unlink(*chunk)  # a million users' keys: one call per 10,000


def run_bench(
    cfg: BenchConfig, redis_url: str, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Every measurement of the module docstring; returns them as one JSON-ready dict."""
    rng = np.random.default_rng(cfg.seed)
    out: dict[str, Any] = {
        "config": {
            "items": cfg.items,
            "dim": cfg.dim,
            "top_k": cfg.top_k,
            "batch_size": cfg.batch_size,
            "mix": cfg.mix,
            "quick": cfg.quick,
            "partitions": PARTITIONS,
            "big_items": cfg.big_items,
        }
    }
    model = bench_model(cfg, rng).to_bytes()
    with bench_env(redis_url) as env:
        records = synthetic_events(cfg, cfg.throughput_events, 50_000, int(time.time() * 1000), rng)
        progress("bound: Kafka consume and decode")
        bounds = {"kafka_consume_decode": kafka_bound(env, cfg, records)}
        progress("bound: Redis commit script")
        bounds["redis_commit"] = redis_bound(env, cfg, rng, repeat=5 if cfg.quick else 20)
        progress("bound: numpy scoring and top-K")
        bounds["numpy_score_topk"] = scoring_bound(cfg, rng, repeat=5 if cfg.quick else 20)
        out["bounds_per_s"] = bounds
        out["bound_name"] = min(bounds, key=bounds.__getitem__)
        out["smallest_bound_per_s"] = bounds[out["bound_name"]]
        progress("consumer end to end")
        e2e = end_to_end(env, cfg, records, model)
        out["events_per_s"] = e2e["events_per_s"]
        out["e2e_peak_rss_mib"] = e2e["peak_rss_mib"]
        out["ratio_to_smallest_bound"] = e2e["events_per_s"] / out["smallest_bound_per_s"]
        progress(f"consumer end to end, {cfg.big_items:,} items")
        out["big_catalog"] = big_catalog(env, cfg, rng)
        out["big_catalog_events_per_s"] = out["big_catalog"]["events_per_s"]
        for n in (1, 2):
            progress(f"freshness with {n} consumer(s) at {cfg.rate:,.0f}/s")
            out[f"freshness_{n}_consumers"] = freshness(env, cfg, n, model, rng)
        out["freshness_p99_ms"] = out["freshness_2_consumers"]["p99_ms"]
        out["memory"] = []
        for n_users in cfg.user_counts:
            progress(f"memory with {n_users:,} users")
            out["memory"].append(memory(env, cfg, n_users, model, rng))
        out["redis_bytes_per_user"] = out["memory"][0]["redis_bytes_per_user"]
        for m in out["memory"]:
            label = (
                "10k"
                if m["users"] == 10_000
                else "1m"
                if m["users"] == 1_000_000
                else str(m["users"])
            )
            out[f"rss_mib_{label}_users"] = m["peak_rss_mib"]
        progress("publish-to-reload")
        out["reload"] = reload_time(env, cfg, model)
        out["reload_s"] = out["reload"]["median_s"]
    progress(f"list quality, {cfg.big_items:,} items: candidates and exact")
    out["big_catalog_quality"] = q = big_catalog_quality(cfg)
    out["big_catalog_hr_ratio"] = (
        q["hr10_candidates"] / q["hr10_exact"] if q["hr10_exact"] else None
    )
    out["training"] = []
    for n_events in cfg.training_windows:
        progress(f"meta-training over {n_events:,} events")
        out["training"].append(training(cfg, n_events, rng))
    return out


def to_markdown(r: dict[str, Any]) -> str:
    """The run as one Markdown table (what, measured, against what)."""
    b = r["bounds_per_s"]
    c = r["config"]
    rows = [
        ("bound: Kafka consume + decode (1 process)", f"{b['kafka_consume_decode']:,.0f} ev/s", ""),
        ("bound: Redis commit script, one batch", f"{b['redis_commit']:,.0f} ev/s", ""),
        ("bound: numpy score + top-K", f"{b['numpy_score_topk']:,.0f} ev/s", ""),
        (
            "consumer end to end (1 process)",
            f"{r['events_per_s']:,.0f} ev/s",
            f"{r['ratio_to_smallest_bound']:.2f} of the smallest bound ({r['bound_name']})",
        ),
    ]
    q = r["big_catalog_quality"]
    rows += [
        (
            f"consumer end to end, {c.get('big_items', 100_000):,} items (candidates)",
            f"{r['big_catalog_events_per_s']:,.0f} ev/s",
            "",
        ),
        (
            f"HR@10, {c.get('big_items', 100_000):,}-item synthetic stream "
            f"({q['users']:,} users, {q['events']:,} events)",
            f"candidates {q['hr10_candidates']:.4f}, exact {q['hr10_exact']:.4f}",
            f"ratio {r['big_catalog_hr_ratio']:.3f}" if r["big_catalog_hr_ratio"] else "",
        ),
    ]
    for n in (1, 2):
        f = r[f"freshness_{n}_consumers"]
        rows.append(
            (
                f"freshness, {n} consumer(s), {f['offered_per_s']:,.0f} ev/s offered",
                f"p50 {f['p50_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms, max {f['max_ms']:.0f} ms",
                "",
            )
        )
    for m in r["memory"]:
        rows.append(
            (
                f"{m['users']:,} users × {m['events_per_user']} events",
                f"{m['redis_bytes_per_user']:,.0f} B/user in Redis, consumer peak RSS "
                f"{m['peak_rss_mib']:.0f} MiB",
                "",
            )
        )
    reload = r.get("reload", {"median_s": r["reload_s"], "max_s": r["reload_s"]})
    rows.append(
        (
            "publish-to-reload of a model version",
            f"median {reload['median_s'] * 1000:.0f} ms, max {reload['max_s'] * 1000:.0f} ms",
            "",
        )
    )
    for t in r["training"]:
        rows.append(
            (
                f"meta-training over {t['events']:,} events",
                f"{t['seconds']:.1f} s ({t['steps']} steps, {t['device']})",
                "",
            )
        )
    head = (
        f"catalog {c['items']:,} items, d={c['dim']}, K={c['top_k']}, batch "
        f"{c['batch_size']:,}, {c['partitions']} partitions"
        f"{', quick' if c['quick'] else ''}\n\n"
    )
    lines = ["| measure | result | note |", "|---|---|---|"]
    lines += [f"| {a} | {b_} | {n} |" for a, b_, n in rows]
    return head + "\n".join(lines) + "\n"
