"""Importing TensorFlow: refused in one line where it is not installed."""

from __future__ import annotations

import importlib.util

import pytest

from metarec.errors import ConfigError
from metarec.training.tensorflow_import import require_tensorflow


def test_a_missing_tensorflow_is_one_config_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorflow" else real(name, *a),
    )
    with pytest.raises(ConfigError, match=r"metarec\[train\]"):
        require_tensorflow()
