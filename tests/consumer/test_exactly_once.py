"""Every event applied exactly once through crashes, rebalances and zombie members."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from confluent_kafka import TopicPartition

from consumer.app import ConsumerApp
from metarec.core.events import Event
from tests.consumer.system import (
    FAST_GROUP,
    Background,
    Publisher,
    System,
    check_exactly_once,
    check_list,
    consume_at_least,
    make_model,
    make_system,
    owned,
    publish_paced,
    stream,
    wait_until,
)

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

__all__ = ["make_system"]  # a fixture: pytest finds it in this module


# --- 2. crash safety --------------------------------------------------------------------------


def test_sigkilled_consumers_apply_every_event_exactly_once(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(4, **FAST_GROUP)
    events = stream(seed=11, limit=3000)
    users = {e.user for e in events}
    domains = sorted({e.domain for e in events})
    items = sorted({e.item for e in events})
    # A model first, so that every applied event also lands in the partial sums.
    system.store.publish_model(make_model(items, domains).to_bytes())
    pub = Publisher(kafka_bootstrap)
    replay = Background(lambda: publish_paced(pub, system.events, events, rate=130.0))
    rng = random.Random(2024)
    kills = mid_stream = 0
    replay.start()
    try:
        while kills < 5:
            proc = system.start()
            before = system.applied()

            def busy(before: int = before) -> bool:
                # It wrote something, so it is at work; or there is nothing left to do.
                return system.applied() > before or (
                    not replay.is_alive() and system.applied() == len(events)
                )

            wait_until(
                busy,
                60.0,
                f"consumer {kills + 1} to apply events",
                lambda: f"{system.offsets()}{system.logs()}",
                interval=0.05,
                procs=[proc],
            )
            time.sleep(rng.uniform(0.0, 0.6))  # a random moment of its work
            assert proc.poll() is None, f"consumer died by itself{system.logs()}"
            mid_stream += system.applied() < len(events)
            system.kill(proc)
            kills += 1
        final = system.start()
    finally:
        replay.result(timeout=120)
    assert mid_stream >= 3, f"only {mid_stream} of the kills came while events were in flight"
    system.wait_applied(pub.ends(system.events))
    assert final.poll() is None, f"final consumer died{system.logs()}"

    per_user = pub.per_user(system.events)
    assert sum(per_user.values()) == len(events) and set(per_user) == users
    check_exactly_once(system, per_user)
    assert sum(v or 0 for v in system.offsets().values()) == len(events)
    # The consumer weighs each user by the events applied: each event counts once.
    partials = system.store.take_partials(system.events)
    weight = sum(float(p.weights.sum()) for p in partials)
    assert weight == pytest.approx(len(events), abs=1e-6), (weight, len(events))
    missing = [u for u in users if system.recs(u) is None]
    assert not missing, f"users without a list: {missing[:10]}"


# --- 3. scale out and in --------------------------------------------------------------------


def test_consumers_join_and_leave_without_losing_or_repeating_events(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(6)  # the consumer's own group timings (6 s session)
    events = stream(seed=5, limit=3600)
    pub = Publisher(kafka_bootstrap)
    replay = Background(lambda: publish_paced(pub, system.events, events, rate=150.0))
    everything = list(range(6))
    first = system.start()
    replay.start()
    try:
        wait_until(
            lambda: owned(system, [first]) == everything,
            30.0,
            "the first consumer to own all 6 partitions",
            lambda: f"{system.heartbeat_partitions([first])}{system.logs()}",
            procs=[first],
        )
        second, third = system.start(), system.start()
        trio = [first, second, third]
        wait_until(
            lambda: (
                owned(system, trio) == everything
                and all(system.heartbeat_partitions(trio).values())
            ),
            40.0,
            "three consumers to share the 6 partitions",
            lambda: f"{system.heartbeat_partitions(trio)}{system.logs()}",
            procs=trio,
        )
        assert replay.is_alive(), "the replay ended before the scale-in: nothing was in flight"
        assert system.terminate(second) == 0, f"SIGTERM must be a clean exit{system.logs()}"
        pair = [first, third]
        wait_until(
            lambda: owned(system, pair) == everything,
            40.0,
            "the two remaining consumers to take over all 6 partitions",
            lambda: f"{system.heartbeat_partitions(pair)}{system.logs()}",
            procs=pair,
        )
    finally:
        replay.result(timeout=120)
    ends = pub.ends(system.events)
    assert sorted(ends) == everything  # every partition had traffic
    system.wait_applied(ends)
    assert first.poll() is None and third.poll() is None, f"a consumer died{system.logs()}"
    per_user = pub.per_user(system.events)
    check_exactly_once(system, per_user)
    catalog = {e.item for e in events}
    for user in per_user:
        check_list(
            system,
            user,
            events=per_user[user],
            catalog=catalog,
            consumed={e.item for e in events if e.user == user},
            top_k=20,
        )


def test_cooperative_rebalancing_keeps_every_event_exactly_once(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    # A documented alternative to the eager default (docs/LOCAL_SERVICES.md); librdkafka
    # refuses a plain assign() in its rebalance callbacks.
    system = make_system(4, METAREC_KAFKA_PARTITION_ASSIGNMENT_STRATEGY="cooperative-sticky")
    events = stream(seed=9, limit=1500)
    pub = Publisher(kafka_bootstrap)
    replay = Background(lambda: publish_paced(pub, system.events, events, rate=100.0))
    first = system.start()
    replay.start()
    try:
        wait_until(
            lambda: owned(system, [first]) == [0, 1, 2, 3],
            30.0,
            "the first consumer to own all 4 partitions",
            lambda: f"{system.heartbeat_partitions([first])}{system.logs()}",
            procs=[first],
        )
        second = system.start()
        pair = [first, second]
        # The sticky assignor balances all three topics' partitions, so each member ends
        # up with some of the events topic.
        wait_until(
            lambda: (
                owned(system, pair) == [0, 1, 2, 3]
                and all(system.heartbeat_partitions(pair).values())
            ),
            40.0,
            "two cooperative consumers to share the 4 partitions",
            lambda: f"{system.heartbeat_partitions(pair)}{system.logs()}",
            procs=pair,
        )
    finally:
        replay.result(timeout=60)
    system.wait_applied(pub.ends(system.events))
    assert first.poll() is None and second.poll() is None, f"a consumer died{system.logs()}"
    check_exactly_once(system, pub.per_user(system.events))


# --- 4. a zombie's batch --------------------------------------------------------------------


def snapshot(system: System) -> dict[bytes, bytes | None]:
    """Every key of ``system`` except the consumers' heartbeats, as DUMPs."""
    client = system.store.client
    beats = (system.store.key("consumer") + ":").encode(), system.store.key("consumers").encode()
    return {
        key: client.dump(key)
        for key in client.scan_iter(match=f"{system.prefix}*")
        if not key.startswith(beats)
    }


def test_a_zombie_consumer_writes_nothing_and_re_seeks(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(1)
    pub = Publisher(kafka_bootstrap)
    now = int(time.time() * 1000)
    for j in range(40):
        pub.send_event(system.events, Event(f"z{j % 5}", f"item-{j % 7}", "click", now + j))
    pub.flush()
    live = system.start()
    system.wait_applied({0: 40})
    # The zombie: same group and settings, but it still believes it owns partition 0 at
    # offset 15, the last one it wrote before its partitions were given to the live one.
    zombie = ConsumerApp(system.settings(), member="zombie")
    try:
        zombie.consumer.assign([TopicPartition(system.events, 0, 15)])
        zombie._expected[0] = 15
        batch = consume_at_least(zombie.consumer, 10)[:10]
        assert [m.offset() for m in batch] == list(range(15, 25))
        before = snapshot(system)
        zombie.process(batch)  # records the live consumer applied already
        assert snapshot(system) == before, "the zombie's batch changed Redis"
        assert zombie._expected[0] == 40, "the zombie did not re-read the stored offset"
        # It re-seeked to the stored offset: its next records start there, not at 25.
        for j in range(10):
            pub.send_event(system.events, Event(f"z{j % 5}", f"item-{j}", "like", now + 40 + j))
        pub.flush()
        more = consume_at_least(zombie.consumer, 10)
        assert more[0].offset() == 40, f"zombie resumed at {more[0].offset()}, not at 40"
        zombie.process(more)  # races the live consumer: exactly one of them applies them
        system.wait_applied({0: 50})
    finally:
        zombie.consumer.close()
    assert live.poll() is None, f"the live consumer died{system.logs()}"
    check_exactly_once(system, pub.per_user(system.events))
