"""Bad records go to the dead-letter topic unchanged; good ones around them are applied."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from consumer.dlq import DEFAULT_TRUNCATE_TO
from metarec.core.events import MAX_ID_BYTES, MAX_RECORD_BYTES, Event
from metarec.services import dead_letters as dlq
from tests.consumer.system import (
    Publisher,
    System,
    check_exactly_once,
    make_system,
    read_topic,
    wait_until,
)

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

__all__ = ["make_system"]  # a fixture: pytest finds it in this module


# --- 5. bad input -----------------------------------------------------------------------------


def bad_records(now: int) -> list[tuple[str, bytes | None, str]]:
    """``(key, value, expected words of the error message)`` of records that break the
    contract, each in one way."""

    def event(**fields: Any) -> bytes:
        base: dict[str, Any] = {"user": "bad-user", "item": "i1", "type": "click", "ts": now}
        base.update(fields)
        return json.dumps({k: v for k, v in base.items() if v is not None}).encode()

    pad = "x" * (200 * 1024)
    return [
        ("k-utf8", b'{"user": "\xff\xfe", "item": "i1", "type": "click"}', "not UTF-8"),
        ("k-json", b'{"user": "u", "item": ', "not JSON"),
        ("k-list", b'["u", "i1", "click"]', "must be a JSON object"),
        ("k-number", b"42", "must be a JSON object"),
        ("k-null", None, "not JSON"),
        ("k-no-user", event(user=None), "'user' is missing"),
        ("k-no-item", event(item=None), "'item' is missing"),
        ("k-no-type", event(type=None), "'type'"),
        ("k-item-number", event(item=17), "'item' must be a string"),
        ("k-ts-string", event(ts="1700000000000"), "'ts' must be integer"),
        ("k-empty-user", event(user=""), "'user' must be a non-empty id"),
        ("k-long-id", event(item="i" * (MAX_ID_BYTES + 1)), f"longer than {MAX_ID_BYTES}"),
        ("k-type", event(type="share"), "'type' is 'share'"),
        ("k-future", event(ts=now + 3 * 24 * 3600 * 1000), "in the future"),
        ("k-negative-ts", event(ts=-5), "negative"),
        # A time before 1990 is a unit mistake (seconds) or a test value, not an event.
        ("k-ts-1", event(ts=1), "before the earliest accepted time"),
        ("k-ts-seconds", event(ts=now // 1000), "before the earliest accepted time"),
        # Valid, but keyed by another user: it may sit on another partition than theirs.
        ("k-key-mismatch", event(), "is not the event's user"),
        ("k-huge", event(pad=pad), f"over the {MAX_RECORD_BYTES} limit"),
        ("k-over-1mb", event(pad=pad * 6), f"over the {MAX_RECORD_BYTES} limit"),
        # Under the size limit, but deeper than Python's JSON parser recurses.
        ("k-deep", b"[" * 50_000, ""),
    ]


def test_bad_records_go_to_the_dlq_unchanged_and_good_ones_are_applied(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(2)
    # The test's producer may send records over 1 MB; the consumer's DLQ producer may not.
    pub = Publisher(kafka_bootstrap, **{"message.max.bytes": "3000000"})
    now = int(time.time() * 1000)
    bad = bad_records(now)
    good = [Event(f"good-{j % 4}", f"item-{j % 5}", "click", now + j) for j in range(2 * len(bad))]
    for j, (key, value, _) in enumerate(bad):
        pub.send_event(system.events, good[2 * j])
        pub.send(system.events, key.encode(), value)
        pub.send_event(system.events, good[2 * j + 1])
    pub.flush()
    proc = system.start()
    system.wait_applied(pub.ends(system.events))
    # Good events after the bad ones are still applied by the same process.
    after = [Event(f"good-{j % 4}", "item-late", "like", now + 100 + j) for j in range(4)]
    for e in after:
        pub.send_event(system.events, e)
    pub.flush()
    system.wait_applied(pub.ends(system.events))
    assert proc.poll() is None, f"the consumer died on bad input{system.logs()}"
    check_exactly_once(
        system, {u: n for u, n in pub.per_user(system.events).items() if u.startswith("good-")}
    )

    sent = {d.key.decode(): d for d in pub.delivered if d.key and d.key.startswith(b"k-")}
    letters = read_topic(kafka_bootstrap, system.dlq, len(bad))
    assert len(letters) == len(bad), [m.key() for m in letters]
    by_key = {m.key().decode(): m for m in letters}
    for key, value, words in bad:
        msg = by_key.get(key)
        assert msg is not None, f"record {key} is not in the DLQ"
        headers = {k: v for k, v in msg.headers() or []}
        origin = sent[key]
        # A decoder gap (RecursionError) is dead-lettered under its own name.
        allowed = {b"InvalidEvent", b"RecursionError"} if key == "k-deep" else {b"InvalidEvent"}
        assert headers[dlq.ERROR_CLASS] in allowed, (key, headers)
        assert words in headers[dlq.ERROR_MESSAGE].decode(), (key, headers[dlq.ERROR_MESSAGE])
        assert headers[dlq.ORIGINAL_TOPIC] == system.events.encode()
        assert headers[dlq.ORIGINAL_PARTITION] == str(origin.partition).encode(), key
        assert headers[dlq.ORIGINAL_OFFSET] == str(origin.offset).encode(), key
        assert headers[dlq.CONSUMER_GROUP] == system.group.encode()
        if value is not None and len(value) > 1_000_000:
            # Over the DLQ producer's limit: kept cut down, with the original length.
            assert msg.value() == value[:DEFAULT_TRUNCATE_TO]
            assert headers[dlq.VALUE_TRUNCATED] == str(len(value)).encode()
        else:
            assert msg.value() == value, f"record {key} changed on its way to the DLQ"
            assert dlq.VALUE_TRUNCATED not in headers
    # Each dead letter is in the log with its reason (a batch's beyond the first few, in
    # one summary line), so an operator sees why without reading the topic.
    lines = [
        json.loads(line)
        for path in sorted(system.log_dir.glob("proc-*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]
    each = [x for x in lines if x["msg"] == "dead-lettered a record"]
    more = [x for x in lines if x["msg"] == "dead-lettered more records in this batch"]
    assert len(each) + sum(x["more"] for x in more) == len(bad), system.logs()
    assert all(x["reason"] and x["error"] and x["topic"] == system.events for x in each)
    assert {(x["partition"], x["offset"]) for x in each} <= {
        (d.partition, d.offset) for d in sent.values()
    }
    wait_until(
        lambda: (
            sum(b["total_dlq"] for b in system.store.heartbeats(system.group).values()) == len(bad)
        ),
        10.0,
        "the stats to count every dead letter",
        lambda: system.store.heartbeats(system.group),
        procs=[proc],
    )
