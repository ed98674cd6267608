"""The inner loop: adapting many users at once to their newest events, in numpy.

This is the consumer's hot path, so everything works on a :class:`UserBatch` (one row per
user, struct-of-arrays) and one *wave* of events at a time: at most one event per user, so
the rows are independent and every step is a handful of vectorized operations. A batch in
which a user has several events is applied as several waves (see :func:`waves`).

A user's vector is ``θ_u = θ0(u) + δ_u``: the meta-learned prior from the user's profile and
recent history (recomputed as the history grows) plus a personal offset ``δ_u`` that the
inner loop trains on each event with a pairwise loss against sampled negatives and a
proximal pull back to the prior::

    L = −|w| log σ(s·(θ·(v_pos − v_neg) + b_pos − b_neg)) + (λ/2)‖δ‖²,   s = sign(w)

so a dislike (negative weight) pushes the item below the negatives instead of above them.

>>> import numpy as np
>>> from metarec.model import ItemTables, MetaModel
>>> m = MetaModel.initial(dim=2, history_length=3, meta=False, step=0.5)
>>> t = ItemTables(np.eye(2, dtype=np.float32), np.zeros(2, np.float32),
...                np.eye(2, dtype=np.float32))
>>> b = UserBatch.empty(1, m)
>>> observe(m, t, b, np.array([0]), np.array([0]), np.array([1.0]), np.array([[1]]))
>>> bool(user_vectors(m, t, b)[0] @ (t.vectors[0] - t.vectors[1]) > 0)
True
>>> b.hist_items.tolist()
[[-1, -1, 0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from metarec.model import ItemTables, MetaModel

__all__ = [
    "UserBatch",
    "adapt",
    "observe",
    "pairwise_gradient",
    "prior",
    "push_history",
    "replay",
    "sample_negatives",
    "user_vectors",
    "waves",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
#: Keeps the pooled history finite for users whose history weights cancel out.
_EPS = 1e-6


@dataclass
class UserBatch:
    """The adaptable state of ``B`` users, one row each.

    ``hist_items`` is right-aligned (the newest event in the last column, ``-1`` padding on
    the left) so a column's age is the same for every user; ``hist_weights`` holds the event
    type weights of those events.
    """

    delta: F32
    hist_items: I64
    hist_weights: F32
    domain: I64
    profile: F32

    @classmethod
    def empty(cls, n: int, model: MetaModel) -> UserBatch:
        """``n`` brand-new users in the model's first domain, without profile features."""
        d, length = model.dim, model.history_length
        return cls(
            delta=np.zeros((n, d), np.float32),
            hist_items=np.full((n, length), -1, np.int64),
            hist_weights=np.zeros((n, length), np.float32),
            domain=np.zeros(n, np.int64),
            profile=np.zeros((n, d), np.float32),
        )

    def __len__(self) -> int:
        return int(self.delta.shape[0])


def waves(users: npt.ArrayLike) -> list[I64]:
    """Split positions of a batch into waves with at most one event per user, in order.

    >>> [w.tolist() for w in waves(["a", "b", "a", "a", "c"])]
    [[0, 1, 4], [2], [3]]
    """
    keys = np.asarray(users)
    if keys.size == 0:
        return []
    _, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sorted_keys = inverse[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1]
    occurrence = np.empty(len(keys), np.int64)
    occurrence[order] = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts,
                                                                                len(keys)]))
    return [np.flatnonzero(occurrence == k) for k in range(int(occurrence.max()) + 1)]


def prior(model: MetaModel, tables: ItemTables, batch: UserBatch,
          rows: I64 | None = None) -> F32:
    """``θ0(u)`` for the users in ``rows`` (all by default) from their current history."""
    sel = slice(None) if rows is None else rows
    domain = batch.domain[sel]
    base = model.theta0[domain]
    if not model.meta:
        return base.copy()
    items = batch.hist_items[sel]
    valid = items >= 0
    ctx = tables.context[np.where(valid, items, 0)]
    out = base + batch.profile[sel]
    # age_logits[p, 0] is the newest event, which sits in the last (right-aligned) column.
    age_weight = np.exp(model.age_logits[:, ::-1])[:, -items.shape[1]:]
    hist_w = batch.hist_weights[sel] * valid
    shared = np.zeros_like(out)
    for p in range(age_weight.shape[0]):
        w = hist_w * age_weight[p]
        pooled = np.einsum("bl,bld->bd", w, ctx) / (np.abs(w).sum(1, keepdims=True) + _EPS)
        shared += pooled @ model.hist_map[p]
    out += np.einsum("bd,bde->be", shared, model.domain_map[domain])
    return out.astype(np.float32)


def user_vectors(model: MetaModel, tables: ItemTables, batch: UserBatch,
                 rows: I64 | None = None) -> F32:
    """The users' current vectors ``θ_u = θ0(u) + δ_u``."""
    sel = slice(None) if rows is None else rows
    return prior(model, tables, batch, rows) + batch.delta[sel]


def pairwise_gradient(theta: F32, delta: F32, tables: ItemTables, pos: I64, weight: F32,
                      neg: I64, prox: float) -> F32:
    """Gradient of the inner-loop loss (module docstring) with respect to ``δ``.

    ``neg`` is ``(B, n)``: the loss is averaged over the ``n`` negatives of each row.
    """
    dv = tables.vectors[pos][:, None, :] - tables.vectors[neg]  # (B, n, d)
    db = tables.bias[pos][:, None] - tables.bias[neg]
    sign = np.where(weight < 0, -1.0, 1.0).astype(np.float32)[:, None]
    z = sign * (np.einsum("bd,bnd->bn", theta, dv) + db)
    coeff = -np.abs(weight)[:, None] * sign / (1.0 + np.exp(np.clip(z, -30, 30)))
    grad: F32 = (np.einsum("bn,bnd->bd", coeff, dv) / neg.shape[1] + prox * delta).astype(
        np.float32)
    return grad


def adapt(model: MetaModel, tables: ItemTables, theta0: F32, delta: F32, pos: I64,
          weight: F32, neg: I64, step_scale: F32 | None = None) -> F32:
    """``model.inner_steps`` Meta-SGD steps on one event per row; returns the new ``δ``.

    ``step_scale`` (one factor per row) enlarges the steps of users recovering from a drift.
    """
    step = model.step if step_scale is None else model.step * step_scale[:, None]
    for _ in range(model.inner_steps):
        grad = pairwise_gradient(theta0 + delta, delta, tables, pos, weight, neg, model.prox)
        delta = delta - step * grad
    return delta


def push_history(batch: UserBatch, rows: I64, items: I64, weights: F32) -> None:
    """Append one event to each of ``rows``' histories, dropping the oldest."""
    batch.hist_items[rows, :-1] = batch.hist_items[rows, 1:]
    batch.hist_weights[rows, :-1] = batch.hist_weights[rows, 1:]
    batch.hist_items[rows, -1] = items
    batch.hist_weights[rows, -1] = weights


def observe(model: MetaModel, tables: ItemTables, batch: UserBatch, rows: I64, items: I64,
            weights: npt.ArrayLike, negatives: I64, step_scale: F32 | None = None) -> None:
    """Apply one wave: each of ``rows`` adapts to its event, then records it in its history."""
    rows = np.asarray(rows, np.int64)
    w = np.asarray(weights, np.float32)
    theta0 = prior(model, tables, batch, rows)
    batch.delta[rows] = adapt(model, tables, theta0, batch.delta[rows], items, w, negatives,
                              step_scale)
    push_history(batch, rows, items, w)


def replay(model: MetaModel, tables: ItemTables, batch: UserBatch,
           rng: np.random.Generator) -> None:
    """Re-derive every row's ``δ`` from its stored history under ``model``.

    Used after a model change: the old offsets belong to the old item vectors, but the
    history is enough to adapt again from the new prior.
    """
    items, weights = batch.hist_items.copy(), batch.hist_weights.copy()
    batch.delta[:] = 0.0
    batch.hist_items[:] = -1
    batch.hist_weights[:] = 0.0
    n_items = len(tables)
    for col in range(items.shape[1]):
        rows = np.flatnonzero(items[:, col] >= 0)
        if rows.size:
            neg = sample_negatives(rng, n_items, (rows.size, model.negatives))
            observe(model, tables, batch, rows, items[rows, col], weights[rows, col], neg)


def sample_negatives(rng: np.random.Generator, n_items: int, shape: tuple[int, int]) -> I64:
    """Uniform negatives from the catalog (a sampled positive is rare and harmless)."""
    return rng.integers(0, max(n_items, 1), size=shape, dtype=np.int64)
