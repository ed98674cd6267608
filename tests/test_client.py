"""The read client against a real Redis: a user's own list, else the domain's fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis

from metarec.client import Recommendations, parse_list
from metarec.core.learner import Learner, RankedList
from metarec.core.user_state import UserState
from metarec.errors import ConfigError
from metarec.services.store import RedisStore


def _written(store: RedisStore) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """A user's list and two domains' fallbacks, as the consumer writes them."""
    learner = Learner(top_k=2)
    learner.add_items([(0, "b1", "books", ()), (1, "b2", "books", ()), (2, "m1", "music", ())])
    state = UserState.new(4, 5)
    state.record(item=0, weight=1.0, ts=1, domain="books")
    shelves = {
        "books": RankedList(np.array([1]), np.array([0.5], np.float32)),
        "music": RankedList(np.array([2]), np.array([0.25], np.float32)),
    }
    own = learner.list_records(
        {"alice": RankedList(np.array([1]), np.array([0.5], np.float32), shelves)},
        {"alice": state},
        now_ms=10,
    )
    lists = learner.newcomer_lists()
    fallbacks = learner.fallback_records(lists, now_ms=11)
    store.client.set(store.recs_key("alice"), own["alice"])
    store.write_fallbacks(fallbacks, learner.global_fallback_record(lists, now_ms=11))
    return own, fallbacks


def test_a_user_with_a_list_gets_it_and_others_their_domains_fallback(
    redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=key_prefix)
    own, fallbacks = _written(store)
    assert parse_list(own["alice"], "user").items == ["b2"]
    assert set(fallbacks) == {"default", "books", "music"}
    recs = Recommendations(redis_client, prefix=key_prefix)
    mine = recs.get("alice", domain="music")
    assert mine is not None and mine.source == "user" and mine.user == "alice"
    assert (mine.items, mine.scores, mine.events, mine.domain) == (["m1"], [0.25], 1, "music")
    assert recs.get("alice", domain="books").items == ["b2"]  # type: ignore[union-attr]
    overall = recs.get("alice")  # every domain's best
    assert overall is not None and (overall.items, overall.source) == (["b2"], "user")
    # A domain the user's record has no list for is served its fallback.
    podcasts = recs.get("alice", domain="podcasts")
    assert podcasts is not None and podcasts.source == "fallback", podcasts
    new = recs.get("bob", domain="books")
    assert new is not None and new.source == "fallback" and new.user is None
    assert new.domain == "books" and new.items == json.loads(fallbacks["books"])["items"]
    assert set(new.items) <= {"b1", "b2"}  # a newcomer to books sees books
    # A domain with no fallback yet: the best of every domain's, never nothing.
    anywhere = recs.get("bob", domain="no-such-domain")
    assert anywhere is not None and anywhere.source == "fallback" and anywhere.domain is None
    assert len(anywhere.items) == 2 and set(anywhere.items) <= {"b1", "b2", "m1"}
    many = recs.get_many(["alice", "bob", "alice"], domain="music")
    assert list(many) == ["alice", "bob"]
    assert many["alice"] == mine
    assert many["bob"] == parse_list(fallbacks["music"], "fallback")
    assert recs.get_many([]) == {}


def test_reads_take_one_round_trip(
    redis_client: redis.Redis[bytes], key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(redis_client, prefix=key_prefix)
    _written(store)
    recs = Recommendations(redis_client, prefix=key_prefix)
    sent: list[int] = []
    real = redis.client.Pipeline.execute

    def counting(self: redis.client.Pipeline, *args: object, **kwargs: object) -> object:
        sent.append(len(self.command_stack))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting)
    recs.get("alice")
    recs.get_many([f"u{i}" for i in range(100)], domain="books")
    assert sent == [4, 4]  # GET x 4; MGET of 100 keys + GET x 3: one pipeline each


def test_from_url_reads_the_same(
    redis_url: str, redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=key_prefix)
    _written(store)
    got = Recommendations.from_url(redis_url, prefix=key_prefix).get("alice")
    assert got is not None and got.items == ["b2"]


def test_an_empty_list_of_the_user_falls_back(
    redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=key_prefix)
    _, fallbacks = _written(store)
    empty = {"user": "carol", "items": [], "scores": [], "model_version": None, "events": 1}
    store.client.set(store.recs_key("carol"), json.dumps(empty))
    recs = Recommendations(redis_client, prefix=key_prefix)
    got = recs.get("carol", domain="books")
    assert got == parse_list(fallbacks["books"], "fallback") and got.items
    assert recs.get_many(["carol"], domain="books")["carol"] == got
    # With no fallback to serve instead, the user's own (empty) list says what exists.
    store.client.delete(store.global_fallback_key())
    alone = recs.get("carol", domain="no-such-domain")
    assert alone is not None and alone.source == "user" and alone.items == []
    assert recs.get_many(["carol"], domain="no-such-domain")["carol"] == alone


def test_an_empty_domain_fallback_gives_way_to_the_global_one(
    redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    """Every event carries a domain, so the default domain's fallback is empty: a read
    without a domain still gets items."""
    store = RedisStore(redis_client, prefix=key_prefix)
    _, fallbacks = _written(store)
    assert json.loads(fallbacks["default"])["items"] == []
    recs = Recommendations(redis_client, prefix=key_prefix)
    got = recs.get("dave")
    assert got is not None and got.domain is None and len(got.items) == 2
    assert got == recs.get_many(["dave"])["dave"]


def test_from_url_reads_the_deployments_key_prefix_from_the_environment(
    redis_url: str,
    redis_client: redis.Redis[bytes],
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _written(RedisStore(redis_client, prefix=key_prefix))
    monkeypatch.setenv("METAREC_KEY_PREFIX", key_prefix)
    got = Recommendations.from_url(redis_url).get("alice")
    assert got is not None and got.items == ["b2"]
    monkeypatch.setenv("METAREC_KEY_PREFIX", "has space")
    with pytest.raises(ConfigError, match="METAREC_KEY_PREFIX"):
        Recommendations.from_url(redis_url)
