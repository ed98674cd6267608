"""The prequential harness against hand-computed ranks, and its reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from metarec.core.events import Event, ItemRecord, UserRecord
from metarec.data.dataset import Dataset
from metarec.errors import DataError
from metarec.evaluation.protocol import (
    BASELINES,
    BUCKETS,
    DETERMINISTIC,
    EncodedStream,
    EvaluationReport,
    PrequentialRecords,
    aggregate,
    encode,
    evaluate,
    plot_png,
    prequential,
    select_evaluated_users,
    to_json,
    to_markdown,
)
from metarec.evaluation.recommender import Interaction, Recommender

ML100K = Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens" / "ml-100k"


class Fixed:
    """Scores item ``i`` as ``values[i]`` for everyone and records what it is asked."""

    def __init__(self, values: npt.ArrayLike):
        self.values = np.asarray(values, dtype=np.float64)
        self.calls: list[tuple[int, int]] = []
        self.learned: list[Interaction] = []

    def score(self, user: int, ts: int, domain: int, n_items: int) -> npt.NDArray[np.float64]:
        self.calls.append((user, n_items))
        return self.values[:n_items].copy()

    def learn_one(self, x: Interaction) -> None:
        self.learned.append(x)


def _events(pairs: list[tuple[str, str]], types: list[str] | None = None) -> Dataset:
    kinds = types or ["click"] * len(pairs)
    return Dataset(
        "toy",
        [
            Event(u, i, kind, ts=1000 * t)
            for t, ((u, i), kind) in enumerate(zip(pairs, kinds, strict=True))
        ],
    )


def _run(ds: Dataset, rec: Fixed, k: int = 2) -> PrequentialRecords:
    stream = encode(ds)
    return prequential(
        stream, lambda s, seed: rec, seed=0, evaluated_users=select_evaluated_users(stream), k=k
    )


# -- encoding ---------------------------------------------------------------------------


def test_encode_numbers_by_first_appearance_with_metadata() -> None:
    ds = Dataset(
        "toy",
        [
            Event("a", "x", "like", 1, "books"),
            Event("b", "y", "click", 2, "films"),
            Event("a", "y", "dislike", 3, "films"),
        ],
        items=[ItemRecord("y", "books", ("tag:1",)), ItemRecord("z", "music", ("tag:2",))],
        users=[UserRecord("b", ("age:30",)), UserRecord("c", ("new",))],
    )
    s = encode(ds)
    assert s.user_ids == ["a", "b", "c"] and s.item_ids == ["x", "y", "z"]
    assert s.domain_names == ["books", "films", "music"]
    assert s.users.tolist() == [0, 1, 0] and s.items.tolist() == [0, 1, 1]
    assert s.domains.tolist() == [0, 1, 1] and s.weights.tolist() == [2.0, 1.0, -1.0]
    assert s.ts.dtype == np.int64 and s.users.dtype == np.int32
    # Item domain from its record when there is one, else from its first event.
    assert s.item_domains.tolist() == [0, 0, 2]
    assert s.item_features == [(), ("tag:1",), ("tag:2",)]
    assert s.user_features == [(), ("age:30",), ("new",)]
    assert s.n_seen.tolist() == [0, 1, 2]
    assert (s.n_events, s.n_users, s.n_items, s.n_domains) == (3, 3, 3, 3)


def test_encode_rejects_unknown_types_and_disorder() -> None:
    with pytest.raises(DataError, match="'view'"):
        encode(Dataset("d", [Event("a", "x", "view", 1)]))
    assert encode(Dataset("d", [Event("a", "x", "view", 1)]), {"view": 0.5}).weights[0] == 0.5
    with pytest.raises(DataError, match="timestamp order"):
        encode(Dataset("d", [Event("a", "x", "click", 5), Event("a", "y", "click", 1)]))


def test_evaluated_users_start_in_the_second_half() -> None:
    ds = _events([("a", "x"), ("b", "x"), ("a", "y"), ("c", "x"), ("b", "z"), ("d", "x")])
    s = encode(ds)
    assert [s.user_ids[u] for u in select_evaluated_users(s)] == ["c", "d"]


# -- per-event metrics ------------------------------------------------------------------


def test_ranks_exclusion_misses_and_growing_candidates_by_hand() -> None:
    # a is in the first half (not evaluated); b starts at position 4 of 8.
    ds = _events(
        [
            ("a", "x0"),
            ("a", "x1"),
            ("a", "x2"),
            ("a", "x3"),
            ("b", "x1"),
            ("b", "x3"),
            ("b", "x4"),
            ("b", "x0"),
        ]
    )
    rec = Fixed([4.0, 3.0, 2.0, 1.0, 0.0])
    out = _run(ds, rec, k=2)
    assert out.n.tolist() == [1, 2, 3, 4]
    assert out.event.tolist() == [4, 5, 6, 7]
    # x1: only x0 above it among 4 candidates.
    # x3: x0, x1, x2 above, but x1 is consumed: rank 2, outside the top 2.
    # x4: first seen now, not a candidate: a miss.
    # x0: the best of 5 candidates.
    np.testing.assert_array_equal(out.rank, [1.0, 2.0, math.nan, 0.0])
    np.testing.assert_allclose(out.hr, [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(out.ndcg, [1 / math.log2(3), 0.0, 0.0, 1.0])
    # The candidate set is the items seen before the event; unreachable items are not scored.
    assert rec.calls == [(1, 4), (1, 4), (1, 5)]
    # Every event is learned, evaluated or not, in stream order.
    assert [(x.user, x.item) for x in rec.learned] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 1),
        (1, 3),
        (1, 4),
        (1, 0),
    ]


def test_ties_give_the_expected_metric_of_a_random_order() -> None:
    ds = _events([("a", f"x{j}") for j in range(6)] + [("c", "y")] * 5 + [("b", "x2")])
    rec = Fixed(np.zeros(10))
    out = _run(ds, rec, k=3)
    b = out.user == encode(ds).user_ids.index("b")
    # 7 tied candidates (x0..x5, y): the true item is equally likely in each position.
    assert out.hr[b][0] == pytest.approx(3 / 7)
    assert out.ndcg[b][0] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(3)) / 7)
    assert out.rank[b][0] == pytest.approx(3.0)


def test_repeats_are_misses_and_dislikes_are_not_scored() -> None:
    ds = _events(
        [("a", "x"), ("a", "y"), ("a", "z"), ("b", "x"), ("b", "x"), ("b", "y")],
        types=["click"] * 4 + ["click", "dislike"],
    )
    rec = Fixed([3.0, 2.0, 1.0])
    out = _run(ds, rec, k=10)
    assert out.n.tolist() == [1, 2]  # the dislike (event 3 of b) is learned, not scored
    assert out.hr.tolist() == [1.0, 0.0]
    assert math.isnan(out.rank[1])
    assert len(rec.learned) == 6 and rec.learned[-1].weight == -1.0


def test_wrong_score_shape_is_reported() -> None:
    class Short(Fixed):
        def score(self, user: int, ts: int, domain: int, n_items: int) -> npt.NDArray[np.float64]:
            return np.zeros(1)

    with pytest.raises(ValueError, match="shape"):
        _run(_events([("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]), Short([0.0]))


def test_progress_counts_every_event_and_inputs_stay_untouched() -> None:
    ds = _events([(f"u{t % 5}", f"i{t % 7}") for t in range(5000)])
    stream = encode(ds)
    items = stream.items.copy()
    done: list[int] = []
    prequential(
        stream,
        BASELINES["pop"],
        seed=0,
        evaluated_users=select_evaluated_users(stream),
        progress=done.append,
    )
    assert sum(done) == 5000
    np.testing.assert_array_equal(stream.items, items)


# -- aggregation ------------------------------------------------------------------------


def _records(users: npt.ArrayLike, n: npt.ArrayLike, hr: npt.ArrayLike) -> PrequentialRecords:
    u = np.asarray(users, dtype=np.int32)
    h = np.asarray(hr, dtype=np.float64)
    return PrequentialRecords(
        user=u,
        n=np.asarray(n, dtype=np.int32),
        event=np.arange(u.size),
        hr=h,
        ndcg=h / 2,
        rank=np.zeros(u.size),
    )


def test_buckets_by_event_index() -> None:
    n = np.arange(1, 26)
    stats = aggregate([_records(np.zeros(25), n, (n <= 5).astype(float))], n_boot=20)
    events = {b: s.events for b, s in stats.items()}
    assert events == {
        "1": 1,
        "2-5": 4,
        "6-10": 5,
        "11-20": 10,
        "21+": 5,
        "first5": 5,
        "first20": 20,
        "all": 25,
    }
    assert stats["2-5"].hr == 1.0 and stats["6-10"].hr == 0.0
    assert stats["first20"].hr == pytest.approx(0.25)
    assert stats["all"].ndcg == pytest.approx(0.1)
    assert list(stats) == list(BUCKETS)


def test_micro_average_pools_events_and_seeds() -> None:
    # User 0 has 3 events, user 1 has 1: micro average weighs events, not users.
    run = _records([0, 0, 0, 1], [1, 2, 3, 1], [1.0, 1.0, 1.0, 0.0])
    other_seed = _records([0, 0, 0, 1], [1, 2, 3, 1], [0.0, 0.0, 0.0, 0.0])
    assert aggregate([run], n_boot=10)["all"].hr == pytest.approx(0.75)
    both = aggregate([run, other_seed], n_boot=10)["all"]
    assert both.hr == pytest.approx(3 / 8) and both.events == 8


def _random_runs(n_users: int, seed: int) -> PrequentialRecords:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 10)
    n = np.tile(np.arange(1, 11), n_users)
    p = rng.uniform(0.1, 0.5, size=n_users)[users]  # users differ in how predictable they are
    return _records(users, n, (rng.random(users.size) < p).astype(float))


def test_bootstrap_interval_contains_mean_and_shrinks_with_more_users() -> None:
    small = aggregate([_random_runs(40, seed=1)], seed=0)
    large = aggregate([_random_runs(1000, seed=1)], seed=0)
    for stats in (small, large):
        for s in stats.values():
            if s.events == 0:  # "21+": these users have 10 events each
                continue
            assert s.hr_ci[0] <= s.hr <= s.hr_ci[1]
            assert s.ndcg_ci[0] <= s.ndcg <= s.ndcg_ci[1]
    width = {
        name: st["all"].hr_ci[1] - st["all"].hr_ci[0]
        for name, st in (("small", small), ("large", large))
    }
    assert width["large"] < width["small"] / 2
    again = aggregate([_random_runs(40, seed=1)], seed=0)
    assert again["all"].hr_ci == small["all"].hr_ci  # seeded


def test_empty_bucket_is_nan_not_an_error() -> None:
    stats = aggregate([_records([0, 1], [1, 1], [1.0, 0.0])], n_boot=20)
    assert stats["21+"].events == 0 and math.isnan(stats["21+"].hr)


# -- end to end and reports -------------------------------------------------------------


def _small_dataset() -> Dataset:
    rng = np.random.default_rng(0)
    # Users arrive over time (a window of the 10 newest), so the second half has new users.
    events = [
        Event(
            f"u{int(rng.integers(max(0, t // 20 - 10), t // 20 + 1))}",
            f"i{int(rng.zipf(1.5)) % 40}",
            "like" if rng.random() < 0.3 else "click",
            ts=t * 3_600_000,
        )
        for t in range(1500)
    ]
    return Dataset("small", events)


@pytest.fixture(scope="module")
def report_and_stream() -> tuple[EvaluationReport, EncodedStream]:
    ds = _small_dataset()
    return evaluate(ds, BASELINES, seeds=[0, 1], progress=False, n_boot=100), encode(ds)


def test_evaluate_runs_every_method_and_seed(
    report_and_stream: tuple[EvaluationReport, EncodedStream],
) -> None:
    report, stream = report_and_stream
    assert sorted(report.results) == sorted(BASELINES)
    for res in report.results.values():
        assert len(res.runs) == 2 and len(res.wall_time_s) == 2
        assert res.buckets["all"].events == 2 * len(res.runs[0]) > 0
    assert report.evaluated_users == select_evaluated_users(stream).size > 10
    knn, pop = report.results["itemknn"].runs[0], report.results["pop"].runs[0]
    np.testing.assert_array_equal(knn.user, pop.user)  # the same events for every method


def test_json_markdown_and_png(
    report_and_stream: tuple[EvaluationReport, EncodedStream], tmp_path: Path
) -> None:
    report, _ = report_and_stream
    out = to_json(report)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text)["meta"]["seeds"] == [0, 1]
    meta = out["meta"]
    assert meta["dataset"] == "small" and set(meta["wall_time_s"]) == set(BASELINES)
    for method in BASELINES:
        assert list(out[method]) == list(BUCKETS)
        for cell in out[method].values():
            assert set(cell) == {"hr10", "hr10_ci", "ndcg10", "ndcg10_ci", "events"}
            assert len(cell["hr10_ci"]) == 2
    md = to_markdown(report)
    assert "### HR@10" in md and "### NDCG@10" in md
    assert all(f"| {m} |" in md for m in BASELINES)
    assert "| method | 1 | 2-5 | 6-10 | 11-20 | 21+ | first5 | first20 | all |" in md
    png = tmp_path / "hr.png"
    plot_png(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_any_recommender_fits_the_factory() -> None:
    def factory(stream: EncodedStream, seed: int) -> Recommender:
        return Fixed(np.zeros(stream.n_items))

    report = evaluate(_small_dataset(), {"const": factory}, seeds=[0], progress=False, n_boot=10)
    assert 0.0 < report.results["const"].buckets["all"].hr < 1.0


# -- the harness against our earlier measurement on ml-100k -----------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (ML100K / "u.data").exists(), reason="ml-100k is not available")
def test_popularity_baselines_reproduce_the_reference_on_ml100k() -> None:
    from metarec.data.movielens import load_movielens

    report = evaluate(
        load_movielens(ML100K),
        {"pop": BASELINES["pop"], "recent_pop": BASELINES["recent_pop"]},
        seeds=[0],
        progress=False,
        n_boot=50,
    )
    assert report.evaluated_users == 452
    reference = {"pop": (0.266, 0.147, 0.081), "recent_pop": (0.448, 0.192, 0.078)}
    for method, want in reference.items():
        b = report.results[method].buckets
        got = (b["1"].hr, b["first20"].hr, b["all"].hr)
        assert got == pytest.approx(want, abs=0.01), method


# -- the clock: same-timestamp groups ------------------------------------------------------


class Remembers:
    """Scores the items its user learned most recently highest: it profits from history."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}
        self.groups: list[list[int]] = []

    def score(self, user: int, ts: int, domain: int, n_items: int) -> npt.NDArray[np.float64]:
        out = np.arange(n_items) * 1e-3  # otherwise the newest item
        last = self.last.get(user)
        if last is not None and last + 1 < n_items:
            out[last + 1] = 1.0  # "the item after the last one": right on this toy stream
        return out

    def learn_many(self, xs: list[Interaction]) -> None:
        self.groups.append([x.item for x in xs])
        for x in xs:
            self.last[x.user] = x.item


def test_events_of_one_timestamp_are_scored_before_any_of_them_is_learned() -> None:
    # User b takes items 0, 1, 2 in the same second, then 3 a second later. Had the harness
    # learned item 0 before scoring item 1, "the item after the last one" would hit.
    events = [Event("a", f"i{j}", "click", j) for j in range(4)]
    events += [Event("b", f"i{j}", "click", 10) for j in range(3)]
    events += [Event("b", "i3", "click", 11)]
    stream = encode(Dataset("same-second", events))
    rec = Remembers()
    out = prequential(stream, lambda s, seed: rec, seed=0, evaluated_users=[1], k=1)
    assert out.hr.tolist() == [0.0, 0.0, 0.0, 1.0]
    # The group is learned at once, in order, and its items are candidates only after it.
    assert rec.groups[4] == [0, 1, 2] and rec.groups[5] == [3]
    assert stream.n_seen[4:8].tolist() == [4, 4, 4, 4]


def test_parallel_workers_give_the_same_records() -> None:
    ds = _small_dataset()
    methods = {name: BASELINES[name] for name in ("pop", "bprmf")}
    one = evaluate(ds, methods, seeds=[0, 1], progress=False, n_boot=20)
    two = evaluate(ds, methods, seeds=[0, 1], progress=False, n_boot=20, workers=2)
    for name in methods:
        for a, b in zip(one.results[name].runs, two.results[name].runs, strict=True):
            np.testing.assert_array_equal(a.hr, b.hr)


def test_deterministic_methods_run_once_and_stand_for_every_seed() -> None:
    stream = encode(_small_dataset())
    users = select_evaluated_users(stream)
    for name in sorted(DETERMINISTIC):
        a = prequential(stream, BASELINES[name], seed=0, evaluated_users=users)
        b = prequential(stream, BASELINES[name], seed=7, evaluated_users=users)
        np.testing.assert_array_equal(a.hr, b.hr, err_msg=f"{name} depends on the seed")
    report = evaluate(
        _small_dataset(),
        {"pop": BASELINES["pop"]},
        seeds=[0, 1, 2],
        progress=False,
        n_boot=20,
        deterministic=DETERMINISTIC,
    )
    res = report.results["pop"]
    assert len(res.runs) == 3 and len(res.wall_time_s) == 1
    assert res.buckets["all"].events == 3 * len(res.runs[0])


def test_the_cost_of_each_refit_is_reported() -> None:
    from metarec.evaluation.baselines import EASE

    ds = _small_dataset()
    n = encode(ds).n_events
    methods = {"ease": lambda stream, seed: EASE(refit_every=n // 4), "pop": BASELINES["pop"]}
    report = evaluate(ds, methods, seeds=[0, 1], progress=False, n_boot=10)
    refits = to_json(report)["meta"]["refit_seconds"]
    assert list(refits) == ["ease"] and len(refits["ease"]) == 8  # 4 per seed
    assert all(s >= 0 for s in refits["ease"])
    assert "Refits per run and their cost: ease 4," in to_markdown(report)
