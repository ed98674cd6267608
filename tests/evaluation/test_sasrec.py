"""SASRec: the numpy scorer is the TensorFlow encoder, it learns a sequence, it refits on
schedule. (The recommender contract is checked with the other methods in test_baselines.)"""

from __future__ import annotations

import numpy as np
import pytest

from metarec.errors import ConfigError
from metarec.evaluation.recommender import Interaction
from metarec.evaluation.sasrec import SASRec, _tf_encoder

pytest.importorskip("tensorflow")


def test_numpy_scoring_runs_the_encoder_that_was_trained() -> None:
    import tensorflow as tf

    rec = SASRec(dim=8, blocks=2, max_len=6, seed=3)
    rng = np.random.default_rng(0)
    # Every parameter random, layer norms included, so that each one is checked.
    params = {
        k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in rec._initial(12).items()
    }
    params["item"][0] = 0.0
    rec._params, rec._n_fitted = params, 12
    encode = _tf_encoder(2, 8, 0.0)
    for items in ([3], [0, 5, 11, 2], [4, 4, 7, 1, 9, 10, 6, 8]):
        seq = np.asarray(items, np.int64)
        window = np.zeros(6, np.int64)
        kept = seq[-6:] + 1
        window[6 - kept.size :] = kept
        expected = encode(
            {k: tf.constant(v) for k, v in params.items()},
            tf.constant(window[None]),
            tf.constant([0, 0], tf.int64),
        ).numpy()[0, -1]
        np.testing.assert_allclose(rec._encode(seq), expected, rtol=1e-4, atol=1e-4)


def test_it_learns_what_comes_next_and_refits_on_schedule() -> None:
    rec = SASRec(
        dim=16,
        blocks=1,
        max_len=8,
        negatives=8,
        refit_every=400,
        epochs=30,
        learning_rate=0.01,
        seed=0,
    )
    # Every user walks the same cycle of 8 items from a different start.
    t = 0
    for step in range(50):
        for user in range(8):
            rec.learn_one(Interaction(user=user, item=(user + step) % 8, ts=t))
            t += 1
    assert rec.fits == 1 and len(rec.fit_seconds) == 1
    hits = 0
    for user in range(8):
        last = (user + 49) % 8
        scores = rec.score(user, t, 0, 8)
        hits += int(np.argmax(scores) == (last + 1) % 8)
    assert hits == 8


@pytest.mark.parametrize(
    "bad", [{"dim": 0}, {"refit_every": 0}, {"dropout": 1.0}, {"epochs": 0}, {"learning_rate": 0}]
)
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SASRec(**bad)  # type: ignore[arg-type]
