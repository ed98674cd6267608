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
  checkpoint in Redis (``dlq:replayed:{topic}:{partition}``, and ``dlq:replayed-after:…``
  for letters handled past one a ``--matching`` passed over) makes a second replay start
  where the first one ended, so nothing is published twice;
* :func:`list_models`, :func:`rollback_model` and :func:`pin_model` (``metarec model
  list|rollback V|pin V|unpin``) — versions with their history; a rollback publishes a
  copy of version V as the newest version, so that versions only grow and every consumer
  reloads it within a second; a pin makes consumers serve V whatever is published after.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

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
from metarec.errors import ConfigError, MetarecError, ModelError
from metarec.logs import kafka_logger
from metarec.services import dead_letters as dlq
from metarec.services.store import RedisStore

if TYPE_CHECKING:
    from metarec.client import RecList, Recommendations

__all__ = [
    "inspect_dead_letters",
    "list_models",
    "pin_model",
    "replay_dead_letters",
    "reset_user",
    "rollback_model",
    "user_summary",
]

#: Longest wait for the dead-letter topic's metadata and records.
KAFKA_TIMEOUT_S: Final = 10.0
#: Bytes of a dead letter's value shown by ``inspect``.
PREVIEW_BYTES: Final = 200


def user_summary(store: RedisStore, user: str, domain: str | None = None) -> dict[str, Any]:
    """What an app showing ``domain`` (None: every domain) is served for ``user`` and from
    where (the read rule of :mod:`metarec.client`), the user's own stored list, and a
    summary of their state."""
    from metarec.client import Recommendations  # the apps' reader, so the rule is one
    from metarec.services.cluster_store import ClusterStore

    cluster = isinstance(store, ClusterStore)
    reader = Recommendations(store.client, prefix=store.prefix, cluster=cluster)
    shown = reader.get(user, domain)
    raw_states, profiles = store.load_users([user])
    state = None if raw_states[0] is None else UserState.from_bytes(raw_states[0])
    out: dict[str, Any] = {
        "user": user,
        "domain": domain,
        "served": {
            "source": None if shown is None else shown.source,
            "key": _source_key(reader, shown, user, domain),
            "items": [] if shown is None else shown.items,
            "scores": [] if shown is None else shown.scores,
            "model_version": None if shown is None else shown.model_version,
        },
        "key": store.recs_key(user),
        "recs": store.read_recs(user),
        "profile": profiles[0],
    }
    if shown is None:
        out["served"]["why"] = (
            f"no list of the user's and no fallback{'' if domain is None else f' of {domain!r}'} "
            "yet: no consumer has applied an event under this key prefix"
        )
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


def _source_key(
    reader: Recommendations, shown: RecList | None, user: str, domain: str | None
) -> str | None:
    """The key a read list came from: the user's, the domain's fallback or the global one."""
    if shown is None:
        return None
    if shown.source == "user":
        return reader.recs_key(user)
    if domain is None or shown.domain is None:
        return reader.global_fallback_key()
    return reader.fallback_key(domain)


def reset_user(store: RedisStore, user: str) -> bool:
    """Delete ``user``'s state and list (not the profile). True if there was anything."""
    return store.delete_user(user)


def list_models(store: RedisStore) -> list[dict[str, Any]]:
    """Stored model versions, newest first: which one is current (newest), pinned and
    served, and each one's history (where it comes from, what it was trained on and how
    well; see :meth:`RedisStore.publish_model`)."""
    current, pinned = store.current_model_version(), store.pinned_model_version()
    served = pinned if pinned is not None else current
    versions = [int(v) for v in store.client.zrevrange(store.key("model", "versions"), 0, -1)]
    out = []
    for v in versions:
        meta = store.model_meta(v) or {}
        out.append(
            {
                "version": v,
                "current": v == current,
                "pinned": v == pinned,
                "served": v == served,
                "created_ms": meta.get("created_ms"),
                "bytes": meta.get("size"),
                "reason": meta.get("reason"),
                "parent": meta.get("parent"),
                "window": meta.get("window"),
                "training_seconds": meta.get("training_seconds"),
                "validation_loss": meta.get("validation_loss"),
            }
        )
    return out


def rollback_model(store: RedisStore, version: int) -> int:
    """Serve what ``version`` served, as a new version; returns the new version number.
    The next cycle publishes a newer one over it: :func:`pin_model` holds a version."""
    try:
        blob = store.load_model_blob(version)
    except ModelError:
        raise _not_stored(store, version) from None
    meta = store.model_meta(version) or {}
    return store.publish_model(
        blob,
        history={
            "parent": version,
            "reason": f"rollback to version {version}",
            "kind": "rollback",
            "window": meta.get("window"),
            "training_seconds": None,
            "validation_loss": meta.get("validation_loss"),
        },
    )


def pin_model(store: RedisStore, version: int | None) -> dict[str, Any]:
    """Serve ``version`` (None: unpin, serve the newest again). The aggregator goes on
    training and publishing; consumers load the pinned version until it is unpinned."""
    try:
        store.pin_model(version)
    except ModelError:
        raise _not_stored(store, version) from None
    return {"pinned": version, "served": store.served_model_version()}


def _not_stored(store: RedisStore, version: int | None) -> ModelError:
    """The error for a version that is not stored, naming the ones that are."""
    stored = ", ".join(str(v["version"]) for v in list_models(store)) or "none"
    return ModelError(
        f"model version {version} is not stored (pruned, or never published); "
        f"stored versions: {stored}"
    )


def _dead_letters(
    settings: Settings, group: str, ends: dict[int, int] | None = None
) -> Iterator[Message]:
    """Every record of the dead-letter topic, oldest first per partition, then stop; with
    ``ends``, only those before each partition's end offset there."""
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
                p = int(msg.partition() or 0)
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(p)
                    continue
                if ends is not None and int(msg.offset() or 0) >= ends.get(p, 0):
                    pending.discard(p)
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


def inspect_dead_letters(
    settings: Settings, limit: int = 100, matching: str | None = None
) -> list[dict[str, Any]]:
    """Up to ``limit`` dead letters (those whose error message contains ``matching``, if
    given): where they came from, why, and the start of each."""
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, not {limit}")
    out = []
    for msg in _dead_letters(settings, f"{settings.group_id}-dlq-inspect"):
        h = _headers(msg)
        if matching is not None and matching not in (h.get(dlq.ERROR_MESSAGE) or ""):
            continue
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
) -> dict[str, int | bool]:
    """Publish dead letters again to their original topic, key and value unchanged (an
    event dead-lettered for having no key is keyed by its user).

    Each letter is replayed at most once. Redis remembers which were handled (replayed, or
    cut down and so never replayable): per partition, the offset up to which all were, and
    the handled ones after it. A letter that ``matching`` passes over is not handled, so a
    later replay with another ``matching`` still finds it. A replay reads the topic up to
    where it ended when the replay started: a letter that fails again while it runs is
    dead-lettered anew and left to the next replay, not replayed twice in one run.
    """
    producer = Producer(
        settings.kafka_config(**{"enable.idempotence": "true", "partitioner": "murmur2_random"}),
        logger=kafka_logger("producer"),
    )
    counts = {"replayed": 0, "skipped": 0, "not_matching": 0}
    marks: dict[int, _ReplayMarks] = {}
    # Where the topic ends before anything is published, read to the end rather than asked
    # (not every broker reports high watermarks exactly: Tansu 0.6 counts batches).
    group = f"{settings.group_id}-dlq-replay"
    ends = {
        int(m.partition() or 0): int(m.offset() or 0) + 1 for m in _dead_letters(settings, group)
    }
    for msg in _dead_letters(settings, group, ends):
        p, off = int(msg.partition() or 0), int(msg.offset() or 0)
        if p not in marks:
            marks[p] = _ReplayMarks.load(store, settings.dlq_topic, p)
        mark = marks[p]
        if mark.handled(off):
            continue
        h = _headers(msg)
        if dlq.VALUE_TRUNCATED in h or dlq.KEY_TRUNCATED in h or not h.get(dlq.ORIGINAL_TOPIC):
            counts["skipped"] += 1
        elif matching is not None and matching not in h.get(dlq.ERROR_MESSAGE, ""):
            counts["not_matching"] += 1
            mark.pass_over()
            continue
        else:
            counts["replayed"] += 1
            if not dry_run:
                key = msg.key()
                if key is None and h[dlq.ORIGINAL_TOPIC] == settings.events_topic:
                    key = _user_of(msg.value())  # dead-lettered for want of a key
                producer.produce(h[dlq.ORIGINAL_TOPIC], key=key, value=msg.value())
                producer.poll(0)
        mark.handle(off)
    if not dry_run:
        left = producer.flush(KAFKA_TIMEOUT_S * 3)
        if left:
            raise MetarecError(
                f"{left} replayed records were not delivered; nothing was "
                "checkpointed, so the next replay sends them again"
            )
        for mark in marks.values():
            mark.save(store)
    return {**counts, "dry_run": dry_run}


def _user_of(value: bytes | None) -> bytes | None:
    """The user id of an event's JSON, as its record key (None if there is none)."""
    try:
        user = json.loads(value or b"").get("user")
    except (ValueError, AttributeError):
        return None
    return user.encode("utf-8") if isinstance(user, str) else None


class _ReplayMarks:
    """Which letters of one dead-letter partition a replay has handled (see
    :func:`replay_dead_letters`): all up to ``upto``, and those in ``after``."""

    def __init__(self, topic: str, partition: int, upto: int, after: set[int]) -> None:
        self.topic, self.partition = topic, partition
        self.upto, self.after = upto, after
        self._contiguous = True  # no letter passed over yet in this run

    @classmethod
    def load(cls, store: RedisStore, topic: str, partition: int) -> _ReplayMarks:
        raw = store.client.get(store.key("dlq", "replayed", topic, partition))
        after = store.client.zrange(store.key("dlq", "replayed-after", topic, partition), 0, -1)
        return cls(topic, partition, -1 if raw is None else int(raw), {int(x) for x in after})

    def handled(self, offset: int) -> bool:
        return offset <= self.upto or offset in self.after

    def pass_over(self) -> None:
        self._contiguous = False

    def handle(self, offset: int) -> None:
        if self._contiguous:
            self.upto = offset
        else:
            self.after.add(offset)

    def save(self, store: RedisStore) -> None:
        """The marks, in an order where a failure part way only leaves extra marks of
        handled letters (the keys may sit in different Cluster slots: no transaction)."""
        upto_key = store.key("dlq", "replayed", self.topic, self.partition)
        after_key = store.key("dlq", "replayed-after", self.topic, self.partition)
        later: dict[str | bytes, float] = {str(o): o for o in self.after if o > self.upto}
        if later:
            store.client.zadd(after_key, later)
        store.client.set(upto_key, str(self.upto))
        store.client.zremrangebyscore(after_key, "-inf", self.upto)
