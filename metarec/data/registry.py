"""One name for every dataset metarec can replay or evaluate on.

The CLI, the replay tool and the benchmarks take a dataset as a single string, so the
mapping from that string to a loader lives here, once.

>>> load_dataset("synthetic-small", seed=1).name
'synthetic-small'
"""

from __future__ import annotations

from pathlib import Path

from metarec.data.dataset import Dataset
from metarec.data.event_log import load_event_log
from metarec.data.movielens import load_movielens
from metarec.data.synthetic import SyntheticConfig, generate
from metarec.errors import DataError

__all__ = ["SYNTHETIC_SPECS", "load_dataset"]

#: Names of the built-in synthetic streams and the configuration each one uses.
SYNTHETIC_SPECS: dict[str, SyntheticConfig] = {
    "synthetic": SyntheticConfig(),
    "synthetic-small": SyntheticConfig.small(),
    # The big-catalogue check: candidate scoring against exact scoring (docs/RESULTS.md).
    "synthetic-100k-items": SyntheticConfig(
        name="synthetic-100k-items", n_users=10_000, n_items=100_000
    ),
}


def load_dataset(
    spec: str,
    *,
    seed: int = 0,
    limit: int | None = None,
    items: str | Path | None = None,
    users: str | Path | None = None,
) -> Dataset:
    """Load a dataset by name or path.

    Parameters
    ----------
    spec
        ``"synthetic"`` (the default :class:`~metarec.data.synthetic.SyntheticConfig`, ~35k
        events), ``"synthetic-small"`` (~4k events), the path of a MovieLens folder
        (``u.data`` of ml-100k, or ``ratings.csv`` of ml-latest-small/ml-25m/ml-32m), or
        the path of an event log file in the project's own formats (JSON lines as
        published to ``metarec.events``, or CSV; :mod:`metarec.data.event_log`).
    seed
        Seed of a synthetic stream; MovieLens ignores it.
    limit
        At most this many MovieLens ratings (see :func:`~metarec.data.movielens.load_movielens`);
        a synthetic stream is sized by its configuration instead and ignores it.
    items, users
        With an event log file: files of item and user records (JSON lines).

    Examples
    --------
    >>> ds = load_dataset("synthetic-small", seed=3)
    >>> ds.scenario["seed"], len(ds.events) > 3000
    (3, True)
    """
    config = SYNTHETIC_SPECS.get(spec)
    path = Path(spec).expanduser()
    is_log = bool(spec.strip()) and path.is_file()
    if (items is not None or users is not None) and not is_log:
        raise DataError("item and user record files go with an event log file only")
    if config is not None:
        return generate(config, seed)
    if is_log:
        return load_event_log(path, items=items, users=users)
    if spec.strip() and path.is_dir():  # Path("") is the working directory: not a choice
        return load_movielens(path, limit=limit)
    names = ", ".join(repr(name) for name in SYNTHETIC_SPECS)
    raise DataError(
        f"unknown dataset {spec!r}: expected one of {names}, the path of a MovieLens "
        f"folder (holding u.data or ratings.csv) or of an event log file (JSON lines or "
        f"CSV), and nothing exists at {str(path)!r}"
    )
