"""Training anomalies: detectors as pure logic over series, and a loop hook that acts on them.

Detectors (each fed one value at a time; ``check`` returns an :class:`AnomalyEvent` or None):

- :class:`NonFiniteLoss`: the loss is NaN or inf.
- :class:`LossSpike`: the recent level of the log-loss (median of ``persist`` steps) rises more than
  ``zscore`` robust sigmas over a slow baseline (median and MAD of the ``window`` steps before) and
  more than ``min_increase`` in loss units; dated at the step the rise began.
- :class:`ExplodingGradient`: the global gradient norm is above ``max_norm``, or not finite.

The ``detect_*`` functions run a detector over a whole series (steps 1..n), for tests and for
offline analysis of a logged history.

:class:`AnomalyMonitor` is a :class:`ml.train.loop.Callback` built from :class:`ml.config.AnomalyConfig`:
it runs the detectors over every step's loss and gradient norm as the loop logs them, keeps
every event, tags the run (``anomaly.<kind>`` = first step, ``anomalies`` = count), warns on the
console at most once per kind per epoch, sets ``state.stop`` when ``action == "stop"``, raises
:class:`ml.train.rollback.LossSpikeRollback` on a loss spike when ``action == "rollback"`` (the
train stage rolls back to the newest training checkpoint before the spike began), and at
:meth:`AnomalyMonitor.close` logs all events as the JSON-lines artifact ``events/anomalies.jsonl``.

A metric that stops improving is not an anomaly here: that is early stopping's business
(:class:`ml.train.callbacks.EarlyStopping`, ``train.early_stopping_patience``), which ends training
whatever ``anomaly.action`` says.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ml.train.loop import Callback
from ml.train.rollback import LossSpikeRollback

if TYPE_CHECKING:
    from ml.config import AnomalyConfig
    from ml.train.loop import LoopState, StepValues
    from ml.tracking.base import Tracker

_logger = logging.getLogger(__name__)

NONFINITE_LOSS = "nonfinite_loss"
LOSS_SPIKE = "loss_spike"
EXPLODING_GRADIENT = "exploding_gradient"
KINDS = (NONFINITE_LOSS, LOSS_SPIKE, EXPLODING_GRADIENT)

EVENTS_ARTIFACT = "events/anomalies.jsonl"
# Scale of the MAD that makes it estimate the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
# Losses are compared in log space; a loss of exactly 0 counts as this.
_TINY_LOSS = 1e-12


@dataclass(frozen=True)
class AnomalyEvent:
    """One anomaly. ``epoch`` is 1-based, as in ``LoopState.history``: the epoch the step belongs
    to. ``value`` and ``threshold`` depend on the kind: the loss and NaN/inf, z-score and the
    z-score limit, or the gradient norm and ``max_norm``."""

    kind: str
    step: int
    epoch: int
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


class NonFiniteLoss:
    """Flags a NaN or infinite loss."""

    kind = NONFINITE_LOSS

    def check(self, loss: float, step: int, epoch: int = 0) -> AnomalyEvent | None:
        if math.isfinite(loss):
            return None
        return AnomalyEvent(self.kind, step, epoch, loss, math.nan, f"loss is {loss} at step {step}")


class LossSpike:
    """Flags a sustained rise of the loss over its slow baseline, at the step the rise began.

    Everything is in log space, where a loss near convergence (a mean over a batch, moved a lot by
    one hard example) and a loss early in training vary alike in relative terms:

    - the baseline is the median of the log-losses of the ``window`` steps before the recent ones,
      and its spread ``sigma = 1.4826 * MAD`` of those log-losses (never below ``min_sigma``);
    - the recent level is the median of the last ``persist`` log-losses, so one hard batch (or
      ``persist // 2`` of them) never moves it: a rise must persist to count;
    - the level is a spike when it is more than ``zscore`` sigmas above the baseline AND the loss
      it stands for is more than ``min_increase`` (in loss units) above the baseline's, so a
      converged run whose losses wobble between 0.001 and 0.01 is not flagged for it.

    The event is dated at the first of the recent steps above the threshold, and reported when the
    level confirms it (``persist // 2`` steps later). One event per excursion: the detector rearms
    when the level is back at the baseline. Losses join the baseline only once they leave the
    recent window, so a lasting level shift is flagged once, then absorbed. Quiet until ``window +
    persist`` finite losses have been seen; non-finite losses are skipped (:class:`NonFiniteLoss`
    reports them).
    """

    kind = LOSS_SPIKE

    def __init__(self, window: int, zscore: float, persist: int = 3, min_increase: float = 0.0,
                 min_sigma: float = 0.05) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected an integer >= 1, got {window!r}")
        if not zscore > 0:
            raise ValueError(f"zscore: expected a number > 0, got {zscore!r}")
        if not isinstance(persist, int) or persist < 1:
            raise ValueError(f"persist: expected an integer >= 1, got {persist!r}")
        if not min_increase >= 0:
            raise ValueError(f"min_increase: expected a number >= 0, got {min_increase!r}")
        self.window, self.zscore, self.persist = window, zscore, persist
        self.min_increase, self.min_sigma = min_increase, min_sigma
        self._baseline: deque[float] = deque(maxlen=window)
        self._recent: deque[tuple[int, float]] = deque(maxlen=persist)
        self._armed = True

    def check(self, loss: float, step: int, epoch: int = 0) -> AnomalyEvent | None:
        if not math.isfinite(loss):
            return None
        if len(self._recent) == self.persist:
            self._baseline.append(self._recent[0][1])
        self._recent.append((step, math.log(max(loss, _TINY_LOSS))))
        if len(self._baseline) < self.window or len(self._recent) < self.persist:
            return None
        base = statistics.median(self._baseline)
        sigma = max(MAD_TO_SIGMA * statistics.median(abs(v - base) for v in self._baseline), self.min_sigma)
        level = statistics.median(v for _, v in self._recent)
        z = (level - base) / sigma
        high = z > self.zscore and math.exp(level) - math.exp(base) > self.min_increase
        if not high:
            # Rearmed only once the level is back at the baseline: a level that hovers around
            # the limit while the baseline absorbs it is one excursion, not many.
            self._armed = self._armed or z <= 0
            return None
        if not self._armed:
            return None
        self._armed = False
        limit = base + self.zscore * sigma
        start = next(s for s, v in self._recent if v > limit)
        return AnomalyEvent(self.kind, start, epoch, z, self.zscore,
                            f"loss rose to {math.exp(level):.6g} from step {start} on ({z:.1f} sigma of log-loss, "
                            f"limit {self.zscore:g}) over the median {math.exp(base):.6g} of the {self.window} "
                            f"steps before")

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": list(self._baseline), "recent": [list(r) for r in self._recent], "armed": self._armed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._baseline = deque(state["baseline"], maxlen=self.window)
        self._recent = deque(((int(s), float(v)) for s, v in state["recent"]), maxlen=self.persist)
        self._armed = bool(state["armed"])


class ExplodingGradient:
    """Flags a global gradient norm above ``max_norm`` (None: no limit), or one that is NaN/inf."""

    kind = EXPLODING_GRADIENT

    def __init__(self, max_norm: float | None) -> None:
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm: expected a number > 0 or None, got {max_norm!r}")
        self.max_norm = max_norm

    def check(self, norm: float, step: int, epoch: int = 0) -> AnomalyEvent | None:
        limit = math.inf if self.max_norm is None else self.max_norm
        if math.isfinite(norm) and norm <= limit:
            return None
        return AnomalyEvent(self.kind, step, epoch, norm, limit,
                            f"gradient norm {norm:.6g} at step {step} exceeds {limit:g}" if math.isfinite(norm)
                            else f"gradient norm is {norm} at step {step}")


def _scan(detector: Any, values: Iterable[float]) -> list[AnomalyEvent]:
    events = (detector.check(float(v), step) for step, v in enumerate(values, start=1))
    return [e for e in events if e is not None]


def detect_nonfinite_losses(losses: Iterable[float]) -> list[AnomalyEvent]:
    """Events for the NaN/inf entries of ``losses`` (steps numbered from 1)."""
    return _scan(NonFiniteLoss(), losses)


def detect_loss_spikes(losses: Iterable[float], window: int, zscore: float, persist: int = 3,
                       min_increase: float = 0.0) -> list[AnomalyEvent]:
    """Events for the spikes of ``losses`` (steps numbered from 1); see :class:`LossSpike`."""
    return _scan(LossSpike(window, zscore, persist, min_increase), losses)


def detect_exploding_gradients(norms: Iterable[float], max_norm: float | None) -> list[AnomalyEvent]:
    """Events for the gradient norms above ``max_norm`` or not finite (steps numbered from 1)."""
    return _scan(ExplodingGradient(max_norm), norms)


class AnomalyMonitor(Callback):
    """A :class:`ml.train.loop.Callback` that watches every step's loss and gradient norm.

    Args:
        cfg: What counts as an anomaly and what to do (``action``: ``"warn"``, ``"stop"`` or
            ``"rollback"``).
        tracker: Receives the tags as events happen and the events artifact at :meth:`close`.
        logger: Where console warnings go.

    It reads the steps' values as the loop logs them (:meth:`ml.train.loop.Callback.on_log`), so it
    never makes the device wait for a number of its own. Tags: ``anomaly.<kind>`` is set to the
    first step of that kind when it happens; ``anomalies`` (the event count) is set with it,
    refreshed at each epoch end when it changed, and at close (``0`` when nothing happened). With
    ``action == "stop"`` the first event sets ``state.stop`` and ``state.stop_reason``, and the tag
    ``anomaly.stopped`` names it. Its detector window and events are its ``state_dict()``, saved in
    training checkpoints, so a resumed run flags (and stops at) the same steps as a straight one.
    """

    state_key = "anomaly"

    def __init__(self, cfg: AnomalyConfig, tracker: Tracker | None = None, *,
                 logger: logging.Logger | None = None) -> None:
        if cfg.action not in ("warn", "stop", "rollback"):
            raise ValueError(f"action: expected one of warn, stop, rollback, got {cfg.action!r}")
        self.cfg = cfg
        self.tracker = tracker
        self.logger = logger or _logger
        self.events: list[AnomalyEvent] = []
        self.first_step: dict[str, int] = {}
        self.stopped_by: AnomalyEvent | None = None
        self._nonfinite = NonFiniteLoss()
        self._spike = LossSpike(cfg.loss_spike_window, cfg.loss_spike_zscore, cfg.loss_spike_persist,
                                cfg.loss_spike_min_increase)
        self._gradient = ExplodingGradient(cfg.max_grad_norm)
        self._warned: set[tuple[str, int]] = set()
        self._suppressed: dict[str, int] = {}
        self._count_tagged = 0
        self._closed = False

    # --- Callback ----------------------------------------------------------------------------------

    def on_log(self, state: LoopState, values: Sequence[StepValues]) -> None:
        for v in values:
            event = self._nonfinite.check(v.loss, v.step, v.epoch) or self._spike.check(v.loss, v.step, v.epoch)
            if event is not None:
                self._record(event, state)
            event = self._gradient.check(v.grad_norm, v.step, v.epoch)
            if event is not None:
                self._record(event, state)

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        self._tag_count()

    # --- events ------------------------------------------------------------------------------------

    def _record(self, event: AnomalyEvent, state: LoopState) -> None:
        self.events.append(event)
        if event.kind not in self.first_step:
            self.first_step[event.kind] = event.step
            self._set_tags({f"anomaly.{event.kind}": event.step, "anomalies": len(self.events)})
            self._count_tagged = len(self.events)
        self._warn(event)
        if self.cfg.action == "rollback" and event.kind == LOSS_SPIKE:
            raise LossSpikeRollback(event.step, event.message)
        if self.cfg.action == "stop" and self.stopped_by is None:
            self.stopped_by = event
            state.stop = True
            state.stop_reason = f"anomaly {event.kind}: {event.message}"
            self._set_tags({"anomaly.stopped": f"{event.kind} at step {event.step}"})
            self.logger.warning("stopping training (anomaly.action=stop): %s", event.message)
        elif self.cfg.action == "stop":
            state.stop = True

    def _warn(self, event: AnomalyEvent) -> None:
        key = (event.kind, event.epoch)
        if key in self._warned:
            self._suppressed[event.kind] = self._suppressed.get(event.kind, 0) + 1
            return
        self._warned.add(key)
        earlier = self._suppressed.pop(event.kind, 0)
        note = f" ({earlier} more {event.kind} events were not shown)" if earlier else ""
        self.logger.warning("anomaly %s: %s%s", event.kind, event.message, note)

    def _tag_count(self) -> None:
        if len(self.events) != self._count_tagged:
            self._set_tags({"anomalies": len(self.events)})
            self._count_tagged = len(self.events)

    def _set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.set_tags(tags)

    def events_jsonl(self) -> str:
        """All events, one JSON object a line, in the order they happened."""
        return "".join(json.dumps(e.to_dict()) + "\n" for e in self.events)

    def close(self) -> None:
        """Tags the final count and logs :data:`EVENTS_ARTIFACT` (empty when nothing happened). Idempotent."""
        if self._closed:
            return
        self._closed = True
        suppressed = sum(self._suppressed.values())
        if suppressed:
            self.logger.warning("%d further anomaly events were recorded but not shown", suppressed)
        if self.tracker is not None:
            self.tracker.set_tags({"anomalies": len(self.events)})
            self.tracker.log_text(self.events_jsonl(), EVENTS_ARTIFACT)

    # --- resume ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loss-spike window, the events so far and the first step of each kind."""
        return {"spike": self._spike.state_dict(), "events": [e.to_dict() for e in self.events],
                "first_step": dict(self.first_step), "stopped_by": self.stopped_by.to_dict() if self.stopped_by else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._spike.load_state_dict(state["spike"])
        self.events = [_event(e) for e in state["events"]]
        self.first_step = dict(state["first_step"])
        self.stopped_by = _event(state["stopped_by"]) if state.get("stopped_by") else None
        self._count_tagged = len(self.events)


def _event(record: Mapping[str, Any]) -> AnomalyEvent:
    """An event back from :meth:`AnomalyEvent.to_dict` (``"nan"``/``"inf"`` strings become floats)."""
    return AnomalyEvent(**{k: (float(v) if k in ("value", "threshold") else v) for k, v in record.items()})
