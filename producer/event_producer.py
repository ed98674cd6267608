"""What apps import to publish events, item metadata and user profiles to metarec.

Why a class of our own rather than a bare Kafka producer: every record is validated against
the contract (README, "Publishing events") *before* it leaves the process, so a bad event
fails loudly in the app that made it instead of landing in the consumer's dead-letter
topic; events are keyed by user id so each user's events stay ordered on one partition;
and delivery failures, which librdkafka only reports in callbacks, are collected and raised
by :meth:`EventProducer.flush`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from metarec.config import Settings
from metarec.core.events import (
    Event,
    ItemRecord,
    UserRecord,
    decode_item,
    decode_user,
    encode_event,
    encode_item,
    encode_user,
    validate_event,
)
from metarec.errors import ConfigError, MetarecError
from metarec.logs import kafka_logger

__all__ = ["DEFAULT_PRODUCER_CONFIG", "DeliveryError", "EventProducer"]

#: Producer defaults, below the ``METAREC_KAFKA_*`` pass-through and explicit ``config``.
#: Idempotence stops a retried batch from being written twice or reordered, which would
#: break per-user ordering; a few ms of linger batches records without visible latency.
DEFAULT_PRODUCER_CONFIG: Final[Mapping[str, str]] = {
    # The Java client's partitioner (murmur2 of the key): every producer of the events
    # topic must put one user on one partition, whatever client it is written with.
    "partitioner": "murmur2_random",
    "enable.idempotence": "true",
    "linger.ms": "5",
    "client.id": "metarec-producer",
}
#: How long ``send`` waits for room when librdkafka's local queue is full before giving up:
#: long enough to ride out a broker hiccup, short enough that a dead broker is reported.
QUEUE_FULL_TIMEOUT_S: Final = 30.0
_QUEUE_FULL_POLL_S = 0.05
#: Failures kept for the error message; the count is exact, the examples are a sample.
_FAILURES_KEPT = 5

_log = logging.getLogger(__name__)
#: librdkafka's own log lines go through Python logging instead of raw stderr.
_kafka_log = kafka_logger("producer")


class DeliveryError(MetarecError):
    """Records could not be delivered to Kafka (failed, or still queued at the deadline)."""


@dataclass(frozen=True, slots=True)
class _Failure:
    topic: str
    key: str
    error: str


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class EventProducer:
    """Validating, user-keyed publisher of metarec events, items and user profiles.

    Parameters
    ----------
    settings
        Topics, bootstrap, event types and the ``METAREC_KAFKA_*`` pass-through. When
        omitted, read from the environment like every metarec process
        (:meth:`metarec.config.Settings.from_env`).
    bootstrap
        Overrides ``settings.kafka_bootstrap``.
    events_topic
        Overrides ``settings.events_topic``.
    config
        Extra librdkafka settings; they win over the pass-through and the defaults
        (:data:`DEFAULT_PRODUCER_CONFIG`).
    queue_full_timeout_s
        How long a send waits for room in a full local queue before raising.

    Examples
    --------
    A bad event raises before anything is queued; no broker is needed to see that:

    >>> from metarec.config import Settings
    >>> producer = EventProducer(Settings.from_env({}), bootstrap="127.0.0.1:9092")
    >>> producer.send(user="u1", item=" i9")
    Traceback (most recent call last):
    ...
    metarec.errors.InvalidEvent: field 'item' must be a non-empty id without surrounding spaces
    >>> producer.sent
    0

    With a broker, use it as a context manager so that leaving the block flushes:

    >>> with producer:  # doctest: +SKIP
    ...     producer.send(user="u1", item="i9", type="like")
    ...     producer.send_item(ItemRecord("i9", features=("genre:drama",)))
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        bootstrap: str | None = None,
        events_topic: str | None = None,
        config: Mapping[str, str | int | float | bool] | None = None,
        queue_full_timeout_s: float = QUEUE_FULL_TIMEOUT_S,
    ) -> None:
        changes = {"kafka_bootstrap": bootstrap, "events_topic": events_topic}
        changes = {k: v for k, v in changes.items() if v is not None}
        if settings is None:
            settings = Settings.from_env(overrides=changes)
        elif changes:
            settings = settings.replace(**changes)
        self.settings = settings
        self.config = dict(config or {})
        self.queue_full_timeout_s = queue_full_timeout_s
        conf: dict[str, Any] = {**DEFAULT_PRODUCER_CONFIG, **settings.kafka_config()}
        conf.update(
            {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in self.config.items()}
        )
        conf["error_cb"] = self._on_error
        try:
            self._producer = Producer(conf, logger=_kafka_log)
        except KafkaException as exc:
            # librdkafka checks its settings here, so this is a bad pass-through value.
            raise ConfigError(
                f"invalid Kafka producer settings (METAREC_KAFKA_* or --kafka-option): "
                f"{exc.args[0].str() if isinstance(exc.args[0], KafkaError) else exc}"
            ) from None
        self._sent = 0
        self._delivered = 0
        self._failed = 0
        self._failures: list[_Failure] = []
        self._fatal: KafkaError | None = None

    # --- counters -------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Records accepted into the local queue (validated and handed to librdkafka)."""
        return self._sent

    @property
    def delivered(self) -> int:
        """Records the broker has acknowledged."""
        return self._delivered

    @property
    def failed(self) -> int:
        """Records whose delivery failed."""
        return self._failed

    @property
    def pending(self) -> int:
        """Records still queued or in flight."""
        return len(self._producer)

    # --- sending --------------------------------------------------------------------

    def send(
        self,
        user: str,
        item: str,
        type: str = "click",
        ts: int | None = None,
        domain: str | None = None,
        event_id: str | None = None,
    ) -> Event:
        """Validate one event and queue it on the events topic, keyed by ``user``.

        ``ts`` defaults to now (epoch ms). Raises :class:`~metarec.errors.InvalidEvent`
        naming the bad field, before anything is queued. Returns the event as sent.
        """
        now = _now_ms()
        obj: dict[str, Any] = {
            "user": user,
            "item": item,
            "type": type,
            "ts": now if ts is None else ts,
        }
        if domain is not None:
            obj["domain"] = domain
        if event_id is not None:
            obj["event_id"] = event_id
        event = validate_event(obj, **self.settings.event_checks(now))
        self._produce(self.settings.events_topic, event.user, encode_event(event))
        return event

    def send_event(self, event: Event) -> Event:
        """Validate and queue an :class:`~metarec.core.events.Event` (see :meth:`send`)."""
        checked = validate_event(event.to_json(), **self.settings.event_checks(_now_ms()))
        self._produce(self.settings.events_topic, checked.user, encode_event(checked))
        return checked

    def send_item(self, item: ItemRecord) -> ItemRecord:
        """Validate and queue an item's metadata on the items topic, keyed by item id."""
        checked = decode_item(encode_item(item), limits=self.settings.limits())
        self._produce(self.settings.items_topic, checked.item, encode_item(checked))
        return checked

    def send_user(self, user: UserRecord) -> UserRecord:
        """Validate and queue a user's profile on the users topic, keyed by user id."""
        checked = decode_user(encode_user(user), limits=self.settings.limits())
        self._produce(self.settings.users_topic, checked.user, encode_user(checked))
        return checked

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks; returns how many were served."""
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for every queued record; raise :class:`DeliveryError` if any failed.

        Failures are reported once: after the raise the producer can be used again.
        """
        remaining = self._producer.flush(timeout)
        failures, failed = self._failures, self._failed
        self._failures, self._failed = [], 0
        if failed:
            first = failures[0]
            raise DeliveryError(
                f"{failed} record(s) failed delivery; first: topic {first.topic!r} key "
                f"{first.key!r}: {first.error}"
            )
        if remaining:
            raise DeliveryError(
                f"{remaining} record(s) still undelivered after {timeout:g}s; is the broker "
                f"at {self.settings.kafka_bootstrap} reachable?"
            )

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.flush()

    # --- internals ------------------------------------------------------------------

    def _produce(self, topic: str, key: str, value: bytes) -> None:
        if self._fatal is not None:
            raise DeliveryError(f"the producer hit a fatal error: {self._fatal.str()}")
        deadline = time.monotonic() + self.queue_full_timeout_s
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key.encode("utf-8"), on_delivery=self._on_delivery
                )
                break
            except BufferError:
                # The local queue is full: serve callbacks so deliveries free room.
                if time.monotonic() > deadline:
                    raise DeliveryError(
                        f"the local queue stayed full for {self.queue_full_timeout_s:g}s; "
                        f"is the broker at {self.settings.kafka_bootstrap} reachable?"
                    ) from None
                self._producer.poll(_QUEUE_FULL_POLL_S)
            except KafkaException as exc:
                raise DeliveryError(f"cannot queue a record for {topic!r}: {exc.args[0]}") from None
        self._sent += 1
        self._producer.poll(0)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self._delivered += 1
            return
        self._failed += 1
        if len(self._failures) < _FAILURES_KEPT:
            raw_key = msg.key()
            key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else ""
            self._failures.append(_Failure(msg.topic() or "?", key, err.str()))

    def _on_error(self, err: KafkaError) -> None:
        # Most errors here are transient (librdkafka retries them) and its logger already
        # reports each connection failure; only fatal ones and "all brokers down" matter.
        if err.fatal():
            self._fatal = err
            _log.error("kafka producer fatal error: %s", err.str())
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            _log.warning("kafka producer: %s (%s)", err.str(), self.settings.kafka_bootstrap)
        else:
            _log.debug("kafka producer error: %s", err.str())
