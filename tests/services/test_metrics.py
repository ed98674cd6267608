"""The metrics and health endpoints: the HTTP server alone, then a consumer's, end to end."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from metarec.core.events import Event
from metarec.services.metrics import HealthServer, Metrics
from tests import monitoring_series as monitoring
from tests.consumer.system import REPO, Publisher, System, make_system, wait_until

__all__ = ["make_system"]


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_health_follows_the_loop_and_readiness_names_what_is_missing() -> None:
    missing: list[str] = ["redis unavailable"]
    metrics = Metrics("consumer")
    server = HealthServer(metrics, 0, lambda: list(missing), host="127.0.0.1", stale_s=0.3)
    try:
        server.tick()
        assert get(server.port, "/healthz")[0] == 200
        code, body = get(server.port, "/readyz")
        assert code == 503 and json.loads(body)["missing"] == ["redis unavailable"]
        missing.clear()
        assert get(server.port, "/readyz")[0] == 200
        time.sleep(0.4)  # the loop stopped ticking
        assert get(server.port, "/healthz")[0] == 503
        metrics.dead_letters.labels(reason="field:ts").inc()
        code, body = get(server.port, "/metrics")
        assert code == 200 and b'metarec_dead_letters_total{reason="field:ts"} 1.0' in body
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(text: str, name: str) -> float:
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    ]
    return sum(values)


@pytest.mark.slow
def test_a_consumer_exports_what_it_applied_and_its_groups_lag(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(2)
    port = free_port()
    proc = system.start(METAREC_METRICS_PORT=str(port))
    wait_until(lambda: _answers(port), 30.0, "the metrics endpoint", system.logs, procs=[proc])
    pub = Publisher(kafka_bootstrap)
    now = int(time.time() * 1000)
    for n in range(300):
        pub.send_event(system.events, Event(f"u{n % 30}", f"i{n % 50}", "click", now + n))
    pub.send(system.events, b"u1", b"not json")
    pub.flush()
    system.wait_applied(pub.ends(system.events))

    def exported() -> bool:
        text = get(port, "/metrics")[1].decode()
        return (
            metric(text, "metarec_events_applied_total") == 300
            and metric(text, "metarec_events_consumed_total") == 301
            and metric(text, 'metarec_dead_letters_total{reason="not-json"}') == 1
            and metric(text, "metarec_lag{") == 0
            and metric(text, "metarec_freshness_seconds_count") > 0
            # No model published: its age is unknown, not zero.
            and "\nmetarec_model_age_seconds NaN\n" in text
        )

    wait_until(
        exported,
        20.0,
        "the counters to show the batch",
        lambda: get(port, "/metrics")[1].decode()[-2000:],
        procs=[proc],
    )
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz") == (200, b'{"ready": true, "missing": []}')
    # What the shipped dashboard and alert rules query of a consumer, it exports.
    served = monitoring.exported(get(port, "/metrics")[1].decode())
    assert monitoring.expected_of("consumer") <= served, monitoring.expected_of("consumer") - served
    assert system.terminate(proc) == 0


def _answers(port: int) -> bool:
    try:
        return get(port, "/healthz")[0] == 200
    except OSError:
        return False


def test_every_series_docs_operations_names_is_exported_by_its_process() -> None:
    """docs/OPERATIONS.md's metric table and alerts name only series that exist, and each
    process exports its own: the aggregator none of the consumer's, and the reverse."""
    doc = (REPO / "docs" / "OPERATIONS.md").read_text()
    named = set(re.findall(r"`(metarec_[a-z_]+)", doc))
    exported = {
        service: monitoring.exported(Metrics(service).exposition().decode())
        for service in ("consumer", "aggregator")
    }
    family = monitoring.family

    everything = exported["consumer"] | exported["aggregator"]
    assert named and {family(n) for n in named} <= everything
    assert not {n for n in exported["aggregator"] if n.startswith("metarec_events")}
    assert not {n for n in exported["consumer"] if n.startswith("metarec_aggregator")}
