"""Scoring and exact top-K with exclusions."""

from __future__ import annotations

import numpy as np

from metarec.core.ranking import top_k


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
