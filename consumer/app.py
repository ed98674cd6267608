"""The consumer service: Kafka in, per-user lists in Redis out, exactly once in effect.

One batch, start to finish (the order is the whole point, so it is written here once):

1. consume up to ``batch_size`` records (one ``consume`` call); when due (every 5 s, after
   a Kafka error, at every assignment) check that the events topic is still the log the
   stored offsets refer to (:mod:`consumer.topic_log`: a broker reset or a recreated topic
   rebases them, and that partition's records are fetched again);
2. decode and validate; a bad record (malformed, outside the limits or the time window,
   keyed by another user) goes to the dead-letter topic unchanged, with headers naming the
   error; metadata records (items, users) update the registry and profiles;
3. flush the dead-letter producer — before anything is committed, so no bad record is
   ever lost behind a committed offset;
4. register the batch's items (one round trip) and load the touched users' states and
   profiles (one round trip);
5. per partition: adapt the users and rank their lists
   (:meth:`metarec.core.learner.Learner.learn_many`, the very code ``metarec eval``
   measures; before each event is applied it records whether the item was in the list the
   user was being shown — live HR@K/NDCG@K — and reacts to users whose hits show a drift),
   then write states, lists, trending counts, partial sums *and the partition's next offset*
   as one atomic Redis unit that first checks the stored offset (a zombie's write changes
   nothing) and each user's stored event count (a user whose events also arrive on another
   partition, written by another consumer meanwhile, makes the unit refuse; it is redone
   from the stored states); the live metrics are fed only once the unit is written. On a
   Redis Cluster the unit is written in idempotent steps
   (:mod:`metarec.services.cluster_store`): each user adapts only to its events past its
   stored applied offset, and a batch another writer left half-written is finished first, up
   to where it ended;
6. only then commit the offsets to Kafka too, for lag monitoring (Redis stays the source
   of truth: on assignment the consumer seeks to the offsets stored in Redis).

A crash anywhere before step 5 leaves Redis untouched, and the records are consumed again;
a crash after it re-delivers records whose offsets Redis already holds, and they are
skipped. Every Redis call is retried through an outage (:mod:`metarec.services.outage`), with
fetching stopped meanwhile; a write whose reply was lost is recognised by its offset when
it is retried. SIGTERM lets the batch in flight finish its step 5 and exits 0.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_STORED,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from threadpoolctl import threadpool_limits

from consumer.dlq import DeadLetterQueue, dead_letter_reason
from consumer.stats import ConsumerStats, format_line
from consumer.stuck_group import StuckGroup
from consumer.topic_log import TopicLog
from metarec.config import Settings, incremental_rebalancing
from metarec.core.drift import RetrainRequest
from metarec.core.events import Event, ItemRecord, UserRecord
from metarec.core.learner import RECENT_USERS, REFRESH_BATCH, EventBatch, Learner
from metarec.core.live_quality import ALL
from metarec.core.model import MetaModel
from metarec.core.records import RecordDecoder
from metarec.core.user_state import UserState, count_guard, decode_many, encode_many
from metarec.errors import (
    InvalidEvent,
    LogReplaced,
    ModelError,
    PendingBatch,
    StaleOffset,
    UserConflict,
)
from metarec.logs import Throttle, kafka_logger
from metarec.services.metrics import HealthServer, Metrics
from metarec.services.outage import Stopped, redis_outage, retrying_store

__all__ = ["ConsumerApp", "incremental_rebalancing"]

log = logging.getLogger("metarec.consumer")

#: How often the served model version is checked (one GET): a published version is served
#: within this time plus its load.
MODEL_POLL_S = 0.25
#: How often the shared trending counts are re-read (between two reads, this consumer's own
#: batches keep its copy moving).
TRENDING_REFRESH_S = 5.0
#: First pause after a user conflict (another member wrote the batch's users meanwhile);
#: each attempt fails only if another write landed between its load and its commit.
CONFLICT_BACKOFF_S = 0.005
#: Freshness values observed per batch by the Prometheus histogram (a sample).
FRESHNESS_SAMPLES = 64
#: At most one warning per this many seconds for each kind of repeated problem.
WARN_EVERY_S = 60.0
#: Dead letters of one batch that get a log line each; the rest share one summary line,
#: so a flood of hostile records cannot flood the logs.
DEAD_LETTER_LINES = 5

#: The consumers' fetch settings, on top of the group defaults (metarec.config); anything
#: passed through METAREC_KAFKA_* overrides them.
FETCH_DEFAULTS = {
    # Bounds a fetch that finds no data; Tansu holds it for the full wait, which showed up
    # as produce-to-list latency (p99 326 ms at librdkafka's 500 ms default, 122 ms at 20;
    # with a 5 ms batch timeout, 2 consumers at 5,000 events/s: p99 194 ms at 20, 87 at 5).
    "fetch.wait.max.ms": "5",
    # Bounds librdkafka's prefetch buffer (default 64 MiB) so memory does not follow the
    # size of a backlog.
    "queued.max.messages.kbytes": "16384",
    "partition.assignment.strategy": "range",
}


class ConsumerApp:
    """A member of the consumer group. ``run()`` until :meth:`stop` or SIGTERM."""

    def __init__(self, settings: Settings, *, member: str | None = None) -> None:
        self.settings = settings
        self.member = member or f"{socket.gethostname()}-{os.getpid()}"
        self._stopping = False
        # Every store call is retried through a Redis outage (metarec.services.outage); fetching
        # stops meanwhile, because the loop is inside the call.
        self._health: HealthServer | None = None
        self.metrics = Metrics("consumer")
        self.outage = redis_outage(
            settings,
            log,
            self.metrics,
            should_stop=lambda: self._stopping,
            on_wait=self._alive,
        )
        self.store = retrying_store(settings, self.outage)
        # The learner also keeps the live quality of the lists apps were shown, and what it
        # says about drift.
        self.learner = Learner.from_settings(settings)
        self.decoder = RecordDecoder.from_settings(settings)
        self.stats = ConsumerStats(settings.stats_interval_s, time.monotonic(), seed=settings.seed)
        self._expected: dict[int, int | None] = {}
        # Redis Cluster only: partition → end of a half-written batch to finish first.
        self._cut: dict[int, int] = {}
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._refresh_queue: list[str] = []
        self._lag: dict[int, int] = {}  # every partition's, from the last topic check
        self._next_model_poll = 0.0
        # A version this consumer cannot load (e.g. a newer model format): reported once,
        # not at every poll, until another version is published.
        self._unloadable: int | None = None
        self._withdrawn_version = 0  # the withdrawn set's version the learner has
        self._next_trend_refresh = 0.0
        self._conflict_log = Throttle(WARN_EVERY_S)
        self._stuck = StuckGroup()
        self._applied = 0  # the stored offsets' sum at the last topic check
        self._group_due = False  # a topic check happened: look at the group's health
        self._model_created_ms: int | None = None
        # The pass-through, inside group_config, overrides FETCH_DEFAULTS too.
        self._kafka_config = {
            **FETCH_DEFAULTS,
            **settings.group_config(
                settings.group_id,
                enable_auto_commit="false",
                client_id=f"metarec-consumer-{self.member}",
            ),
        }
        self._incremental = incremental_rebalancing(self._kafka_config)
        self._generation = 0  # read in run(), once Redis has let us in
        self.consumer = self._new_kafka_consumer()
        admin_config: dict[str, str | int | float | bool] = {**settings.kafka_config()}
        admin = AdminClient(admin_config, logger=kafka_logger("admin"))
        self.topic_log = TopicLog(
            self.consumer,
            admin,
            self.store,
            settings.events_topic,
            "skip" if settings.log_reset_policy == "skip" else "replay",
        )
        producer = Producer(
            settings.kafka_config(**{"enable.idempotence": "true", "linger.ms": "5"}),
            logger=kafka_logger("producer"),
        )
        self.dlq = DeadLetterQueue(producer, settings.dlq_topic, settings.group_id)

    # -- lifecycle --------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Finish the batch in flight, then leave the group (safe from a signal handler)."""
        self._stopping = True

    def run(self) -> int:
        s = self.settings
        # One compute thread per consumer: a batch's matrices are small, and the cores are
        # used by running one consumer per core. BLAS and OpenMP thread pools competing
        # with the other consumers made batches about 3x slower (measured on this machine).
        threadpool_limits(limits=1)
        self.store.check_access()  # a refused login or ACL stops us here, in one line
        health = self._health = (
            HealthServer(self.metrics, s.metrics_port, self.missing) if s.metrics_port else None
        )
        self._sync_catalog()
        self._poll_model()
        self._refresh_trending()
        generation = self.store.group_generation(s.group_id)
        if generation != self._generation:  # the group moved on from a stuck Kafka group
            self._replace_kafka_consumer(generation)
        self._subscribe()
        log.info(
            "consumer started",
            extra={
                "member": self.member,
                "group": s.group_id,
                "kafka_group": self.kafka_group,
                "settings": s.redacted(),
            },
        )
        try:
            while not self._stopping:
                records = self.consumer.consume(s.batch_size, s.batch_timeout_ms / 1000)
                self.process(records)
                if len(records) < s.batch_size:  # no backlog: time to refresh lists
                    self._refresh_stale_lists()
                self._maybe_report()
                self._set_model_age()
                if health is not None:
                    health.tick()
        except Stopped:
            log.info(
                "stopped while Redis was unavailable; the batch in flight is consumed "
                "again by the partitions' next owner"
            )
        finally:
            if health is not None:
                health.close()
            self.dlq.flush(10.0)
            self.consumer.close()
            log.info(
                "consumer stopped",
                extra={"member": self.member, "stats": self.stats.report(time.monotonic())},
            )
        return 0

    @property
    def kafka_group(self) -> str:
        """The Kafka group id the members use now: ``METAREC_GROUP_ID``, then
        ``{METAREC_GROUP_ID}.{n}`` once they moved on from a stuck group ``n`` times.
        Offsets live in Redis, so a new Kafka group resumes exactly where the old one was."""
        group = self.settings.group_id
        return group if self._generation == 0 else f"{group}.{self._generation}"

    def _new_kafka_consumer(self) -> Consumer:
        return Consumer(
            {**self._kafka_config, "group.id": self.kafka_group},
            error_cb=self._on_kafka_error,
            logger=kafka_logger("consumer"),
        )

    def _subscribe(self) -> None:
        s = self.settings
        self.consumer.subscribe(
            [s.events_topic, s.items_topic, s.users_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def _rejoin(self, generation: int) -> None:
        """Leave the Kafka group and join the group's ``generation`` with a new Kafka
        consumer: a group the broker no longer assigns anything to (on Tansu, after all
        its members left at once) stays stuck under its id, while a new id works."""
        self.metrics.group_rejoins.inc()
        self._stuck.moved(time.monotonic())
        self._replace_kafka_consumer(generation)
        self._expected.clear()
        self._cut.clear()
        self._subscribe()

    def _replace_kafka_consumer(self, generation: int) -> None:
        """Close the Kafka consumer (leaving its group) and make one for ``generation``."""
        try:
            self.consumer.close()  # the revoke callback forgets the partitions
        except Exception as exc:
            log.debug("closing the kafka consumer failed", extra={"error": str(exc)})
        self._generation = generation
        self.consumer = self._new_kafka_consumer()
        self.topic_log.consumer = self.consumer

    # -- one batch --------------------------------------------------------------------

    def process(self, records: Sequence[Message]) -> None:
        """Steps 2-6 of the module docstring for one consumed batch."""
        s = self.settings
        self._maybe_reload(time.monotonic())
        rebased = self._check_log()
        if self._group_due:  # outside librdkafka's callbacks: this may replace the consumer
            self._group_due = False
            self._watch_group(time.monotonic())
        if rebased:  # their records come again from the new offsets
            records = [
                m for m in records if not (m.topic() == s.events_topic and m.partition() in rebased)
            ]
        if not records:
            return
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        events: dict[int, list[tuple[Message, Event]]] = defaultdict(list)
        next_offset: dict[int, int] = {}
        items: list[ItemRecord] = []
        users: list[UserRecord] = []
        meta_offsets: dict[tuple[str, int], int] = {}
        beyond: set[int] = set()
        n_dlq = n_consumed = 0
        reasons: dict[str, int] = {}  # dead letters of this batch by reason
        for msg in records:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka error", extra={"error": str(err)})
                    self.topic_log.suspect()
                    self.metrics.kafka_errors.inc()
                continue
            topic, part, offset = (
                msg.topic() or "",
                int(msg.partition() or 0),
                int(msg.offset() or 0),
            )
            try:
                if topic == s.events_topic:
                    n_consumed += 1
                    expected = self._expected.get(part)
                    if part not in self._expected or (expected is not None and offset < expected):
                        continue  # not ours any more, or already applied (a re-delivery)
                    if part in self._cut and offset >= self._cut[part]:
                        beyond.add(part)  # after the half-written batch: fetched again
                        continue
                    next_offset[part] = max(next_offset.get(part, 0), offset + 1)
                else:
                    meta_offsets[(topic, part)] = offset + 1
                record = self.decoder.decode(
                    topic, msg.key(), msg.value(), timestamp_ms=msg.timestamp()[1], now_ms=now_ms
                )
                if isinstance(record, Event):
                    events[part].append((msg, record))
                elif isinstance(record, ItemRecord):
                    items.append(record)
                elif isinstance(record, UserRecord):
                    users.append(record)
            except Exception as exc:
                # Decoding is pure, so whatever it raises is this record's fault; anything
                # but InvalidEvent (RecursionError on deeply nested JSON) is a decoder gap,
                # and crashing on it would stop the partition at this record for good.
                if not isinstance(exc, InvalidEvent):
                    log.warning(
                        "record failed to decode unexpectedly; dead-lettered",
                        extra={
                            "error": repr(exc)[:200],
                            "topic": topic,
                            "partition": part,
                            "offset": offset,
                        },
                    )
                self.dlq.send(msg, exc)
                reason = dead_letter_reason(exc)
                self.metrics.dead_letters.labels(reason=reason).inc()
                n_dlq += 1
                reasons[reason] = reasons.get(reason, 0) + 1
                if n_dlq <= DEAD_LETTER_LINES:
                    log.warning(
                        "dead-lettered a record",
                        extra={
                            "reason": reason,
                            "error": str(exc)[:200],
                            "topic": topic,
                            "partition": part,
                            "offset": offset,
                        },
                    )
        if n_dlq:
            if n_dlq > DEAD_LETTER_LINES:
                log.warning(
                    "dead-lettered more records in this batch",
                    extra={"more": n_dlq - DEAD_LETTER_LINES, "reasons": reasons},
                )
            self.dlq.flush(30.0)  # raises if a dead letter could not be written
        if items:
            self.store.describe_items(items)
            # Last record per item wins; a change shows in every consumer at its next poll.
            self.store.set_availability({r.item: r.available for r in items})
        if users:
            self.store.set_profiles(users)
        n_events = 0
        freshness: list[float] = []
        batch_events = [e for part in events.values() for _, e in part]
        if batch_events:
            indices = self.store.item_indices(
                [e.item for e in batch_events], [e.domain for e in batch_events]
            )
            self._sync_catalog(int(indices.max()) + 1)
            index_of = dict(zip((e.item for e in batch_events), indices.tolist(), strict=True))
            for part, pairs in events.items():
                done = self._apply_partition(part, pairs, next_offset[part], index_of, now_ms)
                if done:
                    n_events += len(pairs)
                    written = time.time() * 1000
                    freshness.extend(written - m.timestamp()[1] for m, _ in pairs)
        for part, nxt in next_offset.items():
            if part not in events and part in self._expected:
                # Only dead letters in this partition: move its offset past them.
                self._commit_offset_only(part, nxt)
        if self._cut:
            self._follow_cuts(beyond)
        self._commit_kafka(next_offset, meta_offsets)
        elapsed = time.perf_counter() - started
        self.stats.record_batch(len(records), n_events, n_dlq, elapsed, np.asarray(freshness))
        m = self.metrics
        m.events_consumed.inc(n_consumed)
        m.events_applied.inc(n_events)
        m.batch_seconds.observe(elapsed)
        # A sample of the batch's events: observing thousands per batch would cost more
        # than the batch's own bookkeeping.
        for ms in freshness[:: -(-len(freshness) // FRESHNESS_SAMPLES) or 1]:
            m.freshness_seconds.observe(max(0.0, ms) / 1000)

    def _apply_partition(
        self,
        part: int,
        pairs: list[tuple[Message, Event]],
        nxt: int,
        index_of: dict[str, int],
        now_ms: int,
    ) -> bool:
        s = self.settings
        users = list(dict.fromkeys(e.user for _, e in pairs))
        whole = batch = self._event_batch(pairs, index_of)
        for attempt in itertools.count(1):
            raw_states, profiles = self.store.load_users(users)
            # Read after the states: on a Redis Cluster a user may hold some of these
            # events already (written before a crash), and adapts only to the others.
            marks = self.store.applied_offsets(s.events_topic, part, users, self.topic_log.topic_id)
            if marks:
                todo = [(m, e) for m, e in pairs if int(m.offset() or 0) >= marks[e.user]]
                batch = whole if len(todo) == len(pairs) else self._event_batch(todo, index_of)
            stored = [u for u, b in zip(users, raw_states, strict=True) if b is not None]
            states: dict[str, UserState | None] = dict.fromkeys(users)
            states.update(
                zip(stored, decode_many([b for b in raw_states if b is not None]), strict=True)
            )
            guards = {u: count_guard(st) for u, st in states.items()}
            outcome = (
                self.learner.learn_many(batch, states, dict(zip(users, profiles, strict=True)))
                if batch.users
                else None
            )
            try:
                clock = self.store.commit_batch(
                    s.events_topic,
                    part,
                    self._expected.get(part),
                    nxt,
                    states={}
                    if outcome is None
                    else dict(
                        zip(outcome.states, encode_many(list(outcome.states.values())), strict=True)
                    ),
                    recs={}
                    if outcome is None
                    else self.learner.list_records(outcome.lists, outcome.states, now_ms),
                    recs_ttl_s=s.recs_ttl_s,
                    state_ttl_s=s.state_ttl_s,
                    partials=outcome.partials
                    if outcome is not None and self.learner.model is not None
                    else None,
                    events=len(batch.users),
                    trending=[] if outcome is None else outcome.trending,
                    channels=() if outcome is None else self.learner.channels,
                    guards=guards,
                    topic_id=self.topic_log.topic_id,
                )
            except PendingBatch as exc:
                # A Redis Cluster only: an earlier writer stopped half-way through a batch
                # that ends elsewhere; its end must be this partition's next batch end.
                log.warning(
                    "batch cut: an earlier batch of this partition is half-written; "
                    "finishing it first",
                    extra={"partition": part, "pending": exc.pending},
                )
                self._cut_at(part, exc.pending)
                return False
            except LogReplaced as exc:
                # Another member found the log replaced and rebased the offsets: this
                # batch is from the old log. The next check re-reads and re-seeks.
                log.warning(
                    "batch dropped: the events log was replaced",
                    extra={"partition": part, "error": str(exc)},
                )
                self.topic_log.suspect()
                return False
            except StaleOffset as exc:
                if exc.stored == nxt:
                    # Its effects are stored: a commit whose reply a dropped connection
                    # lost (and was retried), or another member that wrote these records.
                    log.info("batch already written", extra={"partition": part, "offset": nxt})
                    self._expected[part] = nxt
                    return True
                log.warning(
                    "batch fenced off: partition moved to another consumer",
                    extra={"partition": part, "error": str(exc)},
                )
                self._reseek(part)
                return False
            except UserConflict as exc:
                # Another consumer wrote some of these users meanwhile: their events come
                # on two partitions. Redo the batch from what is stored now; the trending
                # counts this attempt added locally are dropped by re-reading them.
                self.stats.record_conflicts(len(exc.users))
                self.metrics.user_conflicts.inc(len(exc.users))
                self._refresh_trending()
                if self._conflict_log.allow(time.monotonic()):
                    log.warning(
                        "users' events arrive on more than one partition; batch "
                        "redone from their stored states (producers must key "
                        "events by user with one partitioner)",
                        extra={
                            "partition": part,
                            "users": exc.users[:5],
                            "conflicts": len(exc.users),
                            "attempt": attempt,
                        },
                    )
                # Two members redoing the same users at once would collide again: back
                # off a random, growing moment.
                time.sleep(random.uniform(0, min(CONFLICT_BACKOFF_S * attempt, 0.5)))
                continue
            break
        # Other consumers moved the shared clock too: follow it (their counts come with
        # the next refresh).
        self.learner.trending.clock = max(self.learner.trending.clock, clock)
        self._expected[part] = nxt
        if outcome is None:
            return True
        if outcome.drifted:
            log.info("users drifted", extra={"users": len(outcome.drifted)})
        for req in self.learner.observe(batch, outcome):
            self._ask(req, live=self.learner.drift.live.get())
        for u in users:
            self._recent[u] = part
            self._recent.move_to_end(u)
        while len(self._recent) > RECENT_USERS:
            self._recent.popitem(last=False)
        return True

    def _event_batch(
        self, pairs: list[tuple[Message, Event]], index_of: dict[str, int]
    ) -> EventBatch:
        s = self.settings
        evs = [e for _, e in pairs]
        return EventBatch(
            users=[e.user for e in evs],
            items=np.fromiter((index_of[e.item] for e in evs), np.int64, len(evs)),
            weights=np.fromiter((s.event_types[e.type] for e in evs), np.float32, len(evs)),
            ts=np.fromiter((e.ts for e in evs), np.int64, len(evs)),
            domains=[e.domain for e in evs],
        )

    def _ask(self, req: RetrainRequest, **context: Any) -> None:
        """Pass a retraining request of the learner on to the aggregator."""
        level = logging.WARNING if req.floor is not None else logging.INFO
        log.log(
            level,
            "asking the aggregator for a cycle now",
            extra={"reason": req.reason, "since_ts": req.floor, **context},
        )
        self.store.request_aggregation(req.reason, since_ts=req.floor)

    def _commit_offset_only(self, part: int, nxt: int) -> None:
        try:
            self.store.commit_batch(
                self.settings.events_topic,
                part,
                self._expected.get(part),
                nxt,
                states={},
                recs={},
                recs_ttl_s=0,
                partials=None,
                topic_id=self.topic_log.topic_id,
            )
            self._expected[part] = nxt
        except PendingBatch as exc:
            self._cut_at(part, exc.pending)
        except LogReplaced:
            self.topic_log.suspect()
        except StaleOffset:
            self._reseek(part)

    def _cut_at(self, part: int, pending: int) -> None:
        """End this partition's batches at ``pending`` until its offset gets there, and
        consume again from the stored offset (the log's start if none is stored: the
        half-written batch began there)."""
        self._cut[part] = pending
        self._expected[part] = self.store.offsets(self.settings.events_topic, [part])[part]
        self._seek_expected(part)

    def _follow_cuts(self, beyond: set[int]) -> None:
        """Fetch again what a cut left out (records at or past a pending batch's end), and
        forget the cuts that were reached or whose partition is no longer ours."""
        for part in list(self._cut):
            if part not in self._expected or (self._expected[part] or 0) >= self._cut[part]:
                del self._cut[part]
        for part in beyond:
            if part in self._expected:
                self._seek_expected(part)

    def _seek_expected(self, part: int) -> None:
        at = self._expected[part]
        try:
            self.consumer.seek(
                TopicPartition(
                    self.settings.events_topic, part, OFFSET_BEGINNING if at is None else at
                )
            )
        except Exception as exc:
            log.debug("seek failed", extra={"partition": part, "error": str(exc)})

    def _commit_kafka(
        self, next_offset: dict[int, int], meta_offsets: dict[tuple[str, int], int]
    ) -> None:
        offsets = [
            TopicPartition(self.settings.events_topic, p, int(self._expected[p] or 0))
            for p in next_offset
            if self._expected.get(p) is not None
        ]
        offsets += [TopicPartition(t, p, o) for (t, p), o in meta_offsets.items()]
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            except Exception as exc:
                log.debug("kafka commit failed", extra={"error": str(exc)})

    def _reseek(self, part: int) -> None:
        stored = self.store.offsets(self.settings.events_topic, [part])[part]
        self._expected[part] = stored
        if stored is not None:
            try:
                self.consumer.seek(TopicPartition(self.settings.events_topic, part, stored))
            except Exception as exc:
                log.debug("seek failed", extra={"partition": part, "error": str(exc)})

    # -- assignment -------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        topic = self.settings.events_topic
        mine = [p.partition for p in partitions if p.topic == topic]
        if mine:
            self._check_log(force=True)  # offsets of a replaced log are rebased first
        stored = self.store.offsets(topic, mine)
        for tp in partitions:
            if tp.topic == topic:
                off = stored[tp.partition]
                self._expected[tp.partition] = off
                tp.offset = off if off is not None else OFFSET_STORED
        if self._incremental:
            consumer.incremental_assign(partitions)  # assign() is refused mid-rebalance
        else:
            consumer.assign(partitions)
        self.stats.set_partitions(sorted(self._expected))
        log.info("partitions assigned", extra={"partitions": mine, "offsets": stored})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp.topic == self.settings.events_topic:
                self._expected.pop(tp.partition, None)
        if self._incremental:
            consumer.incremental_unassign(partitions)  # keep the partitions not revoked
        else:
            consumer.unassign()
        self.stats.set_partitions(sorted(self._expected))
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})

    # -- model, catalog, trending -----------------------------------------------------

    def _sync_catalog(self, needed: int = 0) -> None:
        if needed and needed <= len(self.learner.catalog):
            return
        rows = self.store.catalog_since(len(self.learner.catalog))
        self.learner.add_items(rows)

    def _maybe_reload(self, now: float) -> None:
        if now >= self._next_model_poll:
            self._poll_model()
            self._poll_withdrawn()
            self._next_model_poll = now + MODEL_POLL_S
        if now >= self._next_trend_refresh:
            self._refresh_trending()
            self._write_fallbacks()
            self._next_trend_refresh = now + TRENDING_REFRESH_S

    def _poll_model(self) -> None:
        version = self.store.served_model_version()  # pinned, else newest
        if version is None or version in (self.learner.version, self._unloadable):
            return
        try:
            model = MetaModel.from_bytes(self.store.load_model_blob(version))
        except ModelError as exc:
            log.error(
                "cannot load model; serving the current one",
                extra={"version": version, "serving": self.learner.version, "error": str(exc)},
            )
            self._unloadable = version
            return
        self._sync_catalog()
        try:
            request = self.learner.load(model.with_version(version))
        except ValueError as exc:
            log.error("cannot serve model", extra={"version": version, "error": str(exc)})
            return
        self.stats.set_model_version(version)
        self.metrics.model_version.set(version)
        self._model_created_ms = self.store.model_created_ms(version)
        self._refresh_queue = list(self._recent)
        log.info(
            "model loaded",
            extra={
                "version": version,
                "items": len(model.item_ids),
                "stale_lists": len(self._refresh_queue),
            },
        )
        if request is not None:
            self._ask(request)

    def _poll_withdrawn(self) -> None:
        """Stop recommending items their records withdrew (any consumer may have read the
        record), and rewrite the fallbacks at once: apps show them to newcomers."""
        if self.store.withdrawn_version() == self._withdrawn_version:
            return
        self._withdrawn_version, items = self.store.withdrawn_items()
        self.learner.withdraw(items)
        log.info("withdrawn items changed", extra={"withdrawn": len(items)})
        self._sync_catalog()
        self._write_fallbacks()

    def _refresh_trending(self) -> None:
        self.learner.trending = self.store.trending(
            len(self.learner.catalog), self.learner.channels
        )

    def _write_fallbacks(self) -> None:
        """Every domain's fallback list (``fallback:{domain}``): what a newcomer to it is
        served now, for apps to show users who have no list yet (metarec.client); and the
        best of them together (``fallback``), for a domain that has none."""
        if not len(self.learner.catalog):
            return
        lists = self.learner.newcomer_lists()
        now_ms = int(time.time() * 1000)
        self.store.write_fallbacks(
            self.learner.fallback_records(lists, now_ms),
            self.learner.global_fallback_record(lists, now_ms),
        )

    def _refresh_stale_lists(self) -> None:
        """Re-rank recently active users after a model change, a few hundred at a time."""
        if not self._refresh_queue or self.learner.model is None:
            return
        chunk, self._refresh_queue = (
            self._refresh_queue[:REFRESH_BATCH],
            self._refresh_queue[REFRESH_BATCH:],
        )
        by_part: dict[int, list[str]] = defaultdict(list)
        for u in chunk:
            part = self._recent.get(u)
            if part is not None and part in self._expected:
                by_part[part].append(u)
        now_ms = int(time.time() * 1000)
        for part, users in by_part.items():
            raw, profiles = self.store.load_users(users)
            present = [u for u, b in zip(users, raw, strict=True) if b is not None]
            states = dict(zip(present, decode_many([b for b in raw if b is not None]), strict=True))
            if not states:
                continue
            guards = {u: count_guard(st) for u, st in states.items()}
            lists = self.learner.refresh(
                list(states), states, dict(zip(users, profiles, strict=True))
            )
            try:
                expected = self._expected.get(part)
                if expected is None:
                    continue
                self.store.commit_batch(
                    self.settings.events_topic,
                    part,
                    expected,
                    expected,
                    states=dict(zip(states, encode_many(list(states.values())), strict=True)),
                    recs=self.learner.list_records({u: lists[u] for u in states}, states, now_ms),
                    recs_ttl_s=self.settings.recs_ttl_s,
                    state_ttl_s=self.settings.state_ttl_s,
                    partials=None,
                    guards=guards,
                    skip_conflicts=True,  # a user written meanwhile has a fresh list
                    topic_id=self.topic_log.topic_id,
                )
            except LogReplaced:
                self.topic_log.suspect()
            except StaleOffset:
                self._reseek(part)

    # -- stats ------------------------------------------------------------------------

    def _on_kafka_error(self, err: KafkaError) -> None:
        """librdkafka's client-level errors (a broker down, all brokers down...): logged
        by its logger already; they may mean the log was replaced, so check it."""
        self.topic_log.suspect()
        self.metrics.kafka_errors.inc()

    def _check_log(self, force: bool = False) -> set[int]:
        """Check the events topic's log (:mod:`consumer.topic_log`) when due; returns the
        owned partitions whose offsets were rebased, re-seeked to their new offsets."""
        if not (force or self.topic_log.due(time.monotonic())):
            return set()
        found = self.topic_log.check()
        if found is None:
            return set()
        self._lag = found.lag
        self.metrics.offset_resets.inc(found.resets)
        self._applied = found.applied
        self._group_due = True
        for p, n in found.lag.items():
            self.metrics.lag.labels(partition=str(p)).set(n)
        self.stats.set_offset_resets(self.topic_log.resets)
        moved = {p for p in found.rebased if p in self._expected}
        for p in moved:
            self._expected[p] = found.rebased[p]
            try:
                self.consumer.seek(TopicPartition(self.settings.events_topic, p, found.rebased[p]))
            except Exception as exc:  # not fetching yet: the assignment's offset applies
                log.debug("seek failed", extra={"partition": p, "error": str(exc)})
        return moved

    def _watch_group(self, now: float) -> None:
        """Move the group to a new Kafka group id when it is stuck
        (:mod:`consumer.stuck_group`), or follow another member that did."""
        generation = self.store.group_generation(self.settings.group_id)
        if generation != self._generation:
            log.warning(
                "the group moved to a new Kafka group id; following it",
                extra={"kafka_group": f"{self.settings.group_id}.{generation}"},
            )
            self._rejoin(generation)
            return
        waiting = sum(self._lag.values())
        if not self._stuck.observe(
            now, owns=bool(self._expected), waiting=waiting, applied=self._applied
        ):
            return
        generation = self.store.advance_group_generation(self.settings.group_id, generation)
        log.warning(
            "this member owned no partition while events waited and no member applied "
            "any: the group is stuck; moving the group to a new Kafka group id",
            extra={
                "lag": waiting,
                "seconds": round(self._stuck.stuck_for(now), 1),
                "kafka_group": f"{self.settings.group_id}.{generation}",
            },
        )
        self._rejoin(generation)

    def _set_model_age(self) -> None:
        if self._model_created_ms is not None:
            self.metrics.model_age_seconds.set(
                max(0.0, time.time() - self._model_created_ms / 1000)
            )

    def _alive(self) -> None:
        """Waiting for Redis is being alive: keep ``/healthz`` green meanwhile."""
        if self._health is not None:
            self._health.tick()

    def missing(self) -> list[str]:
        """What keeps this member from doing its job now (empty: ready; ``/readyz``)."""
        out = []
        if self.outage.down:
            out.append("redis unavailable")
        if self._stuck.stuck_for(time.monotonic()) >= self._stuck.after_s:
            out.append("no partition owned while events wait and none are applied")
        if self.learner.model is None and self.learner.trending.clock == 0:
            out.append("no model and no popularity to serve yet")
        return out

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if self.settings.stats_interval_s <= 0 or not self.stats.due(now):
            return
        self.stats.set_lag(sum(self._lag.values()), self._lag)
        report = self.stats.report(now)
        report["live"] = self.learner.drift.live.get()
        for domain, q in report["live"].items():
            self.metrics.live_hr.labels(domain=domain).set(q["hr"])
            self.metrics.live_ndcg.labels(domain=domain).set(q["ndcg"])
        overall = report["live"].get(ALL)
        line = format_line(report)
        if overall is not None:
            line += (
                f" | live hr@{self.settings.top_k} {overall['hr']:.3f} ndcg {overall['ndcg']:.3f}"
            )
        log.info(line, extra={"stats": report})
        self.store.heartbeat(
            self.settings.group_id,
            self.member,
            report,
            ttl_s=max(3 * self.settings.stats_interval_s, 30),
        )
