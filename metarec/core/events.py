"""The records that flow through metarec: events, item metadata and user profiles.

These are the topic contracts (README, "Publishing events"). Parsing is strict because apps in
other languages publish here: a record that does not follow the contract raises
:class:`~metarec.errors.InvalidEvent` naming the field, and the consumer sends it to the
dead-letter topic.

>>> e = decode_event(b'{"user": "u1", "item": "i9", "type": "like", "ts": 1700000000000}')
>>> e.user, e.item, e.type, e.domain
('u1', 'i9', 'like', 'default')
>>> decode_event(encode_event(e)) == e
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from metarec.errors import InvalidEvent

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_EVENT_WEIGHTS",
    "LIMITS",
    "MAX_FEATURES",
    "MAX_FUTURE_SKEW_MS",
    "MAX_ID_BYTES",
    "MAX_RECORD_BYTES",
    "MIN_EVENT_TS_MS",
    "SCHEMA_VERSION",
    "Event",
    "ItemRecord",
    "Limits",
    "UserRecord",
    "check_key",
    "decode_event",
    "decode_item",
    "decode_user",
    "encode_event",
    "encode_item",
    "encode_user",
    "load_record",
    "validate_event",
]

DEFAULT_DOMAIN = "default"
#: The record format's version (``schema_version``; absent means 1). A record of another
#: version is refused by name, so that a producer upgraded before the consumers fails
#: loudly, into the dead-letter topic, instead of being half understood. The JSON Schemas
#: of the three formats are docs/schema/{event,item,user}.json.
SCHEMA_VERSION = 1
#: Weight of each event type in the inner loop; a negative weight marks a dislike, which
#: pushes the item away instead of towards the user.
DEFAULT_EVENT_WEIGHTS: Mapping[str, float] = {"click": 1.0, "like": 2.0, "dislike": -1.0}
#: Ids are Redis key parts and Kafka keys; 256 bytes is far above any real id and keeps a
#: hostile producer from blowing up key sizes.
MAX_ID_BYTES = 256
#: An event is a few hundred bytes; anything past 64 KiB is a bug or an attack.
MAX_RECORD_BYTES = 64 * 1024
MAX_FEATURES = 256
#: The timestamp window an event must fall in (the settings ``event_ts_min_ms`` and
#: ``event_max_future_s`` move it). Events stamped more than a day ahead are clock errors;
#: before 1990 (``ts`` in seconds, or ``ts: 1``) they are unit or test mistakes, and both
#: would sit in users' histories and the training window for good.
MIN_EVENT_TS_MS = 631_152_000_000  # 1990-01-01T00:00:00Z
MAX_FUTURE_SKEW_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Limits:
    """What a record may be: its size, its ids, its features, its time. The defaults are
    the constants above; the settings ``max_record_bytes``, ``max_id_bytes``,
    ``max_features``, ``event_ts_min_ms`` and ``event_max_future_s`` move them."""

    max_record_bytes: int = MAX_RECORD_BYTES
    max_id_bytes: int = MAX_ID_BYTES
    max_features: int = MAX_FEATURES
    min_ts: int = MIN_EVENT_TS_MS
    max_future_ms: int = MAX_FUTURE_SKEW_MS


LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Event:
    """One user-item interaction: the value of a record on ``metarec.events``."""

    user: str
    item: str
    type: str
    ts: int
    domain: str = DEFAULT_DOMAIN
    event_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "user": self.user,
            "item": self.item,
            "type": self.type,
            "ts": self.ts,
            "domain": self.domain,
        }
        if self.event_id is not None:
            out["event_id"] = self.event_id
        return out


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """An item's metadata: the value of a record on ``metarec.items``."""

    item: str
    domain: str = DEFAULT_DOMAIN
    features: tuple[str, ...] = ()
    ts: int = 0
    #: False withdraws the item (out of stock, expired, removed): it leaves every list
    #: apps read within seconds and is not recommended until a record makes it True again.
    available: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "item": self.item,
            "domain": self.domain,
            "features": list(self.features),
            "ts": self.ts,
        }
        if not self.available:
            out["available"] = False
        return out


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user's profile: the value of a record on ``metarec.users``."""

    user: str
    features: tuple[str, ...] = ()
    ts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "features": list(self.features), "ts": self.ts}


def load_record(raw: bytes | str, limits: Limits = LIMITS) -> dict[str, Any]:
    """One record's JSON object, checked for size, encoding and shape as the consumer
    checks every record (:class:`InvalidEvent` otherwise)."""
    cap = limits.max_record_bytes
    if isinstance(raw, bytes | bytearray | memoryview):
        if len(raw) > cap:
            raise InvalidEvent(f"record is {len(raw)} bytes, over the {cap} limit")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"record is not UTF-8: {exc.reason} at byte {exc.start}") from None
    else:
        text = raw
        if len(text.encode("utf-8")) > cap:
            raise InvalidEvent(f"record is over the {cap}-byte limit")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"record is not JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise InvalidEvent("record is JSON nested too deeply to be an event") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"record must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_version(obj: Mapping[str, Any]) -> None:
    version = obj.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise InvalidEvent(
            f"field 'schema_version' is {version!r}; this consumer reads "
            f"version {SCHEMA_VERSION} (upgrade consumers before producers)"
        )


def _id(obj: Mapping[str, Any], field: str, limits: Limits) -> str:
    if field not in obj:
        raise InvalidEvent(f"field {field!r} is missing")
    value = obj[field]
    if not isinstance(value, str):
        raise InvalidEvent(f"field {field!r} must be a string, got {type(value).__name__}")
    if not value or value.strip() != value:
        raise InvalidEvent(f"field {field!r} must be a non-empty id without surrounding spaces")
    if len(_utf8(value, field)) > limits.max_id_bytes:
        raise InvalidEvent(f"field {field!r} is longer than {limits.max_id_bytes} bytes")
    if any(ord(c) < 32 for c in value):
        raise InvalidEvent(f"field {field!r} contains control characters")
    return value


def _ts(
    obj: Mapping[str, Any],
    default_ts: int | None,
    now_ms: int | None,
    min_ts: int = 0,
    max_future_ms: int = MAX_FUTURE_SKEW_MS,
) -> int:
    value = obj.get("ts")
    if value is None:
        if default_ts is None:
            raise InvalidEvent("field 'ts' is missing and the record has no timestamp")
        value = default_ts
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent(f"field 'ts' must be integer epoch milliseconds, got {value!r}")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise InvalidEvent(f"field 'ts' must be integer epoch milliseconds, got {value!r}")
    ts = int(value)
    if ts < 0:
        raise InvalidEvent(f"field 'ts' is negative ({ts}); it must be epoch milliseconds")
    if ts < min_ts:
        raise InvalidEvent(
            f"field 'ts' ({ts}) is before the earliest accepted time "
            f"({min_ts} ms; setting event_ts_min_ms); is it in seconds?"
        )
    if now_ms is not None and ts > now_ms + max_future_ms:
        raise InvalidEvent(
            f"field 'ts' ({ts}) is more than {max_future_ms // 1000} s in the "
            "future (setting event_max_future_s)"
        )
    return ts


def _utf8(value: str, field: str) -> bytes:
    """``value`` as UTF-8; JSON's ``\\ud800`` escapes decode to lone surrogates, which no
    Redis key or Kafka record can carry."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent(f"field {field!r} is not valid Unicode (a lone surrogate)") from None


def _features(obj: Mapping[str, Any], limits: Limits) -> tuple[str, ...]:
    value = obj.get("features", [])
    if not isinstance(value, list) or not all(isinstance(f, str) and f for f in value):
        raise InvalidEvent("field 'features' must be a list of non-empty strings")
    if len(value) > limits.max_features:
        raise InvalidEvent(f"field 'features' has {len(value)} entries, over {limits.max_features}")
    for feature in value:
        _utf8(feature, "features")
    return tuple(value)


def validate_event(
    obj: Mapping[str, Any],
    *,
    event_types: Sequence[str] | Mapping[str, float] = DEFAULT_EVENT_WEIGHTS,
    default_ts: int | None = None,
    now_ms: int | None = None,
    limits: Limits = LIMITS,
) -> Event:
    """Check a decoded event object against the contract and return it as an :class:`Event`.

    ``default_ts`` is the Kafka record timestamp, used when the event carries no ``ts``;
    ``now_ms`` enables the check against timestamps more than ``limits.max_future_ms``
    ahead; a timestamp before ``limits.min_ts`` is refused.
    """
    _check_version(obj)
    user = _id(obj, "user", limits)
    item = _id(obj, "item", limits)
    etype = obj.get("type")
    if not isinstance(etype, str) or etype not in event_types:
        allowed = ", ".join(sorted(event_types))
        raise InvalidEvent(f"field 'type' is {etype!r}; expected one of: {allowed}")
    domain = _id(obj, "domain", limits) if "domain" in obj else DEFAULT_DOMAIN
    event_id = _id(obj, "event_id", limits) if obj.get("event_id") is not None else None
    ts = _ts(obj, default_ts, now_ms, limits.min_ts, limits.max_future_ms)
    return Event(user, item, etype, ts, domain, event_id)


def decode_event(
    raw: bytes | str,
    *,
    event_types: Sequence[str] | Mapping[str, float] = DEFAULT_EVENT_WEIGHTS,
    default_ts: int | None = None,
    now_ms: int | None = None,
    limits: Limits = LIMITS,
) -> Event:
    """Parse one ``metarec.events`` record value; raises :class:`InvalidEvent` if it is bad."""
    return validate_event(
        load_record(raw, limits),
        event_types=event_types,
        default_ts=default_ts,
        now_ms=now_ms,
        limits=limits,
    )


def check_key(key: bytes | None, user: str) -> None:
    """Refuse an event whose record key is not its user: keyed by something else, or by
    nothing (a producer's partitioner then spreads it anywhere), it may land on another
    partition than the user's other events and be applied out of their order. Such a
    record is dead-lettered as ``key-mismatch``; ``metarec dlq replay`` keys a letter
    without a key by its user."""
    if key is None:
        raise InvalidEvent(
            f"record key is missing; key events by user id (here {user[:64]!r}), so that a "
            "user's events share a partition"
        )
    if key != user.encode("utf-8"):
        shown = key[:64].decode("utf-8", "replace")
        raise InvalidEvent(
            f"record key {shown!r} is not the event's user {user[:64]!r}; key events by user id"
        )


def decode_item(
    raw: bytes | str, *, default_ts: int | None = None, limits: Limits = LIMITS
) -> ItemRecord:
    """Parse one ``metarec.items`` record value."""
    obj = load_record(raw, limits)
    _check_version(obj)
    domain = _id(obj, "domain", limits) if "domain" in obj else DEFAULT_DOMAIN
    available = obj.get("available", True)
    if not isinstance(available, bool):
        raise InvalidEvent(f"field 'available' must be true or false, not {available!r:.40}")
    return ItemRecord(
        _id(obj, "item", limits),
        domain,
        _features(obj, limits),
        _ts(obj, default_ts or 0, None),
        available,
    )


def decode_user(
    raw: bytes | str, *, default_ts: int | None = None, limits: Limits = LIMITS
) -> UserRecord:
    """Parse one ``metarec.users`` record value."""
    obj = load_record(raw, limits)
    _check_version(obj)
    return UserRecord(
        _id(obj, "user", limits), _features(obj, limits), _ts(obj, default_ts or 0, None)
    )


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_event(event: Event) -> bytes:
    """The compact UTF-8 JSON that goes on the wire."""
    return _dump(event.to_json())


def encode_item(item: ItemRecord) -> bytes:
    return _dump(item.to_json())


def encode_user(user: UserRecord) -> bytes:
    return _dump(user.to_json())
