"""The aggregator: folds the consumers' adapted users into the meta-model and retrains it.

It runs as its own process with its own consumer group on the event topic, keeping a
bounded window of recent events (and the item and user metadata) in memory. Each cycle,
on a schedule, on demand, or as soon as the window first holds enough events:

1. take the consumers' partial sums (atomically read and reset in Redis) and apply the
   Reptile/average update to ``θ0`` (:func:`metarec.aggregation.reptile_update`);
2. meta-train on the window, warm-started from the current model (:mod:`metarec.training`;
   on a GPU when TensorFlow sees one). Once a consumer has reported a drop of live quality
   (a drift), only the events since the change are used (``aggregate:floor``), and the
   first version after it is trained from scratch;
3. publish the new version to Redis (chunked; ``model:current`` flips last) and a notice on
   the model topic. Consumers hot-reload it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from metarec.aggregation import PartialSums, reptile_update
from metarec.config import Settings, incremental_rebalancing
from metarec.errors import InvalidEvent, ModelError
from metarec.events import decode_event, decode_item, decode_user
from metarec.model import MetaModel
from metarec.store import RedisStore
from metarec.training import MetaTrainer
from metarec.window import EventWindow

__all__ = ["Aggregator"]

log = logging.getLogger("metarec.aggregator")

#: Reptile step: 1.0 is the seed's plain average of the adapted users.
REPTILE_EPSILON = 1.0
#: A live window starts with a few thousand events, one pass over which is a handful of
#: steps: train at least this many, so the first versions already know something.
MIN_STEPS = 50
class Aggregator:
    """The aggregator process. ``run()`` until :meth:`stop`; :meth:`cycle` runs one cycle."""

    def __init__(self, settings: Settings, trainer: MetaTrainer | None = None) -> None:
        self.settings = settings
        self.trainer = trainer or MetaTrainer(history_length=settings.history_length,
                                              seed=settings.seed, min_steps=MIN_STEPS)
        self.store = RedisStore(redis.Redis.from_url(settings.redis_url), settings.key_prefix)
        self.window = EventWindow(settings.window_events)
        self._stopping = False
        self._events_since = 0
        self._next_cycle = time.monotonic() + settings.aggregate_interval_s
        config = {
            "auto.offset.reset": "earliest", "session.timeout.ms": "6000",
            "heartbeat.interval.ms": "500", **settings.kafka_config(),
            "group.id": settings.aggregator_group_id, "enable.auto.commit": "true",
        }
        self._incremental = incremental_rebalancing(config)
        self.consumer = Consumer(config, logger=logging.getLogger("metarec.kafka.aggregator"))
        self.producer = Producer(settings.kafka_config())

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self, *, max_cycles: int | None = None) -> int:
        s = self.settings
        self.consumer.subscribe([s.events_topic, s.items_topic, s.users_topic],
                                on_assign=self._rewind)
        cycles = 0
        log.info("aggregator started", extra={"group": s.aggregator_group_id,
                                              "window_events": s.window_events})
        try:
            while not self._stopping and (max_cycles is None or cycles < max_cycles):
                self.ingest(self.consumer.consume(s.batch_size, 0.5))
                if self._due() and self.cycle(reason=self._reason()) is not None:
                    cycles += 1
        finally:
            self.consumer.close()
            self.producer.flush(10)
        return 0

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
        s = self.settings
        now_ms = int(time.time() * 1000)
        for msg in records:
            if msg.error() is not None:
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka error", extra={"error": str(msg.error())})
                continue
            try:
                if msg.topic() == s.events_topic:
                    e = decode_event(msg.value() or b"", event_types=s.event_types,
                                     default_ts=msg.timestamp()[1], now_ms=now_ms)
                    self.window.append(e.user, e.item, e.ts, s.event_types[e.type], e.domain)
                    self._events_since += 1
                elif msg.topic() == s.items_topic:
                    item = decode_item(msg.value() or b"")
                    self.window.describe_item(item.item, item.domain, item.features)
                elif msg.topic() == s.users_topic:
                    user = decode_user(msg.value() or b"")
                    self.window.describe_user(user.user, user.features)
            except (InvalidEvent, RecursionError):  # deeply nested JSON
                continue

    def _due(self) -> bool:
        if len(self.window) < max(self.settings.min_events_for_model, 1):
            return False
        if self.store.current_model_version() is None:
            return True
        if self.store.aggregation_request() is not None:
            # After a change, wait until the new regime has enough events to learn from.
            floor = self.store.training_floor()
            return floor is None or self.window.count_since(floor) >= max(
                self.settings.min_events_for_model, 1)
        return time.monotonic() >= self._next_cycle and self._events_since > 0

    def _reason(self) -> str:
        if self.store.current_model_version() is None:
            return "first model"
        request = self.store.aggregation_request()
        if request is not None:
            return request
        return "schedule"

    def request(self) -> None:
        """Ask a running aggregator for a cycle now (``metarec aggregate --now``)."""
        self.store.request_aggregation("requested by an operator")

    def current_model(self) -> MetaModel | None:
        version = self.store.current_model_version()
        if version is None:
            return None
        try:
            return MetaModel.from_bytes(self.store.load_model_blob(version)).with_version(
                version)
        except ModelError as exc:
            log.error("current model unreadable; training from scratch",
                      extra={"version": version, "error": str(exc)})
            return None

    def cycle(self, reason: str = "requested") -> int | None:
        """Fold partial sums, meta-train on the window, publish. Returns the new version."""
        self.store.clear_aggregation_request()
        self._next_cycle = time.monotonic() + self.settings.aggregate_interval_s
        if len(self.window) < 2:
            log.info("window too small to train", extra={"events": len(self.window)})
            return None
        started = time.perf_counter()
        init = self.current_model()
        # A detected change moves the floor: the regime before it would only teach the
        # model what no longer holds.
        floor = self.store.training_floor()
        data = self.window.training_data(since_ts=floor)
        if len(data) < 2:
            log.info("too few events since the training floor", extra={
                "events": len(data), "floor_ts": floor})
            return None
        # The first version after a change starts afresh: unlearning the old regime takes
        # longer than learning the new one (docs/RESULTS.md, the drift scenario).
        fresh = init is not None and floor is not None and init.info.get("floor_ts") != floor
        model = self.trainer.fit(data, init=None if fresh else init,
                                 version=(init.version + 1) if init is not None else 1)
        model.info["floor_ts"] = floor
        # Fold the users in only once training worked: taken partial sums are gone from
        # Redis, and a failed run must not lose them. (After a change they describe users
        # adapted to the old regime: taken, not folded.)
        partials = self.store.take_partials(self.settings.events_topic)
        folded = 0.0
        if init is not None and init.meta and model.meta and partials and not fresh:
            folded = sum(float(p.weights.sum()) for p in partials)
            model = _fold(model, init, partials)
        version = self.store.publish_model(model.to_bytes())
        notice = {"version": version, "created_ms": int(time.time() * 1000),
                  "events": len(data), "users": len(data.user_ids),
                  "items": len(data.item_ids), "reason": reason, "floor_ts": floor,
                  "fresh_start": fresh,
                  "device": model.info.get("device"), "folded_weight": folded}
        self.producer.produce(self.settings.model_topic, key=str(version).encode(),
                              value=json.dumps(notice).encode())
        self.producer.poll(0)
        self._events_since = 0
        log.info("model published", extra={**notice,
                                            "seconds": round(time.perf_counter() - started, 2)})
        return version


def _fold(model: MetaModel, init: MetaModel, partials: list[PartialSums]) -> MetaModel:
    """``model`` with the Reptile step of ``partials`` added to its ``θ0`` rows.

    The partial sums were accumulated against ``init``'s domain rows; domains are matched
    by name, since a new version may order them differently.
    """
    step = reptile_update(init.theta0, partials, REPTILE_EPSILON) - init.theta0
    theta0 = model.theta0.copy()
    for row, name in enumerate(init.domains):
        if name in model.domains and row < len(step):
            theta0[model.domains.index(name)] += step[row]
    return replace(model, theta0=theta0)
