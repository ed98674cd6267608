"""An event sent without a record key: dead-lettered as ``key-mismatch`` (a partitioner
spreads keyless records anywhere, away from the user's other events), and applied once
``metarec dlq replay`` sends it again keyed by its user."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from metarec.core.events import Event
from metarec.services import dead_letters as dlq
from tests.consumer.system import (
    REPO,
    Publisher,
    System,
    check_exactly_once,
    make_system,
    wait_until,
)
from tests.kafka_read import read_records

# Processes and a broker: left out of `make test-fast`.
pytestmark = pytest.mark.slow

__all__ = ["make_system"]


def test_a_keyless_event_is_dead_lettered_and_replayed_keyed_by_its_user(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(4)
    proc = system.start()
    pub = Publisher(kafka_bootstrap)
    now = int(time.time() * 1000)
    for n in range(12):
        pub.send_event(system.events, Event(f"u{n % 3}", f"i{n}", "click", now + n))
    keyless = Event("u-keyless", "i1", "like", now + 20)
    pub.send(system.events, None, json.dumps(keyless.to_json()).encode())
    pub.flush()
    system.wait_applied(pub.ends(system.events))

    [letter] = read_records(kafka_bootstrap, system.dlq, 1, 1)
    headers = dict(letter.headers() or [])
    assert letter.key() is None and b"record key is missing" in headers[dlq.ERROR_MESSAGE]
    assert system.state("u-keyless") is None

    out = subprocess.run(
        [sys.executable, "-m", "metarec.cli", "dlq", "replay"],
        env=system.env(),
        cwd=REPO,
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert json.loads(out.stdout)["replayed"] == 1
    wait_until(
        lambda: system.state("u-keyless") is not None,
        30.0,
        "the replayed event, keyed by its user",
        system.logs,
        procs=[proc],
    )
    check_exactly_once(system, {"u0": 4, "u1": 4, "u2": 4, "u-keyless": 1})
    assert system.terminate(proc) == 0
