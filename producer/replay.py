"""Replay a dataset into a live metarec: metadata first, then the events in time order.

Why metadata first: items published before their first event are what lets the consumer
recommend cold items from their features, and user profiles give a first guess before a
user's first event. The metadata is flushed before the first event is sent.

Why timestamps are rewritten to the wall clock by default: a live system measures
produce-to-list freshness against ``ts``, rejects timestamps far in the future and decays
popularity with age, so events stamped years ago (or, compressed, in the future) would make
all three meaningless. Each event is stamped with the time it is sent, never decreasing, so
the data's order is kept and, under ``speedup``, its gaps scaled. ``rewrite_ts=False``
keeps the original timestamps, for runs that study the data's own clock.

Pacing sends events in chunks and waits between chunks (serving delivery callbacks while it
waits), never per event, so that rates in the tens of thousands per second stay exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from tqdm import tqdm

from metarec.core.events import Event
from metarec.data.dataset import Dataset
from metarec.errors import ConfigError, InvalidEvent
from producer.event_producer import EventProducer

__all__ = ["ReplayReport", "TokenBucket", "replay"]

#: Seconds of events sent per chunk under a rate limit: 20 wake-ups a second is cheap and
#: keeps bursts short enough that a consumer sees a smooth stream.
CHUNK_S: Final = 0.05
#: Most events sent between two progress updates when nothing else bounds a chunk.
MAX_CHUNK: Final = 1000
#: Longest single wait, so that progress and delivery callbacks are served during long gaps.
_MAX_WAIT_S = 0.5
#: Under ``speedup``, events due sooner than this are sent at once: waiting microseconds per
#: event would cost more than the earliness it avoids.
_MIN_WAIT_S = 0.005
_MS_PER_S = 1000

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay sent, for the summary line and for tests.

    ``seconds`` is the events phase alone (from the first event to the final flush), so
    that ``events_per_s`` shows whether the requested pace held.

    Examples
    --------
    >>> r = ReplayReport(events=500, invalid=0, items=10, users=20, seconds=2.0)
    >>> r.events_per_s
    250.0
    """

    events: int
    invalid: int
    items: int
    users: int
    seconds: float
    interrupted: bool = False

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else math.inf

    def summary(self, topic: str) -> str:
        """One line for the end of ``producer replay``."""
        head = "interrupted after" if self.interrupted else "replayed"
        skipped = f" ({self.invalid} invalid skipped)" if self.invalid else ""
        return (
            f"{head} {self.events} events{skipped} to {topic}, after {self.items} items and "
            f"{self.users} users, in {self.seconds:.2f}s ({self.events_per_s:,.0f} events/s)"
        )


class TokenBucket:
    """Rate limiter: ``acquire(n)`` waits until ``n`` tokens have accrued at ``rate`` per s.

    Tokens may go negative: a caller that takes more than is there pays the debt by waiting,
    so the long-run rate is exact however coarse the waits are. ``burst`` caps how much
    unused rate is saved up, so a stall is not followed by an unbounded catch-up.

    Examples
    --------
    >>> now = [0.0]
    >>> bucket = TokenBucket(rate=100.0, burst=10, clock=lambda: now[0],
    ...                      wait=lambda s: now.__setitem__(0, now[0] + s))
    >>> for _ in range(5):
    ...     bucket.acquire(10)
    >>> round(now[0], 3)
    0.4
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], object] = time.sleep,
    ) -> None:
        if not rate > 0 or not burst > 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._wait = wait
        self._tokens = burst
        self._last = clock()

    def acquire(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
        self._last = now
        if self._tokens < 0:
            self._wait(-self._tokens / self.rate)


def _chunks(events: Sequence[Event], size: int) -> Iterator[Sequence[Event]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def replay(
    dataset: Dataset,
    producer: EventProducer,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    rewrite_ts: bool = True,
    progress: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> ReplayReport:
    """Publish ``dataset``'s items, users, then its first ``limit`` events.

    Parameters
    ----------
    dataset
        Events in timestamp order and the metadata records.
    producer
        Where to send; flushed after the metadata and at the end.
    rate
        Events per second (token bucket); exclusive with ``speedup``.
    speedup
        Replay the data's own time gaps divided by this factor.
    limit
        Send only the first ``limit`` events.
    rewrite_ts
        Stamp each event with its send time (default), keeping the order; ``False`` keeps
        the data's timestamps.
    progress
        Show a progress bar on stderr.
    clock
        Monotonic seconds, for pacing.

    Returns
    -------
    ReplayReport
        Counts and duration. A ``KeyboardInterrupt`` ends the replay early with
        ``interrupted=True`` after flushing what was sent.
    """
    if rate is not None and speedup is not None:
        raise ConfigError("--rate and --speedup are exclusive; give one of them")
    for flag, value in (("--rate", rate), ("--speedup", speedup), ("--limit", limit)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    events = dataset.events if limit is None else dataset.events[:limit]

    def wait(seconds: float) -> None:
        # Waiting in poll() serves delivery callbacks instead of idling.
        deadline = clock() + seconds
        while (left := deadline - clock()) > 0:
            producer.poll(min(left, _MAX_WAIT_S))

    for item in dataset.items:
        producer.send_item(item)
    for user in dataset.users:
        producer.send_user(user)
    producer.flush()

    bucket = None
    size = MAX_CHUNK
    if rate is not None:
        size = max(1, min(MAX_CHUNK, round(rate * CHUNK_S)))
        bucket = TokenBucket(rate, burst=size, clock=clock, wait=wait)
    sent = invalid = 0
    last_ts = 0
    interrupted = False
    t0 = events[0].ts if events else 0
    events_started = clock()
    bar = tqdm(
        total=len(events), unit="ev", disable=not progress, mininterval=0.5, dynamic_ncols=True
    )
    try:
        for chunk in _chunks(events, size):
            if bucket is not None:
                bucket.acquire(len(chunk))
            for event in chunk:
                if speedup is not None:
                    due = events_started + (event.ts - t0) / _MS_PER_S / speedup
                    if due - clock() > _MIN_WAIT_S:
                        wait(due - clock())
                out = event
                if rewrite_ts:
                    last_ts = max(last_ts, _now_ms())
                    out = dataclasses.replace(event, ts=last_ts)
                try:
                    producer.send_event(out)
                    sent += 1
                except InvalidEvent as exc:
                    invalid += 1
                    if invalid == 1:
                        _log.warning("skipping invalid event %s: %s", event, exc)
            bar.update(len(chunk))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    producer.flush()
    return ReplayReport(
        sent, invalid, len(dataset.items), len(dataset.users), clock() - events_started, interrupted
    )
