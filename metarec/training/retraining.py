"""When the meta-model is retrained, and what one retraining does.

Both the aggregator (with Kafka and Redis around it) and ``metarec eval`` (in memory) run
these two objects, with the same defaults:

* :class:`RetrainSchedule` says when a cycle is due: the first model as soon as the window
  holds ``min_events`` events, then every ``every_events`` new events. A request from a
  consumer that saw the live hit rate drop (a drift) is served once ``min_events`` events
  have come in since the last cycle and since the change, so the new regime has something
  to teach; an operator's request is served at once.
* :class:`Retrainer` runs a cycle: meta-train on the window (only the events since the
  training floor, when a change has been dated), warm-started from the current model, or
  from scratch when the floor is new (unlearning a regime that is gone takes longer than
  learning the new one). Under a floor every cycle trains a model of the whole window too,
  and the floor holds only while the new regime's model predicts it better. Then fold the
  users' adapted offsets into ``θ0`` (Reptile, the seed's average,
  :func:`metarec.core.reptile.reptile_update`). The fold comes after
  training, so a training that fails loses no partial sums; after a fresh start they
  describe users adapted to the old regime and are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from metarec.config import DEFAULT_MIN_EVENTS_FOR_MODEL, DEFAULT_RETRAIN_EVENTS, Settings
from metarec.core.model import MetaModel
from metarec.core.reptile import PartialSums, reptile_update
from metarec.core.window import EventWindow, TrainingData
from metarec.training.trainer import MetaTrainer

__all__ = ["REPTILE_EPSILON", "RetrainSchedule", "Retrainer"]

log = logging.getLogger(__name__)

#: Reptile step: 1.0 is the seed's plain average of the adapted users.
REPTILE_EPSILON = 1.0


def _described(model: MetaModel, data: TrainingData) -> MetaModel:
    model.info.update({"users": len(data.user_ids), "items": len(data.item_ids)})
    return model


@dataclass(frozen=True)
class RetrainSchedule:
    """When a cycle is due (see the module docstring).

    >>> s = RetrainSchedule(min_events=100, every_events=1000)
    >>> s.due(has_model=False, window_events=99, new_events=99)
    >>> s.due(has_model=False, window_events=100, new_events=100)
    'first model'
    >>> s.due(has_model=True, window_events=5000, new_events=150, request="drift",
    ...       events_since_floor=80)
    >>> s.due(has_model=True, window_events=5000, new_events=1000)
    'schedule'
    """

    min_events: int = DEFAULT_MIN_EVENTS_FOR_MODEL
    every_events: int = DEFAULT_RETRAIN_EVENTS

    @classmethod
    def from_settings(cls, settings: Settings) -> RetrainSchedule:
        return cls(settings.min_events_for_model, settings.retrain_events)

    def due(
        self,
        *,
        has_model: bool,
        window_events: int,
        new_events: int,
        request: str | None = None,
        events_since_floor: int | None = None,
        immediate: bool = False,
    ) -> str | None:
        """The reason a cycle is due now, or None.

        ``new_events`` counts events since the last cycle, ``events_since_floor`` those
        since the dated change (None: no change dated); ``immediate`` serves ``request``
        without waiting for new events (an operator's request).
        """
        need = max(self.min_events, 1)
        if window_events < need:
            return None
        if not has_model:
            return "first model"
        if request is not None:
            # A drift request waits for the new regime, and the schedule waits with it:
            # training now would start from scratch on a handful of events.
            ready = new_events >= need and (
                events_since_floor is None or events_since_floor >= need
            )
            return request if immediate or ready else None
        return "schedule" if new_events >= self.every_events else None

    def waiting_for(
        self, *, window_events: int, new_events: int, events_since_floor: int | None = None
    ) -> str:
        """Why a requested cycle is not due yet (:meth:`due` said None), for the log.

        >>> RetrainSchedule(every_events=100, min_events=50).waiting_for(
        ...     window_events=20, new_events=20)
        'the window holds 20 events; a model needs 50 (METAREC_MIN_EVENTS_FOR_MODEL)'
        """
        need = max(self.min_events, 1)
        if window_events < need:
            return (
                f"the window holds {window_events} events; a model needs {need} "
                "(METAREC_MIN_EVENTS_FOR_MODEL)"
            )
        if events_since_floor is not None and events_since_floor < need:
            return f"{events_since_floor} events of the new regime since the change; needs {need}"
        return f"{new_events} events since the last cycle; needs {need}"


@dataclass
class Retrainer:
    """One retraining cycle: meta-train on the window, then fold in the users (Reptile).

    Parameters
    ----------
    trainer
        The meta-trainer (TensorFlow).
    epsilon
        The Reptile step.
    """

    trainer: MetaTrainer = field(default_factory=MetaTrainer)
    epsilon: float = REPTILE_EPSILON

    @staticmethod
    def trainer_for(settings: Settings, *, meta: bool = True) -> MetaTrainer:
        """The meta-trainer the aggregator runs under ``settings``."""
        return MetaTrainer(
            history_length=settings.history_length,
            seed=settings.seed,
            meta=meta,
            retrain_events=settings.retrain_events,
            top_k=settings.top_k,
        )

    def train(
        self, window: EventWindow, current: MetaModel | None, *, floor: int | None, version: int
    ) -> MetaModel | None:
        """A new model trained on ``window`` (since ``floor``), or None if too few events.

        The model's ``info`` records ``floor_ts`` and whether it was a ``fresh_start``.
        """
        data = window.training_data(since_ts=floor)
        if len(data) < 2:
            log.info("too few events to train", extra={"events": len(data), "floor_ts": floor})
            return None
        if current is None or floor is None:
            model = self.trainer.fit(data, init=current, version=version)
            model.info.update({"floor_ts": floor, "fresh_start": False})
            return _described(model, data)
        # Under a floor, every cycle judges two models on the same held-out events of the
        # new regime. One is what an ordinary cycle would serve (the whole window,
        # warm-started from the current model, each user's whole history read); the other
        # knows the new regime alone (from scratch when the floor is new) and is kept only
        # if it predicts those events better, scored over the same items (the items of
        # the period: a softmax over the smaller catalog of a shorter window is lower
        # for that alone). Judging it against the current model instead would credit it
        # with having seen the newest events, which the current one has not: on any
        # stream whose tastes move a little, a model of the last few thousand events
        # wins that comparison, and serving it forgets what the rest of the window taught
        # (long histories lose most). Judging again at every cycle ends a floor once the
        # window as a whole predicts the new events better, as a regime that was only a
        # burst fades into the rest.
        fresh = current.info.get("floor_ts") != floor
        whole = window.training_data()
        ordinary = self.trainer.fit(whole, init=current, version=version, judge_since=floor)
        model = self.trainer.fit(
            data, init=None if fresh else current, version=version, judge_since=floor
        )
        judged = ordinary.info.get("judged_loss")
        candidate = model.info.get("judged_loss")
        verdict = {
            "candidate_loss": candidate,
            "whole_window_loss": judged,
            "candidate_hr": model.info.get("judged_hr"),
            "whole_window_hr": ordinary.info.get("judged_hr"),
        }
        if judged is None or candidate is None:
            # Too few held-out events since the floor to judge by: nothing says the window
            # misleads, so it keeps serving, and the next cycle, with more events of the
            # period, judges again (the floor stays; the new-regime model starts afresh).
            outcome: dict[str, object] = {"drift": "undecided"}
            said = "drift undecided: too few held-out events since the change to judge by"
        elif not candidate < judged:
            outcome = {"drift": "refuted", "refuted_floor": floor}
            said = "drift refuted: a model of the whole window predicts the new events better"
        else:
            outcome = {}
        if outcome:
            log.info(said, extra={"floor_ts": floor, **verdict})
            ordinary.info.update({"floor_ts": None, "fresh_start": False, **outcome, **verdict})
            return _described(ordinary, whole)
        log.info(
            "drift confirmed: a model of the new regime alone predicts it better",
            extra={"floor_ts": floor, **verdict},
        )
        model.info.update(
            {"floor_ts": floor, "fresh_start": fresh, "drift": "confirmed", **verdict}
        )
        return _described(model, data)

    def fold(
        self, model: MetaModel, current: MetaModel | None, partials: Sequence[PartialSums]
    ) -> tuple[MetaModel, float]:
        """``model`` with the Reptile step of ``partials`` added to its ``θ0`` rows, and the
        weight folded (0 when nothing was: no meta-learning, a fresh start, no users).

        The partial sums were accumulated against ``current``'s domain rows; domains are
        matched by name, since a new version may order them differently.
        """
        if (
            current is None
            or not (current.meta and model.meta)
            or not partials
            or model.info.get("fresh_start")
        ):
            return model, 0.0
        step = reptile_update(current.theta0, partials, self.epsilon) - current.theta0
        theta0 = model.theta0.copy()
        for row, name in enumerate(current.domains):
            if name in model.domains and row < len(step):
                theta0[model.domains.index(name)] += step[row]
        folded = sum(float(p.weights.sum()) for p in partials)
        return replace(model, theta0=theta0), folded
