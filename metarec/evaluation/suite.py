"""The robustness suite: one set of defaults, judged on streams of other shapes.

Quality measured on one dataset says little about the next one. The suite runs the whole
comparison (every baseline, metarec and its ablation, the same code and default settings
the services run) on MovieLens 100K and on variants that change one thing each:

* ``ml-100k``: as it is (one domain, user demographics, seven months);
* ``ml-100k-no-profiles``: the same stream without user profiles (new users are strangers);
* ``ml-100k-stretched-30x``: every timestamp stretched 30 times around the first, so the
  same order of events spans 18 years (few events a day, as in long-running catalogues);
* ``ml-100k-third-of-users``: a random third of the users (a smaller, sparser stream);
* ``ml-latest-small``: another MovieLens of another shape (two decades, no profiles, six
  times the catalogue, long bursts of ratings by heavy users);
* ``synthetic``: the project's own generator (three domains, cold items, drift).

It writes one table (method × dataset; HR@10 in every bucket of the user's event index,
with 95% intervals), one plot, and a check of the quality targets: against the best
baseline of each dataset and bucket, and against the ablation without meta-learning.
Nothing in metarec knows which dataset it runs on.

>>> from metarec.core.events import Event, UserRecord
>>> ds = Dataset("d", [Event("a", "x", "click", 1000), Event("b", "y", "like", 2000)],
...              users=[UserRecord("a", ("age:30",))])
>>> [e.ts for e in stretched(ds, 30).events], without_profiles(ds).users
([1000, 31000], [])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metarec.data.dataset import Dataset
from metarec.data.registry import load_dataset
from metarec.errors import DataError
from metarec.evaluation.protocol import (
    BUCKETS,
    DETERMINISTIC,
    EvaluationReport,
    Factory,
    encode,
    jobs_for,
    report_from,
    run_jobs,
    to_json,
)

__all__ = [
    "FLOOR",
    "GOALS",
    "SUITE_BUCKETS",
    "SuiteReport",
    "TargetCheck",
    "check_targets",
    "is_baseline",
    "movielens_folders",
    "plot_png",
    "run_suite",
    "stretched",
    "suite_datasets",
    "targets_markdown",
    "to_markdown",
    "user_subset",
    "without_profiles",
]

#: The buckets the suite reports (all of :data:`metarec.evaluation.protocol.BUCKETS`).
SUITE_BUCKETS = BUCKETS
#: The floor: metarec at least this share of the best baseline in every bucket.
FLOOR = 0.98
#: The goals: over the first 20 events and over all events, this much above the best
#: baseline with the intervals apart.
GOALS = (("first20", 1.15), ("all", 1.10))
#: How much the timestamps of the stretched variant are stretched.
STRETCH = 30
#: Share of users kept by the subset variant, and the seed that draws them.
SUBSET_FRACTION = 1 / 3
SUBSET_SEED = 0
#: The method under test, its ablation, and what is not a baseline.
METAREC = "metarec"
ABLATION = "metarec_no_meta"


def without_profiles(ds: Dataset) -> Dataset:
    """The same stream with every user profile dropped."""
    return dataclasses.replace(ds, name=f"{ds.name}-no-profiles", users=[])


def stretched(ds: Dataset, factor: int = STRETCH) -> Dataset:
    """The same events in the same order, each timestamp stretched ``factor`` times around
    the first one."""
    t0 = ds.events[0].ts if ds.events else 0
    events = [dataclasses.replace(e, ts=t0 + (e.ts - t0) * factor) for e in ds.events]
    users = [dataclasses.replace(u, ts=t0 + (u.ts - t0) * factor) for u in ds.users]
    return dataclasses.replace(
        ds, name=f"{ds.name}-stretched-{factor}x", events=events, users=users
    )


def user_subset(ds: Dataset, fraction: float = SUBSET_FRACTION, seed: int = SUBSET_SEED) -> Dataset:
    """The events and profiles of a random ``fraction`` of the users."""
    users = sorted({e.user for e in ds.events})
    rng = np.random.default_rng(seed)
    keep = set(rng.permutation(users)[: max(1, round(len(users) * fraction))].tolist())
    return dataclasses.replace(
        ds,
        name=f"{ds.name}-third-of-users"
        if math.isclose(fraction, 1 / 3)
        else f"{ds.name}-{fraction:g}-of-users",
        events=[e for e in ds.events if e.user in keep],
        users=[u for u in ds.users if u.user in keep],
    )


def movielens_folders(root: str | Path) -> tuple[Path, Path]:
    """The ml-100k and ml-latest-small folders of ``root``: a folder holding both, or
    the ml-100k folder with ml-latest-small beside it. Raises :class:`DataError` naming
    what is missing."""
    root = Path(root).expanduser()
    if (root / "u.data").is_file():
        ml100k, latest = root, root.parent / "ml-latest-small"
    else:
        ml100k, latest = root / "ml-100k", root / "ml-latest-small"
    for folder, marker in ((ml100k, "u.data"), (latest, "ratings.csv")):
        if not (folder / marker).is_file():
            raise DataError(
                f"the suite needs MovieLens 100K and latest-small: no {marker} in "
                f"{folder}; pass the folder that holds ml-100k/ and ml-latest-small/"
            )
    return ml100k, latest


def suite_datasets(movielens: str | Path) -> list[Dataset]:
    """The suite's six streams, from the MovieLens folders under ``movielens``
    (:func:`movielens_folders`)."""
    ml100k, latest = movielens_folders(movielens)
    base = dataclasses.replace(load_dataset(str(ml100k)), name="ml-100k")
    return [
        base,
        without_profiles(base),
        stretched(base),
        user_subset(base),
        dataclasses.replace(load_dataset(str(latest)), name="ml-latest-small"),
        load_dataset("synthetic"),
    ]


@dataclass(frozen=True)
class SuiteReport:
    """One :class:`~metarec.evaluation.protocol.EvaluationReport` per dataset, in suite order."""

    reports: list[EvaluationReport]
    wall_time_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "datasets": {r.dataset: to_json(r) for r in self.reports},
            "targets": [dataclasses.asdict(c) for c in check_targets(self)],
            "wall_time_s": round(self.wall_time_s, 1),
        }


def run_suite(
    datasets: Sequence[Dataset],
    methods: Mapping[str, Factory],
    seeds: Sequence[int],
    *,
    workers: int = 1,
    progress: bool = True,
    n_boot: int = 1000,
) -> SuiteReport:
    """Every method on every dataset for every seed, as one pool of parallel jobs."""
    streams = [encode(ds) for ds in datasets]
    jobs = [
        job
        for stream in streams
        for job in jobs_for(stream, methods, seeds, deterministic=DETERMINISTIC)
    ]
    results = run_jobs(jobs, workers=workers, progress=progress)
    return SuiteReport(
        [report_from(stream, jobs, results, seeds, n_boot=n_boot) for stream in streams]
    )


def _cell(report: EvaluationReport, method: str, bucket: str) -> str:
    b = report.results[method].buckets[bucket]
    if not math.isfinite(b.hr):
        return "-"
    return f"{b.hr:.3f} [{b.hr_ci[0]:.3f}, {b.hr_ci[1]:.3f}]"


def to_markdown(suite: SuiteReport) -> str:
    """One table: a row per dataset and method, HR@10 per suite bucket with intervals;
    the best baseline of each dataset and bucket in italics, metarec in bold where it
    beats it."""
    names = {b: b for b in SUITE_BUCKETS} | {
        "1": "event 1",
        "first5": "first 5",
        "first20": "first 20",
    }
    lines = [
        "| dataset | method | " + " | ".join(names[b] for b in SUITE_BUCKETS) + " |",
        "|---|---|" + "---|" * len(SUITE_BUCKETS),
    ]
    for report in suite.reports:
        best = {b: _best_baseline(report, b) for b in SUITE_BUCKETS}
        for method in report.results:
            cells = []
            for b in SUITE_BUCKETS:
                cell, top = _cell(report, method, b), best[b]
                if top is not None and method == top[0]:
                    cell = f"*{cell}*"
                elif (
                    method == METAREC
                    and top is not None
                    and report.results[method].buckets[b].hr > top[1]
                ):
                    cell = f"**{cell}**"
                cells.append(cell)
            lines.append(f"| {report.dataset} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def is_baseline(method: str) -> bool:
    """Whether ``method`` is a baseline: not metarec, its ablation or one of its parts."""
    return method not in (METAREC, ABLATION) and not method.startswith(f"{METAREC}:")


def _best_baseline(report: EvaluationReport, bucket: str) -> tuple[str, float] | None:
    scores = [
        (m, r.buckets[bucket].hr)
        for m, r in report.results.items()
        if is_baseline(m) and math.isfinite(r.buckets[bucket].hr)
    ]
    return max(scores, key=lambda x: x[1]) if scores else None


def _best_component(report: EvaluationReport, bucket: str) -> tuple[str, float] | None:
    scores = [
        (m, r.buckets[bucket].hr)
        for m, r in report.results.items()
        if m.startswith(f"{METAREC}:") and math.isfinite(r.buckets[bucket].hr)
    ]
    return max(scores, key=lambda x: x[1]) if scores else None


@dataclass(frozen=True)
class TargetCheck:
    """One quality target on one dataset: what was compared, the numbers, and the verdict."""

    dataset: str
    target: str
    metarec: float
    reference: float
    reference_method: str
    met: bool
    detail: str


def check_targets(suite: SuiteReport) -> list[TargetCheck]:
    """The quality targets, per dataset (docs/RESULTS.md), on HR@10:

    * the floor: in every bucket, metarec ≥ :data:`FLOOR` × the best baseline;
    * never worse than its parts: where metarec's parts ran alone (``metarec:PART``), in
      every bucket metarec ≥ :data:`FLOOR` × the best of them;
    * the goals (:data:`GOALS`): first 20 events ≥ 1.15 × and all events ≥ 1.10 × the
      best baseline, intervals apart;
    * meta-learning: the ablation worse over the first 5 events, intervals apart.
    """
    out: list[TargetCheck] = []
    for report in suite.reports:
        res = report.results
        if METAREC not in res:
            continue
        mine = res[METAREC].buckets
        for what, best_of in (("best baseline", _best_baseline), ("best part", _best_component)):
            for bucket in SUITE_BUCKETS:
                best = best_of(report, bucket)
                if best is None or not math.isfinite(mine[bucket].hr):
                    continue
                ratio = mine[bucket].hr / max(best[1], 1e-12)
                out.append(
                    TargetCheck(
                        report.dataset,
                        f"{bucket} >= {FLOOR:g} x {what}",
                        mine[bucket].hr,
                        best[1],
                        best[0],
                        mine[bucket].hr >= FLOOR * best[1],
                        f"ratio {ratio:.3f}",
                    )
                )
        for bucket, factor in GOALS:
            best = _best_baseline(report, bucket)
            if best is None:
                continue
            other = res[best[0]].buckets[bucket]
            apart = mine[bucket].hr_ci[0] > other.hr_ci[1]
            out.append(
                TargetCheck(
                    report.dataset,
                    f"{bucket} >= {factor:g} x best baseline, intervals apart",
                    mine[bucket].hr,
                    other.hr,
                    best[0],
                    mine[bucket].hr >= factor * other.hr and apart,
                    f"ratio {mine[bucket].hr / max(other.hr, 1e-12):.3f}, "
                    f"intervals {'apart' if apart else 'overlap'}",
                )
            )
        if ABLATION in res:
            plain = res[ABLATION].buckets["first5"]
            apart = mine["first5"].hr_ci[0] > plain.hr_ci[1]
            out.append(
                TargetCheck(
                    report.dataset,
                    "first5: ablation worse, intervals apart",
                    mine["first5"].hr,
                    plain.hr,
                    ABLATION,
                    mine["first5"].hr > plain.hr and apart,
                    f"intervals {'apart' if apart else 'overlap'}",
                )
            )
    return out


def targets_markdown(checks: Sequence[TargetCheck]) -> str:
    lines = ["| dataset | target | metarec | reference | met | |", "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(
            f"| {c.dataset} | {c.target} | {c.metarec:.3f} | {c.reference:.3f} "
            f"({c.reference_method}) | {'yes' if c.met else 'no'} | {c.detail} |"
        )
    return "\n".join(lines) + "\n"


def plot_png(suite: SuiteReport | Mapping[str, Any], path: str | Path) -> None:
    """One figure: a panel per dataset, HR@10 per suite bucket and method, with intervals.

    ``suite`` may also be :meth:`SuiteReport.to_json`'s dict (a saved run, plotted again).
    """
    from matplotlib.figure import Figure  # deferred: matplotlib is slow to import

    data = suite.to_json() if isinstance(suite, SuiteReport) else suite
    datasets = data["datasets"]
    n = len(datasets)
    fig = Figure(figsize=(5.0 * n, 4.8), dpi=110)
    axes = fig.subplots(1, n, sharey=False, squeeze=False)[0]
    x = np.arange(len(SUITE_BUCKETS))
    handles: list[Any] = []
    for ax, (name, report) in zip(axes, datasets.items(), strict=True):
        methods = [m for m in report if m != "meta"]
        width = 0.8 / max(1, len(methods))
        handles = []
        for j, method in enumerate(methods):
            cells = [report[method][b] for b in SUITE_BUCKETS]
            y = np.array([np.nan if c["hr10"] is None else c["hr10"] for c in cells])
            lo = np.array([np.nan if c["hr10_ci"][0] is None else c["hr10_ci"][0] for c in cells])
            hi = np.array([np.nan if c["hr10_ci"][1] is None else c["hr10_ci"][1] for c in cells])
            handles.append(
                ax.bar(
                    x + (j - (len(methods) - 1) / 2) * width,
                    y,
                    width,
                    label=method,
                    yerr=np.nan_to_num([y - lo, hi - y]),
                    capsize=2,
                    edgecolor="black" if method == METAREC else None,
                )
            )
        ax.set_xticks(x, list(SUITE_BUCKETS), rotation=45, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("HR@10 (95% CI over users)")
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(str(path), format="png")
