"""Feeding an encoded stream to an in-process learner, shared by the learner tests."""

from __future__ import annotations

from metarec.evaluation.online import OnlineMetarec
from metarec.evaluation.protocol import EncodedStream
from metarec.evaluation.recommender import Interaction


def feed(rec: OnlineMetarec, stream: EncodedStream, lo: int, hi: int) -> None:
    """``learn_one`` the events ``lo .. hi-1`` of ``stream``, in order."""
    for t in range(lo, hi):
        rec.learn_one(
            Interaction(
                int(stream.users[t]),
                int(stream.items[t]),
                int(stream.ts[t]),
                int(stream.domains[t]),
                float(stream.weights[t]),
            )
        )
