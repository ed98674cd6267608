"""MovieLens loaders, on tiny fixture folders written here (the real data may not be copied)."""

from __future__ import annotations

from pathlib import Path

import pytest

from metarec.core.events import DEFAULT_DOMAIN
from metarec.data.movielens import (
    ML100K_GENRES,
    age_bucket,
    load_ml100k,
    load_movielens,
    load_movielens_csv,
    rating_type,
)
from metarec.errors import DataError

REAL_ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens" / "ml-100k"


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in ML100K_GENRES)


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    # Two ratings share a timestamp (user 3 then user 1 in file order) and the file is not
    # in time order, so the loader's stable sort is visible.
    (folder / "u.data").write_text(
        "3\t20\t5\t881250950\n1\t10\t3\t881250949\n1\t20\t4\t881250950\n2\t30\t1\t881250900\n"
    )
    (folder / "u.item").write_bytes(
        (
            f"10|Café Society (1995)|01-Jan-1995||http://x|{_flags('Comedy', 'Drama')}\n"
            f"20|Old Film (1931)|01-Jan-1931||http://x|{_flags('Film-Noir')}\n"
            f"30|unknown||||{_flags('unknown')}\n"
            f"40|Never Rated (1977)|01-Jan-1977||http://x|{_flags('Sci-Fi')}\n"
        ).encode("latin-1")
    )
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|17|F|writer|T8H1N\n3|60|F|other|\n")
    (folder / "u.genre").write_text(
        "".join(f"{name}|{i}\n" for i, name in enumerate(ML100K_GENRES)) + "\n"
    )
    return folder


@pytest.fixture
def ml_csv(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,11,4.0,964982703\n"
        "1,12,3.5,964982600\n"
        "2,11,0.5,964982703\n"
        "2,13,5.0,964982800\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "12,Untitled,(no genres listed)\n"
        '13,"Show, A (2006–2010)",Documentary\n'
        "14,Never Rated (1977),Sci-Fi\n",
        encoding="utf-8",
    )
    return folder


def test_rating_type_and_age_bucket() -> None:
    assert [rating_type(r) for r in (0.5, 3.5, 4.0, 5)] == ["click", "click", "like", "like"]
    ages = {
        17: "age:<18",
        18: "age:18-24",
        24: "age:18-24",
        25: "age:25-34",
        35: "age:35-44",
        45: "age:45-49",
        50: "age:50-55",
        55: "age:50-55",
        56: "age:56+",
    }
    assert {a: age_bucket(a) for a in ages} == ages


def test_ml100k_events_sorted_stably_in_ms(ml100k: Path) -> None:
    ds = load_ml100k(ml100k)
    assert ds.name == "ml-100k"
    assert [(e.user, e.item, e.type, e.ts) for e in ds.events] == [
        ("2", "30", "click", 881250900000),
        ("1", "10", "click", 881250949000),
        ("3", "20", "like", 881250950000),  # ties keep file order: user 3 came first
        ("1", "20", "like", 881250950000),
    ]
    assert {e.domain for e in ds.events} == {DEFAULT_DOMAIN}
    assert ds.events[0].event_id == "ml-2-30"


def test_ml100k_item_and_user_features(ml100k: Path) -> None:
    ds = load_ml100k(ml100k)
    items = {r.item: r for r in ds.items}
    assert items["10"].features == ("genre:Comedy", "genre:Drama", "decade:1990s")
    assert items["20"].features == ("genre:Film-Noir", "decade:1930s")
    assert items["30"].features == ()  # "unknown" genre and no release date
    assert items["10"].ts == 881250949000  # announced at its first rating
    assert items["40"].ts == 0  # in u.item but never rated
    users = {r.user: r for r in ds.users}
    assert users["1"].features == ("age:18-24", "gender:M", "occupation:technician", "zip1:8")
    assert users["2"].features == ("age:<18", "gender:F", "occupation:writer", "zip1:T")
    assert users["3"].features == ("age:56+", "gender:F", "occupation:other")
    assert users["2"].ts == 881250900000


def test_ml100k_without_metadata_and_default_genres(ml100k: Path) -> None:
    (ml100k / "u.genre").unlink()
    assert load_ml100k(ml100k).items[0].features == ("genre:Comedy", "genre:Drama", "decade:1990s")
    (ml100k / "u.item").unlink()
    (ml100k / "u.user").unlink()
    ds = load_ml100k(ml100k)
    assert {r.item for r in ds.items} == {"10", "20", "30"}
    assert all(r.features == () for r in ds.items)
    assert all(u.features == () for u in ds.users)


def test_ml100k_bad_line_names_file_and_line(ml100k: Path) -> None:
    with (ml100k / "u.data").open("a") as fh:
        fh.write("4\t50\tfive\t881250999\n")
    with pytest.raises(DataError, match=r"u\.data:5: rating 'five'"):
        load_ml100k(ml100k)


def test_csv_release(ml_csv: Path) -> None:
    ds = load_movielens_csv(ml_csv)
    assert ds.name == "ml-latest-small"
    assert [(e.user, e.item, e.type, e.ts) for e in ds.events] == [
        ("1", "12", "click", 964982600000),
        ("1", "11", "like", 964982703000),
        ("2", "11", "click", 964982703000),
        ("2", "13", "like", 964982800000),
    ]
    items = {r.item: r.features for r in ds.items}
    assert items["11"] == ("genre:Comedy", "genre:Drama", "genre:Romance", "decade:1990s")
    assert items["12"] == ()
    assert items["13"] == ("genre:Documentary", "decade:2000s")
    assert [(u.user, u.features) for u in ds.users] == [("1", ()), ("2", ())]


def test_csv_limit_reads_first_rows_in_file_order(ml_csv: Path) -> None:
    ds = load_movielens_csv(ml_csv, limit=2)
    assert [(e.user, e.item) for e in ds.events] == [("1", "12"), ("1", "11")]
    assert load_movielens_csv(ml_csv, limit=0).events == []


def test_csv_bad_header(ml_csv: Path) -> None:
    (ml_csv / "ratings.csv").write_text("user,item,rating,ts\n1,2,3,4\n")
    with pytest.raises(DataError, match="header"):
        load_movielens_csv(ml_csv)


def test_detection(ml100k: Path, ml_csv: Path, tmp_path: Path) -> None:
    assert load_movielens(ml100k).events[0].event_id == "ml-2-30"
    assert len(load_movielens(ml100k, limit=1).events) == 1
    assert load_movielens(ml_csv).name == "ml-latest-small"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty holds neither u\.data .* nor ratings\.csv"):
        load_movielens(empty)
    with pytest.raises(DataError, match="not a folder"):
        load_movielens(tmp_path / "missing")


@pytest.mark.skipif(not REAL_ML100K.is_dir(), reason=f"MovieLens 100K not found at {REAL_ML100K}")
def test_real_ml100k() -> None:
    ds = load_movielens(REAL_ML100K)
    assert len(ds.events) == 100_000
    assert len({e.user for e in ds.events}) == len(ds.users) == 943
    assert len({e.item for e in ds.events}) == len(ds.items) == 1682
    assert all(a.ts <= b.ts for a, b in zip(ds.events, ds.events[1:], strict=False))
    assert len({e.event_id for e in ds.events}) == 100_000
    assert all(r.features for r in ds.users)
