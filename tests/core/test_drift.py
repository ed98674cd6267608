"""Per-user drift: ADWIN per user, bounded memory, and the history cut after a change."""

from __future__ import annotations

import numpy as np

from metarec.core.adaptation import UserBatch
from metarec.core.drift import (
    BOOST,
    KEEP_AFTER_DRIFT,
    MAX_BOOST_EVENTS,
    DriftMonitor,
    UserDrift,
    cut_history,
    respond,
)
from metarec.core.model import MetaModel

HISTORY = 8


def batch(n: int = 2) -> UserBatch:
    users = UserBatch.empty(n, MetaModel.initial(4, history_length=HISTORY))
    users.hist_items[:] = np.arange(HISTORY)
    users.hist_weights[:] = 1.0
    users.delta[:] = 0.5
    return users


def test_a_user_whose_hits_stop_drifts_and_is_boosted_until_back() -> None:
    d = UserDrift(min_events=5, delta=0.5)
    assert not any(d.update("u", 1.0) for _ in range(40))
    assert any(d.update("u", 0.0) for _ in range(40))
    assert d.boosted("u")
    assert d.step_scale(["u", "stranger"]).tolist() == [BOOST, 1.0]
    for _ in range(MAX_BOOST_EVENTS):
        d.update("u", 0.0)
    assert not d.boosted("u"), "a boost must end even if the rate never comes back"


def test_users_too_new_to_judge_get_no_detector_and_memory_is_bounded() -> None:
    d = UserDrift(min_events=10, max_users=3)
    assert not d.update("new", 0.0, n_events=2)
    assert "new" not in d._watch
    for u in "abcd":
        d.update(u, 1.0, n_events=50)
    assert list(d._watch) == ["b", "c", "d"], "the least recently active user goes first"


def test_cut_history_keeps_the_newest_events_and_restarts_the_offset() -> None:
    users = batch()
    cut_history(users, 0)
    assert users.hist_items[0].tolist() == [-1] * (HISTORY - KEEP_AFTER_DRIFT) + list(
        range(HISTORY - KEEP_AFTER_DRIFT, HISTORY)
    )
    assert users.hist_weights[0, 0] == 0.0 and not users.delta[0].any()
    assert users.hist_items[1].tolist() == list(range(HISTORY)), "other rows untouched"


def test_a_domain_change_cuts_a_missing_user_back_to_the_change() -> None:
    users = batch()
    hist_ts = np.arange(HISTORY, dtype=np.int64) * 100  # 0, 100, ..., 700
    d = UserDrift()
    # A hit: the lists still suit them, nothing to do.
    assert not respond(d, users, 0, "u0", True, hist_ts, since=450, baseline=0.3)
    # A miss with history from before the change: cut back to it (500, 600, 700 kept).
    assert respond(d, users, 0, "u0", False, hist_ts, since=450, baseline=0.3)
    assert users.hist_items[0].tolist() == [-1] * 5 + [5, 6, 7]
    assert d.boosted("u0")
    # Now their history is all from after the change: no second cut.
    assert not respond(d, users, 0, "u0", False, hist_ts, since=450, baseline=0.3)
    # Without a domain change a miss is just a miss.
    assert not respond(d, users, 1, "u1", False, hist_ts, since=None, baseline=0.3)
    assert users.hist_items[1].tolist() == list(range(HISTORY))


def test_a_refuted_change_is_forgotten_and_asks_for_no_recovery() -> None:
    m = DriftMonitor(k=10, window=50)
    users = [f"u{i % 40}" for i in range(400)]
    m.observe(["g"] * 400, [0] * 200 + [-1] * 200, list(range(400)), users)
    assert m.drifting_domains() == ["g"] and "g" in m.since
    assert m.after_reload() is not None  # recovering: the next version at once
    m.refuted()
    assert m.drifting_domains() == [] and m.since == {}
    assert m.after_reload() is None
    # A later drop is a change again.
    more = m.observe(["g"] * 400, [0] * 200 + [-1] * 200, list(range(400, 800)), users)
    assert len(more) == 1 and "g" in m.since
