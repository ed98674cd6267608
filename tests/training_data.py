"""A small training window with something to learn, shared by the training tests.

Kept apart from test_training.py so that a subprocess can build it without importing
TensorFlow first (test_training.py imports it at module level).
"""

from __future__ import annotations

import numpy as np

from metarec.core.window import TrainingData

__all__ = ["tiny_training_data"]


def tiny_training_data(
    n_events: int = 600,
    n_users: int = 30,
    n_items: int = 40,
    seed: int = 0,
) -> TrainingData:
    """A stream where users have a taste (item index mod 4), so there is something to learn."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_events)
    taste = rng.integers(0, 4, n_users)
    items = (rng.integers(0, n_items // 4, n_events) * 4 + taste[users]) % n_items
    items[:n_items] = np.arange(n_items)
    return TrainingData(
        users=users.astype(np.int64),
        items=items.astype(np.int64),
        ts=np.arange(n_events, dtype=np.int64) * 60_000,
        weights=rng.choice([1.0, 2.0], n_events).astype(np.float32),
        domains=np.zeros(n_events, np.int64),
        item_ids=[f"i{j}" for j in range(n_items)],
        item_features=[(f"mod:{j % 4}",) for j in range(n_items)],
        item_domains=np.zeros(n_items, np.int64),
        user_ids=[f"u{j}" for j in range(n_users)],
        user_features=[(f"taste:{taste[j]}",) for j in range(n_users)],
        domain_names=["default"],
    )
