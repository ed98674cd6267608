"""One user's stored state: what the consumer keeps in Redis between that user's events.

The state is small and fixed-layout (little-endian binary, no pickle) so that loading a
whole batch of users is one ``MGET`` and decoding is a few ``numpy.frombuffer`` calls.
Redis memory is the cost that grows with users, so each part takes the narrowest exact
encoding (16-bit item indices, 32-bit time offsets, 16-bit weights when they fit; a typical
50-event state is ~600 bytes). What it holds:

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
from typing import Any

import numpy as np
import numpy.typing as npt

from metarec.events import DEFAULT_DOMAIN

__all__ = ["COUNT_AT", "COUNT_BYTES", "MAX_SEEN", "UserState", "count_guard", "decode_many",
           "encode_many"]

#: Items a user consumed that stay excluded from their list. Past this the oldest ones may
#: come back; 5,000 covers all but robots and keeps the state under ~25 KiB.
MAX_SEEN = 5000
_MAGIC_V2 = b"MU2"
_MAGIC = b"MU3"
_HEADER = struct.Struct("<3sHHIHiiqH")
#: MU3 adds one flags byte after the header: which compact encodings the state uses. Each is
#: chosen only when it is exact, so a state reads back equal to what was written.
_FLAGS = struct.Struct("<B")
_ITEMS16 = 1  # item indices (history, seen, list) as int16: every one is below 32,768
_TS32 = 2  # history times as int32 ms before last_ts (0 for empty slots)
_WEIGHTS16 = 4  # history weights as float16 (event-type weights such as 1, 2, -1)
_SEEN_EXTRA = 8  # seen holds only the items the history does not (see _seen_extra)
_TS_EMPTY = np.iinfo(np.int32).min
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
        flags = 0
        seen = self.seen
        extra = _seen_extra(self.seen, self.hist_items)
        if extra is not None:
            flags |= _SEEN_EXTRA
            seen = extra
        items_dtype = "<i4"
        if max(int(self.hist_items.max(initial=-1)), int(seen.max(initial=-1)),
               int(self.recs.max(initial=-1))) < 32_768:
            flags |= _ITEMS16
            items_dtype = "<i2"
        ts_bytes = self.hist_ts.astype("<i8").tobytes()
        ago = np.where(self.hist_ts == 0, _TS_EMPTY, self.last_ts - self.hist_ts)
        if ((ago > _TS_EMPTY) & (ago < 2**31) | (self.hist_ts == 0)).all():
            flags |= _TS32
            ts_bytes = ago.astype("<i4").tobytes()
        weights = self.hist_weights.astype("<f4")
        half = weights.astype("<f2")
        if np.array_equal(half.astype("<f4"), weights):
            flags |= _WEIGHTS16
            weights = half
        header = _HEADER.pack(_MAGIC, self.delta.size, self.hist_items.size, seen.size,
                              self.recs.size, self.model_version, self.n_events, self.last_ts,
                              len(dom))
        return b"".join((
            header, _FLAGS.pack(flags), dom,
            self.delta.astype("<f4").tobytes(),
            self.hist_items.astype(items_dtype).tobytes(),
            weights.tobytes(),
            ts_bytes,
            seen.astype(items_dtype).tobytes(),
            self.recs.astype(items_dtype).tobytes(),
        ))

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        return decode_many([data])[0]


def encode_many(states: Sequence[UserState]) -> list[bytes]:
    """``[s.to_bytes() for s in states]``, byte for byte, with the array work done once for
    the whole batch (a consumer encodes every touched user of a batch; one by one, the
    numpy calls per state cost more than the bytes they make).

    >>> a, b = UserState.new(2, 3), UserState.new(2, 3)
    >>> b.record(item=40_000, weight=0.5, ts=7, domain="music")
    >>> encode_many([a, b]) == [a.to_bytes(), b.to_bytes()]
    True
    """
    if not states:
        return []
    dim, length = states[0].delta.size, states[0].hist_items.size
    if any(st.delta.size != dim or st.hist_items.size != length for st in states):
        return [st.to_bytes() for st in states]  # shapes differ: no common stack
    hist = np.stack([st.hist_items for st in states])
    ts = np.stack([st.hist_ts for st in states]).astype(np.int64)
    weights = np.stack([st.hist_weights for st in states]).astype("<f4")
    last = np.fromiter((st.last_ts for st in states), np.int64, len(states))
    seens, extra_flags = [], []
    for st in states:
        extra = _seen_extra(st.seen, st.hist_items)
        seens.append(st.seen if extra is None else extra)
        extra_flags.append(extra is not None)
    recs = [st.recs for st in states]
    top = np.maximum(hist.max(1, initial=-1),
                     np.maximum(_ragged_max(seens), _ragged_max(recs)))
    small = top < 32_768
    ago = np.where(ts == 0, _TS_EMPTY, last[:, None] - ts)
    ts32 = ((ago > _TS_EMPTY) & (ago < 2**31) | (ts == 0)).all(1)
    half = weights.astype("<f2")
    w16 = (half.astype("<f4") == weights).all(1)
    d_bytes = np.stack([st.delta for st in states]).astype("<f4").tobytes()
    seen_cat = np.concatenate(seens) if seens else np.zeros(0, np.int64)
    recs_cat = np.concatenate(recs)
    # Both widths only where some state needs the wide one.
    enc: dict[str, tuple[bytes, int]] = {}

    def table(name: str, arr: npt.NDArray[np.generic], dtype: str) -> tuple[bytes, int]:
        key = f"{name}{dtype}"
        if key not in enc:
            enc[key] = (arr.astype(dtype).tobytes(), np.dtype(dtype).itemsize)
        return enc[key]

    out = []
    seen_at = recs_at = 0
    row_d = 4 * dim
    for r, st in enumerate(states):
        flags = _SEEN_EXTRA if extra_flags[r] else 0
        items_dtype = "<i4"
        if small[r]:
            flags |= _ITEMS16
            items_dtype = "<i2"
        if ts32[r]:
            flags |= _TS32
            ts_raw, ts_size = table("ago", ago, "<i4")
        else:
            ts_raw, ts_size = table("ts", ts, "<i8")
        if w16[r]:
            flags |= _WEIGHTS16
            w_raw, w_size = table("w", half, "<f2")
        else:
            w_raw, w_size = table("w", weights, "<f4")
        h_raw, size = table("hist", hist, items_dtype)
        s_raw, _ = table("seen", seen_cat, items_dtype)
        r_raw, _ = table("recs", recs_cat, items_dtype)
        n_seen, n_recs = seens[r].size, st.recs.size
        dom = st.domain.encode("utf-8")
        out.append(b"".join((
            _HEADER.pack(_MAGIC, dim, length, n_seen, n_recs, st.model_version, st.n_events,
                         st.last_ts, len(dom)),
            _FLAGS.pack(flags), dom,
            d_bytes[r * row_d:(r + 1) * row_d],
            h_raw[r * length * size:(r + 1) * length * size],
            w_raw[r * length * w_size:(r + 1) * length * w_size],
            ts_raw[r * length * ts_size:(r + 1) * length * ts_size],
            s_raw[seen_at * size:(seen_at + n_seen) * size],
            r_raw[recs_at * size:(recs_at + n_recs) * size],
        )))
        seen_at += n_seen
        recs_at += n_recs
    return out


def _ragged_max(arrays: Sequence[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    """Each array's maximum (-1 for an empty one)."""
    sizes = np.fromiter((a.size for a in arrays), np.int64, len(arrays))
    out = np.full(len(arrays), -1, np.int64)
    full = sizes > 0
    if full.any():
        cat = np.concatenate([a for a in arrays if a.size])
        starts = np.r_[0, np.cumsum(sizes[full])[:-1]]
        out[full] = np.maximum.reduceat(cat, starts)
    return out


def decode_many(blobs: Sequence[bytes]) -> list[UserState]:
    """``[UserState.from_bytes(b) for b in blobs]``, with one numpy conversion per part for
    the whole batch instead of one per state.

    >>> s = UserState.new(2, 3)
    >>> s.record(item=7, weight=2.0, ts=1000, domain="books")
    >>> [st.seen.tolist() for st in decode_many([s.to_bytes(), s.to_bytes()])]
    [[7], [7]]
    """
    heads = []
    parts: dict[str, list[bytes]] = {}
    for data in blobs:
        (magic, d, length, n_seen, n_recs, version, n_events, last_ts,
         n_dom) = _HEADER.unpack_from(data)
        if magic not in (_MAGIC, _MAGIC_V2):
            raise ValueError("not a metarec user state (bad magic)")
        pos = _HEADER.size
        flags = 0
        if magic == _MAGIC:
            (flags,) = _FLAGS.unpack_from(data, pos)
            pos += _FLAGS.size
        domain = data[pos:pos + n_dom].decode("utf-8")
        pos += n_dom
        isz = 2 if flags & _ITEMS16 else 4
        wsz = 2 if flags & _WEIGHTS16 else 4
        tsz = 4 if flags & _TS32 else 8
        spans = (("delta", 4, d), (f"items{isz}", isz, length), (f"w{wsz}", wsz, length),
                 (f"ts{tsz}", tsz, length), (f"items{isz}", isz, n_seen),
                 (f"items{isz}", isz, n_recs))
        for name, size, count in spans:
            parts.setdefault(name, []).append(data[pos:pos + size * count])
            pos += size * count
        if pos > len(data):
            raise ValueError(f"truncated metarec user state: {len(data)} bytes, its header "
                             f"describes {pos}")
        heads.append((d, length, n_seen, n_recs, version, n_events, last_ts, domain, flags,
                      isz, wsz, tsz))
    dtypes = {"delta": "<f4", "items2": "<i2", "items4": "<i4", "w2": "<f2", "w4": "<f4",
              "ts4": "<i4", "ts8": "<i8"}
    arrays = {name: np.frombuffer(b"".join(chunks), dtypes[name]).astype(
        np.float32 if name[0] in "dw" else np.int64) for name, chunks in parts.items()}
    at = dict.fromkeys(arrays, 0)

    def take(name: str, count: int) -> npt.NDArray[Any]:
        lo = at[name]
        at[name] = lo + count
        return arrays[name][lo:lo + count]

    out = []
    for (d, length, n_seen, n_recs, version, n_events, last_ts, domain, flags, isz, wsz,
         tsz) in heads:
        delta = take("delta", d)
        items = take(f"items{isz}", length)
        weights = take(f"w{wsz}", length)
        ts = take(f"ts{tsz}", length)
        if tsz == 4:
            ts = np.where(ts == _TS_EMPTY, 0, last_ts - ts)
        seen = take(f"items{isz}", n_seen)
        if flags & _SEEN_EXTRA:
            seen = np.concatenate((seen, _last_occurrences(items)))
        recs = take(f"items{isz}", n_recs)
        out.append(UserState(delta, items, weights, ts, seen, recs, version, n_events,
                             last_ts, domain))
    return out


def _last_occurrences(hist_items: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The history's distinct items, each where it last occurs, in that order."""
    # A history is short (tens of items): a dict beats numpy's sorting here.
    last = dict.fromkeys(reversed([i for i in hist_items.tolist() if i >= 0]))
    return np.fromiter(reversed(last), np.int64, len(last))


def _seen_extra(seen: npt.NDArray[np.int64], hist_items: npt.NDArray[np.int64]
                ) -> npt.NDArray[np.int64] | None:
    """The seen items the history does not hold, if ``seen`` is exactly those followed by
    the history's items in order of last occurrence (what :meth:`UserState.add_seen` keeps
    when every event is recorded); None when it is not, and seen is stored whole."""
    tail = _last_occurrences(hist_items)
    cut = seen.size - tail.size
    if cut < 0 or seen[cut:].tolist() != tail.tolist():
        return None
    return seen[:cut]
