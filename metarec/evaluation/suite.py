"""The robustness suite: one set of defaults, judged on streams of other shapes.

Quality measured on one dataset says little about the next one. The suite runs the whole
comparison (every baseline, metarec and its ablation, the same code and default settings
the services run) on MovieLens 100K and on variants that change one thing each:

* ``ml-100k``: as it is (one domain, user demographics, seven months);
* ``ml-100k-no-profiles``: the same stream without user profiles (new users are strangers);
* ``ml-100k-stretched-30x``: every timestamp stretched 30 times around the first, so the
  same order of events spans 18 years (few events a day, as in long-running catalogues);
* ``ml-100k-third-of-users``: a random third of the users (a smaller, sparser stream);
* ``synthetic``: the project's own generator (three domains, cold items, drift).

It writes one table (method × dataset; HR@10 at event 1, over the first 5, the first 20
and all events, with 95% intervals), one plot, and a check of the quality targets: against
the best baseline of each dataset and bucket, and against the ablation without
meta-learning. Nothing in metarec knows which dataset it runs on.

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
from metarec.evaluation.protocol import (
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
    "SUITE_BUCKETS",
    "SuiteReport",
    "TargetCheck",
    "check_targets",
    "plot_png",
    "run_suite",
    "stretched",
    "suite_datasets",
    "targets_markdown",
    "to_markdown",
    "user_subset",
    "without_profiles",
]

#: The buckets the suite reports (of :data:`metarec.evaluation.protocol.BUCKETS`).
SUITE_BUCKETS = ("1", "first5", "first20", "all")
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


def suite_datasets(ml100k: str | Path) -> list[Dataset]:
    """The suite's five streams, from the MovieLens 100K folder ``ml100k``."""
    base = load_dataset(str(ml100k))
    base = dataclasses.replace(base, name="ml-100k")
    return [
        base,
        without_profiles(base),
        stretched(base),
        user_subset(base),
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
    names = {"1": "event 1", "first5": "first 5", "first20": "first 20", "all": "all"}
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


def _best_baseline(report: EvaluationReport, bucket: str) -> tuple[str, float] | None:
    scores = [
        (m, r.buckets[bucket].hr)
        for m, r in report.results.items()
        if m not in (METAREC, ABLATION) and math.isfinite(r.buckets[bucket].hr)
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
    """The quality targets, per dataset (see docs/RESULTS.md):

    * first 20 events: HR@10 ≥ 1.15 × the best baseline, intervals apart;
    * all events: ≥ 1.10 × the best baseline, intervals apart;
    * event 1: at least the best baseline's;
    * events 2-5: at least item-kNN's;
    * events 1-5 (``first5``): the ablation worse, intervals apart.
    """
    out: list[TargetCheck] = []
    for report in suite.reports:
        res = report.results
        if METAREC not in res:
            continue
        mine = res[METAREC].buckets
        for bucket, factor in (("first20", 1.15), ("all", 1.10), ("1", 1.0)):
            best = _best_baseline(report, bucket)
            if best is None:
                continue
            other = res[best[0]].buckets[bucket]
            apart = mine[bucket].hr_ci[0] > other.hr_ci[1]
            need_apart = factor > 1.0
            met = mine[bucket].hr >= factor * other.hr and (apart or not need_apart)
            out.append(
                TargetCheck(
                    report.dataset,
                    f"{bucket} >= {factor:g} x best baseline"
                    + (", intervals apart" if need_apart else ""),
                    mine[bucket].hr,
                    other.hr,
                    best[0],
                    met,
                    f"ratio {mine[bucket].hr / max(other.hr, 1e-12):.3f}, "
                    f"intervals {'apart' if apart else 'overlap'}",
                )
            )
        if "itemknn" in res:
            knn = res["itemknn"].buckets["2-5"]
            out.append(
                TargetCheck(
                    report.dataset,
                    "2-5 >= item-kNN",
                    mine["2-5"].hr,
                    knn.hr,
                    "itemknn",
                    mine["2-5"].hr >= knn.hr,
                    f"ratio {mine['2-5'].hr / max(knn.hr, 1e-12):.3f}",
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
    fig = Figure(figsize=(4.2 * n, 4.8), dpi=110)
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
        ax.set_xticks(x, ["event 1", "first 5", "first 20", "all"])
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("HR@10 (95% CI over users)")
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(str(path), format="png")
