"""Prometheus metrics and the health endpoints of the consumer and the aggregator.

Why a registry per process object rather than prometheus-client's global one: a test (or
an app embedding two consumers) can run several without their counters mixing.

One small HTTP server per process, on ``METAREC_METRICS_PORT`` (off when it is 0):

* ``/metrics`` — the Prometheus text format;
* ``/healthz`` — 200 while the process loop has ticked within :data:`STALE_LOOP_S`
  (a wedged loop, a deadlock: restart it); 503 otherwise;
* ``/readyz`` — 200 when the process can do its job: Redis answers, partitions are
  assigned (or none is legitimately free), a model is loaded or popularity serves; the
  body names what is missing otherwise (503).

Every metric is listed, with what to alert on, in docs/OPERATIONS.md.

>>> m = Metrics("consumer")
>>> m.events_applied.inc(3)
>>> b"metarec_events_applied_total 3.0" in m.exposition()
True
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["STALE_LOOP_S", "HealthServer", "Metrics"]

#: A loop that has not ticked for this long is reported unhealthy.
STALE_LOOP_S: Final = 60.0
_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The metrics one process exports (``service`` is "consumer" or "aggregator")."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.service = service
        self.redis_errors = Counter(
            "metarec_redis_errors", "Redis calls that failed and were retried.", registry=r
        )
        self.redis_outages = Counter(
            "metarec_redis_outages",
            "Redis outages ridden out (each may have many failed calls).",
            registry=r,
        )
        self.kafka_errors = Counter(
            "metarec_kafka_errors", "Errors librdkafka reported.", registry=r
        )
        self.model_version = Gauge(
            "metarec_model_version", "The model version served (0 before the first).", registry=r
        )
        self.model_age_seconds = Gauge(
            "metarec_model_age_seconds",
            "Seconds since the served model version was published (NaN before the first).",
            registry=r,
        )
        # Not 0: "no model yet" must not read as "a model published just now".
        self.model_age_seconds.set(math.nan)
        self.last_loop = Gauge(
            "metarec_last_loop_timestamp_seconds",
            "When the process loop last ticked (Unix time).",
            registry=r,
        )
        # Each process's own series: /metrics shows only what that process does.
        if service == "consumer":
            self._consumer_series(r)
        if service == "aggregator":
            self._aggregator_series(r)

    def _consumer_series(self, r: CollectorRegistry) -> None:
        self.events_consumed = Counter(
            "metarec_events_consumed",
            "Records consumed from the events topic, valid or not.",
            registry=r,
        )
        self.events_applied = Counter(
            "metarec_events_applied",
            "Events applied to users' states and lists (exactly once).",
            registry=r,
        )
        self.dead_letters = Counter(
            "metarec_dead_letters",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.lag = Gauge(
            "metarec_lag",
            "Records in the events log not yet applied, per "
            "partition (every partition of the group, owned or not).",
            ["partition"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "metarec_batch_seconds",
            "Wall time of one batch, from consume to the atomic write.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.freshness_seconds = Histogram(
            "metarec_freshness_seconds",
            "From an event's Kafka timestamp to the write of its user's list.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.offset_resets = Counter(
            "metarec_offset_resets",
            "Times the events log was found replaced or truncated under the stored offsets.",
            registry=r,
        )
        self.group_rejoins = Counter(
            "metarec_group_rejoins",
            "Times this member left the group and joined again because it owned no "
            "partition while events waited and none were applied.",
            registry=r,
        )
        self.user_conflicts = Counter(
            "metarec_user_conflicts",
            "Users whose batch was redone because another consumer wrote them meanwhile.",
            registry=r,
        )
        self.live_hr = Gauge(
            "metarec_live_hr",
            'Live HR@K of the lists users were shown, per domain ("all": every domain).',
            ["domain"],
            registry=r,
        )
        self.live_ndcg = Gauge(
            "metarec_live_ndcg", "Live NDCG@K, per domain.", ["domain"], registry=r
        )

    def _aggregator_series(self, r: CollectorRegistry) -> None:
        self.window_events = Gauge(
            "metarec_aggregator_window_events",
            "Events in the training window (the retained log, up to METAREC_WINDOW_EVENTS).",
            registry=r,
        )
        self.events_since_cycle = Gauge(
            "metarec_aggregator_events_since_cycle",
            "Events ingested since the last published version.",
            registry=r,
        )
        self.cycles = Counter(
            "metarec_aggregator_cycles",
            "Aggregation cycles, by why they ran (first, schedule, interval, operator, drift) "
            "and how they ended (published, skipped: too little to train on, failed).",
            ["reason", "outcome"],
            registry=r,
        )
        self.cycle_seconds = Histogram(
            "metarec_aggregator_cycle_seconds",
            "Wall time of one cycle: train, fold, publish.",
            registry=r,
            buckets=(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
        )
        self.training_seconds = Gauge(
            "metarec_aggregator_training_seconds", "Training time of the last cycle.", registry=r
        )
        self.training_loss = Gauge(
            "metarec_aggregator_training_loss",
            "Held-out query loss of the last version trained (lower is better; NaN before "
            "the first).",
            registry=r,
        )
        self.training_loss.set(math.nan)
        self.last_success = Gauge(
            "metarec_aggregator_last_success_timestamp_seconds",
            "When a cycle last published a version (Unix time; 0 before the first).",
            registry=r,
        )

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``127.0.0.1``-or-any ``port``.

    ``ready`` returns the list of what is missing (empty: ready). ``tick()`` is called by
    the process loop; ``/healthz`` fails once it has not been called for ``stale_s``.
    """

    def __init__(
        self,
        metrics: Metrics,
        port: int,
        ready: Callable[[], list[str]],
        *,
        host: str = "0.0.0.0",  # noqa: S104 (probes and scrapers come from outside)
        stale_s: float = STALE_LOOP_S,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.stale_s = stale_s
        self._last_tick = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(
                        200, metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
                    )
                elif path == "/healthz":
                    age = time.monotonic() - server._last_tick
                    ok = age <= server.stale_s
                    self._json(200 if ok else 503, {"ok": ok, "loop_age_s": round(age, 3)})
                elif path == "/readyz":
                    try:
                        missing = server.ready()
                    except Exception as exc:  # a probe must answer, not crash the thread
                        missing = [f"readiness check failed: {type(exc).__name__}"]
                    self._json(
                        200 if not missing else 503, {"ready": not missing, "missing": missing}
                    )
                else:
                    self._json(
                        404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}
                    )

            def _json(self, code: int, body: dict[str, object]) -> None:
                self._reply(code, json.dumps(body).encode(), "application/json")

            def _reply(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would flood the JSON logs

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, daemon=True, name=f"metarec-{metrics.service}-http"
        )
        self._thread.start()

    def tick(self) -> None:
        """The process loop is alive."""
        self._last_tick = time.monotonic()
        self.metrics.last_loop.set(time.time())

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
