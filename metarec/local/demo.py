"""``metarec demo``: the whole product on one laptop, start to finish.

Services up (the local broker and Redis, reused when already running), two consumer
processes and the aggregator, a replay of a bundled synthetic stream through the producer,
then a few users' lists and the consumers' stats are printed and everything started here is
shut down. Each run uses its own topics, group ids and key prefix, so runs never mix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from metarec.client import Recommendations
from metarec.config import Settings
from metarec.core.live_quality import ALL
from metarec.data.registry import load_dataset
from metarec.errors import MetarecError
from metarec.local import devservices
from metarec.services.store import RedisStore
from producer.event_producer import EventProducer
from producer.replay import replay

__all__ = ["run_demo"]

PARTITIONS = 4
CONSUMERS = 2
#: How long to wait for the consumers to catch up with everything the replay sent.
CATCH_UP_S = 180.0
STATS_INTERVAL_S = 5
#: Pause between two members leaving the group (Tansu's stuck-group bug needs > 0.5 s).
LEAVE_GAP_S = 1.0


def _env(settings: Settings, run: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAREC_")}
    env.update(
        {
            "METAREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "METAREC_REDIS_URL": settings.redis_url,
            "METAREC_KEY_PREFIX": f"metarec-demo-{run}:",
            "METAREC_GROUP_ID": f"metarec-demo-{run}",
            "METAREC_AGGREGATOR_GROUP_ID": f"metarec-demo-{run}-aggregator",
            "METAREC_EVENTS_TOPIC": f"metarec-demo-{run}.events",
            "METAREC_ITEMS_TOPIC": f"metarec-demo-{run}.items",
            "METAREC_USERS_TOPIC": f"metarec-demo-{run}.users",
            "METAREC_DLQ_TOPIC": f"metarec-demo-{run}.events.dlq",
            "METAREC_MODEL_TOPIC": f"metarec-demo-{run}.model",
            "METAREC_TOP_K": str(settings.top_k),
            "METAREC_MIN_EVENTS_FOR_MODEL": "1000",
            "METAREC_AGGREGATE_INTERVAL_S": "8",
            "METAREC_STATS_INTERVAL_S": str(STATS_INTERVAL_S),
            "METAREC_LOG_LEVEL": settings.log_level,
        }
    )
    return env


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(settings: Settings, *, data: str, rate: float, state_dir: Path) -> int:
    """Run the demo; returns the process exit code (0 when every step worked)."""
    started_services = False
    st = devservices.status(state_dir)
    if not st.healthy:
        _say("starting the local broker and Redis ...")
        host_port = settings.kafka_bootstrap.rpartition(":")[2]
        devservices.up(
            state_dir, broker_port=int(host_port), redis_url=settings.redis_url, topics={}
        )
        started_services = True
        st = devservices.status(state_dir)
    assert st.state is not None
    bootstrap, redis_url = st.state.bootstrap, st.state.redis.url
    settings = settings.replace(kafka_bootstrap=bootstrap, redis_url=redis_url)
    run = uuid.uuid4().hex[:8]
    env = _env(settings, run)
    demo = Settings.from_env(env)
    devservices.create_topics(
        bootstrap,
        {
            demo.events_topic: PARTITIONS,
            demo.items_topic: 1,
            demo.users_topic: 1,
            demo.dlq_topic: 1,
            demo.model_topic: 1,
        },
    )
    logs = state_dir / f"demo-{run}"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for name, argv in [
            (f"consumer-{i}", [sys.executable, "-m", "consumer"]) for i in range(CONSUMERS)
        ] + [("aggregator", [sys.executable, "-m", "metarec.cli", "aggregate"])]:
            out = (logs / f"{name}.log").open("wb")
            procs.append(
                (
                    name,
                    subprocess.Popen(  # noqa: S603 - argv built here from our own commands
                        argv,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    ),
                )
            )
        _say(f"started {CONSUMERS} consumers and the aggregator (logs in {logs})")
        dataset = load_dataset(data, seed=settings.seed)
        _say(f"replaying {len(dataset.events)} events of {dataset.name!r} at {rate:.0f}/s")
        with EventProducer(demo) as producer:
            report = replay(dataset, producer, rate=rate, progress=True)
        _say(report.summary(demo.events_topic))
        store = RedisStore(redis.Redis.from_url(redis_url), demo.key_prefix)
        if not _wait_applied(store, demo, report.events):
            raise MetarecError(f"the consumers did not catch up in time; see the logs in {logs}")
        version = _wait_model(store)
        shown = list(
            dict.fromkeys(
                [
                    dataset.events[-1].user,
                    dataset.events[len(dataset.events) // 2].user,
                    dataset.events[0].user,
                ]
            )
        )
        _say(f"all {report.events} events applied; model version {version} published")
        if all(_wait_list_version(store, user, version) for user in shown):
            _say(f"consumers hot-reloaded version {version}: lists now come from the model")
        _show(store, *shown)
        _show_newcomer(store, dataset.events[-1].domain)
        time.sleep(STATS_INTERVAL_S + 1)  # one more stats line, written after the reload
        for member, beat in sorted(store.heartbeats(demo.group_id).items()):
            stats = beat.get("stats", beat)
            live = stats.get("live", {}).get(ALL, {})
            _say(
                f"consumer {member}: partitions {stats.get('partitions')}, "
                f"{stats.get('total_events')} events applied, {stats.get('total_dlq')} "
                f"dead letters, model v{stats.get('model_version')}, live HR@"
                f"{demo.top_k} {live.get('hr', 0.0):.3f} over {live.get('events', 0)} "
                f"events"
            )
        _say(f"read a list yourself: redis-cli GET '{store.recs_key(dataset.events[-1].user)}'")
        return 0
    finally:
        # One member at a time: on the local Tansu broker, a group whose members all
        # leave within half a second gives new members no partitions for minutes
        # (docs/LOCAL_SERVICES.md); a rerun with the same group id would sit idle.
        codes: dict[str, int] = {}
        for name, proc in procs:
            proc.send_signal(signal.SIGTERM)
            codes[name] = proc.wait(timeout=30)
            time.sleep(LEAVE_GAP_S)
        _say("stopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()))
        if started_services:
            devservices.down(state_dir)
            _say("local services stopped")


def _wait_applied(store: RedisStore, demo: Settings, n_events: int) -> bool:
    deadline = time.monotonic() + CATCH_UP_S
    while time.monotonic() < deadline:
        offsets = store.offsets(demo.events_topic, list(range(PARTITIONS)))
        if sum(v or 0 for v in offsets.values()) >= n_events:
            return True
        time.sleep(0.5)
    return False


def _wait_model(store: RedisStore, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = store.current_model_version()
        if version is not None:
            return version
        time.sleep(0.5)
    raise MetarecError("the aggregator published no model in time")


def _wait_list_version(store: RedisStore, user: str, version: int, timeout: float = 60.0) -> bool:
    """Wait until ``user``'s list was ranked by ``version`` (the background refresh)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = store.read_recs(user)
        if recs is not None and recs["model_version"] >= version:
            return True
        time.sleep(0.5)
    return False


def _show_newcomer(store: RedisStore, domain: str) -> None:
    """What an app shows a user with no list yet: the domain's fallback (metarec.client)."""
    reader = Recommendations(store.client, prefix=store.prefix)
    deadline = time.monotonic() + 15.0  # the consumers refresh fallbacks every 5 s
    shown = reader.get("someone-new", domain)
    while (shown is None or shown.model_version != store.current_model_version()) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
        shown = reader.get("someone-new", domain)
    if shown is not None:
        _say(
            f"a newcomer to {domain!r} is shown the fallback (model v{shown.model_version}): "
            f"{', '.join(shown.items[:8])}, ..."
        )


def _show(store: RedisStore, *users: str) -> None:
    for user in dict.fromkeys(users):
        recs = store.read_recs(user)
        if recs is None:
            continue
        items = ", ".join(recs["items"][:8])
        _say(f"recs:{user} (model v{recs['model_version']}, {recs['events']} events): {items}, ...")
