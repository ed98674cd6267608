"""Candidate scoring gives exact scores: with every item a candidate, the exact lists."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.core.candidates import ItemIndex, rank_candidates, trending_candidates
from metarec.core.learner import EventBatch, Learner
from metarec.core.model import MetaModel
from metarec.core.neighbors import ItemNeighbors, votes
from metarec.core.ranking import top_k


def _dense(theta, bucket, vectors, shared, knn):
    out = theta @ vectors.T + shared[bucket]
    index, value, weight = knn
    out += weight[:, None] * votes(index, value, vectors.shape[0])
    return out.astype(np.float32)


@pytest.mark.parametrize("b", [30, 150])  # 150: several gathers of GATHER_ROWS users
def test_rank_candidates_with_all_items_is_exact_top_k(b: int) -> None:
    rng = np.random.default_rng(0)
    n, d = 300, 8
    theta = rng.standard_normal((b, d)).astype(np.float32)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    shared = rng.standard_normal((3, n)).astype(np.float32)
    bucket = rng.integers(0, 3, b)
    index = rng.integers(-1, n, (b, 5, 7))  # -1: no neighbour
    value = rng.random((b, 5, 7)).astype(np.float32)
    weight = rng.random(b).astype(np.float32)
    exclude = [rng.choice(n, rng.integers(0, 20), replace=False) for _ in range(b)]
    # Every item, shuffled, with duplicates and padding mixed in.
    cands = np.hstack(
        [np.stack([rng.permutation(n) for _ in range(b)]), rng.integers(-1, n, (b, 40))]
    )
    got_idx, got_val = rank_candidates(
        theta, bucket, vectors, shared, cands, 10, exclude, (index, value, weight)
    )
    want_idx, want_val = top_k(
        _dense(theta, bucket, vectors, shared, (index, value, weight)), 10, exclude
    )
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_val, want_val, rtol=1e-5, atol=1e-5)


def test_rank_candidates_only_ranks_candidates_and_pads() -> None:
    theta = np.ones((2, 1), np.float32)
    vectors = np.arange(6, dtype=np.float32)[:, None]  # item i scores i
    shared = np.zeros((1, 6), np.float32)
    cands = np.array([[0, 2, 2, -1], [5, 4, 3, 1]])
    idx, val = rank_candidates(
        theta,
        np.zeros(2, np.int64),
        vectors,
        shared,
        cands,
        3,
        [np.array([], np.int64), np.array([4])],
    )
    assert idx.tolist() == [[2, 0, -1], [5, 3, 1]]
    assert np.isneginf(val[0, 2])


def test_item_index_finds_the_best_items_and_extends() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((3000, 8)).astype(np.float32)
    bias = rng.standard_normal(3000).astype(np.float32)
    index = ItemIndex(vectors, bias)
    theta = rng.standard_normal((20, 8)).astype(np.float32) * 3
    found = index.search(theta, 50)
    exact = np.argsort(-(theta @ vectors.T + bias), axis=1)[:, :50]
    recall = np.mean([len(set(f) & set(e)) / 50 for f, e in zip(found, exact, strict=True)])
    assert recall > 0.6
    index.extend(np.full((1, 8), 50.0, np.float32), np.zeros(1, np.float32))
    assert len(index) == 3001
    assert (index.search(np.ones((1, 8), np.float32), 1) == 3000).all()


def test_trending_candidates_are_each_rows_best() -> None:
    shared = np.array([[0.1, 0.9, 0.5], [0.7, 0.0, 0.3]], np.float32)
    best = trending_candidates(shared, 2)
    assert [sorted(r) for r in best.tolist()] == [[1, 2], [0, 2]]


def _learner(n_items: int, exact_max_items: int) -> Learner:
    rng = np.random.default_rng(2)
    model = MetaModel.initial(8, history_length=10)
    model.item_ids = [f"i{j}" for j in range(n_items)]
    model.item_emb = rng.standard_normal((n_items, 8)).astype(np.float32)
    model.item_ctx = rng.standard_normal((n_items, 8)).astype(np.float32)
    model.item_bias = rng.standard_normal(n_items).astype(np.float32)
    model.item_count = np.full(n_items, 5.0, np.float32)
    model.trend_weights[:] = 0.3
    model.knn_weights[:] = 0.5
    nb = ItemNeighbors.from_events(rng.integers(0, 40, 600), rng.integers(0, n_items, 600), n_items)
    model.knn_index, model.knn_weight = nb.index, nb.weight
    learner = Learner(top_k=5, history_length=10, exact_max_items=exact_max_items)
    for j in range(n_items):
        learner.register(f"i{j}")
    learner.load(model)
    return learner


@pytest.mark.parametrize("n_items", [60, 150])
def test_learner_candidate_lists_match_exact_when_candidates_cover_the_catalog(
    n_items: int,
) -> None:
    # The trending candidates (200 per bucket) cover these catalogues entirely.
    rng = np.random.default_rng(3)
    users = [f"u{k}" for k in rng.integers(0, 15, 80)]
    batch = EventBatch(
        users,
        rng.integers(0, n_items, 80),
        np.ones(80, np.float32),
        np.arange(80),
        ["default"] * 80,
    )
    exact = _learner(n_items, exact_max_items=10**6).learn_many(batch, {}, {})
    cands = _learner(n_items, exact_max_items=0).learn_many(batch, {}, {})
    for u, ranked in exact.lists.items():
        assert cands.lists[u].items.tolist() == ranked.items.tolist()
        np.testing.assert_allclose(cands.lists[u].scores, ranked.scores, rtol=1e-4, atol=1e-4)


def test_learner_scores_outside_the_candidates_are_minus_infinity() -> None:
    learner = _learner(400, exact_max_items=0)
    batch = EventBatch(["u1"], np.array([3]), np.ones(1, np.float32), np.array([1]), ["default"])
    out = learner.learn_many(batch, {}, {})
    scores = learner.scores(["u1"], out.states, {})
    assert scores.shape == (1, 400)
    finite = np.isfinite(scores[0])
    assert 0 < finite.sum() < 400
    top = np.argsort(-np.where(finite, scores[0], -np.inf))[:6]
    assert out.lists["u1"].items.tolist() == [i for i in top.tolist() if i != 3][:5]


def test_the_item_index_follows_the_model_and_grows_with_the_catalog() -> None:
    learner = _learner(400, exact_max_items=0)
    batch = EventBatch(["u1"], np.array([3]), np.ones(1, np.float32), np.array([1]), ["default"])
    learner.learn_many(batch, {}, {})
    index = learner._item_index()
    learner.register("i7", features=["new-tag"])  # metadata: tables rebuilt, index kept
    learner.register("fresh")  # a new item: appended
    assert learner._item_index() is index and len(index) == 401
    model = learner.model
    assert model is not None
    learner.load(MetaModel.from_bytes(model.to_bytes()))  # a new version: rebuilt
    assert learner._item_index() is not index


def test_a_reload_changes_the_candidate_scores_before_the_next_batch() -> None:
    learner = _learner(400, exact_max_items=0)
    batch = EventBatch(["u1"], np.array([3]), np.ones(1, np.float32), np.array([1]), ["default"])
    out = learner.learn_many(batch, {}, {})
    before = learner.scores(["u1"], out.states, {})
    model = learner.model
    assert model is not None
    other = MetaModel.from_bytes(model.to_bytes())
    other.item_bias = other.item_bias[::-1].copy()
    other.trend_weights = other.trend_weights + 1.0
    learner.load(other)
    fresh = _learner(400, exact_max_items=0)
    fresh.learn_many(batch, {}, {})
    fresh.load(MetaModel.from_bytes(other.to_bytes()))
    after = learner.scores(["u1"], out.states, {})
    assert not np.allclose(np.nan_to_num(after, neginf=0), np.nan_to_num(before, neginf=0))
    np.testing.assert_allclose(after, fresh.scores(["u1"], out.states, {}), rtol=1e-5)


def test_items_outside_the_catalogue_are_ignored_not_carried_to_the_next_row() -> None:
    theta = np.ones((2, 1), np.float32)
    vectors = np.arange(4, dtype=np.float32)[:, None]
    cands = np.array([[0, 1, 9], [0, 1, 2]])
    idx, _ = rank_candidates(
        theta,
        np.zeros(2, np.int64),
        vectors,
        np.zeros((1, 4), np.float32),
        cands,
        3,
        [np.array([7]), np.array([], np.int64)],
    )  # 7 = row 1's item 2
    assert idx.tolist() == [[1, 0, -1], [2, 1, 0]]
