"""One user's stored state: what the consumer keeps in Redis between that user's events.

The state is small binary (little-endian, no pickle) so that loading a whole batch of
users is one ``MGET`` and decoding is a few numpy calls for the whole batch. Redis memory is
the cost that grows with users, so every part takes the narrowest *exact* encoding: item
indices bit-packed at the width the state needs, with each history slot's event weight
folded in as a code into the state's small palette of weights; history times as varint
gaps walking back from the last event (whole seconds when every gap is); the seen set
without the items the history already names; no bytes for unfilled slots or the default
domain. A 50-event state over a 1,682-item catalogue is ~430 bytes (MU3, the previous
format: ~600; MU2: ~1,250). A state always reads back equal to what was written. What it
holds:

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

from metarec.core.events import DEFAULT_DOMAIN
from metarec.core.packing import (
    bit_lengths,
    bounds,
    pack_bits,
    read_varint,
    read_varints,
    row_max,
    starts,
    unpack_bits,
    unzigzag,
    unzigzag_int,
    varint,
    varints,
    zigzag,
)

__all__ = [
    "COUNT_AT",
    "COUNT_BYTES",
    "MAX_SEEN",
    "UserState",
    "count_guard",
    "decode_many",
    "encode_many",
]

#: Item indices a state can hold: below 2**48 (a catalogue of 281 trillion items), so that
#: an index and its weight code always fit the 56 bits a packed field may have.
MAX_ITEM = 2**48
#: Items a user consumed that stay excluded from their list. Past this the oldest ones may
#: come back; 5,000 covers all but robots and keeps the state under ~25 KiB.
MAX_SEEN = 5000
#: The current format (MU4). A fixed header whose event count sits where it sat in every
#: earlier format (so the store's guard reads it the same way during a rolling upgrade),
#: then varints (unfilled leading slots, seen items stored, last event time zig-zagged,
#: and the domain unless it is the default), the weight palette (or raw weights), ``δ``
#: as float32, the packed history, the packed seen-then-list items, and the history
#: times' varint gaps to the end.
_MAGIC4 = b"MU4"
_HEADER4 = struct.Struct("<3sBHHiHBBBi")  # magic, flags, d, L, version, K, bits, bits,
#                                           palette size, events
_DEFAULT_DOMAIN = 1  # the domain is DEFAULT_DOMAIN (no bytes stored)
_PALETTE16 = 2  # the weight palette as float16 (every weight is exact in it)
_RAW_WEIGHTS = 4  # more than 255 distinct weights: each slot's float32 weight instead
_TS_SECONDS = 8  # every history time gap is whole seconds, stored in seconds
_TS_SIGNED = 16  # a history time is later than the next one: gaps zig-zagged
_SEEN_EXTRA = 32  # seen holds only the items the history does not (see _ends_with)
# Earlier formats, still read.
_MAGIC_V2 = b"MU2"
_MAGIC = b"MU3"
_HEADER = struct.Struct("<3sHHIHiiqH")
_FLAGS = struct.Struct("<B")  # MU3: a flags byte after the header
_ITEMS16 = 1  # MU3: item indices (history, seen, list) as int16
_TS32 = 2  # MU3: history times as int32 ms before last_ts (0 for empty slots)
_WEIGHTS16 = 4  # MU3: history weights as float16
_SEEN_EXTRA3 = 8  # MU3: seen holds only the items the history does not
_TS_EMPTY = np.iinfo(np.int32).min
#: Where the event count sits in a stored state, and its encoding. Every write that
#: applies events raises it, so the store compares these bytes to guard a user's state
#: against a concurrent writer (the compare-and-set of :meth:`metarec.services.store.RedisStore.
#: commit_batch`) without reading the whole state back.
COUNT_AT = struct.calcsize("<3sHHIHi")
assert struct.calcsize("<3sBHHiHBBB") == COUNT_AT  # MU4 keeps it there
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
        return encode_many([self])[0]

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        return decode_many([data])[0]


def encode_many(states: Sequence[UserState]) -> list[bytes]:
    """The stored form of each state (``[s.to_bytes() for s in states]``), with the array
    work done once per batch: a consumer encodes every touched user of a batch, and one by
    one the numpy calls per state would cost more than the bytes they make.

    >>> a, b = UserState.new(2, 3), UserState.new(2, 3)
    >>> b.record(item=40_000, weight=0.5, ts=7, domain="music")
    >>> [len(blob) for blob in encode_many([a, b])]
    [32, 43]
    """
    out: list[bytes] = [b""] * len(states)
    groups: dict[tuple[int, int], list[int]] = {}
    for r, st in enumerate(states):
        groups.setdefault((st.delta.size, st.hist_items.size), []).append(r)
    for rows in groups.values():
        for r, blob in zip(rows, _encode_same_shape([states[r] for r in rows]), strict=True):
            out[r] = blob
    return out


def _encode_same_shape(states: Sequence[UserState]) -> list[bytes]:
    n = len(states)
    dim, length = states[0].delta.size, states[0].hist_items.size
    items = np.stack([st.hist_items for st in states]).astype(np.int64).reshape(n, length)
    weights = np.stack([st.hist_weights for st in states]).astype(np.float32).reshape(n, length)
    ts = np.stack([st.hist_ts for st in states]).astype(np.int64).reshape(n, length)
    last = np.fromiter((st.last_ts for st in states), np.int64, n)
    if (items < -1).any() or (items >= MAX_ITEM).any():
        raise ValueError(f"a user state holds an item index outside [-1, {MAX_ITEM})")
    # Leading slots that were never filled are not stored, only counted (a weight of -0.0
    # is not "never filled": its bits are kept).
    empty = (items == -1) & (weights.view(np.uint32) == 0) & (ts == 0)
    lead = np.cumprod(empty, axis=1).sum(axis=1)
    filled = np.arange(length) >= lead[:, None]
    n_filled = length - lead
    flags = np.zeros(n, np.int64)

    # Weights: each state's distinct values form its palette, a slot keeps a code.
    wbits = weights.view(np.uint32).astype(np.int64)
    rowid = np.broadcast_to(np.arange(n)[:, None], (n, length))
    keys = (rowid[filled] << 32) | wbits[filled]
    palette_keys, code_at = np.unique(keys, return_inverse=True)
    first = np.searchsorted(palette_keys, np.arange(n + 1, dtype=np.int64) << 32)
    n_codes = np.diff(first)
    code = code_at - first[rowid[filled]]
    raw_weights = n_codes > 255  # no palette: weights stored whole
    flags[raw_weights] |= _RAW_WEIGHTS
    palette = (palette_keys & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore"):  # weights past float16's range: the float32 palette
        half = palette.astype(np.float16)
    exact16 = half.astype(np.float32) == palette
    pal_row = np.repeat(np.arange(n), n_codes)
    wide = np.bincount(pal_row[~exact16], minlength=n) > 0
    flags[~wide] |= _PALETTE16
    mult = np.where(raw_weights, 1, np.maximum(n_codes, 1))
    code = np.where(raw_weights[rowid[filled]], 0, code)
    packed_hist = ((items[filled] + 1) * mult[rowid[filled]] + code).astype(np.uint64)
    hist_bits = bit_lengths(row_max(packed_hist, n_filled, n))

    # Seen (only what the history does not already say) and the last list, one section.
    tails = _last_occurrence_mask(items)
    seen_size = np.fromiter((st.seen.size for st in states), np.int64, n)
    extra_rows = _ends_with(
        np.concatenate([st.seen for st in states] + [np.zeros(0, np.int64)]),
        seen_size,
        items[tails],
        tails.sum(axis=1),
    )
    cut = seen_size - np.where(extra_rows, tails.sum(axis=1), 0)
    seens = [st.seen[:c] for st, c in zip(states, cut.tolist(), strict=True)]
    flags[extra_rows] |= _SEEN_EXTRA
    n_seen = np.fromiter((s.size for s in seens), np.int64, n)
    n_recs = np.fromiter((st.recs.size for st in states), np.int64, n)
    listed = np.concatenate(
        [part for r in range(n) for part in (seens[r], states[r].recs)] + [np.zeros(0, np.int64)]
    ).astype(np.int64)
    if (listed < -1).any() or (listed >= MAX_ITEM).any():
        raise ValueError(f"a user state holds an item index outside [-1, {MAX_ITEM})")
    listed_u = (listed + 1).astype(np.uint64)
    list_bits = bit_lengths(row_max(listed_u, n_seen + n_recs, n))

    # History times: gaps walking back from the last event time, in seconds when every
    # gap is a whole second, zig-zagged only when events came out of order.
    rev = ts[:, ::-1]
    gaps = np.concatenate((last[:, None], rev[:, :-1]), axis=1) - rev
    valid = np.arange(length) < n_filled[:, None]
    signed = ((gaps < 0) & valid).any(axis=1)
    seconds = ((gaps % 1000 == 0) | ~valid).all(axis=1) & (n_filled > 0)
    flags[signed] |= _TS_SIGNED
    flags[seconds] |= _TS_SECONDS
    gaps = np.where(seconds[:, None], gaps // 1000, gaps)
    gaps = np.where(signed[:, None], zigzag(gaps), gaps)[valid].astype(np.uint64)

    domains = [st.domain.encode("utf-8") for st in states]
    default = np.fromiter((st.domain == DEFAULT_DOMAIN for st in states), bool, n)
    flags[default] |= _DEFAULT_DOMAIN

    hist_raw = pack_bits(packed_hist, n_filled, hist_bits)
    list_raw = pack_bits(listed_u, n_seen + n_recs, list_bits)
    ts_raw = varints(gaps, n_filled)
    delta_raw = np.stack([st.delta for st in states]).astype("<f4").reshape(n, dim).tobytes()
    pal_f2 = half.astype("<f2").tobytes()
    pal_f4 = palette.astype("<f4").tobytes()
    w_raw = weights.astype("<f4")
    small = np.concatenate(
        (lead.astype(np.uint64), n_seen.astype(np.uint64), zigzag(last).view(np.uint64))
    )
    counters = varints(small, np.ones(3 * n, np.int64))
    out = []
    row_d = 4 * dim
    pal_at = first.tolist()
    for r, st in enumerate(states):
        f = int(flags[r])
        head = _HEADER4.pack(
            _MAGIC4,
            f,
            dim,
            length,
            st.model_version,
            int(n_recs[r]),
            int(hist_bits[r]),
            int(list_bits[r]),
            0 if raw_weights[r] else int(n_codes[r]),
            st.n_events,
        )
        dom = b"" if f & _DEFAULT_DOMAIN else varint(len(domains[r])) + domains[r]
        if f & _RAW_WEIGHTS:
            pal = w_raw[r, int(lead[r]) :].tobytes()
        elif f & _PALETTE16:
            pal = pal_f2[2 * pal_at[r] : 2 * pal_at[r + 1]]
        else:
            pal = pal_f4[4 * pal_at[r] : 4 * pal_at[r + 1]]
        out.append(
            b"".join(
                (
                    head,
                    counters[r],
                    counters[n + r],
                    counters[2 * n + r],
                    dom,
                    pal,
                    delta_raw[r * row_d : (r + 1) * row_d],
                    hist_raw[r],
                    list_raw[r],
                    ts_raw[r],
                )
            )
        )
    return out


def decode_many(blobs: Sequence[bytes]) -> list[UserState]:
    """The states of stored blobs (``[UserState.from_bytes(b) for b in blobs]``), decoded
    a batch at a time like :func:`encode_many`. States written by earlier releases read too.

    >>> s = UserState.new(2, 3)
    >>> s.record(item=7, weight=2.0, ts=1000, domain="books")
    >>> [st.seen.tolist() for st in decode_many([s.to_bytes(), s.to_bytes()])]
    [[7], [7]]
    """
    current = [r for r, data in enumerate(blobs) if data[:3] == _MAGIC4]
    older = [r for r, data in enumerate(blobs) if data[:3] != _MAGIC4]
    out: list[UserState | None] = [None] * len(blobs)
    for rows, decode in ((current, _decode_current), (older, _decode_earlier)):
        if rows:
            for r, state in zip(rows, decode([blobs[r] for r in rows]), strict=True):
                out[r] = state
    return [st for st in out if st is not None]


def _decode_current(blobs: Sequence[bytes]) -> list[UserState]:
    heads = []
    chunks: dict[str, list[bytes]] = {
        "pal2": [],
        "pal4": [],
        "raw": [],
        "delta": [],
        "hist": [],
        "list": [],
        "ts": [],
    }
    for data in blobs:
        if len(data) < _HEADER4.size:
            raise ValueError(f"truncated metarec user state: {len(data)} bytes")
        (_, f, dim, length, version, n_recs, hbits, lbits, ncodes, n_events) = _HEADER4.unpack_from(
            data
        )
        n_lead, pos = read_varint(data, _HEADER4.size)
        n_seen, pos = read_varint(data, pos)
        zz, pos = read_varint(data, pos)  # at most 64 bits: last_ts fits an int64
        domain = DEFAULT_DOMAIN
        if not f & _DEFAULT_DOMAIN:
            n_dom, pos = read_varint(data, pos)
            domain = data[pos : pos + n_dom].decode("utf-8")
            pos += n_dom
        filled = length - n_lead
        if (
            filled < 0
            or (filled > 0 and (ncodes == 0) != bool(f & _RAW_WEIGHTS))
            or not 1 <= hbits <= 56
            or not 1 <= lbits <= 56
            or (n_seen + n_recs) * lbits + filled * hbits > 8 * len(data)
        ):
            raise ValueError("not a metarec user state (inconsistent header)")
        parts: tuple[tuple[str, int], ...]
        if f & _RAW_WEIGHTS:
            parts = (("raw", 4 * filled),)
        else:
            parts = (("pal2", 2 * ncodes) if f & _PALETTE16 else ("pal4", 4 * ncodes),)
        parts += (
            ("delta", 4 * dim),
            ("hist", -(-filled * hbits // 8)),
            ("list", -(-(n_seen + n_recs) * lbits // 8)),
        )
        for name, size in parts:
            chunks[name].append(data[pos : pos + size])
            pos += size
        if pos > len(data):
            raise ValueError(
                f"truncated metarec user state: {len(data)} bytes, its header "
                f"describes at least {pos}"
            )
        chunks["ts"].append(data[pos:])
        heads.append(
            (
                f,
                dim,
                length,
                version,
                n_recs,
                hbits,
                lbits,
                ncodes,
                n_events,
                n_lead,
                n_seen,
                unzigzag_int(zz),
                domain,
            )
        )
    n = len(heads)
    col = list(zip(*heads, strict=True))
    flags = np.asarray(col[0], np.int64)
    lead = np.asarray(col[9], np.int64)
    length = np.asarray(col[2], np.int64)
    n_filled = length - lead
    n_listed = np.asarray(col[10], np.int64) + np.asarray(col[4], np.int64)
    ncodes = np.asarray(col[7], np.int64)
    raw_rows = (flags & _RAW_WEIGHTS) > 0
    packed = unpack_bits(chunks["hist"], n_filled, np.asarray(col[5], np.int64))
    listed = unpack_bits(chunks["list"], n_listed, np.asarray(col[6], np.int64))
    slot_row = np.repeat(np.arange(n), n_filled)
    mult = np.where(raw_rows, 1, np.maximum(ncodes, 1))[slot_row].astype(np.uint64)
    items = (packed // mult).astype(np.int64) - 1
    codes = (packed % mult).astype(np.int64)
    # Each row's palette, wherever it came from, as one flat array with row offsets.
    pal2 = np.frombuffer(b"".join(chunks["pal2"]), "<f2").astype(np.float32)
    pal4 = np.frombuffer(b"".join(chunks["pal4"]), "<f4").astype(np.float32)
    half_rows = ((flags & _PALETTE16) > 0) & ~raw_rows
    full_rows = ~half_rows & ~raw_rows
    pal_at = np.zeros(n, np.int64)
    pal_at[half_rows] = starts(ncodes[half_rows])
    pal_at[full_rows] = pal2.size + starts(ncodes[full_rows])
    weights = (
        np.concatenate((pal2, pal4))[
            np.minimum(pal_at[slot_row] + codes, max(pal2.size + pal4.size - 1, 0))
        ]
        if pal2.size + pal4.size
        else np.zeros(items.size, np.float32)
    )
    if raw_rows.any():
        raw = np.frombuffer(b"".join(chunks["raw"]), "<f4").astype(np.float32)
        weights[np.repeat(raw_rows, n_filled)] = raw
    gaps = read_varints(chunks["ts"], n_filled)
    signed = np.repeat((flags & _TS_SIGNED) > 0, n_filled)
    gaps = np.where(signed, unzigzag(gaps), gaps.view(np.int64))
    gaps = np.where(np.repeat((flags & _TS_SECONDS) > 0, n_filled), gaps * 1000, gaps)
    last = np.asarray(col[11], np.int64)
    walked = np.cumsum(gaps)
    before = np.repeat(np.concatenate(([0], walked))[starts(n_filled)], n_filled)
    ts_back = np.repeat(last, n_filled) - (walked - before)
    delta = np.frombuffer(b"".join(chunks["delta"]), "<f4").astype(np.float32)
    # Every row's history in one flat buffer each (slots in order), sliced per state.
    base = starts(length)
    within = np.arange(slot_row.size) - np.repeat(starts(n_filled), n_filled)
    hist_items = np.full(int(length.sum()), -1, np.int64)
    hist_weights = np.zeros(hist_items.size, np.float32)
    hist_ts = np.zeros(hist_items.size, np.int64)
    at_slot = base[slot_row] + lead[slot_row] + within
    hist_items[at_slot] = items
    hist_weights[at_slot] = weights
    hist_ts[base[slot_row] + length[slot_row] - 1 - within] = ts_back
    seen_all = listed.astype(np.int64) - 1
    tails = _last_occurrence_mask(hist_items, base)
    tail_at = bounds(np.bincount(np.repeat(np.arange(n), length)[tails], minlength=n))
    tail_items = hist_items[tails]
    out = []
    list_at, d_at = starts(n_listed).tolist(), starts(np.asarray(col[1], np.int64)).tolist()
    for r, (
        f,
        dim,
        size,
        version,
        n_recs,
        _,
        _,
        _,
        n_events,
        _,
        n_seen,
        last_ts,
        domain,
    ) in enumerate(heads):
        lo = int(base[r])
        items_r = hist_items[lo : lo + size]
        at = list_at[r]
        seen = seen_all[at : at + n_seen]
        if f & _SEEN_EXTRA:
            seen = np.concatenate((seen, tail_items[tail_at[r] : tail_at[r + 1]]))
        out.append(
            UserState(
                delta[d_at[r] : d_at[r] + dim],
                items_r,
                hist_weights[lo : lo + size],
                hist_ts[lo : lo + size],
                seen,
                seen_all[at + n_seen : at + n_seen + n_recs],
                version,
                n_events,
                last_ts,
                domain,
            )
        )
    return out


def _decode_earlier(blobs: Sequence[bytes]) -> list[UserState]:
    """States in the formats before MU4 (MU2: fixed widths; MU3: narrow widths)."""
    heads = []
    parts: dict[str, list[bytes]] = {}
    for data in blobs:
        if data[:3] not in (_MAGIC, _MAGIC_V2):
            raise ValueError("not a metarec user state (bad magic)")
        if len(data) < _HEADER.size + (data[:3] == _MAGIC):
            raise ValueError(f"truncated metarec user state: {len(data)} bytes")
        (magic, d, length, n_seen, n_recs, version, n_events, last_ts, n_dom) = _HEADER.unpack_from(
            data
        )
        pos = _HEADER.size
        flags = 0
        if magic == _MAGIC:
            (flags,) = _FLAGS.unpack_from(data, pos)
            pos += _FLAGS.size
        domain = data[pos : pos + n_dom].decode("utf-8")
        pos += n_dom
        isz = 2 if flags & _ITEMS16 else 4
        wsz = 2 if flags & _WEIGHTS16 else 4
        tsz = 4 if flags & _TS32 else 8
        spans = (
            ("delta", 4, d),
            (f"items{isz}", isz, length),
            (f"w{wsz}", wsz, length),
            (f"ts{tsz}", tsz, length),
            (f"items{isz}", isz, n_seen),
            (f"items{isz}", isz, n_recs),
        )
        for name, size, count in spans:
            parts.setdefault(name, []).append(data[pos : pos + size * count])
            pos += size * count
        if pos > len(data):
            raise ValueError(
                f"truncated metarec user state: {len(data)} bytes, its header describes {pos}"
            )
        heads.append(
            (d, length, n_seen, n_recs, version, n_events, last_ts, domain, flags, isz, wsz, tsz)
        )
    dtypes = {
        "delta": "<f4",
        "items2": "<i2",
        "items4": "<i4",
        "w2": "<f2",
        "w4": "<f4",
        "ts4": "<i4",
        "ts8": "<i8",
    }
    arrays = {
        name: np.frombuffer(b"".join(chunks), dtypes[name]).astype(
            np.float32 if name[0] in "dw" else np.int64
        )
        for name, chunks in parts.items()
    }
    at = dict.fromkeys(arrays, 0)

    def take(name: str, count: int) -> npt.NDArray[Any]:
        lo = at[name]
        at[name] = lo + count
        return arrays[name][lo : lo + count]

    out = []
    for (
        d,
        length,
        n_seen,
        n_recs,
        version,
        n_events,
        last_ts,
        domain,
        flags,
        isz,
        wsz,
        tsz,
    ) in heads:
        delta = take("delta", d)
        items = take(f"items{isz}", length)
        weights = take(f"w{wsz}", length)
        ts = take(f"ts{tsz}", length)
        if tsz == 4:
            ts = np.where(ts == _TS_EMPTY, 0, last_ts - ts)
        seen = take(f"items{isz}", n_seen)
        if flags & _SEEN_EXTRA3:
            seen = np.concatenate((seen, _last_occurrences(items)))
        recs = take(f"items{isz}", n_recs)
        out.append(
            UserState(delta, items, weights, ts, seen, recs, version, n_events, last_ts, domain)
        )
    return out


def _last_occurrences(hist_items: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The history's distinct items, each where it last occurs, in that order."""
    # A history is short (tens of items): a dict beats numpy's sorting here.
    last = dict.fromkeys(reversed([i for i in hist_items.tolist() if i >= 0]))
    return np.fromiter(reversed(last), np.int64, len(last))


def _last_occurrence_mask(
    items: npt.NDArray[np.int64], starts: npt.NDArray[np.int64] | None = None
) -> npt.NDArray[np.bool_]:
    """Where each row's history holds an item for the last time (padding excluded): a
    matrix of histories, or histories laid end to end that begin at ``starts``."""
    if starts is not None:
        sizes = np.diff(np.append(starts, items.size))
        if sizes.size and (sizes == sizes[0]).all():
            return _last_occurrence_mask(items.reshape(sizes.size, -1)).ravel()
        # Histories of different lengths (rare: a model with another history length):
        # one row at a time.
        return np.concatenate(
            [
                _last_occurrence_mask(items[lo : lo + size][None, :]).ravel()
                for lo, size in zip(starts.tolist(), sizes.tolist(), strict=True)
            ]
            + [np.zeros(0, bool)]
        )
    # A stable sort of each row keeps equal items in history order: the last of each run
    # is that item's last occurrence.
    order = np.argsort(items, axis=1, kind="stable")
    ranked = np.take_along_axis(items, order, axis=1)
    last = np.ones(items.shape, bool)
    last[:, :-1] = ranked[:, :-1] != ranked[:, 1:]
    mask = np.zeros(items.shape, bool)
    np.put_along_axis(mask, order, last, axis=1)
    return mask & (items >= 0)


def _ends_with(
    seen: npt.NDArray[np.int64],
    seen_size: npt.NDArray[np.int64],
    tails: npt.NDArray[np.int64],
    tail_size: npt.NDArray[np.int64],
) -> npt.NDArray[np.bool_]:
    """Per row: does its run of ``seen`` end with its run of ``tails``?"""
    fits = seen_size >= tail_size
    rows = np.repeat(np.arange(seen_size.size), tail_size)
    j = np.arange(tails.size) - np.repeat(starts(tail_size), tail_size)
    at = np.repeat(starts(seen_size) + seen_size - tail_size, tail_size) + j
    ok = fits[rows] & (
        seen[np.clip(at, 0, max(seen.size - 1, 0))] == tails
        if seen.size
        else np.zeros(tails.size, bool)
    )
    out: npt.NDArray[np.bool_] = fits & (np.bincount(rows[~ok], minlength=seen_size.size) == 0)
    return out
