"""The in-process streaming metarec that ``metarec eval`` runs: the services' objects."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metarec.config import Settings
from metarec.core.events import Event, ItemRecord, UserRecord
from metarec.data.dataset import Dataset
from metarec.evaluation.online import OnlineMetarec
from metarec.evaluation.protocol import encode
from metarec.training.trainer import MetaTrainer
from tests.streams import feed

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

pytest.importorskip("tensorflow")


def _stream(n_events: int = 900, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    taste = rng.integers(0, 3, 60)
    events = []
    for t in range(n_events):
        u = int(rng.integers(0, 60))
        item = int(rng.integers(0, 10)) * 3 + int(taste[u])
        events.append(Event(f"u{u}", f"i{item}", "click", 1_000_000 + t * 60_000))
    items = [ItemRecord(f"i{j}", features=(f"kind:{j % 3}",)) for j in range(30)]
    users = [UserRecord(f"u{u}", features=(f"taste:{taste[u]}",)) for u in range(60)]
    return Dataset("toy", events, items, users)


def _learner(
    stream,
    trainer: MetaTrainer | None = None,  # type: ignore[no-untyped-def]
    **settings: int,
) -> OnlineMetarec:
    trainer = trainer or MetaTrainer(
        dim=8, history_length=6, inner_events=2, batch_size=64, max_steps=30, min_steps=5
    )
    s = dataclasses.replace(Settings.defaults(), history_length=6, **settings)
    return OnlineMetarec(stream, settings=s, trainer=trainer, seed=0)


def test_before_the_first_model_it_ranks_by_what_is_trending() -> None:
    stream = encode(_stream())
    rec = _learner(stream, min_events_for_model=10_000)
    feed(rec, stream, 0, 50)
    scores = rec.score(0, int(stream.ts[50]), 0, int(stream.n_seen[50]))
    trending = rec.learner.trending.features(int(stream.n_seen[50])).mean(axis=0)
    np.testing.assert_allclose(scores, trending, rtol=1e-6)
    assert rec.model is None


def test_trains_on_schedule_only_on_past_events_and_folds_in_the_partial_sums() -> None:
    stream = encode(_stream())
    rec = _learner(stream, min_events_for_model=300, retrain_events=300, window_events=250)
    feed(rec, stream, 0, 249)
    assert rec.model is None
    feed(rec, stream, 249, 250)  # the window holds 250 < 300 events: still waiting
    assert rec.model is None
    rec.schedule = dataclasses.replace(rec.schedule, min_events=250)
    feed(rec, stream, 250, 251)
    assert rec.model is not None and rec.model.version == 1
    window = rec.window.training_data()
    # The bounded window holds the most recent past events, nothing later.
    assert len(window) == 250 and window.ts.max() == stream.ts[250]
    feed(rec, stream, 251, 400)
    assert rec.partials.weights.sum() == 149
    theta0 = rec.model.theta0.copy()
    feed(rec, stream, 400, 551)
    assert rec.model.version == 2 and rec.partials.weights.sum() == 0
    assert rec.trainings[-1]["folded_weight"] == 300
    assert not np.allclose(rec.model.theta0, theta0)
    assert [t["reason"] for t in rec.trainings] == ["first model", "schedule"]


def test_a_trained_model_ranks_a_users_taste_first() -> None:
    stream = encode(_stream(n_events=1500))
    trainer = MetaTrainer(
        dim=8,
        history_length=6,
        inner_events=2,
        batch_size=64,
        max_steps=300,
        min_steps=300,
        learning_rate=0.05,
    )
    rec = _learner(stream, trainer, min_events_for_model=1400, retrain_events=10_000)
    feed(rec, stream, 0, 1400)
    assert rec.model is not None
    hits = []
    for u in range(20):
        taste = int(stream.user_features[u][0].split(":")[1])
        scores = rec.score(u, int(stream.ts[-1]), 0, stream.n_items)
        top = np.argsort(-scores)[:5]
        kinds = [int(stream.item_ids[j][1:]) % 3 for j in top]
        hits.append(np.mean([k == taste for k in kinds]))
    assert np.mean(hits) > 0.8
