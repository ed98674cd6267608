"""Named evaluation scenarios on synthetic streams: preference drift and cross-domain users.

Each scenario generates its own stream (with the change it studies at a known place),
runs metarec variants through the prequential harness of :mod:`metarec.evaluation`, and
returns a JSON-ready dict; ``metarec eval --scenario NAME`` prints and saves it.

* ``drift`` — every user's taste is redrawn at one moment. The live HR@10 (rolling over
  the stream) drops; the number reported is how many events it takes to climb back to 90%
  of its level before the change, with and without drift handling.
* ``cross-domain`` — some users move from one domain into another. The number reported is
  HR@10 over each mover's first 5 events in the new domain, for domain popularity, metarec
  without transfer (the mover is a fresh user in the new domain) and metarec with transfer
  (one user across domains, the per-domain mapping carries what they did before).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from metarec.baselines import RecentPopularity
from metarec.dataset import Dataset
from metarec.evaluation import EncodedStream, encode, prequential
from metarec.events import Event, UserRecord
from metarec.online import OnlineConfig, OnlineMetarec
from metarec.synthetic import SyntheticConfig, generate
from metarec.training import MetaTrainer

__all__ = ["SCENARIOS", "cross_domain", "drift", "recovery_events"]

#: Events per rolling window of the live hit rate in the drift scenario.
DRIFT_WINDOW = 300
RECOVERED = 0.9
NEW_DOMAIN_EVENTS = 5


def drift_config(small: bool = False) -> SyntheticConfig:
    base = SyntheticConfig.small() if small else SyntheticConfig(n_users=2000, n_items=2000)
    return dataclasses.replace(base, name="synthetic-drift", change_at=0.5,
                               change_fraction=1.0, cross_domain_fraction=0.0)


def cross_domain_config(small: bool = False) -> SyntheticConfig:
    base = SyntheticConfig.small() if small else SyntheticConfig(n_users=2000, n_items=2000)
    return dataclasses.replace(base, name="synthetic-cross-domain", change_at=None,
                               cross_domain_fraction=0.4)


def recovery_events(hits: npt.ArrayLike, change: int, window: int = DRIFT_WINDOW,
                    level: float = RECOVERED) -> tuple[float, int | None]:
    """The live hit rate before ``change`` and the events after it until it is back.

    The rate is a rolling mean over ``window`` events. Returns ``(before, n)``: ``n`` is
    the number of events after the change at which the rolling rate first reaches
    ``level·before`` again after having dropped below it (0 if it never dropped), or None
    if it never came back.

    >>> recovery_events([1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1], change=4, window=2)
    (1.0, 5)
    """
    h = np.asarray(hits, np.float64)
    before = float(h[max(0, change - window):change].mean())
    csum = np.r_[0.0, np.cumsum(h)]
    ends = np.arange(change + 1, len(h) + 1)
    rate = (csum[ends] - csum[np.maximum(ends - window, 0)]) / np.minimum(ends, window)
    below = np.flatnonzero(rate < level * before)
    if below.size == 0:
        return before, 0
    back = np.flatnonzero((rate >= level * before) & (np.arange(len(rate)) > below[0]))
    return before, None if back.size == 0 else int(back[0]) + 1


def _metarec(drift_handling: bool) -> Callable[[EncodedStream, int], OnlineMetarec]:
    def factory(stream: EncodedStream, seed: int) -> OnlineMetarec:
        config = dataclasses.replace(OnlineConfig.for_stream(stream.n_events),
                                     drift_handling=drift_handling)
        return OnlineMetarec(stream, MetaTrainer(), config, seed=seed)
    return factory


def drift(seeds: Sequence[int], *, small: bool = False,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Events to recover after an abrupt change, with and without drift handling."""
    out: dict[str, Any] = {"scenario": "drift", "window": DRIFT_WINDOW, "level": RECOVERED,
                           "runs": []}
    for seed in seeds:
        ds = generate(drift_config(small), seed)
        stream = encode(ds)
        change = int(np.searchsorted(stream.ts, int(str(ds.scenario["change_ts"]))))
        everyone = np.arange(stream.n_users)
        index = {u: i for i, u in enumerate(stream.user_ids)}
        changed = np.array([index[u] for u in cast(list[str], ds.scenario["changed_users"])])
        run: dict[str, Any] = {"seed": seed, "events": stream.n_events, "change_at": change}
        for name, handling in (("without", False), ("with", True)):
            if progress:
                progress(f"drift seed={seed} {name} drift handling")
            rec: list[OnlineMetarec] = []

            def factory(s: EncodedStream, sd: int, handling: bool = handling,
                        rec: list[OnlineMetarec] = rec) -> OnlineMetarec:
                rec.append(_metarec(handling)(s, sd))
                return rec[-1]

            records = prequential(stream, factory, seed=seed, evaluated_users=everyone)
            # The live hit stream of the users whose taste changed, in stream order: users
            # who arrive later never had the old taste, so they would only blur the drop.
            mine = np.isin(records.user, changed)
            order = np.argsort(records.event[mine], kind="stable")
            hits = records.hr[mine][order]
            at = int(np.searchsorted(records.event[mine][order], change))
            before, n = recovery_events(hits, at)
            learner = rec[-1]
            run[name] = {
                "hr_before": round(before, 4), "recovery_events": n,
                "hr_after_1000": round(float(hits[at:at + 1000].mean()), 4),
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
    events = [Event(f"{e.user}@{e.domain}", e.item, e.type, e.ts, e.domain, e.event_id)
              for e in ds.events]
    domains = sorted({e.domain for e in ds.events})
    users = [UserRecord(f"{u.user}@{g}", u.features, u.ts) for u in ds.users for g in domains]
    return dataclasses.replace(ds, name=ds.name + "-split", events=events, users=users)


def cross_domain(seeds: Sequence[int], *, small: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """HR@10 over movers' first events in their new domain, with and without transfer."""
    rows: dict[str, list[tuple[int, float]]] = {"domain_pop": [], "metarec_no_transfer": [],
                                                "metarec_transfer": []}
    for seed in seeds:
        ds = generate(cross_domain_config(small), seed)
        moves = cast(list[dict[str, Any]], ds.scenario["moves"])
        for name, data, factory in (
                ("domain_pop", ds, lambda s, sd: RecentPopularity(seed=sd)),
                ("metarec_transfer", ds, _metarec(False)),
                ("metarec_no_transfer", _split_by_domain(ds), _metarec(False))):
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
            rows[name].extend((user_of[int(u)] + 100_000 * seed, float(h)) for u, h in
                              zip(records.user[keep], records.hr[keep], strict=True))
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"scenario": "cross-domain", "events": NEW_DOMAIN_EVENTS,
                           "seeds": list(seeds), "methods": {}}
    for name, pairs in rows.items():
        users = np.array([u for u, _ in pairs])
        hits = np.array([h for _, h in pairs])
        uniq, inv = np.unique(users, return_inverse=True)
        per_user_hits = np.bincount(inv, hits, len(uniq))
        per_user_n = np.bincount(inv, None, len(uniq))
        boot = rng.integers(0, len(uniq), (1000, len(uniq)))
        rates = per_user_hits[boot].sum(1) / per_user_n[boot].sum(1)
        out["methods"][name] = {"hr10": round(float(hits.mean()), 4),
                                "hr10_ci": [round(float(np.percentile(rates, 2.5)), 4),
                                            round(float(np.percentile(rates, 97.5)), 4)],
                                "events": len(hits), "users": len(uniq)}
    return out


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {"drift": drift,
                                                        "cross-domain": cross_domain}
