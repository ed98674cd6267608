"""One user's stored state: what the consumer keeps in Redis between that user's events.

The state is small and fixed-layout (little-endian binary, no pickle) so that loading a
whole batch of users is one ``MGET`` and decoding is a few ``numpy.frombuffer`` calls:

* the offset ``δ`` of the user's vector from their prior, and the model version it was
  adapted under (a different current version means: re-derive ``δ`` from the history);
* the short history (last ``L`` items, their event weights and timestamps), from which the
  prior is computed and ``δ`` can be re-derived;
* the set of items the user has consumed (capped at :data:`MAX_SEEN`, newest kept), which
  the ranking excludes;
* the list last written for the user (item indices), so the consumer can tell whether an
  event hit the list the app was showing without reading the list back;
* counters: events applied, last event time, the domain of the last event.

>>> import numpy as np
>>> s = UserState.new(dim=2, history_length=3)
>>> s.record(item=7, weight=2.0, ts=1000, domain="books")
>>> back = UserState.from_bytes(s.to_bytes())
>>> back.hist_items.tolist(), back.seen.tolist(), back.n_events, back.domain
([-1, -1, 7], [7], 1, 'books')
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from metarec.events import DEFAULT_DOMAIN

__all__ = ["COUNT_AT", "COUNT_BYTES", "MAX_SEEN", "UserState", "count_guard"]

#: Items a user consumed that stay excluded from their list. Past this the oldest ones may
#: come back; 5,000 covers all but robots and keeps the state under ~25 KiB.
MAX_SEEN = 5000
_MAGIC = b"MU2"
_HEADER = struct.Struct("<3sHHIHiiqH")
#: Where the event count sits in a stored state, and its encoding. Every write that
#: applies events raises it, so the store compares these bytes to guard a user's state
#: against a concurrent writer (the compare-and-set of :meth:`metarec.store.RedisStore.
#: commit_batch`) without reading the whole state back.
COUNT_AT = struct.calcsize("<3sHHIHi")
COUNT_BYTES = struct.Struct("<i")


def count_guard(state: UserState | None) -> bytes:
    """What a stored state's count bytes must be for a write based on ``state`` to land
    (empty: no state stored yet)."""
    return b"" if state is None else COUNT_BYTES.pack(state.n_events)


@dataclass
class UserState:
    """A user's adaptable state (see the module docstring)."""

    delta: npt.NDArray[np.float32]
    hist_items: npt.NDArray[np.int64]
    hist_weights: npt.NDArray[np.float32]
    hist_ts: npt.NDArray[np.int64]
    seen: npt.NDArray[np.int64]
    recs: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    model_version: int = 0
    n_events: int = 0
    last_ts: int = 0
    domain: str = DEFAULT_DOMAIN

    @classmethod
    def new(cls, dim: int, history_length: int) -> UserState:
        return cls(
            delta=np.zeros(dim, np.float32),
            hist_items=np.full(history_length, -1, np.int64),
            hist_weights=np.zeros(history_length, np.float32),
            hist_ts=np.zeros(history_length, np.int64),
            seen=np.zeros(0, np.int64),
        )

    def record(self, item: int, weight: float, ts: int, domain: str) -> None:
        """Append one event to the history and the seen set (no adaptation)."""
        self.hist_items = np.r_[self.hist_items[1:], item]
        self.hist_weights = np.r_[self.hist_weights[1:], np.float32(weight)].astype(np.float32)
        self.hist_ts = np.r_[self.hist_ts[1:], ts]
        self.add_seen([item])
        self.n_events += 1
        self.last_ts = max(self.last_ts, ts)
        self.domain = domain

    def add_seen(self, items: Sequence[int] | npt.NDArray[np.int64]) -> None:
        new = np.asarray(items, np.int64).ravel()
        # One item (the usual case) needs no sort: a comparison is 30x cheaper than isin.
        keep = self.seen != new[0] if new.size == 1 else ~np.isin(self.seen, new)
        merged = np.concatenate((self.seen[keep], new))
        self.seen = merged[-MAX_SEEN:]

    def to_bytes(self) -> bytes:
        dom = self.domain.encode("utf-8")
        header = _HEADER.pack(_MAGIC, self.delta.size, self.hist_items.size, self.seen.size,
                              self.recs.size, self.model_version, self.n_events, self.last_ts,
                              len(dom))
        return b"".join((
            header, dom,
            self.delta.astype("<f4").tobytes(),
            self.hist_items.astype("<i4").tobytes(),
            self.hist_weights.astype("<f4").tobytes(),
            self.hist_ts.astype("<i8").tobytes(),
            self.seen.astype("<i4").tobytes(),
            self.recs.astype("<i4").tobytes(),
        ))

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        (magic, d, length, n_seen, n_recs, version, n_events, last_ts,
         n_dom) = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("not a metarec user state (bad magic)")
        pos = _HEADER.size
        domain = data[pos:pos + n_dom].decode("utf-8")
        pos += n_dom

        def take(dtype: str, count: int) -> npt.NDArray[np.generic]:
            nonlocal pos
            arr = np.frombuffer(data, dtype, count, pos)
            pos += arr.nbytes
            return arr

        delta = take("<f4", d).astype(np.float32)
        items = take("<i4", length).astype(np.int64)
        weights = take("<f4", length).astype(np.float32)
        ts = take("<i8", length).astype(np.int64)
        seen = take("<i4", n_seen).astype(np.int64)
        recs = take("<i4", n_recs).astype(np.int64)
        return cls(delta, items, weights, ts, seen, recs, version, n_events, last_ts, domain)
