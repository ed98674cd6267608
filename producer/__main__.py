"""``python -m producer``: send one event, or replay a dataset into a live metarec.

Why a CLI next to the class: operators and demos need to poke a running system without
writing code, and the replay tool is how the demo and the load tests feed it. Flags become
keyword arguments here; the library below never sees argparse.

Exit status: 0 done, 1 delivery failed, 2 bad configuration or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from metarec.config import Settings, add_arguments, settings_from_args
from metarec.errors import ConfigError, DataError, InvalidEvent, MetarecError
from producer.event_producer import EventProducer
from producer.replay import replay

__all__ = ["build_parser", "main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m producer`` (also used to document the CLI)."""
    settings_flags = argparse.ArgumentParser(add_help=False)
    add_arguments(settings_flags.add_argument_group("settings (override METAREC_* variables)"))

    parser = argparse.ArgumentParser(
        prog="python -m producer",
        description="Send one event, or replay a dataset into a live metarec.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    send = sub.add_parser("send", parents=[settings_flags], help="send one event")
    send.add_argument("--user", required=True, help="user id (the record key)")
    send.add_argument("--item", required=True, help="item id")
    send.add_argument("--type", default="click", help="event type (default: click)")
    send.add_argument("--domain", help="domain (default: 'default')")
    send.add_argument("--ts", type=int, help="epoch milliseconds (default: now)")
    send.add_argument("--event-id", help="id for de-duplication downstream")

    rep = sub.add_parser(
        "replay",
        parents=[settings_flags],
        help="publish a dataset's items, users, then its events in time order",
    )
    rep.add_argument(
        "--data", required=True, help="synthetic, synthetic-small or a MovieLens folder"
    )
    pace = rep.add_mutually_exclusive_group()
    pace.add_argument(
        "--rate",
        type=_positive(float),
        metavar="EVENTS_PER_S",
        help="send at this many events per second",
    )
    pace.add_argument(
        "--speedup",
        type=_positive(float),
        metavar="X",
        help="replay the data's own time gaps, X times faster",
    )
    rep.add_argument(
        "--limit", type=_positive(int), metavar="N", help="send only the first N events"
    )
    clock = rep.add_mutually_exclusive_group()
    clock.add_argument(
        "--ts-now",
        dest="rewrite_ts",
        action="store_true",
        default=True,
        help="stamp events with the time they are sent, keeping their order "
        "(default; what a live system's freshness and decay expect)",
    )
    clock.add_argument(
        "--keep-ts",
        dest="rewrite_ts",
        action="store_false",
        help="keep the data's original timestamps",
    )
    rep.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar on stderr"
    )
    return parser


def _send(args: argparse.Namespace, settings: Settings) -> int:
    with EventProducer(settings) as producer:
        event = producer.send(
            args.user,
            args.item,
            type=args.type,
            ts=args.ts,
            domain=args.domain,
            event_id=args.event_id,
        )
    print(f"sent {json.dumps(event.to_json())} to {settings.events_topic}")
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from metarec.data.registry import load_dataset  # heavy: numpy and the generators

    dataset = load_dataset(args.data, seed=settings.seed)
    producer = EventProducer(settings)
    report = replay(
        dataset,
        producer,
        rate=args.rate,
        speedup=args.speedup,
        limit=args.limit,
        rewrite_ts=args.rewrite_ts,
        progress=args.progress,
    )
    print(report.summary(settings.events_topic))
    return EXIT_INTERRUPTED if report.interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        command = _send if args.command == "send" else _replay
        return command(args, settings)
    except (ConfigError, InvalidEvent, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MetarecError as exc:  # DeliveryError and the rest: the run itself failed
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
