"""Operator commands through the CLI, as an operator runs them, against a live system."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from metarec.core.events import Event
from tests.consumer.system import (
    REPO,
    Publisher,
    System,
    check_exactly_once,
    make_model,
    make_system,
    wait_until,
)

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

__all__ = ["make_system"]


def metarec(system: System, *argv: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "metarec.cli", *argv],
        env=system.env(),
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return json.loads(proc.stdout)


def test_an_operator_inspects_resets_replays_and_rolls_back(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(2)
    items = [f"i{n}" for n in range(40)]
    v1 = system.store.publish_model(make_model(items, ["default"], seed=1).to_bytes())
    v2 = system.store.publish_model(make_model(items, ["default"], seed=2).to_bytes())
    proc = system.start()
    pub = Publisher(kafka_bootstrap)
    now = int(time.time() * 1000)
    for n in range(60):
        pub.send_event(system.events, Event(f"u{n % 6}", items[n % 40], "click", now + n))
    # Two dead letters: a bad type (fixable by the operator: the consumer learns the type)
    # and a record keyed by another user.
    bad = json.dumps({"user": "u9", "item": "i1", "type": "share", "ts": now}).encode()
    pub.send(system.events, b"u9", bad)
    pub.send(system.events, b"u1", json.dumps(Event("u2", "i2", "click", now).to_json()).encode())
    pub.flush()
    system.wait_applied(pub.ends(system.events))

    seen = metarec(system, "recs", "u1")
    assert seen["recs"]["user"] == "u1" and seen["state"]["events"] == 10
    assert seen["recs"]["model_version"] == v2
    assert seen["served"]["source"] == "user" and seen["served"]["items"] == seen["recs"]["items"]
    # A newcomer is shown what an app would serve them, and from where.
    wait_until(
        lambda: metarec(system, "recs", "newbie")["served"]["source"] == "fallback",
        30.0,
        "a fallback list",
        system.logs,
        procs=[proc],
    )
    newbie = metarec(system, "recs", "newbie", "--domain", "default")
    assert newbie["served"]["key"].endswith("fallback:default") and newbie["served"]["items"]
    assert newbie["recs"] is None and newbie["state"] is None
    # A domain no event has named yet: the global fallback, not nothing.
    elsewhere = metarec(system, "recs", "newbie", "--domain", "podcasts")["served"]
    assert elsewhere["source"] == "fallback" and elsewhere["items"]
    assert elsewhere["key"] == f"{system.prefix}fallback"

    letters = metarec(system, "dlq", "inspect")
    assert len(letters) == 2
    assert {bool("'type' is 'share'" in x["error"]) for x in letters} == {True, False}
    assert all(x["origin"].startswith(system.events) for x in letters)
    share = metarec(system, "dlq", "inspect", "--matching", "'share'")
    assert [x["error"] for x in share] == [x["error"] for x in letters if "'share'" in x["error"]]
    assert metarec(system, "dlq", "inspect", "--matching", "no such reason") == []
    assert len(metarec(system, "dlq", "inspect", "--limit", "1")) == 1

    # Replaying the mis-keyed letter, unfixed: it fails again and is dead-lettered anew,
    # but not replayed a second time by the same run; the letter passed over stays.
    assert metarec(system, "dlq", "replay", "--matching", "record key") == {
        "replayed": 1,
        "skipped": 0,
        "not_matching": 1,
        "dry_run": False,
    }
    wait_until(
        lambda: len(metarec(system, "dlq", "inspect")) == 3,
        30.0,
        "the replayed letter to fail again",
        system.logs,
        procs=[proc],
    )
    assert metarec(system, "dlq", "replay", "--dry-run") == {
        "replayed": 2,  # the 'share' letter and the new mis-keyed one
        "skipped": 0,
        "not_matching": 0,
        "dry_run": True,
    }

    # The fix: the consumer now accepts "share"; replay only that letter, once.
    system.terminate(proc)
    fixed = system.start(METAREC_EVENT_TYPES="click:1,like:2,dislike:-1,share:1")
    assert metarec(system, "dlq", "replay", "--matching", "'share'") == {
        "replayed": 1,
        "skipped": 0,
        "not_matching": 1,
        "dry_run": False,
    }
    again = metarec(system, "dlq", "replay", "--matching", "'share'")
    assert (again["replayed"], again["not_matching"]) == (0, 1)  # remembered
    wait_until(
        lambda: system.state("u9") is not None,
        30.0,
        "the replayed event",
        system.logs,
        procs=[fixed],
    )
    check_exactly_once(system, {"u9": 1, "u1": 10})

    assert metarec(system, "user", "reset", "u1") == {"user": "u1", "reset": True}
    assert system.state("u1") is None and system.recs("u1") is None

    models = metarec(system, "model", "list")
    assert [m["version"] for m in models] == [v2, v1] and models[0]["current"]
    back = metarec(system, "model", "rollback", str(v1))
    assert back["published"] > v2
    assert system.store.load_model_blob(back["published"]) == system.store.load_model_blob(v1)
    pub.send_event(system.events, Event("u3", "i7", "like", now + 99))
    pub.flush()
    wait_until(
        lambda: (system.recs("u3") or {}).get("model_version") == back["published"],
        30.0,
        "the consumer to serve the rolled-back model",
        system.logs,
        procs=[fixed],
    )
    listed = {m["version"]: m for m in metarec(system, "model", "list")}
    copy = listed[back["published"]]
    assert (copy["parent"], copy["reason"]) == (v1, f"rollback to version {v1}")
    assert copy["current"] and copy["served"] and not copy["pinned"]

    # Pinned: consumers serve v2 while newer versions are published over it.
    assert metarec(system, "model", "pin", str(v2)) == {"pinned": v2, "served": v2}
    newer = system.store.publish_model(make_model(items, ["default"], seed=3).to_bytes())
    pub.send_event(system.events, Event("u4", "i8", "like", now + 100))
    pub.flush()
    wait_until(
        lambda: (system.recs("u4") or {}).get("model_version") == v2,
        30.0,
        "the consumer to serve the pinned model",
        system.logs,
        procs=[fixed],
    )
    listed = {m["version"]: m for m in metarec(system, "model", "list")}
    assert listed[v2]["pinned"] and listed[v2]["served"] and listed[newer]["current"]
    assert not listed[newer]["served"]
    assert metarec(system, "model", "unpin") == {"pinned": None, "served": newer}
    pub.send_event(system.events, Event("u5", "i9", "like", now + 101))
    pub.flush()
    wait_until(
        lambda: (system.recs("u5") or {}).get("model_version") == newer,
        30.0,
        "the consumer to serve the newest model again",
        system.logs,
        procs=[fixed],
    )
