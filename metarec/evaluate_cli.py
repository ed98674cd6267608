"""``metarec eval``: the prequential comparison of DESIGN.md, from the command line.

Kept out of :mod:`metarec.cli` so the argument wiring of each subcommand sits next to
nothing but its own job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from metarec.datasets import load_dataset
from metarec.evaluation import BASELINES, Factory, evaluate, plot_png, to_json, to_markdown
from metarec.online import metarec_factory, metarec_no_meta_factory
from metarec.scenarios import SCENARIOS
from metarec.scenarios import plot_png as plot_scenario

__all__ = ["METHODS", "add_eval_arguments", "run_eval"]

METHODS: dict[str, Factory] = {
    **BASELINES,
    "metarec": metarec_factory,
    "metarec_no_meta": metarec_no_meta_factory,
}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data",
                      help="a MovieLens folder (ml-100k or a CSV release), 'synthetic' or "
                           "'synthetic-small'")
    what.add_argument("--scenario", choices=sorted(SCENARIOS),
                      help="a named synthetic scenario instead: drift or cross-domain")
    parser.add_argument("--small", action="store_true",
                        help="with --scenario: a small stream (for a quick look)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--out", type=Path, default=Path("eval-out"),
                        help="folder for results.md and hr_by_event.png, or SCENARIO.png "
                             "(default: eval-out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_eval(args: argparse.Namespace) -> int:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        print(f"metarec eval: unknown method(s) {', '.join(unknown)}; choose from "
              f"{', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("metarec eval: --seeds must be at least 1", file=sys.stderr)
        return 2
    if args.scenario:
        return _run_scenario(args)
    dataset = load_dataset(args.data)
    started = time.perf_counter()
    report = evaluate(dataset, {n: METHODS[n] for n in names}, list(range(args.seeds)),
                      progress=not args.no_progress)
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
    print(f"\n{len(names)} methods x {args.seeds} seeds on {report.dataset}: "
          f"{elapsed:.0f} s; wrote {args.out / 'results.md'} and "
          f"{args.out / 'hr_by_event.png'}" + (f" and {args.json}" if args.json else ""))
    return 0


def _run_scenario(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    result = SCENARIOS[args.scenario](list(range(args.seeds)), small=args.small,
                                      progress=None if args.no_progress else
                                      lambda msg: print(f"... {msg}", file=sys.stderr))
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
