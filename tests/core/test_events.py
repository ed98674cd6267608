"""Property tests of record decoding: whatever the bytes, a record is either accepted or
rejected with :class:`InvalidEvent` and a reason, never anything else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metarec.core.events import (
    MAX_FEATURES,
    MAX_ID_BYTES,
    MIN_EVENT_TS_MS,
    Event,
    check_key,
    decode_event,
    decode_item,
    decode_user,
    encode_event,
)
from metarec.errors import InvalidEvent

NOW = 1_800_000_000_000
DECODERS = (
    lambda raw: decode_event(raw, now_ms=NOW),
    lambda raw: decode_item(raw),
    lambda raw: decode_user(raw),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
fields = st.sampled_from(["user", "item", "type", "ts", "domain", "event_id", "features"])
records = st.dictionaries(fields | st.text(max_size=8), json_values, max_size=8)


def accepted_or_rejected(raw: bytes | str) -> None:
    for decode in DECODERS:
        try:
            decode(raw)
        except InvalidEvent as exc:
            assert str(exc), "a rejection must say why"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_accepted_or_rejected_with_a_reason(raw: bytes) -> None:
    accepted_or_rejected(raw)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(records)
def test_arbitrary_json_objects_are_accepted_or_rejected_with_a_reason(obj: dict[str, Any]) -> None:
    accepted_or_rejected(json.dumps(obj, allow_nan=True))


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=100_000))
def test_deep_nesting_is_a_rejection_not_a_crash(depth: int) -> None:
    accepted_or_rejected("[" * depth + "]" * depth)
    accepted_or_rejected('{"a":' * depth + "1" + "}" * depth)


#: Ids as apps make them: any printable characters but spaces (an id may not start or end
#: with whitespace, and control characters are refused).
ids = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(
    ids,
    ids,
    st.sampled_from(["click", "like", "dislike"]),
    st.integers(min_value=MIN_EVENT_TS_MS, max_value=NOW),
    ids,
)
def test_every_valid_event_round_trips(
    user: str, item: str, etype: str, ts: int, domain: str
) -> None:
    event = Event(user, item, etype, ts, domain)
    assert decode_event(encode_event(event), now_ms=NOW) == event
    check_key(user.encode(), user)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_only_timestamps_inside_the_window_are_accepted(ts: int) -> None:
    raw = json.dumps({"user": "u", "item": "i", "type": "click", "ts": ts})
    inside = MIN_EVENT_TS_MS <= ts <= NOW + 24 * 3600 * 1000
    try:
        decode_event(raw, now_ms=NOW)
        assert inside, ts
    except InvalidEvent:
        assert not inside, ts


def test_the_limits_are_enforced() -> None:
    long_id = "x" * (MAX_ID_BYTES + 1)
    for raw, words in [
        ({"user": long_id, "item": "i", "type": "click"}, "longer than"),
        ({"item": "i", "features": ["f"] * (MAX_FEATURES + 1)}, "over"),
    ]:
        decoder = decode_event if "user" in raw else decode_item
        try:
            decoder(json.dumps(raw), default_ts=NOW) if decoder is decode_event else decode_item(
                json.dumps(raw)
            )
            raise AssertionError(f"accepted {words}")
        except InvalidEvent as exc:
            assert words in str(exc)


def test_a_key_that_is_not_the_user_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="record key is missing"):
        check_key(None, "u1")  # no key: it could land on any partition
    try:
        check_key(b"u2", "u1")
        raise AssertionError("a mismatched key was accepted")
    except InvalidEvent as exc:
        assert "is not the event's user" in str(exc)


def test_the_settings_move_every_limit() -> None:
    from metarec.config import Settings

    limits = Settings.from_env(
        {
            "METAREC_MAX_ID_BYTES": "8",
            "METAREC_MAX_FEATURES": "2",
            "METAREC_MAX_RECORD_BYTES": "300",
            "METAREC_EVENT_TS_MIN_MS": str(NOW - 10),
            "METAREC_EVENT_MAX_FUTURE_S": "1",
        }
    ).limits()
    ok = {"user": "u" * 8, "item": "i", "type": "click", "ts": NOW}
    assert decode_event(json.dumps(ok), now_ms=NOW, limits=limits).user == "u" * 8
    for change, words in [
        ({"user": "u" * 9}, "longer than 8"),
        ({"ts": NOW - 11}, "earliest"),
        ({"ts": NOW + 1001}, "1 s in the future"),
        ({"pad": "x" * 300}, "over the 300"),
    ]:
        try:
            decode_event(json.dumps({**ok, **change}), now_ms=NOW, limits=limits)
            raise AssertionError(f"accepted {change}")
        except InvalidEvent as exc:
            assert words in str(exc), (words, str(exc))
    try:
        decode_item(json.dumps({"item": "i", "features": ["a", "b", "c"]}), limits=limits)
        raise AssertionError("accepted 3 features")
    except InvalidEvent as exc:
        assert "over 2" in str(exc)


def test_lone_surrogates_are_rejected_not_crashed_on() -> None:
    for raw in [
        '{"user": "\\ud800", "item": "i", "type": "click", "ts": 1800000000000}',
        '{"item": "i", "features": ["ok", "\\udfff"]}',
    ]:
        accepted_or_rejected(raw)
        try:
            (decode_event if "user" in raw else decode_item)(raw)
            raise AssertionError(f"accepted {raw}")
        except InvalidEvent as exc:
            assert "lone surrogate" in str(exc)
