"""metarec as one in-process streaming learner: the evaluator's view of the product.

:class:`OnlineMetarec` wires the same pieces the services use — the numpy inner loop and
ranking (:mod:`metarec.adaptation`, :mod:`metarec.ranking`), recency-decayed popularity,
Reptile aggregation of the users' offsets and periodic meta-training over a bounded window
of *past* events — around dense user and item indices, so ``metarec eval`` measures exactly
what the consumer and the aggregator do. Before the first model exists it ranks by
recency-decayed popularity, like the consumer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from metarec.adaptation import (
    UserBatch,
    observe,
    push_history,
    replay,
    sample_negatives,
    user_vectors,
)
from metarec.aggregation import PartialSums, reptile_update
from metarec.catalog import Catalog
from metarec.drift import UserDrift, respond
from metarec.live_quality import LiveQuality
from metarec.model import ItemTables, MetaModel
from metarec.popularity import RecencyPopularity
from metarec.ranking import top_k
from metarec.recommender import Interaction
from metarec.training import DAY_MS, MetaTrainer
from metarec.window import TrainingData

if TYPE_CHECKING:
    from metarec.evaluation import EncodedStream as StreamTables

__all__ = ["OnlineConfig", "OnlineMetarec", "metarec_factory",
           "metarec_no_meta_factory"]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class OnlineConfig:
    """When to train and how big the window is (the aggregator's schedule, in events)."""

    first_training: int = 10_000
    retrain_every: int = 10_000
    window_events: int = 100_000
    half_life_ms: float = 7 * DAY_MS
    reptile_epsilon: float = 1.0
    #: React to drift: when a domain's live hit rate drops (ADWIN), retrain from scratch on
    #: the events since, then as often as ``min_retrain_gap`` allows until the lists have
    #: recovered; cut a drifted user's history and enlarge their steps (:mod:`metarec.drift`).
    drift_handling: bool = False
    #: Fewest events between two trainings, even when drift asks for one.
    min_retrain_gap: int = 1000

    @classmethod
    def for_stream(cls, n_events: int) -> OnlineConfig:
        """A schedule of about ten training runs over a stream of ``n_events``."""
        every = int(min(10_000, max(500, n_events // 10)))
        return cls(first_training=every, retrain_every=every)


class OnlineMetarec:
    """Streaming metarec on dense indices, implementing :class:`metarec.recommender.Recommender`.

    Parameters
    ----------
    tables
        Ids and metadata of the users, items and domains the indices refer to.
    trainer
        The meta-trainer run on the past window (``meta=False`` gives the ablation).
    config
        The training schedule.
    seed
        Seeds negative sampling and training.
    """

    def __init__(self, tables: StreamTables, trainer: MetaTrainer,
                 config: OnlineConfig | None = None, seed: int = 0) -> None:
        self.tables = tables
        self.trainer = replace(trainer, seed=seed)
        self.config = config or OnlineConfig()
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.catalog = Catalog()
        for idx, item in enumerate(tables.item_ids):
            self.catalog.add(item, tables.domain_names[int(tables.item_domains[idx])],
                             tables.item_features[idx])
        self.popularity = RecencyPopularity(self.config.half_life_ms,
                                            n_items=len(tables.item_ids))
        self.model: MetaModel | None = None
        self.items: ItemTables | None = None
        self.users = UserBatch.empty(len(tables.user_ids), MetaModel.initial(
            trainer.dim, history_length=trainer.history_length))
        self.partials = PartialSums.zeros(1, trainer.dim)
        n = self.config.window_events
        self._past = np.zeros((n, 4), np.int64)  # user, item, ts, domain (ring buffer)
        self._past_w = np.zeros(n, np.float32)
        self._seen = 0
        self._last_training = 0
        self._n_items_seen = 0
        self.trainings: list[dict[str, object]] = []
        self.live = LiveQuality(k=10, window=500)
        self.user_drift = UserDrift()
        self.user_drifts = 0
        self._shown: dict[int, npt.NDArray[np.int64]] = {}
        self._drift_since: dict[int, int] = {}
        self._window_floor_ts = -(2**62)
        self._pending_drift: str | None = None
        self._hist_ts = np.zeros((len(tables.user_ids), trainer.history_length), np.int64)
        self._consumed: dict[int, set[int]] = {}

    # -- Recommender protocol -------------------------------------------------------------

    def score(self, user: int, ts: int, domain: int, n_items: int) -> F64:
        pop = self.popularity.scores(-1, ts, n_items)
        if self.model is None or self.items is None:
            return pop
        # The list is for the domain the user is acting in (the adaptation mapping M_g).
        self.users.domain[user] = self.model.domain_index(self.tables.domain_names[domain])
        theta = user_vectors(self.model, self.items, self.users, np.array([user]))[0]
        v = self.items.vectors[:n_items]
        out: F64 = (v @ theta + self.items.bias[:n_items] + self.model.trend * np.log1p(pop)
                    ).astype(np.float64)
        return out

    def learn_one(self, x: Interaction) -> None:
        self.popularity.learn_one(x.item, 0, x.ts)
        self._n_items_seen = max(self._n_items_seen, x.item + 1)
        row = np.array([x.user])
        handling = self.config.drift_handling
        user = self.tables.user_ids[x.user]
        rank = self._watch_domain(x) if handling else -1
        if self.model is None or self.items is None:
            push_history(self.users, row, np.array([x.item]), np.array([x.weight], np.float32))
        else:
            self.users.domain[x.user] = self.model.domain_index(self.tables.domain_names[x.domain])
            if handling:
                self._react_to_drift(x, user, rank)
            neg = sample_negatives(self._rng, self._n_items_seen, (1, self.model.negatives))
            scale = self.user_drift.step_scale([user]) if handling else None
            observe(self.model, self.items, self.users, row, np.array([x.item]),
                    np.array([x.weight], np.float32), neg, scale)
            self.partials.add(self.users.domain[row], self.users.delta[row], np.ones(1))
        self._hist_ts[x.user, :-1] = self._hist_ts[x.user, 1:]
        self._hist_ts[x.user, -1] = x.ts
        k = self._seen % self.config.window_events
        self._past[k] = (x.user, x.item, x.ts, x.domain)
        self._past_w[k] = x.weight
        self._seen += 1
        if self.config.drift_handling:
            self._shown[x.user] = self._top(x.user, x.ts, x.domain, x.item)
        reason = self._due()
        if reason is not None:
            self._train(reason)

    # -- drift ----------------------------------------------------------------------------

    def _watch_domain(self, x: Interaction) -> int:
        """Rank of the item in the list this user was shown (-1: absent); a drop of the
        domain's hit rate dates the change and retrains early."""
        shown = self._shown.get(x.user)
        found = np.flatnonzero(shown == x.item) if shown is not None else np.zeros(0)
        rank = int(found[0]) if found.size else -1
        domain = self.tables.domain_names[x.domain]
        change = self.live.update(domain, rank, x.ts)
        if change is None:
            return rank
        self._drift_since[x.domain] = change
        if not [g for g in self.live.drifting_domains() if g != domain]:
            # The old regime leaves the training window; retrain as soon as enough events
            # of the new one are in (see _due). Other domains that notice the same change
            # a little later do not move the floor again: their events since it count.
            self._window_floor_ts = max(self._window_floor_ts, change)
            self._pending_drift = f"drift in domain {domain!r}"
        return rank

    def _react_to_drift(self, x: Interaction, user: str, rank: int) -> None:
        """Cut the history of a user who drifted, alone or with their domain."""
        if respond(self.user_drift, self.users, x.user, user, rank >= 0,
                   self._hist_ts[x.user], self._drift_since.get(x.domain),
                   self.live.baseline(self.tables.domain_names[x.domain]),
                   len(self._consumed.get(x.user, ()))):
            self.user_drifts += 1

    def _top(self, user: int, ts: int, domain: int, item: int, k: int = 10,
             ) -> npt.NDArray[np.int64]:
        """The top-``k`` list the user would now be shown (consumed items excluded)."""
        seen = self._consumed.setdefault(user, set())
        seen.add(item)
        scores = self.score(user, ts, domain, self._n_items_seen)
        scores[list(seen)] = -np.inf
        idx, _ = top_k(scores[None, :], k)
        shown: npt.NDArray[np.int64] = idx[0]
        return shown

    # -- training -------------------------------------------------------------------------

    def _due(self) -> str | None:
        """Why a training is due now, or None."""
        c = self.config
        if self._seen < c.first_training:
            return None
        if self.model is None:
            return "first model"
        gap = self._seen - self._last_training >= c.min_retrain_gap
        if self._pending_drift:
            enough = self._events_since(self._window_floor_ts) >= c.min_retrain_gap
            return self._pending_drift if gap and enough else None
        # Until the lists recover, each retraining on the growing new regime helps: retrain
        # as often as allowed.
        if gap and self.live.drifting_domains():
            return "recovering from drift"
        return "schedule" if self._seen - self._last_training >= c.retrain_every else None

    def _events_since(self, ts: int) -> int:
        n = min(self._seen, self.config.window_events)
        idx = np.arange(self._seen - n, self._seen) % self.config.window_events
        return int((self._past[idx, 2] >= ts).sum())

    def window(self) -> TrainingData:
        """The past events still in the window, as :class:`TrainingData` (time order)."""
        n = min(self._seen, self.config.window_events)
        start = self._seen - n
        idx = np.arange(start, self._seen) % self.config.window_events
        idx = idx[self._past[idx, 2] >= self._window_floor_ts]
        past, w = self._past[idx], self._past_w[idx]
        users, user_inv = np.unique(past[:, 0], return_inverse=True)
        items, item_inv = np.unique(past[:, 1], return_inverse=True)
        doms, dom_inv = np.unique(past[:, 3], return_inverse=True)
        t = self.tables
        return TrainingData(
            users=user_inv.astype(np.int64), items=item_inv.astype(np.int64),
            ts=past[:, 2].copy(), weights=w.copy(), domains=dom_inv.astype(np.int64),
            item_ids=[t.item_ids[i] for i in items],
            item_features=[t.item_features[i] for i in items],
            item_domains=np.searchsorted(doms, t.item_domains[items]).clip(0, len(doms) - 1),
            user_ids=[t.user_ids[u] for u in users],
            user_features=[t.user_features[u] for u in users],
            domain_names=[t.domain_names[g] for g in doms],
        )

    def _train(self, reason: str) -> None:
        init = self.model
        if reason == self._pending_drift:
            # What the model learned describes a regime that is gone; unlearning it takes
            # longer than learning the new one from scratch.
            init = None
        if init is not None and init.meta:
            init = replace(init, theta0=reptile_update(init.theta0, [self.partials],
                                                       self.config.reptile_epsilon))
        self.partials = PartialSums.zeros(1, self.trainer.dim)
        version = 1 if self.model is None else self.model.version + 1
        model = self.trainer.fit(self.window(), init=init, version=version)
        self.load(model)
        self._last_training = self._seen
        if reason == self._pending_drift:
            self._pending_drift = None
        self.trainings.append(dict(model.info, at_event=self._seen, reason=reason))

    def load(self, model: MetaModel) -> None:
        """Serve ``model`` from now on, re-deriving every user's offset from their history."""
        self.model = model
        self.items = model.item_tables(self.catalog)
        self.users.profile[:] = model.profile_vectors(self.tables.user_features)
        active = np.flatnonzero(self.users.hist_items[:, -1] >= 0)
        sub = UserBatch(self.users.delta[active], self.users.hist_items[active],
                        self.users.hist_weights[active], self.users.domain[active],
                        self.users.profile[active])
        replay(model, self.items, sub, self._rng)
        self.users.delta[active] = sub.delta


def metarec_factory(stream: StreamTables, seed: int) -> OnlineMetarec:
    """Full metarec, as ``metarec eval`` runs it."""
    return OnlineMetarec(stream, MetaTrainer(meta=True), OnlineConfig.for_stream(
        len(stream.items)), seed=seed)


def metarec_no_meta_factory(stream: StreamTables, seed: int) -> OnlineMetarec:
    """The ablation: plain init, fixed step sizes, no mappings."""
    return OnlineMetarec(stream, MetaTrainer(meta=False), OnlineConfig.for_stream(
        len(stream.items)), seed=seed)


