"""Model versions: hot reload, asking for a cycle when live quality drops, and the lists
the consumer writes being the ones ``metarec eval`` measures."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from consumer.app import MODEL_POLL_S
from metarec.core.events import Event, ItemRecord
from metarec.core.model import MetaModel
from tests.consumer.system import (
    Publisher,
    System,
    check_list,
    make_model,
    make_system,
    stream,
    wait_until,
)
from tests.kafka_read import read_records

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

__all__ = ["make_system"]  # a fixture: pytest finds it in this module


# --- 6. hot reload ----------------------------------------------------------------------------


def list_versions(system: System, users: Sequence[str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for user in users:
        recs = system.recs(user)
        out[user] = None if recs is None else recs["model_version"]
    return out


def test_consumers_hot_reload_new_models_and_refresh_lists(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    events = stream(seed=3, limit=300)
    system = make_system(2, METAREC_MIN_EVENTS_FOR_MODEL=str(len(events)))
    pub = Publisher(kafka_bootstrap)
    for e in events:
        pub.send_event(system.events, e)
    pub.flush()
    consumers = [system.start(), system.start()]
    system.wait_applied(pub.ends(system.events))
    per_user = pub.per_user(system.events)
    users = sorted(per_user)
    assert set(list_versions(system, users).values()) == {0}  # popularity before a model

    aggregator = system.start(["-m", "metarec.cli", "aggregate", "--once"])
    try:
        code = aggregator.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"metarec aggregate --once did not publish a model in 120s{system.logs()}")
    assert code == 0, f"metarec aggregate --once exited {code}{system.logs()}"
    assert system.store.current_model_version() == 1
    catalog = {e.item for e in events}
    # No new event: the consumers reload v1 and re-rank their recent users in the background.
    for version in (1, 2):
        if version == 2:
            v2 = MetaModel.from_bytes(system.store.load_model_blob(1))
            v2.theta0 = v2.theta0 + np.float32(0.5)
            assert system.store.publish_model(v2.to_bytes()) == 2

        def moved(version: int = version) -> bool:
            return set(list_versions(system, users).values()) == {version}

        wait_until(
            moved,
            30.0,
            f"every list to move to model v{version} without new events",
            lambda: f"{Counter(list_versions(system, users).values())}{system.logs()}",
            procs=consumers,
        )
        for user in users:
            check_list(
                system,
                user,
                events=per_user[user],
                catalog=catalog,
                consumed={e.item for e in events if e.user == user},
                top_k=20,
                model_version=version,
            )
            state = system.state(user)
            assert state is not None and state.model_version == version
            assert state.n_events == per_user[user]
    assert all(c.poll() is None for c in consumers), f"a consumer restarted{system.logs()}"
    # New events are adapted and ranked under v2, for known users and a new one.
    now = int(time.time() * 1000)
    fresh = [
        Event(users[0], events[0].item, "like", now),
        Event("newcomer", events[1].item, "click", now),
    ]
    for e in fresh:
        pub.send_event(system.events, e)
    pub.flush()
    system.wait_applied(pub.ends(system.events))
    for user, n in ((users[0], per_user[users[0]] + 1), ("newcomer", 1)):
        recs = system.recs(user)
        assert recs is not None and recs["model_version"] == 2 and recs["events"] == n, recs
    # A version in a format these consumers do not read (an aggregator upgraded before
    # them): each says so, naming the format, and keeps serving v2.
    assert system.store.publish_model(_in_format(system.store.load_model_blob(2), 99)) == 3
    wait_until(
        lambda: all("has format 99" in system.log_of(c) for c in consumers),
        30.0,
        "every consumer to report the unreadable format",
        system.warnings,
        procs=consumers,
    )
    pub.send_event(system.events, Event(users[1], events[2].item, "click", now + 1))
    pub.flush()
    system.wait_applied(pub.ends(system.events))
    recs = system.recs(users[1])
    assert recs is not None and recs["model_version"] == 2, recs
    assert all(c.poll() is None for c in consumers), f"a consumer stopped{system.logs()}"
    time.sleep(8 * MODEL_POLL_S)  # more polls: the version is reported once, not each time
    assert [system.log_of(c).count("has format 99") for c in consumers] == [1, 1]


def _in_format(artifact: bytes, fmt: int) -> bytes:
    """``artifact`` relabelled as model format ``fmt``."""
    import io

    with np.load(io.BytesIO(artifact), allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    header = json.loads(arrays["header"].tobytes().decode()) | {"format": fmt}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# --- 7. live quality drops: the consumer asks for an aggregation ---------------------------


def test_a_drop_in_live_quality_asks_for_a_cycle_on_the_new_regime(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(1)
    # A model whose lists are its item biases alone: the "hit" items in a fixed order.
    hits = [f"hit-{k}" for k in range(30)]
    misses = [f"miss-{k}" for k in range(30)]
    model = make_model(hits + misses, ["books"])
    for table in (model.item_emb, model.item_ctx, model.item_bias):
        table[:] = 0.0
    model.item_bias[: len(hits)] = 100.0 - np.arange(len(hits))
    assert system.store.publish_model(model.to_bytes()) == 1
    # Users first take the top of their list (hits after their first event), then, from
    # ``change`` on, items their lists never show. One event per user per round, each
    # applied before the next: a hit is judged on the list the app could read by then.
    users = [f"u{k}" for k in range(40)]
    base = int(time.time() * 1000) - 3_600_000
    change = base + 1_000_000
    rounds = [
        [Event(u, hits[k], "click", base + 100 * k + j, "books") for j, u in enumerate(users)]
        for k in range(12)
    ]
    # Enough rounds for the drop to be flagged and then confirmed over half a live window.
    rounds += [
        [Event(u, misses[k], "click", change + 100 * k + j, "books") for j, u in enumerate(users)]
        for k in range(24)
    ]
    consumer = system.start()
    pub = Publisher(kafka_bootstrap)
    for item in hits + misses:  # the whole catalogue is known from the start
        pub.send(
            system.items,
            item.encode(),
            json.dumps(ItemRecord(item, "books", (), base).to_json()).encode(),
        )
    for events in rounds:
        for e in events:
            pub.send_event(system.events, e)
        pub.flush()
        system.wait_applied(pub.ends(system.events))

    wait_until(
        lambda: system.store.aggregation_request() is not None,
        10.0,
        "a request for an aggregation",
        lambda: f"{system.store.heartbeats(system.group)}{system.logs()}",
        procs=[consumer],
    )
    reason = system.store.aggregation_request()
    assert reason is not None and reason.startswith("drift in domain 'books'"), reason
    floor = system.store.training_floor()
    assert floor is not None and change <= floor <= rounds[-1][-1].ts, (floor, change)
    beat = next(iter(system.store.heartbeats(system.group).values()))
    assert beat["live"]["books"]["drifts"] >= 1

    # Until its lists recover, each new version makes it ask for the next.
    system.store.clear_aggregation_request()
    assert system.store.publish_model(model.to_bytes()) == 2
    wait_until(
        lambda: (system.store.aggregation_request() or "").startswith("recovering from drift"),
        30.0,
        "a request for the next cycle after reloading v2",
        lambda: f"{system.store.aggregation_request()}{system.logs()}",
        procs=[consumer],
    )
    assert system.terminate(consumer) == 0


# --- one learner: the consumer writes what metarec eval measures ---------------------------


def test_the_consumer_writes_the_lists_metarec_eval_computes(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    """The services and ``metarec eval`` run one learner.

    One stream goes through the consumer (real broker and Redis) with the aggregator's
    cycles in between, and through the evaluation's in-process learner with the same
    settings; both train the same model versions at the same events, fold the same
    partial sums in, and end with the same lists. The consumer takes one record per batch,
    as the evaluation applies one timestamp group (here: one event) at a time.
    """
    from metarec.data.dataset import Dataset
    from metarec.evaluation.online import OnlineMetarec
    from metarec.evaluation.protocol import encode
    from metarec.services.aggregator import Aggregator
    from metarec.training.trainer import MetaTrainer
    from tests.streams import feed

    first, every, tail = 500, 400, 300
    history = 10
    system = make_system(
        1,
        METAREC_BATCH_SIZE="1",
        METAREC_HISTORY_LENGTH=str(history),
        METAREC_MIN_EVENTS_FOR_MODEL=str(first),
        METAREC_RETRAIN_EVENTS=str(every),
    )
    rng = np.random.default_rng(5)
    taste = rng.integers(0, 4, 40)
    base = int(time.time() * 1000) - 3_600_000
    events = []
    for k in range(first + every + tail):
        u = int(rng.integers(0, 40))
        item = int(rng.integers(0, 15)) * 4 + int(taste[u])
        kind = "like" if rng.random() < 0.3 else "dislike" if rng.random() < 0.05 else "click"
        events.append(Event(f"u{u}", f"i{item}", kind, base + 7 * k))

    def trainer() -> MetaTrainer:
        return MetaTrainer(
            dim=8, history_length=history, batch_size=128, min_steps=20, max_steps=20, seed=0
        )

    settings = system.settings()
    stream = encode(Dataset("same-stream", events))
    # The evaluation's side: every event its own timestamp group.
    offline = OnlineMetarec(stream, settings=settings, trainer=trainer(), seed=settings.seed)
    # The services' side.
    agg = Aggregator(settings, trainer())
    consumer = system.start()
    pub = Publisher(kafka_bootstrap)

    def same_lists(phase: str) -> None:
        differ = []
        for u in sorted({e.user for e in events[:done]}):
            recs = system.recs(u)
            assert recs is not None
            mine = [offline.learner.catalog.item_id(int(j)) for j in offline.states[u].recs]
            if recs["items"] != mine:
                differ.append((u, recs["items"], mine))
        assert not differ, f"{phase}: {len(differ)} lists differ, e.g. {differ[:2]}"

    done = 0
    try:
        for end in (first, first + every, len(events)):
            feed(offline, stream, done, end)
            for e in events[done:end]:
                pub.send_event(system.events, e)
            pub.flush()
            system.wait_applied(pub.ends(system.events))
            agg.ingest(read_records(kafka_bootstrap, system.events, 1, end - done, done))
            done = end
            reason = agg.due()
            if reason is not None:
                version = agg.cycle(reason=reason)
                # The consumer reloads, then refreshes its users' lists while idle.
                seen = {e.user for e in events[:done]}
                wait_until(
                    lambda v=version, seen=seen: all(
                        (system.recs(u) or {}).get("model_version") == v for u in seen
                    ),
                    60.0,
                    f"every list to come from version {version}",
                    system.logs,
                    procs=[consumer],
                )
            same_lists(f"after {done} events")
    finally:
        agg.consumer.close()
        agg.producer.flush(5)
    assert [t["reason"] for t in offline.trainings] == ["first model", "schedule"]
    assert system.store.current_model_version() == 2
    served = MetaModel.from_bytes(system.store.load_model_blob(2))
    assert offline.model is not None
    np.testing.assert_allclose(
        served.theta0,
        offline.model.theta0,
        rtol=1e-5,
        atol=1e-6,
        err_msg="the Reptile folds differ",
    )
    np.testing.assert_allclose(served.item_emb, offline.model.item_emb, rtol=1e-5, atol=1e-6)
    assert system.terminate(consumer) == 0
