"""The dataset dispatcher: names for synthetic streams, paths for MovieLens, errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from metarec.data.registry import load_dataset
from metarec.data.synthetic import SyntheticConfig, generate
from metarec.errors import DataError


@pytest.mark.slow
def test_synthetic_names() -> None:
    small = load_dataset("synthetic-small", seed=4)
    assert small.events == generate(SyntheticConfig.small(), seed=4).events
    assert load_dataset("synthetic-small").scenario["seed"] == 0
    assert load_dataset("synthetic").name == "synthetic"


def test_movielens_paths(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "u.data").write_text("1\t2\t5\t10\n1\t3\t2\t11\n")
    ds = load_dataset(str(old))
    assert [(e.item, e.type, e.ts) for e in ds.events] == [
        ("2", "like", 10_000),
        ("3", "click", 11_000),
    ]
    new = tmp_path / "new"
    new.mkdir()
    (new / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,4.5,10\n1,3,1,11\n")
    assert len(load_dataset(str(new), limit=1).events) == 1


@pytest.mark.parametrize("spec", ["movielens", "synthetic-large", ""])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(spec)


def test_folder_without_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"neither u\.data"):
        load_dataset(str(tmp_path))
