"""Letting Debian's ``kcat`` talk to the local broker.

Debian 12's kcat links librdkafka 2.0.2, which cannot read Tansu's ApiVersions reply;
:func:`kcat_env` points it at the newer librdkafka that confluent-kafka ships.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from metarec.local.processes import packaged_file

__all__ = ["kcat_env"]

#: librdkafka fixed its skipping of tagged fields (which Tansu's ApiVersions v3 reply has)
#: in 2.2.0 (confluentinc/librdkafka#4278).
_LIBRDKAFKA_TAGS_FIXED: Final = (2, 2, 0)


# --- foreign clients ---------------------------------------------------------------------


def _librdkafka_version(text: str) -> tuple[int, ...] | None:
    """The librdkafka version that ``kcat -V`` names.

    >>> _librdkafka_version("Version 1.7.1 (JSON, librdkafka 2.0.2 builtin.features=gzip)")
    (2, 0, 2)
    """
    found = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in found.groups()) if found else None


def kcat_env(shim_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment in which ``kcat`` can talk to Tansu.

    Why: Debian 12's ``kcat`` links librdkafka 2.0.2, which mis-skips the tagged fields of
    Tansu's ApiVersions reply ("Read underflow"), so it never connects. The
    ``confluent-kafka`` wheel bundles a current librdkafka with the same ABI; when the
    installed ``kcat`` reports one older than 2.2, a ``librdkafka.so.1`` link to the
    bundled one is placed in ``shim_dir`` and put first on ``LD_LIBRARY_PATH``.
    Apache Kafka brokers need none of this.

    Parameters
    ----------
    shim_dir
        A directory this function may write one symlink into.
    base
        Environment to extend; default ``os.environ``.

    Returns
    -------
    dict[str, str]
        The environment to run ``kcat`` with (unchanged when no shim is needed or possible).
    """
    env = dict(os.environ if base is None else base)
    kcat = shutil.which("kcat", path=env.get("PATH"))
    if kcat is None or platform.system() != "Linux":
        return env
    out = subprocess.run(  # noqa: S603 - fixed argv of a located binary
        [kcat, "-V"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    version = _librdkafka_version(out.stdout + out.stderr)
    if version is None or version >= _LIBRDKAFKA_TAGS_FIXED:
        return env
    libs = packaged_file("confluent_kafka", "__init__.py")
    if libs is None:
        return env
    bundled = sorted((libs.parent.parent / "confluent_kafka.libs").glob("librdkafka*.so*"))
    if not bundled:
        return env
    shim_dir.mkdir(parents=True, exist_ok=True)
    link = shim_dir / "librdkafka.so.1"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(bundled[0])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(shim_dir), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env
