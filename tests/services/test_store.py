"""Integration tests of the Redis state store, against the real Redis of the conftest.

Why no fakes: the store's guarantees (all-or-nothing commits, fencing, atomic registration)
come from Redis executing Lua scripts atomically, which only a real server can show.
"""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest
import redis

from metarec.core.events import ItemRecord, UserRecord
from metarec.core.reptile import PartialSums
from metarec.core.trending import Channel, Trending
from metarec.core.user_state import UserState, count_guard
from metarec.errors import ConfigError, ModelError, StaleOffset, UserConflict
from metarec.services.store import RedisStore

TOPIC = "metarec.events"
CHANNELS = (Channel("1", 1.0), Channel("1000", 1000.0))


@pytest.fixture
def store(redis_client: redis.Redis[bytes], key_prefix: str) -> RedisStore:
    return RedisStore(redis_client, prefix=key_prefix)


def snapshot(client: redis.Redis[bytes], prefix: str) -> dict[bytes, tuple[bytes | None, bool]]:
    """Every key under ``prefix``: its DUMP (type and content) and whether it has a TTL."""
    return {
        key: (client.dump(key), client.ttl(key) > 0) for key in client.scan_iter(match=f"{prefix}*")
    }


def commit(
    store: RedisStore, expected: int | None, nxt: int, tag: str, *, partition: int = 0, ttl: int = 0
) -> int:
    """A batch touching every key type: states, recs, trending, partial sums, offset."""
    partials = PartialSums.zeros(2, 3)
    partials.add([1], [[0.5, -0.25, 2.0]], [2.0])
    return store.commit_batch(
        TOPIC,
        partition,
        expected,
        nxt,
        states={"u1": f"state-{tag}".encode(), "u2": b"\x00\xff" + tag.encode()},
        recs={"u1": json.dumps({"user": "u1", "items": [tag]}).encode()},
        recs_ttl_s=ttl,
        partials=partials,
        events=2,
        trending=[{3: 1.5, 7: 0.25}] * 2,
        channels=CHANNELS,
    )


# -- commit and fencing ------------------------------------------------------------------


def test_commit_applies_everything_and_moves_the_offset(
    store: RedisStore, redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    assert commit(store, None, 10, "a") == 2  # the trending clock: two events so far
    assert store.offsets(TOPIC, [0, 1]) == {0: 10, 1: None}
    states, profiles = store.load_users(["u1", "u2", "nobody"])
    assert states == [b"state-a", b"\x00\xffa", None]
    assert profiles == [None, None, None]
    assert store.read_recs("u1") == {"user": "u1", "items": ["a"]}
    trend = store.trending(8, CHANNELS)
    assert trend.clock == 2
    assert trend.counts(8).tolist() == [[0, 0, 0, 1.5, 0, 0, 0, 0.25]] * 2
    [part] = store.take_partials(TOPIC)
    assert part.weights.tolist() == [0.0, 2.0]
    assert part.sums.tolist() == [[0, 0, 0], [1.0, -0.5, 4.0]]


def test_a_zombie_batch_raises_and_changes_nothing(
    store: RedisStore, redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    commit(store, None, 10, "old-owner")
    commit(store, 10, 20, "new-owner", ttl=60)
    before = snapshot(redis_client, key_prefix)
    kinds = {k[len(key_prefix) :].split(b":")[0] for k in before}
    assert {b"user", b"recs", b"trend", b"partials", b"offset"} <= kinds
    with pytest.raises(StaleOffset) as info:
        commit(store, 10, 15, "zombie")
    assert all(s in str(info.value) for s in (TOPIC, "[0]", "10", "20"))
    with pytest.raises(StaleOffset):
        commit(store, None, 15, "zombie")  # "nothing stored" is stale too
    assert snapshot(redis_client, key_prefix) == before


def test_first_commit_with_none_only_when_no_offset_is_stored(store: RedisStore) -> None:
    with pytest.raises(StaleOffset, match="none"):
        commit(store, 5, 10, "a")  # the caller believes an offset exists; none does
    assert store.offsets(TOPIC, [0]) == {0: None}
    commit(store, None, 10, "a")
    assert store.offsets(TOPIC, [0]) == {0: 10}


def test_offsets_must_not_go_back_and_refresh_keeps_the_offset(store: RedisStore) -> None:
    commit(store, None, 10, "a")
    with pytest.raises(ValueError, match="before expected_offset"):
        commit(store, 10, 9, "b")
    store.commit_batch(
        TOPIC, 0, 10, 10, states={}, recs={"u1": b'{"v":2}'}, recs_ttl_s=0, partials=None
    )
    assert store.offsets(TOPIC, [0]) == {0: 10}
    assert store.read_recs("u1") == {"v": 2}
    commit(store, 10, 11, "c")  # the refresh did not move the fence


def user_state(n_events: int) -> UserState:
    state = UserState.new(dim=2, history_length=3)
    state.n_events = n_events
    return state


def test_a_users_state_written_meanwhile_refuses_the_whole_unit(
    store: RedisStore, redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    # Two consumers load u1 at 3 events; the one on partition 1 writes first.
    loaded = user_state(3)
    store.commit_batch(
        TOPIC, 0, None, 5, states={"u1": loaded.to_bytes()}, recs={}, recs_ttl_s=0, partials=None
    )
    store.commit_batch(
        TOPIC,
        1,
        None,
        7,
        states={"u1": user_state(4).to_bytes()},
        recs={"u1": b"list-1"},
        recs_ttl_s=0,
        partials=None,
        guards={"u1": count_guard(loaded)},
    )
    before = snapshot(redis_client, key_prefix)
    with pytest.raises(UserConflict) as caught:
        store.commit_batch(
            TOPIC,
            0,
            5,
            9,
            states={"u0": b"new", "u1": b"stale"},
            recs={"u1": b"stale-list"},
            recs_ttl_s=0,
            partials=None,
            events=2,
            guards={"u0": count_guard(None), "u1": count_guard(loaded)},
        )
    assert caught.value.users == ["u1"]
    assert snapshot(redis_client, key_prefix) == before  # not even the offset moved
    # Redone from the stored state, it lands; a user that appeared meanwhile conflicts too.
    redis_client.set(store.key("user", "u0"), user_state(1).to_bytes())
    with pytest.raises(UserConflict) as caught:
        store.commit_batch(
            TOPIC,
            0,
            5,
            9,
            states={"u0": b"x", "u1": b"y"},
            recs={},
            recs_ttl_s=0,
            partials=None,
            guards={"u0": count_guard(None), "u1": count_guard(user_state(4))},
        )
    assert caught.value.users == ["u0"]
    store.commit_batch(
        TOPIC,
        0,
        5,
        9,
        states={"u0": b"x", "u1": b"y"},
        recs={},
        recs_ttl_s=0,
        partials=None,
        guards={"u0": count_guard(user_state(1)), "u1": count_guard(user_state(4))},
    )
    assert store.load_users(["u0", "u1"])[0] == [b"x", b"y"]
    assert store.offsets(TOPIC, [0, 1]) == {0: 9, 1: 7}


def test_a_refresh_skips_only_the_users_written_meanwhile(store: RedisStore) -> None:
    store.commit_batch(
        TOPIC,
        0,
        None,
        5,
        states={"a": user_state(2).to_bytes(), "b": user_state(6).to_bytes()},
        recs={"a": b"old-a", "b": b"old-b"},
        recs_ttl_s=0,
        partials=None,
    )
    store.commit_batch(
        TOPIC,
        0,
        5,
        5,
        states={"a": b"fresh-a", "b": b"fresh-b"},
        recs={"a": b"new-a", "b": b"new-b"},
        recs_ttl_s=0,
        partials=None,
        guards={"a": count_guard(user_state(2)), "b": count_guard(user_state(5))},
        skip_conflicts=True,
    )
    assert store.load_users(["a", "b"])[0] == [b"fresh-a", user_state(6).to_bytes()]
    assert store.client.get(store.recs_key("a")) == b"new-a"
    assert store.client.get(store.recs_key("b")) == b"old-b"


def test_recs_are_byte_exact_and_get_their_ttl(
    store: RedisStore, redis_client: redis.Redis[bytes]
) -> None:
    value = json.dumps({"user": "ü", "items": ["x"], "scores": [0.1]}, ensure_ascii=False).encode()
    store.commit_batch(
        TOPIC, 0, None, 1, states={"ü": b"s"}, recs={"ü": value}, recs_ttl_s=30, partials=None
    )
    assert redis_client.get(store.recs_key("ü")) == value
    assert 0 < redis_client.ttl(store.recs_key("ü")) <= 30
    assert redis_client.ttl(f"{store.prefix}user:ü") == -1  # states: no TTL unless asked
    store.commit_batch(TOPIC, 0, 1, 2, states={}, recs={"ü": value}, recs_ttl_s=0, partials=None)
    assert redis_client.ttl(store.recs_key("ü")) == -1


def test_a_state_ttl_expires_inactive_users_and_each_write_renews_it(
    store: RedisStore, redis_client: redis.Redis[bytes]
) -> None:
    state_key = f"{store.prefix}user:u"
    store.commit_batch(
        TOPIC,
        0,
        None,
        1,
        states={"u": b"s1"},
        recs={"u": b"l1"},
        recs_ttl_s=0,
        state_ttl_s=86_400,
        partials=None,
    )
    assert 86_000 < redis_client.ttl(state_key) <= 86_400
    assert redis_client.ttl(store.recs_key("u")) == -1  # lists follow recs_ttl_s alone
    redis_client.expire(state_key, 5)  # as if the user had been away for a day
    store.commit_batch(
        TOPIC,
        0,
        1,
        2,
        states={"u": b"s2"},
        recs={},
        recs_ttl_s=0,
        state_ttl_s=86_400,
        partials=None,
    )
    assert 86_000 < redis_client.ttl(state_key) <= 86_400  # their next event renews it
    store.commit_batch(TOPIC, 0, 2, 3, states={"u": b"s3"}, recs={}, recs_ttl_s=0, partials=None)
    assert redis_client.ttl(state_key) == -1  # 0: never expires
    with pytest.raises(ValueError, match="state_ttl_s"):
        store.commit_batch(
            TOPIC, 0, 3, 4, states={}, recs={}, recs_ttl_s=0, state_ttl_s=-1, partials=None
        )


def test_bad_numbers_are_refused_before_anything_is_written(
    store: RedisStore, redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    with pytest.raises(ValueError, match="finite"):
        store.commit_batch(
            TOPIC,
            0,
            None,
            1,
            states={"u": b"s"},
            recs={},
            recs_ttl_s=0,
            partials=None,
            events=1,
            trending=[{1: float("nan")}] * 2,
            channels=CHANNELS,
        )
    with pytest.raises(ValueError, match="channels"):
        store.commit_batch(
            TOPIC,
            0,
            None,
            1,
            states={},
            recs={},
            recs_ttl_s=0,
            partials=None,
            events=1,
            trending=[{1: 1.0}],
        )
    with pytest.raises(ValueError, match="half-life"):
        store.commit_batch(
            TOPIC,
            0,
            None,
            1,
            states={},
            recs={},
            recs_ttl_s=0,
            partials=None,
            events=1,
            trending=[{1: 1.0}],
            channels=[Channel("zero", 0.0)],
        )
    assert snapshot(redis_client, key_prefix) == {}


# -- users -------------------------------------------------------------------------------


def test_profiles_and_states_load_together(store: RedisStore) -> None:
    store.set_profiles([UserRecord("u1", ("age:30", "city:x")), UserRecord("u3")])
    store.commit_batch(
        TOPIC, 0, None, 1, states={"u1": b"s1"}, recs={}, recs_ttl_s=0, partials=None
    )
    states, profiles = store.load_users(["u1", "u2", "u3"])
    assert states == [b"s1", None, None]
    assert profiles == [["age:30", "city:x"], None, []]
    assert store.load_users([]) == ([], [])


# -- item registry -----------------------------------------------------------------------


def test_item_indices_are_dense_idempotent_and_keep_richer_meta(store: RedisStore) -> None:
    assert store.item_indices(["a", "b", "a"], ["d1", "d2", "d1"]).tolist() == [0, 1, 0]
    assert store.describe_items(
        [ItemRecord("c", "d3", ("t:1",)), ItemRecord("a", "d9", ("t:2", "t:3"))]
    ).tolist() == [2, 0]
    assert store.item_indices(["c", "a", "e"], ["zz", "zz", "d5"]).tolist() == [2, 0, 3]
    assert store.catalog_size() == 4
    assert store.catalog_since(0) == [
        (0, "a", "d9", ("t:2", "t:3")),
        (1, "b", "d2", ()),
        (2, "c", "d3", ("t:1",)),
        (3, "e", "d5", ()),
    ]
    store.describe_items([ItemRecord("c", "d3", ("t:4",)), ItemRecord("f", "d1")])
    assert store.catalog_since(2) == [
        (2, "c", "d3", ("t:4",)),
        (3, "e", "d5", ()),
        (4, "f", "d1", ()),
    ]
    assert store.catalog_since(5) == []
    assert store.item_indices([], []).tolist() == []


def test_concurrent_registration_agrees_and_leaves_no_gaps(redis_url: str, key_prefix: str) -> None:
    ids = [f"item-{i}" for i in range(400)]
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def register(seed: int) -> None:
        client = redis.Redis.from_url(redis_url)
        rng = random.Random(seed)
        mine = rng.sample(ids, 300)  # two workers overlap on about half the ids
        seen: dict[str, int] = {}
        try:
            worker = RedisStore(client, prefix=key_prefix)
            for lo in range(0, len(mine), 20):
                batch = mine[lo : lo + 20]
                got = worker.item_indices(batch, ["d"] * len(batch)).tolist()
                seen.update(zip(batch, got, strict=True))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            client.close()
        results.append(seen)

    threads = [threading.Thread(target=register, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    merged: dict[str, int] = {}
    for seen in results:
        for item, idx in seen.items():
            assert merged.setdefault(item, idx) == idx
    assert sorted(merged.values()) == list(range(len(merged)))


# -- partial sums ------------------------------------------------------------------------


def test_take_partials_sums_exactly_per_partition_and_resets(store: RedisStore) -> None:
    commit(store, None, 1, "a", partition=0)
    commit(store, 1, 2, "b", partition=0)
    p1 = PartialSums.zeros(1, 3)
    p1.add([0], [[1.0, 2.0, 3.0]], [0.5])
    store.commit_batch(TOPIC, 3, None, 5, states={}, recs={}, recs_ttl_s=0, partials=p1)
    store.commit_batch("other", 0, None, 1, states={}, recs={}, recs_ttl_s=0, partials=p1)
    first, third = store.take_partials(TOPIC)
    assert first.weights.tolist() == [0.0, 4.0]
    assert first.sums.tolist() == [[0, 0, 0], [2.0, -1.0, 8.0]]
    assert third.weights.tolist() == [0.5]
    assert third.sums.tolist() == [[0.5, 1.0, 1.5]]
    assert store.take_partials(TOPIC) == []
    commit(store, 2, 3, "c", partition=0)
    [again] = store.take_partials(TOPIC, dim=4)
    assert again.weights.tolist() == [0.0, 2.0]
    assert again.sums.tolist() == [[0, 0, 0, 0], [1.0, -0.5, 4.0, 0]]
    assert len(store.take_partials("other")) == 1


# -- trending ----------------------------------------------------------------------------


def test_trending_follows_the_shared_clock_like_the_learners_copy(store: RedisStore) -> None:
    """Two consumers' batches, then a read: the counts of one Trending fed the same way."""
    assert store.trending(3, CHANNELS).clock == 0
    local = Trending(CHANNELS)
    for partition, items in ((0, [1, 1, 2]), (1, [0]), (0, [2, 2])):
        clock = store.commit_batch(
            TOPIC,
            partition,
            store.offsets(TOPIC, [partition])[partition],
            10 + partition + local.clock,
            states={},
            recs={},
            recs_ttl_s=0,
            partials=None,
            events=len(items),
            trending=local.increments(items),
            channels=CHANNELS,
        )
        assert clock == local.learn_many(items)
    shared = store.trending(4, CHANNELS)
    assert shared.clock == local.clock == 6
    np.testing.assert_allclose(shared.counts(4), local.counts(4), rtol=1e-12)


def test_a_scale_is_rebased_in_the_commit_once_its_factor_grows_large(store: RedisStore) -> None:
    local = Trending(CHANNELS)
    offset = None
    for step in range(70):  # 70 half-lives of the 1-event channel: one rebase on the way
        clock = store.commit_batch(
            TOPIC,
            0,
            offset,
            step + 1,
            states={},
            recs={},
            recs_ttl_s=0,
            partials=None,
            events=1,
            trending=[{step % 3: 1.0}] * 2,
            channels=CHANNELS,
        )
        offset = step + 1
        local.learn_many([step % 3])
        assert clock == local.clock
    shared = store.trending(3, CHANNELS)
    np.testing.assert_allclose(shared.counts(3), local.counts(3), rtol=1e-9)
    assert shared.to_arrays()["ref"][0] > 0  # the short scale's reference moved


# -- models ------------------------------------------------------------------------------


def test_a_pinned_version_is_served_and_kept_whatever_is_published_after_it(
    redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=key_prefix, keep_models=2)
    first = store.publish_model(b"v1", history={"reason": "first model", "parent": None})
    assert store.model_meta(first) is not None
    assert (store.model_meta(first) or {})["reason"] == "first model"
    store.pin_model(first)
    for n in range(4):  # far past keep_models: the pinned version is not pruned
        store.publish_model(f"v{n + 2}".encode())
    assert store.current_model_version() == 5 and store.served_model_version() == first
    assert store.load_model_blob(first) == b"v1"
    listed = [int(v) for v in redis_client.zrevrange(f"{key_prefix}model:versions", 0, -1)]
    assert first in listed and 2 not in listed
    store.pin_model(None)
    assert store.served_model_version() == 5 and store.pinned_model_version() is None
    with pytest.raises(ModelError, match="not stored"):
        store.pin_model(2)
    assert store.pinned_model_version() is None


def test_models_round_trip_in_chunks_and_old_versions_are_pruned(
    redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=key_prefix, chunk_bytes=10, keep_models=3)
    assert store.current_model_version() is None
    blobs = {
        store.publish_model(bytes(range(v, v + 35))): bytes(range(v, v + 35)) for v in range(5)
    }
    assert list(blobs) == [1, 2, 3, 4, 5]
    assert store.current_model_version() == 5
    assert json.loads(redis_client.get(f"{key_prefix}model:5:meta") or b"")["n_chunks"] == 4
    for v in (3, 4, 5):
        assert store.load_model_blob(v) == blobs[v]
    for v in (1, 2):
        with pytest.raises(ModelError, match="not stored"):
            store.load_model_blob(v)
    assert not list(redis_client.scan_iter(match=f"{key_prefix}model:1:*"))
    assert store.publish_model(b"", version=9) == 9
    assert store.load_model_blob(9) == b""
    assert store.publish_model(b"x") == 10
    with pytest.raises(ValueError, match="newer"):
        store.publish_model(b"y", version=10)


def test_a_corrupt_or_missing_chunk_is_a_model_error(
    redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=key_prefix, chunk_bytes=4)
    v = store.publish_model(b"0123456789")
    redis_client.set(f"{key_prefix}model:{v}:chunk:1", b"4567!")
    with pytest.raises(ModelError, match="corrupt"):
        store.load_model_blob(v)
    redis_client.delete(f"{key_prefix}model:{v}:chunk:2")
    with pytest.raises(ModelError, match="lacks chunks"):
        store.load_model_blob(v)


def test_readers_of_the_current_version_never_see_half_a_model(
    redis_url: str, redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    writer = RedisStore(redis_client, prefix=key_prefix, chunk_bytes=64)
    stop = threading.Event()
    problems: list[str] = []

    def read() -> None:
        client = redis.Redis.from_url(redis_url)
        reader = RedisStore(client, prefix=key_prefix)
        while not stop.is_set():
            v = reader.current_model_version()
            if v is None:
                continue
            try:
                blob = reader.load_model_blob(v)
            except ModelError:
                latest = reader.current_model_version() or 0
                if latest - v < writer.keep_models:  # only a pruned version may vanish
                    problems.append(f"version {v} failed while {latest} was current")
                continue
            if blob != bytes([v % 256]) * 1000:
                problems.append(f"version {v} read back wrong")
        client.close()

    thread = threading.Thread(target=read)
    thread.start()
    for v in range(1, 41):
        writer.publish_model(bytes([v % 256]) * 1000)
    stop.set()
    thread.join()
    assert problems == []


# -- misc --------------------------------------------------------------------------------


def test_heartbeats_are_listed_per_group(
    store: RedisStore, redis_client: redis.Redis[bytes]
) -> None:
    store.heartbeat("g", "m1", {"events": 5}, ttl_s=30)
    store.heartbeat("g", "m2", {"events": 7}, ttl_s=30)
    store.heartbeat("h", "m1", {"events": 1}, ttl_s=30)
    assert store.heartbeats("g") == {"m1": {"events": 5}, "m2": {"events": 7}}
    redis_client.delete(f"{store.prefix}consumer:g:m2")  # as if its TTL ran out
    assert store.heartbeats("g") == {"m1": {"events": 5}}
    assert store.heartbeats("nobody") == {}


def test_a_decoding_client_is_refused(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ConfigError, match="decode_responses"):
        RedisStore(client)  # type: ignore[arg-type]


def test_a_refuted_floor_is_forgotten_but_a_later_one_stays(store: RedisStore) -> None:
    assert store.training_floor() is None
    store.request_aggregation("drift in 'books'", since_ts=1_000)
    store.request_aggregation("drift in 'music'", since_ts=900)  # an earlier report: kept out
    assert store.training_floor() == 1_000
    store.clear_training_floor(1_000)
    assert store.training_floor() is None
    # A consumer reported a newer change while the cycle trained: that one survives.
    store.request_aggregation("drift in 'books'", since_ts=2_000)
    store.clear_training_floor(1_000)
    assert store.training_floor() == 2_000


def test_members_finding_the_group_stuck_at_once_move_it_one_generation(
    store: RedisStore,
) -> None:
    assert store.group_generation("g") == 0
    assert store.advance_group_generation("g", 0) == 1
    assert store.advance_group_generation("g", 0) == 1  # another member, same finding
    assert store.group_generation("g") == 1
    assert store.advance_group_generation("g", 1) == 2
    assert store.group_generation("other") == 0
