"""Live list quality: how good were the lists the apps were actually showing?

Before an event is applied, the consumer knows the list that user had at that moment (it
keeps the list's item indices in the user's state, so this costs no extra Redis read). If
the event's item is in it, that is a hit at that rank: HR@K and NDCG@K measured on the live
stream, prequentially, exactly as the offline evaluation measures them. :class:`LiveQuality`
keeps these per domain and overall over rolling windows (river's ``Rolling(Mean())``) and
runs river's ADWIN on each domain's hit stream, so a preference shift shows up as a drift.

One change is reported once. A drop opens a *drift episode* for its domain, dated at the
detection; further drops are part of it (ADWIN keeps cutting its window while the lists
are poor) until the domain's rolling hit rate is back to 90% of its level before the
change, or :data:`MAX_EPISODE_WINDOWS` windows have passed. Reacting to each of those cuts
would keep restarting the reaction: the training window would keep losing the events of
the new regime it needs.

>>> q = LiveQuality(k=10, window=4)
>>> for rank in [0, -1, 3, 12]:
...     q.update("books", rank)
>>> q.get()["books"]["hr"], round(q.get()["books"]["ndcg"], 3)
(0.5, 0.358)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from river import drift, stats, utils

__all__ = ["ALL", "LiveQuality"]

#: The key under which the overall (all-domain) numbers are kept.
ALL = "_all"
#: A drift episode ends when the hit rate is back to this share of its level before.
RECOVERED = 0.9
#: ... or after this many rolling windows of the domain's events, whatever the rate.
MAX_EPISODE_WINDOWS = 20


@dataclass
class _Track:
    hr: Any
    ndcg: Any
    detector: Any
    events: int = 0
    drifts: int = 0
    #: The open drift episode: when it was detected, the hit rate before it, its events.
    since: int | None = None
    before: float = 0.0
    episode_events: int = 0


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
            track = _Track(utils.Rolling(stats.Mean, window_size=self.window),
                           utils.Rolling(stats.Mean, window_size=self.window),
                           drift.ADWIN(delta=self.delta, clock=self.clock))
            self._tracks[domain] = track
        return track

    def update(self, domain: str, rank: int, ts: int = 0) -> int | None:
        """Record one event (at ``ts``) whose item sat at ``rank`` of the shown list (-1:
        absent).

        Returns None, or, when the hit rate of ``domain`` dropped with this event and no
        drift episode is open for it, ``ts``: the moment the change was detected. (ADWIN's
        window after a cut would date the change earlier, but it also spans the slow rise
        of a model that is still learning, which made it date changes far too early.)
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
            if self._episode(track, dropped, before, ts) and name == domain:
                change = ts
        return change

    def _episode(self, track: _Track, dropped: bool, before: float, ts: int) -> bool:
        """Advance ``track``'s drift episode; True if this drop opens a new one."""
        if track.since is not None:
            track.episode_events += 1
            # Judged on a window of events that all came after the detection.
            settled = track.episode_events >= self.window
            if (settled and track.hr.get() >= RECOVERED * track.before) or \
                    track.episode_events >= MAX_EPISODE_WINDOWS * self.window:
                track.since = None
            return False
        if not dropped:
            return False
        track.since, track.before, track.episode_events = ts, before, 0
        return True

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
        return {name: {"hr": t.hr.get(), "ndcg": t.ndcg.get(), "events": t.events,
                       "drifts": t.drifts} for name, t in self._tracks.items()}

    def hit_rate(self, domain: str = ALL) -> float:
        track = self._tracks.get(domain)
        return 0.0 if track is None else float(track.hr.get())
