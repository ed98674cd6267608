"""What per-domain lists cost: the learner's step (adapt, rank, list records) per event,
and the bytes of a user's list record, for a catalogue of one domain and of three.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python scripts/domain_lists_cost.py`` (docs/RESULTS.md
section 10). The model is random, as in ``metarec bench``: serving costs do not depend on
how well it was trained.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from metarec.core.learner import EventBatch, Learner
from metarec.core.user_state import UserState
from metarec.local.bench import bench_model

BATCHES, BATCH, USERS, WARMUP = 30, 500, 2000, 3


def measure(n_items: int, n_domains: int) -> tuple[float, float]:
    """Events per second through learn_many + list_records, and mean record bytes."""
    rng = np.random.default_rng(0)
    model = bench_model(SimpleNamespace(dim=32, items=n_items), rng)  # type: ignore[arg-type]
    learner = Learner(seed=0)
    domains = [f"d{j % n_domains}" for j in range(n_items)]
    learner.add_items([(j, f"i{j}", domains[j], ()) for j in range(n_items)])
    learner.load(model)
    states: dict[str, UserState] = {}
    seconds, events, sizes = 0.0, 0, []
    for b in range(BATCHES):
        users = [f"u{u}" for u in rng.integers(0, USERS, BATCH)]
        items = rng.integers(0, n_items, BATCH)
        batch = EventBatch(
            users,
            items.astype(np.int64),
            np.ones(BATCH, np.float32),
            np.arange(BATCH, dtype=np.int64) + b * BATCH,
            [domains[i] for i in items],
        )
        start = time.perf_counter()
        out = learner.learn_many(batch, {u: states.get(u) for u in set(users)}, {})
        records = learner.list_records(out.lists, out.states, 0)
        if b >= WARMUP:
            seconds += time.perf_counter() - start
            events += BATCH
        states.update(out.states)
        sizes += [len(v) for v in records.values()]
    return events / seconds, float(np.mean(sizes))


def main() -> None:
    for n_items, n_domains in [(1682, 1), (1682, 3), (100_000, 1), (100_000, 3)]:
        rate, size = measure(n_items, n_domains)
        print(
            f"items {n_items:>7} domains {n_domains}: {rate:8.0f} events/s "
            f"(learn + rank + records), list record {size:6.0f} bytes/user"
        )


if __name__ == "__main__":
    main()
