"""The events log watch, against the real broker and Redis: the group's lag counts every
partition, owned or not, and a recreated topic is recognised by its id and rebased once."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from consumer.topic_log import TopicLog
from metarec.errors import LogReplaced
from metarec.local.devservices import create_topics
from metarec.services.store import RedisStore
from tests.consumer.system import Publisher


def test_lag_counts_partitions_nobody_owns_and_a_recreated_topic_is_rebased_once(
    kafka_bootstrap: str,
    kafka_admin: AdminClient,
    make_topic: Callable[..., str],
    consumer_config: dict[str, str],
    redis_client: redis.Redis[bytes],
    key_prefix: str,
) -> None:
    topic = make_topic(2)
    pub = Publisher(kafka_bootstrap)
    for n in range(40):
        pub.send(topic, f"u{n}".encode(), b"{}")
        pub.flush()  # one record per batch: Tansu reports a log's end per batch
    ends = pub.ends(topic)
    store = RedisStore(redis_client, key_prefix)
    store.commit_batch(topic, 0, None, ends[0], states={}, recs={}, recs_ttl_s=0, partials=None)
    consumer = Consumer(consumer_config)  # subscribed to nothing: owns no partition
    watch = TopicLog(consumer, kafka_admin, store, topic)
    other = TopicLog(consumer, kafka_admin, store, topic, policy="skip")
    try:
        first = watch.check()
        assert first is not None and first.rebased == {}
        assert first.lag == {0: 0, 1: ends[1]}  # partition 1: nothing applied, nobody owns it
        assert store.topic_id(topic) is not None
        assert other.check() is not None  # a second member has seen the same log
        # The topic is deleted and created again, with fewer records than were applied.
        for future in kafka_admin.delete_topics([topic], operation_timeout=10).values():
            future.result(timeout=10)
        time.sleep(0.5)
        create_topics(kafka_bootstrap, {topic: 2})
        for _ in range(6):
            pub.send(topic, b"u1", b"{}")
            pub.flush()
        second = watch.check()
        assert second is not None
        assert second.rebased == {0: 0, 1: 0}  # replay: from the new log's start
        assert store.offsets(topic, [0, 1]) == {0: 0, 1: 0}
        assert sum(second.lag.values()) == 6 and watch.resets == 1
        # The other member finds the offsets rebased by the first: it re-reads them all,
        # and rebases nothing itself.
        third = other.check()
        assert third is not None and third.rebased == {0: 0, 1: 0} and other.resets == 0
        assert store.offsets(topic, [0, 1]) == {0: 0, 1: 0}
        # A commit made against the old log is refused.
        with pytest.raises(LogReplaced):
            store.commit_batch(
                topic,
                0,
                0,
                5,
                states={},
                recs={},
                recs_ttl_s=0,
                partials=None,
                topic_id="the-old-log",
            )
    finally:
        consumer.close()
