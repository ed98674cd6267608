"""The per-event step of metarec: adapt users to their events and rank their lists.

:class:`Learner` is the learner the product runs, with no I/O. The consumer loads a batch's
users from Redis, calls :meth:`Learner.learn_many`, and writes what it returns in one atomic
unit; ``metarec eval`` keeps the users in memory and calls the very same method, so the
numbers the evaluation prints describe the lists the services write.

Per batch the work is vectorized: the batch's events move the trending clock
(:mod:`metarec.core.trending`), users are stacked into one
:class:`~metarec.core.adaptation.UserBatch`,
events are applied in waves (at most one event per user per wave, so each user's events
keep their order), and all lists are ranked with one matrix product and one top-K. A list
scores ``V θ_u + b + Σ_s β[c_u, s] log(1 + p_s) + γ[c_u] knn_u``: the user's adapted
vector against the item vectors, the trending prior, and the votes of the neighbours of
the user's recent items (:mod:`metarec.core.neighbors`), the last two weighted for the user's
history length ``c_u``.

Before a model exists, lists are the trending items of the user's domain. Users adapted
under another model version are re-derived from their stored history before anything else
(a hot reload costs nothing until a user is touched). Each event's item is looked up in the
list the user had before it: that is the live HR@K, which also drives drift detection
(:class:`~metarec.core.drift.DriftMonitor`).

>>> learner = Learner(top_k=2, history_length=3)
>>> for item in ("a", "b", "c"):
...     _ = learner.register(item)
>>> batch = EventBatch(["u1", "u2"], np.array([0, 2]), np.array([1.0, 1.0], np.float32),
...                    np.array([10, 11]), ["default", "default"])
>>> out = learner.learn_many(batch, {}, {})
>>> out.lists["u1"].items.tolist(), out.states["u1"].n_events   # trending, minus seen
([2, 1], 1)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from metarec.config import DEFAULT_HISTORY_LENGTH, DEFAULT_TOP_K, EXACT_MAX_ITEMS
from metarec.core.adaptation import (
    UserBatch,
    observe,
    push_history,
    replay,
    user_keys,
    user_vectors,
    waves,
)
from metarec.core.candidates import (
    DOMAIN_CANDIDATES,
    NEIGHBOR_CANDIDATES,
    PERSONAL_CANDIDATES,
    TRENDING_CANDIDATES,
    ItemIndex,
    rank_candidates,
    trending_candidates,
)
from metarec.core.catalog import Catalog
from metarec.core.drift import LIVE_WINDOW, DriftMonitor, RetrainRequest, respond
from metarec.core.model import ItemTables, MetaModel, history_buckets
from metarec.core.neighbors import votes
from metarec.core.ranking import leave_out, top_k
from metarec.core.reptile import PartialSums
from metarec.core.trending import CHANNELS, FIRST_EVENTS, Channel, Trending
from metarec.core.user_state import UserState
from metarec.errors import ConfigError

if TYPE_CHECKING:
    from metarec.config import Settings

__all__ = [
    "LIST_SCHEMA_VERSION",
    "RECENT_USERS",
    "REFRESH_BATCH",
    "STATE_DIM",
    "BatchOutcome",
    "EventBatch",
    "Learner",
    "RankedList",
    "score_components",
]

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

#: The version of the list records apps read (``schema_version``): 2 added each domain's
#: list (``domains``, or ``domain`` naming the only one); a record without the field is 1,
#: one list of every domain's items.
LIST_SCHEMA_VERSION = 2
#: Size of a new user's offset before any model exists (the trainer's default ``dim``);
#: once a model is served its own dimension wins and older offsets are re-derived.
STATE_DIM = 32
#: Most recently active users whose lists are refreshed after a model change (a consumer
#: does it in the background, between batches, :data:`REFRESH_BATCH` at a time); the
#: others get a fresh list with their next event.
RECENT_USERS = 20_000
REFRESH_BATCH = 500


def score_components(channels: Sequence[Channel] = CHANNELS) -> tuple[str, ...]:
    """The names of the score's terms: the adapted user vector (``user``), the item bias
    (``bias``), the neighbours' votes (``knn``) and one popularity term per trending
    channel (``pop-NAME``).

    >>> score_components()[:3]
    ('user', 'bias', 'knn')
    """
    return ("user", "bias", "knn", *(f"pop-{c.name}" for c in channels))


@dataclass(frozen=True)
class EventBatch:
    """Events as parallel columns, in stream order: what :meth:`Learner.learn_many` takes.

    ``items`` are catalog indices and ``weights`` the event types' weights (negative for a
    dislike).
    """

    users: list[str]
    items: I64
    weights: F32
    ts: I64
    domains: list[str]

    def __len__(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class RankedList:
    """A user's top-K: catalog indices, best first, and their scores; with more than one
    domain in the catalogue, also the top-K of each domain (``domains``)."""

    items: I64
    scores: F32
    domains: dict[str, RankedList] = field(default_factory=dict)


@dataclass
class BatchOutcome:
    """Everything one batch changes, ready to be written atomically."""

    states: dict[str, UserState]
    lists: dict[str, RankedList]
    partials: PartialSums
    #: Per event: the 0-based rank of its item in the list the user had before it (-1 if
    #: absent): the live prequential quality of the lists.
    hit_rank: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    #: Users found to have drifted in this batch (their history was cut at the change).
    drifted: list[str] = field(default_factory=list)
    #: What the batch added to each trending channel (item → weight), for the shared copy.
    trending: list[dict[int, float]] = field(default_factory=list)


class Learner:
    """Adapts users to their events and ranks their lists (see the module docstring).

    Parameters
    ----------
    top_k
        Length of every list.
    history_length
        Events kept per user (the prior's input; replayed after a model change).
    seed
        Keys the negatives of every inner-loop step
        (:func:`~metarec.core.adaptation.sample_negatives`).
    live_window
        Events per rolling window of the live quality metrics.
    channels
        The trending channels (:mod:`metarec.core.trending`); a model must have been trained
        with as many.
    handle_drift
        React to users and domains whose live hits show a change (the services do; the
        drift scenario turns it off for its comparison).
    exact_max_items
        Catalogues up to this size are scored exactly; bigger ones score each user's
        candidates only (:mod:`metarec.core.candidates`).
    components
        The terms of the score that rank lists (:func:`score_components`; all by default).
        Everything else runs as always: a subset shows what one part of the blend does
        alone (``metarec eval --methods metarec:knn``).
    """

    def __init__(
        self,
        *,
        top_k: int = DEFAULT_TOP_K,
        history_length: int = DEFAULT_HISTORY_LENGTH,
        seed: int = 0,
        live_window: int = LIVE_WINDOW,
        channels: Sequence[Channel] = CHANNELS,
        handle_drift: bool = True,
        exact_max_items: int = EXACT_MAX_ITEMS,
        components: Collection[str] | None = None,
    ) -> None:
        self.top_k = top_k
        self.history_length = history_length
        self.seed = seed
        self.live_window = live_window
        self.channels = tuple(channels)
        self.handle_drift = handle_drift
        self.exact_max_items = exact_max_items
        known = score_components(channels)
        self.components = tuple(known if components is None else components)
        unknown = sorted(set(self.components) - set(known))
        if unknown or not self.components:
            raise ConfigError(
                f"unknown score component(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(known)}"
            )
        self._channel_mask = np.array(
            [f"pop-{c.name}" in self.components for c in channels], np.float32
        )
        self.catalog = Catalog()
        self.model: MetaModel | None = None
        self.tables: ItemTables | None = None
        self.trending = Trending(channels)
        self.drift = DriftMonitor(k=top_k, window=live_window)
        self._item_domain = np.zeros(0, np.int64)
        self._features: tuple[tuple[object, ...], F32] | None = None
        # The candidate index and the model it indexes (see _item_index); the shared score
        # part per history bucket and its best items, cached per trending clock.
        self._index: tuple[MetaModel, ItemIndex] | None = None
        self._shared: tuple[tuple[object, ...], F32, I64] | None = None
        self._domain_candidates: tuple[F32, int, I64] | None = None
        # Withdrawn item ids, and their catalog indices for the catalogue's size.
        self._withdrawn: frozenset[str] = frozenset()
        self._withdrawn_at: tuple[int, I64] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        handle_drift: bool = True,
        components: Collection[str] | None = None,
    ) -> Learner:
        """The learner a consumer runs under ``settings``."""
        return cls(
            top_k=settings.top_k,
            history_length=settings.history_length,
            seed=settings.seed,
            handle_drift=handle_drift,
            exact_max_items=settings.exact_max_items,
            components=components,
        )

    @property
    def version(self) -> int:
        """The served model version; 0 before any model exists (trending only)."""
        return 0 if self.model is None else self.model.version

    # -- catalog and model ------------------------------------------------------------

    def register(
        self, item: str, domain: str | None = None, features: Sequence[str] | None = None
    ) -> int:
        """Add ``item`` to the catalog (or update its metadata); returns its index."""
        n = len(self.catalog)
        idx = self.catalog.add(item, domain, features)
        if idx == n:
            self._item_domain = np.r_[self._item_domain, self.catalog.domain_indices()[idx]]
            if self.model is not None and self.tables is not None:
                self.tables = self.tables.extend(self.model.item_tables(self.catalog, n))
        elif domain is not None or features is not None:
            self._item_domain = self.catalog.domain_indices()
            if self.model is not None:
                self.tables = self.model.item_tables(self.catalog)
        return idx

    def add_items(self, rows: Iterable[tuple[int, str, str, tuple[str, ...]]]) -> None:
        """Mirror registry rows ``(index, item, domain, features)``, in index order."""
        start = len(self.catalog)
        changed = False
        for index, item, domain, features in rows:
            known = index < len(self.catalog)
            got = self.catalog.add(item, domain, features)
            if got != index:
                raise ValueError(
                    f"registry index {index} of item {item!r} does not match the "
                    f"local catalog ({got}); rows must arrive in index order"
                )
            changed |= known
        self._item_domain = self.catalog.domain_indices()
        if self.model is None:
            return
        if changed or self.tables is None:
            self.tables = self.model.item_tables(self.catalog)
        elif len(self.catalog) > start:
            self.tables = self.tables.extend(self.model.item_tables(self.catalog, start))

    def withdraw(self, items: Collection[str]) -> None:
        """Recommend none of ``items`` (ids; replaces the last call's set): items their
        item records withdrew. Ids not in the catalogue yet count once registered.

        >>> learner = Learner(top_k=3)
        >>> learner.add_items([(0, "a", "books", ()), (1, "b", "books", ())])
        >>> learner.withdraw({"a"})
        >>> learner.newcomer_lists(["books"])["books"].items.tolist()
        [1]
        """
        self._withdrawn = frozenset(items)
        self._withdrawn_at = None

    def load(self, model: MetaModel) -> RetrainRequest | None:
        """Serve ``model`` from now on (a hot reload rebuilds the item tables once).

        Returns a request for the next cycle while the lists are recovering from a drift.
        """
        if model.trend_channels != self.trending.n_channels:
            raise ValueError(
                f"model version {model.version} weighs {model.trend_channels} "
                f"trending channels; this learner keeps "
                f"{self.trending.n_channels}"
            )
        self.model = model
        self.tables = model.item_tables(self.catalog)
        if not self.handle_drift:
            return None
        if model.info.get("drift") == "refuted":
            self.drift.refuted()
        return self.drift.after_reload()

    # -- the step ---------------------------------------------------------------------

    def learn_many(
        self,
        batch: EventBatch,
        states: Mapping[str, UserState | None],
        profiles: Mapping[str, Sequence[str] | None],
    ) -> BatchOutcome:
        """Adapt every touched user to their events (in order) and rank fresh lists.

        ``states`` may lack a user or map them to None (first event ever). With a model,
        a user whose live hits show a change is cut back to their history since it, and
        adapts with larger steps (:func:`metarec.core.drift.respond`).
        """
        users = list(dict.fromkeys(batch.users))
        row_of = {u: r for r, u in enumerate(users)}
        loaded = {u: states.get(u) or self.new_state() for u in users}
        # Trending counts every positive event once; the newcomers' channel those among
        # their user's first FIRST_EVENTS.
        seen = {u: loaded[u].n_events for u in users}
        first = np.zeros(len(batch), bool)
        for pos, u in enumerate(batch.users):
            first[pos] = seen[u] < FIRST_EVENTS
            seen[u] += 1
        increments = self.trending.increments(
            batch.items, np.where(batch.weights > 0, 1.0, 0.0), first
        )
        self.trending.clock += len(batch)
        self.trending.add(increments, self.trending.clock)
        ub = self._stack(users, loaded, profiles)
        self._rederive_stale(users, loaded, ub)
        rows_all = np.fromiter((row_of[u] for u in batch.users), np.int64, len(batch))
        hist_ts = np.stack(
            [_right_align(loaded[u].hist_ts, ub.hist_items.shape[1], 0) for u in users]
        )
        hit_rank = _ranks_in_lists([loaded[u].recs for u in users], rows_all, batch.items)
        drifted: list[str] = []
        model, tables = self.model, self.tables
        # Users are cut back to a change only once a model of the new regime has shown it
        # is one (metarec.training.retraining): until then, no change dates their history.
        confirmed = model is not None and model.info.get("floor_ts") is not None
        since = self.drift.since if confirmed else {}
        for wave in waves(rows_all):
            rows, its, w = rows_all[wave], batch.items[wave], batch.weights[wave]
            if model is not None and tables is not None:
                ub.domain[rows] = [model.domain_index(batch.domains[p]) for p in wave.tolist()]
                for pos, r in zip(wave.tolist(), rows.tolist(), strict=True):
                    g = batch.domains[pos]
                    if self.handle_drift and respond(
                        self.drift.users,
                        ub,
                        r,
                        users[r],
                        bool(hit_rank[pos] >= 0),
                        hist_ts[r],
                        since.get(g),
                        self.drift.live.baseline(g),
                        loaded[users[r]].n_events,
                    ):
                        drifted.append(users[r])
                scale = self.drift.users.step_scale([users[r] for r in rows.tolist()])
                observe(model, tables, ub, rows, its, w, seed=self.seed, step_scale=scale)
            else:
                push_history(ub, rows, its, w)
            hist_ts[rows, :-1] = hist_ts[rows, 1:]
            hist_ts[rows, -1] = batch.ts[wave]
        applied = np.bincount(rows_all, minlength=len(users)).astype(np.float64)
        partials = PartialSums.zeros(1, ub.delta.shape[1])
        if model is not None:
            partials.add(ub.domain, ub.delta, applied)
        # Each user's event positions, in order (one sort, not one scan per user).
        order = np.argsort(rows_all, kind="stable")
        by_user = np.split(order, np.cumsum(applied.astype(np.int64))[:-1])
        for r, user in enumerate(users):
            st, mine = loaded[user], by_user[r]
            st.delta = ub.delta[r].copy()
            st.hist_items = ub.hist_items[r].copy()
            st.hist_weights = ub.hist_weights[r].copy()
            st.hist_ts = hist_ts[r].copy()
            st.add_seen(batch.items[mine])
            st.n_events += int(mine.size)
            st.last_ts = max(st.last_ts, int(batch.ts[mine].max()))
            st.domain = batch.domains[int(mine[-1])]
            st.model_version = self.version
        lists = self._rank(users, loaded, ub)
        return BatchOutcome(
            states=loaded,
            lists=lists,
            partials=partials,
            hit_rank=hit_rank,
            drifted=drifted,
            trending=increments,
        )

    def observe(self, batch: EventBatch, outcome: BatchOutcome) -> list[RetrainRequest]:
        """Feed a written batch's live hits to the drift monitor; returns its requests.

        Call it once the batch's effects are stored (a batch fenced off by a newer owner of
        the partition was never shown to anyone). Before a model exists there is nothing
        to retrain, so changes only update the metrics.
        """
        reqs = self.drift.observe(
            batch.domains, outcome.hit_rank.tolist(), batch.ts.tolist(), batch.users
        )
        return reqs if self.model is not None and self.handle_drift else []

    def refresh(
        self,
        users: Sequence[str],
        states: Mapping[str, UserState],
        profiles: Mapping[str, Sequence[str] | None],
    ) -> dict[str, RankedList]:
        """Bring ``users`` to the served model without new events and re-rank them.

        Updates the states in place (a hot reload's stale lists are refreshed this way).
        """
        ub = self._stack(users, states, profiles)
        self._rederive_stale(users, states, ub)
        for r, user in enumerate(users):
            states[user].delta = ub.delta[r].copy()
            states[user].model_version = self.version
        return self._rank(users, states, ub)

    def scores(
        self,
        users: Sequence[str],
        states: Mapping[str, UserState],
        profiles: Mapping[str, Sequence[str] | None],
        domains: Sequence[str] | None = None,
    ) -> F32:
        """Scores of every catalog item for ``users``: ``(len(users), n_items)``.

        ``domains`` asks for the lists of another domain than each user's last one (the
        domain the user is acting in now). Stale users are re-derived first, in place.
        Consumed items are not excluded here. A big catalogue's lists are chosen among
        candidates (:mod:`metarec.core.candidates`), so items that are no candidate score
        ``-inf``: these are the scores the lists are ranked by.
        """
        ub = self._stack(users, states, profiles)
        self._rederive_stale(users, states, ub)
        for r, user in enumerate(users):
            states[user].delta = ub.delta[r].copy()
            states[user].model_version = self.version
        if not self._big():
            return self._scores(users, states, ub, domains)
        if domains is not None:
            assert self.model is not None
            ub.domain[:] = [self.model.domain_index(g) for g in domains]
        names = domains if domains is not None else [states[u].domain for u in users]
        idx, vals = self._rank_candidates(ub, names, [], None)
        out = np.full((len(users), len(self.catalog)), -np.inf, np.float32)
        rows = np.broadcast_to(np.arange(len(users))[:, None], idx.shape)
        ok = idx >= 0
        out[rows[ok], idx[ok]] = vals[ok]
        return out

    def list_records(
        self, lists: Mapping[str, RankedList], states: Mapping[str, UserState], now_ms: int
    ) -> dict[str, bytes]:
        """The ``recs:{user}`` JSON that apps read (the list contract), for each of ``lists``.

        Written by hand, not by ``json.dumps`` of dicts: there is one per touched user per
        batch, and the ids come pre-quoted from the catalog. Same compact JSON either way.
        Scores keep 4 significant digits, rounded for the whole batch at once: the list's
        order is the ranking, and Redis memory per user is mostly this string and the
        state.

        >>> learner = Learner(top_k=2)
        >>> learner.add_items([(0, "a", "default", ()), (1, "b", "default", ())])
        >>> state = learner.new_state()
        >>> ranked = RankedList(np.array([1, 0]), np.array([3.14159, -0.000123456], np.float32))
        >>> learner.list_records({"u1": ranked}, {"u1": state}, now_ms=5)["u1"]
        b'{"schema_version":2,"user":"u1","items":["b","a"],"scores":[3.142,-0.0001235],"model_version":0,"events":0,"updated_ms":5,"domain":"default"}'
        """
        users = list(lists)
        version = "null" if self.version is None else str(int(self.version))
        tail = f'],"model_version":{version},"events":'
        columns = self.catalog.domain_columns()
        names = list(columns) if len(columns) > 1 else []
        # One rounding for the batch: the lists' scores, then each domain's, user by user.
        parts = [lists[u].scores for u in users]
        parts += [lists[u].domains[g].scores for u in users for g in names if g in lists[u].domains]
        flat = np.concatenate([*parts, np.zeros(0, np.float32)]).astype(np.float64)
        rounded: Iterator[float] = iter(significant(flat, 4).tolist())
        if names:
            ending = ""  # the domains' lists follow
        elif columns:
            ending = f',"domain":{json.dumps(next(iter(columns)), ensure_ascii=False)}}}'
        else:
            ending = "}"
        out: dict[str, bytes] = {}
        for user in users:
            ranked = lists[user]
            out[user] = (
                f'{{"schema_version":{LIST_SCHEMA_VERSION},'
                f'"user":{json.dumps(user, ensure_ascii=False)},'
                f'"items":[{self.catalog.json_ids(ranked.items.tolist())}],'
                f'"scores":[{self._scores_json(rounded, ranked.scores.size)}{tail}'
                f'{int(states[user].n_events)},"updated_ms":{int(now_ms)}{ending}'
            ).encode()
        quoted = {g: json.dumps(g, ensure_ascii=False) for g in names}
        for user in users if names else ():
            domains = lists[user].domains
            each = ",".join(
                f'{quoted[g]}:{{"items":[{self.catalog.json_ids(domains[g].items.tolist())}],'
                f'"scores":[{self._scores_json(rounded, domains[g].scores.size)}]}}'
                for g in names
                if g in domains
            )
            out[user] += f',"domains":{{{each}}}}}'.encode()
        return out

    @staticmethod
    def _scores_json(rounded: Iterator[float], n: int) -> str:
        """The next ``n`` of a batch's rounded scores, as the inside of a JSON array."""
        return ",".join(map(repr, itertools.islice(rounded, n)))

    def newcomer_lists(self, domains: Sequence[str] | None = None) -> dict[str, RankedList]:
        """The list a user with no events and no profile gets in each of ``domains`` (all
        the catalogue's domains by default): the fallback apps show before a user's first
        event is applied, ranked by the same score as every other list.

        >>> learner = Learner(top_k=2)
        >>> learner.add_items([(0, "a", "books", ()), (1, "b", "music", ())])
        >>> {d: r.items.tolist() for d, r in learner.newcomer_lists(["books"]).items()}
        {'books': [0]}
        """
        names = list(self.catalog.domains.names if domains is None else domains)
        states: dict[str, UserState] = {}
        for name in names:
            states[name] = self.new_state()
            states[name].domain = name
        return self.refresh(names, states, {}) if names else {}

    def fallback_records(
        self,
        lists: Mapping[str, RankedList],
        now_ms: int,
    ) -> dict[str, bytes]:
        """The JSON of each domain's fallback list (``newcomer_lists``): the user list's
        format with ``domain`` in place of ``user`` and no ``events``.

        >>> learner = Learner(top_k=1)
        >>> learner.add_items([(0, "a", "books", ())])
        >>> learner.fallback_records(learner.newcomer_lists(["books"]), now_ms=5)["books"]
        b'{"schema_version":2,"domain":"books","items":["a"],"scores":[0.0],"model_version":0,"updated_ms":5}'
        """
        return {domain: self._fallback_json(domain, r, now_ms) for domain, r in lists.items()}

    def global_fallback_record(self, lists: Mapping[str, RankedList], now_ms: int) -> bytes:
        """The JSON of the fallback of every domain together (``"domain": null``): the
        best of the domains' newcomer lists by score (every list is scored alike), for an
        app whose domain has no fallback yet.

        >>> learner = Learner(top_k=2)
        >>> learner.add_items([(0, "a", "books", ()), (1, "b", "music", ())])
        >>> learner.global_fallback_record(learner.newcomer_lists(), now_ms=5)
        b'{"schema_version":2,"domain":null,"items":["a","b"],"scores":[0.0,0.0],"model_version":0,"updated_ms":5}'
        """
        ranked = [r for r in lists.values() if r.items.size]
        items = np.concatenate([r.items for r in ranked]) if ranked else np.zeros(0, np.int64)
        scores = np.concatenate([r.scores for r in ranked]) if ranked else np.zeros(0, np.float32)
        best = np.argsort(-scores, kind="stable")[: self.top_k]
        return self._fallback_json(None, RankedList(items[best], scores[best]), now_ms)

    def _fallback_json(self, domain: str | None, ranked: RankedList, now_ms: int) -> bytes:
        version = "null" if self.version is None else str(int(self.version))
        scores = significant(ranked.scores.astype(np.float64), 4).tolist()
        return (
            f'{{"schema_version":{LIST_SCHEMA_VERSION},'
            f'"domain":{json.dumps(domain, ensure_ascii=False)},'
            f'"items":[{self.catalog.json_ids(ranked.items.tolist())}],'
            f'"scores":[{",".join(map(repr, scores))}],'
            f'"model_version":{version},"updated_ms":{int(now_ms)}}}'
        ).encode()

    # -- internals ----------------------------------------------------------------------

    def new_state(self) -> UserState:
        """The state of a user the learner has never seen."""
        dim = self.model.dim if self.model is not None else STATE_DIM
        length = self.model.history_length if self.model is not None else self.history_length
        state = UserState.new(dim, length)
        state.model_version = self.version
        return state

    def _trend_features(self) -> F32:
        """``log(1 + p_s)`` of every catalog item, cached until the clock moves, the
        catalogue grows or the counts are replaced."""
        key = (int(self.trending.clock), len(self.catalog), self.trending)
        cached = self._features
        if cached is None or not _same(cached[0], key):
            cached = self._features = (key, self.trending.features(len(self.catalog)))
        return cached[1]

    def _scores(
        self,
        users: Sequence[str],
        states: Mapping[str, UserState],
        ub: UserBatch,
        domains: Sequence[str] | None = None,
    ) -> F32:
        feats = self._trend_features()
        if self.model is not None and self.tables is not None:
            model = self.model
            if domains is not None:
                ub.domain[:] = [model.domain_index(g) for g in domains]
            theta = user_vectors(model, self.tables, ub)
            names = domains if domains is not None else [states[u].domain for u in users]
            bucket = history_buckets(
                self._history_in([self.catalog.domains.get(g) for g in names], ub.hist_items)
            )
            use = self.components
            out: F32 = (
                (theta * self._user_weights(bucket)[:, None]) @ self.tables.vectors.T
            ).astype(np.float32, copy=False)
            if "bias" in use:
                out += model.bias_weights[bucket][:, None] * self.tables.bias
            out += (model.trend_weights[bucket] * self._channel_mask) @ feats
            nb = self.tables.neighbors
            if nb is not None and model.knn_weights.any() and "knn" in use:
                v = min(model.knn_age_logits.size, ub.hist_items.shape[1])
                index, value = nb.votes(
                    ub.hist_items[:, -v:],
                    ub.hist_weights[:, -v:],
                    np.exp(model.knn_age_logits[:v][::-1]),
                )
                out += model.knn_weights[bucket][:, None] * votes(index, value, out.shape[1])
            return out.astype(np.float32, copy=False)
        # No model yet: what is trending within the domain of the user's event.
        out = self._trending_scores(len(users))
        names = domains if domains is not None else [states[u].domain for u in users]
        for r, g in enumerate(names):
            out[r, self._item_domain[: out.shape[1]] != self.catalog.domains.get(g)] = -np.inf
        return out

    def _trending_scores(self, rows: int) -> F32:
        """Before a model: every item's trending score, for ``rows`` users alike."""
        pop = (
            self._channel_mask @ self._trend_features() / max(1.0, float(self._channel_mask.sum()))
        )
        return np.tile(pop.astype(np.float32), (rows, 1))

    def _user_weights(self, bucket: I64) -> F32:
        """The weight of each row's adapted vector in its score (0: not a component)."""
        assert self.model is not None
        weights: F32 = self.model.user_weights[bucket]
        return weights if "user" in self.components else np.zeros_like(weights)

    def _history_in(self, domains: Sequence[int], hist_items: I64) -> I64:
        """How many of each row's history items belong to the domain it acts in: the
        weights of the score's blend follow the user's history *there* (a user entering a
        new domain is a newcomer to it)."""
        valid = hist_items >= 0
        item_domain = self._item_domain[np.where(valid, hist_items, 0)]
        counted: I64 = (valid & (item_domain == np.asarray(domains)[:, None])).sum(1)
        return counted

    def _withdrawn_indices(self) -> I64:
        """Catalog indices of the withdrawn items (cached until the catalogue grows)."""
        cached = self._withdrawn_at
        if cached is None or cached[0] != len(self.catalog):
            found = np.fromiter((self.catalog.get(i) for i in self._withdrawn), np.int64)
            cached = self._withdrawn_at = (len(self.catalog), np.sort(found[found >= 0]))
        return cached[1]

    def _big(self) -> bool:
        """Whether lists are chosen among candidates (a model and a big catalogue)."""
        return self.model is not None and len(self.catalog) > self.exact_max_items

    def _rank(
        self, users: Sequence[str], states: Mapping[str, UserState], ub: UserBatch
    ) -> dict[str, RankedList]:
        exclude = [states[u].seen for u in users]
        withdrawn = self._withdrawn_indices()
        if withdrawn.size:
            exclude = [np.concatenate([seen, withdrawn]) for seen in exclude]
        columns = self.catalog.domain_columns()
        per_domain: dict[str, tuple[I64, F32]] = {}
        if self._big():
            domains = [states[u].domain for u in users]
            if len(columns) > 1:
                # Every candidate ranked once, each domain's best among them: the list
                # of every domain is the first K, each domain's its first K of it.
                every, every_vals = self._rank_candidates(
                    ub, domains, exclude, None, each_domain=True
                )
                idx, vals = every[:, : self.top_k], every_vals[:, : self.top_k]
                of = np.append(self.catalog.domain_indices(), -1)[every]  # -1: padding
                for name in columns:
                    per_domain[name] = _first_k(
                        every, every_vals, of == self.catalog.domains.get(name), self.top_k
                    )
            else:
                idx, vals = self._rank_candidates(ub, domains, exclude, self.top_k)
        else:
            scores = self._scores(users, states, ub)
            idx, vals = top_k(scores, self.top_k, exclude)  # excluded items now score -inf
            if len(columns) > 1 and self.model is None:
                # Before a model, a user's scores cover their own domain only; each
                # domain's list is what trends in it.
                scores = self._trending_scores(len(users))
                leave_out(scores, exclude)
            if len(columns) > 1:
                for name, cols in columns.items():
                    local, local_vals = top_k(scores[:, cols], self.top_k)
                    per_domain[name] = (np.where(local >= 0, cols[local], -1), local_vals)
        # Padding (-1) trails each row: a list is the row's first ``count`` entries.
        count = (idx >= 0).sum(axis=1).tolist()
        shelves = [
            (name, d_idx, d_vals, (d_idx >= 0).sum(axis=1).tolist())
            for name, (d_idx, d_vals) in per_domain.items()
        ]
        out: dict[str, RankedList] = {}
        for r, user in enumerate(users):
            ranked = RankedList(idx[r, : count[r]], vals[r, : count[r]])
            for name, d_idx, d_vals, d_count in shelves:
                ranked.domains[name] = RankedList(d_idx[r, : d_count[r]], d_vals[r, : d_count[r]])
            states[user].recs = ranked.items
            out[user] = ranked
        return out

    def _rank_candidates(
        self,
        ub: UserBatch,
        domains: Sequence[str],
        exclude: Sequence[npt.NDArray[np.int64]],
        k: int | None,
        each_domain: bool = False,
    ) -> tuple[I64, F32]:
        """The best ``k`` (None: all) of each row's candidates, by the exact score;
        ``each_domain`` adds every domain's best shared-score items to the candidates, so
        that each domain's list has items to choose from."""
        model, tables = self.model, self.tables
        assert model is not None and tables is not None
        theta = user_vectors(model, tables, ub)
        bucket = history_buckets(
            self._history_in([self.catalog.domains.get(g) for g in domains], ub.hist_items)
        )
        shared, popular = self._shared_part()
        parts = [self._item_index().search(theta, PERSONAL_CANDIDATES), popular[bucket]]
        if each_domain:
            parts.append(self._domain_popular(shared)[bucket])
        knn = None
        nb = tables.neighbors
        if nb is not None and model.knn_weights.any() and "knn" in self.components:
            v = min(model.knn_age_logits.size, ub.hist_items.shape[1])
            index, value = nb.votes(
                ub.hist_items[:, -v:],
                ub.hist_weights[:, -v:],
                np.exp(model.knn_age_logits[:v][::-1]),
            )
            knn = (index, value, model.knn_weights[bucket].astype(np.float32))
            parts.append(index[:, :, :NEIGHBOR_CANDIDATES].reshape(len(theta), -1))
        candidates = np.hstack(parts)
        return rank_candidates(
            theta * self._user_weights(bucket)[:, None],
            bucket,
            tables.vectors,
            shared,
            candidates,
            candidates.shape[1] if k is None else k,
            exclude,
            knn,
        )

    def _domain_popular(self, shared: F32) -> I64:
        """Per history bucket, the best items of every domain by the shared score (the
        per-domain lists' candidates beside the personal ones), cached with ``shared``."""
        cached = self._domain_candidates
        revision = self.catalog.domain_revision
        if cached is None or cached[0] is not shared or cached[1] != revision:
            best = [
                cols[trending_candidates(shared[:, cols], DOMAIN_CANDIDATES)]
                for cols in self.catalog.domain_columns().values()
            ]
            cached = self._domain_candidates = (shared, revision, np.hstack(best))
        return cached[2]

    def _shared_part(self) -> tuple[F32, I64]:
        """Per history bucket: bias plus trending prior of every item, and its best items.

        Cached until the clock moves, the catalogue grows, or the model, its tables or the
        trending counts are replaced (a reload or a refresh of the shared counts).
        """
        model, tables = self.model, self.tables
        assert model is not None and tables is not None
        key = (int(self.trending.clock), len(self.catalog), model, tables, self.trending)
        cached = self._shared
        if cached is None or not _same(cached[0], key):
            blend = (model.trend_weights * self._channel_mask) @ self._trend_features()
            if "bias" in self.components:
                blend += model.bias_weights[:, None] * tables.bias
            shared: F32 = blend.astype(np.float32)
            cached = self._shared = (key, shared, trending_candidates(shared, TRENDING_CANDIDATES))
        return cached[1], cached[2]

    def _item_index(self) -> ItemIndex:
        """The candidate index of the served model (built at the first big list after a
        reload; items registered since are appended).

        An item whose metadata changed keeps its indexed vector until the next model
        version: the index only proposes candidates, their scores come from the current
        tables, and rebuilding it on every metadata update would cost a second per 100k
        items.
        """
        tables, model = self.tables, self.model
        assert tables is not None and model is not None
        if self._index is None or self._index[0] is not model:
            self._index = (model, ItemIndex(tables.vectors, tables.bias, seed=self.seed))
        index = self._index[1]
        if len(index) < len(tables):
            index.extend(tables.vectors[len(index) :], tables.bias[len(index) :])
        return index

    def _stack(
        self,
        users: Sequence[str],
        states: Mapping[str, UserState],
        profiles: Mapping[str, Sequence[str] | None],
    ) -> UserBatch:
        model = self.model
        dim = model.dim if model is not None else STATE_DIM
        length = model.history_length if model is not None else self.history_length
        n = len(users)
        profile = (
            model.profile_vectors([tuple(profiles.get(u) or ()) for u in users])
            if model is not None
            else np.zeros((n, dim), np.float32)
        )
        domain = np.array(
            [model.domain_index(states[u].domain) if model else 0 for u in users], np.int64
        )
        # States written under a model of another shape start their offset afresh (it is
        # re-derived from history anyway) and keep the newest part of their history.
        hist_items = np.stack(
            [_right_align(states[u].hist_items, length, -1) for u in users]
        ).astype(np.int64)
        valid = (hist_items >= 0).sum(1)
        return UserBatch(
            delta=np.stack(
                [
                    states[u].delta if states[u].delta.size == dim else np.zeros(dim, np.float32)
                    for u in users
                ]
            ).astype(np.float32),
            hist_items=hist_items,
            hist_weights=np.stack(
                [_right_align(states[u].hist_weights, length, 0) for u in users]
            ).astype(np.float32),
            domain=domain,
            profile=profile,
            keys=user_keys(users),
            # A history cut by a drift holds fewer events than the user applied.
            events=np.maximum(np.array([states[u].n_events for u in users], np.int64), valid),
        )

    def _rederive_stale(
        self, users: Sequence[str], states: Mapping[str, UserState], ub: UserBatch
    ) -> None:
        """Replay the history of users adapted under another model version."""
        model, tables = self.model, self.tables
        if model is None or tables is None:
            return
        stale = np.array(
            [
                r
                for r, u in enumerate(users)
                if states[u].model_version != model.version and states[u].n_events > 0
            ],
            np.int64,
        )
        if stale.size:
            sub = ub.subset(stale)
            replay(model, tables, sub, self.seed)
            ub.delta[stale] = sub.delta


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Cache keys: the same objects (identity, not equality: models hold arrays)."""
    return len(a) == len(b) and all(
        x is y or (isinstance(x, int) and x == y) for x, y in zip(a, b, strict=True)
    )


def _right_align(
    values: npt.NDArray[np.generic],
    length: int,
    fill: float,
) -> npt.NDArray[np.generic]:
    if values.size >= length:
        return values[values.size - length :]
    padded: npt.NDArray[np.generic] = np.concatenate(
        (np.full(length - values.size, fill, values.dtype), values)
    )
    return padded


def significant(values: npt.NDArray[np.float64], digits: int) -> npt.NDArray[np.float64]:
    """``values`` rounded to ``digits`` significant digits, each the float nearest to its
    decimal (so ``repr`` prints the short form); zeros and non-finite values unchanged.

    >>> significant(np.array([3.14159, 123456.0, -0.000123456, 0.0]), 4).tolist()
    [3.142, 123500.0, -0.0001235, 0.0]
    """
    finite = np.isfinite(values) & (values != 0)
    safe = np.where(finite, np.abs(values), 1.0)
    shift = (digits - 1 - np.floor(np.log10(safe))).astype(np.int64)
    up = 10.0 ** np.maximum(shift, 0)  # exact powers of ten for the usual magnitudes
    down = 10.0 ** np.maximum(-shift, 0)
    with np.errstate(over="ignore", invalid="ignore"):  # denormals: left as they are
        rounded = np.where(shift >= 0, np.round(values * up) / up, np.round(values / down) * down)
    out: npt.NDArray[np.float64] = np.where(finite & np.isfinite(rounded), rounded, values)
    return out


def _first_k(items: I64, scores: F32, mine: npt.NDArray[np.bool_], k: int) -> tuple[I64, F32]:
    """The first ``k`` entries of each row where ``mine`` holds (rows ranked best first),
    padded with -1 / -inf like :func:`metarec.core.ranking.top_k`.

    >>> items = np.array([[4, 7, 5, 9]]); scores = np.array([[4.0, 3.0, 2.0, 1.0]], np.float32)
    >>> _first_k(items, scores, np.array([[False, True, False, True]]), 3)[0].tolist()
    [[7, 9, -1]]
    """
    keep = mine & (np.cumsum(mine, axis=1) <= k)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    out = np.where(kept, np.take_along_axis(items, order, axis=1), -1)
    vals = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
    if out.shape[1] < k:
        pad = ((0, 0), (0, k - out.shape[1]))
        out = np.pad(out, pad, constant_values=-1)
        vals = np.pad(vals, pad, constant_values=-np.inf)
    return out.astype(np.int64), vals.astype(np.float32)


def _ranks_in_lists(lists: Sequence[I64], rows: I64, items: I64) -> I64:
    """Where each event's item sat in its user's last list (``lists[rows[e]]``); -1 where
    it was not in it.

    >>> _ranks_in_lists([np.array([5, 7]), np.array([], np.int64)], np.array([0, 0, 1]),
    ...                 np.array([7, 9, 5])).tolist()
    [1, -1, -1]
    """
    width = max((len(x) for x in lists), default=0)
    if not width or not rows.size:
        return np.full(rows.size, -1, np.int64)
    table = np.full((len(lists), width), -1, np.int64)
    for r, shown in enumerate(lists):
        table[r, : len(shown)] = shown
    match = table[rows] == items[:, None]
    ranks: I64 = np.where(match.any(axis=1), match.argmax(axis=1), -1)
    return ranks
