"""The batch commit on a Redis Cluster next to the same commit on one Redis.

Usage: ``python benchmarks/cluster_bench.py [--redis-url URL] [--cluster-url URL]
[--repeat 20] [--users 5000]``. Without ``--cluster-url`` it starts a local cluster of three
masters (``redis-server`` and ``redis-cli`` must be installed) and stops it at the end.
Both measure :func:`metarec.local.bench.commit_rate`, the batch ``metarec bench`` times (1,250
users with 50-event states, their lists, trending counts and partial sums), and the
cluster's memory per user (state, list, applied offsets). Keys go under a fresh prefix,
deleted at the end. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from redis.cluster import RedisCluster

from metarec.core.user_state import UserState
from metarec.local.bench import BenchConfig, commit_rate
from metarec.local.devservices import DEFAULT_REDIS_URL
from metarec.services.cluster_store import ClusterStore
from metarec.services.store import RedisStore


def used_memory(store: RedisStore) -> int:
    """Bytes used by every master of a cluster, or by the one server."""
    client: Any = store.client
    if not isinstance(store, ClusterStore):
        return int(client.info("memory")["used_memory"])
    info = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    return sum(int(node["used_memory"]) for node in info.values())


def cleanup(store: RedisStore) -> None:
    for key in store.client.scan_iter(match=f"{store.prefix}*", count=1000):
        store.client.delete(key)


def memory_per_user(store: RedisStore, users: int, rng: np.random.Generator) -> float:
    before = used_memory(store)
    offset: int | None = None
    for lo in range(0, users, 1000):
        names = [f"user-{i}" for i in range(lo, min(users, lo + 1000))]
        states = {}
        for u in names:
            st = UserState.new(32, 50)
            for k in range(50):
                st.record(int(rng.integers(1682)), 1.0, 1_700_000_000_000 + k, "default")
            states[u] = st.to_bytes()
        recs = {
            u: b'{"user":"'
            + u.encode()
            + b'","items":['
            + b'"i1",' * 19
            + b'"i2"],"scores":['
            + b"0.123456," * 19
            + b'0.1],"model_version":1,'
            b'"events":50,"updated_ms":1700000000000}'
            for u in names
        }
        store.commit_batch(
            "mem",
            0,
            offset,
            lo + len(names),
            states=states,
            recs=recs,
            recs_ttl_s=3600,
            partials=None,
            guards={u: b"" for u in names},
        )
        offset = lo + len(names)
    return (used_memory(store) - before) / users


def measure(label: str, url: str, repeat: int, users: int) -> None:
    store = RedisStore.connect(url, f"cluster-bench-{uuid.uuid4().hex[:8]}:")
    rng = np.random.default_rng(0)
    try:
        rate = commit_rate(store, BenchConfig(quick=True), rng, repeat)
        mem = memory_per_user(store, users, rng)
        print(f"{label:8} commit of one batch: {rate:8,.0f} events/s; {mem:6,.0f} B per user")
    finally:
        cleanup(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--redis-url", default=os.environ.get("METAREC_REDIS_URL", DEFAULT_REDIS_URL)
    )
    parser.add_argument("--cluster-url", default=None)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--users", type=int, default=5000)
    args = parser.parse_args()
    measure("single", args.redis_url, args.repeat, args.users)
    if args.cluster_url is not None:
        measure("cluster", args.cluster_url, args.repeat, args.users)
        return
    # The tests' helper starts the local cluster; it lives in the repository, not in the
    # installed package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.redis_cluster import start_cluster

    with tempfile.TemporaryDirectory(prefix="metarec-cluster-bench-") as tmp:
        cluster = start_cluster(Path(tmp))
        try:
            measure("cluster", cluster.url, args.repeat, args.users)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
