"""Reacting to a user whose preferences moved.

Two ways a user is found to have drifted. A :class:`UserDrift` watches each active user's
live hit stream with river's ADWIN (only for users with enough events to judge; hits are
sparse, so this catches heavy users). And when a whole domain's live hit rate shifts
(:class:`metarec.core.live_quality.LiveQuality` dates the change), a user of that domain whose
next event misses their list while their history reaches back before the change is treated
the same way. Either way the part of their history from before the change is cut (it describes
a taste they no longer have, and it is what the prior is computed from), their personal
offset restarts, and their inner-loop steps are enlarged until their hit rate is back to
90% of its level before the change. Detectors live in a bounded LRU: memory does not grow
with the number of users, and a user who falls out of it simply starts a fresh detector.

:class:`DriftMonitor` ties it together for the learner: it feeds the live hits to
:class:`~metarec.core.live_quality.LiveQuality`, dates each domain's change, and says when the
aggregator should retrain on the new regime only.

>>> d = UserDrift(min_events=5, delta=0.5)
>>> flags = [d.update("u", h) for h in [1.0] * 30 + [0.0] * 30]
>>> any(flags[:30]), any(flags[30:]), d.boosted("u")
(False, True, True)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from river import drift

from metarec.core.adaptation import UserBatch
from metarec.core.live_quality import LiveQuality

__all__ = [
    "BOOST",
    "KEEP_AFTER_DRIFT",
    "LIVE_WINDOW",
    "DriftMonitor",
    "RetrainRequest",
    "UserDrift",
    "cut_history",
    "respond",
]

#: How much larger the inner-loop steps of a drifted user are, while they recover.
BOOST = 3.0
#: The longest a boost lasts, in the user's events, if the hit rate never comes back.
MAX_BOOST_EVENTS = 30
#: Recovered means back to this share of the hit rate before the change.
RECOVERED = 0.9
#: Events kept when a user drifts: ADWIN sees a change only a handful of events after it,
#: so the newest few are the ones that already show the new taste.
KEEP_AFTER_DRIFT = 5
#: Events per rolling window of the live list-quality metrics: long enough for a steady
#: rate, short enough that a recovery shows within a few thousand events.
LIVE_WINDOW = 1000


@dataclass
class _Watch:
    detector: Any
    events: int = 0
    before: float = 0.0
    boost_left: int = 0


@dataclass
class UserDrift:
    """Per-user ADWIN over live hits, with the boost that follows a detection.

    Parameters
    ----------
    min_events
        Users with fewer observed events are not judged (their rate means little).
    delta
        ADWIN's confidence; per-user streams are short, so it is looser than per domain.
    max_users
        Detectors kept (least recently active dropped first); each is a river ADWIN of
        ~1-2 KiB, so the default bounds them to ~20 MiB whatever the number of users.
    """

    min_events: int = 10
    delta: float = 0.05
    max_users: int = 10_000
    _watch: OrderedDict[str, _Watch] = field(default_factory=OrderedDict, repr=False)

    def update(self, user: str, signal: float, n_events: int | None = None) -> bool:
        """Record one live event of ``user`` (a value in [0, 1], higher is better understood);
        returns whether the user just drifted. NaN (e.g. a dislike) is ignored.

        ``n_events`` (the user's events so far, if known) spares a detector for users who
        are too new to judge.
        """
        w = self._watch.get(user)
        if w is None and n_events is not None and n_events < self.min_events:
            return False
        if w is None:
            # clock=1: check after every event, since a user's stream is short.
            w = _Watch(drift.ADWIN(delta=self.delta, clock=1, grace_period=self.min_events))
            self._watch[user] = w
            if len(self._watch) > self.max_users:
                self._watch.popitem(last=False)
        else:
            self._watch.move_to_end(user)
        if signal != signal:  # NaN: nothing to learn from this event
            return False
        rate_before = float(w.detector.estimation)
        w.detector.update(float(signal))
        w.events += 1
        if w.boost_left:
            w.boost_left -= 1
            if w.detector.estimation >= RECOVERED * w.before:
                w.boost_left = 0
        if (
            w.events >= self.min_events
            and w.detector.drift_detected
            and w.detector.estimation < rate_before
        ):
            w.before = rate_before
            w.boost_left = MAX_BOOST_EVENTS
            return True
        return False

    def boost(self, user: str, before: float) -> None:
        """Start a boost for ``user`` (e.g. after a domain-wide change reached them)."""
        w = self._watch.get(user)
        if w is None:
            self.update(user, float("nan"))
            w = self._watch.get(user)
        if w is not None:
            w.before = before
            w.boost_left = MAX_BOOST_EVENTS

    def boosted(self, user: str) -> bool:
        """Whether ``user`` is recovering from a drift (their steps are enlarged)."""
        w = self._watch.get(user)
        return w is not None and w.boost_left > 0

    def step_scale(self, users: list[str]) -> npt.NDArray[np.float32]:
        """Per-user multiplier of the inner-loop step sizes."""
        return np.array([BOOST if self.boosted(u) else 1.0 for u in users], np.float32)


def cut_history(batch: UserBatch, row: int, keep: int = KEEP_AFTER_DRIFT) -> None:
    """Forget all but the newest ``keep`` events of ``row``, and restart its offset."""
    keep = max(0, min(keep, batch.hist_items.shape[1]))
    cut = batch.hist_items.shape[1] - keep
    batch.hist_items[row, :cut] = -1
    batch.hist_weights[row, :cut] = 0.0
    batch.delta[row] = 0.0


def respond(
    drift: UserDrift,
    batch: UserBatch,
    row: int,
    user: str,
    hit: bool,
    hist_ts: npt.NDArray[np.int64],
    since: int | None,
    baseline: float,
    n_events: int | None = None,
) -> bool:
    """React to one live event of ``user`` (row ``row`` of ``batch``); True if they drifted.

    ``since`` is when the user's domain last changed (None: it did not); ``hist_ts`` the
    timestamps of the row's history; ``baseline`` the hit rate to recover to after a
    domain-wide change. Call before adapting the user to the event.
    """
    if drift.update(user, float(hit), n_events):
        cut_history(batch, row)
        return True
    if since is None or hit:
        return False
    valid = batch.hist_items[row] >= 0
    old = valid & (hist_ts < since)
    if not old.any():
        return False
    cut_history(batch, row, keep=int((valid & ~old).sum()))
    drift.boost(user, before=baseline)
    return True


@dataclass(frozen=True)
class RetrainRequest:
    """The learner asks the aggregator for a cycle: why, and (after a change) since when.

    ``floor`` is the start of the new regime: train only on events from then on. None
    keeps the current floor (another domain already reported the same change, or the lists
    are still recovering from it).
    """

    reason: str
    floor: int | None = None


class DriftMonitor:
    """Live list quality per domain, the changes it shows, and the reactions they call for.

    Parameters
    ----------
    k
        Cut-off of the live HR@K/NDCG@K (the length of the lists apps are shown).
    window
        Events per rolling window.

    Examples
    --------
    >>> m = DriftMonitor(k=10, window=50)
    >>> reqs = m.observe(["g"] * 400, [0] * 200 + [-1] * 200, list(range(400)),
    ...                  [f"u{i % 40}" for i in range(400)])
    >>> [(r.reason.split(":")[0], r.floor is not None) for r in reqs]
    [("drift in domain 'g'", True)]
    >>> m.drifting_domains(), m.since["g"] > 200
    (['g'], True)
    """

    def __init__(self, k: int = 20, window: int = LIVE_WINDOW) -> None:
        self.k = k
        self.window = window
        self.live = LiveQuality(k=k, window=window)
        self.users = UserDrift()
        #: When each domain's latest change was detected (its events before it are stale).
        self.since: dict[str, int] = {}

    def observe(
        self, domains: list[str], ranks: list[int], ts: list[int], users: list[str]
    ) -> list[RetrainRequest]:
        """Record live hits (rank of each event's item in the list shown, -1: absent).

        Returns the retraining requests: one per newly detected change, dated at it, unless
        another domain is already recovering from the same change (no new floor then).
        """
        out: list[RetrainRequest] = []
        for g, rank, t, u in zip(domains, ranks, ts, users, strict=True):
            change = self.live.update(g, rank, t, u)
            if change is None:
                continue
            self.since[g] = change
            others = [d for d in self.live.drifting_domains() if d != g]
            out.append(
                RetrainRequest(
                    f"drift in domain {g!r}: live HR@{self.k} dropped", None if others else change
                )
            )
        return out

    def after_reload(self) -> RetrainRequest | None:
        """Each version trained on more of the new regime is better than the last: until
        the lists recover, ask for the next one straight away."""
        drifting = self.live.drifting_domains()
        return RetrainRequest(f"recovering from drift in {drifting}") if drifting else None

    def refuted(self) -> None:
        """A retraining judged the open changes to be dips, not new regimes: forget them
        (no more recovery requests, no user is cut back to them)."""
        self.live.close_episodes()
        self.since.clear()

    def drifting_domains(self) -> list[str]:
        return self.live.drifting_domains()

    def baseline(self) -> float:
        return self.live.baseline()
