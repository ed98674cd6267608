"""Item-to-item neighbours: what the model knows about items consumed together.

Item-kNN over co-consumption is the strongest simple recommender on long histories: "people
who took this also took that", at full rank, where the model's ``d``-dimensional vectors
only keep the broad strokes. So the model uses it as an input. The aggregator computes, at
each retraining, every item's :data:`N_NEIGHBORS` nearest items by the cosine of their
co-consumption counts over the window, ``S_ij = C_ij / sqrt(n_i n_j)`` (``C_ij``: users who
took both, ``n_i``: users who took ``i``), and ships them in the model. A user's *votes*
for item ``j`` are ``Σ_h a(age_h) S_hj`` over their :data:`VOTERS` most recent positive
events ``h``; the model weighs the votes per history length and learns the age weights
``a`` (:mod:`metarec.training.trainer`).

Serving votes with neighbours computed before the events it scores. Training must too:
neighbours from the whole window would know each example's future, the user's own later
co-consumption included, and teach the model to trust them more than serving can. So
training examples vote with neighbours of the part of the window before them
(:class:`metarec.training.trainer.TrainingBatches`).

>>> import numpy as np
>>> users = np.array([0, 0, 1, 1, 2, 2])
>>> items = np.array([0, 1, 0, 1, 0, 2])
>>> nb = ItemNeighbors.from_events(users, items, n_items=3, n_neighbors=2)
>>> nb.index[0].tolist(), [round(float(w), 3) for w in nb.weight[0]]  # 1: twice with 0
([1, 2], [0.816, 0.577])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import sparse

__all__ = ["MAX_ITEMS_PER_USER", "N_NEIGHBORS", "VOTERS", "ItemNeighbors", "votes"]

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

#: Neighbours kept per item: enough for any user's next item to have a vote, at 8 bytes
#: each (40 MB in a model of 100k items).
N_NEIGHBORS = 50
#: Most recent positive events whose neighbours vote (the item-kNN baseline's 20).
VOTERS = 20
#: Distinct items a user contributes to the counts (their most recent ones): bounds the
#: O(items²) pairs of one heavy user.
MAX_ITEMS_PER_USER = 500


@dataclass(frozen=True)
class ItemNeighbors:
    """Each item's nearest items: ``index`` (``-1``: none) and cosine ``weight``."""

    index: npt.NDArray[np.int32]
    weight: F32

    @classmethod
    def empty(cls, n_items: int, n_neighbors: int = N_NEIGHBORS) -> ItemNeighbors:
        return cls(
            np.full((n_items, n_neighbors), -1, np.int32),
            np.zeros((n_items, n_neighbors), np.float32),
        )

    @classmethod
    def from_events(
        cls,
        users: npt.ArrayLike,
        items: npt.ArrayLike,
        n_items: int,
        n_neighbors: int = N_NEIGHBORS,
    ) -> ItemNeighbors:
        """Neighbours from positive events ``(user, item)`` in time order."""
        u = np.asarray(users, np.int64)
        i = np.asarray(items, np.int64)
        out = cls.empty(n_items, n_neighbors)
        if u.size == 0:
            return out
        # Each user's distinct items, the most recent MAX_ITEMS_PER_USER of them.
        last = np.unique(np.stack([u, i], 1)[::-1], axis=0, return_index=True)
        pairs, pos_from_end = last
        order = np.lexsort((pos_from_end, pairs[:, 0]))
        pairs, pos_from_end = pairs[order], pos_from_end[order]
        rank = np.arange(len(pairs)) - np.searchsorted(pairs[:, 0], pairs[:, 0])
        keep = rank < MAX_ITEMS_PER_USER
        pu, pi = pairs[keep, 0], pairs[keep, 1]
        n_users = int(pu.max()) + 1
        x = sparse.csr_matrix((np.ones(pu.size, np.float32), (pu, pi)), shape=(n_users, n_items))
        count = np.asarray(x.sum(0)).ravel().astype(np.float32)
        co = (x.T @ x).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        norm = 1.0 / np.sqrt(np.maximum(count, 1.0))
        sim = sparse.diags(norm) @ co @ sparse.diags(norm)
        sim = sparse.csr_matrix(sim, dtype=np.float32)
        index, weight = out.index, out.weight
        for row in range(n_items):
            lo, hi = sim.indptr[row], sim.indptr[row + 1]
            if lo == hi:
                continue
            cols, vals = sim.indices[lo:hi], sim.data[lo:hi]
            if cols.size > n_neighbors:
                top = np.argpartition(-vals, n_neighbors - 1)[:n_neighbors]
                cols, vals = cols[top], vals[top]
            best = np.argsort(-vals, kind="stable")
            index[row, : cols.size] = cols[best]
            weight[row, : cols.size] = vals[best]
        return cls(index, weight)

    def votes(
        self,
        hist_items: I64,
        hist_weights: npt.ArrayLike,
        age_weight: npt.ArrayLike,
    ) -> tuple[I64, F32]:
        """Each row's votes as neighbour lists: ``(index, value)`` of shape ``(B, V, N)``.

        ``hist_items`` are the rows' newest ``V`` history items (right-aligned, ``-1``
        padding), ``hist_weights`` their event weights (only positive events vote) and
        ``age_weight[V - 1 - k]`` the weight of the ``k``-th newest.
        """
        h = np.asarray(hist_items, np.int64)
        ok = (h >= 0) & (np.asarray(hist_weights) > 0)
        safe = np.where(ok, h, 0)
        index = np.where(ok[..., None], self.index[safe], -1).astype(np.int64)
        value = self.weight[safe]
        value = value * (ok * np.asarray(age_weight, np.float32))[..., None]
        return index, value.astype(np.float32)


def votes(index: I64, value: F32, n_items: int) -> F32:
    """Dense ``(B, n_items)`` votes from :meth:`ItemNeighbors.votes`' neighbour lists."""
    b = index.shape[0]
    ok = (index >= 0) & (index < n_items)
    flat = (np.arange(b)[:, None, None] * n_items + index)[ok]
    out = np.bincount(flat, value[ok], minlength=b * n_items).reshape(b, n_items)
    return out.astype(np.float32)
