"""Time one meta-training run from scratch over the whole ml-100k window.

Usage: ``python benchmarks/training_bench.py [--epochs 1]``. Prints the measured seconds and
the device TensorFlow used; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from metarec.core.window import EventWindow
from metarec.data.movielens import load_movielens
from metarec.training.trainer import MetaTrainer

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens" / "ml-100k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    ds = load_movielens(ML100K)
    window = EventWindow(len(ds.events))
    for item in ds.items:
        window.describe_item(item.item, item.domain, item.features)
    for user in ds.users:
        window.describe_user(user.user, user.features)
    weights = {"click": 1.0, "like": 2.0, "dislike": -1.0}
    for e in ds.events:
        window.append(e.user, e.item, e.ts, weights[e.type], e.domain)
    data = window.training_data()
    started = time.perf_counter()
    model = MetaTrainer(epochs=args.epochs).fit(data)
    elapsed = time.perf_counter() - started
    print(
        f"meta-training on {len(data):,} events ({len(data.user_ids)} users, "
        f"{len(data.item_ids)} items), {model.info['steps']} steps: {elapsed:.1f} s on "
        f"{model.info['device']} (final query loss {model.info['loss']:.3f})"
    )


if __name__ == "__main__":
    main()
