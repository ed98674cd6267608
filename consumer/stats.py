"""The consumer's periodic stats line: throughput, lag, latency and freshness per window.

Why a window and not running averages: an operator watching the log wants to know how the
consumer is doing *now* (this interval's p99, not one diluted by an hour of calm), and
totals since start only for the two numbers that must never silently grow (events, DLQ).

Percentiles are computed from the samples themselves, not from histogram buckets, so they
are exact while a window holds at most ``max_samples`` samples of a kind (100,000 by
default: far more batches than a 10 s window has, and ~20k events/s of freshness samples).
Past that, each kind keeps a uniform reservoir sample of ``max_samples`` (Vitter's
Algorithm R), so memory stays bounded (800 KB per kind) and the percentiles become
unbiased estimates. The clock is injected: every verb that depends on time takes ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_MAX_SAMPLES", "ConsumerStats", "format_line"]

F64 = npt.NDArray[np.float64]

#: Samples of each kind kept per window; below it percentiles are exact, above it they
#: come from a uniform reservoir of this size.
DEFAULT_MAX_SAMPLES: Final = 100_000
_PERCENTILES: Final = (50.0, 99.0)
#: Smallest buffer allocated, so a quiet consumer does not hold 800 KB per kind.
_MIN_BUFFER: Final = 1024


class _Reservoir:
    """Samples of one kind in the current window: all of them, or a uniform sample.

    Why vectorized Algorithm R: a batch adds thousands of freshness samples at once; the
    item with 0-based index ``t`` in the stream replaces slot ``j ~ U{0..t}`` when
    ``j < capacity``, and when several items of one batch pick the same slot the last one
    wins, exactly as the sequential algorithm would leave it.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self._rng = rng
        self._buf: F64 = np.empty(min(capacity, _MIN_BUFFER), dtype=np.float64)
        self.seen = 0

    def add(self, values: F64) -> None:
        n = int(values.size)
        if n == 0:
            return
        kept = min(self.seen, self.capacity)
        direct = min(n, self.capacity - kept)  # slots still free: kept as they are
        if direct:
            self._reserve(kept + direct)
            self._buf[kept : kept + direct] = values[:direct]
        rest = values[direct:]
        if rest.size:
            index = self.seen + direct + np.arange(rest.size, dtype=np.int64)
            slots = np.floor(self._rng.random(rest.size) * (index + 1)).astype(np.int64)
            take = slots < self.capacity
            slots, rest = slots[take][::-1], rest[take][::-1]
            slots, first = np.unique(slots, return_index=True)  # first of reversed = last
            self._buf[slots] = rest[first]
        self.seen += n

    def values(self) -> F64:
        return self._buf[: min(self.seen, self.capacity)]

    def percentiles(self) -> tuple[float | None, ...]:
        kept = self.values()
        if kept.size == 0:
            return tuple(None for _ in _PERCENTILES)
        return tuple(float(v) for v in np.percentile(kept, _PERCENTILES))

    def reset(self) -> None:
        self.seen = 0

    def _reserve(self, size: int) -> None:
        if size > self._buf.size:
            grown = np.empty(min(self.capacity, max(size, 2 * self._buf.size)), np.float64)
            grown[: self._buf.size] = self._buf
            self._buf = grown


class ConsumerStats:
    """Accumulates one stats window of the consumer and reports it as a dict.

    Parameters
    ----------
    interval_s
        Seconds between reports (``METAREC_STATS_INTERVAL_S``); 0 turns reports off, so
        :meth:`due` is never true (the counters still run, :meth:`report` still works).
    now
        The clock's current time in seconds (any monotonic clock); the first window
        starts here.
    max_samples
        Samples of each kind (batch latency, freshness) kept per window; see the module
        docstring.
    seed
        Seed of the private generator behind the reservoir (used only past
        ``max_samples``).

    Examples
    --------
    >>> import numpy as np
    >>> stats = ConsumerStats(interval_s=10.0, now=0.0)
    >>> stats.set_partitions([1, 0]); stats.set_model_version(3); stats.set_lag(0)
    >>> stats.record_batch(500, 480, 2, 0.012, np.full(480, 45.0))
    >>> stats.due(5.0), stats.due(10.0)
    (False, True)
    >>> s = stats.report(10.0)
    >>> s["events_per_s"], s["batch_latency_ms_p50"], s["freshness_ms_p99"], s["dlq"]
    (48.0, 12.0, 45.0, 2)
    >>> format_line(s)
    '48 ev/s | lag 0 | batch p50 12 ms p99 12 ms | fresh p50 45 ms p99 45 ms | dlq 2 | model v3 | partitions [0,1]'
    >>> stats.report(20.0)["events"], stats.report(20.0)["total_events"]
    (0, 480)
    """  # noqa: E501

    def __init__(
        self,
        interval_s: float,
        now: float,
        *,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        seed: int = 0,
    ) -> None:
        if interval_s < 0 or not math.isfinite(interval_s):
            raise ValueError(f"interval_s must be a finite number >= 0, got {interval_s!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples!r}")
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.seed = seed
        rng = np.random.default_rng(seed)
        self._latency_ms = _Reservoir(max_samples, rng)
        self._freshness_ms = _Reservoir(max_samples, rng)
        self._window_start = now
        self._records = self._events = self._batches = self._dlq = 0
        self._total_events = self._total_dlq = 0
        self._conflicts = self._total_conflicts = 0
        self._offset_resets = 0
        self._fresh_max = -1.0
        self._lag_by_partition: dict[str, int] = {}
        self._lag: int | None = None
        self._model_version: int | None = None
        self._partitions: list[int] = []

    # --- updates ----------------------------------------------------------------------

    def record_batch(
        self,
        n_records: int,
        n_events: int,
        n_dlq: int,
        latency_s: float,
        freshness_ms: npt.ArrayLike,
    ) -> None:
        """Count one processed batch.

        Parameters
        ----------
        n_records
            Records consumed in the batch (valid or not).
        n_events
            Events applied (their users' lists were written).
        n_dlq
            Records sent to the dead-letter topic.
        latency_s
            Wall time of the batch, from consume to the atomic write, in seconds.
        freshness_ms
            One value per applied event: ms from the record's Kafka timestamp to the
            write of its user's list. Non-finite values (a record without a timestamp)
            are ignored.
        """
        if min(n_records, n_events, n_dlq) < 0:
            raise ValueError(
                f"counts must be >= 0, got records={n_records} events={n_events} dlq={n_dlq}"
            )
        fresh = np.asarray(freshness_ms, dtype=np.float64).ravel()
        self._records += n_records
        self._events += n_events
        self._dlq += n_dlq
        self._batches += 1
        self._total_events += n_events
        self._total_dlq += n_dlq
        if math.isfinite(latency_s):
            self._latency_ms.add(np.array([latency_s * 1000.0]))
        fresh = fresh[np.isfinite(fresh)]
        self._freshness_ms.add(fresh)
        if fresh.size:
            self._fresh_max = max(self._fresh_max, float(fresh.max()))

    def record_conflicts(self, n_users: int) -> None:
        """Count users whose batch was redone because another consumer wrote them meanwhile
        (their events arrive on two partitions)."""
        self._conflicts += n_users
        self._total_conflicts += n_users

    def set_lag(self, total: int, by_partition: Mapping[int, int] | None = None) -> None:
        """Set the group's lag: records not yet applied, summed over every partition of
        the events topic, owned by this member or not (a gauge)."""
        self._lag = int(total)
        self._lag_by_partition = {str(p): int(n) for p, n in (by_partition or {}).items()}

    def set_offset_resets(self, total: int) -> None:
        """Set how many times the events log was found replaced or truncated."""
        self._offset_resets = int(total)

    def set_model_version(self, v: int | None) -> None:
        """Set the model version being served; ``None`` before the first model."""
        self._model_version = None if v is None else int(v)

    def set_partitions(self, partitions: Sequence[int]) -> None:
        """Set the partitions currently assigned to this consumer."""
        self._partitions = sorted(int(p) for p in partitions)

    # --- reporting --------------------------------------------------------------------

    def due(self, now: float) -> bool:
        """Whether a report is due: ``interval_s`` has passed since the window began."""
        return self.interval_s > 0 and now - self._window_start >= self.interval_s

    def report(self, now: float) -> dict[str, Any]:
        """The window's stats as a JSON-ready dict; starts a new window at ``now``.

        Percentiles are ``None`` when the window has no sample of their kind; ``lag`` is
        ``None`` until :meth:`set_lag` is first called.
        """
        window_s = max(0.0, now - self._window_start)
        lat_p50, lat_p99 = self._latency_ms.percentiles()
        fresh_p50, fresh_p99 = self._freshness_ms.percentiles()
        stats: dict[str, Any] = {
            "events_per_s": self._events / window_s if window_s > 0 else 0.0,
            "records": self._records,
            "events": self._events,
            "batches": self._batches,
            "dlq": self._dlq,
            "lag": self._lag,
            "batch_latency_ms_p50": lat_p50,
            "batch_latency_ms_p99": lat_p99,
            "freshness_ms_p50": fresh_p50,
            "freshness_ms_p99": fresh_p99,
            "freshness_ms_max": self._fresh_max if self._fresh_max >= 0 else None,
            "model_version": self._model_version,
            "partitions": list(self._partitions),
            "window_s": window_s,
            "total_events": self._total_events,
            "total_dlq": self._total_dlq,
            "lag_by_partition": dict(self._lag_by_partition),
            "offset_resets": self._offset_resets,
            "user_conflicts": self._conflicts,
            "total_user_conflicts": self._total_conflicts,
        }
        self._window_start = now
        self._records = self._events = self._batches = self._dlq = self._conflicts = 0
        self._fresh_max = -1.0
        self._latency_ms.reset()
        self._freshness_ms.reset()
        return stats


def _ms(value: float | None) -> str:
    """A duration for people: one decimal below 10 ms, whole ms above, '-' when unknown."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def format_line(stats: dict[str, Any]) -> str:
    """The human-readable one-liner of a :meth:`ConsumerStats.report` dict.

    >>> format_line({"events_per_s": 12345.4, "lag": None, "batch_latency_ms_p50": 2.25,
    ...              "batch_latency_ms_p99": 40.0, "freshness_ms_p50": None,
    ...              "freshness_ms_p99": None, "dlq": 0, "model_version": None,
    ...              "partitions": []})
    '12,345 ev/s | lag - | batch p50 2.2 ms p99 40 ms | fresh p50 - ms p99 - ms | dlq 0 | model - | partitions []'
    """  # noqa: E501
    lag = stats.get("lag")
    version = stats.get("model_version")
    partitions = ",".join(str(p) for p in stats.get("partitions", []))
    return (
        f"{stats.get('events_per_s', 0.0):,.0f} ev/s"
        f" | lag {'-' if lag is None else f'{lag:,}'}"
        f" | batch p50 {_ms(stats.get('batch_latency_ms_p50'))} ms"
        f" p99 {_ms(stats.get('batch_latency_ms_p99'))} ms"
        f" | fresh p50 {_ms(stats.get('freshness_ms_p50'))} ms"
        f" p99 {_ms(stats.get('freshness_ms_p99'))} ms"
        f" | dlq {stats.get('dlq', 0):,}"
        f" | model {'-' if version is None else f'v{version}'}"
        f" | partitions [{partitions}]"
    )
