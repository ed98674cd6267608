"""Time the consumer's in-process work per event over a stream, without Kafka or Redis.

What a consumer does with each batch besides fetching it and committing it: decode the
touched users' stored states, :meth:`metarec.core.learner.Learner.learn_many`, encode the states,
write the lists' JSON (:meth:`~metarec.core.learner.Learner.list_records`) and feed the live
hits to the drift monitor (:meth:`~metarec.core.learner.Learner.observe`). States are kept as
bytes between batches, so histories grow as in a real stream. The workload is the bench's
(``metarec bench``): power-law users and items, a model with random vectors and neighbours.
The first ``--warm`` events fill the histories; the next ``--events`` are timed.

Usage: ``python benchmarks/learner_stream_bench.py [--items 1682] [--users 20000]
[--batch 1250] [--warm 100000] [--events 50000] [--profile]``. Prints measured numbers
(and, with ``--profile``, cProfile's top functions); asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import time

import numpy as np

from metarec.core.learner import EventBatch, Learner
from metarec.core.user_state import decode_many, encode_many
from metarec.local.bench import ITEM_EXPONENT, USER_EXPONENT, BenchConfig, bench_model, power_law


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument(
        "--batch",
        type=int,
        default=1250,
        help="events per learner call (a consumer's batch of 5,000 over 4 partitions)",
    )
    parser.add_argument("--warm", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    cfg = dataclasses.replace(BenchConfig(), items=args.items)
    rng = np.random.default_rng(0)
    learner = Learner(top_k=cfg.top_k)
    learner.add_items([(j, f"i{j}", "default", ()) for j in range(cfg.items)])
    learner.load(bench_model(cfg, rng).with_version(1))
    total = args.warm + args.events
    users = power_law(args.users, USER_EXPONENT, total, rng)
    items = power_law(cfg.items, ITEM_EXPONENT, total, rng).astype(np.int64)
    stored: dict[str, bytes] = {}

    def one_batch(lo: int, hi: int) -> None:
        names = [f"u{u}" for u in users[lo:hi].tolist()]
        batch = EventBatch(
            names,
            items[lo:hi],
            np.ones(hi - lo, np.float32),
            np.arange(lo, hi, dtype=np.int64) * 1000 + 1_700_000_000_000,
            ["default"] * (hi - lo),
        )
        touched = list(dict.fromkeys(names))
        present = [u for u in touched if u in stored]
        states = dict.fromkeys(touched)
        states.update(zip(present, decode_many([stored[u] for u in present]), strict=True))
        out = learner.learn_many(batch, states, dict.fromkeys(touched))
        stored.update(zip(out.states, encode_many(list(out.states.values())), strict=True))
        learner.list_records(out.lists, out.states, now_ms=0)
        learner.observe(batch, out)

    for lo in range(0, args.warm, args.batch):
        one_batch(lo, min(lo + args.batch, args.warm))
    profile = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
    for lo in range(args.warm, total, args.batch):
        one_batch(lo, min(lo + args.batch, total))
    if profile is not None:
        profile.disable()
    took = time.perf_counter() - started
    print(
        f"{args.events:,} events, {args.items:,} items, batches of {args.batch:,}: "
        f"{1e6 * took / args.events:.0f} µs per event ({args.events / took:,.0f} events/s)"
        + (" under cProfile" if profile is not None else "")
    )
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
