"""Withdrawing items (``"available": false`` on the items topic) with two consumers: gone
from every list apps read within 5 seconds, whatever the users do; back when restored."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import pytest

from metarec.client import Recommendations
from metarec.core.events import Event, ItemRecord, encode_item
from tests.consumer.system import Publisher, System, make_model, make_system, wait_until

# Processes and a broker: left out of `make test-fast`.
pytestmark = pytest.mark.slow

__all__ = ["make_system"]

USERS = [f"u{n}" for n in range(40)]
WITHIN_S = 5.0


def _send_items(pub: Publisher, system: System, items: list[str], available: bool) -> None:
    for item in items:
        record = ItemRecord(item, available=available)
        pub.send(system.items, item.encode(), encode_item(record))
    pub.flush()


def _everything_read(recs: Recommendations) -> list[list[str]]:
    """Every list an app can read here: each user's, a newcomer's, another domain's."""
    read = recs.get_many([*USERS, "newcomer"])
    lists = [r.items for r in read.values() if r is not None]
    elsewhere = recs.get("newcomer", domain="elsewhere")
    return [*lists, *([elsewhere.items] if elsewhere is not None else [])]


def test_withdrawn_items_leave_every_list_within_5_s_and_come_back_when_restored(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(2)
    items = [f"i{n}" for n in range(300)]
    system.store.publish_model(make_model(items, ["default"], seed=3).to_bytes())
    procs = [system.start(), system.start()]
    pub = Publisher(kafka_bootstrap)
    now = int(time.time() * 1000)
    for n in range(400):
        pub.send_event(system.events, Event(USERS[n % 40], items[(7 * n) % 300], "click", now + n))
    pub.flush()
    system.wait_applied(pub.ends(system.events))
    recs = Recommendations(system.store.client, prefix=system.prefix)

    def fallbacks_written() -> bool:
        newcomer = recs.get("newcomer")
        return newcomer is not None and newcomer.source == "fallback"

    wait_until(
        fallbacks_written,
        30.0,
        "the fallback lists",
        system.logs,
        procs=procs,
    )
    # The 100 items the apps show most: withdrawing them changes what everyone sees.
    shown = Counter(i for listed in _everything_read(recs) for i in listed)
    gone = [item for item, _ in shown.most_common(100)]
    assert len(gone) == 100

    _send_items(pub, system, gone, available=False)
    withdrawn_at = time.monotonic()
    for n in range(40):  # the stream goes on: half the users act, half do not
        pub.send_event(system.events, Event(USERS[n % 20], items[n], "click", now + 1000 + n))
    pub.flush()
    time.sleep(max(0.0, WITHIN_S - (time.monotonic() - withdrawn_at)))
    after = _everything_read(Recommendations(system.store.client, prefix=system.prefix))
    assert after and all(listed for listed in after)  # never emptied by the withdrawal
    assert not {i for listed in after for i in listed} & set(gone)
    # What consumers write once they know leaves them out too, for readers without the
    # client (a list written before a consumer's next poll may still hold them).
    for n in range(20):
        pub.send_event(system.events, Event(USERS[n], items[40 + n], "click", now + 2000 + n))
    pub.flush()
    system.wait_applied(pub.ends(system.events))
    for user in USERS[:20]:
        assert not set((system.recs(user) or {})["items"]) & set(gone)
    raw = system.store.client.get(system.store.fallback_key("default"))
    assert raw is not None and not set(json.loads(raw)["items"]) & set(gone)

    _send_items(pub, system, gone, available=True)
    time.sleep(WITHIN_S)
    back = {i for listed in _everything_read(recs) for i in listed} & set(gone)
    assert back, "restored items are recommended again"
    raw = system.store.client.get(system.store.fallback_key("default"))
    assert raw is not None and set(json.loads(raw)["items"]) & set(gone)
    for proc in procs:
        assert system.terminate(proc) == 0
