"""Operator commands: look at a user, the dead letters and the model versions, and act.

Each function does one job against the live Redis and broker and returns plain data (the
CLI prints it as JSON), so that scripts and runbooks can use them too:

* :func:`user_summary` (``metarec recs USER``) — the list apps read (and its key) and the
  state behind it;
* :func:`reset_user` (``metarec user reset USER``) — forget a user's state and list; their
  next event starts them afresh. Safe under running consumers: a consumer that loaded the
  user before the reset finds the state gone at commit time and redoes its batch;
* :func:`inspect_dead_letters` (``metarec dlq inspect``) — the dead letters with why;
* :func:`replay_dead_letters` (``metarec dlq replay``) — publish them again to their
  original topic, key and value unchanged, after the producer or the consumer was fixed. A
  checkpoint in Redis (``dlq:replayed:{topic}:{partition}``) makes a second replay start
  where the first one ended, so nothing is published twice;
* :func:`list_models` and :func:`rollback_model` (``metarec model list|rollback V``) — a
  rollback publishes a copy of version V as the newest version, so that versions only grow
  and every consumer reloads it within a second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Final

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from metarec.config import Settings
from metarec.core.user_state import UserState
from metarec.errors import MetarecError
from metarec.logs import kafka_logger
from metarec.services import dead_letters as dlq
from metarec.services.store import RedisStore

__all__ = [
    "inspect_dead_letters",
    "list_models",
    "replay_dead_letters",
    "reset_user",
    "rollback_model",
    "user_summary",
]

#: Longest wait for the dead-letter topic's metadata and records.
KAFKA_TIMEOUT_S: Final = 10.0
#: Bytes of a dead letter's value shown by ``inspect``.
PREVIEW_BYTES: Final = 200


def user_summary(store: RedisStore, user: str) -> dict[str, Any]:
    """The list ``user``'s apps read, and a summary of the state it came from."""
    raw_states, profiles = store.load_users([user])
    state = None if raw_states[0] is None else UserState.from_bytes(raw_states[0])
    out: dict[str, Any] = {
        "user": user,
        "key": store.recs_key(user),
        "recs": store.read_recs(user),
        "profile": profiles[0],
    }
    if state is not None:
        out["state"] = {
            "events": state.n_events,
            "last_ts": state.last_ts,
            "domain": state.domain,
            "model_version": state.model_version,
            "history": int((state.hist_items >= 0).sum()),
            "seen": int(state.seen.size),
        }
    else:
        out["state"] = None
    return out


def reset_user(store: RedisStore, user: str) -> bool:
    """Delete ``user``'s state and list (not the profile). True if there was anything."""
    return store.delete_user(user)


def list_models(store: RedisStore) -> list[dict[str, Any]]:
    """Stored model versions, newest first, with their meta and which one is served."""
    current = store.current_model_version()
    versions = [int(v) for v in store.client.zrevrange(store.key("model", "versions"), 0, -1)]
    out = []
    for v in versions:
        raw = store.client.get(store.key("model", v, "meta"))
        meta = {} if raw is None else json.loads(raw)
        out.append(
            {
                "version": v,
                "current": v == current,
                "created_ms": meta.get("created_ms"),
                "bytes": meta.get("size"),
            }
        )
    return out


def rollback_model(store: RedisStore, version: int) -> int:
    """Serve what ``version`` served, as a new version; returns the new version number."""
    blob = store.load_model_blob(version)  # raises ModelError if it was pruned
    return store.publish_model(blob)


def _dead_letters(settings: Settings, group: str) -> Iterator[Message]:
    """Every record of the dead-letter topic, oldest first per partition, then stop."""
    consumer = Consumer(
        settings.kafka_config(
            **{"group.id": group, "enable.auto.commit": "false", "enable.partition.eof": "true"}
        ),
        logger=kafka_logger("operations"),
    )
    try:
        meta = consumer.list_topics(settings.dlq_topic, timeout=KAFKA_TIMEOUT_S)
        topic = meta.topics.get(settings.dlq_topic)
        if topic is None or topic.error is not None:
            raise MetarecError(
                f"dead-letter topic {settings.dlq_topic!r} not found (METAREC_DLQ_TOPIC)"
            )
        parts = sorted(topic.partitions)
        consumer.assign([TopicPartition(settings.dlq_topic, p, OFFSET_BEGINNING) for p in parts])
        pending = set(parts)  # until each partition reports its end (partition EOF)
        deadline = time.monotonic() + KAFKA_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(int(msg.partition() or 0))
                    continue
                yield msg
                deadline = time.monotonic() + KAFKA_TIMEOUT_S
    finally:
        consumer.close()


def _headers(msg: Message) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in msg.headers() or []:
        name, value = pair[0], pair[1]
        out[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else ""
    return out


def inspect_dead_letters(settings: Settings, limit: int = 100) -> list[dict[str, Any]]:
    """Up to ``limit`` dead letters: where they came from, why, and the start of each."""
    out = []
    for msg in _dead_letters(settings, f"{settings.group_id}-dlq-inspect"):
        h = _headers(msg)
        value = msg.value() or b""
        out.append(
            {
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": (msg.key() or b"").decode("utf-8", "replace"),
                "error_class": h.get(dlq.ERROR_CLASS),
                "error": h.get(dlq.ERROR_MESSAGE),
                "origin": f"{h.get(dlq.ORIGINAL_TOPIC)}[{h.get(dlq.ORIGINAL_PARTITION)}]"
                f"@{h.get(dlq.ORIGINAL_OFFSET)}",
                "truncated": dlq.VALUE_TRUNCATED in h,
                "value": value[:PREVIEW_BYTES].decode("utf-8", "replace"),
            }
        )
        if len(out) >= limit:
            break
    return out


def replay_dead_letters(
    settings: Settings, store: RedisStore, *, dry_run: bool = False, matching: str | None = None
) -> dict[str, int]:
    """Publish dead letters again to their original topic, key and value unchanged.

    Only letters after the last replay's checkpoint; ``matching`` keeps those whose error
    message contains it (the others are passed over for good). Cut-down letters (too large
    to keep whole) cannot be replayed and are counted as skipped.
    """
    producer = Producer(
        settings.kafka_config(**{"enable.idempotence": "true", "partitioner": "murmur2_random"}),
        logger=kafka_logger("producer"),
    )
    counts = {"replayed": 0, "skipped": 0, "not_matching": 0}
    done: dict[int, int] = {}
    for msg in _dead_letters(settings, f"{settings.group_id}-dlq-replay"):
        p, off = int(msg.partition() or 0), int(msg.offset() or 0)
        key = store.key("dlq", "replayed", settings.dlq_topic, p)
        if p not in done:
            raw = store.client.get(key)
            done[p] = -1 if raw is None else int(raw)
        if off <= done[p]:
            continue
        h = _headers(msg)
        if dlq.VALUE_TRUNCATED in h or dlq.KEY_TRUNCATED in h or not h.get(dlq.ORIGINAL_TOPIC):
            counts["skipped"] += 1
        elif matching is not None and matching not in h.get(dlq.ERROR_MESSAGE, ""):
            counts["not_matching"] += 1
        else:
            counts["replayed"] += 1
            if not dry_run:
                producer.produce(h[dlq.ORIGINAL_TOPIC], key=msg.key(), value=msg.value())
                producer.poll(0)
        if not dry_run:
            done[p] = off
    if not dry_run:
        left = producer.flush(KAFKA_TIMEOUT_S * 3)
        if left:
            raise MetarecError(
                f"{left} replayed records were not delivered; nothing was "
                "checkpointed, so the next replay sends them again"
            )
        for p, off in done.items():
            store.client.set(store.key("dlq", "replayed", settings.dlq_topic, p), str(off))
    return counts
