"""Applying a batch of events to the users it touches: the consumer's computation.

No I/O here: the application loads the states, calls :func:`apply_events` and writes what
it returns in one atomic unit. Per batch the work is vectorized: users are stacked into one
:class:`~metarec.adaptation.UserBatch`, events are applied in waves (at most one event per
user per wave, so each user's events keep their order), and all lists are ranked with one
matrix product and one top-K.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from consumer.serving import Serving
from metarec.adaptation import (
    UserBatch,
    observe,
    push_history,
    replay,
    sample_negatives,
    user_vectors,
    waves,
)
from metarec.aggregation import PartialSums
from metarec.drift import UserDrift, respond
from metarec.events import Event
from metarec.ranking import score, top_k
from metarec.user_state import UserState

__all__ = ["BatchOutcome", "DriftWatch", "apply_events", "rank_users", "refresh_users"]

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


@dataclass
class BatchOutcome:
    """Everything one batch changes, ready to be written atomically."""

    states: dict[str, UserState]
    recs: dict[str, bytes]
    partials: PartialSums
    #: Per applied event: did its item appear in the list the user had before it, and at
    #: which 0-based rank (-1 if not): the live prequential quality of the lists.
    hit_rank: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    #: Users found to have drifted in this batch (their history was cut at the change).
    drifted: list[str] = field(default_factory=list)


@dataclass
class DriftWatch:
    """What the consumer knows about drift: per-user detectors and each domain's last
    detected change (see :mod:`metarec.drift`)."""

    users: UserDrift
    since: Mapping[str, int]
    baseline: float


def _new_state(serving: Serving, dim: int, length: int) -> UserState:
    state = UserState.new(dim, length)
    state.model_version = serving.version
    return state


def apply_events(
    serving: Serving,
    events: Sequence[Event],
    items: I64,
    states: Mapping[str, UserState | None],
    profiles: Mapping[str, Sequence[str] | None],
    *,
    weights: Mapping[str, float],
    rng: np.random.Generator,
    top_k_size: int,
    now_ms: int,
    dim: int,
    history_length: int,
    drift: DriftWatch | None = None,
) -> BatchOutcome:
    """Adapt every touched user to their events (in order) and rank fresh lists.

    ``items`` holds the registry index of each event's item. ``states`` may map a user to
    ``None`` (first event ever). Users whose state was adapted under another model version
    are first re-derived from their stored history. With ``drift``, a user whose live hits
    show a change is cut back to their history since it, and adapts with larger steps.
    """
    if serving.model is not None:
        dim, history_length = serving.model.dim, serving.model.history_length
    users = list(dict.fromkeys(e.user for e in events))
    row_of = {u: r for r, u in enumerate(users)}
    loaded = {u: states.get(u) or _new_state(serving, dim, history_length) for u in users}
    model, tables = serving.model, serving.tables
    batch = _stack(serving, users, loaded, profiles, dim, history_length)
    _rederive_stale(serving, users, loaded, batch, rng)
    rows_all = np.fromiter((row_of[e.user] for e in events), np.int64, len(events))
    w_all = np.fromiter((weights[e.type] for e in events), np.float32, len(events))
    ts_all = np.fromiter((e.ts for e in events), np.int64, len(events))
    hist_ts = np.stack([_right_align(loaded[u].hist_ts, history_length, 0) for u in users])
    hit_rank = np.full(len(events), -1, np.int64)
    drifted: list[str] = []
    for wave in waves(rows_all):
        rows, its, w = rows_all[wave], items[wave], w_all[wave]
        for pos, r, it in zip(wave, rows, its, strict=True):
            found = np.flatnonzero(loaded[users[r]].recs == it)
            hit_rank[pos] = found[0] if found.size else -1
        if model is not None and tables is not None:
            batch.domain[rows] = [model.domain_index(events[int(p)].domain) for p in wave]
            scale = None
            if drift is not None:
                for pos, r in zip(wave, rows, strict=True):
                    if respond(drift.users, batch, int(r), users[r], bool(hit_rank[pos] >= 0),
                               hist_ts[r], drift.since.get(events[int(pos)].domain),
                               drift.baseline, loaded[users[r]].n_events):
                        drifted.append(users[r])
                scale = drift.users.step_scale([users[r] for r in rows])
            neg = sample_negatives(rng, len(tables), (rows.size, model.negatives))
            observe(model, tables, batch, rows, its, w, neg, scale)
        else:
            push_history(batch, rows, its, w)
        hist_ts[rows, :-1] = hist_ts[rows, 1:]
        hist_ts[rows, -1] = ts_all[wave]
    applied = np.bincount(rows_all, minlength=len(users)).astype(np.float64)
    partials = PartialSums.zeros(1, dim)
    if model is not None:
        partials.add(batch.domain, batch.delta, applied)
    # Each user's event positions, in order (one sort, not one scan per user).
    order = np.argsort(rows_all, kind="stable")
    by_user = np.split(order, np.cumsum(np.bincount(rows_all, minlength=len(users)))[:-1])
    for r, user in enumerate(users):
        st = loaded[user]
        mine = by_user[r]
        st.delta = batch.delta[r].copy()
        st.hist_items = batch.hist_items[r].copy()
        st.hist_weights = batch.hist_weights[r].copy()
        st.hist_ts = hist_ts[r].copy()
        st.add_seen(items[mine])
        st.n_events += int(mine.size)
        st.last_ts = max(st.last_ts, int(ts_all[mine].max()))
        st.domain = events[int(mine[-1])].domain
        st.model_version = serving.version
    recs = rank_users(serving, users, loaded, batch, top_k_size=top_k_size, now_ms=now_ms)
    return BatchOutcome(states=loaded, recs=recs, partials=partials, hit_rank=hit_rank,
                        drifted=drifted)


def refresh_users(serving: Serving, users: Sequence[str], states: Mapping[str, UserState],
                  profiles: Mapping[str, Sequence[str] | None], *,
                  rng: np.random.Generator) -> UserBatch:
    """Bring ``users`` up to the served model without new events (for stale lists).

    Updates the states in place and returns their stacked batch, ready for
    :func:`rank_users`.
    """
    model = serving.model
    dim = model.dim if model is not None else 0
    length = model.history_length if model is not None else 1
    batch = _stack(serving, users, states, profiles, dim, length)
    _rederive_stale(serving, users, states, batch, rng)
    for r, user in enumerate(users):
        states[user].delta = batch.delta[r].copy()
        states[user].model_version = serving.version
    return batch


def _rederive_stale(serving: Serving, users: Sequence[str], states: Mapping[str, UserState],
                    batch: UserBatch, rng: np.random.Generator) -> None:
    """Replay the history of users adapted under another model version."""
    model, tables = serving.model, serving.tables
    if model is None or tables is None:
        return
    stale = np.array([r for r, u in enumerate(users)
                      if states[u].model_version != model.version and states[u].n_events > 0],
                     np.int64)
    if stale.size:
        sub = _subset(batch, stale)
        replay(model, tables, sub, rng)
        batch.delta[stale] = sub.delta


def rank_users(serving: Serving, users: Sequence[str], states: Mapping[str, UserState],
               batch: UserBatch, *, top_k_size: int, now_ms: int) -> dict[str, bytes]:
    """Fresh top-K lists (the ``recs:{user}`` JSON) for ``users``; updates ``state.recs``."""
    n_items = len(serving.catalog)
    latest = max((states[u].last_ts for u in users), default=now_ms)
    if serving.model is not None and serving.tables is not None:
        theta = user_vectors(serving.model, serving.tables, batch)
        scores = score(serving.tables, theta, serving.trend(latest))
    else:
        # No model yet: recency-decayed popularity within the domain of the user's event.
        pop = serving.popularity.scores(-1, latest, n_items).astype(np.float32)
        item_dom = serving.item_domains()
        scores = np.tile(pop, (len(users), 1))
        for r, u in enumerate(users):
            dom = serving.catalog.domains.get(states[u].domain)
            scores[r, item_dom[:n_items] != dom] = -np.inf
    idx, vals = top_k(scores, top_k_size, [states[u].seen for u in users])
    out: dict[str, bytes] = {}
    for r, user in enumerate(users):
        keep = idx[r] >= 0
        chosen = idx[r][keep]
        states[user].recs = chosen.astype(np.int64)
        out[user] = json.dumps({
            "user": user,
            "items": [serving.catalog.item_id(int(j)) for j in chosen],
            "scores": [round(float(v), 5) for v in vals[r][keep]],
            "model_version": serving.version,
            "events": states[user].n_events,
            "updated_ms": now_ms,
        }, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return out


def _stack(serving: Serving, users: Sequence[str], states: Mapping[str, UserState],
           profiles: Mapping[str, Sequence[str] | None], dim: int,
           history_length: int) -> UserBatch:
    model = serving.model
    n = len(users)
    profile = (model.profile_vectors([tuple(profiles.get(u) or ()) for u in users])
               if model is not None else np.zeros((n, dim), np.float32))
    domain = np.array([model.domain_index(states[u].domain) if model else 0 for u in users],
                      np.int64)
    # States written under a model of another shape start their offset afresh (it is
    # re-derived from history anyway) and keep the newest part of their history.
    return UserBatch(
        delta=np.stack([states[u].delta if states[u].delta.size == dim
                        else np.zeros(dim, np.float32) for u in users]).astype(np.float32),
        hist_items=np.stack([_right_align(states[u].hist_items, history_length, -1)
                             for u in users]).astype(np.int64),
        hist_weights=np.stack([_right_align(states[u].hist_weights, history_length, 0)
                               for u in users]).astype(np.float32),
        domain=domain,
        profile=profile,
    )


def _right_align(values: npt.NDArray[np.generic], length: int, fill: float,
                 ) -> npt.NDArray[np.generic]:
    if values.size >= length:
        return values[values.size - length:]
    padded: npt.NDArray[np.generic] = np.r_[np.full(length - values.size, fill, values.dtype),
                                            values]
    return padded


def _subset(batch: UserBatch, rows: I64) -> UserBatch:
    return UserBatch(batch.delta[rows], batch.hist_items[rows], batch.hist_weights[rows],
                     batch.domain[rows], batch.profile[rows])
