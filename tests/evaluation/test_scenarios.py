"""The drift and cross-domain mechanisms act (small versions of the eval scenarios)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from metarec.config import Settings
from metarec.core.events import Event
from metarec.data.dataset import Dataset
from metarec.data.synthetic import generate
from metarec.evaluation.online import OnlineMetarec
from metarec.evaluation.protocol import encode
from metarec.evaluation.scenarios import (
    _split_by_domain,
    cross_domain_config,
    plot_png,
    recovery_events,
    rolling_curve,
)
from metarec.training.trainer import MetaTrainer
from tests.streams import feed

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

pytest.importorskip("tensorflow")


def test_recovery_counts_events_until_the_rate_is_back() -> None:
    hits = [1.0] * 10 + [0.0] * 6 + [1.0] * 10
    before, n = recovery_events(hits, change=10, window=4)
    assert before == 1.0 and n == 10
    assert recovery_events([1.0] * 20, change=10, window=4) == (1.0, 0)
    assert recovery_events([1.0] * 10 + [0.0] * 10, change=10, window=4)[1] is None


def test_the_drift_curve_and_both_plots(tmp_path: Path) -> None:
    hits = [1.0] * 10 + [0.0] * 10
    curve = rolling_curve(hits, change=10, window=5, every=5)
    assert curve == [(-6, 1.0), (-1, 1.0), (4, 0.0), (9, 0.0)]
    drift = {
        "scenario": "drift",
        "window": 5,
        "runs": [{"seed": 0, "without": {"curve": curve}, "with": {"curve": curve}}],
    }
    cross = {
        "scenario": "cross-domain",
        "events": 5,
        "methods": {
            "a": {"hr10": 0.2, "hr10_ci": [0.1, 0.3]},
            "b": {"hr10": 0.4, "hr10_ci": [0.3, 0.5]},
        },
    }
    for name, result in (("drift", drift), ("cross", cross)):
        plot_png(result, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _taste_stream(n_events: int, seed: int = 0) -> Dataset:
    """Users with one of three tastes (items ≡ taste mod 3): easy to learn, so a change shows."""
    rng = np.random.default_rng(seed)
    taste = rng.integers(0, 3, 80)
    events = []
    for t in range(n_events):
        u = int(rng.integers(0, 80))
        item = int(rng.integers(0, 40)) * 3 + int(taste[u])
        events.append(Event(f"u{u}", f"i{item}", "click", 1_000_000 + t * 60_000))
    return Dataset("tastes", events)


def test_an_abrupt_change_is_detected_and_retrains_early() -> None:
    ds = _taste_stream(4000)
    # The change: from the middle on, every item is swapped for another one, so what users
    # consume no longer follows anything the model learned.
    half = len(ds.events) // 2
    items = sorted({e.item for e in ds.events})
    swap = dict(zip(items, np.random.default_rng(0).permutation(items).tolist(), strict=True))
    events = ds.events[:half] + [
        dataclasses.replace(e, item=swap[e.item]) for e in ds.events[half:]
    ]
    stream = encode(Dataset("changed", events))
    settings = dataclasses.replace(
        Settings.defaults(), min_events_for_model=400, retrain_events=10_000
    )
    rec = OnlineMetarec(
        stream,
        settings=settings,
        trainer=MetaTrainer(dim=8, min_steps=50, max_steps=80, learning_rate=0.05),
        seed=0,
    )
    feed(rec, stream, 0, stream.n_events)
    reasons = [str(t["reason"]) for t in rec.trainings]
    assert reasons[0] == "first model"
    early = [t for t in rec.trainings if str(t["reason"]).startswith("drift in domain")]
    assert early and all(int(str(t["at_event"])) > half for t in early), reasons
    # ... each judged: this stream's few users leave too few held-out events of the new
    # regime to judge by, so the whole window keeps serving (no past dropped without
    # evidence) and the floor waits for the next cycle.
    assert all(t["drift"] == "undecided" and t["events"] > half for t in early), early
    assert rec.floor is not None and int(rec.floor) > int(stream.ts[half - 1])
    assert rec.learner.drift.live.get()["default"]["drifts"] > 0
    # No user's history is cut back to a change that no model has confirmed.
    assert rec.user_drifts == 0


def test_transfer_changes_a_movers_first_list_in_the_new_domain() -> None:
    ds = generate(cross_domain_config(small=True), 0)
    stream = encode(ds)
    moves = ds.scenario["moves"]
    assert isinstance(moves, list)
    move = next(m for m in moves if m["ts"] > stream.ts[1200])
    settings = dataclasses.replace(Settings.defaults(), min_events_for_model=1000)
    rec = OnlineMetarec(
        stream, settings=settings, trainer=MetaTrainer(dim=16, min_steps=50, max_steps=60), seed=0
    )
    first_new = int(
        np.flatnonzero(
            (stream.ts >= move["ts"]) & (stream.users == stream.user_ids.index(move["user"]))
        )[0]
    )
    feed(rec, stream, 0, first_new)
    assert rec.model is not None
    user = stream.user_ids.index(move["user"])
    domain = stream.domain_names.index(move["to"])
    n = int(stream.n_seen[first_new])
    with_history = np.argsort(-rec.score(user, int(stream.ts[first_new]), domain, n))[:10]
    saved = rec.states.pop(move["user"])  # the same user as a stranger to every domain
    fresh = np.argsort(-rec.score(user, int(stream.ts[first_new]), domain, n))[:10]
    rec.states[move["user"]] = saved
    assert set(with_history.tolist()) != set(fresh.tolist())


def test_split_by_domain_makes_one_user_per_domain() -> None:
    ds = Dataset("d", [Event("u", "a", "click", 1, "books"), Event("u", "b", "click", 2, "music")])
    split = _split_by_domain(ds)
    assert [e.user for e in split.events] == ["u@books", "u@music"]
