"""The prequential ("test-then-train") harness that judges every method.

The stream is replayed in timestamp order. Before each event of an evaluated user the
recommender scores the candidate set — every item of an event it has already learned —
the items the user already consumed are excluded, and HR@k and NDCG@k of the true item are
recorded; then the recommender learns from the event. Every method sees the same stream,
the same candidate sets and the same exclusions, so the numbers are comparable.

**An event is learned only once the stream's clock has passed its timestamp.** Events
with equal timestamps form one group: all of them are scored before any of them is
learned, and the group is then learned at once (``learn_many`` where a method has it, as
one consumer batch). Otherwise a user's other events from the same second would serve as
history for each other, which no service can see coming: it lifts every history method by
about 0.01 HR@10 on MovieLens 100K, whose ratings are stamped to the second.

Choices the design leaves open, fixed here:

* **Evaluated users** are those whose first event lies in the second half of the stream
  (position ``>= n_events // 2``): every method has seen half the data, and these users
  are new to all of them, which is the cold-start regime the project targets.
* **Ties** are broken uniformly at random, and the metrics recorded are their exact
  expectations over that draw (the true item is equally likely at each of the tied
  positions). This is neither optimistic nor pessimistic, is deterministic, and gives a
  constant recommender the HR of a random ranking rather than 1 or 0.
* **Misses by construction**: a true item first seen in this event's group (not a
  candidate) and a repeat of an item the user already consumed (excluded, as in
  production) count as misses.
  A dislike is not a target: it is learned but not scored.
* **Intervals** are percentile bootstraps over users: a resample draws users with
  replacement, and a user carries all their events of all seeds, so the interval reflects
  the spread over users of a metric pooled (micro-averaged) over events and seeds.
* **Deterministic methods** (:data:`DETERMINISTIC`: the counting baselines and EASE) give
  the same records for every seed, so they run once and their records stand for each seed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from metarec.core.events import DEFAULT_EVENT_WEIGHTS
from metarec.data.dataset import Dataset
from metarec.errors import DataError
from metarec.evaluation.baselines import (
    EASE,
    FirstPop,
    ItemKNN,
    OnlineBPRMF,
    Popularity,
    RecentPopularity,
)
from metarec.evaluation.recommender import Interaction, Recommender
from metarec.logs import TF_CPP_MIN_LOG_LEVEL

__all__ = [
    "BASELINES",
    "BUCKETS",
    "DETERMINISTIC",
    "INDEX_BUCKETS",
    "BucketStats",
    "EncodedStream",
    "EvaluationReport",
    "Factory",
    "Job",
    "PrequentialRecords",
    "Result",
    "aggregate",
    "encode",
    "evaluate",
    "jobs_for",
    "plot_png",
    "prequential",
    "report_from",
    "run_jobs",
    "select_evaluated_users",
    "to_json",
    "to_markdown",
]

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float64]

#: Buckets of the user's event index ``n`` (1-based): inclusive ranges, ``None`` = no bound.
_BUCKET_RANGES: dict[str, tuple[int, int | None]] = {
    "1": (1, 1),
    "2-5": (2, 5),
    "6-10": (6, 10),
    "11-20": (11, 20),
    "21+": (21, None),
    "first5": (1, 5),
    "first20": (1, 20),
    "all": (1, None),
}
#: Every reported bucket, in report order.
BUCKETS: tuple[str, ...] = tuple(_BUCKET_RANGES)
#: The disjoint buckets that partition the event index (the x-axis of the plot).
INDEX_BUCKETS: tuple[str, ...] = ("1", "2-5", "6-10", "11-20", "21+")
#: Resamples per bootstrap interval: enough for stable 2.5/97.5 percentiles.
DEFAULT_BOOTSTRAPS = 1000
#: Events between two progress callbacks: frequent enough to watch, rare enough to be free.
_PROGRESS_EVERY = 2048


@dataclass(frozen=True, eq=False)
class EncodedStream:
    """A :class:`~metarec.data.dataset.Dataset` on dense indices, the form recommenders learn on.

    Users and items are numbered in order of first appearance in the events, so before
    event ``t`` the candidate set is exactly the item indices ``< n_seen[t]``. Items and
    users that only appear in the metadata get the indices after those.

    Examples
    --------
    >>> from metarec.core.events import Event
    >>> ds = Dataset("toy", [Event("a", "x", "like", 1), Event("b", "y", "click", 2),
    ...                      Event("a", "y", "click", 3)])
    >>> s = encode(ds)
    >>> s.items.tolist(), s.users.tolist(), s.weights.tolist()
    ([0, 1, 1], [0, 1, 0], [2.0, 1.0, 1.0])
    >>> s.n_seen.tolist()
    [0, 1, 2]
    >>> encode(Dataset("same-second", [Event("a", "x", "like", 1), Event("b", "y", "click", 1),
    ...                                Event("a", "z", "click", 2)])).n_seen.tolist()
    [0, 0, 2]
    """

    name: str
    users: IntArray
    items: IntArray
    domains: IntArray
    ts: npt.NDArray[np.int64]
    weights: FloatArray
    user_ids: list[str]
    item_ids: list[str]
    domain_names: list[str]
    item_features: list[tuple[str, ...]]
    item_domains: IntArray
    user_features: list[tuple[str, ...]]
    #: Number of distinct items in the events before each event's timestamp group (the
    #: candidate set size).
    n_seen: npt.NDArray[np.int64]

    @property
    def n_events(self) -> int:
        return int(self.items.shape[0])

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_domains(self) -> int:
        return len(self.domain_names)


#: Builds a fresh recommender for one run: ``factory(stream, seed)``. The stream is passed so
#: that a method can size itself or read item/user features; it must not peek at future
#: events to score past ones.
Factory = Callable[[EncodedStream, int], Recommender]


def _index(table: dict[str, int], key: str) -> int:
    """The dense index of ``key``, assigning the next one on first sight."""
    idx = table.get(key)
    if idx is None:
        idx = table[key] = len(table)
    return idx


def encode(
    dataset: Dataset, event_weights: Mapping[str, float] = DEFAULT_EVENT_WEIGHTS
) -> EncodedStream:
    """Number users, items and domains by first appearance and weigh events by type."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    domains: dict[str, int] = {}
    n = len(dataset.events)
    u = np.empty(n, dtype=np.int32)
    i = np.empty(n, dtype=np.int32)
    d = np.empty(n, dtype=np.int32)
    ts = np.empty(n, dtype=np.int64)
    w = np.empty(n, dtype=np.float64)
    first_domain: list[int] = []
    for t, e in enumerate(dataset.events):
        if e.type not in event_weights:
            raise DataError(
                f"event {t} of {dataset.name!r} has type {e.type!r}, which has no weight; "
                f"pass event_weights with one of: {', '.join(sorted(event_weights))}"
            )
        u[t] = _index(users, e.user)
        d[t] = _index(domains, e.domain)
        item = _index(items, e.item)
        if item == len(first_domain):
            first_domain.append(int(d[t]))
        i[t] = item
        ts[t] = e.ts
        w[t] = event_weights[e.type]
    if n > 1 and np.any(np.diff(ts) < 0):
        raise DataError(f"events of {dataset.name!r} are not in timestamp order; sort them")
    n_event_items = len(items)
    meta_items = {r.item: r for r in dataset.items}  # the latest record of an item wins
    for rec in meta_items.values():
        _index(items, rec.item)
        _index(domains, rec.domain)
    item_domains = np.array(first_domain + [0] * (len(items) - n_event_items), dtype=np.int32)
    item_features: list[tuple[str, ...]] = [()] * len(items)
    for rec in meta_items.values():
        item_domains[items[rec.item]] = domains[rec.domain]
        item_features[items[rec.item]] = tuple(rec.features)
    meta_users = {r.user: r for r in dataset.users}
    for urec in meta_users.values():
        _index(users, urec.user)
    user_features: list[tuple[str, ...]] = [()] * len(users)
    for urec in meta_users.values():
        user_features[users[urec.user]] = tuple(urec.features)
    # Items are numbered by first appearance, so the items seen before event t are exactly
    # 0 .. max(items[:t]); an event's candidates are those of its timestamp group's start.
    n_seen = np.zeros(n, dtype=np.int64)
    if n > 1:
        n_seen[1:] = np.maximum.accumulate(i[:-1].astype(np.int64)) + 1
        starts = np.r_[0, np.flatnonzero(np.diff(ts)) + 1]
        n_seen = n_seen[np.repeat(starts, np.diff(np.r_[starts, n]))]
    return EncodedStream(
        name=dataset.name,
        users=u,
        items=i,
        domains=d,
        ts=ts,
        weights=w,
        user_ids=list(users),
        item_ids=list(items),
        domain_names=list(domains),
        item_features=item_features,
        item_domains=item_domains,
        user_features=user_features,
        n_seen=n_seen,
    )


def select_evaluated_users(stream: EncodedStream) -> IntArray:
    """Users whose first event is at position ``>= n_events // 2``, ascending."""
    first = np.full(stream.n_users, stream.n_events, dtype=np.int64)
    np.minimum.at(first, stream.users, np.arange(stream.n_events))
    # Users known only from metadata have no events to evaluate.
    late = (first >= stream.n_events // 2) & (first < stream.n_events)
    return np.flatnonzero(late).astype(np.int32)


@dataclass(frozen=True, eq=False)
class PrequentialRecords:
    """One run's per-event measurements, one entry per scored event.

    ``n`` is the user's 1-based event index (counting all their events), ``event`` the
    position in the stream; ``rank`` is the expected 0-based rank among the candidates
    (``nan`` for a miss by construction).
    """

    user: IntArray
    n: IntArray
    event: npt.NDArray[np.int64]
    hr: FloatArray
    ndcg: FloatArray
    rank: FloatArray
    k: int = 10
    #: Seconds of each refit, for methods that refit on a schedule (EASE, SASRec).
    refit_seconds: tuple[float, ...] = ()

    def __len__(self) -> int:
        return int(self.user.shape[0])


def _discount_table(k: int) -> list[float]:
    """``D[r] = Σ_{j<r} 1/log2(j+2)``: NDCG@k summed over tied positions in O(1)."""
    table = [0.0]
    for r in range(k):
        table.append(table[-1] + 1.0 / math.log2(r + 2))
    return table


class _Buffers:
    """Per-user growable int arrays of consumed items, plus a set for O(1) membership."""

    def __init__(self) -> None:
        self.arrays: dict[int, tuple[npt.NDArray[np.int64], int]] = {}
        self.sets: dict[int, set[int]] = {}

    def get(self, user: int) -> tuple[npt.NDArray[np.int64], set[int]]:
        buf, length = self.arrays.get(user, (np.zeros(0, dtype=np.int64), 0))
        return buf[:length], self.sets.get(user, set())

    def add(self, user: int, item: int) -> None:
        seen = self.sets.setdefault(user, set())
        if item in seen:
            return
        seen.add(item)
        buf, length = self.arrays.get(user, (np.zeros(16, dtype=np.int64), 0))
        if length == buf.shape[0]:
            buf = np.concatenate([buf, np.zeros_like(buf)])
        buf[length] = item
        self.arrays[user] = (buf, length + 1)


def prequential(
    stream: EncodedStream,
    factory: Factory,
    *,
    seed: int,
    evaluated_users: npt.ArrayLike,
    k: int = 10,
    progress: Callable[[int], object] | None = None,
) -> PrequentialRecords:
    """Replay ``stream`` test-then-train through ``factory(stream, seed)``, one
    same-timestamp group at a time (module docstring).

    ``progress`` (e.g. ``tqdm.update``) is called with the number of events done since its
    last call.
    """
    rec = factory(stream, seed)
    is_eval = np.zeros(stream.n_users, dtype=bool)
    is_eval[np.asarray(evaluated_users, dtype=np.int64)] = True
    disc = _discount_table(k)
    consumed = _Buffers()
    n_events_of = [0] * stream.n_users

    out_user: list[int] = []
    out_n: list[int] = []
    out_event: list[int] = []
    out_hr: list[float] = []
    out_ndcg: list[float] = []
    out_rank: list[float] = []

    # Python scalars: indexing numpy arrays element by element is several times slower.
    users, items, domains = stream.users.tolist(), stream.items.tolist(), stream.domains.tolist()
    tss, weights, n_seen = stream.ts.tolist(), stream.weights.tolist(), stream.n_seen.tolist()
    eval_flags = is_eval.tolist()
    many = getattr(rec, "learn_many", None)
    last_report = 0
    bounds = np.r_[0, np.flatnonzero(np.diff(stream.ts)) + 1, stream.n_events].tolist()
    for a, b in itertools.pairwise(bounds):
        # Score the whole same-timestamp group first: none of it is learned yet.
        for t in range(a, b):
            user, item, w = users[t], items[t], weights[t]
            n_events_of[user] += 1
            if not (eval_flags[user] and w > 0):
                continue
            past, past_set = consumed.get(user)
            hr = ndcg = 0.0
            rank = math.nan
            if item < n_seen[t] and item not in past_set:
                scores = rec.score(user, tss[t], domains[t], n_seen[t])
                if scores.shape != (n_seen[t],):
                    raise ValueError(
                        f"{type(rec).__name__}.score returned shape {scores.shape}, "
                        f"expected ({n_seen[t]},)"
                    )
                true = scores[item]
                if not math.isnan(true):
                    greater = int(np.count_nonzero(scores > true))
                    ties = int(np.count_nonzero(scores == true)) - 1
                    if past.size:
                        mine = scores[past]
                        greater -= int(np.count_nonzero(mine > true))
                        ties -= int(np.count_nonzero(mine == true))
                    top = min(greater + ties + 1, k)
                    if greater < k:
                        hr = (top - greater) / (ties + 1)
                        ndcg = (disc[top] - disc[greater]) / (ties + 1)
                    rank = greater + ties / 2
            out_user.append(user)
            out_n.append(n_events_of[user])
            out_event.append(t)
            out_hr.append(hr)
            out_ndcg.append(ndcg)
            out_rank.append(rank)
        group = [
            Interaction(users[t], items[t], tss[t], domains[t], weights[t]) for t in range(a, b)
        ]
        if many is not None:
            many(group)
        else:
            for x in group:
                rec.learn_one(x)
        for x in group:
            if eval_flags[x.user]:
                consumed.add(x.user, x.item)
        if progress is not None and b - last_report >= _PROGRESS_EVERY:
            progress(b - last_report)
            last_report = b
    if progress is not None and stream.n_events > last_report:
        progress(stream.n_events - last_report)
    return PrequentialRecords(
        user=np.array(out_user, dtype=np.int32),
        n=np.array(out_n, dtype=np.int32),
        event=np.array(out_event, dtype=np.int64),
        hr=np.array(out_hr, dtype=np.float64),
        ndcg=np.array(out_ndcg, dtype=np.float64),
        rank=np.array(out_rank, dtype=np.float64),
        k=k,
        refit_seconds=tuple(float(x) for x in getattr(rec, "fit_seconds", ())),
    )


@dataclass(frozen=True)
class BucketStats:
    """Micro-averaged HR@k and NDCG@k of one bucket, with bootstrap intervals over users."""

    hr: float
    hr_ci: tuple[float, float]
    ndcg: float
    ndcg_ci: tuple[float, float]
    events: int


def aggregate(
    runs: Sequence[PrequentialRecords],
    *,
    n_boot: int = DEFAULT_BOOTSTRAPS,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, BucketStats]:
    """Per-bucket means pooled over ``runs`` (seeds), with user-bootstrap intervals.

    Examples
    --------
    >>> recs = PrequentialRecords(user=np.array([0, 0, 1, 1], dtype=np.int32),
    ...     n=np.array([1, 2, 1, 2], dtype=np.int32), event=np.arange(4),
    ...     hr=np.array([1.0, 0.0, 0.0, 0.0]), ndcg=np.array([1.0, 0.0, 0.0, 0.0]),
    ...     rank=np.zeros(4))
    >>> stats = aggregate([recs], n_boot=200)
    >>> stats["1"].hr, stats["1"].events, stats["all"].hr
    (0.5, 2, 0.25)
    """
    user = np.concatenate([r.user for r in runs]).astype(np.int64)
    n = np.concatenate([r.n for r in runs]).astype(np.int64)
    hr = np.concatenate([r.hr for r in runs])
    ndcg = np.concatenate([r.ndcg for r in runs])
    units, pos = np.unique(user, return_inverse=True)
    n_units = units.size
    columns = []
    for lo, hi in _BUCKET_RANGES.values():
        inside = n >= lo
        if hi is not None:
            inside &= n <= hi
        columns.append(inside)
    masks = np.stack(columns, axis=1).astype(np.float64).reshape(n.size, len(BUCKETS))
    # Per user and bucket: events, hits and NDCG sums, all seeds pooled.
    counts = np.zeros((n_units, len(BUCKETS)))
    hits = np.zeros_like(counts)
    gains = np.zeros_like(counts)
    np.add.at(counts, pos, masks)
    np.add.at(hits, pos, masks * hr[:, None])
    np.add.at(gains, pos, masks * ndcg[:, None])

    rng = np.random.default_rng(seed)
    # Row b: how many times resample b drew each user (all resamples in one call).
    draws: FloatArray = np.zeros((n_boot, n_units))
    if n_units:
        draws[:] = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot)
    boot_counts = draws @ counts
    alpha = (1.0 - level) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_hr = draws @ hits / boot_counts
        boot_ndcg = draws @ gains / boot_counts

    def interval(samples: FloatArray) -> tuple[float, float]:
        finite = samples[np.isfinite(samples)]
        if finite.size == 0:
            return (math.nan, math.nan)
        lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
        return (float(lo), float(hi))

    out: dict[str, BucketStats] = {}
    for b, name in enumerate(BUCKETS):
        total = counts[:, b].sum()
        out[name] = BucketStats(
            hr=float(hits[:, b].sum() / total) if total else math.nan,
            hr_ci=interval(boot_hr[:, b]),
            ndcg=float(gains[:, b].sum() / total) if total else math.nan,
            ndcg_ci=interval(boot_ndcg[:, b]),
            events=int(total),
        )
    return out


@dataclass(frozen=True)
class Result:
    """One method's outcome: bucket statistics, the raw runs per seed and their wall times."""

    method: str
    buckets: dict[str, BucketStats]
    seeds: tuple[int, ...]
    runs: tuple[PrequentialRecords, ...] = field(repr=False)
    wall_time_s: tuple[float, ...]


@dataclass(frozen=True)
class EvaluationReport:
    """Every method's :class:`Result` on one dataset, with what was evaluated."""

    dataset: str
    seeds: tuple[int, ...]
    k: int
    n_events: int
    evaluated_users: int
    results: dict[str, Result]


@dataclass(frozen=True, eq=False)
class Job:
    """One prequential run: a method on a stream with a seed."""

    stream: EncodedStream
    method: str
    factory: Factory
    seed: int
    evaluated_users: npt.NDArray[np.int32]
    k: int = 10


def run_jobs(
    jobs: Sequence[Job],
    *,
    workers: int = 1,
    progress: bool = True,
) -> list[tuple[PrequentialRecords, float]]:
    """Run ``jobs`` and return each one's records and wall time, in the order given.

    With ``workers > 1`` they run in that many fresh processes (spawned, one thread of
    numerical work each, so they share the cores instead of fighting over them), longest
    first; factories and streams must then be picklable (module-level functions,
    :func:`functools.partial`). Results do not depend on ``workers``.
    """
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for job in jobs:
            with tqdm(
                total=job.stream.n_events,
                desc=f"{job.stream.name} {job.method} seed={job.seed}",
                unit="ev",
                disable=not progress,
                leave=False,
            ) as bar:
                out.append(_run_job(job, bar.update))
        return out
    # A metarec run costs about ten times a baseline's: start those first, so the last
    # jobs to finish are short ones.
    order = sorted(
        range(len(jobs)),
        key=lambda j: (
            -jobs[j].stream.n_events * (10 if jobs[j].method.startswith("metarec") else 1)
        ),
    )
    results: dict[int, tuple[PrequentialRecords, float]] = {}
    context = multiprocessing.get_context("spawn")
    with _single_threaded_children(), ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_run_job, jobs[j]): j for j in order}
        with tqdm(
            total=len(jobs), desc="prequential runs", unit="run", disable=not progress
        ) as bar:
            for done in as_completed(futures):
                results[futures[done]] = done.result()
                bar.update(1)
    return [results[j] for j in range(len(jobs))]


def _run_job(
    job: Job,
    progress: Callable[[int], object] | None = None,
) -> tuple[PrequentialRecords, float]:
    start = time.perf_counter()
    records = prequential(
        job.stream,
        job.factory,
        seed=job.seed,
        evaluated_users=job.evaluated_users,
        k=job.k,
        progress=progress,
    )
    return records, time.perf_counter() - start


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Children spawned inside inherit one-thread settings for BLAS and TensorFlow."""
    names = (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS",
    )
    quiet = "TF_CPP_MIN_LOG_LEVEL"  # TensorFlow's C++ start-up chatter, once per worker
    saved = {name: os.environ.get(name) for name in (*names, quiet)}
    os.environ.update({name: "1" for name in names})
    os.environ.setdefault(quiet, TF_CPP_MIN_LOG_LEVEL)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def jobs_for(
    stream: EncodedStream,
    methods: Mapping[str, Factory],
    seeds: Sequence[int],
    *,
    k: int = 10,
    deterministic: Collection[str] = (),
) -> list[Job]:
    """One job per method and seed (one per method for the ``deterministic`` ones)."""
    users = select_evaluated_users(stream)
    return [
        Job(stream, name, factory, seed, users, k)
        for name, factory in methods.items()
        for seed in (seeds[:1] if name in deterministic else seeds)
    ]


def report_from(
    stream: EncodedStream,
    jobs: Sequence[Job],
    results: Sequence[tuple[PrequentialRecords, float]],
    seeds: Sequence[int],
    *,
    k: int = 10,
    n_boot: int = DEFAULT_BOOTSTRAPS,
) -> EvaluationReport:
    """Aggregate the runs of ``jobs`` on ``stream`` into a report (a deterministic method's
    single run stands for every seed)."""
    by_method: dict[str, list[tuple[PrequentialRecords, float]]] = {}
    for job, result in zip(jobs, results, strict=True):
        if job.stream is stream:
            by_method.setdefault(job.method, []).append(result)
    out: dict[str, Result] = {}
    for name, runs in by_method.items():
        records = [r for r, _ in runs]
        records += [records[0]] * (len(seeds) - len(records))
        out[name] = Result(
            method=name,
            buckets=aggregate(records, n_boot=n_boot, seed=seeds[0] if seeds else 0),
            seeds=tuple(seeds),
            runs=tuple(records),
            wall_time_s=tuple(w for _, w in runs),
        )
    return EvaluationReport(
        dataset=stream.name,
        seeds=tuple(seeds),
        k=k,
        n_events=stream.n_events,
        evaluated_users=int(select_evaluated_users(stream).size),
        results=out,
    )


def evaluate(
    dataset: Dataset | EncodedStream,
    methods: Mapping[str, Factory],
    seeds: Sequence[int],
    progress: bool = True,
    *,
    k: int = 10,
    n_boot: int = DEFAULT_BOOTSTRAPS,
    deterministic: Collection[str] = (),
    workers: int = 1,
) -> EvaluationReport:
    """Run every method for every seed on the same stream and aggregate the results.

    Methods named in ``deterministic`` (for example :data:`DETERMINISTIC`) run once; their
    records stand for every seed. ``workers`` runs them in parallel (:func:`run_jobs`).

    Examples
    --------
    >>> from metarec.core.events import Event
    >>> events = [Event(f"u{t % 7}", f"i{t % 5}", "click", t) for t in range(60)]
    >>> report = evaluate(Dataset("toy", events), {"pop": BASELINES["pop"]}, [0, 1],
    ...                   progress=False, n_boot=50)
    >>> sorted(report.results), report.seeds
    (['pop'], (0, 1))
    """
    stream = dataset if isinstance(dataset, EncodedStream) else encode(dataset)
    jobs = jobs_for(stream, methods, seeds, k=k, deterministic=deterministic)
    results = run_jobs(jobs, workers=workers, progress=progress)
    return report_from(stream, jobs, results, seeds, k=k, n_boot=n_boot)


def _cell(value: float, ci: tuple[float, float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def to_markdown(report: EvaluationReport) -> str:
    """Two tables (HR@k, NDCG@k): methods × buckets, cells ``mean [lo, hi]``."""
    k = report.k
    seeds = ", ".join(map(str, report.seeds))
    lines = [
        f"Prequential evaluation on **{report.dataset}**: {report.n_events} events, "
        f"{report.evaluated_users} evaluated users, seeds {seeds}; "
        "95% bootstrap intervals over users.",
        "",
    ]
    header = "| method | " + " | ".join(BUCKETS) + " | s/seed |"
    rule = "|---|" + "---|" * (len(BUCKETS) + 1)
    for title, attr in ((f"HR@{k}", "hr"), (f"NDCG@{k}", "ndcg")):
        lines += [f"### {title}", "", header, rule]
        for name, res in report.results.items():
            cells = [
                _cell(getattr(res.buckets[b], attr), getattr(res.buckets[b], attr + "_ci"))
                for b in BUCKETS
            ]
            ran = [w for w in res.wall_time_s if w > 0] or [0.0]  # deterministic: ran once
            wall = sum(ran) / len(ran)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall:.1f} |")
        lines.append("")
    if report.results:
        first = next(iter(report.results.values()))
        counts = ", ".join(f"{b}: {first.buckets[b].events}" for b in BUCKETS)
        lines.append(f"Events per bucket (all seeds): {counts}.")
    refits = _refit_costs(report)
    if refits:
        lines.append(
            "Refits per run and their cost: "
            + "; ".join(
                f"{name} {len(r) / max(1, n_runs):.0f}, {sum(r) / len(r):.1f} s each "
                f"(longest {max(r):.1f} s)"
                for name, (r, n_runs) in refits.items()
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def _refit_costs(report: EvaluationReport) -> dict[str, tuple[list[float], int]]:
    """Per method that refits: the seconds of all its refits and the runs they came from
    (a deterministic method ran once, its record standing for every seed)."""
    out: dict[str, tuple[list[float], int]] = {}
    for name, res in report.results.items():
        runs = res.runs[: max(1, len(res.wall_time_s))]
        seconds = [x for r in runs for x in r.refit_seconds]
        if seconds:
            out[name] = (seconds, len(runs))
    return out


def _finite(x: float) -> float | None:
    """JSON has no NaN: an empty bucket is ``null``."""
    return x if math.isfinite(x) else None


def to_json(report: EvaluationReport) -> dict[str, Any]:
    """A JSON-ready dict: ``out[method][bucket] = {hr10, hr10_ci, ndcg10, ...}`` for each
    method key, and the run's metadata under ``out["meta"]``."""
    k = report.k
    methods: dict[str, Any] = {}
    for name, res in report.results.items():
        methods[name] = {
            b: {
                f"hr{k}": _finite(s.hr),
                f"hr{k}_ci": [_finite(s.hr_ci[0]), _finite(s.hr_ci[1])],
                f"ndcg{k}": _finite(s.ndcg),
                f"ndcg{k}_ci": [_finite(s.ndcg_ci[0]), _finite(s.ndcg_ci[1])],
                "events": s.events,
            }
            for b, s in res.buckets.items()
        }
    out = {
        **methods,
        "meta": {
            "dataset": report.dataset,
            "seeds": list(report.seeds),
            "k": k,
            "n_events": report.n_events,
            "evaluated_users": report.evaluated_users,
            "wall_time_s": {name: list(res.wall_time_s) for name, res in report.results.items()},
            "refit_seconds": {name: r for name, (r, _) in _refit_costs(report).items()},
        },
    }
    json.dumps(out, allow_nan=False)  # fail here, not in the writer, if a NaN slipped in
    return out


def plot_png(report: EvaluationReport, path: str | Path) -> None:
    """HR@k by event-index bucket, one line per method, with the bootstrap intervals."""
    from matplotlib.figure import Figure  # deferred: matplotlib is slow to import

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    ax = fig.subplots()
    x = np.arange(len(INDEX_BUCKETS))
    width = 0.08
    for j, (name, res) in enumerate(report.results.items()):
        stats = [res.buckets[b] for b in INDEX_BUCKETS]
        y = np.array([s.hr for s in stats])
        err = np.array([[s.hr - s.hr_ci[0] for s in stats], [s.hr_ci[1] - s.hr for s in stats]])
        offset = (j - (len(report.results) - 1) / 2) * width  # keep error bars apart
        ax.errorbar(x + offset, y, yerr=np.nan_to_num(err), marker="o", capsize=3, label=name)
    ax.set_xticks(x, list(INDEX_BUCKETS))
    ax.set_xlabel("user's event index n")
    ax.set_ylabel(f"HR@{report.k}")
    ax.set_title(f"Prequential HR@{report.k} on {report.dataset} (95% CI over users)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def _pop(stream: EncodedStream, seed: int) -> Recommender:
    return Popularity(seed=seed)


def _recent_pop(stream: EncodedStream, seed: int) -> Recommender:
    return RecentPopularity(seed=seed)


def _bprmf(stream: EncodedStream, seed: int) -> Recommender:
    return OnlineBPRMF(seed=seed)


def _itemknn(stream: EncodedStream, seed: int) -> Recommender:
    return ItemKNN(capacity=stream.n_items, seed=seed)


def _firstpop(stream: EncodedStream, seed: int) -> Recommender:
    return FirstPop(seed=seed)


def _ease(stream: EncodedStream, seed: int) -> Recommender:
    return EASE(seed=seed)


def _sasrec(stream: EncodedStream, seed: int) -> Recommender:
    from metarec.evaluation.sasrec import SASRec  # TensorFlow trains it: imported on use

    return SASRec(seed=seed)


#: Factories of the baselines under their report keys.
BASELINES: dict[str, Factory] = {
    "pop": _pop,
    "recent_pop": _recent_pop,
    "bprmf": _bprmf,
    "itemknn": _itemknn,
    "firstpop": _firstpop,
    "ease": _ease,
    "sasrec": _sasrec,
}
#: Methods whose records do not depend on the seed (see :func:`evaluate`); checked by
#: ``tests/evaluation/test_baselines.py``.
DETERMINISTIC: frozenset[str] = frozenset({"pop", "recent_pop", "itemknn", "firstpop", "ease"})
