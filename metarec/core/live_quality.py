"""Live list quality: how good were the lists the apps were actually showing?

Before an event is applied, the consumer knows the list that user had at that moment (it
keeps the list's item indices in the user's state, so this costs no extra Redis read). If
the event's item is in it, that is a hit at that rank: HR@K and NDCG@K measured on the live
stream, prequentially, exactly as the offline evaluation measures them. :class:`LiveQuality`
keeps these per domain and overall over rolling windows (:class:`RollingMean`) and runs
river's ADWIN on each domain's hit stream, so a preference shift shows up as a drift.

A drop is a change only when it is large. ADWIN flags any statistically significant drop,
and a live stream has many that call for nothing: a cohort of harder users arrives, a new
model version settles (on MovieLens 100K about ten a run, of 10-30%). So a flagged drop is
only a suspicion, dated at the flag; it is confirmed when the hit rate over the next half
window of the domain's events is below :data:`DROP_RATIO` of the level before, with every
user counted for at most :data:`USER_CAP` events and at least :data:`MIN_USERS` users
among them, and forgotten otherwise. (A single user rating hundreds of obscure items in
one session also halves a domain's rate for a while; that is no change of the domain.)
The reaction to a confirmed change (retrain on the new regime alone, from scratch) is
drastic, and only a change of preferences calls for it.

One change is reported once. A confirmed drop opens a *drift episode* for its domain;
further drops are part of it (ADWIN keeps cutting its window while the lists are poor)
until the domain's rolling hit rate is back to 90% of its level before the change, or
:data:`MAX_EPISODE_WINDOWS` windows have passed. Reacting to each of those cuts would keep
restarting the reaction: the training window would keep losing the events of the new
regime it needs.

>>> q = LiveQuality(k=10, window=4)
>>> for rank in [0, -1, 3, 12]:
...     q.update("books", rank)
>>> q.get()["books"]["hr"], round(q.get()["books"]["ndcg"], 3)
(0.5, 0.358)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from river import drift

__all__ = ["ALL", "LiveQuality", "RollingMean"]

#: The key under which the overall (all-domain) numbers are kept.
ALL = "_all"
#: A drift episode ends when the hit rate is back to this share of its level before.
RECOVERED = 0.9
#: ... or after this many rolling windows of the domain's events, whatever the rate.
MAX_EPISODE_WINDOWS = 20
#: A flagged drop is a change if the hit rate over the next half window of the domain's
#: events is below DROP_RATIO of its level before: the lists must have lost half their hits.
DROP_RATIO = 0.5
#: Events of one user that count towards confirming a drop, and users it takes.
USER_CAP = 5
MIN_USERS = 20


class RollingMean:
    """The mean of the last ``window`` values (0 before the first).

    What river's ``utils.Rolling(stats.Mean(), window_size=window)`` gives, with a running
    sum over a ring of values: every consumed event updates four of these, and at a few
    thousand events a second river's general rolling wrapper was a tenth of the consumer's
    time.

    >>> m = RollingMean(window=2)
    >>> for x in (1.0, 0.0, 0.0):
    ...     m.update(x)
    >>> m.get()
    0.0
    """

    __slots__ = ("_sum", "_values")

    def __init__(self, window: int) -> None:
        self._values: deque[float] = deque(maxlen=window)
        self._sum = 0.0

    def update(self, x: float) -> None:
        values = self._values
        if values.maxlen and len(values) == values.maxlen:
            self._sum -= values[0]
        values.append(x)
        self._sum += x

    def get(self) -> float:
        return self._sum / len(self._values) if self._values else 0.0


@dataclass
class _Track:
    hr: RollingMean
    ndcg: RollingMean
    detector: Any
    events: int = 0
    drifts: int = 0
    #: The open drift episode: when it was detected, the hit rate before it, its events.
    since: int | None = None
    before: float = 0.0
    episode_events: int = 0
    #: A flagged drop waiting for confirmation: when, the level before, hits and events since.
    suspect: int | None = None
    suspect_before: float = 0.0
    suspect_events: int = 0
    #: Per user since the suspicion: hits and events.
    suspect_users: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class LiveQuality:
    """Rolling HR@K / NDCG@K per domain and overall, with ADWIN drift detection per domain.

    Parameters
    ----------
    k
        Cut-off: a rank ``>= k`` (or ``-1``, not in the list) is a miss.
    window
        Events per rolling window.
    delta
        ADWIN's confidence parameter (smaller: fewer, surer detections).
    """

    k: int = 10
    window: int = 1000
    delta: float = 0.002
    #: ADWIN checks for a change every ``clock`` events (river's default is 32).
    clock: int = 8
    _tracks: dict[str, _Track] = field(default_factory=dict, repr=False)

    def _track(self, domain: str) -> _Track:
        track = self._tracks.get(domain)
        if track is None:
            track = _Track(
                RollingMean(self.window),
                RollingMean(self.window),
                drift.ADWIN(delta=self.delta, clock=self.clock),
            )
            self._tracks[domain] = track
        return track

    def update(self, domain: str, rank: int, ts: int = 0, user: str = "") -> int | None:
        """Record one event (of ``user``, at ``ts``) whose item sat at ``rank`` of the
        shown list (-1: absent).

        Returns None, or, when this event confirms a large drop of the hit rate of
        ``domain`` and no drift episode is open for it, the moment the drop was flagged.
        (ADWIN's window after a cut would date the change earlier, but it also spans the
        slow rise of a model that is still learning, which made it date changes far too
        early.)
        """
        hit = 0 <= rank < self.k
        gain = 1.0 / math.log2(rank + 2) if hit else 0.0
        change: int | None = None
        for name in (domain, ALL):
            track = self._track(name)
            track.hr.update(float(hit))
            track.ndcg.update(gain)
            track.events += 1
            before = float(track.detector.estimation)
            track.detector.update(float(hit))
            dropped = False
            if track.detector.drift_detected:
                track.drifts += 1
                # Only a drop is a change to react to; a rise means the lists got better.
                dropped = track.detector.estimation < before
            opened = self._episode(track, dropped, before, ts, float(hit), user)
            if opened is not None and name == domain:
                change = opened
        return change

    def _episode(
        self, track: _Track, dropped: bool, before: float, ts: int, hit: float, user: str
    ) -> int | None:
        """Advance ``track``'s drift episode; the change's date if this event opens one."""
        if track.since is not None:
            track.episode_events += 1
            # Judged on a window of events that all came after the detection.
            settled = track.episode_events >= self.window
            if (
                settled and track.hr.get() >= RECOVERED * track.before
            ) or track.episode_events >= MAX_EPISODE_WINDOWS * self.window:
                track.since = None
            return None
        if track.suspect is None:
            if dropped:
                track.suspect, track.suspect_before = ts, before
                track.suspect_events, track.suspect_users = 0, {}
            return None
        mine = track.suspect_users.setdefault(user, [0.0, 0.0])
        mine[0] += hit
        mine[1] += 1
        track.suspect_events += 1
        if track.suspect_events < max(1, self.window // 2):
            return None
        since, track.suspect = track.suspect, None
        weights = {u: min(n, USER_CAP) for u, (_, n) in track.suspect_users.items()}
        rate = sum(
            w * track.suspect_users[u][0] / track.suspect_users[u][1] for u, w in weights.items()
        ) / sum(weights.values())
        if len(weights) < MIN_USERS or rate >= DROP_RATIO * track.suspect_before:
            return None  # a dip, not a change
        track.since, track.before, track.episode_events = since, track.suspect_before, 0
        return since

    def close_episodes(self) -> None:
        """End every open drift episode (a retraining found no new regime behind it)."""
        for track in self._tracks.values():
            track.since = None

    def drifting_domains(self) -> list[str]:
        """The domains in a drift episode, whose lists have not recovered yet (not
        :data:`ALL`)."""
        return [g for g, t in self._tracks.items() if g != ALL and t.since is not None]

    def baseline(self, domain: str = ALL) -> float:
        """The hit rate to recover to: the level before an open episode, else the current."""
        track = self._tracks.get(domain)
        if track is None:
            return 0.0
        return track.before if track.since is not None else float(track.hr.get())

    def get(self) -> dict[str, dict[str, float | int]]:
        """``{domain: {"hr", "ndcg", "events", "drifts"}}``, with :data:`ALL` for overall."""
        return {
            name: {"hr": t.hr.get(), "ndcg": t.ndcg.get(), "events": t.events, "drifts": t.drifts}
            for name, t in self._tracks.items()
        }

    def hit_rate(self, domain: str = ALL) -> float:
        track = self._tracks.get(domain)
        return 0.0 if track is None else float(track.hr.get())
