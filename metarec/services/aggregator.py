"""The aggregator: folds the consumers' adapted users into the meta-model and retrains it.

It runs as its own process with its own consumer group on the event topic, keeping a
bounded window of recent events (and the item and user metadata) in memory. When and how it
retrains is :mod:`metarec.training.retraining`'s, the same objects ``metarec eval`` drives: a cycle
is due as soon as the window first holds enough events, then every ``retrain_events`` new
events, on a consumer's drift request, or at once on an operator's (``--now``). A cycle:

1. meta-train on the window, warm-started from the current model (:mod:`metarec.training.trainer`;
   on a GPU when TensorFlow sees one). Once a consumer has reported a drop of live quality
   (a drift), only the events since the change are used (``aggregate:floor``), and the
   first version after it is trained from scratch;
2. take the consumers' partial sums (atomically read and reset in Redis) and fold them into
   ``θ0`` (Reptile, the seed's average) — only once training has worked, so a failed run
   loses none;
3. publish the new version to Redis (chunked; ``model:current`` flips last) and a notice on
   the model topic. Consumers hot-reload it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # the stubs declare it here, not in .admin

from metarec.config import Settings, incremental_rebalancing
from metarec.core.events import Event, ItemRecord, UserRecord
from metarec.core.model import MetaModel
from metarec.core.records import RecordDecoder
from metarec.core.window import EventWindow
from metarec.errors import ModelError
from metarec.logs import Throttle, kafka_logger
from metarec.services.metrics import HealthServer, Metrics
from metarec.services.outage import Stopped, redis_outage, retrying_store
from metarec.training.retraining import Retrainer, RetrainSchedule
from metarec.training.tensorflow_import import require_tensorflow
from metarec.training.trainer import MetaTrainer

__all__ = ["OPERATOR_REQUEST", "Aggregator", "reason_kind"]

log = logging.getLogger("metarec.aggregator")

#: The reason ``metarec aggregate --now`` stores: served at once, without new events.
OPERATOR_REQUEST = "requested by an operator"
#: How often "aggregation requested; waiting" is logged while a request waits.
WAITING_LOG_EVERY_S = 30.0


def reason_kind(reason: str) -> str:
    """The kind of a cycle's reason, for a metric label (reasons carry numbers and names).

    >>> [reason_kind(r) for r in ("first model", "schedule", "600 s since the last cycle",
    ...                           OPERATOR_REQUEST, "drift in domain 'books': live HR@20 dropped")]
    ['first', 'schedule', 'interval', 'operator', 'drift']
    """
    if reason == "first model":
        return "first"
    if reason == "schedule":
        return "schedule"
    if reason.endswith("since the last cycle"):
        return "interval"
    if reason == OPERATOR_REQUEST:
        return "operator"
    return "drift" if "drift" in reason else "other"


class Aggregator:
    """The aggregator process. ``run()`` until :meth:`stop`; :meth:`cycle` runs one cycle."""

    def __init__(self, settings: Settings, trainer: MetaTrainer | None = None) -> None:
        require_tensorflow()  # at start, in one line, not at the first cycle
        self.settings = settings
        # Training ticks the liveness probe at every step: a long cycle is not a hang.
        self.retrainer = Retrainer(
            dataclasses.replace(trainer or Retrainer.trainer_for(settings), on_step=self._alive)
        )
        self.schedule = RetrainSchedule.from_settings(settings)
        self._stopping = False
        self._health: HealthServer | None = None
        self.metrics = Metrics("aggregator")
        self.outage = redis_outage(
            settings,
            log,
            self.metrics,
            should_stop=lambda: self._stopping,
            on_wait=self._alive,
        )
        self.store = retrying_store(settings, self.outage)
        self.window = EventWindow(settings.window_events)
        self.decoder = RecordDecoder.from_settings(settings)
        self._published_ms: int | None = None
        self._events_since = 0
        self._next_cycle = self._interval_deadline()
        self._next_stats = 0.0
        self._cycles = 0
        self._last_cycle: dict[str, object] | None = None
        self._waiting_log = Throttle(WAITING_LOG_EVERY_S)
        config = settings.group_config(settings.aggregator_group_id, enable_auto_commit="true")
        self._incremental = incremental_rebalancing(config)
        self.consumer = Consumer(config, logger=kafka_logger("aggregator"))
        self.producer = Producer(settings.kafka_config(), logger=kafka_logger("producer"))

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self, *, max_cycles: int | None = None) -> int:
        s = self.settings
        self.store.check_access()
        self._ensure_model_topic()
        health = self._health = (
            HealthServer(self.metrics, s.metrics_port, self.missing) if s.metrics_port else None
        )
        self.consumer.subscribe(
            [s.events_topic, s.items_topic, s.users_topic], on_assign=self._rewind
        )
        cycles = 0
        log.info(
            "aggregator started",
            extra={"group": s.aggregator_group_id, "window_events": s.window_events},
        )
        try:
            while not self._stopping and (max_cycles is None or cycles < max_cycles):
                self.ingest(self.consumer.consume(s.batch_size, 0.5))
                reason = self.due()
                if reason is not None and self.cycle(reason=reason) is not None:
                    cycles += 1
                self._set_model_age()
                self.report(time.monotonic())
                if health is not None:
                    health.tick()
        except Stopped:
            log.info("stopped while Redis was unavailable")
        finally:
            if health is not None:
                health.close()
            self.consumer.close()
            self.producer.flush(10)
        return 0

    def _set_model_age(self) -> None:
        if self._published_ms is not None:
            self.metrics.model_age_seconds.set(max(0.0, time.time() - self._published_ms / 1000))

    def report(self, now: float) -> None:
        """The window's gauges, and every ``METAREC_STATS_INTERVAL_S`` one stats line: what
        the aggregator holds, what it published last, and how its last cycle went."""
        self.metrics.window_events.set(len(self.window))
        self.metrics.events_since_cycle.set(self._events_since)
        if now < self._next_stats:
            return
        self._next_stats = now + self.settings.stats_interval_s
        age = None if self._published_ms is None else time.time() - self._published_ms / 1000
        log.info(
            "aggregator stats",
            extra={
                "window_events": len(self.window),
                "events_since_cycle": self._events_since,
                "cycles": self._cycles,
                "last_cycle": self._last_cycle,
                "model_age_s": None if age is None else round(age, 1),
            },
        )

    def _alive(self) -> None:
        """Waiting for Redis, or training, is being alive: keep ``/healthz`` green."""
        if self._health is not None:
            self._health.tick()

    def missing(self) -> list[str]:
        """What keeps the aggregator from doing its job now (empty: ready; ``/readyz``)."""
        return ["redis unavailable"] if self.outage.down else []

    def _ensure_model_topic(self) -> None:
        """Create the model topic with one partition (notices are ordered by version); a
        broker that auto-creates topics would otherwise give it its default count."""
        config: dict[str, str | int | float | bool] = {**self.settings.kafka_config()}
        admin = AdminClient(config, logger=kafka_logger("admin"))
        try:
            if self.settings.model_topic in admin.list_topics(timeout=10).topics:
                return
            futures = admin.create_topics([NewTopic(self.settings.model_topic, 1)])
            futures[self.settings.model_topic].result(timeout=10)
        except Exception as exc:  # exists by now, or the broker is down: the producer waits
            log.debug("model topic not created", extra={"error": str(exc)})

    def _rewind(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Rebuild the window from the retained log: the window lives only in memory."""
        for tp in partitions:
            tp.offset = OFFSET_BEGINNING
        if self._incremental:
            consumer.incremental_assign(partitions)  # assign() is refused mid-rebalance
            return
        # An eager assignment is the whole new assignment, all of it rewound: start the
        # window afresh, or every rebalance would add the retained log to it once more.
        self.window = EventWindow(self.settings.window_events)
        consumer.assign(partitions)

    def ingest(self, records: list) -> None:  # type: ignore[type-arg]
        """Add consumed records to the window (invalid ones are the consumers' DLQ's job)."""
        now_ms = int(time.time() * 1000)
        for msg in records:
            if msg.error() is not None:
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka error", extra={"error": str(msg.error())})
                continue
            try:
                record = self.decoder.decode(
                    msg.topic(),
                    msg.key(),
                    msg.value(),
                    timestamp_ms=msg.timestamp()[1],
                    now_ms=now_ms,
                )
                if isinstance(record, Event):
                    self.window.append(
                        record.user,
                        record.item,
                        record.ts,
                        self.settings.event_types[record.type],
                        record.domain,
                    )
                    self._events_since += 1
                elif isinstance(record, ItemRecord):
                    self.window.describe_item(record.item, record.domain, record.features)
                elif isinstance(record, UserRecord):
                    self.window.describe_user(record.user, record.features)
            except Exception as exc:  # the consumers dead-letter it, with the reason
                # Decoding is pure: whatever it raises is this record's fault, and raising
                # here would stop the aggregator at this record on every restart.
                log.debug("record skipped", extra={"error": repr(exc)[:200]})

    def due(self) -> str | None:
        """Why a cycle is due now (:class:`~metarec.training.retraining.RetrainSchedule`),
        or None."""
        request = self.store.aggregation_request()
        floor = self.store.training_floor() if request is not None else None
        has_model = self.store.current_model_version() is not None
        reason = self.schedule.due(
            has_model=has_model,
            window_events=len(self.window),
            new_events=self._events_since,
            request=request,
            events_since_floor=None if floor is None else self.window.count_since(floor),
            immediate=request == OPERATOR_REQUEST,
        )
        if (
            reason is None
            and has_model
            and self._events_since > 0
            and time.monotonic() >= self._next_cycle
        ):
            reason = f"{self.settings.aggregate_interval_s} s since the last cycle"
        if reason is None and request is not None and self._waiting_log.allow(time.monotonic()):
            log.info(
                "aggregation requested; waiting",
                extra={
                    "request": request,
                    "why": self.schedule.waiting_for(
                        window_events=len(self.window),
                        new_events=self._events_since,
                        events_since_floor=None
                        if floor is None
                        else self.window.count_since(floor),
                    ),
                },
            )
        return reason

    def _interval_deadline(self) -> float:
        interval = self.settings.aggregate_interval_s
        return time.monotonic() + interval if interval > 0 else float("inf")

    def request(self) -> None:
        """Ask a running aggregator for a cycle now (``metarec aggregate --now``)."""
        self.store.request_aggregation(OPERATOR_REQUEST)

    def current_model(self) -> MetaModel | None:
        version = self.store.current_model_version()
        if version is None:
            return None
        try:
            return MetaModel.from_bytes(self.store.load_model_blob(version)).with_version(version)
        except ModelError as exc:
            log.error(
                "current model unreadable; training from scratch",
                extra={"version": version, "error": str(exc)},
            )
            return None

    def cycle(self, reason: str = "requested") -> int | None:
        """Meta-train on the window, fold the partial sums in, publish. Returns the new
        version (None if there was too little to train on). Counted and timed by why it
        ran and how it ended (``metarec_aggregator_cycles_total``)."""
        started = time.perf_counter()
        outcome = "failed"
        try:
            version = self._cycle(reason)
            outcome = "skipped" if version is None else "published"
            return version
        finally:
            seconds = time.perf_counter() - started
            self._cycles += 1
            self._last_cycle = {
                "reason": reason,
                "outcome": outcome,
                "seconds": round(seconds, 2),
            }
            self.metrics.cycles.labels(reason=reason_kind(reason), outcome=outcome).inc()
            self.metrics.cycle_seconds.observe(seconds)
            if outcome == "published":
                self.metrics.last_success.set(time.time())
            elif outcome == "skipped":
                log.info(
                    "cycle skipped: too little to train on",
                    extra={"reason": reason, "window_events": len(self.window)},
                )

    def _cycle(self, reason: str) -> int | None:
        self.store.clear_aggregation_request()
        self._next_cycle = self._interval_deadline()
        started = time.perf_counter()
        init = self.current_model()
        # A detected change moves the floor: the regime before it would only teach the
        # model what no longer holds.
        floor = self.store.training_floor()
        model = self.retrainer.train(
            self.window, init, floor=floor, version=(init.version + 1) if init is not None else 1
        )
        if model is None:
            return None
        self.metrics.training_seconds.set(float(model.info.get("seconds") or 0.0))
        loss = model.info.get("loss")
        self.metrics.training_loss.set(float(loss) if isinstance(loss, int | float) else math.nan)
        if model.info.get("drift") == "refuted" and floor is not None:
            self.store.clear_training_floor(floor)
        model, folded = self.retrainer.fold(
            model, init, self.store.take_partials(self.settings.events_topic)
        )
        data = model.info
        version = self.store.publish_model(
            model.to_bytes(),
            history={
                "parent": None if init is None else init.version,
                "reason": reason,
                "kind": reason_kind(reason),
                "window": {
                    "events": data.get("events"),
                    "first_ts": data.get("first_ts"),
                    "last_ts": data.get("last_ts"),
                    "floor_ts": floor,
                },
                "training_seconds": data.get("seconds"),
                "validation_loss": data.get("loss") if data.get("validated") else None,
                "steps": data.get("steps"),
                "folded_weight": folded,
            },
        )
        self.metrics.model_version.set(version)
        self._published_ms = int(time.time() * 1000)
        notice = {
            "version": version,
            "created_ms": int(time.time() * 1000),
            "events": model.info.get("events"),
            "users": model.info.get("users"),
            "items": model.info.get("items"),
            "reason": reason,
            "floor_ts": floor,
            "fresh_start": model.info.get("fresh_start"),
            "device": model.info.get("device"),
            "folded_weight": folded,
        }
        self.producer.produce(
            self.settings.model_topic, key=str(version).encode(), value=json.dumps(notice).encode()
        )
        self.producer.poll(0)
        self._events_since = 0
        log.info(
            "model published", extra={**notice, "seconds": round(time.perf_counter() - started, 2)}
        )
        return version
