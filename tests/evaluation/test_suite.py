"""The robustness suite: its variants, the table, the target checks and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metarec.core.events import Event, UserRecord
from metarec.data.dataset import Dataset
from metarec.errors import DataError
from metarec.evaluation.protocol import BASELINES, evaluate
from metarec.evaluation.suite import (
    FLOOR,
    SUITE_BUCKETS,
    SuiteReport,
    check_targets,
    movielens_folders,
    plot_png,
    stretched,
    targets_markdown,
    to_markdown,
    user_subset,
    without_profiles,
)


def _stream(n: int = 600) -> Dataset:
    rng = np.random.default_rng(0)
    events = [
        Event(
            f"u{int(rng.integers(t // 20, t // 20 + 5))}",
            f"i{int(rng.zipf(1.4)) % 30}",
            "click",
            1_000_000 + 60_000 * t,
        )
        for t in range(n)
    ]
    users = [UserRecord(f"u{u}", (f"g:{u % 2}",)) for u in range(40)]
    return Dataset("toy", events, users=users)


def test_variants_change_one_thing_each() -> None:
    ds = _stream()
    assert without_profiles(ds).users == [] and without_profiles(ds).events == ds.events
    long = stretched(ds, 30)
    assert [e.item for e in long.events] == [e.item for e in ds.events]
    span = ds.events[-1].ts - ds.events[0].ts
    assert long.events[-1].ts - long.events[0].ts == 30 * span
    third = user_subset(ds)
    users = {e.user for e in ds.events}
    kept = {e.user for e in third.events}
    assert kept < users and abs(len(kept) - len(users) / 3) <= 1
    assert [e for e in ds.events if e.user in kept] == third.events
    assert user_subset(ds).events == third.events  # a fixed draw


def test_table_targets_and_plot(tmp_path: Path) -> None:
    methods = {
        "pop": BASELINES["pop"],
        "itemknn": BASELINES["itemknn"],
        # Stand-ins under the method names the checks look for.
        "metarec": BASELINES["itemknn"],
        "metarec_no_meta": BASELINES["pop"],
        "metarec:bias": BASELINES["pop"],
    }
    report = evaluate(_stream(), methods, seeds=[0], progress=False, n_boot=20)
    suite = SuiteReport([report])
    table = to_markdown(suite)
    assert table.count("| toy |") == 5
    checks = check_targets(suite)
    targets = {c.target for c in checks}
    assert any(t.startswith("first20 >= 1.15") for t in targets)
    assert "2-5 >= 0.98 x best baseline" in targets
    floors = [c for c in checks if c.target.endswith("x best baseline")]
    assert len(floors) == len(SUITE_BUCKETS)  # every bucket, and parts are no baselines
    same = next(c for c in floors if c.target == "2-5 >= 0.98 x best baseline")
    assert same.met and same.reference_method == "itemknn" and same.metarec == same.reference
    parts = [c for c in checks if c.target.endswith("x best part")]
    assert len(parts) == len(SUITE_BUCKETS) and {c.reference_method for c in parts} == {
        "metarec:bias"
    }
    # A floor is a point estimate against FLOOR x the best: met exactly where that holds.
    for c in floors + parts:
        assert c.met == (c.metarec >= FLOOR * c.reference)
    first20 = next(c for c in checks if c.target.startswith("first20 >= 1.15"))
    assert not first20.met  # equal to the best baseline is not 15% above it
    assert "| toy |" in targets_markdown(checks)
    plot_png(suite, tmp_path / "suite.png")
    assert (tmp_path / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_suite_finds_both_movielens_folders(tmp_path: Path) -> None:
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("1\t2\t5\t10\n")
    with pytest.raises(DataError, match=r"no ratings\.csv in .*ml-latest-small"):
        movielens_folders(tmp_path)
    (tmp_path / "ml-latest-small").mkdir()
    (tmp_path / "ml-latest-small" / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    both = (tmp_path / "ml-100k", tmp_path / "ml-latest-small")
    assert movielens_folders(tmp_path) == both
    assert movielens_folders(tmp_path / "ml-100k") == both  # the ml-100k folder, as before
    with pytest.raises(DataError, match=r"no u\.data"):
        movielens_folders(tmp_path / "ml-latest-small")
