"""Training anomalies: detectors as pure logic over series, and a loop hook that acts on them.

Detectors (each fed one value at a time; ``check`` returns an :class:`AnomalyEvent` or None):

- :class:`NonFiniteLoss`: the loss is NaN or inf.
- :class:`LossSpike`: a robust z-score of the loss against the median and MAD of the previous
  ``window`` finite losses exceeds ``zscore`` (only once ``window`` losses have been seen).
- :class:`ExplodingGradient`: the global gradient norm is above ``max_norm``, or not finite.
- :class:`Plateau`: ``patience`` evaluations in a row without improving on the best value.

The ``detect_*`` functions run a detector over a whole series (steps 1..n), for tests and for
offline analysis of a logged history.

:class:`AnomalyMonitor` is a :class:`ml.train.loop.LoopHooks` built from :class:`ml.config.AnomalyConfig`:
it runs the step detectors after every step and the plateau detector after every epoch, keeps
every event, tags the run (``anomaly.<kind>`` = first step, ``anomalies`` = count), warns on the
console at most once per kind per epoch, sets ``state.stop`` when ``action == "stop"``, and at
:meth:`AnomalyMonitor.close` logs all events as the JSON-lines artifact ``events/anomalies.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ml.errors import ConfigError

if TYPE_CHECKING:
    from ml.config import AnomalyConfig
    from ml.train.loop import LoopState
    from ml.tracking.base import Tracker

_logger = logging.getLogger(__name__)

NONFINITE_LOSS = "nonfinite_loss"
LOSS_SPIKE = "loss_spike"
EXPLODING_GRADIENT = "exploding_gradient"
PLATEAU = "plateau"
KINDS = (NONFINITE_LOSS, LOSS_SPIKE, EXPLODING_GRADIENT, PLATEAU)

EVENTS_ARTIFACT = "events/anomalies.jsonl"
# Scale of the MAD that makes it estimate the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
# Same, for the mean absolute deviation (sqrt(pi / 2)); the fallback when the MAD is 0.
MEAN_AD_TO_SIGMA = 1.2533


@dataclass(frozen=True)
class AnomalyEvent:
    """One anomaly. ``epoch`` is 1-based, as in ``LoopState.history``: the epoch the step belongs
    to, or the epoch just evaluated. ``value`` and ``threshold`` depend on the kind: the loss and
    NaN/inf, z-score and the z-score limit, the gradient norm and ``max_norm``, or for a plateau the
    latest metric value and the best one."""

    kind: str
    step: int
    epoch: int
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def robust_zscore(value: float, window: Iterable[float], min_relative_scale: float = 0.01) -> float:
    """``(value - median) / scale`` over ``window``, with ``scale = 1.4826 * MAD``.

    When the MAD is 0 (more than half the window is one value) the scale falls back to
    ``1.2533 * mean absolute deviation``; it never goes below ``min_relative_scale * |median|``
    (and a tiny absolute floor), so a constant series is not flagged for rounding-level wobble but
    is flagged for a jump of more than ``zscore * min_relative_scale`` of its level.
    """
    values = list(window)
    if not values:
        raise ValueError("window: expected at least one value")
    median = statistics.median(values)
    deviations = [abs(v - median) for v in values]
    scale = MAD_TO_SIGMA * statistics.median(deviations)
    if scale == 0:
        scale = MEAN_AD_TO_SIGMA * (sum(deviations) / len(deviations))
    scale = max(scale, min_relative_scale * abs(median), 1e-12)
    return (value - median) / scale


class NonFiniteLoss:
    """Flags a NaN or infinite loss."""

    kind = NONFINITE_LOSS

    def check(self, loss: float, step: int, epoch: int = 0) -> AnomalyEvent | None:
        if math.isfinite(loss):
            return None
        return AnomalyEvent(self.kind, step, epoch, loss, math.nan, f"loss is {loss} at step {step}")


class LossSpike:
    """Flags a loss whose robust z-score against the previous ``window`` finite losses exceeds
    ``zscore`` (see :func:`robust_zscore`). Quiet until ``window`` losses have been seen. Every
    finite loss, spikes included, joins the window afterwards, so a lasting level shift stops being
    flagged once it holds the window's median; non-finite losses are skipped."""

    kind = LOSS_SPIKE

    def __init__(self, window: int, zscore: float, min_relative_scale: float = 0.01) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected an integer >= 1, got {window!r}")
        if not zscore > 0:
            raise ValueError(f"zscore: expected a number > 0, got {zscore!r}")
        self.window, self.zscore, self.min_relative_scale = window, zscore, min_relative_scale
        self._losses: deque[float] = deque(maxlen=window)

    def check(self, loss: float, step: int, epoch: int = 0) -> AnomalyEvent | None:
        if not math.isfinite(loss):
            return None
        event = None
        if len(self._losses) == self.window:
            z = robust_zscore(loss, self._losses, self.min_relative_scale)
            if z > self.zscore:
                event = AnomalyEvent(self.kind, step, epoch, z, self.zscore,
                                     f"loss {loss:.6g} at step {step} is {z:.1f} robust standard deviations above "
                                     f"the median {statistics.median(self._losses):.6g} of the last {self.window} "
                                     f"steps (limit {self.zscore:g})")
        self._losses.append(loss)
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self._losses)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._losses = deque(state["losses"], maxlen=self.window)


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


class Plateau:
    """Flags ``patience`` evaluations in a row that did not improve on the best value (``mode`` "min":
    strictly lower is better, "max": strictly higher). Fires once per plateau: an improvement ends
    it, and a new run of ``patience`` evaluations without one fires again. A NaN value is no
    improvement."""

    kind = PLATEAU

    def __init__(self, patience: int, mode: str, metric: str = "metric") -> None:
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience: expected an integer >= 1, got {patience!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode: expected one of min, max, got {mode!r}")
        self.patience, self.mode, self.metric = patience, mode, metric
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.since_best = 0

    def is_improvement(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def check(self, value: float, step: int, epoch: int = 0) -> AnomalyEvent | None:
        if self.is_improvement(value):
            self.best, self.best_epoch, self.since_best = value, epoch, 0
            return None
        self.since_best += 1
        if self.since_best != self.patience:
            return None
        best = math.nan if self.best is None else self.best
        return AnomalyEvent(self.kind, step, epoch, value, best,
                            f"{self.metric} has not improved on {best:.6g} (epoch {self.best_epoch}) for "
                            f"{self.patience} evaluations; latest {value:.6g}")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "since_best": self.since_best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch, self.since_best = state["best"], state["best_epoch"], state["since_best"]


def _scan(detector: Any, values: Iterable[float]) -> list[AnomalyEvent]:
    events = (detector.check(float(v), step) for step, v in enumerate(values, start=1))
    return [e for e in events if e is not None]


def detect_nonfinite_losses(losses: Iterable[float]) -> list[AnomalyEvent]:
    """Events for the NaN/inf entries of ``losses`` (steps numbered from 1)."""
    return _scan(NonFiniteLoss(), losses)


def detect_loss_spikes(losses: Iterable[float], window: int, zscore: float) -> list[AnomalyEvent]:
    """Events for the spikes of ``losses`` (steps numbered from 1); see :class:`LossSpike`."""
    return _scan(LossSpike(window, zscore), losses)


def detect_exploding_gradients(norms: Iterable[float], max_norm: float | None) -> list[AnomalyEvent]:
    """Events for the gradient norms above ``max_norm`` or not finite (steps numbered from 1)."""
    return _scan(ExplodingGradient(max_norm), norms)


def detect_plateaus(values: Iterable[float], patience: int, mode: str) -> list[AnomalyEvent]:
    """Events for the plateaus of an evaluated metric (evaluations numbered from 1)."""
    return _scan(Plateau(patience, mode), values)


class AnomalyMonitor:
    """A :class:`ml.train.loop.LoopHooks` that watches the loss, the gradient norm and a validation metric.

    Args:
        cfg: What counts as an anomaly and what to do (``action``: ``"warn"`` or ``"stop"``).
        tracker: Receives the tags as events happen and the events artifact at :meth:`close`.
        grad_norm: Called after each step for the global gradient norm (None: not available that
            step), e.g. ``lambda: ml.observe.histograms.grad_norm(model)``; without it, no gradient check.
        logger: Where console warnings go.

    Tags: ``anomaly.<kind>`` is set to the first step of that kind when it happens; ``anomalies``
    (the event count) is set with it, refreshed at each epoch end when it changed, and at close
    (``0`` when nothing happened). With ``action == "stop"`` the first event sets ``state.stop``
    and ``state.stop_reason``, and the tag ``anomaly.stopped`` names it.
    """

    def __init__(self, cfg: AnomalyConfig, tracker: Tracker | None = None, *,
                 grad_norm: Callable[[], float | None] | None = None,
                 logger: logging.Logger | None = None) -> None:
        if cfg.action not in ("warn", "stop"):
            raise ValueError(f"action: expected one of warn, stop, got {cfg.action!r}")
        self.cfg = cfg
        self.tracker = tracker
        self.grad_norm = grad_norm
        self.logger = logger or _logger
        self.events: list[AnomalyEvent] = []
        self.first_step: dict[str, int] = {}
        self.stopped_by: AnomalyEvent | None = None
        self._nonfinite = NonFiniteLoss()
        self._spike = LossSpike(cfg.loss_spike_window, cfg.loss_spike_zscore)
        self._gradient = ExplodingGradient(cfg.max_grad_norm)
        self._plateau = (Plateau(cfg.patience, cfg.patience_mode, cfg.patience_metric)
                         if cfg.patience is not None else None)
        self._warned: set[tuple[str, int]] = set()
        self._suppressed: dict[str, int] = {}
        self._count_tagged = 0
        self._closed = False

    # --- LoopHooks ---------------------------------------------------------------------------------

    def on_step_end(self, state: LoopState, loss: float) -> None:
        epoch = state.epoch + 1  # the epoch in progress, numbered as history numbers it once done
        step = state.global_step
        loss = float(loss)
        event = self._nonfinite.check(loss, step, epoch) or self._spike.check(loss, step, epoch)
        if event is not None:
            self._record(event, state)
        if self.grad_norm is not None:
            norm = self.grad_norm()
            if norm is not None:
                event = self._gradient.check(float(norm), step, epoch)
                if event is not None:
                    self._record(event, state)

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        if self._plateau is not None:
            if self.cfg.patience_metric not in metrics:
                raise ConfigError(f"anomaly.patience_metric: expected one of {', '.join(sorted(metrics))}, "
                                  f"got {self.cfg.patience_metric!r}")
            event = self._plateau.check(float(metrics[self.cfg.patience_metric]), state.global_step, state.epoch)
            if event is not None:
                self._record(event, state)
        self._tag_count()

    # --- events ------------------------------------------------------------------------------------

    def _record(self, event: AnomalyEvent, state: LoopState) -> None:
        self.events.append(event)
        if event.kind not in self.first_step:
            self.first_step[event.kind] = event.step
            self._set_tags({f"anomaly.{event.kind}": event.step, "anomalies": len(self.events)})
            self._count_tagged = len(self.events)
        self._warn(event)
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
        """Detector state and events, for a training checkpoint's ``extra`` (resume continues the window)."""
        return {"spike": self._spike.state_dict(),
                "plateau": self._plateau.state_dict() if self._plateau is not None else None,
                "events": [e.to_dict() for e in self.events], "first_step": dict(self.first_step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._spike.load_state_dict(state["spike"])
        if self._plateau is not None and state.get("plateau") is not None:
            self._plateau.load_state_dict(state["plateau"])
        self.events = [AnomalyEvent(**{k: (float(v) if k in ("value", "threshold") else v) for k, v in e.items()})
                       for e in state["events"]]
        self.first_step = dict(state["first_step"])
        self._count_tagged = len(self.events)
