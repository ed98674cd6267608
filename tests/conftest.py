"""Shared fixtures: a real Tansu broker and a real Redis, with per-test names.

Why real services: the consumer's correctness rests on broker and Redis semantics (group
rebalances, offsets, MULTI/EXEC) that fakes would assume rather than check. The broker is
started once per session on a free port (it takes well under a second), memory-only, so
every run starts clean; Redis is the machine's own at 127.0.0.1:6379 when it answers,
otherwise a private server that :func:`metarec.local.devservices.ensure_redis` starts. Tests
never share names: topics, group ids and Redis key prefixes are random per test, and keys
under a test's prefix are deleted after it.

Tests that use the broker or Redis fixtures are marked ``integration`` automatically, so
``pytest -m "not integration"`` runs only the pure tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient

from metarec.local.devservices import (
    DEFAULT_REDIS_URL,
    LOCAL_GROUP_CONFIG,
    create_topics,
    ensure_redis,
    start_broker,
)

#: Fixtures that talk to a live service; a test using any of them is an integration test.
SERVICE_FIXTURES = frozenset(
    {
        "kafka_bootstrap",
        "kafka_admin",
        "make_topic",
        "consumer_config",
        "redis_url",
        "redis_client",
        "key_prefix",
    }
)
TEST_NAME_PREFIX = "metarec-test"
#: Keys deleted per round trip when cleaning up; bounded so one DEL never blocks Redis long.
_DELETE_CHUNK = 500


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker here as well, so the suite also runs outside the project root."""
    config.addinivalue_line(
        "markers", "integration: talks to the real local Tansu broker and Redis"
    )
    config.addinivalue_line(
        "markers", "slow: runs processes, brokers or training; left out of make test-fast"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a service fixture as ``integration``."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def unique_name(kind: str = "") -> str:
    """A fresh name for a topic, group or key prefix, recognisable as a test's."""
    middle = f"-{kind}" if kind else ""
    return f"{TEST_NAME_PREFIX}{middle}-{uuid.uuid4().hex[:12]}"


# --- Kafka (Tansu) ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bootstrap.servers`` of a fresh memory-only Tansu broker, one per session."""
    work: Path = tmp_path_factory.mktemp("tansu")
    broker = start_broker(None, work_dir=work, log_file=work / "tansu.log")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> AdminClient:
    """An admin client of the session's broker."""
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def make_topic(kafka_bootstrap: str, kafka_admin: AdminClient) -> Iterator[Callable[..., str]]:
    """Factory: ``make_topic(partitions=1)`` creates a new topic and returns its name.

    The topics are deleted after the test, which frees the broker's memory.
    """
    made: list[str] = []

    def make(partitions: int = 1) -> str:
        name = unique_name("topic")
        create_topics(kafka_bootstrap, {name: partitions})
        made.append(name)
        return name

    yield make
    if made:
        for future in kafka_admin.delete_topics(made, operation_timeout=10).values():
            future.exception(timeout=10)  # a failed delete must not fail the test


@pytest.fixture
def make_group_id() -> Callable[[], str]:
    """Factory of fresh consumer group ids."""
    return lambda: unique_name("group")


@pytest.fixture
def consumer_config(kafka_bootstrap: str) -> dict[str, str]:
    """A consumer config with a fresh group that joins fast on Tansu.

    Why the group timings: Tansu keeps a join phase open about half the session timeout,
    and librdkafka's 45 s default would add ~23 s to every test that subscribes.
    """
    return {
        "bootstrap.servers": kafka_bootstrap,
        "group.id": unique_name("group"),
        "auto.offset.reset": "earliest",
        "enable.auto.commit": "false",
        **LOCAL_GROUP_CONFIG,
    }


# --- Redis -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis that answers: the machine's, or one started for the session."""
    handle = ensure_redis(DEFAULT_REDIS_URL, work_dir=tmp_path_factory.mktemp("redis"))
    try:
        yield handle.url
    finally:
        handle.stop()  # only a server this session started; never the machine's own


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis[bytes]]:
    """A client of the session's Redis (bytes in, bytes out)."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis[bytes]) -> Iterator[str]:
    """A Redis key prefix of this test alone; every key under it is deleted afterwards."""
    prefix = f"{unique_name()}:"
    yield prefix
    batch: list[bytes] = []
    for key in redis_client.scan_iter(match=f"{prefix}*", count=_DELETE_CHUNK):
        batch.append(key)
        if len(batch) >= _DELETE_CHUNK:
            redis_client.delete(*batch)
            batch.clear()
    if batch:
        redis_client.delete(*batch)
