"""Importing TensorFlow without breaking one-JSON-object-per-line logs.

Why: TensorFlow's C++ side writes to file descriptor 2 directly, beneath Python's
logging. ``TF_CPP_MIN_LOG_LEVEL`` silences most of it, but not all: TensorFlow 2.21 still
prints absl's "All log messages before absl::InitializeLog() ..." and oneDNN's notice while
its libraries load, whatever the level. :func:`import_tensorflow` imports it with fd 2
pointed at a temporary file, then re-emits what was caught: lines that are already JSON
(another thread's log records) unchanged, the rest as DEBUG records of this logger.

>>> import sys
>>> tf = import_tensorflow()
>>> tf is sys.modules["tensorflow"]
True
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
from types import ModuleType

from metarec.errors import ConfigError
from metarec.logs import TF_CPP_MIN_LOG_LEVEL

__all__ = ["import_tensorflow", "require_tensorflow"]

log = logging.getLogger(__name__)


def require_tensorflow() -> None:
    """Refuse to start a process that will train when TensorFlow is not installed: the
    consumer's install leaves it out, and the aggregator would otherwise fail only at its
    first cycle, minutes or hours later."""
    if importlib.util.find_spec("tensorflow") is None:
        raise ConfigError(
            "TensorFlow is not installed: meta-training (the aggregator, and "
            "metarec eval of metarec) needs the `train` extra: "
            "pip install 'metarec[train]'"
        )


def import_tensorflow() -> ModuleType:
    """The ``tensorflow`` module, its start-up lines turned into log records."""
    loaded = sys.modules.get("tensorflow")
    if loaded is not None:
        return loaded
    require_tensorflow()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_CPP_MIN_LOG_LEVEL)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode("utf-8", errors="replace")
    _reemit(text)
    module: ModuleType = tensorflow
    return module


def _reemit(text: str) -> None:
    for line in text.splitlines():
        if not line.strip():
            continue
        if _is_json_object(line):
            sys.stderr.write(line + "\n")
        else:
            log.debug("tensorflow start-up output", extra={"line": line})
    sys.stderr.flush()


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
