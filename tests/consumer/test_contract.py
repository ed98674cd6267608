"""Lists written for events from a client that is not ours follow the list contract."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from metarec.client import Recommendations
from metarec.local.devservices import kcat_env
from tests.consumer.system import (
    CATCH_UP_S,
    System,
    check_exactly_once,
    check_list,
    make_system,
    wait_until,
)

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

__all__ = ["make_system"]  # a fixture: pytest finds it in this module


# --- 1. a foreign client -------------------------------------------------------------------


def foreign_produce(
    bootstrap: str, topic: str, records: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    """Publish ``(key, JSON object)`` records with kafka-python: a client that shares no
    code with the consumer's librdkafka, keyed and partitioned like Java's."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for key, value in records:
            producer.send(topic, key=key.encode(), value=json.dumps(value).encode())
        producer.flush(timeout=60)
    finally:
        producer.close()


def kcat_produce(
    env: Mapping[str, str],
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[str, dict[str, Any]]],
) -> None:
    """Publish ``(key, JSON object)`` records with kcat, keyed and partitioned like Java."""
    lines = "".join(f"{key}\t{json.dumps(value)}\n" for key, value in records)
    out = subprocess.run(
        [
            "kcat",
            "-b",
            bootstrap,
            "-P",
            "-t",
            topic,
            "-K",
            "\t",
            "-X",
            "partitioner=murmur2_random",
        ],
        input=lines.encode(),
        env=dict(env),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kcat failed ({out.returncode}): {out.stderr.decode()[-2000:]}"


@pytest.mark.parametrize(
    "client",
    [
        "kafka-python",
        pytest.param(
            "kcat",
            marks=pytest.mark.skipif(
                shutil.which("kcat") is None,
                reason="kcat not installed (an extra check; CI has it)",
            ),
        ),
    ],
)
def test_lists_from_a_foreign_client_follow_the_contract(
    make_system: Callable[..., System], tmp_path: Path, client: str
) -> None:
    system = make_system(3, METAREC_TOP_K="5")
    env = kcat_env(tmp_path / "kcat-shim")

    def publish(topic: str, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
        if client == "kcat":
            kcat_produce(env, system.bootstrap, topic, records)
        else:
            foreign_produce(system.bootstrap, topic, records)

    now = int(time.time() * 1000)
    catalog_only = [f"book-{j}" for j in range(8)]  # described, never clicked
    publish(
        system.items,
        [
            (
                item,
                {"item": item, "domain": "books", "features": ["genre:x", f"n:{j % 3}"], "ts": now},
            )
            for j, item in enumerate(catalog_only)
        ],
    )
    rng = random.Random(7)
    records: list[tuple[str, dict[str, Any]]] = []
    consumed: dict[str, set[str]] = {}
    for n in range(60):
        user = f"user-{rng.randrange(9)}"
        domain = "books" if user[-1] in "0123" else "music"
        item = f"{domain}-item-{rng.randrange(12)}"
        event: dict[str, Any] = {
            "user": user,
            "item": item,
            "type": rng.choice(["click", "click", "like", "dislike"]),
        }
        if n % 2:  # ts and domain are optional in the contract
            event["ts"] = now + n
        if domain != "books" or n % 3:
            event["domain"] = domain
        records.append((user, event))
        consumed.setdefault(user, set()).add(item)
    publish(system.events, records)
    per_user = Counter(key for key, _ in records)

    proc = system.start()
    wait_until(
        lambda: system.applied() == len(records),
        CATCH_UP_S,
        f"all {len(records)} {client} events applied",
        lambda: f"{system.offsets()}{system.logs()}",
        procs=[proc],
    )
    catalog = set(catalog_only) | {e["item"] for _, e in records}
    for user, n in per_user.items():
        check_list(
            system,
            user,
            events=n,
            catalog=catalog,
            consumed=consumed[user],
            top_k=5,
            model_version=0,
        )
    check_exactly_once(system, per_user)
    # The registry holds the described items and those first seen in events, nothing else.
    keys = [k.decode() for k in system.store.client.hkeys(system.store.key("items", "index"))]
    assert set(keys) == catalog
    # A user without a list is shown their domain's fallback, which the consumers write:
    # what a newcomer to that domain is served (here, without a model: its trending items).
    reader = Recommendations(system.store.client, prefix=system.store.prefix)
    for domain in ("books", "music"):

        def written(d: str = domain) -> bool:
            return reader.get("never-seen", d) is not None

        wait_until(written, 30.0, f"the {domain} fallback list", procs=[proc])
        shown = reader.get("never-seen", domain)
        assert shown is not None and shown.source == "fallback" and shown.domain == domain
        assert 0 < len(shown.items) <= 5 and len(set(shown.items)) == len(shown.items)
        assert all(item.startswith(domain[:4]) for item in shown.items), shown.items
        assert shown.scores == sorted(shown.scores, reverse=True)
    # An app showing a shelf gets the user's list of that shelf's items only, K of them,
    # best first: in the domain the user reads and in the one they never touched.
    for user in per_user:
        for domain, prefix in (("books", "book"), ("music", "music")):
            shelf = reader.get(user, domain)
            assert shelf is not None and shelf.source == "user", (user, domain, shelf)
            assert len(shelf.items) == 5, (user, domain, shelf.items)
            assert all(item.startswith(prefix) for item in shelf.items), (domain, shelf.items)
            assert not set(shelf.items) & consumed[user], (user, shelf.items)
            assert shelf.scores == sorted(shelf.scores, reverse=True), shelf.scores
