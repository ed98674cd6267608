"""Time the consumer's hot-path core: one batch through the learner, and a model load.

One batch of ``--users`` users, one event each, through :meth:`metarec.core.learner.Learner.
learn_many` exactly as a consumer applies it: trending counts, negatives, prior, inner
step, scores (item vectors, biases, trending and neighbour votes), exact top-K with the
consumed items excluded. The model has ``--items`` items with random vectors and random
neighbour lists. Usage: ``python benchmarks/core_bench.py [--users 1000] [--items 1682]
[--repeat 20]``. Prints measured numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from metarec.core.learner import EventBatch, Learner
from metarec.core.model import MetaModel
from metarec.core.neighbors import N_NEIGHBORS
from metarec.core.user_state import UserState
from metarec.local.bench import BenchConfig, bench_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, history = args.items, 50
    learner = Learner(top_k=args.k, history_length=history)
    learner.add_items([(j, f"i{j}", "default", ()) for j in range(n)])
    learner.load(bench_model(BenchConfig(items=n, dim=args.dim), rng))
    users = [f"user-{r}" for r in range(args.users)]
    states: dict[str, UserState | None] = {}
    for _ in range(history):  # full histories: the prior and the votes at their widest
        batch = EventBatch(
            users,
            rng.integers(0, n, args.users),
            np.ones(args.users, np.float32),
            np.zeros(args.users, np.int64),
            ["default"] * args.users,
        )
        states.update(learner.learn_many(batch, states, {}).states)
    timings = []
    for _ in range(args.repeat):
        batch = EventBatch(
            users,
            rng.integers(0, n, args.users),
            np.ones(args.users, np.float32),
            np.zeros(args.users, np.int64),
            ["default"] * args.users,
        )
        started = time.perf_counter()
        states.update(learner.learn_many(batch, states, {}).states)
        timings.append(time.perf_counter() - started)
    ms = 1000 * np.asarray(timings)
    print(
        f"learn_many: {args.users} users x {n} items (d={args.dim}, history {history}, "
        f"K={args.k}, {N_NEIGHBORS} neighbours): median {np.median(ms):.1f} ms, "
        f"p90 {np.percentile(ms, 90):.1f} ms over {args.repeat} runs"
    )

    big = bench_model(BenchConfig(items=100_000, dim=args.dim), rng)
    blob = big.to_bytes()
    started = time.perf_counter()
    MetaModel.from_bytes(blob)
    print(
        f"load a {len(blob) / 2**20:.1f} MiB artifact with 100000 items: "
        f"{1000 * (time.perf_counter() - started):.0f} ms"
    )


if __name__ == "__main__":
    main()
