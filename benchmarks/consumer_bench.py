"""End-to-end consumer benchmark: real broker, real Redis, one consumer process.

Measures, on this machine, with ml-100k events (1,682 items, K=20) and a trained model:

1. sustained events/s: the topic is filled first, then one consumer drains it;
2. produce-to-list latency p50/p99 at an offered 2,000 events/s (the consumer's own
   freshness samples: Kafka record timestamp → the moment the user's list was written);
3. the consumer's peak RSS with 10k and with 1M distinct synthetic users;
4. Redis memory per user (state + list), from INFO memory before and after.

Usage: ``python benchmarks/consumer_bench.py [--phases throughput,latency,users]``.
Prints measured numbers; asserts nothing. Uses Redis database 15 (flushed before and after)
and a broker it starts itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import redis

from metarec.config import Settings
from metarec.data.registry import load_dataset
from metarec.evaluation.online import OnlineMetarec
from metarec.evaluation.protocol import encode
from metarec.evaluation.recommender import Interaction
from metarec.local.bench import produce
from metarec.local.devservices import create_topics, start_broker
from metarec.services.store import RedisStore

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens" / "ml-100k"
REDIS_URL = "redis://127.0.0.1:6379/15"
PARTITIONS = 4
LATENCY_ENV = json.loads(os.environ.get("BENCH_LATENCY_ENV", "{}"))


def _env(bootstrap: str, run: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAREC_")}
    env.update(
        {
            "METAREC_KAFKA_BOOTSTRAP": bootstrap,
            "METAREC_REDIS_URL": REDIS_URL,
            "METAREC_KEY_PREFIX": f"bench-{run}:",
            "METAREC_GROUP_ID": f"bench-{run}",
            "METAREC_EVENTS_TOPIC": f"bench-{run}.events",
            "METAREC_ITEMS_TOPIC": f"bench-{run}.items",
            "METAREC_USERS_TOPIC": f"bench-{run}.users",
            "METAREC_DLQ_TOPIC": f"bench-{run}.dlq",
            "METAREC_TOP_K": "20",
            "METAREC_LOG_LEVEL": "WARNING",
            **extra,
        }
    )
    return env


def _topics(bootstrap: str, env: dict[str, str]) -> Settings:
    s = Settings.from_env(env)
    create_topics(
        bootstrap, {s.events_topic: PARTITIONS, s.items_topic: 1, s.users_topic: 1, s.dlq_topic: 1}
    )
    return s


def _event_records(events: list[Any], now_ms: int | None = None) -> list[tuple[bytes, bytes]]:
    out = []
    for e in events:
        value = {
            "user": e.user,
            "item": e.item,
            "type": e.type,
            "ts": now_ms if now_ms is not None else e.ts,
        }
        out.append((e.user.encode(), json.dumps(value).encode()))
    return out


def _applied(store: RedisStore, topic: str) -> int:
    return sum(v or 0 for v in store.offsets(topic, list(range(PARTITIONS))).values())


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start_consumer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "consumer"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def _publish_model(store: RedisStore) -> None:
    """A model trained on the first half of ml-100k, as the aggregator would publish it."""
    ds = load_dataset(str(ML100K))
    stream = encode(ds)
    settings = Settings.defaults().replace(min_events_for_model=50_000, retrain_events=10**9)
    rec = OnlineMetarec(stream, settings=settings)
    for t in range(50_000):
        rec.learn_one(
            Interaction(
                int(stream.users[t]),
                int(stream.items[t]),
                int(stream.ts[t]),
                0,
                float(stream.weights[t]),
            )
        )
    assert rec.model is not None
    store.publish_model(rec.model.to_bytes())


def throughput(bootstrap: str, r: redis.Redis[bytes], logs: Path) -> None:
    run = uuid.uuid4().hex[:6]
    env = _env(bootstrap, run, METAREC_BATCH_SIZE="5000")
    s = _topics(bootstrap, env)
    store = RedisStore(r, s.key_prefix)
    _publish_model(store)
    events = load_dataset(str(ML100K)).events
    produce(bootstrap, s.events_topic, _event_records(events))
    proc = _start_consumer(env, logs / "throughput.log")
    try:
        while _applied(store, s.events_topic) == 0:
            time.sleep(0.05)
        t0, n0 = time.perf_counter(), _applied(store, s.events_topic)
        while (n := _applied(store, s.events_topic)) < len(events):
            time.sleep(0.05)
            if proc.poll() is not None:
                raise SystemExit(f"consumer died; see {logs / 'throughput.log'}")
        elapsed = time.perf_counter() - t0
        print(
            f"throughput: {n - n0:,} events in {elapsed:.1f} s = "
            f"{(n - n0) / elapsed:,.0f} events/s sustained (1 consumer, batch 5000, "
            f"ml-100k, {PARTITIONS} partitions, K=20, model with {1682} items); "
            f"peak RSS {_peak_rss_mb(proc.pid):.0f} MiB"
        )
    finally:
        proc.terminate()
        proc.wait(30)


def latency(bootstrap: str, r: redis.Redis[bytes], logs: Path, rate: float, seconds: float) -> None:
    run = uuid.uuid4().hex[:6]
    env = _env(
        bootstrap, run, METAREC_STATS_INTERVAL_S="5", METAREC_LOG_LEVEL="INFO", **LATENCY_ENV
    )
    s = _topics(bootstrap, env)
    store = RedisStore(r, s.key_prefix)
    _publish_model(store)
    events = load_dataset(str(ML100K)).events[: int(rate * seconds)]
    proc = _start_consumer(env, logs / "latency.log")
    try:
        time.sleep(8)  # joined the group and got its partitions
        now = int(time.time() * 1000)
        took = produce(bootstrap, s.events_topic, _event_records(events, now), rate=rate)
        deadline = time.time() + 60
        while _applied(store, s.events_topic) < len(events) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(6)
    finally:
        proc.terminate()
        proc.wait(30)
    windows = [
        json.loads(line).get("stats")
        for line in (logs / "latency.log").read_text().splitlines()
        if '"stats"' in line
    ]
    windows = [
        w for w in windows if w and w.get("events", 0) > 0 and w.get("freshness_ms_p50") is not None
    ]
    p50 = [w["freshness_ms_p50"] for w in windows]
    p99 = [w["freshness_ms_p99"] for w in windows]
    print(
        f"latency at {len(events) / took:,.0f} events/s offered for {took:.0f} s: "
        f"produce-to-list p50 {np.median(p50):.0f} ms (median of {len(p50)} 5-s windows), "
        f"p99 {max(p99):.0f} ms (worst window)"
    )


def users(bootstrap: str, r: redis.Redis[bytes], logs: Path, n_users: int, n_events: int) -> None:
    run = uuid.uuid4().hex[:6]
    env = _env(bootstrap, run)  # default batch size: memory per batch stays the same
    s = _topics(bootstrap, env)
    store = RedisStore(r, s.key_prefix)
    _publish_model(store)
    rng = np.random.default_rng(0)
    items = [str(i) for i in range(1, 1683)]
    user_ids = rng.permutation(n_users)[np.arange(n_events) % n_users]
    item_ids = rng.integers(0, len(items), n_events)
    now = int(time.time() * 1000)
    records = [
        (
            f"s{u}".encode(),
            json.dumps({"user": f"s{u}", "item": items[i], "type": "click", "ts": now}).encode(),
        )
        for u, i in zip(user_ids.tolist(), item_ids.tolist(), strict=True)
    ]
    mem0 = int(r.info("memory")["used_memory"])
    produce(bootstrap, s.events_topic, records)
    proc = _start_consumer(env, logs / f"users-{n_users}.log")
    try:
        while _applied(store, s.events_topic) < n_events:
            time.sleep(0.2)
            if proc.poll() is not None:
                tail = (logs / f"users-{n_users}.log").read_text()[-3000:]
                raise SystemExit(f"consumer died:\n{tail}")
        rss = _peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    mem1 = int(r.info("memory")["used_memory"])
    print(
        f"{n_users:,} distinct users ({n_events:,} events): consumer peak RSS {rss:.0f} MiB; "
        f"Redis {(mem1 - mem0) / n_users:,.0f} bytes per user (state + list)"
    )
    r.flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="throughput,latency,users")
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-users", type=int, default=1_000_000)
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        broker = start_broker(work_dir=logs, log_file=logs / "tansu.log")
        try:
            if "throughput" in phases:
                throughput(broker.bootstrap, r, logs)
            if "latency" in phases:
                latency(broker.bootstrap, r, logs, args.rate, args.seconds)
            if "users" in phases:
                # The same number of events for both, so only the number of users differs.
                users(broker.bootstrap, r, logs, 10_000, args.max_users)
                users(broker.bootstrap, r, logs, args.max_users, args.max_users)
        finally:
            broker.stop()
            r.flushdb()


if __name__ == "__main__":
    main()
