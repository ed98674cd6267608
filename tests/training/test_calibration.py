"""Blend calibration: per-part factors refitted by the softmax loss, held by a prior."""

from __future__ import annotations

import numpy as np

from metarec.training.calibration import MAX_SCALE, MIN_SCALE, calibrate_blend


def _nll(parts: np.ndarray, consumed: np.ndarray, target: np.ndarray, f: np.ndarray) -> float:
    logits = np.tensordot(f, parts, axes=1).astype(np.float64)
    logits[consumed] = -np.inf
    top = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
    return float(np.mean(lse - logits[np.arange(len(target)), target]))


def _drawn(n: int, items: int, scale: tuple[float, float], seed: int = 0):  # type: ignore[no-untyped-def]
    """Two parts, and next items drawn from softmax(scale[0]·a + scale[1]·b)."""
    rng = np.random.default_rng(seed)
    parts = rng.normal(size=(2, n, items))
    logits = scale[0] * parts[0] + scale[1] * parts[1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    target = np.array([rng.choice(items, p=row) for row in p])
    return parts.astype(np.float32), np.zeros((n, items), bool), target


def test_the_factors_recover_how_much_each_part_predicts() -> None:
    parts, consumed, target = _drawn(3000, 30, (0.5, 2.0))
    f = calibrate_blend(parts, consumed, target)
    assert abs(f[0] - 0.5) < 0.15 and abs(f[1] - 2.0) < 0.3
    assert _nll(parts, consumed, target, f) < _nll(parts, consumed, target, np.ones(2))


def test_a_blend_that_is_already_right_stays_near_one() -> None:
    parts, consumed, target = _drawn(3000, 30, (1.0, 1.0), seed=1)
    np.testing.assert_allclose(calibrate_blend(parts, consumed, target), [1.0, 1.0], atol=0.12)


def test_few_examples_move_the_factors_less_than_many() -> None:
    parts, consumed, target = _drawn(3000, 30, (0.2, 3.0), seed=2)
    many = calibrate_blend(parts, consumed, target)
    few = calibrate_blend(parts[:, :30], consumed[:30], target[:30])
    assert abs(np.log(few)).sum() < abs(np.log(many)).sum()


def test_too_few_examples_keep_the_trained_weights() -> None:
    parts, consumed, target = _drawn(10, 30, (0.2, 3.0))
    assert calibrate_blend(parts, consumed, target).tolist() == [1.0, 1.0]


def test_factors_stay_positive_and_bounded() -> None:
    parts, consumed, target = _drawn(3000, 30, (0.0, 40.0), seed=3)
    f = calibrate_blend(parts, consumed, target)
    assert np.all((f >= MIN_SCALE * 0.999) & (f <= MAX_SCALE * 1.001))
    assert f[1] > 4.0


def test_left_out_items_and_examples_without_a_next_item_do_not_count() -> None:
    parts, consumed, target = _drawn(2000, 30, (0.5, 2.0), seed=4)
    # Half the examples have no next item; a consumed item scored sky-high on part 0 must
    # not teach the fit that part 0 is loud.
    target[:1000] = -1
    parts[0, :, 0] = 1e6
    consumed[:, 0] = True
    target[target == 0] = -1
    f = calibrate_blend(parts, consumed, target)
    assert np.isfinite(f).all() and f[0] < 1.0 < f[1]
