"""The store on a real Redis Cluster of three masters: layout, commit steps, crash points,
and the whole system (two consumers and the aggregator) with a master killed under it.

Why a real cluster: the guarantees rest on how a cluster routes keys to slots, refuses a
script whose keys cross slots and stops when a master dies. The crash points are injected
between the commit's steps (:attr:`metarec.services.cluster_store.ClusterCommit.crash_point`), and
the batch is then consumed again with other boundaries, as a new owner would.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis.cluster import RedisCluster

from metarec.core.events import Event
from metarec.core.learner import Learner
from metarec.core.reptile import PartialSums
from metarec.core.trending import Channel
from metarec.core.user_state import UserState, count_guard
from metarec.errors import ConfigError, PendingBatch, StaleOffset, UserConflict
from metarec.services.cluster_store import ClusterStore
from metarec.services.store import RedisStore
from tests.redis_cluster import LocalCluster, free_ports, start_cluster

if TYPE_CHECKING:
    from tests.consumer.system import System

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOPIC = "ev"
LOG_ID = "log-1"
#: A half-life so long that the counts do not decay within a test: each event adds 1.
CHANNELS = (Channel("all", 1e12),)
#: How long the stall test keeps a master stopped, and how soon a consumer must say so
#: (a single Redis's ERROR comes after the 5 s socket timeout; the margin is for a busy
#: machine and the cluster's own failure detection).
STALL_S = 20.0
REPORTED_WITHIN_S = 12.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    handle = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def store(cluster: LocalCluster) -> Iterator[ClusterStore]:
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    made = RedisStore.connect(cluster.url, prefix)
    assert isinstance(made, ClusterStore)
    made.rebase_offsets(TOPIC, None, LOG_ID, {})  # what a consumer's first topic check does
    yield made
    for key in made.cluster_client.scan_iter(match=f"{prefix}*"):
        made.cluster_client.delete(key)


# -- layout ----------------------------------------------------------------------------------


def test_a_users_keys_share_a_slot_and_shared_groups_each_have_one(store: ClusterStore) -> None:
    slot = RedisCluster.keyslot
    client: Any = store.cluster_client
    for user in ("alice", "}starts-with-a-brace", "a{b}c", "ünï"):
        kinds = {slot(client, store.key(k, user)) for k in ("user", "recs", "profile", "done")}
        assert len(kinds) == 1, user
    assert store.recs_key("alice") == f"{store.prefix}recs:{{u:alice}}"
    spread = {slot(client, store.recs_key(f"user-{i}")) for i in range(200)}
    assert len(spread) > 150  # users spread over the slots
    groups = {
        "stream": [
            store.key("offset", TOPIC, 0),
            store.key("offset", TOPIC, 7),
            store.key("topic-id", TOPIC),
            store.key("pending", TOPIC, 0),
            store.key("trend", "meta"),
            store.key("trend", "all"),
            store.key("partials", TOPIC, 3),
            store.key("partials", "index"),
        ],
        "items": [
            store.key("items", "index"),
            store.key("items", "next"),
            store.key("items", "meta"),
        ],
        "model": [
            store.key("model", "seq"),
            store.key("model", "current"),
            store.key("model", "versions"),
            store.key("model", 5, "chunk", 2),
        ],
        "consumers": [store.key("consumer", "g", "m1"), store.key("consumers", "g")],
        "aggregate": [store.key("aggregate", "request"), store.key("aggregate", "floor")],
    }
    for name, keys in groups.items():
        assert len({slot(client, k) for k in keys}) == 1, name
        assert all(k.startswith(store.prefix) for k in keys)  # an ACL on the prefix holds


def test_a_prefix_with_a_brace_is_refused(cluster: LocalCluster) -> None:
    with pytest.raises(ConfigError, match="brace"):
        RedisStore.connect(cluster.url, "bad{x}:")


def test_an_unreachable_cluster_is_one_clear_error() -> None:
    with pytest.raises(Exception, match="METAREC_REDIS_URL did not answer"):
        RedisStore.connect("redis+cluster://127.0.0.1:1", "x:")


def test_a_url_a_cluster_client_can_never_use_is_a_config_error_not_an_outage(
    redis_url: str,
) -> None:
    # A standalone Redis named as a cluster, and a database number: waiting cannot help.
    host_port = redis_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    for url in (f"redis+cluster://{host_port}", f"redis+cluster://{host_port}/1"):
        with pytest.raises(ConfigError, match="METAREC_REDIS_URL"):
            RedisStore.connect(url, "x:")


def test_a_cluster_still_forming_is_waited_for_and_a_refusal_is_not() -> None:
    from redis.exceptions import RedisClusterException

    from metarec.services.cluster_store import _unreachable

    forming = RedisClusterException(
        "All slots are not covered after query all startup_nodes. 5461 of 16384 covered..."
    )
    down = RedisClusterException(
        "Redis Cluster cannot be connected. Please provide at least "
        "one reachable node: Error 111 connecting to 127.0.0.1:1."
    )
    standalone = RedisClusterException(
        "Redis Cluster cannot be connected. Please provide at "
        "least one reachable node: Cluster mode is not enabled "
        "on this node"
    )
    assert _unreachable(forming) and _unreachable(down) and not _unreachable(standalone)


# -- the commit's steps -----------------------------------------------------------------------


def partials_of(weights: dict[int, float]) -> PartialSums:
    out = PartialSums.zeros(1, 2)
    out.add([0] * len(weights), [[1.0, -1.0]] * len(weights), list(weights.values()))
    return out


def test_a_commit_writes_everything_and_a_zombie_changes_nothing(store: ClusterStore) -> None:
    store.check_access()
    states = {f"u{i}": UserState.new(2, 3).to_bytes() for i in range(40)}
    recs = {u: json.dumps({"user": u}).encode() for u in states}
    assert (
        store.commit_batch(
            TOPIC,
            0,
            None,
            10,
            states=states,
            recs=recs,
            recs_ttl_s=60,
            partials=partials_of({0: 1.0}),
            events=10,
            trending=[{3: 1.0}],
            channels=CHANNELS,
            topic_id=LOG_ID,
        )
        == 10
    )
    assert store.offsets(TOPIC, [0, 1]) == {0: 10, 1: None}
    assert store.read_recs("u7") == {"user": "u7"}
    assert store.cluster_client.ttl(store.recs_key("u7")) > 0
    assert store.applied_offsets(TOPIC, 0, ["u7", "nobody"], LOG_ID) == {"u7": 10, "nobody": 0}
    assert store.applied_offsets(TOPIC, 0, ["u7"], "another-log") == {"u7": 0}
    before = {
        k: store.cluster_client.dump(k)
        for k in store.cluster_client.scan_iter(match=f"{store.prefix}*")
    }
    with pytest.raises(StaleOffset):
        store.commit_batch(
            TOPIC,
            0,
            5,
            20,
            states={"u1": b"zombie"},
            recs={},
            recs_ttl_s=0,
            partials=partials_of({0: 9.0}),
            events=10,
            trending=[{3: 9.0}],
            channels=CHANNELS,
            topic_id=LOG_ID,
        )
    after = {
        k: store.cluster_client.dump(k)
        for k in store.cluster_client.scan_iter(match=f"{store.prefix}*")
    }
    assert after == before
    # A refresh rewrites lists without consuming, fenced by the offset as well.
    store.commit_batch(
        TOPIC,
        0,
        10,
        10,
        states={},
        recs={"u1": b'{"v":2}'},
        recs_ttl_s=0,
        partials=None,
        topic_id=LOG_ID,
    )
    assert store.read_recs("u1") == {"v": 2}
    with pytest.raises(StaleOffset):
        store.commit_batch(
            TOPIC,
            0,
            9,
            9,
            states={},
            recs={"u1": b"old"},
            recs_ttl_s=0,
            partials=None,
            topic_id=LOG_ID,
        )
    assert store.read_recs("u1") == {"v": 2}


def test_a_state_ttl_expires_a_users_state_and_applied_offsets_together(
    store: ClusterStore,
) -> None:
    client = store.cluster_client
    state = UserState.new(2, 3).to_bytes()
    store.commit_batch(
        TOPIC,
        0,
        None,
        4,
        states={"u": state},
        recs={"u": b"{}"},
        recs_ttl_s=0,
        state_ttl_s=86_400,
        partials=None,
        events=4,
        topic_id=LOG_ID,
    )
    assert 86_000 < client.ttl(store.key("user", "u")) <= 86_400
    # The applied offsets go with the state: a user seen again starts afresh, and a
    # replay within the TTL still finds them.
    assert 86_000 < client.ttl(store.key("done", "u")) <= 86_400
    assert client.ttl(store.recs_key("u")) == -1
    store.commit_batch(
        TOPIC,
        0,
        4,
        6,
        states={"u": state},
        recs={},
        recs_ttl_s=0,
        partials=None,
        events=2,
        topic_id=LOG_ID,
    )
    assert client.ttl(store.key("user", "u")) == -1


def test_a_failed_guard_writes_the_others_and_the_redo_skips_them(store: ClusterStore) -> None:
    loaded = {u: UserState.new(2, 3) for u in ("a", "b")}
    store.commit_batch(
        TOPIC,
        1,
        None,
        5,
        states={u: s.to_bytes() for u, s in loaded.items()},
        recs={},
        recs_ttl_s=0,
        partials=None,
        topic_id=LOG_ID,
    )
    other = UserState.new(2, 3)
    other.n_events = 4
    store.commit_batch(
        TOPIC,
        2,
        None,
        1,
        states={"b": other.to_bytes()},
        recs={},
        recs_ttl_s=0,
        partials=None,
        guards={"b": count_guard(loaded["b"])},
        topic_id=LOG_ID,
    )
    new = {u: UserState.new(2, 3) for u in ("a", "b")}
    for s in new.values():
        s.n_events = 1
    with pytest.raises(UserConflict) as info:
        store.commit_batch(
            TOPIC,
            1,
            5,
            9,
            states={u: s.to_bytes() for u, s in new.items()},
            recs={},
            recs_ttl_s=0,
            partials=None,
            events=4,
            trending=[{1: 4.0}],
            channels=CHANNELS,
            guards={u: count_guard(s) for u, s in loaded.items()},
            topic_id=LOG_ID,
        )
    assert info.value.users == ["b"]
    assert store.applied_offsets(TOPIC, 1, ["a", "b"], LOG_ID) == {"a": 9, "b": 5}
    assert store.offsets(TOPIC, [1]) == {1: 5}  # not moved while a user is missing
    redo = UserState.new(2, 3)
    redo.n_events = 5
    store.commit_batch(
        TOPIC,
        1,
        5,
        9,
        states={"b": redo.to_bytes()},
        recs={},
        recs_ttl_s=0,
        partials=None,
        events=4,
        trending=[{1: 4.0}],
        channels=CHANNELS,
        guards={"b": count_guard(other)},
        topic_id=LOG_ID,
    )
    assert store.offsets(TOPIC, [1]) == {1: 9}
    # The redo added the batch's trending counts once, not twice.
    assert store.trending(2, CHANNELS).counts(2)[0].tolist() == pytest.approx([0.0, 4.0])


class Replayer:
    """What a consumer does with one partition's batch, in miniature: load the states, then
    the applied offsets; adapt each user to its events at or past its mark (here: count
    them); commit; on :class:`PendingBatch` return where the batch must end."""

    def __init__(
        self,
        store: ClusterStore,
        events: list[tuple[str, int]],
        *,
        topic: str = TOPIC,
        log_id: str = LOG_ID,
        new_state: Callable[[], UserState] = lambda: UserState.new(2, 3),
    ) -> None:
        self.store = store
        self.events = events
        self.topic = topic
        self.log_id = log_id
        self.new_state = new_state

    def batch(self, lo: int, hi: int) -> int | None:
        store = self.store
        expected = store.offsets(self.topic, [0])[0]
        assert (expected or 0) == lo
        pairs = [(off, *self.events[off]) for off in range(lo, hi)]
        users = list(dict.fromkeys(u for _, u, _ in pairs))
        while True:
            raw, _ = store.load_users(users)
            marks = store.applied_offsets(self.topic, 0, users, self.log_id)
            loaded = {
                u: None if b is None else UserState.from_bytes(b)
                for u, b in zip(users, raw, strict=True)
            }
            guards = {u: count_guard(s) for u, s in loaded.items()}
            new: dict[str, UserState] = {}
            trend: Counter[int] = Counter()
            applied: Counter[str] = Counter()
            for off, user, item in pairs:
                if off < marks[user]:
                    continue
                state = new.setdefault(user, loaded[user] or self.new_state())
                state.record(item, 1.0, off, "d")
                trend[item] += 1
                applied[user] += 1
            partials = PartialSums.zeros(1, 2)
            if applied:
                partials.add(
                    [0] * len(applied),
                    [[1.0, 0.0]] * len(applied),
                    [float(n) for n in applied.values()],
                )
            try:
                store.commit_batch(
                    self.topic,
                    0,
                    expected,
                    hi,
                    states={u: s.to_bytes() for u, s in new.items()},
                    recs={
                        u: json.dumps({"user": u, "events": s.n_events}).encode()
                        for u, s in new.items()
                    },
                    recs_ttl_s=0,
                    partials=partials if applied else None,
                    events=sum(applied.values()),
                    trending=[dict(trend)],
                    channels=CHANNELS,
                    guards=guards,
                    topic_id=self.log_id,
                )
            except PendingBatch as exc:
                return exc.pending
            except UserConflict:
                continue
            return None

    def drain(self, sizes: list[int]) -> None:
        """Consume to the end with these batch sizes (cycled), honouring pending ends."""
        cut: int | None = None
        n = 0
        while (start := self.store.offsets(self.topic, [0])[0] or 0) < len(self.events):
            hi = min(len(self.events), start + sizes[n % len(sizes)])
            if cut is not None:
                hi = min(hi, cut)
            found = self.batch(start, hi)
            cut = found if found is not None else (None if cut is None or hi >= cut else cut)
            n += 1


class Crash(Exception):
    """Raised between two steps of a commit: the process died there."""


def crash_at(store: ClusterStore, step: str) -> None:
    def point(at: str) -> None:
        if at == step:
            raise Crash(step)

    store.steps.crash_point = point


def crash_after_half_the_users(store: ClusterStore) -> None:
    run = store.steps._run_users

    def half(calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        run(calls[: len(calls) // 2])
        raise Crash("users")

    store.steps._run_users = half  # type: ignore[method-assign]


@pytest.mark.parametrize("where", ["begun", "half the users", "users", "end (reply lost)"])
def test_a_crash_between_steps_neither_loses_nor_doubles_an_event(
    store: ClusterStore, where: str
) -> None:
    rng = random.Random(where)
    users = [f"u{i}" for i in range(25)]
    events = [(rng.choice(users), rng.randrange(50)) for _ in range(300)]
    replayer = Replayer(store, events)
    assert replayer.batch(0, 40) is None
    assert store.offsets(TOPIC, [0]) == {0: 40}
    if where == "half the users":
        crash_after_half_the_users(store)
    elif where != "end (reply lost)":
        crash_at(store, where)
    with contextlib.suppress(Crash):
        replayer.batch(40, 130)
    if where == "end (reply lost)":
        # The commit went through and its reply was lost: the retry finds the offset moved
        # to its own end, which the consumer reads as "already written".
        with pytest.raises(StaleOffset) as info:
            store.commit_batch(
                TOPIC,
                0,
                40,
                130,
                states={},
                recs={},
                recs_ttl_s=0,
                partials=None,
                events=90,
                trending=[{1: 90.0}],
                channels=CHANNELS,
                topic_id=LOG_ID,
            )
        assert info.value.stored == 130
    # A new owner: a fresh store (no crash points), other batch sizes.
    again = ClusterStore(store.cluster_client, store.prefix)
    assert again.offsets(TOPIC, [0])[0] in (40, 130)
    Replayer(again, events).drain([55, 13, 200])
    assert again.offsets(TOPIC, [0]) == {0: len(events)}
    per_user = Counter(u for u, _ in events)
    raw, _ = again.load_users(users)
    counts = {
        u: UserState.from_bytes(b).n_events
        for u, b in zip(users, raw, strict=True)
        if b is not None
    }
    assert counts == {u: per_user[u] for u in users if per_user[u]}
    for u in users:
        rec = again.read_recs(u)
        assert rec is not None and rec["events"] == per_user[u]
    trend = again.trending(50, CHANNELS).counts(50)[0]
    assert trend.tolist() == pytest.approx([sum(1 for _, i in events if i == k) for k in range(50)])
    [partials] = again.take_partials(TOPIC)
    assert float(partials.weights.sum()) == pytest.approx(len(events))
    assert again.cluster_client.get(again.key("pending", TOPIC, 0)) is None


def test_a_rebase_clears_the_pending_batch_and_old_marks_mean_nothing(store: ClusterStore) -> None:
    events = [("u1", 1)] * 10
    crash_at(store, "users")
    with pytest.raises(Crash):
        Replayer(store, events).batch(0, 10)
    assert store.cluster_client.get(store.key("pending", TOPIC, 0)) == b"10"
    assert not store.rebase_offsets(TOPIC, None, "log-2", {0: 0})  # not the id seen
    assert store.rebase_offsets(TOPIC, LOG_ID, "log-2", {0: 0})
    assert store.cluster_client.get(store.key("pending", TOPIC, 0)) is None
    assert store.applied_offsets(TOPIC, 0, ["u1"], "log-2") == {"u1": 0}


# -- the whole system -----------------------------------------------------------------------


def test_a_consumer_finishes_a_batch_a_crashed_one_left_half_written(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Callable[..., str],
    store: ClusterStore,
) -> None:
    from confluent_kafka import TopicCollection

    from tests.consumer.system import Publisher, System, check_exactly_once

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    cluster_url = store.cluster_client.get_default_node()
    system = System(
        bootstrap=kafka_bootstrap,
        redis_url=f"redis+cluster://{cluster_url.host}:{cluster_url.port}",
        prefix=store.prefix,
        group=f"g-{uuid.uuid4().hex[:8]}",
        events=make_topic(1),
        items=make_topic(1),
        users=make_topic(1),
        dlq=make_topic(1),
        model=make_topic(1),
        partitions=1,
        store=store,
        log_dir=log_dir,
    )
    pub = Publisher(kafka_bootstrap)
    users = [f"u{i}" for i in range(30)]
    events = [(users[n % 30], n % 7) for n in range(300)]
    for user, item in events:
        pub.send_event(system.events, Event(user, f"i{item}", "click", int(time.time() * 1000)))
    pub.flush()
    # A consumer died half-way through writing the users of the batch [0, 120): the
    # shared effects are written, half the users are, the offset is not.
    described = kafka_admin.describe_topics(TopicCollection([system.events]))
    log_id = str(described[system.events].result(timeout=10).topic_id)
    assert store.rebase_offsets(system.events, None, log_id, {})
    store.item_indices([f"i{k}" for k in range(7)], ["default"] * 7)
    crash_after_half_the_users(store)
    with pytest.raises(Crash):
        Replayer(
            store,
            events,
            topic=system.events,
            log_id=log_id,
            new_state=Learner.from_settings(system.settings()).new_state,
        ).batch(0, 120)
    assert store.offsets(system.events, [0]) == {0: None}
    try:
        proc = system.start()
        system.wait_applied(pub.ends(system.events), timeout=60)
        check_exactly_once(system, Counter(u for u, _ in events))
        assert "batch cut" in (log_dir / "proc-0.log").read_text(), system.logs()
        assert store.trending(7, CHANNELS).clock == len(events)
        assert proc.poll() is None
    finally:
        system.close()


def test_a_consumer_started_before_its_cluster_waits_for_it(
    tmp_path: Path, kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    from tests.consumer.system import Publisher, System, check_exactly_once

    ports = free_ports(3)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    system = System(
        bootstrap=kafka_bootstrap,
        redis_url=f"redis+cluster://127.0.0.1:{ports[0]}",
        prefix=f"t{uuid.uuid4().hex[:6]}:",
        group=f"g-{uuid.uuid4().hex[:8]}",
        events=make_topic(2),
        items=make_topic(1),
        users=make_topic(1),
        dlq=make_topic(1),
        model=make_topic(1),
        partitions=2,
        store=None,  # type: ignore[arg-type]  # set once the cluster is up
        log_dir=log_dir,
    )
    pub = Publisher(kafka_bootstrap)
    events = [(f"u{n % 20}", n % 9) for n in range(200)]
    for user, item in events:
        pub.send_event(system.events, Event(user, f"i{item}", "click", int(time.time() * 1000)))
    pub.flush()
    cluster = None
    try:
        proc = system.start()
        log = log_dir / "proc-0.log"
        deadline = time.monotonic() + 30
        while "unavailable; retrying" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, system.logs()
            time.sleep(0.1)
        time.sleep(2)  # still waiting, not exited
        assert proc.poll() is None, system.logs()
        cluster = start_cluster(tmp_path / "late", ports=ports)
        system.store = RedisStore.connect(cluster.url, system.prefix)
        system.wait_applied(pub.ends(system.events), timeout=60)
        check_exactly_once(system, Counter(u for u, _ in events))
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        errors = [x for x in lines if x.get("level") == "ERROR"]
        assert len(errors) == 1 and "METAREC_REDIS_URL" in json.dumps(errors[0]), errors
        assert any("answers again" in x.get("msg", "") for x in lines), system.logs()
        assert proc.poll() is None
    finally:
        system.close()
        if cluster is not None:
            cluster.stop()


def test_sigkilled_consumers_on_a_cluster_apply_every_event_exactly_once(
    tmp_path: Path, kafka_bootstrap: str, make_topic: Callable[..., str], store: ClusterStore
) -> None:
    from tests.consumer.system import (
        FAST_GROUP,
        Background,
        Publisher,
        System,
        check_exactly_once,
        make_model,
        publish_paced,
        stream,
        wait_until,
    )

    node = store.cluster_client.get_default_node()
    system = System(
        bootstrap=kafka_bootstrap,
        redis_url=f"redis+cluster://{node.host}:{node.port}",
        prefix=store.prefix,
        group=f"g-{uuid.uuid4().hex[:8]}",
        events=make_topic(2),
        items=make_topic(1),
        users=make_topic(1),
        dlq=make_topic(1),
        model=make_topic(1),
        partitions=2,
        store=store,
        log_dir=tmp_path,
        extra_env=dict(FAST_GROUP),
    )
    events = stream(seed=13, limit=1500)
    # A model first, so that every applied event also lands in the partial sums.
    store.publish_model(
        make_model(sorted({e.item for e in events}), sorted({e.domain for e in events})).to_bytes()
    )
    pub = Publisher(kafka_bootstrap)
    replay = Background(lambda: publish_paced(pub, system.events, events, rate=150.0))
    rng = random.Random(7)
    replay.start()
    try:
        for kill in range(3):
            proc = system.start()
            before = system.applied()
            wait_until(
                lambda before=before: system.applied() > before,
                60.0,
                f"consumer {kill + 1} to apply events",
                system.logs,
                interval=0.05,
                procs=[proc],
            )
            time.sleep(rng.uniform(0.0, 0.5))  # a random moment of its work
            system.kill(proc)
        final = system.start()
    finally:
        replay.result(timeout=120)
    system.wait_applied(pub.ends(system.events), timeout=60)
    assert final.poll() is None, system.logs()
    per_user = pub.per_user(system.events)
    check_exactly_once(system, per_user)
    weight = sum(float(p.weights.sum()) for p in store.take_partials(system.events))
    assert weight == pytest.approx(len(events), abs=1e-6), (weight, len(events))
    assert store.trending(1, CHANNELS).clock == len(events)
    for p in range(2):
        assert store.cluster_client.get(store.key("pending", system.events, p)) is None


def test_consumers_and_the_aggregator_on_a_cluster_apply_every_event_once_and_a_dead_master_is_reported(  # noqa: E501
    tmp_path: Path, kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    from tests.consumer.system import (
        Publisher,
        check_exactly_once,
        check_list,
        owned,
        stream,
        wait_until,
    )

    cluster = start_cluster(tmp_path / "cluster")  # its own: a master of it is killed
    system = _system_on_cluster(
        cluster,
        tmp_path,
        kafka_bootstrap,
        make_topic,
        METAREC_REDIS_RETRY_S="4",
        METAREC_MIN_EVENTS_FOR_MODEL="600",
    )
    store, prefix, log_dir = system.store, system.prefix, system.log_dir
    events = stream(seed=5, limit=1500)
    first, second = events[:1000], events[1000:]
    try:
        consumers = [system.start(), system.start()]
        aggregator = system.start(["-m", "metarec.cli", "aggregate"])
        procs = [*consumers, aggregator]
        wait_until(
            lambda: owned(system, consumers) == [0, 1],
            40.0,
            "two consumers to own the two partitions",
            lambda: f"{system.heartbeat_partitions(consumers)}{system.logs()}",
            procs=procs,
        )
        pub = Publisher(kafka_bootstrap)
        for e in first:
            pub.send_event(system.events, e)
        pub.flush()
        system.wait_applied(pub.ends(system.events), timeout=60)
        check_exactly_once(system, pub.per_user(system.events))
        wait_until(
            lambda: (
                all(b.get("model_version") for b in system.store.heartbeats(system.group).values())
                and len(system.store.heartbeats(system.group)) == 2
            ),
            60.0,
            "a model version published and loaded by both consumers",
            system.logs,
            procs=procs,
        )
        now = int(time.time() * 1000)
        for n, e in enumerate(second):
            pub.send_event(system.events, Event(e.user, e.item, e.type, now + n, e.domain))
        pub.flush()
        system.wait_applied(pub.ends(system.events), timeout=60)
        per_user = pub.per_user(system.events)
        check_exactly_once(system, per_user)
        catalog = {e.item for e in events}
        for user in sorted({e.user for e in second})[:50]:
            check_list(
                system,
                user,
                events=per_user[user],
                catalog=catalog,
                consumed={e.item for e in events if e.user == user},
                top_k=20,
            )
        assert system.store.current_model_version() is not None
        # The operator commands work on the cluster as they do on one Redis.
        from tests.services.test_operations import metarec

        user = second[0].user
        seen = metarec(system, "recs", user)
        assert seen["key"] == f"{prefix}recs:{{u:{user}}}" == store.recs_key(user)
        assert seen["recs"]["user"] == user and seen["state"]["events"] == per_user[user]
        assert metarec(system, "model", "list")[0]["current"]
        assert metarec(system, "user", "reset", "nobody-at-all") == {
            "user": "nobody-at-all",
            "reset": False,
        }
        assert all(
            key.startswith(prefix.encode())
            for key in store.cluster_client.scan_iter(match=f"{prefix}*")
        )

        # One master dies (no replica to take over): the cluster stops taking commands.
        cluster.kill(2)
        for n in range(200):
            pub.send_event(
                system.events,
                Event(f"late-{n % 20}", "late-item", "click", int(time.time() * 1000)),
            )
        pub.flush()
        for c in consumers:
            try:
                c.wait(timeout=40)
            except Exception:
                pytest.fail(f"consumer {c.pid} still runs 40 s after a master died{system.logs()}")
        for c in consumers:
            assert c.returncode == 1, system.logs()
            text = (log_dir / f"proc-{system.procs.index(c)}.log").read_text()
            lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            fatal = [r for r in lines if r["level"] == "CRITICAL"]
            assert len(fatal) == 1, lines[-5:]
            assert "METAREC_REDIS_URL" in fatal[0]["error"], fatal[0]
            assert any(
                cause in fatal[0]["error"]
                for cause in ("ClusterDownError", "ConnectionError", "SlotNotCovered")
            ), fatal[0]
        # No state is corrupt: every one the live masters hold decodes, and none counts
        # more events than were published for its user.
        per_user = pub.per_user(system.events)
        reader = RedisCluster(host="127.0.0.1", port=cluster.ports[0], socket_timeout=2)
        live = [n for n in reader.get_primaries() if n.port != cluster.ports[2]]
        checked = 0
        for node in live:
            client: Any = reader.get_redis_connection(node)
            for key in client.scan_iter(match=f"{prefix}user:*", count=500):
                user = key.decode()[len(prefix) + len("user:{u:") : -1]
                state = UserState.from_bytes(client.get(key))
                assert 0 < state.n_events <= per_user[user], (user, state.n_events)
                checked += 1
        assert checked > 0
    finally:
        system.close()
        cluster.stop()


def test_a_pipeline_to_a_stalled_master_fails_within_one_socket_timeout(tmp_path: Path) -> None:
    """redis-py's cluster pipeline re-sends each timed-out command on its own, with
    retries: a read of 120 users on a stopped master waited minutes without an error, so the
    outage policy never heard of the stall. One socket timeout, then the error."""
    from redis.exceptions import TimeoutError as RedisTimeout

    from metarec.services.store import SOCKET_TIMEOUT_S

    cluster = start_cluster(tmp_path / "cluster")
    done: list[tuple[str, float]] = []
    try:
        store = RedisStore.connect(cluster.url, "stall:")
        users = [f"u{i}" for i in range(120)]
        assert store.load_users(users)[0] == [None] * len(users)  # connections made
        cluster.pause(2)

        def read() -> None:
            started = time.monotonic()
            try:
                store.load_users(users)
                done.append(("answered", time.monotonic() - started))
            except RedisTimeout:
                done.append(("timed out", time.monotonic() - started))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(SOCKET_TIMEOUT_S + 10.0)
        assert done, f"no answer and no error {SOCKET_TIMEOUT_S + 10:g} s into the stall"
        outcome, seconds = done[0]
        assert outcome == "timed out" and seconds < SOCKET_TIMEOUT_S + 3.0, done
    finally:
        cluster.resume(2)
        cluster.stop()


def test_a_stalled_master_is_reported_like_a_redis_outage_and_nothing_is_lost(
    tmp_path: Path, kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    """A master stops answering (SIGSTOP) for 20 s: each consumer says so with an ERROR
    within seconds, as on a single Redis, says when it is back, and applies every event
    exactly once."""
    from tests.consumer.system import (
        Publisher,
        check_exactly_once,
        owned,
        stream,
        wait_until,
    )

    cluster = start_cluster(tmp_path / "cluster")  # its own: a master of it is stalled
    system = _system_on_cluster(cluster, tmp_path, kafka_bootstrap, make_topic)
    log_dir = system.log_dir
    events = stream(seed=6, limit=1200)
    try:
        consumers = [system.start(), system.start()]
        wait_until(
            lambda: owned(system, consumers) == [0, 1],
            40.0,
            "two consumers to own the two partitions",
            procs=consumers,
        )
        pub = Publisher(kafka_bootstrap)
        for e in events[:600]:
            pub.send_event(system.events, e)
        pub.flush()
        system.wait_applied(pub.ends(system.events), timeout=60)
        cluster.pause(2)
        stalled = time.time()
        try:
            for e in events[600:]:
                pub.send_event(system.events, e)
            pub.flush()
            time.sleep(STALL_S)
        finally:
            cluster.resume(2)
        system.wait_applied(pub.ends(system.events), timeout=90)
        check_exactly_once(system, pub.per_user(system.events))
        assert all(c.poll() is None for c in consumers), system.logs()
        for c in consumers:
            text = (log_dir / f"proc-{system.procs.index(c)}.log").read_text()
            lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            down = [r for r in lines if r["level"] == "ERROR" and "unavailable" in r["msg"].lower()]
            assert down, [r["msg"] for r in lines if r["level"] != "INFO"][-10:]
            said = _seconds(down[0]["ts"]) - stalled
            assert said < REPORTED_WITHIN_S, f"the outage was reported {said:.1f} s after the stall"
            back = [r for r in lines if r["level"] == "WARNING" and "again" in r["msg"]]
            assert back and _seconds(back[-1]["ts"]) > _seconds(down[0]["ts"]), lines[-5:]
    finally:
        system.close()
        cluster.stop()


def _system_on_cluster(
    cluster: LocalCluster,
    tmp_path: Path,
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    **extra_env: str,
) -> System:
    """A deployment on ``cluster`` with topics of its own (2 event partitions)."""
    from tests.consumer.system import System

    prefix = f"sys-{uuid.uuid4().hex[:6]}:"
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    return System(
        bootstrap=kafka_bootstrap,
        redis_url=cluster.url,
        prefix=prefix,
        group=f"g-{uuid.uuid4().hex[:8]}",
        events=make_topic(2),
        items=make_topic(1),
        users=make_topic(1),
        dlq=make_topic(1),
        model=make_topic(1),
        partitions=2,
        store=RedisStore.connect(cluster.url, prefix),
        log_dir=log_dir,
        extra_env=extra_env,
    )


def _seconds(ts: str) -> float:
    """A log line's ``ts`` (ISO 8601, UTC) as a Unix time."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_the_read_client_finds_lists_and_fallbacks_across_the_cluster(
    store: ClusterStore, cluster: LocalCluster
) -> None:
    from metarec.client import Recommendations

    users = [f"reader-{i}" for i in range(30)]  # spread over all three masters' slots
    for i, user in enumerate(users[:20]):
        store.cluster_client.set(
            store.recs_key(user),
            json.dumps(
                {
                    "user": user,
                    "items": [f"i{i}"],
                    "scores": [1.0],
                    "model_version": 1,
                    "events": 1,
                    "updated_ms": 5,
                }
            ).encode(),
        )
    store.write_fallbacks(
        {
            "default": json.dumps(
                {
                    "domain": "default",
                    "items": ["top"],
                    "scores": [0.5],
                    "model_version": 1,
                    "updated_ms": 6,
                }
            ).encode()
        },
        b'{"domain":null,"items":["anywhere"],"scores":[0.5],"model_version":1,"updated_ms":6}',
    )
    recs = Recommendations.from_url(cluster.url, prefix=store.prefix)
    assert recs.cluster
    got = {u: r for u, r in recs.get_many(users).items() if r is not None}
    assert list(got) == users
    assert [got[u].items for u in users[:20]] == [[f"i{i}"] for i in range(20)]
    assert {got[u].source for u in users[20:]} == {"fallback"}
    one = recs.get(users[3])
    assert one is not None and one.user == users[3] and one.source == "user"
    elsewhere = recs.get(users[25], domain="nowhere")
    assert elsewhere is not None and (elsewhere.items, elsewhere.domain) == (["anywhere"], None)
