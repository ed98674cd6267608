"""The ``metarec`` command: one entry point, one subcommand per job.

The library never sees argparse: each subcommand turns flags into :class:`Settings` (flags
over ``METAREC_*`` environment variables over defaults, validated before any work) or
keyword arguments, and calls the module that does the job.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType
from typing import Protocol

import redis
from confluent_kafka import KafkaException

from metarec import __version__
from metarec.config import Settings, add_arguments, redact_url, settings_from_args
from metarec.errors import ConfigError, MetarecError
from metarec.logs import configure_logging, fatal
from metarec.services.topics import topic_plan

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_UNAVAILABLE", "build_parser", "main"]

#: Exit statuses of every command (docs/OPERATIONS.md, "Exit statuses"): 0 done; a job
#: that failed; a setting or argument that is wrong (the same again will fail again); Redis
#: or the broker could not be reached (the same again may work once they answer).
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3

DEV_STATE_DIR = Path(".metarec")
#: The settings each one-shot command reads, so that its flags and ``--help`` are those
#: (the services and the demo take every setting).
_REDIS_SETTINGS = ("redis_url", "key_prefix", "log_level")
_TOPIC_SETTINGS = (
    "events_topic",
    "items_topic",
    "users_topic",
    "dlq_topic",
    "model_topic",
    "partitions",
    "events_retention_hours",
)
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "recs": _REDIS_SETTINGS,
    "user": _REDIS_SETTINGS,
    "model": _REDIS_SETTINGS,
    "dlq": (*_REDIS_SETTINGS, "kafka_bootstrap", "group_id", "events_topic", "dlq_topic"),
    "topics": ("kafka_bootstrap", "log_level", *_TOPIC_SETTINGS),
    "dev": ("kafka_bootstrap", "redis_url", "log_level", *_TOPIC_SETTINGS),
}
#: Entry-point group of the services a command runs (``metarec consume``).
SERVICES_GROUP = "metarec.services"
log = logging.getLogger("metarec")


def build_parser() -> argparse.ArgumentParser:
    from metarec.evaluation.command import add_eval_arguments

    parser = argparse.ArgumentParser(
        prog="metarec",
        description="Streaming meta-learning recommender: Kafka events in, "
        "per-user top-K lists in Redis out. Design: "
        "docs/ARCHITECTURE.md; settings: every flag below is "
        "also a METAREC_* variable (README, Configuration).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser(
        "eval",
        help="prequential comparison against the baselines",
        description="Prequential (test-then-train) evaluation, full ranking, "
        "of metarec against the baselines, on the code the "
        "services run.",
    )
    add_eval_arguments(ev)

    consume = sub.add_parser(
        "consume",
        help="run one consumer of the consumer group",
        description="Consume events, adapt users, write lists to Redis "
        "(same as python -m consumer).",
    )
    add_arguments(consume)

    agg = sub.add_parser(
        "aggregate",
        help="run the aggregator (meta-training, versions)",
        description="Keep a window of recent events, fold the consumers' "
        "partial sums into the meta-model, meta-train, publish.",
    )
    mode = agg.add_mutually_exclusive_group()
    mode.add_argument(
        "--once",
        action="store_true",
        help="publish one version as soon as the window allows, then exit",
    )
    mode.add_argument(
        "--now", action="store_true", help="ask the running aggregator for a cycle now, then exit"
    )
    add_arguments(agg)

    recs = sub.add_parser(
        "recs",
        help="show a user's list and the state behind it",
        description="Print, as JSON, what an app showing DOMAIN is served for USER "
        "and from where (their own list, else the domain's fallback), their "
        "profile and a summary of their state.",
    )
    recs.add_argument("user")
    recs.add_argument(
        "--domain",
        default=None,
        help="the app's domain: the user's list of its items (default: of every domain)",
    )
    add_arguments(recs, COMMAND_SETTINGS["recs"])

    user = sub.add_parser(
        "user",
        help="act on one user's state",
        description="reset: delete USER's state and list (their next "
        "event starts them afresh; the profile stays).",
    )
    user.add_argument("action", choices=["reset"])
    user.add_argument("user")
    add_arguments(user, COMMAND_SETTINGS["user"])

    letters = sub.add_parser(
        "dlq",
        help="inspect or replay the dead-letter topic",
        description="inspect: print dead letters with their error and "
        "origin. replay: publish them again to their "
        "original topic, key and value unchanged, from where "
        "the last replay ended.",
    )
    letters.add_argument("action", choices=["inspect", "replay"])
    letters.add_argument(
        "--limit", type=_positive_int, default=100, help="inspect: most letters shown (>= 1)"
    )
    letters.add_argument(
        "--matching", default=None, help="only letters whose error message contains this"
    )
    letters.add_argument(
        "--dry-run",
        action="store_true",
        help="replay: count what would be replayed, publish nothing",
    )
    add_arguments(letters, COMMAND_SETTINGS["dlq"])

    models = sub.add_parser(
        "model",
        help="list model versions, roll back to one, pin one",
        description="list: stored versions, newest first, with their history "
        "(parent, reason, window, training time, validation loss) and which is "
        "current, pinned and served. rollback V: publish a copy of version V as the "
        "newest version (the next cycle publishes over it). pin V: consumers serve V "
        "whatever is published after it, while the aggregator goes on training. "
        "unpin: serve the newest again. Consumers reload within a second.",
    )
    models.add_argument("action", choices=["list", "rollback", "pin", "unpin"])
    models.add_argument("version", nargs="?", type=_positive_int)
    add_arguments(models, COMMAND_SETTINGS["model"])

    bench = sub.add_parser(
        "bench",
        help="the consumer against this machine's bounds",
        description="Measure, in one run on a local broker and the Redis "
        "of METAREC_REDIS_URL: Kafka, Redis and numpy bounds, "
        "the consumer end to end, freshness with 1 and 2 "
        "consumers, memory per user, training and reload "
        "times. Prints a Markdown table.",
    )
    bench.add_argument("--quick", action="store_true", help="a first look, in under 3 minutes")
    bench.add_argument("--items", type=int, default=1682, help="catalog size")
    bench.add_argument(
        "--big-items",
        type=int,
        default=100_000,
        help="catalog size of the big-catalogue runs (candidate scoring)",
    )
    bench.add_argument("--dim", type=int, default=32, help="embedding dimension d")
    bench.add_argument("--k", type=int, default=20, help="list length K")
    bench.add_argument("--batch-size", type=int, default=5000, help="consumer batch size")
    bench.add_argument(
        "--mix", default="click:0.7,like:0.25,dislike:0.05", help="event types and their shares"
    )
    bench.add_argument(
        "--rate", type=float, default=5000.0, help="events/s offered in the freshness runs"
    )
    bench.add_argument("--json", type=Path, default=None, help="also write every number here")
    bench.add_argument(
        "--redis-url",
        default=None,
        help="Redis to measure (default: METAREC_REDIS_URL or the local one)",
    )

    topics = sub.add_parser(
        "topics",
        help="create the services' topics where missing",
        description="Create the events, items, users, dead-letter and "
        "model topics on METAREC_KAFKA_BOOTSTRAP with their "
        "planned partitions and configs (compaction, "
        "retention); existing topics are left as they are. "
        "Prints each topic's partition count as JSON.",
    )
    add_arguments(topics, COMMAND_SETTINGS["topics"])

    dev = sub.add_parser(
        "dev",
        help="local services for a laptop: broker and Redis",
        description="Start, stop or inspect the local Tansu broker and Redis.",
    )
    dev.add_argument("action", choices=["up", "down", "status"])
    dev.add_argument(
        "--state-dir",
        type=Path,
        default=DEV_STATE_DIR,
        help="where the state file and logs live (default: .metarec)",
    )
    add_arguments(dev, COMMAND_SETTINGS["dev"])

    demo = sub.add_parser(
        "demo",
        help="run the whole loop on a bundled synthetic stream",
        description="Services up, replay a synthetic stream, two consumers "
        "and the aggregator, print lists and stats, shut down.",
    )
    demo.add_argument(
        "--data", default="synthetic-small", help="dataset to replay (default: synthetic-small)"
    )
    demo.add_argument("--rate", type=float, default=1500.0, help="events per second")
    demo.add_argument("--state-dir", type=Path, default=DEV_STATE_DIR)
    add_arguments(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            from metarec.evaluation.command import run_eval

            return run_eval(args)
        if args.command == "bench":
            return _bench(args)
        settings = settings_from_args(args)
        configure_logging(settings.log_level, service=f"metarec-{args.command}")
        if args.command == "consume":
            app = _service("consume")(settings)
            _stop_on_signals(app.stop)
            return app.run()
        if args.command == "aggregate":
            return _aggregate(settings, once=args.once, now=args.now)
        if args.command in ("recs", "user", "dlq", "model"):
            return _operate(settings, args)
        if args.command == "topics":
            return _topics(settings)
        if args.command == "dev":
            return _dev(settings, args.action, args.state_dir)
        if args.command == "demo":
            from metarec.local.demo import run_demo

            return run_demo(settings, data=args.data, rate=args.rate, state_dir=args.state_dir)
    except ConfigError as exc:
        fatal("configuration error", service=f"metarec-{args.command}", error=str(exc))
        return EXIT_CONFIG
    except MetarecError as exc:
        fatal(
            f"{args.command} failed",
            service=f"metarec-{args.command}",
            error=str(exc),
            kind=type(exc).__name__,
        )
        return EXIT_FAILED
    except (redis.RedisError, KafkaException) as exc:
        # What the services retry through (docs/OPERATIONS.md) a one-shot command reports.
        refused = isinstance(exc, redis.AuthenticationError | redis.exceptions.NoPermissionError)
        fatal(
            f"{args.command} failed: {_dependency_failure(exc, refused=refused)}",
            service=f"metarec-{args.command}",
            error=str(exc),
            kind=type(exc).__name__,
        )
        return EXIT_CONFIG if refused else EXIT_UNAVAILABLE
    parser.error(f"unknown command {args.command}")
    return EXIT_CONFIG


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse's one-line error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _dependency_failure(exc: Exception, *, refused: bool) -> str:
    """What went wrong, naming the setting that points at it."""
    if isinstance(exc, KafkaException):
        return "the broker at METAREC_KAFKA_BOOTSTRAP did not answer"
    if refused:
        return "Redis at METAREC_REDIS_URL refused these credentials or this ACL user"
    return "Redis at METAREC_REDIS_URL did not answer"


class Service(Protocol):
    """A long-running process loop: ``run()`` until ``stop()``, then its exit status."""

    def run(self) -> int: ...

    def stop(self) -> None: ...


def _service(command: str) -> Callable[[Settings], Service]:
    """The service that runs ``command``, found by its entry point.

    Why an entry point, not an import: the library must not depend on the services built
    on it (the consumer imports the library, never the reverse); the consumer package
    registers itself under :data:`SERVICES_GROUP` in pyproject.toml.
    """
    found = entry_points(group=SERVICES_GROUP, name=command)
    if not found:
        raise ConfigError(
            f"no service for `metarec {command}` is installed (entry point "
            f"{command!r} in group {SERVICES_GROUP!r}); install metarec "
            "with pip (the consumer package ships with it)"
        )
    factory: Callable[[Settings], Service] = next(iter(found)).load()
    return factory


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT ask a service to finish what is in flight and exit 0."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        log.info("stopping after the work in flight", extra={"signal": signum})
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _aggregate(settings: Settings, *, once: bool, now: bool) -> int:
    from metarec.services.aggregator import OPERATOR_REQUEST, Aggregator
    from metarec.services.store import RedisStore

    if now:
        # A request, not a service: one try, no outage retries (exit 3 if Redis is down).
        RedisStore.connect(settings.redis_url, settings.key_prefix).request_aggregation(
            OPERATOR_REQUEST
        )
        print("requested an aggregation cycle")
        return 0
    agg = Aggregator(settings)
    _stop_on_signals(agg.stop)
    return agg.run(max_cycles=1 if once else None)


def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from metarec.local.bench import BenchConfig, run_bench, to_markdown

    try:
        mix = {t: float(w) for t, w in (pair.split(":") for pair in args.mix.split(","))}
    except ValueError:
        raise ConfigError(
            f"invalid --mix {args.mix!r}; expected TYPE:SHARE,... such as "
            "click:0.7,like:0.25,dislike:0.05"
        ) from None
    if not mix or set(mix) - {"click", "like", "dislike"} or min(mix.values()) < 0:
        raise ConfigError(f"invalid --mix {args.mix!r}: types click, like, dislike, shares >= 0")
    cfg = BenchConfig(
        items=args.items,
        dim=args.dim,
        top_k=args.k,
        batch_size=args.batch_size,
        mix=mix,
        quick=args.quick,
        rate=args.rate,
        big_items=args.big_items,
    )
    url = args.redis_url or Settings.from_env().redis_url
    phases = 9 + len(cfg.user_counts) + len(cfg.training_windows)
    with tqdm(total=phases, unit="phase", file=sys.stderr) as bar:

        def progress(what: str) -> None:
            if bar.n or bar.desc:
                bar.update(1)
            bar.set_description(what)

        result = run_bench(cfg, url, progress)
        bar.update(1)
    print(to_markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _operate(settings: Settings, args: argparse.Namespace) -> int:
    """The operator commands (:mod:`metarec.services.operations`); each prints one JSON document."""
    from metarec.services import operations
    from metarec.services.store import RedisStore

    # librdkafka's connection chatter: a one-shot command reports a failure in one line.
    logging.getLogger("metarec.kafka.operations").setLevel(logging.CRITICAL)

    store = RedisStore.connect(settings.redis_url, settings.key_prefix)
    result: object
    if args.command == "recs":
        result = operations.user_summary(store, args.user, args.domain)
    elif args.command == "user":
        result = {"user": args.user, "reset": operations.reset_user(store, args.user)}
    elif args.command == "dlq" and args.action == "inspect":
        result = operations.inspect_dead_letters(settings, limit=args.limit, matching=args.matching)
    elif args.command == "dlq":
        result = operations.replay_dead_letters(
            settings, store, dry_run=args.dry_run, matching=args.matching
        )
    elif args.action == "list":
        result = operations.list_models(store)
    elif args.action == "unpin":
        result = operations.pin_model(store, None)
    else:
        if args.version is None:
            raise ConfigError(f"metarec model {args.action} needs the VERSION to serve")
        if args.action == "pin":
            result = operations.pin_model(store, args.version)
        else:
            result = {
                "rolled_back_to": args.version,
                "published": operations.rollback_model(store, args.version),
            }
    print(json.dumps(result, indent=2))
    return 0


def _topics(settings: Settings) -> int:
    """Create the services' topics where missing; report each one's partitions."""
    from metarec.local.devservices import create_topics

    plan = topic_plan(settings)
    counts = create_topics(
        settings.kafka_bootstrap,
        {n: t.partitions for n, t in plan.items()},
        configs={n: t.config for n, t in plan.items()},
        timeout=30.0,
    )
    differ = {n: c for n, c in counts.items() if c != plan[n].partitions}
    print(json.dumps({"topics": counts, "planned": {n: t.partitions for n, t in plan.items()}}))
    if differ:
        log.warning(
            "topics exist with other partition counts than planned; left as they are",
            extra={"topics": differ},
        )
    return 0


def _dev(settings: Settings, action: str, state_dir: Path) -> int:
    from metarec.local import devservices

    if action == "up":
        host, _, port = settings.kafka_bootstrap.rpartition(":")
        if host not in {"127.0.0.1", "localhost"}:
            raise ConfigError(
                f"metarec dev up starts a local broker; METAREC_KAFKA_BOOTSTRAP "
                f"is {settings.kafka_bootstrap!r}, not 127.0.0.1:PORT"
            )
        plan = topic_plan(settings)
        state = devservices.up(
            state_dir,
            broker_port=int(port),
            redis_url=settings.redis_url,
            topics={name: t.partitions for name, t in plan.items()},
            configs={name: t.config for name, t in plan.items()},
        )
        print(f"broker  {state.bootstrap} (pid {state.broker.pid})")
        print(f"redis   {redact_url(state.redis.url)} ({state.redis.server})")
        print("topics  " + ", ".join(f"{t}[{n}]" for t, n in sorted(state.topics.items())))
        return 0
    if action == "down":
        result = devservices.down(state_dir)
        # Text, like `dev up` and `dev status`: one line per service.
        for what in result.stopped:
            print(f"stopped       {what}")
        for what in result.left_running:
            print(f"left running  {what} (not started by metarec dev up)")
        if not result.stopped and not result.left_running:
            print(f"nothing to stop (no services started from {state_dir})")
        return 0
    st = devservices.status(state_dir)
    for svc in (st.broker, st.redis):
        if svc is not None:
            print(f"{svc.name:7} {svc.address} pid={svc.pid} answers={svc.answers}")
    if st.topics:
        print("topics  " + ", ".join(f"{t}[{n}]" for t, n in sorted(st.topics.items())))
    print("healthy" if st.healthy else "not running" if st.state is None else "unhealthy")
    return 0 if st.healthy else 1


if __name__ == "__main__":
    sys.exit(main())
