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

Negatives are drawn from a counter-based generator keyed by the user, the number of the
user's event and the seed (:func:`sample_negatives`), not from a shared stream of random
numbers: a user's adaptation then depends only on their own events and the model, never on
which other users shared their batch, how the stream was partitioned or when a re-derivation
ran. That is what lets the consumer and ``metarec eval`` produce the very same lists.

>>> import numpy as np
>>> from metarec.core.model import ItemTables, MetaModel
>>> m = MetaModel.initial(dim=2, history_length=3, meta=False, step=0.5)
>>> t = ItemTables(np.eye(2, dtype=np.float32), np.zeros(2, np.float32),
...                np.eye(2, dtype=np.float32))
>>> b = UserBatch.empty(1, m)
>>> observe(m, t, b, np.array([0]), np.array([0]), np.array([1.0]), seed=0)
>>> bool(user_vectors(m, t, b)[0] @ (t.vectors[0] - t.vectors[1]) > 0)
True
>>> b.hist_items.tolist(), b.events.tolist()
([[-1, -1, 0]], [1])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from metarec.core.model import ItemTables, MetaModel

__all__ = [
    "UserBatch",
    "adapt",
    "observe",
    "pairwise_gradient",
    "prior",
    "push_history",
    "replay",
    "sample_negatives",
    "user_keys",
    "user_vectors",
    "waves",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
#: Keeps the pooled history finite for users whose history weights cancel out.
_EPS = 1e-6


@dataclass
class UserBatch:
    """The adaptable state of ``B`` users, one row each.

    ``hist_items`` is right-aligned (the newest event in the last column, ``-1`` padding on
    the left) so a column's age is the same for every user; ``hist_weights`` holds the event
    type weights of those events. ``keys`` (a stable hash of each user id, see
    :func:`user_keys`) and ``events`` (how many events each user has applied) key the
    negatives of the next event.
    """

    delta: F32
    hist_items: I64
    hist_weights: F32
    domain: I64
    profile: F32
    keys: U64 = field(default_factory=lambda: np.zeros(0, np.uint64))
    events: I64 = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        n = len(self.delta)
        if self.keys.size != n:
            self.keys = np.zeros(n, np.uint64)
        if self.events.size != n:
            self.events = (self.hist_items >= 0).sum(1).astype(np.int64)

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

    def subset(self, rows: I64) -> UserBatch:
        """A copy of ``rows``."""
        return UserBatch(
            self.delta[rows],
            self.hist_items[rows],
            self.hist_weights[rows],
            self.domain[rows],
            self.profile[rows],
            self.keys[rows],
            self.events[rows],
        )


def user_keys(users: Sequence[str]) -> U64:
    """A stable 64-bit key per user id (the same in every process and Python run)."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(u.encode("utf-8"), digest_size=8).digest(), "little")
            for u in users
        ),
        np.uint64,
        len(users),
    )


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
    occurrence[order] = np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    return [np.flatnonzero(occurrence == k) for k in range(int(occurrence.max()) + 1)]


def prior(model: MetaModel, tables: ItemTables, batch: UserBatch, rows: I64 | None = None) -> F32:
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
    age_weight = np.exp(model.age_logits[:, ::-1])[:, -items.shape[1] :]
    hist_w = batch.hist_weights[sel] * valid
    shared = np.zeros_like(out)
    for p in range(age_weight.shape[0]):
        w = hist_w * age_weight[p]
        pooled = np.einsum("bl,bld->bd", w, ctx) / (np.abs(w).sum(1, keepdims=True) + _EPS)
        shared += pooled @ model.hist_map[p]
    out += np.einsum("bd,bde->be", shared, model.domain_map[domain])
    return out.astype(np.float32)


def user_vectors(
    model: MetaModel, tables: ItemTables, batch: UserBatch, rows: I64 | None = None
) -> F32:
    """The users' current vectors ``θ_u = θ0(u) + δ_u``."""
    sel = slice(None) if rows is None else rows
    return prior(model, tables, batch, rows) + batch.delta[sel]


def pairwise_gradient(
    theta: F32, delta: F32, tables: ItemTables, pos: I64, weight: F32, neg: I64, prox: float
) -> F32:
    """Gradient of the inner-loop loss (module docstring) with respect to ``δ``.

    ``neg`` is ``(B, n)``: the loss is averaged over the ``n`` negatives of each row.
    """
    dv = tables.vectors[pos][:, None, :] - tables.vectors[neg]  # (B, n, d)
    db = tables.bias[pos][:, None] - tables.bias[neg]
    sign = np.where(weight < 0, -1.0, 1.0).astype(np.float32)[:, None]
    z = sign * (np.einsum("bd,bnd->bn", theta, dv) + db)
    coeff = -np.abs(weight)[:, None] * sign / (1.0 + np.exp(np.clip(z, -30, 30)))
    grad: F32 = (np.einsum("bn,bnd->bd", coeff, dv) / neg.shape[1] + prox * delta).astype(
        np.float32
    )
    return grad


def adapt(
    model: MetaModel,
    tables: ItemTables,
    theta0: F32,
    delta: F32,
    pos: I64,
    weight: F32,
    neg: I64,
    step_scale: F32 | None = None,
) -> F32:
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
    batch.events[rows] += 1


def observe(
    model: MetaModel,
    tables: ItemTables,
    batch: UserBatch,
    rows: I64,
    items: I64,
    weights: npt.ArrayLike,
    *,
    seed: int,
    step_scale: F32 | None = None,
) -> None:
    """Apply one wave: each of ``rows`` adapts to its event, then records it in its history."""
    rows = np.asarray(rows, np.int64)
    w = np.asarray(weights, np.float32)
    _adapt_rows(model, tables, batch, rows, items, w, batch.events[rows] + 1, seed, step_scale)
    push_history(batch, rows, items, w)


def _adapt_rows(
    model: MetaModel,
    tables: ItemTables,
    batch: UserBatch,
    rows: I64,
    items: I64,
    weights: F32,
    numbers: I64,
    seed: int,
    step_scale: F32 | None,
) -> None:
    neg = sample_negatives(batch.keys[rows], numbers, seed, len(tables), model.negatives)
    theta0 = prior(model, tables, batch, rows)
    batch.delta[rows] = adapt(
        model, tables, theta0, batch.delta[rows], items, weights, neg, step_scale
    )


def replay(model: MetaModel, tables: ItemTables, batch: UserBatch, seed: int) -> None:
    """Re-derive every row's ``δ`` from its stored history under ``model``.

    Used after a model change: the old offsets belong to the old item vectors, but the
    history is enough to adapt again from the new prior. Each event is replayed with the
    negatives it had when it was first applied (its number is known from ``events``).
    """
    items, weights = batch.hist_items.copy(), batch.hist_weights.copy()
    events = batch.events.copy()
    valid = items >= 0
    # Number of each history entry: the user's event count minus the valid entries after it.
    later: I64 = np.cumsum(valid[:, ::-1], axis=1)[:, ::-1] - valid
    numbers = events[:, None] - later
    batch.delta[:] = 0.0
    batch.hist_items[:] = -1
    batch.hist_weights[:] = 0.0
    for col in range(items.shape[1]):
        rows = np.flatnonzero(valid[:, col])
        if rows.size:
            _adapt_rows(
                model,
                tables,
                batch,
                rows,
                items[rows, col],
                weights[rows, col],
                numbers[rows, col],
                seed,
                None,
            )
            push_history(batch, rows, items[rows, col], weights[rows, col])
    batch.events[:] = events


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: U64) -> U64:
    """SplitMix64's finalizer: a bijection of 64-bit words that scrambles every bit."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    out: U64 = x ^ (x >> np.uint64(31))
    return out


def sample_negatives(
    keys: npt.ArrayLike, numbers: npt.ArrayLike, seed: int, n_items: int, k: int
) -> I64:
    """``k`` uniform negatives for each event, a pure function of (user key, event number,
    seed): ``(B, k)`` indices below ``n_items`` (a sampled positive is rare and harmless).

    >>> a = sample_negatives([7, 8], [1, 1], 0, 100, 3)
    >>> b = sample_negatives([7], [1], 0, 100, 3)
    >>> a.shape, bool((a[0] == b[0]).all()), bool((a[1] != b[0]).any())
    ((2, 3), True, True)
    """
    key = np.asarray(keys, np.uint64)
    with np.errstate(over="ignore"):
        base = _splitmix(_splitmix(key ^ np.uint64(seed)) + np.asarray(numbers, np.uint64))
        draws = _splitmix(base[:, None] + np.arange(k, dtype=np.uint64) * _GOLDEN)
    return (draws % np.uint64(max(n_items, 1))).astype(np.int64)
