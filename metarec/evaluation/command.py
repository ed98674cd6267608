"""``metarec eval``: the prequential comparison, the suite and the scenarios, from the CLI.

Kept out of :mod:`metarec.cli` so the argument wiring of each subcommand sits next to
nothing but its own job.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from metarec.config import Settings
from metarec.core.learner import score_components
from metarec.data.registry import load_dataset
from metarec.errors import ConfigError, DataError
from metarec.evaluation import suite
from metarec.evaluation.online import metarec_factory, metarec_no_meta_factory
from metarec.evaluation.protocol import (
    BASELINES,
    DETERMINISTIC,
    Factory,
    evaluate,
    plot_png,
    to_json,
    to_markdown,
)
from metarec.evaluation.scenarios import SCENARIOS
from metarec.evaluation.scenarios import plot_png as plot_scenario

__all__ = ["COMPONENT_PREFIX", "METHODS", "add_eval_arguments", "methods_for", "run_eval"]

#: Every method ``metarec eval`` compares by default, in report order.
METHODS: tuple[str, ...] = (*BASELINES, "metarec", "metarec_no_meta")
#: How a method naming part of metarec's score starts: ``metarec:knn``, ``metarec:user+bias``.
COMPONENT_PREFIX = "metarec:"


def methods_for(settings: Settings, names: Sequence[str] = METHODS) -> dict[str, Factory]:
    """The factories of ``names``: :data:`METHODS`, or ``metarec:`` followed by terms of
    metarec's score joined by ``+`` (:func:`metarec.core.learner.score_components`), which
    rank by those terms alone with everything else as the services run it. metarec runs
    under ``settings``, as the services do. Raises :class:`ConfigError` on an unknown name."""
    known: dict[str, Factory] = {
        **BASELINES,
        "metarec": functools.partial(metarec_factory, settings=settings),
        "metarec_no_meta": functools.partial(metarec_no_meta_factory, settings=settings),
    }
    components = score_components()
    out: dict[str, Factory] = {}
    for name in names:
        if name in known:
            out[name] = known[name]
            continue
        parts = name.removeprefix(COMPONENT_PREFIX).split("+")
        if not name.startswith(COMPONENT_PREFIX) or not set(parts) <= set(components):
            raise ConfigError(
                f"unknown method {name!r}; choose from {', '.join(METHODS)}, or "
                f"{COMPONENT_PREFIX}PART[+PART...] with PART one of {', '.join(components)}"
            )
        out[name] = functools.partial(metarec_factory, settings=settings, components=parts)
    return out


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--data",
        help="a MovieLens folder (ml-100k or a CSV release), 'synthetic' or "
        "'synthetic-small', or an event log file: JSON lines as published to the events "
        "topic (item and user records may be mixed in), or a CSV with the header "
        "user,item,type,ts[,domain] (ts in epoch milliseconds)",
    )
    what.add_argument(
        "--suite",
        metavar="MOVIELENS_DIR",
        type=Path,
        help="the robustness suite: the folder holding ml-100k/ and ml-latest-small/ "
        "(or the ml-100k folder, with ml-latest-small beside it); runs MovieLens 100K, "
        "its variants (no profiles, timestamps x30, a third of the users), "
        "ml-latest-small and the synthetic stream",
    )
    what.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        help="a named synthetic scenario instead: drift or cross-domain",
    )
    parser.add_argument(
        "--items", type=Path, help="with --data FILE: item records, JSON lines (optional)"
    )
    parser.add_argument(
        "--users", type=Path, help="with --data FILE: user records, JSON lines (optional)"
    )
    parser.add_argument(
        "--small", action="store_true", help="with --scenario: a small stream (for a quick look)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated methods (default: all of them): "
        + ", ".join(METHODS)
        + f"; or one part of metarec's score alone, {COMPONENT_PREFIX}PART "
        + f"(PART: {', '.join(score_components())}; several joined by +)",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("eval-out"),
        help="folder for results.md and hr_by_event.png, or SCENARIO.png (default: eval-out)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel processes (default: one per core); results do not depend on it",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_eval(args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    if not names:
        print("metarec eval: --methods names no method", file=sys.stderr)
        return 2
    if args.seeds < 1 or args.workers < 1:
        print("metarec eval: --seeds and --workers must be at least 1", file=sys.stderr)
        return 2
    if args.scenario:
        return _run_scenario(args)
    # The services' settings, from the same METAREC_* environment they read.
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"metarec eval: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        chosen = methods_for(settings, names)
    except ConfigError as exc:
        print(f"metarec eval: {exc}", file=sys.stderr)
        return 2
    if args.suite:
        return _run_suite(args, chosen)
    try:
        dataset = load_dataset(args.data, items=args.items, users=args.users)
    except DataError as exc:
        print(f"metarec eval: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = evaluate(
        dataset,
        chosen,
        list(range(args.seeds)),
        progress=not args.no_progress,
        deterministic=DETERMINISTIC,
        workers=args.workers,
    )
    elapsed = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(report)
    (args.out / "results.md").write_text(table + "\n")
    plot_png(report, args.out / "hr_by_event.png")
    if args.json:
        payload = to_json(report)
        payload["meta"]["total_wall_time_s"] = round(elapsed, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(table)
    print(
        f"\n{len(names)} methods x {args.seeds} seeds on {report.dataset}: "
        f"{elapsed:.0f} s; wrote {args.out / 'results.md'} and "
        f"{args.out / 'hr_by_event.png'}" + (f" and {args.json}" if args.json else "")
    )
    return 0


def _run_suite(args: argparse.Namespace, methods: dict[str, Factory]) -> int:
    started = time.perf_counter()
    try:
        datasets = suite.suite_datasets(args.suite)
    except DataError as exc:
        print(f"metarec eval: {exc}", file=sys.stderr)
        return 2
    result = suite.run_suite(
        datasets,
        methods,
        list(range(args.seeds)),
        workers=args.workers,
        progress=not args.no_progress,
    )
    result = suite.SuiteReport(result.reports, time.perf_counter() - started)
    checks = suite.check_targets(result)
    text = (
        f"Robustness suite, {args.seeds} seed(s), HR@10 with 95% bootstrap intervals "
        "over users (best baseline in italics, metarec in bold where it beats it):\n\n"
        + suite.to_markdown(result)
        + "\nTargets:\n\n"
        + suite.targets_markdown(checks)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.md").write_text(text)
    suite.plot_png(result, args.out / "suite.png")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(text)
    print(
        f"{len(methods)} methods x {args.seeds} seeds x {len(datasets)} datasets: "
        f"{result.wall_time_s:.0f} s; wrote {args.out / 'suite.md'} and "
        f"{args.out / 'suite.png'}" + (f" and {args.json}" if args.json else "")
    )
    return 0


def _run_scenario(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    result = SCENARIOS[args.scenario](
        list(range(args.seeds)),
        small=args.small,
        progress=None if args.no_progress else lambda msg: print(f"... {msg}", file=sys.stderr),
    )
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{args.scenario}.png"
    plot_scenario(result, png)
    print(f"wrote {png}" + (f" and {args.json}" if args.json else ""), file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0
