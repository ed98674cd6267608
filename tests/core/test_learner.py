"""The learner: the per-event step the consumer and ``metarec eval`` both run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metarec.core.learner import LIST_SCHEMA_VERSION, EventBatch, Learner
from metarec.core.model import MetaModel
from metarec.core.trending import Channel
from metarec.core.user_state import UserState
from metarec.errors import ConfigError


def _learner(with_model: bool, version: int = 3) -> Learner:
    learner = Learner(top_k=4, history_length=5, seed=0)
    learner.add_items(
        [(j, f"i{j}", "books" if j < 6 else "music", (f"f{j % 2}",)) for j in range(10)]
    )
    if with_model:
        learner.load(_model(version))
    return learner


def _model(version: int, seed: int = 0) -> MetaModel:
    rng = np.random.default_rng(seed)
    m = MetaModel.initial(4, history_length=5)
    m.item_ids = [f"i{j}" for j in range(10)]
    m.item_emb = rng.standard_normal((10, 4)).astype(np.float32)
    m.item_ctx = rng.standard_normal((10, 4)).astype(np.float32)
    m.item_bias = np.zeros(10, np.float32)
    m.item_count = np.full(10, 5.0, np.float32)
    m.version = version
    return m


def _batch(events: list[tuple[str, int, float, int]], domain: str = "books") -> EventBatch:
    return EventBatch(
        [u for u, _, _, _ in events],
        np.array([i for _, i, _, _ in events]),
        np.array([w for _, _, w, _ in events], np.float32),
        np.array([t for _, _, _, t in events]),
        [domain] * len(events),
    )


def test_each_domain_gets_its_own_list_of_its_items_best_first() -> None:
    """A user who only read books (i0-i5) gets a books list and a music list (i6-i9):
    each holds only its domain's unconsumed items, K of them where the domain has K, in
    the order of the scores the overall list uses."""
    for big in (False, True):
        learner = _learner(with_model=True)
        if big:
            learner.exact_max_items = 5  # lists chosen among candidates
        out = learner.learn_many(_batch([("a", 1, 1.0, 10), ("a", 2, 1.0, 11)]), {}, {})
        doc = json.loads(learner.list_records(out.lists, out.states, now_ms=99)["a"])
        books, music = doc["domains"]["books"], doc["domains"]["music"]
        assert books["items"] and set(books["items"]) <= {"i0", "i3", "i4", "i5"}, (big, books)
        assert len(books["items"]) == 4 and len(music["items"]) == 4, (big, doc)
        assert set(music["items"]) <= {f"i{j}" for j in range(6, 10)}, (big, music)
        for shelf in (books, music):
            assert shelf["scores"] == sorted(shelf["scores"], reverse=True)
        merged = sorted(
            zip(books["scores"] + music["scores"], books["items"] + music["items"], strict=True),
            reverse=True,
        )
        assert [i for _, i in merged][:4] == doc["items"] or big, (merged, doc["items"])


def test_a_catalogue_of_one_domain_names_it_and_writes_no_per_domain_lists() -> None:
    learner = Learner(top_k=2, history_length=5, seed=0)
    learner.add_items([(j, f"m{j}", "movies", ()) for j in range(5)])
    out = learner.learn_many(_batch([("a", 1, 1.0, 10)], domain="movies"), {}, {})
    doc = json.loads(learner.list_records(out.lists, out.states, now_ms=1)["a"])
    assert doc["domain"] == "movies" and "domains" not in doc, doc


def test_lists_follow_the_contract_and_exclude_consumed_items() -> None:
    learner = _learner(with_model=True)
    out = learner.learn_many(
        _batch([("a", 1, 1.0, 10), ("b", 2, 2.0, 11), ("a", 3, 2.0, 12)]), {}, {}
    )
    a = json.loads(learner.list_records(out.lists, out.states, now_ms=99)["a"])
    assert set(a) == {
        "schema_version",
        "user",
        "items",
        "scores",
        "model_version",
        "events",
        "updated_ms",
        "domains",
    }
    assert a["schema_version"] == LIST_SCHEMA_VERSION == 2
    assert a["user"] == "a" and a["model_version"] == 3 and a["events"] == 2
    assert a["updated_ms"] == 99 and len(a["items"]) == 4 == len(a["scores"])
    assert not {"i1", "i3"} & set(a["items"])
    assert a["scores"] == sorted(a["scores"], reverse=True)
    assert out.states["a"].hist_items[-2:].tolist() == [1, 3]
    assert out.states["a"].hist_ts[-2:].tolist() == [10, 12]
    # Partial sums weigh each user by the events applied: every event counted once.
    assert out.partials.weights.sum() == 3


def test_a_batch_equals_the_same_events_one_at_a_time() -> None:
    """Negatives are keyed by user and event number, so batching changes nothing."""
    events = [("a", 1, 1.0, 10), ("b", 2, 2.0, 11), ("a", 3, 2.0, 12), ("a", 4, 1.0, 13)]
    whole = _learner(True).learn_many(_batch(events), {}, {})
    one_by_one = _learner(True)
    states: dict[str, UserState | None] = {}
    lists = {}
    for e in events:
        out = one_by_one.learn_many(_batch([e]), states, {})
        states.update(out.states)
        lists.update(out.lists)
    for user in ("a", "b"):
        got = states[user]
        assert got is not None
        np.testing.assert_array_equal(whole.states[user].hist_items, got.hist_items)
        np.testing.assert_array_equal(whole.states[user].delta, got.delta)
        assert whole.states[user].n_events == got.n_events
        # The model weighs trending at 0, so the lists agree too.
        assert whole.lists[user].items.tolist() == lists[user].items.tolist()


def test_without_a_model_lists_are_what_is_trending_in_the_domain() -> None:
    learner = _learner(with_model=False)
    learner.trending.learn_many([7, 7, 8, 2])
    out = learner.learn_many(_batch([("a", 7, 1.0, 5)], domain="music"), {}, {})
    got = json.loads(learner.list_records(out.lists, out.states, now_ms=1)["a"])
    assert got["model_version"] == 0
    assert got["items"][0] == "i8" and "i7" not in got["items"]
    assert all(int(i[1:]) >= 6 for i in got["items"])  # music items only


def test_a_new_model_re_derives_a_user_as_if_they_had_always_been_under_it() -> None:
    events = [("a", 1, 1.0, 1), ("a", 5, 2.0, 2), ("a", 2, 1.0, 3)]
    old = _learner(True, version=3)
    states: dict[str, UserState | None] = {}
    for e in events:
        states.update(old.learn_many(_batch([e]), states, {}).states)
    old.load(_model(4, seed=1))
    fresh = _learner(False)
    fresh.load(_model(4, seed=1))
    direct: dict[str, UserState | None] = {}
    for e in events:
        direct.update(fresh.learn_many(_batch([e]), direct, {}).states)
    state = states["a"]
    assert state is not None and state.model_version == 3
    lists = old.refresh(["a"], {"a": state}, {})
    expected = direct["a"]
    assert expected is not None
    assert state.model_version == 4
    np.testing.assert_allclose(state.delta, expected.delta, rtol=1e-6)
    assert lists["a"].items.tolist() == expected.recs.tolist()


def test_hits_are_measured_on_the_list_the_user_had() -> None:
    learner = _learner(with_model=True)
    first = learner.learn_many(_batch([("a", 1, 1.0, 1)]), {}, {})
    state = first.states["a"]
    shown = state.recs.tolist()
    again = learner.learn_many(
        _batch([("a", shown[1], 1.0, 2), ("a", 1, 1.0, 3)]), {"a": state}, {}
    )
    assert again.hit_rank.tolist() == [1, -1]


def test_an_unknown_trending_scale_count_is_refused() -> None:
    learner = Learner(channels=[Channel("10", 10.0), Channel("100", 100.0)])
    with pytest.raises(ValueError, match="trending channels"):
        learner.load(_model(1))


def _lists_with(components: tuple[str, ...] | None, model: MetaModel) -> list[str]:
    learner = Learner(top_k=4, history_length=5, seed=0, components=components)
    learner.add_items([(j, f"i{j}", "books", (f"f{j % 2}",)) for j in range(10)])
    learner.load(model)
    out = learner.learn_many(_batch([("a", 1, 1.0, 10)]), {}, {})
    return list(json.loads(learner.list_records(out.lists, out.states, now_ms=1)["a"])["items"])


def test_each_part_of_the_score_ranks_alone() -> None:
    model = _model(3)
    model.item_bias = np.linspace(1.0, 0.0, 10).astype(np.float32)  # i0 first, i9 last
    # The item bias alone: its order, the consumed i1 left out.
    assert _lists_with(("bias",), model) == ["i0", "i2", "i3", "i4"]
    # The adapted vector alone is the full score with the bias and trending taken out.
    plain = _model(3)
    assert _lists_with(("user",), model) == _lists_with(None, plain)
    assert _lists_with(("user", "bias"), model) == _lists_with(None, model)


@pytest.mark.parametrize("components", [(), ("bias", "popularity"), ("pop-42",)])
def test_an_unknown_part_of_the_score_is_a_config_error(components: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="score component"):
        Learner(components=components)
