"""Time the consumer's hot-path core: adapt + rank a batch of users, and load a model.

Usage: ``python benchmarks/core_bench.py [--users 1000] [--items 1682] [--repeat 20]``.
Prints measured numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from metarec.adaptation import UserBatch, observe, push_history, user_keys, user_vectors
from metarec.catalog import Catalog
from metarec.model import MetaModel
from metarec.ranking import score, top_k, trend_prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    model = MetaModel.initial(args.dim)
    n = args.items
    model.item_ids = [f"i{j}" for j in range(n)]
    model.item_emb = rng.standard_normal((n, args.dim)).astype(np.float32)
    model.item_ctx = rng.standard_normal((n, args.dim)).astype(np.float32)
    model.item_bias = rng.standard_normal(n).astype(np.float32)
    model.item_count = np.full(n, 5.0, np.float32)
    catalog = Catalog()
    for j in range(n):
        catalog.add(f"i{j}")
    tables = model.item_tables(catalog)
    batch = UserBatch.empty(args.users, model)
    batch.keys = user_keys([f"user-{r}" for r in range(args.users)])
    rows = np.arange(args.users)
    for _ in range(model.history_length):
        push_history(batch, rows, rng.integers(0, n, args.users),
                     np.ones(args.users, np.float32))
    seen = [batch.hist_items[r] for r in rows]
    prior = trend_prior(rng.random(n), 0.5)
    timings = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        observe(model, tables, batch, rows, rng.integers(0, n, args.users),
                np.ones(args.users, np.float32), seed=0)
        theta = user_vectors(model, tables, batch)
        top_k(score(tables, theta, prior), args.k, seen)
        timings.append(time.perf_counter() - started)
    ms = 1000 * np.asarray(timings)
    print(f"adapt+rank {args.users} users x {n} items (d={args.dim}, history "
          f"{model.history_length}, K={args.k}): median {np.median(ms):.1f} ms, "
          f"p90 {np.percentile(ms, 90):.1f} ms over {args.repeat} runs")

    big = MetaModel.initial(args.dim)
    m = 100_000
    big.item_ids = [f"item-{j}" for j in range(m)]
    big.item_emb = rng.standard_normal((m, args.dim)).astype(np.float32)
    big.item_ctx = rng.standard_normal((m, args.dim)).astype(np.float32)
    big.item_bias = np.zeros(m, np.float32)
    big.item_count = np.ones(m, np.float32)
    blob = big.to_bytes()
    started = time.perf_counter()
    MetaModel.from_bytes(blob)
    print(f"load a {len(blob) / 2**20:.1f} MiB artifact with {m} items: "
          f"{1000 * (time.perf_counter() - started):.0f} ms")


if __name__ == "__main__":
    main()
