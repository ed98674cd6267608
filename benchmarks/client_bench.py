"""Time what an app pays to read lists with :class:`metarec.client.Recommendations`.

Usage: ``python benchmarks/client_bench.py [--redis-url URL] [--users 10000]
[--reads 5000] [--page 100]``. Writes ``--users`` lists of 20 items (as the consumer
writes them) and a fallback list under a fresh key prefix, then times, from one client
on this machine: ``get`` of a user who has a list, ``get`` of one who has none (the
fallback), and ``get_many`` of ``--page`` users (half with lists). The prefix is deleted
at the end. Prints measured percentiles; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

import numpy as np
import redis

from metarec.client import Recommendations
from metarec.core.learner import Learner, RankedList
from metarec.core.user_state import UserState
from metarec.local.devservices import DEFAULT_REDIS_URL
from metarec.services.store import RedisStore

TOP_K = 20
ITEMS = 1682


def fill(store: RedisStore, users: int, rng: np.random.Generator) -> None:
    learner = Learner(top_k=TOP_K)
    learner.add_items([(j, f"i{j}", "default", ()) for j in range(ITEMS)])
    states = {f"u{u}": UserState.new(32, 50) for u in range(users)}
    lists = {
        u: RankedList(
            rng.choice(ITEMS, TOP_K, replace=False),
            np.sort(rng.standard_normal(TOP_K).astype(np.float32))[::-1],
        )
        for u in states
    }
    records = learner.list_records(lists, states, now_ms=int(time.time() * 1000))
    pipe = store.client.pipeline(transaction=False)
    for user, value in records.items():
        pipe.set(store.recs_key(user), value)
    pipe.execute()
    store.write_fallbacks(
        learner.fallback_records(learner.newcomer_lists(), int(time.time() * 1000))
    )


def timed(call: Callable[[], object], n: int) -> tuple[float, float, float]:
    """p50, p99 and max of ``n`` calls, in microseconds."""
    for _ in range(min(100, n)):
        call()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        call()
        out[i] = time.perf_counter() - t
    us = out * 1e6
    return float(np.percentile(us, 50)), float(np.percentile(us, 99)), float(us.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--reads", type=int, default=5_000)
    parser.add_argument("--page", type=int, default=100)
    args = parser.parse_args()

    client: redis.Redis[bytes] = redis.Redis.from_url(args.redis_url)
    prefix = f"bench-client-{uuid.uuid4().hex[:8]}:"
    store = RedisStore(client, prefix)
    rng = np.random.default_rng(0)
    try:
        fill(store, args.users, rng)
        recs = Recommendations(client, prefix=prefix)
        known = iter(rng.integers(0, args.users, 10**7).tolist())
        pages = [
            [f"u{int(u)}" for u in rng.integers(0, 2 * args.users, args.page)] for _ in range(64)
        ]
        rows = [
            ("get, user with a list", timed(lambda: recs.get(f"u{next(known)}"), args.reads)),
            ("get, user without one (fallback)", timed(lambda: recs.get("nobody"), args.reads)),
            (
                f"get_many, {args.page} users (half with lists)",
                timed(lambda: recs.get_many(pages[rng.integers(64)]), args.reads // 10),
            ),
        ]
        print(f"{args.users:,} lists of {TOP_K} items; one client, {args.redis_url}")
        print("| read | p50 µs | p99 µs | max µs |")
        print("| --- | ---: | ---: | ---: |")
        for name, (p50, p99, worst) in rows:
            print(f"| {name} | {p50:,.0f} | {p99:,.0f} | {worst:,.0f} |")
    finally:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.unlink(key)


if __name__ == "__main__":
    main()
