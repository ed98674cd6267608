"""The consumer's batch computation, without Kafka or Redis."""

from __future__ import annotations

import json

import numpy as np

from consumer.processor import apply_events
from consumer.serving import Serving
from metarec.events import DEFAULT_EVENT_WEIGHTS, Event
from metarec.model import MetaModel
from metarec.user_state import UserState


def _serving(with_model: bool) -> Serving:
    s = Serving(half_life_ms=3_600_000.0)
    s.add_items([(j, f"i{j}", "books" if j < 6 else "music", (f"f{j % 2}",))
                 for j in range(10)])
    if with_model:
        rng = np.random.default_rng(0)
        m = MetaModel.initial(4, history_length=5)
        m.item_ids = [f"i{j}" for j in range(10)]
        m.item_emb = rng.standard_normal((10, 4)).astype(np.float32)
        m.item_ctx = rng.standard_normal((10, 4)).astype(np.float32)
        m.item_bias = np.zeros(10, np.float32)
        m.item_count = np.full(10, 5.0, np.float32)
        m.version = 3
        s.set_model(m)
    return s


def _apply(s: Serving, events: list[Event], states: dict[str, UserState | None]):  # type: ignore[no-untyped-def]
    items = np.array([int(e.item[1:]) for e in events], np.int64)
    return apply_events(s, events, items, states, {}, weights=DEFAULT_EVENT_WEIGHTS,
                        rng=np.random.default_rng(0), top_k_size=4, now_ms=99, dim=4,
                        history_length=5)


def test_lists_follow_the_contract_and_exclude_consumed_items() -> None:
    s = _serving(with_model=True)
    events = [Event("a", "i1", "click", 10), Event("b", "i2", "like", 11),
              Event("a", "i3", "like", 12)]
    out = _apply(s, events, {})
    a = json.loads(out.recs["a"])
    assert set(a) == {"user", "items", "scores", "model_version", "events", "updated_ms"}
    assert a["user"] == "a" and a["model_version"] == 3 and a["events"] == 2
    assert a["updated_ms"] == 99 and len(a["items"]) == 4 == len(a["scores"])
    assert not {"i1", "i3"} & set(a["items"])
    assert a["scores"] == sorted(a["scores"], reverse=True)
    assert out.states["a"].hist_items[-2:].tolist() == [1, 3]
    assert out.states["a"].hist_ts[-2:].tolist() == [10, 12]
    # Partial sums weigh each user by the events applied: every event counted once.
    assert out.partials.weights.sum() == 3


def test_a_batch_equals_the_same_events_one_at_a_time() -> None:
    events = [Event("a", "i1", "click", 10), Event("b", "i2", "like", 11),
              Event("a", "i3", "like", 12), Event("a", "i4", "click", 13)]
    whole = _apply(_serving(True), events, {})
    states: dict[str, UserState | None] = {}
    for e in events:
        one = _apply(_serving(True), [e], states)
        states.update(one.states)
    for user in ("a", "b"):
        got = states[user]
        assert got is not None
        np.testing.assert_array_equal(whole.states[user].hist_items, got.hist_items)
        assert whole.states[user].n_events == got.n_events


def test_without_a_model_lists_are_domain_popularity() -> None:
    s = _serving(with_model=False)
    s.popularity.learn_many([7, 7, 8, 2], [0, 0, 0, 0], [1, 1, 1, 1])
    out = _apply(s, [Event("a", "i7", "click", 5, domain="music")], {})
    got = json.loads(out.recs["a"])
    assert got["model_version"] == 0
    assert got["items"][0] == "i8" and "i7" not in got["items"]
    assert all(int(i[1:]) >= 6 for i in got["items"])  # music items only


def test_stale_users_are_re_derived_under_the_new_model_and_hits_are_measured() -> None:
    s = _serving(with_model=True)
    first = _apply(s, [Event("a", "i1", "click", 1)], {})
    state = first.states["a"]
    shown = state.recs.tolist()
    state.model_version = 1
    again = _apply(s, [Event("a", f"i{shown[1]}", "click", 2)], {"a": state})
    assert again.states["a"].model_version == 3
    assert again.hit_rank.tolist() == [1]
