"""One decoder for what the services consume: a record's topic says which contract it
follows, and the settings say what is accepted.

Why one: the consumer and the aggregator read the same three topics, and a record one of
them accepts and the other refuses would make the lists and the training window disagree
about what happened. Both call :meth:`RecordDecoder.decode`.

>>> from metarec.config import Settings
>>> decoder = RecordDecoder.from_settings(Settings.from_env({}))
>>> decoder.decode("metarec.events", b"u1", b'{"user": "u1", "item": "i", "type": "like"}',
...                timestamp_ms=1_700_000_000_000, now_ms=1_700_000_000_000)
Event(user='u1', item='i', type='like', ts=1700000000000, domain='default', event_id=None)
>>> decoder.decode("elsewhere", None, b"{}", timestamp_ms=0, now_ms=0) is None
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from metarec.config import Settings
from metarec.core.events import (
    Event,
    ItemRecord,
    Limits,
    UserRecord,
    check_key,
    decode_event,
    decode_item,
    decode_user,
)

__all__ = ["Record", "RecordDecoder"]

Record = Event | ItemRecord | UserRecord


@dataclass(frozen=True)
class RecordDecoder:
    """Routes a consumed record to the decoder of its topic, with the settings' checks."""

    events_topic: str
    items_topic: str
    users_topic: str
    event_types: Mapping[str, float]
    limits: Limits

    @classmethod
    def from_settings(cls, settings: Settings) -> RecordDecoder:
        return cls(
            settings.events_topic,
            settings.items_topic,
            settings.users_topic,
            settings.event_types,
            settings.limits(),
        )

    def decode(
        self, topic: str, key: bytes | None, value: bytes | None, *, timestamp_ms: int, now_ms: int
    ) -> Record | None:
        """The record as its topic's contract reads it; None for a topic not routed here.

        ``timestamp_ms`` (the Kafka record's) stands in for a missing ``ts``. Raises
        :class:`~metarec.errors.InvalidEvent` naming what is wrong, also for an event keyed
        by another user than its own (it may sit on another partition than theirs).
        """
        raw = value or b""
        if topic == self.events_topic:
            event = decode_event(
                raw,
                default_ts=timestamp_ms,
                now_ms=now_ms,
                event_types=self.event_types,
                limits=self.limits,
            )
            check_key(key, event.user)
            return event
        if topic == self.items_topic:
            return decode_item(raw, default_ts=timestamp_ms, limits=self.limits)
        if topic == self.users_topic:
            return decode_user(raw, default_ts=timestamp_ms, limits=self.limits)
        return None
