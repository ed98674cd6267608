"""Time the store's atomic batch commit and measure Redis memory per user.

Usage: ``python benchmarks/store_bench.py [--redis-url URL] [--repeat 20] [--users 10000]``.
Each user carries a ~1 KB state and a ~600 B recs list, as in the consumer; every batch
also carries one trending increment per user and the partial sums of 2 domains × 32
dimensions. Everything is written under a fresh key prefix, which is deleted at the end.
Prints measured numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from dataclasses import dataclass

import numpy as np
import redis

from metarec.core.reptile import PartialSums
from metarec.core.trending import CHANNELS
from metarec.local.devservices import DEFAULT_REDIS_URL
from metarec.services.store import RedisStore

TOPIC = "bench.events"
STATE_BYTES = 1024
DIM = 32


def recs_json(user: str, rng: np.random.Generator) -> bytes:
    """A list of 20 items with scores: about 600 bytes, like the consumer's."""
    items = [f"item-{int(i)}" for i in rng.integers(0, 100_000, 20)]
    scores = [round(float(s), 6) for s in rng.standard_normal(20)]
    return json.dumps(
        {
            "user": user,
            "items": items,
            "scores": scores,
            "model_version": 7,
            "events": 12,
            "updated_ms": 1_700_000_000_000,
        },
        separators=(",", ":"),
    ).encode()


@dataclass
class Batch:
    """One partition batch's effects, as the consumer passes them to commit_batch."""

    states: dict[str, bytes]
    recs: dict[str, bytes]
    trending: dict[int, float]
    partials: PartialSums


def batch(users: list[str], rng: np.random.Generator) -> Batch:
    partials = PartialSums.zeros(2, DIM)
    partials.add(
        rng.integers(0, 2, len(users)), rng.standard_normal((len(users), DIM)), np.ones(len(users))
    )
    return Batch(
        states={u: rng.bytes(STATE_BYTES) for u in users},
        recs={u: recs_json(u, rng) for u in users},
        trending={int(i): 1.0 for i in rng.integers(0, 50_000, len(users))},
        partials=partials,
    )


def commit(store: RedisStore, partition: int, offset: int | None, nxt: int, data: Batch) -> float:
    start = time.perf_counter()
    store.commit_batch(
        TOPIC,
        partition,
        offset,
        nxt,
        states=data.states,
        recs=data.recs,
        recs_ttl_s=86_400,
        partials=data.partials,
        events=len(data.states),
        trending=[data.trending] * len(CHANNELS),
        channels=CHANNELS,
    )
    return (time.perf_counter() - start) * 1000


def cleanup(client: redis.Redis[bytes], prefix: str) -> None:
    keys: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        keys.append(key)
        if len(keys) >= 1000:
            client.delete(*keys)
            keys.clear()
    if keys:
        client.delete(*keys)


def evalsha_usec(client: redis.Redis[bytes]) -> tuple[int, int]:
    """Calls and server-side microseconds of EVALSHA so far (all clients of this Redis)."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(stats["calls"]), int(stats["usec"])


def time_commits(store: RedisStore, size: int, repeat: int, rng: np.random.Generator) -> None:
    """Commit ``repeat`` batches of new users, then the same users again (steady state)."""
    client = store.client
    partition = size  # a partition of its own per size
    rounds = [[f"u{size}-{r}-{i}" for i in range(size)] for r in range(repeat)]
    offset: int | None = None
    for label in ("new users     ", "existing users"):
        times = []
        calls0, usec0 = evalsha_usec(client)
        for users in rounds:
            nxt = (offset or 0) + len(users)
            times.append(commit(store, partition, offset, nxt, batch(users, rng)))
            offset = nxt
        calls1, usec1 = evalsha_usec(client)
        server = (usec1 - usec0) / max(1, calls1 - calls0) / 1000
        print(
            f"commit_batch {size:5d} {label}: median {statistics.median(times):6.2f} ms, "
            f"p90 {statistics.quantiles(times, n=10)[-1]:6.2f} ms, "
            f"of which Redis ≈ {server:5.2f} ms ({repeat} runs)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--redis-url", default=os.environ.get("METAREC_REDIS_URL", DEFAULT_REDIS_URL)
    )
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--users", type=int, default=10_000)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    prefix = f"metarec-bench-{uuid.uuid4().hex[:12]}:"
    store = RedisStore(client, prefix=prefix)
    rng = np.random.default_rng(0)
    try:
        for size in (100, 1000):
            time_commits(store, size, args.repeat, rng)
        cleanup(client, prefix)
        # Memory per user: states, recs (with TTL) and the fixed partial sums; trending
        # counts are per item, not per user, so they are left out here.
        before = int(client.info("memory")["used_memory"])
        offset: int | None = None
        payload = 0
        for lo in range(0, args.users, 1000):
            users = [f"user-{i}" for i in range(lo, min(args.users, lo + 1000))]
            data = batch(users, rng)
            data.trending = {}
            payload += sum(len(v) for v in data.recs.values())
            commit(store, 0, offset, lo + len(users), data)
            offset = lo + len(users)
        after = int(client.info("memory")["used_memory"])
        print(
            f"memory: {(after - before) / args.users:.0f} B per user over {args.users} users "
            f"(payload {STATE_BYTES + payload / args.users:.0f} B: {STATE_BYTES} B state + "
            f"{payload / args.users:.0f} B recs)"
        )
    finally:
        cleanup(client, prefix)
        client.close()


if __name__ == "__main__":
    main()
