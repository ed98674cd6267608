"""Exact top-K with consumed items excluded.

Scores come from :meth:`metarec.core.learner.Learner.scores` (one matrix product for the whole
batch); top-K is an ``argpartition`` followed by a sort of the K winners, so it stays
exact and cheap.

>>> import numpy as np
>>> s = np.array([[0.1, 0.9, 0.5, 0.7]])
>>> idx, val = top_k(s, 2, exclude=[np.array([1])])
>>> idx.tolist(), val.astype(float).round(2).tolist()
([[3, 2]], [[0.7, 0.5]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["leave_out", "top_k"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def leave_out(scores: npt.NDArray[np.floating], exclude: Sequence[npt.ArrayLike]) -> None:
    """Set each row's ``exclude``\\ d columns of ``scores`` to ``-inf``, in place: one
    scatter for the whole batch, not one per row."""
    n = scores.shape[1]
    lists = [np.asarray(items, np.int64).ravel() for items in exclude]
    if lists:
        cols = np.concatenate(lists)
        rows = np.repeat(np.arange(len(lists)), [c.size for c in lists])
        ok = (cols >= 0) & (cols < n)
        scores[rows[ok], cols[ok]] = -np.inf


def top_k(
    scores: npt.NDArray[np.floating], k: int, exclude: Sequence[npt.ArrayLike] | None = None
) -> tuple[I64, F32]:
    """The ``k`` best item indices per row, best first, skipping each row's ``exclude``.

    ``scores`` is modified in place where items are excluded (set to ``-inf``). Rows with
    fewer than ``k`` eligible items return what they have, padded with ``-1``.
    """
    n = scores.shape[1]
    if exclude is not None:
        leave_out(scores, exclude)
    k_eff = min(k, n)
    if k_eff == 0:
        return np.full((len(scores), k), -1, np.int64), np.full(
            (len(scores), k), -np.inf, np.float32
        )
    part = (
        np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        if k_eff < n
        else np.tile(np.arange(n), (len(scores), 1))
    )
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    vals = np.take_along_axis(vals, order, axis=1).astype(np.float32)
    idx[~np.isfinite(vals)] = -1
    if k_eff < k:
        pad = k - k_eff
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=-np.inf)
    return idx, vals
