"""A window of recent events in the dense form meta-training wants.

The aggregator keeps the last ``max_events`` events it consumed (:class:`EventWindow`) and
turns them into :class:`TrainingData` for each training run; ``metarec eval`` builds
:class:`TrainingData` from the past of the stream it is scoring. Ids stay strings here so
that a model trained on a window can be served against any catalog.

>>> w = EventWindow(max_events=2)
>>> for i, item in enumerate(["a", "b", "c"]):
...     w.append("u1", item, ts=i, weight=1.0, domain="default")
>>> data = w.training_data()
>>> len(data), data.item_ids
(2, ['b', 'c'])
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from metarec.core.catalog import Vocabulary
from metarec.core.trending import FIRST_EVENTS

__all__ = ["EventWindow", "TrainingData"]

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TrainingData:
    """Events as dense arrays, in time order, with the vocabularies they index into."""

    users: I64
    items: I64
    ts: I64
    weights: F32
    domains: I64
    item_ids: list[str]
    item_features: list[tuple[str, ...]]
    item_domains: I64
    user_ids: list[str]
    user_features: list[tuple[str, ...]]
    domain_names: list[str]
    meta: dict[str, object] = field(default_factory=dict)
    #: Whether each event is among its user's first :data:`~metarec.core.trending.FIRST_EVENTS`
    #: events (counted from the first event the window's owner saw).
    first: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))

    def __len__(self) -> int:
        return int(self.items.shape[0])


class EventWindow:
    """The last ``max_events`` events, with the metadata needed to train on them."""

    def __init__(self, max_events: int) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be positive, got {max_events}")
        self.max_events = max_events
        self._events: deque[tuple[str, str, int, float, str, bool]] = deque(maxlen=max_events)
        # Events seen per user, over everything appended (not only what the window keeps):
        # whether an event is among its user's first ones outlives the event's neighbours.
        self._user_events: dict[str, int] = {}
        self.item_meta: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.user_meta: dict[str, tuple[str, ...]] = {}
        # count_since(ts) for the last ts asked, kept up to date by append: the schedule
        # asks after every event while a drift request waits.
        self._since: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._events)

    def append(self, user: str, item: str, ts: int, weight: float, domain: str) -> None:
        if self._since is not None:
            since, count = self._since
            if len(self._events) == self.max_events and self._events[0][2] >= since:
                count -= 1
            self._since = (since, count + (ts >= since))
        n = self._user_events.get(user, 0)
        self._user_events[user] = n + 1
        self._events.append((user, item, ts, weight, domain, n < FIRST_EVENTS))

    def describe_item(self, item: str, domain: str, features: Sequence[str]) -> None:
        self.item_meta[item] = (domain, tuple(features))

    def describe_user(self, user: str, features: Sequence[str]) -> None:
        self.user_meta[user] = tuple(features)

    def training_data(self, since_ts: int | None = None) -> TrainingData:
        """The window as :class:`TrainingData` (events sorted by timestamp, stably).

        ``since_ts`` leaves out the events before it: the regime before a detected change.
        """
        events = sorted(
            (e for e in self._events if since_ts is None or e[2] >= since_ts), key=lambda e: e[2]
        )
        return build_training_data(events, self.item_meta, self.user_meta)

    def count_since(self, ts: int) -> int:
        """How many of the window's events happened at ``ts`` or later."""
        if self._since is None or self._since[0] != ts:
            self._since = (ts, sum(1 for e in self._events if e[2] >= ts))
        return self._since[1]


def build_training_data(
    events: Sequence[tuple[str, str, int, float, str, bool]],
    item_meta: Mapping[str, tuple[str, tuple[str, ...]]],
    user_meta: Mapping[str, tuple[str, ...]],
) -> TrainingData:
    """Encode ``(user, item, ts, weight, domain, first)`` tuples into :class:`TrainingData`."""
    users, items, domains = Vocabulary(), Vocabulary(), Vocabulary()
    n = len(events)
    u = np.empty(n, np.int64)
    i = np.empty(n, np.int64)
    t = np.empty(n, np.int64)
    w = np.empty(n, np.float32)
    g = np.empty(n, np.int64)
    f = np.empty(n, bool)
    item_domain: list[int] = []
    for k, (user, item, ts, weight, domain, first) in enumerate(events):
        u[k] = users.index(user)
        idx = items.index(item)
        if idx == len(item_domain):
            meta = item_meta.get(item)
            item_domain.append(domains.index(meta[0] if meta else domain))
        i[k] = idx
        t[k] = ts
        w[k] = weight
        g[k] = domains.index(domain)
        f[k] = first
    return TrainingData(
        users=u,
        items=i,
        ts=t,
        weights=w,
        domains=g,
        item_ids=items.names,
        item_features=[item_meta.get(x, ("", ()))[1] for x in items.names],
        item_domains=np.asarray(item_domain, np.int64),
        user_ids=users.names,
        user_features=[user_meta.get(x, ()) for x in users.names],
        domain_names=domains.names,
        first=f,
    )
