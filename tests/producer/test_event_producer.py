"""EventProducer against the real local broker: validation first, keys, contract, delivery."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from metarec.config import Settings
from metarec.core.events import Event, ItemRecord, UserRecord
from metarec.errors import ConfigError, InvalidEvent
from producer import DeliveryError, EventProducer
from tests.kafka_read import drain

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow


@pytest.fixture
def topics(make_topic: Callable[..., str]) -> Settings:
    """Settings whose three input topics are fresh, with 3 partitions each."""
    return Settings.from_env(
        {},
        {
            "events_topic": make_topic(partitions=3),
            "items_topic": make_topic(partitions=3),
            "users_topic": make_topic(partitions=3),
        },
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"user": "", "item": "i1"}, "'user'"),
        ({"user": "u1", "item": " i1"}, "'item'"),
        ({"user": "u1", "item": "i1", "type": "purchase"}, "expected one of"),
        ({"user": "u1", "item": "i1", "ts": -5}, "negative"),
        ({"user": "u1", "item": "i1", "ts": 2**62}, "future"),
        ({"user": "u\x00", "item": "i1"}, "control"),
        ({"user": "u" * 300, "item": "i1"}, "longer than"),
        ({"user": "u1", "item": "i1", "domain": ""}, "'domain'"),
    ],
)
def test_invalid_events_raise_before_anything_is_sent(
    kafka_bootstrap: str,
    topics: Settings,
    kwargs: dict[str, object],
    message: str,
) -> None:
    producer = EventProducer(topics, bootstrap=kafka_bootstrap)
    with pytest.raises(InvalidEvent, match=message):
        producer.send(**kwargs)  # type: ignore[arg-type]
    assert producer.sent == 0
    assert producer.pending == 0  # nothing reached librdkafka's queue
    producer.flush(timeout=10)


def test_invalid_records_of_every_kind_raise_before_sending(
    kafka_bootstrap: str,
    make_group_id: Callable[[], str],
    topics: Settings,
) -> None:
    producer = EventProducer(topics, bootstrap=kafka_bootstrap)
    with pytest.raises(InvalidEvent, match="'user'"):
        producer.send("", "i1")
    with pytest.raises(InvalidEvent, match="'type'"):
        producer.send_event(Event("u1", "i1", "view", 1_700_000_000_000))
    with pytest.raises(InvalidEvent, match="'features'"):
        producer.send_item(ItemRecord("i1", features=("",)))
    with pytest.raises(InvalidEvent, match="'user'"):
        producer.send_user(UserRecord(""))
    producer.flush(timeout=10)
    assert producer.sent == 0
    for topic in (topics.events_topic, topics.items_topic, topics.users_topic):
        assert drain(kafka_bootstrap, topic, make_group_id()) == []


def test_configured_event_types_are_the_ones_accepted(
    kafka_bootstrap: str,
    topics: Settings,
) -> None:
    settings = topics.replace(event_types="buy:3,click:1")
    producer = EventProducer(settings, bootstrap=kafka_bootstrap)
    with pytest.raises(InvalidEvent, match="buy, click"):
        producer.send("u1", "i1", type="like")
    assert producer.sent == 0


def test_undeliverable_records_make_flush_raise() -> None:
    # Nothing listens on port 1, so the record times out in the local queue.
    producer = EventProducer(
        Settings.from_env({}), bootstrap="127.0.0.1:1", config={"message.timeout.ms": 300}
    )
    producer.send("u1", "i1")
    with pytest.raises(DeliveryError, match=r"1 record.*failed.*'u1'"):
        producer.flush(timeout=10)
    producer.flush(timeout=1)  # reported once, then the producer is usable again


def test_flush_deadline_raises_with_the_count_left() -> None:
    producer = EventProducer(Settings.from_env({}), bootstrap="127.0.0.1:1")
    producer.send("u1", "i1")
    with pytest.raises(DeliveryError, match=r"1 record.*still undelivered.*127\.0\.0\.1:1"):
        producer.flush(timeout=0.2)


@pytest.mark.integration
def test_events_items_users_round_trip_with_contract_keys_and_values(
    kafka_bootstrap: str,
    make_group_id: Callable[[], str],
    topics: Settings,
) -> None:
    ts = int(time.time() * 1000)
    with EventProducer(topics, bootstrap=kafka_bootstrap) as producer:
        sent = [
            producer.send("u1", "i1", type="like", ts=ts, domain="books", event_id="e1"),
            producer.send("u2", "i2"),
            producer.send_event(Event("u1", "i3", "dislike", ts + 1)),
            producer.send("ü-ser", "i4", type="click", ts=ts + 2),
        ]
        item = producer.send_item(ItemRecord("i1", "books", ("genre:sf", "lang:en"), ts))
        user = producer.send_user(UserRecord("u1", ("age:25-34",), ts))
    assert producer.delivered == 6
    assert producer.failed == 0

    events = drain(kafka_bootstrap, topics.events_topic, make_group_id())
    assert len(events) == 4
    by_key: dict[bytes, list[dict[str, object]]] = {}
    partition_of: dict[bytes, int] = {}
    for msg in events:
        key = msg.key()
        value = msg.value()
        assert isinstance(key, bytes) and isinstance(value, bytes)
        body = json.loads(value.decode("utf-8"))
        assert body["user"].encode("utf-8") == key  # key = user id, UTF-8
        assert partition_of.setdefault(key, msg.partition() or 0) == (msg.partition() or 0)
        by_key.setdefault(key, []).append(body)
    assert by_key[b"u1"] == [
        {"user": "u1", "item": "i1", "type": "like", "ts": ts, "domain": "books", "event_id": "e1"},
        {"user": "u1", "item": "i3", "type": "dislike", "ts": ts + 1, "domain": "default"},
    ]  # one user's events arrive in the order sent
    assert by_key["ü-ser".encode()] == [sent[3].to_json()]
    u2 = by_key[b"u2"][0]
    assert set(u2) == {"user", "item", "type", "ts", "domain"}
    assert isinstance(u2["ts"], int) and abs(u2["ts"] - ts) < 60_000  # defaulted to now

    (item_msg,) = drain(kafka_bootstrap, topics.items_topic, make_group_id())
    assert item_msg.key() == b"i1"
    assert json.loads(item_msg.value() or b"") == {
        "item": "i1",
        "domain": "books",
        "features": ["genre:sf", "lang:en"],
        "ts": ts,
    }
    assert item == ItemRecord("i1", "books", ("genre:sf", "lang:en"), ts)
    (user_msg,) = drain(kafka_bootstrap, topics.users_topic, make_group_id())
    assert user_msg.key() == b"u1"
    assert json.loads(user_msg.value() or b"") == {
        "user": "u1",
        "features": ["age:25-34"],
        "ts": ts,
    }
    assert user.user == "u1"


@pytest.mark.integration
def test_a_full_local_queue_is_waited_out_not_dropped(
    kafka_bootstrap: str,
    make_group_id: Callable[[], str],
    topics: Settings,
) -> None:
    n = 300
    producer = EventProducer(
        topics, bootstrap=kafka_bootstrap, config={"queue.buffering.max.messages": 10}
    )
    with producer:
        for i in range(n):
            producer.send(f"u{i % 17}", f"i{i}")
    assert producer.sent == n
    assert producer.delivered == n
    assert len(drain(kafka_bootstrap, topics.events_topic, make_group_id())) == n


def test_pass_through_settings_reach_librdkafka() -> None:
    # A bad librdkafka value fails at construction: proof that it was passed through.
    settings = Settings.from_env({"METAREC_KAFKA_MESSAGE_MAX_BYTES": "lots"})
    with pytest.raises(ConfigError, match=r"METAREC_KAFKA_.*message\.max\.bytes"):
        EventProducer(settings)
