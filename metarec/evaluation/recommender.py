"""What every recommender in the evaluation harness offers, baselines and metarec alike.

Recommenders work on dense integer indices, the way the consumer does internally: users,
items and domains are numbered in order of first appearance by the harness. The harness
owns the candidate set and the exclusion of consumed items; a recommender only scores.

A recommender may also offer ``learn_many(xs)``: the harness then hands it each group of
same-timestamp events at once (metarec learns such a group as one consumer batch);
otherwise it calls ``learn_one`` for each event of the group, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Interaction", "Recommender"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Interaction:
    """One event, encoded: ``weight`` is the event type's weight (negative for a dislike)."""

    user: int
    item: int
    ts: int
    domain: int = 0
    weight: float = 1.0


class Recommender(Protocol):
    """A streaming recommender in test-then-train order: ``score`` first, then ``learn_one``."""

    def score(self, user: int, ts: int, domain: int, n_items: int) -> FloatArray:
        """Scores of items ``0 .. n_items-1`` for ``user`` at time ``ts`` (higher is better)."""
        ...

    def learn_one(self, x: Interaction) -> None:
        """Learn from one event, after it has been scored."""
        ...
