"""DeadLetterQueue against the real Tansu broker: byte-exact copies, headers, size limits."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.dlq import DEFAULT_TRUNCATE_TO, DeadLetterQueue
from metarec.errors import InvalidEvent, MetarecError
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

GROUP = "metarec-consumer-test"
OURS = {
    ERROR_CLASS,
    ERROR_MESSAGE,
    ORIGINAL_TOPIC,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    ORIGINAL_TIMESTAMP,
    CONSUMER_GROUP,
}


def produce(bootstrap: str, topic: str, records: list[dict[str, Any]], **config: Any) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, **config})
    for record in records:
        producer.produce(topic, **record)
    assert producer.flush(10) == 0


def read_all(bootstrap: str, topic: str, n: int, timeout: float = 10.0) -> list[Message]:
    """The first ``n`` records of partition 0, read by assignment (no group join)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
    finally:
        consumer.close()
    assert len(out) == n, f"read {len(out)} of {n} records from {topic}"
    return out


def headers_of(msg: Message) -> dict[str, bytes | None]:
    raw = msg.headers() or []
    assert isinstance(raw, list)
    return {k: (v.encode() if isinstance(v, str) else v) for k, v in raw}


@pytest.fixture
def dlq_producer(kafka_bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": kafka_bootstrap})


def test_record_round_trips_byte_exact_with_all_headers(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    dlq_producer: Producer,
) -> None:
    source, dlq_topic = make_topic(), make_topic()
    original_headers: list[tuple[str, bytes | None]] = [
        ("trace", b"\x00\xff"),
        ("trace", b"second"),
        ("empty", b""),
        ("none", None),
    ]
    records: list[dict[str, Any]] = [
        {
            "key": b"\xc3\x28user",
            "value": b"\xff\xfe{not json\x00",
            "headers": original_headers,
            "timestamp": 1_700_000_000_123,
        },
        {"key": None, "value": None},  # a tombstone with no key: nulls stay null
    ]
    produce(kafka_bootstrap, source, records)
    originals = read_all(kafka_bootstrap, source, 2)
    dlq = DeadLetterQueue(dlq_producer, dlq_topic, group_id=GROUP)
    long_reason = "é" * 1000 + " (the value was not UTF-8)"
    dlq.send(originals[0], InvalidEvent(long_reason))
    dlq.send(originals[1], ValueError(""))
    dlq.flush(10)
    assert (dlq.sent, dlq.delivered, dlq.truncated, dlq.pending) == (2, 2, 0, 0)

    first, second = read_all(kafka_bootstrap, dlq_topic, 2)
    assert first.key() == b"\xc3\x28user"
    assert first.value() == b"\xff\xfe{not json\x00"
    raw = first.headers()
    assert isinstance(raw, list)
    assert raw[:4] == original_headers  # order, repeats, empty and null values kept
    assert [k for k, _ in raw[4:]] == [
        ERROR_CLASS,
        ERROR_MESSAGE,
        ORIGINAL_TOPIC,
        ORIGINAL_PARTITION,
        ORIGINAL_OFFSET,
        ORIGINAL_TIMESTAMP,
        CONSUMER_GROUP,
    ]
    h = headers_of(first)
    assert h[ERROR_CLASS] == b"InvalidEvent"
    message = h[ERROR_MESSAGE]
    assert message is not None and len(message) == 1024
    assert message.decode("utf-8") == "é" * 512  # cut on a character boundary
    assert h[ORIGINAL_TOPIC] == source.encode()
    assert h[ORIGINAL_PARTITION] == b"0"
    assert h[ORIGINAL_OFFSET] == b"0"
    assert h[ORIGINAL_TIMESTAMP] == b"1700000000123"
    assert h[CONSUMER_GROUP] == GROUP.encode()
    assert VALUE_TRUNCATED not in h

    assert second.key() is None and second.value() is None
    h2 = headers_of(second)
    assert set(h2) == OURS
    assert h2[ERROR_CLASS] == b"ValueError" and h2[ERROR_MESSAGE] == b"ValueError"
    assert h2[ORIGINAL_OFFSET] == b"1"


def test_value_over_the_producer_limit_lands_truncated(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    dlq_producer: Producer,
) -> None:
    source, dlq_topic = make_topic(), make_topic()
    big = bytes(range(256)) * 6000  # 1,536,000 bytes: over librdkafka's 1,000,000 default
    # Tansu enforces no size limit; the app's producer allowed 2 MB.
    produce(
        kafka_bootstrap,
        source,
        [{"key": b"u1", "value": big, "headers": [("h", b"1")]}],
        **{"message.max.bytes": 2_000_000},
    )
    [original] = read_all(kafka_bootstrap, source, 1)
    assert original.value() == big
    dlq = DeadLetterQueue(dlq_producer, dlq_topic, group_id=GROUP)
    dlq.send(original, InvalidEvent("record too large"))
    dlq.flush(10)
    assert (dlq.sent, dlq.delivered, dlq.truncated) == (1, 1, 1)
    [dead] = read_all(kafka_bootstrap, dlq_topic, 1)
    assert dead.key() == b"u1"
    assert dead.value() == big[:DEFAULT_TRUNCATE_TO]
    h = headers_of(dead)
    assert h[VALUE_TRUNCATED] == str(len(big)).encode()
    assert h["h"] == b"1" and set(h) >= OURS
    assert KEY_TRUNCATED not in h and HEADERS_DROPPED not in h


def test_record_larger_than_the_local_queue_lands_truncated(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
) -> None:
    source, dlq_topic = make_topic(), make_topic()
    value = b"\x80" * 300_000
    produce(kafka_bootstrap, source, [{"value": value}])
    [original] = read_all(kafka_bootstrap, source, 1)
    # 100 KB of local queue: the 300 KB record can never fit, so produce() raises
    # BufferError even with nothing queued.
    small_queue = Producer(
        {"bootstrap.servers": kafka_bootstrap, "queue.buffering.max.kbytes": 100}
    )
    dlq = DeadLetterQueue(small_queue, dlq_topic, group_id=GROUP, truncate_to=1000)
    dlq.send(original, InvalidEvent("bad"))
    dlq.flush(10)
    [dead] = read_all(kafka_bootstrap, dlq_topic, 1)
    assert dead.value() == value[:1000]
    assert headers_of(dead)[VALUE_TRUNCATED] == b"300000"


def test_flush_raises_when_a_dead_letter_fails(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    dlq_producer: Producer,
) -> None:
    source = make_topic()
    produce(kafka_bootstrap, source, [{"key": b"k", "value": b"v"}])
    [original] = read_all(kafka_bootstrap, source, 1)
    # The broker rejects an invalid topic name at once (TOPIC_EXCEPTION): fast, and it
    # fails the same way on Apache Kafka.
    dlq = DeadLetterQueue(dlq_producer, "not a valid topic!", group_id=GROUP)
    dlq.send(original, InvalidEvent("bad"))
    started = time.monotonic()
    with pytest.raises(MetarecError, match=rf"1 dead letter.*{source}\[0\]@0.*Do not commit"):
        dlq.flush(10)
    assert time.monotonic() - started < 5
    assert (dlq.sent, dlq.delivered, dlq.pending) == (1, 0, 0)
    dlq.flush(1)  # reported once: a later flush with nothing new is clean


def test_consumer_error_events_are_refused() -> None:
    error_event = Message(error=KafkaError(KafkaError._PARTITION_EOF))
    dlq = DeadLetterQueue(cast(Producer, object()), "dlq", group_id=GROUP)
    with pytest.raises(MetarecError, match="consumer error event"):
        dlq.send(error_event, ValueError("x"))


# --- the broker-side size rejection, which Tansu (no size limit) cannot produce ---------


class FakeProducer:
    """Records produce calls; rejects values over ``broker_limit`` in the delivery report,
    like Apache Kafka with a topic ``max.message.bytes`` below the client's limit."""

    def __init__(self, broker_limit: int, client_limit: int = 10**9) -> None:
        self.broker_limit = broker_limit
        self.client_limit = client_limit
        self.queue: list[tuple[dict[str, Any], Any]] = []
        self.written: list[dict[str, Any]] = []

    def produce(self, topic: str, **kw: Any) -> None:
        size = sum(len(kw.get(k) or b"") for k in ("key", "value"))
        size += sum(len(k) + len(v or b"") for k, v in kw.get("headers") or [])
        if size > self.client_limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.queue.append(({"topic": topic, **kw}, kw["on_delivery"]))

    def poll(self, timeout: float = 0) -> int:
        served = 0
        while self.queue:
            record, callback = self.queue.pop(0)
            served += 1
            if len(record.get("value") or b"") > self.broker_limit:
                callback(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
            else:
                self.written.append(record)
                callback(None, None)
        return served

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    def __len__(self) -> int:
        return len(self.queue)


def test_broker_side_size_rejection_is_resent_truncated() -> None:
    fake = FakeProducer(broker_limit=500)
    dlq = DeadLetterQueue(cast(Producer, fake), "dlq", group_id=GROUP, truncate_to=100)
    msg = Message(
        topic="events",
        partition=2,
        offset=9,
        key=b"u",
        value=b"x" * 800,
        headers=[("a", b"b")],
        timestamp=(1, 5),
    )
    dlq.send(msg, InvalidEvent("too big"))
    dlq.flush(1)
    [written] = fake.written
    assert written["value"] == b"x" * 100 and written["key"] == b"u"
    h = dict(written["headers"])
    assert h[VALUE_TRUNCATED] == b"800" and h["a"] == b"b"
    assert h[ORIGINAL_PARTITION] == b"2" and h[ORIGINAL_TIMESTAMP] == b"5"
    assert (dlq.delivered, dlq.truncated, dlq.pending) == (1, 1, 0)


def test_huge_key_and_headers_are_cut_too() -> None:
    fake = FakeProducer(broker_limit=10**9, client_limit=5000)
    dlq = DeadLetterQueue(cast(Producer, fake), "dlq", group_id=GROUP, truncate_to=100)
    msg = Message(
        topic="events",
        partition=0,
        offset=1,
        key=b"k" * 3000,
        value=b"v",
        headers=[("big", b"h" * 3000), ("more", b"m")],
    )
    dlq.send(msg, InvalidEvent("too big"))
    dlq.flush(1)
    [written] = fake.written
    assert written["key"] == b"k" * 100 and written["value"] == b"v"
    h = dict(written["headers"])
    assert h[KEY_TRUNCATED] == b"3000" and h[HEADERS_DROPPED] == b"2"
    assert VALUE_TRUNCATED not in h and "big" not in h
    assert h[ORIGINAL_TIMESTAMP] == b"-1"  # the record had no timestamp


def test_a_record_that_never_fits_is_reported() -> None:
    fake = FakeProducer(broker_limit=10**9, client_limit=10)
    dlq = DeadLetterQueue(cast(Producer, fake), "dlq", group_id=GROUP, truncate_to=100)
    dlq.send(Message(topic="events", partition=0, offset=3, value=b"v"), InvalidEvent("x"))
    with pytest.raises(MetarecError, match="still too large"):
        dlq.flush(1)
