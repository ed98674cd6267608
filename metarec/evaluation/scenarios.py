"""Named evaluation scenarios on synthetic streams: preference drift and cross-domain users.

Each scenario generates its own stream (with the change it studies at a known place),
runs metarec variants through the prequential harness of :mod:`metarec.evaluation.protocol`, and
returns a JSON-ready dict; ``metarec eval --scenario NAME`` prints and saves it.

* ``drift`` — at one moment the catalogue's items swap latent vectors and popularity
  within their domain (:class:`metarec.data.synthetic.SyntheticConfig` ``change_kind="catalog"``),
  so every user's preferences move at once and what the model learned no longer holds.
  The live HR@10 (rolling over the stream) drops; the number reported is how many events
  it takes to climb back to 90% of its level before the change, with and without drift
  handling. (A change that redraws single users' tastes barely moves the live rate: their
  next lists follow their recent history within a few events, so there is nothing to
  recover from.)
* ``cross-domain`` — some users move from one domain into another. The number reported is
  HR@10 over each mover's first 5 events in the new domain, for domain popularity, metarec
  without transfer (the mover is a fresh user in the new domain) and metarec with transfer
  (one user across domains, the per-domain mapping carries what they did before).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from metarec.core.events import Event, UserRecord
from metarec.data.dataset import Dataset
from metarec.data.synthetic import SyntheticConfig, generate
from metarec.evaluation.baselines import RecentPopularity
from metarec.evaluation.online import OnlineMetarec
from metarec.evaluation.protocol import EncodedStream, encode, prequential

__all__ = ["SCENARIOS", "cross_domain", "drift", "plot_png", "recovery_events", "rolling_curve"]

#: Events per rolling window of the live hit rate in the drift scenario.
DRIFT_WINDOW = 300
#: Events before the change whose mean hit rate is the level to recover to.
LEVEL_WINDOW = 2000
RECOVERED = 0.9
#: Events between two points of the drift scenario's live HR curve.
CURVE_EVERY = 100
NEW_DOMAIN_EVENTS = 5


def drift_config(small: bool = False) -> SyntheticConfig:
    # The change comes three quarters of the way through the time, about half-way through
    # the events (activity grows over time), once the model has settled.
    base = SyntheticConfig.small() if small else SyntheticConfig(n_users=3000, n_items=2000)
    return dataclasses.replace(
        base,
        name="synthetic-drift",
        change_at=0.75,
        change_kind="catalog",
        cross_domain_fraction=0.0,
    )


def cross_domain_config(small: bool = False) -> SyntheticConfig:
    base = SyntheticConfig.small() if small else SyntheticConfig(n_users=2000, n_items=2000)
    return dataclasses.replace(
        base, name="synthetic-cross-domain", change_at=None, cross_domain_fraction=0.4
    )


def recovery_events(
    hits: npt.ArrayLike,
    change: int,
    window: int = DRIFT_WINDOW,
    level: float = RECOVERED,
    level_window: int = LEVEL_WINDOW,
) -> tuple[float, int | None]:
    """The live hit rate before ``change`` and the events after it until it is back.

    ``before`` is the mean over the ``level_window`` events before the change; the rate
    after it is a rolling mean over ``window`` events. Returns ``(before, n)``: ``n`` is
    the number of events after the change at which the rolling rate first reaches
    ``level·before`` again after having dropped below it (0 if it never dropped), or None
    if it never came back.

    >>> recovery_events([1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1], change=4, window=2)
    (1.0, 5)
    """
    h = np.asarray(hits, np.float64)
    before = float(h[max(0, change - level_window) : change].mean())
    rate = _rolling(h, window)[change:]
    below = np.flatnonzero(rate < level * before)
    if below.size == 0:
        return before, 0
    back = np.flatnonzero((rate >= level * before) & (np.arange(len(rate)) > below[0]))
    return before, None if back.size == 0 else int(back[0]) + 1


def rolling_curve(
    hits: npt.ArrayLike, change: int, window: int = DRIFT_WINDOW, every: int = CURVE_EVERY
) -> list[tuple[int, float]]:
    """``(events after the change, rolling hit rate)`` every ``every`` events, for plots.

    >>> rolling_curve([0, 1, 1, 1], change=2, window=2, every=1)
    [(-1, 0.5), (0, 1.0), (1, 1.0)]
    """
    h = np.asarray(hits, np.float64)
    at = np.arange(window - 1, len(h), every)
    rate = _rolling(h, window)[at]
    return [(int(i) - change, round(float(r), 4)) for i, r in zip(at, rate, strict=True)]


def _rolling(h: npt.NDArray[np.float64], window: int) -> npt.NDArray[np.float64]:
    """The mean of the last ``window`` values (fewer at the start), at every position."""
    csum = np.r_[0.0, np.cumsum(h)]
    ends = np.arange(1, len(h) + 1)
    out: npt.NDArray[np.float64] = (csum[ends] - csum[np.maximum(ends - window, 0)]) / np.minimum(
        ends, window
    )
    return out


def plot_png(result: dict[str, Any], path: str | Path) -> None:
    """The scenario's picture: the drift runs' live HR@10 around the change, or the
    cross-domain methods' HR@10 with their intervals."""
    from matplotlib.figure import Figure  # deferred: matplotlib is slow to import

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    ax = fig.subplots()
    if result["scenario"] == "drift":
        for run in result["runs"]:
            for name, style in (("without", "--"), ("with", "-")):
                x, y = zip(*run[name]["curve"], strict=True)
                ax.plot(x, y, style, lw=1.2, label=f"seed {run['seed']}, {name} drift handling")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("events after the change")
        ax.set_ylabel(f"live HR@10 (rolling {result['window']} events)")
        ax.set_title("Abrupt change: live HR@10 with and without drift handling")
        ax.legend(fontsize=7)
    else:
        names = list(result["methods"])
        hr = np.array([result["methods"][n]["hr10"] for n in names])
        ci = np.array([result["methods"][n]["hr10_ci"] for n in names])
        ax.bar(names, hr, yerr=[hr - ci[:, 0], ci[:, 1] - hr], capsize=6)
        ax.set_ylabel(f"HR@10 over the first {result['events']} events in the new domain")
        ax.set_title("Users moving to a new domain (95% bootstrap intervals over movers)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), format="png")


def _metarec(handle_drift: bool = True) -> Callable[[EncodedStream, int], OnlineMetarec]:
    def factory(stream: EncodedStream, seed: int) -> OnlineMetarec:
        return OnlineMetarec(stream, seed=seed, handle_drift=handle_drift)

    return factory


def drift(
    seeds: Sequence[int], *, small: bool = False, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Events to recover after an abrupt change, with and without drift handling."""
    out: dict[str, Any] = {
        "scenario": "drift",
        "window": DRIFT_WINDOW,
        "level": RECOVERED,
        "runs": [],
    }
    for seed in seeds:
        ds = generate(drift_config(small), seed)
        stream = encode(ds)
        change = int(np.searchsorted(stream.ts, int(str(ds.scenario["change_ts"]))))
        everyone = np.arange(stream.n_users)
        run: dict[str, Any] = {"seed": seed, "events": stream.n_events, "change_at": change}
        for name, handling in (("without", False), ("with", True)):
            if progress:
                progress(f"drift seed={seed} {name} drift handling")
            rec: list[OnlineMetarec] = []

            def factory(
                s: EncodedStream, sd: int, handling: bool = handling, rec: list[OnlineMetarec] = rec
            ) -> OnlineMetarec:
                rec.append(_metarec(handling)(s, sd))
                return rec[-1]

            records = prequential(stream, factory, seed=seed, evaluated_users=everyone)
            # The change reaches every user, so the whole live hit stream, in stream order.
            order = np.argsort(records.event, kind="stable")
            hits = records.hr[order]
            at = int(np.searchsorted(records.event[order], change))
            before, n = recovery_events(hits, at)
            learner = rec[-1]
            run[name] = {
                "hr_before": round(before, 4),
                "recovery_events": n,
                "curve": rolling_curve(hits, at),
                "hr_after_1000": round(float(hits[at : at + 1000].mean()), 4),
                "trainings": [(t["at_event"], t["reason"]) for t in learner.trainings],
                "user_drifts": learner.user_drifts,
            }
        out["runs"].append(run)
    done = [(r["without"]["recovery_events"], r["with"]["recovery_events"]) for r in out["runs"]]
    speedups = [a / b for a, b in done if a and b]
    out["speedup_mean"] = round(float(np.mean(speedups)), 2) if speedups else None
    return out


def _split_by_domain(ds: Dataset) -> Dataset:
    """The same stream with each user split into one user per domain (no transfer)."""
    events = [
        Event(f"{e.user}@{e.domain}", e.item, e.type, e.ts, e.domain, e.event_id) for e in ds.events
    ]
    domains = sorted({e.domain for e in ds.events})
    users = [UserRecord(f"{u.user}@{g}", u.features, u.ts) for u in ds.users for g in domains]
    return dataclasses.replace(ds, name=ds.name + "-split", events=events, users=users)


def cross_domain(
    seeds: Sequence[int], *, small: bool = False, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """HR@10 over movers' first events in their new domain, with and without transfer."""
    rows: dict[str, list[tuple[int, float]]] = {
        "domain_pop": [],
        "metarec_no_transfer": [],
        "metarec_transfer": [],
    }
    for seed in seeds:
        ds = generate(cross_domain_config(small), seed)
        moves = cast(list[dict[str, Any]], ds.scenario["moves"])
        for name, data, factory in (
            ("domain_pop", ds, lambda s, sd: RecentPopularity(seed=sd)),
            ("metarec_transfer", ds, _metarec()),
            ("metarec_no_transfer", _split_by_domain(ds), _metarec()),
        ):
            if progress:
                progress(f"cross-domain seed={seed} {name}")
            stream = encode(data)
            keyed = {m["user"]: m for m in moves}
            split = name == "metarec_no_transfer"
            targets: set[int] = set()
            movers = []
            for uid, m in keyed.items():
                key = f"{uid}@{m['to']}" if split else uid
                u = stream.user_ids.index(key)
                movers.append(u)
                idx = np.flatnonzero((stream.users == u) & (stream.ts >= m["ts"]))
                targets.update(idx[:NEW_DOMAIN_EVENTS].tolist())
            records = prequential(stream, factory, seed=seed, evaluated_users=movers)
            keep = np.isin(records.event, sorted(targets))
            user_of = {u: i for i, u in enumerate(movers)}
            rows[name].extend(
                (user_of[int(u)] + 100_000 * seed, float(h))
                for u, h in zip(records.user[keep], records.hr[keep], strict=True)
            )
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {
        "scenario": "cross-domain",
        "events": NEW_DOMAIN_EVENTS,
        "seeds": list(seeds),
        "methods": {},
    }
    for name, pairs in rows.items():
        users = np.array([u for u, _ in pairs])
        hits = np.array([h for _, h in pairs])
        uniq, inv = np.unique(users, return_inverse=True)
        per_user_hits = np.bincount(inv, hits, len(uniq))
        per_user_n = np.bincount(inv, None, len(uniq))
        boot = rng.integers(0, len(uniq), (1000, len(uniq)))
        rates = per_user_hits[boot].sum(1) / per_user_n[boot].sum(1)
        out["methods"][name] = {
            "hr10": round(float(hits.mean()), 4),
            "hr10_ci": [
                round(float(np.percentile(rates, 2.5)), 4),
                round(float(np.percentile(rates, 97.5)), 4),
            ],
            "events": len(hits),
            "users": len(uniq),
        }
    return out


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {"drift": drift, "cross-domain": cross_domain}
