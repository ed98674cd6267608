"""The outage policy: which Redis errors are waited out and which stop the process."""

from __future__ import annotations

import itertools
import logging

import pytest
import redis

from metarec.services.outage import Outage


def test_cluster_errors_are_outages_to_ride_out_and_a_refusal_is_not() -> None:
    errors = [
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.ClusterError("TTL exhausted."),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.SlotNotCoveredError('Slot "7" is not covered by the cluster.'),
        redis.exceptions.MasterDownError("MASTERDOWN"),
        redis.ConnectionError("Connection refused"),
    ]
    raised = iter(errors)

    def flaky() -> str:
        err = next(raised, None)
        if err is not None:
            raise err
        return "ok"

    ticks = itertools.count()
    outage = Outage(
        "redis",
        give_up_s=60,
        log=logging.getLogger("test"),
        sleep=lambda s: None,
        clock=lambda: next(ticks) / 100,
    )  # each look at the clock: 10 ms later
    assert outage.call(flaky) == "ok"
    assert outage.retried == len(errors) and outage.outages == 1

    def refused() -> None:
        raise redis.exceptions.NoPermissionError("NOPERM this user has no permissions")

    with pytest.raises(redis.exceptions.NoPermissionError):
        outage.call(refused)
