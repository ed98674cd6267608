"""The dead-letter topic: records the consumer could not process, kept unchanged.

Why unchanged: whoever investigates (or replays) a dead letter needs the exact bytes the
app sent, even when they are not UTF-8 or not JSON, which is often why they failed. The
key, value and headers are copied as they are; headers prefixed ``metarec.`` are appended
to say why and where from (:mod:`metarec.services.dead_letters` names them). The DLQ record's own
timestamp is the time it was dead-lettered, not the original's (which is in
:data:`ORIGINAL_TIMESTAMP`): time-based retention and brokers' timestamp checks would
otherwise drop or reject dead letters of old records, exactly the ones a replay produces.

**Size limits.** A consumed record is not always producible again:

- librdkafka's producer setting ``message.max.bytes`` (default 1,000,000) is checked in
  ``produce()`` against key + value + headers + about 36 bytes of framing (measured with
  librdkafka 2.16: the largest value with a 1-byte key and no headers is 999,963 bytes), and
  a larger record fails at once with ``MSG_SIZE_TOO_LARGE``. It is a client limit, not the
  broker's.
- The broker's limit (Apache Kafka: broker ``message.max.bytes`` 1,048,588 by default, or a
  topic's ``max.message.bytes``) applies to the written batch, and a rejection arrives
  later in the delivery report, also as ``MSG_SIZE_TOO_LARGE``. Tansu 0.6 enforces no limit
  (it stored 5 MB records), so locally only the client limit applies.
- A record that does not fit in librdkafka's local queue (``queue.buffering.max.kbytes``)
  raises ``BufferError`` even when the queue is empty.

The original may exceed the DLQ producer's limits (the app's producer or the source topic
may allow more; Tansu allows anything), and the appended headers (up to about 1.3 KB) can
push a record that just fitted over the edge. On any of these size failures the record is
sent once more, cut down: the value to its first ``truncate_to`` bytes (64 KiB by default)
with header :data:`VALUE_TRUNCATED` giving the original length; a key longer than that is
cut the same way (:data:`KEY_TRUNCATED`), and original headers totalling more than that are
dropped (:data:`HEADERS_DROPPED` gives their count). The decision is deliberately not to
raise the DLQ producer's ``message.max.bytes``: that only moves the failure to the broker,
whose limit the consumer cannot read, and a DLQ of multi-megabyte blobs helps nobody. A
fixed 64 KiB prefix fits under every sane broker limit, is plenty to see what the payload
was (events are ~100 bytes), and the full original stays on the source topic at the
partition and offset the headers name until retention removes it.

**Delivery.** :meth:`DeadLetterQueue.send` queues and returns; librdkafka reports delivery
later. :meth:`DeadLetterQueue.flush` waits and raises :class:`~metarec.errors.MetarecError`
if any dead letter was not written. The consumer must not commit offsets (nor write a
partition's next offset to Redis) past a record whose dead letter was not written,
or that record is lost: flush before the batch's atomic write, and on an error stop
without committing, so the batch is consumed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)

from metarec.errors import MetarecError
from metarec.services.dead_letters import (
    CONSUMER_GROUP,
    ERROR_CLASS,
    ERROR_MESSAGE,
    HEADERS_DROPPED,
    KEY_TRUNCATED,
    ORIGINAL_OFFSET,
    ORIGINAL_PARTITION,
    ORIGINAL_TIMESTAMP,
    ORIGINAL_TOPIC,
    VALUE_TRUNCATED,
)

__all__ = ["DEFAULT_TRUNCATE_TO", "DeadLetterQueue", "dead_letter_reason"]

#: Longest error message kept, in UTF-8 bytes: enough for any sane message, and a bound on
#: what an exception that embeds the whole payload can add to the record.
ERROR_MESSAGE_MAX_BYTES: Final = 1024
#: What a record that is too large keeps of its value (and of its key and headers): far
#: under any broker's limit, far over any valid event. See the module docstring.
DEFAULT_TRUNCATE_TO: Final = 64 * 1024
#: How long :meth:`DeadLetterQueue.send` waits for room in a full local queue: enough to
#: ride out a slow broker, short enough that a dead one is reported within one batch.
QUEUE_FULL_TIMEOUT_S: Final = 10.0
_QUEUE_FULL_POLL_S: Final = 0.05
#: Failures kept for the error message; the count is exact, the examples are a sample.
_FAILURES_KEPT: Final = 5
#: Size failures: the client's (produce) and the broker's (delivery report) both use it.
_TOO_LARGE: Final = frozenset({KafkaError.MSG_SIZE_TOO_LARGE})

#: Header list as confluent-kafka takes it; values here are always bytes or None.
Headers = list[tuple[str, str | bytes | None]]


class _TooLarge(Exception):
    """Internal: the record cannot be queued because of its size."""


@dataclass(frozen=True, slots=True)
class _Record:
    """One DLQ record as it will be produced, and where its original came from."""

    key: bytes | None
    value: bytes | None
    original_headers: Headers
    our_headers: Headers
    origin: str  # "topic[partition]@offset", for error messages
    truncated: bool = False

    @property
    def headers(self) -> Headers:
        return self.original_headers + self.our_headers


def dead_letter_reason(error: BaseException) -> str:
    """A short, bounded label of why a record was dead-lettered (for metrics): the field
    the message names, else the error's class.

    >>> from metarec.errors import InvalidEvent
    >>> dead_letter_reason(InvalidEvent("field 'ts' is negative (-5)"))
    'field:ts'
    >>> dead_letter_reason(InvalidEvent("record is not JSON: Expecting value"))
    'not-json'
    >>> dead_letter_reason(RecursionError("maximum recursion depth exceeded"))
    'RecursionError'
    """
    text = str(error)
    if text.startswith("field '"):
        return "field:" + text[7:].split("'", 1)[0][:32]
    for words, label in _REASONS:
        if words in text:
            return label
    return type(error).__name__[:40]


_REASONS = (
    ("not JSON", "not-json"),
    ("not UTF-8", "not-utf8"),
    ("JSON object", "not-object"),
    ("nested too deeply", "too-deep"),
    ("bytes, over", "too-large"),
    ("-byte limit", "too-large"),
    ("record key", "key-mismatch"),
)


def _text(value: object) -> bytes:
    return str(value).encode("utf-8")


def _cut_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes without splitting a character."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", errors="ignore").encode("utf-8")


def _headers_size(headers: Headers) -> int:
    return sum(
        len(_text(k)) + len(v if isinstance(v, bytes) else _text(v or "")) for k, v in headers
    )


class DeadLetterQueue:
    """Writes records the consumer could not process to the dead-letter topic, unchanged.

    Parameters
    ----------
    producer
        The producer to write with; its delivery reports are served by :meth:`send`
        (without blocking) and :meth:`flush`. Not thread-safe: use it from the consumer's
        thread.
    topic
        The dead-letter topic (``METAREC_DLQ_TOPIC``).
    group_id
        The consumer group, written as :data:`CONSUMER_GROUP`.
    truncate_to
        Bytes of the value kept when a record is too large to produce (see the module
        docstring); the producer's ``message.max.bytes`` must exceed about three times
        this.

    Examples
    --------
    Without a broker, a record that never fits is reported at flush, not lost silently:

    >>> from confluent_kafka import Message, Producer
    >>> producer = Producer({"bootstrap.servers": "127.0.0.1:9", "message.timeout.ms": 100,
    ...                      "log_level": 0})
    >>> dlq = DeadLetterQueue(producer, "metarec.events.dlq", group_id="metarec-consumer")
    >>> record = Message(topic="metarec.events", partition=0, offset=7, value=b"\\xff{")
    >>> dlq.send(record, ValueError("not UTF-8"))
    >>> dlq.sent
    1
    >>> dlq.flush(timeout=5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    metarec.errors.MetarecError: 1 dead letter(s) to 'metarec.events.dlq' failed; first: ...
    """

    def __init__(
        self,
        producer: Producer,
        topic: str,
        group_id: str,
        *,
        truncate_to: int = DEFAULT_TRUNCATE_TO,
    ) -> None:
        if truncate_to < 0:
            raise ValueError(f"truncate_to must be >= 0, got {truncate_to}")
        self.producer = producer
        self.topic = topic
        self.group_id = group_id
        self.truncate_to = truncate_to
        self._sent = self._delivered = self._truncated = self._pending = 0
        self._failed = 0
        self._failures: list[str] = []

    # --- counters -----------------------------------------------------------------------

    @property
    def sent(self) -> int:
        """Records :meth:`send` was called for since this object was made."""
        return self._sent

    @property
    def delivered(self) -> int:
        """Dead letters the broker acknowledged."""
        return self._delivered

    @property
    def truncated(self) -> int:
        """Dead letters that had to be cut down to be written (queued, not necessarily
        delivered)."""
        return self._truncated

    @property
    def pending(self) -> int:
        """Dead letters queued whose delivery is not known yet."""
        return self._pending

    # --- verbs --------------------------------------------------------------------------

    def send(self, msg: Message, error: BaseException) -> None:
        """Queue ``msg`` for the dead-letter topic, with headers that say why.

        Never raises for a Kafka problem: a record that cannot be queued or delivered is
        counted as failed and reported by :meth:`flush`, so the consumer has one place to
        decide not to commit.

        Parameters
        ----------
        msg
            A record from ``consume()``; its key, value and headers are copied unchanged.
        error
            Why it could not be processed (class name and message go into headers).
        """
        if msg.error() is not None:
            raise MetarecError(
                f"cannot dead-letter a consumer error event ({msg.error()}); only records "
                "with a topic, partition and offset can be dead-lettered"
            )
        record = self._record(msg, error)
        self._sent += 1
        self._queue(record)
        self.producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait up to ``timeout`` seconds for every dead letter to be acknowledged.

        Raises
        ------
        MetarecError
            If any dead letter failed since the last flush, or is still undelivered at
            the deadline. The consumer must then not commit offsets past those records
            (nor write the partition's next offset): their only copy is still the source
            topic. Failures are reported once; after the raise the queue can be reused.
        """
        self.producer.flush(timeout)
        failed, failures = self._failed, self._failures
        self._failed, self._failures = 0, []
        if failed:
            raise MetarecError(
                f"{failed} dead letter(s) to {self.topic!r} failed; first: "
                f"{'; '.join(failures)}. Do not commit past these records; check that "
                f"the topic exists and the broker is reachable"
            )
        if self._pending:
            raise MetarecError(
                f"{self._pending} dead letter(s) to {self.topic!r} still undelivered after "
                f"{timeout:g}s; do not commit past them; is the broker reachable?"
            )

    # --- internals ----------------------------------------------------------------------

    def _record(self, msg: Message, error: BaseException) -> _Record:
        ts_type, ts = msg.timestamp()
        message = str(error) or type(error).__name__
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        ours: Headers = [
            (ERROR_CLASS, _text(type(error).__name__)),
            (ERROR_MESSAGE, _cut_utf8(message, ERROR_MESSAGE_MAX_BYTES)),
            (ORIGINAL_TOPIC, None if topic is None else _text(topic)),
            (ORIGINAL_PARTITION, None if partition is None else _text(partition)),
            (ORIGINAL_OFFSET, None if offset is None else _text(offset)),
            (ORIGINAL_TIMESTAMP, _text(-1 if ts_type == TIMESTAMP_NOT_AVAILABLE else ts)),
            (CONSUMER_GROUP, _text(self.group_id)),
        ]
        raw = msg.headers() or []
        # Consumed records carry a list (order and repeated keys kept); the stubs allow
        # a dict too.
        original: Headers = list(raw.items()) if isinstance(raw, dict) else list(raw)
        return _Record(
            key=msg.key(),
            value=msg.value(),
            original_headers=original,
            our_headers=ours,
            origin=f"{topic}[{partition}]@{offset}",
        )

    def _cut(self, record: _Record) -> _Record:
        """The cut-down form of a record that is too large to produce."""
        limit = self.truncate_to
        original, key, value = record.original_headers, record.key, record.value
        extra: Headers = []
        if value is not None and len(value) > limit:
            extra.append((VALUE_TRUNCATED, _text(len(value))))
            value = value[:limit]
        if key is not None and len(key) > limit:
            extra.append((KEY_TRUNCATED, _text(len(key))))
            key = key[:limit]
        if _headers_size(original) > limit:
            extra.append((HEADERS_DROPPED, _text(len(original))))
            original = []
        return _Record(
            key, value, original, record.our_headers + extra, record.origin, truncated=True
        )

    def _queue(self, record: _Record) -> None:
        """Queue ``record``, or its cut-down form once if it is too large."""
        try:
            self._produce(record)
        except _TooLarge:
            if record.truncated:
                self._fail(record, "still too large to produce after truncation")
                return
            self._truncated += 1
            self._queue(self._cut(record))
        except MetarecError as exc:
            self._fail(record, str(exc))

    def _produce(self, record: _Record) -> None:
        deadline = time.monotonic() + QUEUE_FULL_TIMEOUT_S
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                    on_delivery=self._on_delivery(record),
                )
                self._pending += 1
                return
            except BufferError:
                # Nothing queued and still no room: the record alone is larger than
                # the local queue (queue.buffering.max.kbytes), so waiting cannot help.
                if len(self.producer) == 0:
                    raise _TooLarge from None
                if time.monotonic() >= deadline:
                    raise MetarecError(
                        f"the producer's local queue stayed full for {QUEUE_FULL_TIMEOUT_S:g}s"
                    ) from None
                self.producer.poll(_QUEUE_FULL_POLL_S)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() in _TOO_LARGE:
                    raise _TooLarge from None
                raise MetarecError(err.str() if isinstance(err, KafkaError) else str(exc)) from None

    def _on_delivery(self, record: _Record) -> Callable[[KafkaError | None, Message], None]:
        # A closure, because delivery reports carry no headers: a broker-side size
        # rejection is re-sent cut down from the record as it was queued.
        def done(err: KafkaError | None, _msg: Message) -> None:
            self._pending -= 1
            if err is None:
                self._delivered += 1
            elif err.code() in _TOO_LARGE and not record.truncated:
                self._truncated += 1
                self._queue(self._cut(record))
            else:
                self._fail(record, err.str())

        return done

    def _fail(self, record: _Record, reason: str) -> None:
        self._failed += 1
        if len(self._failures) < _FAILURES_KEPT:
            self._failures.append(f"record {record.origin}: {reason}")
