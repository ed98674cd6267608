"""The inner loop: its gradient, its batching, and history handling."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.core.adaptation import (
    UserBatch,
    adapt,
    observe,
    pairwise_gradient,
    prior,
    push_history,
    replay,
    sample_negatives,
    user_keys,
    user_vectors,
    waves,
)
from metarec.core.model import ItemTables, MetaModel


def _random_setup(
    seed: int = 0, n_users: int = 4, n_items: int = 12, dim: int = 5, length: int = 6
) -> tuple[MetaModel, ItemTables, UserBatch]:
    rng = np.random.default_rng(seed)
    model = MetaModel.initial(dim, history_length=length, seed=seed)
    model.theta0 = rng.standard_normal((1, dim)).astype(np.float32)
    model.age_logits = rng.standard_normal(model.age_logits.shape).astype(np.float32)
    model.step = rng.uniform(0.01, 0.2, dim).astype(np.float32)
    tables = ItemTables(
        rng.standard_normal((n_items, dim)).astype(np.float32),
        rng.standard_normal(n_items).astype(np.float32),
        rng.standard_normal((n_items, dim)).astype(np.float32),
    )
    batch = UserBatch.empty(n_users, model)
    batch.profile[:] = rng.standard_normal((n_users, dim))
    for _ in range(3):
        push_history(
            batch,
            np.arange(n_users),
            rng.integers(0, n_items, n_users),
            np.ones(n_users, np.float32),
        )
    return model, tables, batch


def _loss(
    theta: np.ndarray,
    delta: np.ndarray,
    tables: ItemTables,
    pos: int,
    weight: float,
    neg: np.ndarray,
    prox: float,
) -> float:
    dv = tables.vectors[pos][:, None] - tables.vectors[neg].T
    z = theta @ dv + tables.bias[pos] - tables.bias[neg]
    s = -1.0 if weight < 0 else 1.0
    return float(
        np.mean(-abs(weight) * np.log(1 / (1 + np.exp(-s * z)))) + prox / 2 * delta @ delta
    )


@pytest.mark.parametrize("weight", [1.0, 2.0, -1.0])
def test_pairwise_gradient_matches_finite_differences(weight: float) -> None:
    _, tables, _ = _random_setup()
    rng = np.random.default_rng(1)
    theta0 = rng.standard_normal(5)
    delta = rng.standard_normal(5) * 0.3
    neg = np.array([3, 7, 9])
    grad = pairwise_gradient(
        (theta0 + delta)[None].astype(np.float32),
        delta[None].astype(np.float32),
        tables,
        np.array([1]),
        np.array([weight], np.float32),
        neg[None],
        prox=0.3,
    )[0]
    eps = 1e-5
    numeric = np.zeros(5)
    for j in range(5):
        e = np.zeros(5)
        e[j] = eps
        up = _loss(theta0 + delta + e, delta + e, tables, 1, weight, neg, 0.3)
        down = _loss(theta0 + delta - e, delta - e, tables, 1, weight, neg, 0.3)
        numeric[j] = (up - down) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_adapt_lowers_the_loss_and_dislike_pushes_away() -> None:
    model, tables, batch = _random_setup()
    rows = np.array([0])
    theta0 = prior(model, tables, batch, rows)
    neg = np.array([[4]])
    margin_dir = tables.vectors[2] - tables.vectors[4]
    for weight, sign in [(1.0, 1), (-1.0, -1)]:
        delta = adapt(
            model,
            tables,
            theta0,
            np.zeros((1, 5), np.float32),
            np.array([2]),
            np.array([weight], np.float32),
            neg,
        )
        assert np.sign(delta[0] @ margin_dir) == sign


def test_batched_observe_equals_one_user_at_a_time() -> None:
    model, tables, batch = _random_setup()
    batch.keys = user_keys(["a", "b", "c", "d"])
    solo = batch.subset(np.arange(4))
    items = np.array([1, 2, 3, 4])
    weights = np.array([1.0, 2.0, -1.0, 1.0], np.float32)
    observe(model, tables, batch, np.arange(4), items, weights, seed=3)
    for r in range(4):
        observe(model, tables, solo, np.array([r]), items[r : r + 1], weights[r : r + 1], seed=3)
    np.testing.assert_allclose(batch.delta, solo.delta, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch.hist_items, solo.hist_items)
    assert batch.events.tolist() == solo.events.tolist() == [4, 4, 4, 4]


def test_negatives_depend_on_user_event_number_and_seed_only() -> None:
    keys = user_keys(["a", "b"])
    base = sample_negatives(keys, [5, 5], 0, 1000, 8)
    assert base.shape == (2, 8) and base.min() >= 0 and base.max() < 1000
    assert (base[0] != base[1]).any()
    np.testing.assert_array_equal(sample_negatives(keys[:1], [5], 0, 1000, 8), base[:1])
    assert (sample_negatives(keys, [6, 6], 0, 1000, 8) != base).any()
    assert (sample_negatives(keys, [5, 5], 1, 1000, 8) != base).any()
    # Close to uniform over the catalog.
    many = sample_negatives(user_keys([f"u{j}" for j in range(2000)]), np.ones(2000), 0, 10, 5)
    counts = np.bincount(many.ravel(), minlength=10)
    assert counts.min() > 0.8 * counts.mean()


def test_history_is_right_aligned_and_bounded() -> None:
    model = MetaModel.initial(2, history_length=3)
    b = UserBatch.empty(1, model)
    for item in range(5):
        push_history(b, np.array([0]), np.array([item]), np.array([1.0], np.float32))
    assert b.hist_items.tolist() == [[2, 3, 4]]


def test_prior_depends_on_history_order_through_age_weights() -> None:
    model, tables, batch = _random_setup()
    a = prior(model, tables, batch)
    batch.hist_items[:, -3:] = batch.hist_items[:, -3:][:, ::-1]
    b = prior(model, tables, batch)
    assert not np.allclose(a, b)


def test_replay_rebuilds_the_same_history_and_an_offset() -> None:
    model, tables, batch = _random_setup()
    hist, events = batch.hist_items.copy(), batch.events.copy()
    replay(model, tables, batch, seed=0)
    np.testing.assert_array_equal(batch.hist_items, hist)
    np.testing.assert_array_equal(batch.events, events)
    assert np.abs(batch.delta).sum() > 0
    vec = user_vectors(model, tables, batch)
    assert vec.shape == (4, 5) and np.isfinite(vec).all()


def test_replay_gives_back_the_offset_the_events_built() -> None:
    model, tables, batch = _random_setup()
    batch.keys = user_keys(["a", "b", "c", "d"])
    batch.hist_items[:] = -1
    batch.events[:] = 0
    rng = np.random.default_rng(5)
    for _ in range(4):
        observe(
            model,
            tables,
            batch,
            np.arange(4),
            rng.integers(0, 12, 4),
            np.ones(4, np.float32),
            seed=7,
        )
    built = batch.delta.copy()
    replay(model, tables, batch, seed=7)
    np.testing.assert_allclose(batch.delta, built, rtol=1e-6)
    replay(model, tables, batch, seed=8)  # other negatives, another offset
    assert not np.allclose(batch.delta, built)


def test_waves_keep_each_users_order() -> None:
    users = ["a", "b", "a", "c", "a", "b"]
    got = waves(users)
    assert [w.tolist() for w in got] == [[0, 1, 3], [2, 5], [4]]
    assert waves([]) == []
