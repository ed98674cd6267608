"""When a retraining is due, and what one does with the window and the partial sums."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.core.model import MetaModel
from metarec.core.reptile import PartialSums
from metarec.core.window import EventWindow
from metarec.training.retraining import Retrainer, RetrainSchedule
from metarec.training.trainer import MetaTrainer

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def test_the_schedule_first_model_then_every_n_events() -> None:
    s = RetrainSchedule(min_events=100, every_events=1000)
    assert s.due(has_model=False, window_events=99, new_events=99) is None
    assert s.due(has_model=False, window_events=100, new_events=100) == "first model"
    assert s.due(has_model=True, window_events=5000, new_events=999) is None
    assert s.due(has_model=True, window_events=5000, new_events=1000) == "schedule"


def test_a_drift_request_waits_for_the_new_regime_and_holds_the_schedule_back() -> None:
    s = RetrainSchedule(min_events=100, every_events=1000)
    wait = dict(has_model=True, window_events=5000, request="drift in 'g'")
    assert s.due(new_events=99, events_since_floor=500, **wait) is None  # type: ignore[arg-type]
    # Plenty of new events, but too few since the change: no schedule either.
    assert s.due(new_events=5000, events_since_floor=99, **wait) is None  # type: ignore[arg-type]
    assert s.due(new_events=100, events_since_floor=100, **wait) == "drift in 'g'"  # type: ignore[arg-type]
    assert s.due(new_events=0, events_since_floor=None, immediate=True, **wait) == "drift in 'g'"  # type: ignore[arg-type]


def _window(n: int, start_ts: int = 0) -> EventWindow:
    rng = np.random.default_rng(0)
    w = EventWindow(10_000)
    for k in range(n):
        w.append(f"u{rng.integers(20)}", f"i{rng.integers(15)}", start_ts + k, 1.0, "default")
    return w


def _retrainer() -> Retrainer:
    return Retrainer(MetaTrainer(dim=4, history_length=5, batch_size=32, min_steps=3, max_steps=3))


def test_a_window_too_small_to_hold_users_out_never_drops_its_past_for_a_floor() -> None:
    pytest.importorskip("tensorflow")
    w = _window(300)  # 20 users: too few to hold any out
    r = _retrainer()
    first = r.train(w, None, floor=None, version=1)
    assert first is not None and first.info["events"] == 300
    assert not first.info["fresh_start"] and first.info["floor_ts"] is None
    again = r.train(w, first, floor=200, version=2)
    assert again is not None and again.info["drift"] == "undecided"
    assert again.info["events"] == 300 and not again.info["fresh_start"]
    assert r.train(w, again, floor=299, version=3) is None  # one event: nothing to learn


def test_the_fold_moves_theta0_to_the_weighted_mean_by_domain_name() -> None:
    current = MetaModel.initial(2, domains=("books", "music"))
    model = MetaModel.initial(2, domains=("music", "books"))
    p = PartialSums.zeros(2, 2)
    p.add([0, 0, 1], [[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]], [1.0, 1.0, 2.0])
    folded, weight = Retrainer().fold(model, current, [p])
    assert weight == 4.0
    assert folded.theta0.tolist() == [[0.0, 4.0], [2.0, 1.0]]  # music, then books
    model.info["fresh_start"] = True
    assert Retrainer().fold(model, current, [p]) == (model, 0.0)
    assert Retrainer().fold(model, None, [p])[1] == 0.0


def _regimes(n_a: int, n_b: int) -> EventWindow:
    """``n_a`` events of 200 users on items i0-i24, then ``n_b`` on items i25-i49; each
    user keeps to one group of five items (what a trained model can learn)."""
    rng = np.random.default_rng(1)
    w = EventWindow(100_000)
    for k in range(n_a + n_b):
        user = int(rng.integers(200))
        first = 0 if k < n_a else 25
        item = first + 5 * (user % 5) + int(rng.integers(5))
        w.append(f"u{user}", f"i{item}", k, 1.0, "default")
    return w


def _trainer(steps: int) -> MetaTrainer:
    return MetaTrainer(dim=8, history_length=5, batch_size=64, min_steps=steps, max_steps=steps)


def test_a_new_floor_is_refuted_when_the_whole_window_predicts_the_new_events_better() -> None:
    pytest.importorskip("tensorflow")
    w = _regimes(6000, 0)
    current = _trainer(150).fit(w.training_data(), version=1)
    # Three steps from scratch cannot beat 150 on the same kind of events.
    got = Retrainer(_trainer(3)).train(w, current, floor=3000, version=2)
    assert got is not None and got.info["drift"] == "refuted"
    assert got.info["whole_window_loss"] <= got.info["candidate_loss"]
    # An ordinary warm cycle on the whole window, with no floor left behind.
    assert got.info["events"] == 6000 and got.info["floor_ts"] is None
    assert got.info["refuted_floor"] == 3000 and not got.info["fresh_start"]


def test_a_new_floor_is_confirmed_when_a_model_of_the_new_regime_predicts_it_better() -> None:
    pytest.importorskip("tensorflow")
    w = _regimes(3000, 3000)
    # The same draws: the first 3000 events of ``w``, the regime before the change.
    current = _trainer(150).fit(_regimes(3000, 0).training_data(), version=1)
    got = Retrainer(_trainer(150)).train(w, current, floor=3000, version=2)
    assert got is not None and got.info["drift"] == "confirmed"
    assert got.info["candidate_loss"] < got.info["whole_window_loss"]
    assert got.info["fresh_start"] and got.info["floor_ts"] == 3000 and got.info["events"] == 3000


def test_a_model_that_only_saw_newer_events_is_no_evidence_of_a_new_regime() -> None:
    pytest.importorskip("tensorflow")
    w = _regimes(6000, 0)
    # A current model that knows almost nothing: any model trained on the new events would
    # predict them better than it. The verdict weighs the new regime against the whole
    # window trained on the same events, so one regime throughout is refuted.
    stale = _trainer(1).fit(_regimes(3000, 0).training_data(), version=1)
    got = Retrainer(_trainer(150)).train(w, stale, floor=3000, version=2)
    assert got is not None and got.info["drift"] == "refuted"
    assert got.info["whole_window_loss"] <= got.info["candidate_loss"]
    assert got.info["events"] == 6000 and got.info["floor_ts"] is None


def test_too_few_held_out_events_since_a_floor_leave_it_undecided_and_the_window_serving() -> None:
    pytest.importorskip("tensorflow")
    w = _regimes(6000, 0)
    current = _trainer(150).fit(w.training_data(), version=1)
    # 100 events since the floor: too few for the new-regime model to hold any out. No
    # evidence is no reason to throw the window away; the floor waits for the next cycle.
    got = Retrainer(_trainer(150)).train(w, current, floor=5900, version=2)
    assert got is not None and got.info["drift"] == "undecided"
    assert got.info["candidate_loss"] is None
    assert got.info["events"] == 6000 and got.info["floor_ts"] is None
    assert not got.info["fresh_start"]


def test_every_cycle_under_a_floor_judges_again_and_a_faded_floor_ends() -> None:
    pytest.importorskip("tensorflow")
    # One regime throughout: a model of the events since 3000, serving under that floor,
    # is overtaken by the whole window at the next cycle; the floor ends there.
    w = _regimes(6000, 0)
    current = _trainer(150).fit(w.training_data(since_ts=3000), version=1)
    current.info["floor_ts"] = 3000
    got = Retrainer(_trainer(150)).train(w, current, floor=3000, version=2)
    assert got is not None and got.info["drift"] == "refuted"
    assert got.info["events"] == 6000 and got.info["floor_ts"] is None


def _regrouped(n_a: int, n_b: int) -> EventWindow:
    """Like :func:`_regimes`, but after ``n_a`` events the same 25 items form new groups
    of five (a fixed shuffle): which items go together, what the window taught before the
    change, now misleads."""
    rng = np.random.default_rng(2)
    shuffle = np.random.default_rng(3).permutation(25)
    w = EventWindow(100_000)
    for k in range(n_a + n_b):
        user = int(rng.integers(200))
        slot = 5 * (user % 5) + int(rng.integers(5))
        item = slot if k < n_a else int(shuffle[slot])
        w.append(f"u{user}", f"i{item}", k, 1.0, "default")
    return w


def test_a_floor_that_still_holds_is_kept_and_trained_warm() -> None:
    pytest.importorskip("tensorflow")
    w = _regrouped(9000, 3000)
    current = _trainer(150).fit(w.training_data(since_ts=9000), version=1)
    current.info["floor_ts"] = 9000
    got = Retrainer(_trainer(150)).train(w, current, floor=9000, version=2)
    assert got is not None and got.info["drift"] == "confirmed"
    assert got.info["candidate_loss"] < got.info["whole_window_loss"]
    assert not got.info["fresh_start"] and got.info["floor_ts"] == 9000
    assert got.info["events"] == 3000
