"""Lists for big catalogues: exact scores for a few hundred candidates per user.

Scoring every item for every user costs O(items) per list: 100,000 items make a list
about 60 times dearer than MovieLens's 1,682 do, and choosing its top K (one partition
over the whole row) dearer still. Above :data:`metarec.config.EXACT_MAX_ITEMS` items the
learner scores each user's *candidates* only:

* the :data:`NEIGHBOR_CANDIDATES` nearest neighbours of each of their recent items (the
  co-consumption term of the score, :mod:`metarec.core.neighbors`; the lists are sorted, so
  these are the ones with the largest votes);
* the :data:`TRENDING_CANDIDATES` best items by the non-personal part of the score (item
  bias and trending prior) for the user's history bucket: one ranking per bucket and
  batch, shared by its users;
* the :data:`PERSONAL_CANDIDATES` best items by ``V θ_u + b`` from an inverted-file index
  over the item vectors (:class:`ItemIndex`, faiss's IVF, which scans the
  :data:`PROBED_LISTS` lists nearest to ``θ_u`` instead of the whole catalogue).

Each candidate then gets its exact score, the same sum :meth:`metarec.core.learner.Learner.scores`
computes for every item, its votes included, so a list differs from the exact one only
where an item outside all three sets would have made the top K. How close that is gets
measured on a 100,000-item stream (``metarec eval --data synthetic-100k-items``, with and
without ``METAREC_EXACT_MAX_ITEMS`` raised above the catalogue).

>>> import numpy as np
>>> theta = np.array([[1.0, 0.0]], np.float32)
>>> vectors = np.array([[0.1, 0], [0.9, 0], [0.5, 0], [0.7, 0]], np.float32)
>>> idx, val = rank_candidates(theta, np.zeros(1, np.int64), vectors,
...                            np.zeros((1, 4), np.float32), np.array([[1, 2, 3, 2]]),
...                            k=2, exclude=[np.array([1])])
>>> idx.tolist(), val.astype(float).round(2).tolist()   # 1 excluded, 0 no candidate
([[3, 2]], [[0.7, 0.5]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import faiss
import numpy as np
import numpy.typing as npt

from metarec.core.ranking import top_k

__all__ = [
    "DOMAIN_CANDIDATES",
    "NEIGHBOR_CANDIDATES",
    "PERSONAL_CANDIDATES",
    "PROBED_LISTS",
    "TRENDING_CANDIDATES",
    "ItemIndex",
    "rank_candidates",
    "trending_candidates",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: Best items by the shared part of the score (bias and trending) offered to every user
#: of a history bucket: what a newcomer's list is made of.
TRENDING_CANDIDATES = 200
#: Best items of each domain by the shared score, offered to each domain's list (a
#: catalogue of several domains): enough for a full list past the items a user has seen.
DOMAIN_CANDIDATES = 100
#: Nearest neighbours per recent item offered as candidates (of the 50 each item has: the
#: rest still add their votes to whichever candidates they name).
NEIGHBOR_CANDIDATES = 20
#: Best items by the user's own vector, from the index.
PERSONAL_CANDIDATES = 100
#: Inverted lists scanned per query. With about 4·√n lists this reads ~1% of a 100k
#: catalogue.
PROBED_LISTS = 12
#: Items used to train the index's coarse centroids, and k-means iterations: a sample and
#: a few iterations place the lists as well as more would, and bound a reload's cost
#: (about a second for 100k items on one core).
TRAIN_SAMPLE = 50_000
KMEANS_ITERATIONS = 10


class ItemIndex:
    """An inverted-file index over ``[v_i, b_i]`` for the best items by ``θ·v_i + b_i``.

    Built once per model version (a second or so for 100k items); items added to the
    catalogue later are appended with :meth:`extend`.

    >>> rng = np.random.default_rng(0)
    >>> vectors = rng.standard_normal((2000, 8)).astype(np.float32)
    >>> index = ItemIndex(vectors, np.zeros(2000, np.float32))
    >>> theta = rng.standard_normal((1, 8)).astype(np.float32)
    >>> best = index.search(theta, 10)
    >>> best.shape, int(np.argmax(theta @ vectors.T)) in best[0]
    ((1, 10), True)
    """

    def __init__(self, vectors: F32, bias: F32, *, seed: int = 0) -> None:
        data = _augment(vectors, bias)
        n, dim = data.shape
        # About 4·√n lists, and at least 39 training points per list (faiss's minimum).
        self.n_lists = max(1, min(int(4 * math.sqrt(n)), min(n, TRAIN_SAMPLE) // 40 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        self._index = faiss.IndexIVFFlat(quantizer, dim, self.n_lists, faiss.METRIC_INNER_PRODUCT)
        self._index.cp.seed = seed
        self._index.cp.niter = KMEANS_ITERATIONS
        sample = data
        if n > TRAIN_SAMPLE:
            sample = data[np.random.default_rng(seed).choice(n, TRAIN_SAMPLE, replace=False)]
        self._index.train(sample)
        self._index.add(data)
        self._index.nprobe = min(PROBED_LISTS, self.n_lists)
        self._keep = quantizer  # the IVF index refers to it; keep it alive

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def extend(self, vectors: F32, bias: F32) -> None:
        """Append items (the next catalogue indices), assigned to the existing lists."""
        self._index.add(_augment(vectors, bias))

    def search(self, theta: F32, k: int) -> I64:
        """Indices of about the ``k`` best items per row of ``theta`` (``-1``: fewer)."""
        queries = np.hstack([theta, np.ones((len(theta), 1), np.float32)])
        _, idx = self._index.search(np.ascontiguousarray(queries, np.float32), k)
        return np.asarray(idx, np.int64)


def _augment(vectors: F32, bias: F32) -> F32:
    out: F32 = np.ascontiguousarray(np.hstack([vectors, bias[:, None]]), np.float32)
    return out


#: Users whose candidates' vectors are gathered and scored together.
GATHER_ROWS = 64


def trending_candidates(shared: F32, k: int) -> I64:
    """The ``k`` best columns of each row of ``shared`` (one row per history bucket)."""
    k = min(k, shared.shape[1])
    best: I64 = np.argpartition(-shared, k - 1, axis=1)[:, :k].astype(np.int64)
    return best


def rank_candidates(
    theta: F32,
    bucket: I64,
    vectors: F32,
    shared: F32,
    candidates: I64,
    k: int,
    exclude: Sequence[npt.ArrayLike],
    knn: tuple[I64, F32, F32] | None = None,
) -> tuple[I64, F32]:
    """The ``k`` best of each row's ``candidates`` by their exact score, best first.

    The score is ``θ_u·v_i + shared[bucket_u, i] + knn_w_u · votes_u(i)``: ``shared`` holds
    the non-personal part per history bucket (item bias and trending prior) and ``knn``
    is ``(index, value, weight)``: each row's neighbour votes as
    :meth:`metarec.core.neighbors.ItemNeighbors.votes` gives them, and the row's weight on them.
    Votes for items that are no candidate are dropped; a candidate's votes are summed
    onto its first copy. Duplicates and ``-1`` entries are ignored, ``exclude``\\ d
    items never ranked. Returns ``(items, scores)`` padded with ``-1`` / ``-inf`` as
    :func:`metarec.core.ranking.top_k` does.
    """
    b, n = len(theta), vectors.shape[0]
    span = n + 1  # keys row·span + item + 1 sort by row, then item; -1 entries first
    cands = np.asarray(candidates, np.int64)
    cands = np.sort(np.where(cands < n, cands, -1), axis=1)
    m = cands.shape[1]
    rows = np.arange(b, dtype=np.int64)[:, None]
    keys = (rows * span + cands + 1).ravel()
    valid = (cands >= 0).ravel()
    valid[1:] &= keys[1:] != keys[:-1]
    items = np.maximum(cands, 0)
    scores = np.empty((b, m), np.float32)
    # A few rows at a time: the gathered vectors then stay in cache (the whole batch's
    # gather is b·m·d floats, ~200 MB for 1,250 users, and was 5x slower to stream).
    for lo in range(0, b, GATHER_ROWS):
        hi = lo + GATHER_ROWS
        scores[lo:hi] = np.einsum(
            "bmd,bd->bm", np.take(vectors, items[lo:hi], axis=0), theta[lo:hi], optimize=True
        )
    scores += shared[bucket[:, None], items]
    if knn is not None:
        index, value, weight = knn
        ok = (index >= 0) & (index < n)
        voter_keys = (np.broadcast_to(rows[:, :, None], index.shape) * span + index + 1)[ok]
        at = np.searchsorted(keys, voter_keys)
        found = at < keys.size
        found[found] = keys[at[found]] == voter_keys[found]
        summed = np.bincount(at[found], value[ok][found], minlength=keys.size)
        scores += weight[:, None] * summed.reshape(b, m).astype(np.float32)
    seen = [e[(e >= 0) & (e < n)] for e in (np.asarray(x, np.int64).ravel() for x in exclude)]
    if seen:
        seen_keys = np.concatenate([r * span + s + 1 for r, s in enumerate(seen)])
        at = np.searchsorted(keys, seen_keys)
        hit = at < keys.size
        hit[hit] = keys[at[hit]] == seen_keys[hit]
        valid[at[hit]] = False
    scores.ravel()[~valid] = -np.inf
    pos, vals = top_k(scores, k)
    out = np.where(pos >= 0, np.take_along_axis(cands, np.maximum(pos, 0), axis=1), -1)
    return out.astype(np.int64), vals
