"""Watching the events topic's log: resets, truncation and the whole group's lag.

Why: the consumers keep their offsets in Redis, and an offset means something only in the
log it was taken from. When the broker loses its data or the topic is recreated, offsets
start again from 0 and the stored ones point past the new log's records (or into the middle
of them): left alone, a consumer would skip every new record below its stored offset as a
re-delivery, silently. Kafka gives every topic a fresh id when it is created, so the
consumers store the id next to the offsets (``topic-id:{topic}``) and compare it with the
broker's, at every assignment, after any Kafka error and every :data:`CHECK_EVERY_S`.

On a new id, one member rebases every partition's stored offset, atomically, following
``METAREC_LOG_RESET_POLICY``: ``replay`` (default) goes on from the new log's start, so
nothing still in the log is lost; ``skip`` goes on from its end (only events published
from now on). It logs one ERROR with the numbers and counts it in ``offset_resets``.
Records deleted by retention before they were applied (the stored offset below the log's
start) are logged the same way, with how many were lost.

Every check also measures the lag of every partition of the topic, owned by this member
or not: a group that owns nothing while events pile up shows its lag.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Final, Literal

from confluent_kafka import Consumer, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient

from metarec.services.store import RedisStore

__all__ = ["CHECK_EVERY_S", "LogCheck", "TopicLog"]

log = logging.getLogger("metarec.consumer")

#: Seconds between two checks of the topic when nothing suggests a change.
CHECK_EVERY_S: Final = 5.0
#: Longest wait for one broker answer (topic description, watermarks).
BROKER_TIMEOUT_S: Final = 5.0

Policy = Literal["replay", "skip"]


@dataclass
class LogCheck:
    """What one check found. ``rebased``: partition → the offset to go on from (the topic
    was recreated); ``lag``: partition → records in its log not yet applied."""

    rebased: dict[int, int] = field(default_factory=dict)
    lag: dict[int, int] = field(default_factory=dict)
    lost: dict[int, int] = field(default_factory=dict)
    #: The stored offsets' sum: it moves while any member applies events.
    applied: int = 0
    #: Log replacements and truncations this check found (and reported).
    resets: int = 0


def _real_id(raw: object) -> str | None:
    """A topic id worth comparing: brokers without ids answer None or all zeros."""
    text = "" if raw is None else str(raw)
    return None if text in ("", "None") or set(text) <= {"A", "="} else text


class TopicLog:
    """Checks the events topic's identity and watermarks against the stored offsets.

    Parameters
    ----------
    consumer
        The member's Kafka consumer (it answers watermark queries for any partition).
    admin
        An admin client of the same cluster (it describes the topic, with its id).
    store
        Where the offsets and the topic id are kept.
    topic, policy
        The events topic and what to do when its log was replaced.
    """

    def __init__(
        self,
        consumer: Consumer,
        admin: AdminClient,
        store: RedisStore,
        topic: str,
        policy: Policy = "replay",
    ) -> None:
        self.consumer = consumer
        self.admin = admin
        self.store = store
        self.topic = topic
        self.policy = policy
        self.resets = 0  # log replacements and truncations seen by this member
        #: The id of the log this member's offsets refer to (None until the first check);
        #: every batch commit is refused once the stored id is another one.
        self.topic_id: str | None = None
        self._next_check = 0.0
        self._suspect = True
        self._lost_reported: dict[int, int] = {}

    def suspect(self) -> None:
        """Check at the next chance: Kafka reported an error (a broker went away, a topic
        vanished), which is how a reset starts."""
        self._suspect = True

    def due(self, now: float) -> bool:
        return self._suspect or now >= self._next_check

    def check(self, now: float | None = None) -> LogCheck | None:
        """Compare the topic with the stored offsets; rebase them if it is a new log.

        Returns None when the broker did not answer (the next call tries again).
        """
        now = time.monotonic() if now is None else now
        self._next_check = now + CHECK_EVERY_S
        try:
            desc = self.admin.describe_topics(
                TopicCollection([self.topic]), request_timeout=BROKER_TIMEOUT_S
            )[self.topic]
            topic = desc.result(timeout=BROKER_TIMEOUT_S)
            marks = {
                p.id: self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p.id), timeout=BROKER_TIMEOUT_S, cached=False
                )
                for p in topic.partitions
            }
        except Exception as exc:  # broker down or topic gone: Kafka errors say so already
            log.debug("topic check failed", extra={"topic": self.topic, "error": str(exc)})
            return None
        self._suspect = False
        parts = sorted(marks)
        stored = self.store.offsets(self.topic, parts)
        out = LogCheck()
        resets_before = self.resets
        topic_id = _real_id(topic.topic_id)
        if topic_id is not None:  # a broker without topic ids: nothing to compare
            seen_id = self.store.topic_id(self.topic)
            if seen_id is None:
                # First check ever (or offsets from before ids were kept): adopt the id.
                self.store.rebase_offsets(self.topic, None, topic_id, {})
            elif seen_id != topic_id:
                self._rebase(seen_id, topic_id, marks, stored)
            if (self.topic_id is not None and self.topic_id != topic_id) or seen_id not in (
                None,
                topic_id,
            ):
                # The log changed since this member last looked (rebased by it or by
                # another member): every offset it holds is to be read again.
                stored = self.store.offsets(self.topic, parts)
                out.rebased = {p: o for p, o in stored.items() if o is not None}
            self.topic_id = topic_id
        for p in parts:
            low, high = marks[p]
            at = stored[p]
            if at is not None and at < low and self._lost_reported.get(p) != low:
                self._lost_reported[p] = low
                self.resets += 1
                out.lost[p] = low - at
                log.error(
                    "events were deleted from the log before they were applied "
                    "(retention or truncation); going on from the log's start",
                    extra={
                        "topic": self.topic,
                        "partition": p,
                        "stored_offset": at,
                        "log_start": low,
                        "log_end": high,
                        "lost": low - at,
                    },
                )
            out.lag[p] = max(0, high - max(low, at if at is not None else low))
        out.resets = self.resets - resets_before
        out.applied = sum(o for o in stored.values() if o is not None)
        return out

    def _rebase(
        self,
        seen_id: str,
        topic_id: str,
        marks: dict[int, tuple[int, int]],
        stored: dict[int, int | None],
    ) -> None:
        target = {p: (low if self.policy == "replay" else high) for p, (low, high) in marks.items()}
        won = self.store.rebase_offsets(self.topic, seen_id, topic_id, dict(target))
        self.resets += 1
        log.error(
            "the events topic is a new log (broker reset or topic recreated): stored "
            "offsets rebased"
            if won
            else "the events topic is a new log; another member rebased the offsets",
            extra={
                "topic": self.topic,
                "old_topic_id": seen_id,
                "topic_id": topic_id,
                "policy": self.policy,
                "partitions": {
                    str(p): {
                        "stored_offset": stored.get(p),
                        "log_start": marks[p][0],
                        "log_end": marks[p][1],
                        "resume_at": target[p],
                    }
                    for p in sorted(marks)
                },
            },
        )
