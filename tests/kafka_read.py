"""Helpers shared by the tests that read topics back from the real broker."""

from __future__ import annotations

import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

READ_TIMEOUT_S = 30.0
_END = b"__end-of-test__"


def drain(bootstrap: str, topic: str, group_id: str) -> list[Message]:
    """Every record of ``topic``, in partition order, read exactly.

    Why a sentinel: the local broker's high watermarks are not exact, so instead of
    counting by offsets this writes an end marker to every partition and reads up to it.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        marker = Producer({"bootstrap.servers": bootstrap})
        for p in partitions:
            marker.produce(topic, key=_END, value=b"{}", partition=p)
        assert marker.flush(10) == 0
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[Message] = []
        open_partitions = set(partitions)
        deadline = time.monotonic() + READ_TIMEOUT_S
        while open_partitions and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                assert msg.error() is None, msg.error()
                if msg.key() == _END:
                    open_partitions.discard(msg.partition())
                else:
                    out.append(msg)
        assert not open_partitions, f"end markers not read from partitions {open_partitions}"
        return out
    finally:
        consumer.close()


def read_records(
    bootstrap: str, topic: str, partitions: int, n: int, start: int = OFFSET_BEGINNING
) -> list[Message]:
    """The first ``n`` records of ``topic`` from offset ``start`` of each partition, read
    without a group (``assign``)."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-reader",
            "enable.auto.commit": "false",
        }
    )
    got: list[Message] = []
    try:
        reader.assign([TopicPartition(topic, p, start) for p in range(partitions)])
        deadline = time.monotonic() + READ_TIMEOUT_S
        while len(got) < n:
            assert time.monotonic() < deadline, f"read {len(got)} of {n} records of {topic}"
            got += [m for m in reader.consume(n - len(got), 0.5) if m.error() is None]
    finally:
        reader.close()
    return got
