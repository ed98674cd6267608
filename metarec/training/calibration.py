"""Blend calibration: the weight of each part of the score, refitted on unseen users.

Meta-training learns the weight of each part of the score (the adapted user vector, the
item bias, the trending prior, the neighbour votes) per history bucket, jointly with
everything else. A training batch holds few examples of users with short histories (in a
window of long-history users, a bucket like "2-3 events" is a percent of the events), and
training stops after a few dozen steps, so those buckets' weights take a few noisy Adam
steps per training and wander (on MovieLens latest-small the neighbours' weight of the
2-3 bucket went from -0.45 to +0.55 across consecutive trainings).

:func:`calibrate_blend` refits them once training is done, with everything else frozen:
per bucket, one factor per part that minimizes the same softmax loss over the whole
catalogue on examples of the held-out users (users the model never trained on), with a
Gaussian prior on the log of each factor (:data:`PRIOR_SIGMA`) so that a few examples move
a weight a little and many move it more. Factors stay positive and within
[:data:`MIN_SCALE`, :data:`MAX_SCALE`]: each part keeps its sign and stays a ranking of
its own.

>>> rng = np.random.default_rng(0)
>>> n, items = 400, 50
>>> target = rng.integers(0, items, n)
>>> sharp = rng.normal(size=(n, items)); sharp[np.arange(n), target] += 3.0
>>> noise = 4 * rng.normal(size=(n, items))
>>> parts = np.stack([noise, sharp])             # the noisy part outweighs the sharp one
>>> factors = calibrate_blend(parts, np.zeros((n, items), bool), target)
>>> bool(factors[0] < 1 < factors[1])            # the sharp part now counts for more
True
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

__all__ = ["MAX_SCALE", "MIN_EXAMPLES", "MIN_SCALE", "PRIOR_SIGMA", "calibrate_blend"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: Standard deviation of the prior on a factor's log: e (2.7x) either way is one sigma.
PRIOR_SIGMA = 1.0
#: Buckets with fewer held-out examples keep the trained weights.
MIN_EXAMPLES = 20
#: Bounds of a part's factor.
MIN_SCALE, MAX_SCALE = 1 / 16, 16.0


def calibrate_blend(
    parts: npt.NDArray[np.floating],
    consumed: npt.NDArray[np.bool_],
    target: I64,
    *,
    min_examples: int = MIN_EXAMPLES,
) -> F32:
    """Factors of each part's weight, ``(n_parts,)``, for one history bucket.

    ``parts[c, e]`` is part ``c``'s weighted score of every item for held-out example
    ``e``, ``consumed[e]`` the items left out of that example's list, ``target[e]`` the
    item its user acted on next (examples with a negative target are ignored). Ones where
    there are fewer than ``min_examples`` examples.
    """
    keep = target >= 0
    n_parts = parts.shape[0]
    if keep.sum() < min_examples:
        return np.ones(n_parts, np.float32)
    p = np.asarray(parts[:, keep], np.float64)
    p[:, consumed[keep]] = 0.0
    mask = consumed[keep]
    rows = np.arange(p.shape[1])
    at_target = p[:, rows, target[keep]]  # (n_parts, B)
    n = p.shape[1]

    def loss(log_f: F64) -> tuple[float, F64]:
        f = np.exp(log_f)
        logits = np.tensordot(f, p, axes=1)
        logits[mask] = -np.inf
        top = logits.max(axis=1, keepdims=True)
        e = np.exp(logits - top)
        z = e.sum(axis=1, keepdims=True)
        prob = e / z
        nll = float(np.mean(np.log(z[:, 0]) + top[:, 0] - f @ at_target))
        expected = np.einsum("cbn,bn->cb", p, prob)
        grad_f = (expected - at_target).mean(axis=1)
        prior = log_f / (PRIOR_SIGMA**2 * n)
        return nll + float(log_f @ log_f) / (2 * PRIOR_SIGMA**2 * n), grad_f * f + prior

    bounds = [(np.log(MIN_SCALE), np.log(MAX_SCALE))] * n_parts
    fit = minimize(loss, np.zeros(n_parts), jac=True, method="L-BFGS-B", bounds=bounds)
    out: F32 = np.exp(fit.x).astype(np.float32)
    return out
