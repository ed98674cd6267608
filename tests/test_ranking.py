"""Scoring and exact top-K with exclusions."""

from __future__ import annotations

import numpy as np

from metarec.model import ItemTables
from metarec.ranking import score, top_k, trend_prior


def test_top_k_is_exact_against_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal((50, 300)).astype(np.float32)
    exclude = [rng.choice(300, size=20, replace=False) for _ in range(50)]
    idx, vals = top_k(s.copy(), 10, exclude)
    for r in range(50):
        masked = s[r].copy()
        masked[exclude[r]] = -np.inf
        expected = np.argsort(-masked, kind="stable")[:10]
        np.testing.assert_array_equal(np.sort(idx[r]), np.sort(expected))
        assert not set(idx[r]) & set(exclude[r])
        assert (np.diff(vals[r]) <= 0).all()


def test_top_k_pads_when_few_items_are_eligible() -> None:
    idx, vals = top_k(np.array([[1.0, 2.0, 3.0]]), 5, [np.array([0, 2])])
    assert idx.tolist() == [[1, -1, -1, -1, -1]]
    assert vals[0, 0] == 2.0 and np.isneginf(vals[0, 1:]).all()


def test_score_adds_bias_and_trend() -> None:
    tables = ItemTables(np.eye(2, dtype=np.float32), np.array([0.5, 0.0], np.float32),
                        np.eye(2, dtype=np.float32))
    theta = np.array([[1.0, 2.0]], np.float32)
    prior = trend_prior(np.array([0.0, np.e - 1]), beta=0.5)
    np.testing.assert_allclose(score(tables, theta, prior), [[1.5, 2.5]], rtol=1e-6)
