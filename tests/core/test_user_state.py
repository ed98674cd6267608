"""User states round-trip exactly through their compact binary form, old ones still read."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest

from metarec.core.user_state import COUNT_AT, UserState, decode_many, encode_many


def same(a: UserState, b: UserState) -> bool:
    arrays = ("delta", "hist_items", "hist_weights", "hist_ts", "seen", "recs")
    scalars = ("model_version", "n_events", "last_ts", "domain")
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in arrays) and all(
        getattr(a, f) == getattr(b, f) for f in scalars
    )


def random_state(rng: np.random.Generator, trial: int) -> UserState:
    length = int(rng.integers(1, 60))
    state = UserState.new(int(rng.integers(1, 40)), length)
    catalog = 100_000 if trial % 3 == 0 else 50  # wide and narrow item indices
    span = int(rng.choice([1_000, 10**9, 10**11]))  # histories of seconds to years
    for _ in range(int(rng.integers(0, 120))):
        state.record(
            int(rng.integers(catalog)),
            float(rng.choice([1.0, 2.0, -1.0, 0.3])),
            1_600_000_000_000 + int(rng.integers(span)),
            f"d{trial % 2}",
        )
    if trial % 5 == 0:
        state.hist_items[: length // 2] = -1  # a history cut by a drift
    state.recs = rng.integers(0, catalog, int(rng.integers(0, 21)))
    state.delta = rng.standard_normal(state.delta.size).astype(np.float32)
    return state


@pytest.mark.slow
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
    same_shape = [
        st
        for st in states
        if st.delta.size == states[0].delta.size and st.hist_items.size == states[0].hist_items.size
    ]
    for batch in (states, same_shape, states[:1], []):
        blobs = encode_many(batch)
        assert blobs == [st.to_bytes() for st in batch]
        for got, want in zip(decode_many(blobs), batch, strict=True):
            assert same(got, want)


def test_a_typical_state_is_compact() -> None:
    # 50 events over a 1,682-item catalogue: clicks seconds to minutes apart within
    # sessions, sessions hours to days apart, three event types.
    rng = np.random.default_rng(2)
    state = UserState.new(32, 50)
    ts = 1_700_000_000_000
    for _ in range(50):
        ts += int(
            rng.integers(1_000, 120_000)
            if rng.random() < 0.8
            else rng.integers(3_600_000, 14 * 86_400_000)
        )
        state.record(int(rng.integers(1682)), float(rng.choice([1.0, 2.0, -1.0])), ts, "default")
    state.recs = rng.integers(0, 1682, 20)
    state.delta = rng.standard_normal(32).astype(np.float32)
    assert len(state.to_bytes()) < 443  # MU3: 630 bytes; MU2: 1,246


def test_unusual_states_round_trip() -> None:
    rng = np.random.default_rng(4)
    many_weights = UserState.new(3, 300)  # 300 distinct weights: no palette
    for k in range(300):
        many_weights.record(k, 0.5 + k / 7, 1_700_000_000_000 + 1000 * k, "")
    seconds = UserState.new(3, 5)  # whole-second times, some out of order
    for t in (5, 3, 9, 9, 1):
        seconds.record(int(rng.integers(10)), 1.0, 1_700_000_000_000 + 1000 * t, "vidéo")
    huge = UserState.new(2, 4)  # a 2**40 item index and times before 1970
    huge.record(2**40, -1.0, -5, "default")
    huge.record(3, 2.0, -7_000, "default")
    huge.recs = np.array([2**40, 0])
    empty = UserState.new(4, 6)
    for state in (many_weights, seconds, huge, empty):
        assert same(UserState.from_bytes(state.to_bytes()), state)
    assert same(decode_many(encode_many([seconds, empty, seconds]))[2], seconds)


def test_empty_histories_minus_zero_weights_and_mixed_lengths_round_trip() -> None:
    no_history = UserState.new(2, 0)
    two = UserState.new(1, 2)
    two.record(7, 1.0, 1, "default")
    two.record(8, 1.0, 2, "default")
    two.seen = np.array([3, 7, 8])
    three = UserState.new(1, 3)
    for item in (9, 9, 4):
        three.record(item, 1.0, 3, "default")
    hole = UserState.new(1, 2)
    hole.record(4, 1.0, 9, "default")
    hole.hist_weights[0] = -0.0  # an unfilled slot's weight with its sign bit
    batch = [no_history, two, three, hole]
    for got, want in zip(decode_many(encode_many(batch)), batch, strict=True):
        assert same(got, want)
    assert np.signbit(UserState.from_bytes(hole.to_bytes()).hist_weights[0])


def test_item_indices_past_the_limit_are_refused_not_wrapped() -> None:
    state = UserState.new(1, 2)
    state.record(2**62, 1.0, 1, "default")
    with pytest.raises(ValueError, match="item index"):
        state.to_bytes()


def test_a_corrupted_state_raises_value_error_and_nothing_else() -> None:
    rng = np.random.default_rng(7)
    blobs = [random_state(rng, trial).to_bytes() for trial in range(40)]
    for _ in range(3000):
        blob = bytearray(blobs[int(rng.integers(len(blobs)))])
        for at in rng.integers(0, len(blob), int(rng.integers(1, 4))):
            blob[int(at)] = int(rng.integers(256))
        with contextlib.suppress(ValueError):  # any other exception fails the test
            decode_many([bytes(blob)])


def test_every_cut_of_a_state_is_refused() -> None:
    state = UserState.new(4, 6)
    for k in range(9):
        state.record(k % 4, 1.0 + k % 2, 1_700_000_000_000 + 61_000 * k, "books")
    state.recs = np.array([3, 1])
    blob = state.to_bytes()
    for cut in range(len(blob)):
        with pytest.raises(ValueError):
            decode_many([blob[:cut]])


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


def test_states_written_in_the_mu3_format_still_read() -> None:
    state = UserState.new(2, 3)
    state.record(7, 2.0, 1_700_000_000_000, "books")
    state.record(9, 1.0, 1_700_000_060_000, "books")
    state.recs = np.array([3, 9])
    dom = b"books"
    old = struct.pack("<3sHHIHiiqH", b"MU3", 2, 3, 2, 2, 0, 2, 1_700_000_060_000, len(dom))
    old += struct.pack("<B", 1 | 2 | 4) + dom + state.delta.astype("<f4").tobytes()
    old += state.hist_items.astype("<i2").tobytes() + state.hist_weights.astype("<f2").tobytes()
    old += np.array([np.iinfo(np.int32).min, 60_000, 0], "<i4").tobytes()
    old += state.seen.astype("<i2").tobytes() + state.recs.astype("<i2").tobytes()
    assert same(UserState.from_bytes(old), state)
    assert same(decode_many([old, state.to_bytes()])[1], state)


def test_a_truncated_state_is_refused_not_misread() -> None:
    state = UserState.new(4, 5)
    state.record(7, 1.0, 1_700_000_000_000, "books")
    blob = state.to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        decode_many([blob[:-4], blob])
