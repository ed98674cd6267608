"""The consumer service: Kafka in, per-user lists in Redis out, exactly once in effect.

One batch, start to finish (the order is the whole point, so it is written here once):

1. consume up to ``batch_size`` records (one ``consume`` call);
2. decode and validate; a bad record goes to the dead-letter topic unchanged, with headers
   naming the error; metadata records (items, users) update the registry and profiles;
3. flush the dead-letter producer — before anything is committed, so no bad record is
   ever lost behind a committed offset;
4. register the batch's items (one round trip) and load the touched users' states and
   profiles (one round trip);
5. per partition: adapt the users and rank their lists (:func:`consumer.processor.apply_events`;
   before each event is applied it records whether the item was in the list the user was
   being shown — live HR@K/NDCG@K — and reacts to users whose hits show a drift), then
   write states, lists, popularity, partial sums *and the partition's next offset* as one
   atomic Redis unit that first checks the stored offset (a zombie's write changes
   nothing); the live metrics are fed only once the unit is written;
6. only then commit the offsets to Kafka too, for lag monitoring (Redis stays the source
   of truth: on assignment the consumer seeks to the offsets stored in Redis).

A crash anywhere before step 5 leaves Redis untouched, and the records are consumed again;
a crash after it re-delivers records whose offsets Redis already holds, and they are
skipped. SIGTERM lets the batch in flight finish its step 5 and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
from confluent_kafka import OFFSET_STORED, Consumer, KafkaError, Message, Producer, TopicPartition

from consumer.dlq import DeadLetterQueue
from consumer.processor import DriftWatch, apply_events, rank_users, refresh_users
from consumer.serving import Serving
from consumer.stats import ConsumerStats, format_line
from metarec.config import Settings, incremental_rebalancing
from metarec.drift import UserDrift
from metarec.errors import InvalidEvent, ModelError, StaleOffset
from metarec.events import Event, ItemRecord, UserRecord, decode_event, decode_item, decode_user
from metarec.live_quality import ALL, LiveQuality
from metarec.model import MetaModel
from metarec.popularity import RecencyPopularity
from metarec.store import RedisStore
from metarec.training import DAY_MS
from metarec.user_state import UserState

__all__ = ["POPULARITY_HALF_LIFE_MS", "ConsumerApp", "incremental_rebalancing"]

log = logging.getLogger("metarec.consumer")

#: The trending prior's memory, the same 7 days the evaluation measured.
POPULARITY_HALF_LIFE_MS = 7 * DAY_MS
#: How often the served model version and the shared popularity are re-read from Redis.
MODEL_POLL_S = 1.0
POPULARITY_REFRESH_S = 5.0
#: Recently active users whose lists are refreshed in the background after a model change.
RECENT_USERS = 20_000
#: Events per rolling window of the live list-quality metrics.
LIVE_WINDOW = 5000
#: Size of a new user's offset before any model exists (the trainer's default ``dim``);
#: once a model is served its own dimension wins and older offsets are re-derived.
STATE_DIM = 32
REFRESH_BATCH = 500
#: Group settings that suit the local Tansu broker (docs/LOCAL_SERVICES.md) and are valid on
#: Apache Kafka; anything passed through METAREC_KAFKA_* overrides them.
GROUP_DEFAULTS = {
    # Bounds a fetch that finds no data; Tansu holds it for the full wait, which showed up
    # as produce-to-list latency (p99 326 ms at librdkafka's 500 ms default, 122 ms at 20).
    "fetch.wait.max.ms": "20",
    # Bounds librdkafka's prefetch buffer (default 64 MiB) so memory does not follow the
    # size of a backlog.
    "queued.max.messages.kbytes": "16384",
    "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "500",
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "range",
    "statistics.interval.ms": "5000",
}


class ConsumerApp:
    """A member of the consumer group. ``run()`` until :meth:`stop` or SIGTERM."""

    def __init__(self, settings: Settings, *, member: str | None = None) -> None:
        self.settings = settings
        self.member = member or f"{socket.gethostname()}-{os.getpid()}"
        self.store = RedisStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
        self.serving = Serving(POPULARITY_HALF_LIFE_MS)
        self.stats = ConsumerStats(settings.stats_interval_s, time.monotonic(), seed=settings.seed)
        # Live quality of the lists apps were shown, and what it says about drift.
        self.live = LiveQuality(k=settings.top_k, window=LIVE_WINDOW)
        self.user_drift = UserDrift()
        self._drift_since: dict[str, int] = {}
        self.rng = np.random.default_rng(settings.seed)
        self._stopping = False
        self._expected: dict[int, int | None] = {}
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._refresh_queue: list[str] = []
        self._lag: dict[int, int] = {}
        self._next_model_poll = 0.0
        self._next_pop_refresh = 0.0
        self._tref: int | None = None
        config = {**GROUP_DEFAULTS, **settings.kafka_config()}
        config.update({"group.id": settings.group_id, "enable.auto.commit": "false",
                       "client.id": f"metarec-consumer-{self.member}"})
        self._incremental = incremental_rebalancing(config)
        self.consumer = Consumer(config, stats_cb=self._on_kafka_stats,
                                 logger=logging.getLogger("metarec.kafka.consumer"))
        producer = Producer(settings.kafka_config(**{"enable.idempotence": "true",
                                                     "linger.ms": "5"}))
        self.dlq = DeadLetterQueue(producer, settings.dlq_topic, settings.group_id)

    # -- lifecycle --------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Finish the batch in flight, then leave the group (safe from a signal handler)."""
        self._stopping = True

    def run(self) -> int:
        s = self.settings
        self._sync_catalog()
        self._poll_model()
        self._refresh_popularity()
        self.consumer.subscribe([s.events_topic, s.items_topic, s.users_topic],
                                on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        log.info("consumer started", extra={"member": self.member, "group": s.group_id,
                                            "settings": s.redacted()})
        try:
            while not self._stopping:
                records = self.consumer.consume(s.batch_size, s.batch_timeout_ms / 1000)
                self.process(records)
                if len(records) < s.batch_size // 2:
                    self._refresh_stale_lists()
                self._maybe_report()
        finally:
            self.dlq.flush(10.0)
            self.consumer.close()
            log.info("consumer stopped", extra={"member": self.member,
                                                "stats": self.stats.report(time.monotonic())})
        return 0

    # -- one batch --------------------------------------------------------------------

    def process(self, records: Sequence[Message]) -> None:
        """Steps 2-6 of the module docstring for one consumed batch."""
        s = self.settings
        self._maybe_reload(time.monotonic())
        if not records:
            return
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        events: dict[int, list[tuple[Message, Event]]] = defaultdict(list)
        next_offset: dict[int, int] = {}
        items: list[ItemRecord] = []
        users: list[UserRecord] = []
        meta_offsets: dict[tuple[str, int], int] = {}
        n_dlq = 0
        for msg in records:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka error", extra={"error": str(err)})
                continue
            topic, part, offset = msg.topic(), int(msg.partition() or 0), int(msg.offset() or 0)
            try:
                if topic == s.events_topic:
                    expected = self._expected.get(part)
                    if part not in self._expected or (expected is not None
                                                      and offset < expected):
                        continue  # not ours any more, or already applied (a re-delivery)
                    next_offset[part] = max(next_offset.get(part, 0), offset + 1)
                    events[part].append((msg, decode_event(
                        msg.value() or b"", event_types=s.event_types,
                        default_ts=msg.timestamp()[1], now_ms=now_ms)))
                elif topic == s.items_topic:
                    meta_offsets[(topic, part)] = offset + 1
                    items.append(decode_item(msg.value() or b"", default_ts=now_ms))
                elif topic == s.users_topic:
                    meta_offsets[(topic, part)] = offset + 1
                    users.append(decode_user(msg.value() or b"", default_ts=now_ms))
            except Exception as exc:
                # Decoding is pure, so whatever it raises is this record's fault; anything
                # but InvalidEvent (RecursionError on deeply nested JSON) is a decoder gap,
                # and crashing on it would stop the partition at this record for good.
                if not isinstance(exc, InvalidEvent):
                    log.warning("record failed to decode unexpectedly; dead-lettered",
                                extra={"error": repr(exc)[:200], "topic": topic,
                                       "partition": part, "offset": offset})
                self.dlq.send(msg, exc)
                n_dlq += 1
        if n_dlq:
            self.dlq.flush(30.0)  # raises if a dead letter could not be written
        if items:
            self.store.describe_items(items)
        if users:
            self.store.set_profiles(users)
        n_events = 0
        freshness: list[float] = []
        batch_events = [e for part in events.values() for _, e in part]
        if batch_events:
            indices = self.store.item_indices([e.item for e in batch_events],
                                              [e.domain for e in batch_events])
            self._sync_catalog(int(indices.max()) + 1)
            self.serving.popularity.learn_many(indices, np.zeros(len(indices), np.int64),
                                               [e.ts for e in batch_events])
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
        self._commit_kafka(next_offset, meta_offsets)
        self.stats.record_batch(len(records), n_events, n_dlq, time.perf_counter() - started,
                                np.asarray(freshness))

    def _apply_partition(self, part: int, pairs: list[tuple[Message, Event]], nxt: int,
                         index_of: dict[str, int], now_ms: int) -> bool:
        s = self.settings
        evs = [e for _, e in pairs]
        users = list(dict.fromkeys(e.user for e in evs))
        raw_states, profiles = self.store.load_users(users)
        states = {u: None if b is None else UserState.from_bytes(b)
                  for u, b in zip(users, raw_states, strict=True)}
        items = np.fromiter((index_of[e.item] for e in evs), np.int64, len(evs))
        outcome = apply_events(
            self.serving, evs, items, states, dict(zip(users, profiles, strict=True)),
            weights=s.event_types, rng=self.rng, top_k_size=s.top_k, now_ms=now_ms,
            dim=STATE_DIM, history_length=s.history_length,
            drift=DriftWatch(self.user_drift, self._drift_since, self.live.baseline()))
        pop = self._popularity_increments(items, np.array([e.ts for e in evs], np.int64))
        try:
            tref = self.store.commit_batch(
                s.events_topic, part, self._expected.get(part), nxt,
                states={u: st.to_bytes() for u, st in outcome.states.items()},
                recs=outcome.recs, recs_ttl_s=s.recs_ttl_s, popularity=pop,
                partials=outcome.partials if self.serving.model is not None else None,
                tref=self._tref, half_life_ms=POPULARITY_HALF_LIFE_MS)
        except StaleOffset as exc:
            log.warning("batch fenced off: partition moved to another consumer",
                        extra={"partition": part, "error": str(exc)})
            self._reseek(part)
            return False
        if tref is not None and tref != self._tref:
            self._tref = tref
            self._next_pop_refresh = 0.0
        self._expected[part] = nxt
        self._observe_quality(evs, outcome.hit_rank, len(outcome.drifted))
        for u in users:
            self._recent[u] = part
            self._recent.move_to_end(u)
        while len(self._recent) > RECENT_USERS:
            self._recent.popitem(last=False)
        return True

    def _observe_quality(self, events: list[Event], hit_rank: np.ndarray,
                         drifted_users: int) -> None:
        """Feed the live metrics; a drop of a domain's hit rate asks for a cycle now."""
        if drifted_users:
            log.info("users drifted", extra={"users": drifted_users})
        for e, rank in zip(events, hit_rank.tolist(), strict=True):
            change = self.live.update(e.domain, int(rank), e.ts)
            if change is None or self.serving.model is None:
                continue
            self._drift_since[e.domain] = change
            # A domain noticing a change that another one is already recovering from does
            # not move the training floor again.
            others = [g for g in self.live.drifting_domains() if g != e.domain]
            reason = f"drift in domain {e.domain!r}: live HR@{self.settings.top_k} dropped"
            log.warning("drift detected; asking the aggregator for a cycle now",
                        extra={"domain": e.domain, "since_ts": change, "also_drifting": others,
                               "live": self.live.get().get(e.domain)})
            self.store.request_aggregation(reason, since_ts=None if others else change)

    def _popularity_increments(self, items: np.ndarray, ts: np.ndarray) -> dict[int, float]:
        if self._tref is None:
            # Consumers starting together pick the same reference: the start of the
            # current half-life period.
            self._tref = int(ts.min()) // int(POPULARITY_HALF_LIFE_MS) * int(
                POPULARITY_HALF_LIFE_MS)
        inc = np.exp2((ts - self._tref) / POPULARITY_HALF_LIFE_MS)
        out: dict[int, float] = defaultdict(float)
        for item, value in zip(items.tolist(), inc.tolist(), strict=True):
            out[item] += value
        return out

    def _commit_offset_only(self, part: int, nxt: int) -> None:
        try:
            self.store.commit_batch(self.settings.events_topic, part, self._expected.get(part),
                                    nxt, states={}, recs={}, recs_ttl_s=0, popularity={},
                                    partials=None)
            self._expected[part] = nxt
        except StaleOffset:
            self._reseek(part)

    def _commit_kafka(self, next_offset: dict[int, int],
                      meta_offsets: dict[tuple[str, int], int]) -> None:
        offsets = [TopicPartition(self.settings.events_topic, p, int(self._expected[p] or 0))
                   for p in next_offset if self._expected.get(p) is not None]
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
                self._lag.pop(tp.partition, None)
        if self._incremental:
            consumer.incremental_unassign(partitions)  # keep the partitions not revoked
        else:
            consumer.unassign()
        self.stats.set_partitions(sorted(self._expected))
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})

    # -- model, catalog, popularity ---------------------------------------------------

    def _sync_catalog(self, needed: int = 0) -> None:
        if needed and needed <= len(self.serving.catalog):
            return
        rows = self.store.catalog_since(len(self.serving.catalog))
        self.serving.add_items(rows)

    def _maybe_reload(self, now: float) -> None:
        if now >= self._next_model_poll:
            self._poll_model()
            self._next_model_poll = now + MODEL_POLL_S
        if now >= self._next_pop_refresh:
            self._refresh_popularity()
            self._next_pop_refresh = now + POPULARITY_REFRESH_S

    def _poll_model(self) -> None:
        version = self.store.current_model_version()
        if version is None or version == self.serving.version:
            return
        try:
            model = MetaModel.from_bytes(self.store.load_model_blob(version))
        except ModelError as exc:
            log.error("cannot load model", extra={"version": version, "error": str(exc)})
            return
        self._sync_catalog()
        self.serving.set_model(model.with_version(version))
        self.stats.set_model_version(version)
        self._refresh_queue = list(self._recent)
        log.info("model loaded", extra={"version": version, "items": len(model.item_ids),
                                        "stale_lists": len(self._refresh_queue)})
        # Each version trained on more of the new regime is better than the last: until
        # the lists recover, ask for the next one straight away.
        drifting = self.live.drifting_domains()
        if drifting:
            self.store.request_aggregation(f"recovering from drift in {drifting}")
            log.info("still recovering from drift; asked for another cycle",
                     extra={"domains": drifting})

    def _refresh_popularity(self) -> None:
        tref, counts = self.store.popularity(len(self.serving.catalog))
        if tref is None:
            return
        self._tref = tref
        self.serving.popularity = RecencyPopularity.from_arrays({
            "counts": counts[None, :], "t_ref": np.array(tref), "has_ref": np.array(True),
            "half_life_ms": np.array(POPULARITY_HALF_LIFE_MS)})

    def _refresh_stale_lists(self) -> None:
        """Re-rank recently active users after a model change, a few hundred at a time."""
        if not self._refresh_queue or self.serving.model is None:
            return
        chunk, self._refresh_queue = (self._refresh_queue[:REFRESH_BATCH],
                                      self._refresh_queue[REFRESH_BATCH:])
        by_part: dict[int, list[str]] = defaultdict(list)
        for u in chunk:
            part = self._recent.get(u)
            if part is not None and part in self._expected:
                by_part[part].append(u)
        now_ms = int(time.time() * 1000)
        for part, users in by_part.items():
            raw, profiles = self.store.load_users(users)
            states = {u: UserState.from_bytes(b) for u, b in zip(users, raw, strict=True)
                      if b is not None}
            if not states:
                continue
            batch = refresh_users(self.serving, list(states), states,
                                  dict(zip(users, profiles, strict=True)), rng=self.rng)
            recs = rank_users(self.serving, list(states), states, batch,
                              top_k_size=self.settings.top_k, now_ms=now_ms)
            try:
                expected = self._expected.get(part)
                if expected is None:
                    continue
                self.store.commit_batch(
                    self.settings.events_topic, part, expected, expected,
                    states={u: st.to_bytes() for u, st in states.items()}, recs=recs,
                    recs_ttl_s=self.settings.recs_ttl_s, popularity={}, partials=None)
            except StaleOffset:
                self._reseek(part)

    # -- stats ------------------------------------------------------------------------

    def _on_kafka_stats(self, raw: str) -> None:
        try:
            stats: dict[str, Any] = json.loads(raw)
            parts = stats.get("topics", {}).get(self.settings.events_topic, {}).get(
                "partitions", {})
            for key, p in parts.items():
                part = int(key)
                if part in self._expected and p.get("consumer_lag", -1) >= 0:
                    self._lag[part] = int(p["consumer_lag"])
        except (ValueError, TypeError, AttributeError) as exc:
            log.debug("bad kafka statistics", extra={"error": str(exc)})

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if self.settings.stats_interval_s <= 0 or not self.stats.due(now):
            return
        self.stats.set_lag(sum(self._lag.values()))
        report = self.stats.report(now)
        report["live"] = self.live.get()
        overall = report["live"].get(ALL)
        line = format_line(report)
        if overall is not None:
            line += (f" | live hr@{self.settings.top_k} {overall['hr']:.3f} "
                     f"ndcg {overall['ndcg']:.3f}")
        log.info(line, extra={"stats": report})
        self.store.heartbeat(self.settings.group_id, self.member, report,
                             ttl_s=max(3 * self.settings.stats_interval_s, 30))
