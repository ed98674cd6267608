"""User states round-trip exactly through their compact binary form, old ones still read."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from metarec.user_state import COUNT_AT, UserState, decode_many, encode_many


def same(a: UserState, b: UserState) -> bool:
    arrays = ("delta", "hist_items", "hist_weights", "hist_ts", "seen", "recs")
    scalars = ("model_version", "n_events", "last_ts", "domain")
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in arrays) and \
        all(getattr(a, f) == getattr(b, f) for f in scalars)


def random_state(rng: np.random.Generator, trial: int) -> UserState:
    length = int(rng.integers(1, 60))
    state = UserState.new(int(rng.integers(1, 40)), length)
    catalog = 100_000 if trial % 3 == 0 else 50  # wide and narrow item indices
    span = int(rng.choice([1_000, 10**9, 10**11]))  # histories of seconds to years
    for _ in range(int(rng.integers(0, 120))):
        state.record(int(rng.integers(catalog)), float(rng.choice([1.0, 2.0, -1.0, 0.3])),
                     1_600_000_000_000 + int(rng.integers(span)), f"d{trial % 2}")
    if trial % 5 == 0:
        state.hist_items[: length // 2] = -1  # a history cut by a drift
    state.recs = rng.integers(0, catalog, int(rng.integers(0, 21)))
    state.delta = rng.standard_normal(state.delta.size).astype(np.float32)
    return state


def test_every_state_reads_back_equal_and_keeps_its_count_where_the_guard_looks() -> None:
    rng = np.random.default_rng(1)
    for trial in range(1500):
        state = random_state(rng, trial)
        blob = state.to_bytes()
        assert same(UserState.from_bytes(blob), state), trial
        assert struct.unpack_from("<i", blob, COUNT_AT)[0] == state.n_events


def test_batch_encoding_and_decoding_match_the_one_by_one_forms() -> None:
    rng = np.random.default_rng(3)
    states = [random_state(rng, trial) for trial in range(600)]
    same_shape = [st for st in states if st.delta.size == states[0].delta.size
                  and st.hist_items.size == states[0].hist_items.size]
    for batch in (states, same_shape, states[:1], []):
        blobs = encode_many(batch)
        assert blobs == [st.to_bytes() for st in batch]
        for got, want in zip(decode_many(blobs), batch, strict=True):
            assert same(got, want)


def test_a_typical_state_is_compact() -> None:
    rng = np.random.default_rng(2)
    state = UserState.new(32, 50)
    for k in range(50):
        state.record(int(rng.integers(1682)), 1.0, 1_700_000_000_000 + k * 60_000, "default")
    state.recs = rng.integers(0, 1682, 20)
    assert len(state.to_bytes()) < 640  # 1,246 bytes in the previous format


def test_states_written_in_the_previous_format_still_read() -> None:
    state = UserState.new(2, 3)
    state.record(7, 2.0, 1_700_000_000_000, "books")
    state.recs = np.array([3, 9])
    dom = b"books"
    old = struct.pack("<3sHHIHiiqH", b"MU2", 2, 3, 1, 2, 0, 1, 1_700_000_000_000, len(dom))
    old += dom + state.delta.astype("<f4").tobytes() + state.hist_items.astype("<i4").tobytes()
    old += state.hist_weights.astype("<f4").tobytes() + state.hist_ts.astype("<i8").tobytes()
    old += state.seen.astype("<i4").tobytes() + state.recs.astype("<i4").tobytes()
    assert same(UserState.from_bytes(old), state)


def test_a_truncated_state_is_refused_not_misread() -> None:
    state = UserState.new(4, 5)
    state.record(7, 1.0, 1_700_000_000_000, "books")
    blob = state.to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        decode_many([blob[:-4], blob])
