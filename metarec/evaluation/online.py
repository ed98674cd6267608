"""metarec as ``metarec eval`` runs it: the services' own objects, driven in one process.

:class:`OnlineMetarec` holds what the services hold, built from the same default
:class:`~metarec.config.Settings`: the consumer's :class:`~metarec.core.learner.Learner` (with
the users' states in a dict instead of Redis), and the aggregator's
:class:`~metarec.core.window.EventWindow`, :class:`~metarec.training.retraining.RetrainSchedule` and
:class:`~metarec.training.retraining.Retrainer`. It passes between them what the topics and Redis
carry between the processes: events into the window, partial sums and retraining requests
(with the training floor) to the aggregator, model versions back to the learner. Nothing
here decides anything the services decide differently; what differs is only the transport
(and that each batch is one same-timestamp group of the stream, see
:mod:`metarec.evaluation.protocol`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from metarec.config import Settings
from metarec.core.drift import RetrainRequest
from metarec.core.learner import RECENT_USERS, REFRESH_BATCH, EventBatch, Learner
from metarec.core.model import MetaModel
from metarec.core.reptile import PartialSums
from metarec.core.user_state import UserState
from metarec.core.window import EventWindow
from metarec.evaluation.recommender import Interaction
from metarec.training.retraining import Retrainer, RetrainSchedule
from metarec.training.trainer import MetaTrainer

if TYPE_CHECKING:
    from metarec.evaluation.protocol import EncodedStream

__all__ = ["OnlineMetarec", "metarec_factory", "metarec_no_meta_factory"]

F64 = npt.NDArray[np.float64]


class OnlineMetarec:
    """Streaming metarec on a stream's dense indices, implementing
    :class:`metarec.evaluation.recommender.Recommender`.

    Parameters
    ----------
    stream
        Ids and metadata of the users, items and domains the indices refer to.
    settings
        The services' settings (defaults unless given): top-K, history length, window,
        retraining schedule.
    trainer
        The meta-trainer (default: the aggregator's, ``meta=False`` gives the ablation).
    seed
        Seeds the learner's negatives and the training.
    handle_drift
        React to drops of the live hit rate (the services always do; off for the drift
        scenario's comparison).
    components
        The score's terms that rank lists (all by default, as the services; a subset runs
        one part of the blend alone, :func:`metarec.core.learner.score_components`).
    """

    def __init__(
        self,
        stream: EncodedStream,
        *,
        settings: Settings | None = None,
        trainer: MetaTrainer | None = None,
        seed: int = 0,
        handle_drift: bool = True,
        components: Sequence[str] | None = None,
    ) -> None:
        s = dataclasses.replace(settings or Settings.defaults(), seed=seed)
        self.stream = stream
        self.settings = s
        self.learner = Learner.from_settings(s, handle_drift=handle_drift, components=components)
        self.window = EventWindow(s.window_events)
        self.schedule = RetrainSchedule.from_settings(s)
        self.retrainer = Retrainer(
            dataclasses.replace(trainer, seed=seed) if trainer else Retrainer.trainer_for(s)
        )
        for idx, item in enumerate(stream.item_ids):
            self.window.describe_item(
                item, stream.domain_names[int(stream.item_domains[idx])], stream.item_features[idx]
            )
        self.profiles: dict[str, Sequence[str] | None] = {}
        for uid, feats in zip(stream.user_ids, stream.user_features, strict=True):
            if feats:
                self.window.describe_user(uid, feats)
                self.profiles[uid] = feats
        self.states: dict[str, UserState] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self.partials = PartialSums.zeros(1, 1)
        self.request: str | None = None
        self.floor: int | None = None
        self.new_events = 0
        self.trainings: list[dict[str, Any]] = []
        self.user_drifts = 0

    @property
    def model(self) -> MetaModel | None:
        return self.learner.model

    # -- Recommender protocol -------------------------------------------------------------

    def score(self, user: int, ts: int, domain: int, n_items: int) -> F64:
        """The scores the learner gives ``user`` now, for the domain they act in."""
        uid = self.stream.user_ids[user]
        state = self.states.get(uid)
        if state is None:
            state = self.learner.new_state()
        scores = self.learner.scores(
            [uid], {uid: state}, self.profiles, domains=[self.stream.domain_names[domain]]
        )[0]
        out = np.zeros(n_items)
        m = min(n_items, scores.size)
        out[:m] = scores[:m]
        return out

    def learn_one(self, x: Interaction) -> None:
        self.learn_many([x])

    def learn_many(self, xs: Sequence[Interaction]) -> None:
        """One batch, as a consumer applies it, then what the aggregator does with it."""
        st = self.stream
        items = np.fromiter((self._register(x.item) for x in xs), np.int64, len(xs))
        batch = EventBatch(
            users=[st.user_ids[x.user] for x in xs],
            items=items,
            weights=np.array([x.weight for x in xs], np.float32),
            ts=np.array([x.ts for x in xs], np.int64),
            domains=[st.domain_names[x.domain] for x in xs],
        )
        outcome = self.learner.learn_many(batch, self.states, self.profiles)
        self.states.update(outcome.states)
        for u in outcome.states:
            self._recent[u] = None
            self._recent.move_to_end(u)
        while len(self._recent) > RECENT_USERS:
            self._recent.popitem(last=False)
        self.user_drifts += len(outcome.drifted)
        if self.learner.model is not None:
            self.partials = (
                self.partials.merge(outcome.partials)
                if self.partials.sums.shape[1] == outcome.partials.sums.shape[1]
                else outcome.partials
            )
        for req in self.learner.observe(batch, outcome):
            self._ask(req)
        for x in xs:
            self.window.append(
                st.user_ids[x.user], st.item_ids[x.item], x.ts, x.weight, st.domain_names[x.domain]
            )
        self.new_events += len(xs)
        reason = self.schedule.due(
            has_model=self.learner.model is not None,
            window_events=len(self.window),
            new_events=self.new_events,
            request=self.request,
            events_since_floor=None
            if self.floor is None or self.request is None
            else self.window.count_since(self.floor),
        )
        if reason is not None:
            self._cycle(reason)

    # -- what the aggregator does ---------------------------------------------------------

    def _ask(self, req: RetrainRequest) -> None:
        self.request = req.reason
        if req.floor is not None:
            self.floor = req.floor if self.floor is None else max(self.floor, req.floor)

    def _cycle(self, reason: str) -> None:
        self.request = None
        current = self.learner.model
        version = 1 if current is None else current.version + 1
        model = self.retrainer.train(self.window, current, floor=self.floor, version=version)
        if model is None:
            return
        if model.info.get("drift") == "refuted":
            self.floor = None
        model, folded = self.retrainer.fold(model, current, [self.partials])
        self.partials = PartialSums.zeros(1, 1)
        self.new_events = 0
        self.trainings.append(
            dict(model.info, at_event=self._events_seen(), reason=reason, folded_weight=folded)
        )
        req = self.learner.load(model)
        if req is not None:
            self._ask(req)
        # As a consumer does between batches: the lists of recent users, under the new model.
        recent = [u for u in self._recent if u in self.states]
        for k in range(0, len(recent), REFRESH_BATCH):
            chunk = recent[k : k + REFRESH_BATCH]
            self.learner.refresh(chunk, {u: self.states[u] for u in chunk}, self.profiles)

    def _events_seen(self) -> int:
        return sum(s.n_events for s in self.states.values())

    def _register(self, item: int) -> int:
        st = self.stream
        if item < len(self.learner.catalog):
            return item
        # Items are numbered by first appearance, so this one is the catalog's next.
        idx = self.learner.register(
            st.item_ids[item], st.domain_names[int(st.item_domains[item])], st.item_features[item]
        )
        if idx != item:
            raise ValueError(
                f"item {st.item_ids[item]!r} got index {idx}, expected {item}: "
                "items must be learned in order of first appearance"
            )
        return idx


def metarec_factory(
    stream: EncodedStream,
    seed: int,
    settings: Settings | None = None,
    components: Sequence[str] | None = None,
) -> OnlineMetarec:
    """Full metarec, as the services run it (under ``settings``, default: the defaults);
    with ``components``, ranking by those terms of its score alone."""
    return OnlineMetarec(stream, settings=settings, seed=seed, components=components)


def metarec_no_meta_factory(
    stream: EncodedStream, seed: int, settings: Settings | None = None
) -> OnlineMetarec:
    """The ablation: plain init, fixed step sizes, no mappings, one set of prior weights
    for every history length."""
    s = settings or Settings.defaults()
    return OnlineMetarec(
        stream, settings=s, trainer=Retrainer.trainer_for(s, meta=False), seed=seed
    )
