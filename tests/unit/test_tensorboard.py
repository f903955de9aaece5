"""TensorBoard while training: the scalars reach the event file during the run (read back with
TensorBoard's EventAccumulator while fit() is still going), they are the numbers the loop logged,
histograms share the one writer, and the train stage's observers log the directory at the end."""

import time
from types import SimpleNamespace

import pytest
import torch

from ml.config import load_params
from ml.observe.observers import Observers
from ml.observe.tensorboard import SharedWriterHistograms, TrainingScalars, open_writer
from ml.settings import TrackingConfig
from ml.tracking.base import NullTracker
from ml.train.loop import Callback, fit
from tests.conftest import REPO

SCALARS = {"train/loss", "train/grad_norm", "train/lr", "train/samples_per_s", "memory/rss_mb",
           "epoch/train_loss", "epoch/train_accuracy", "epoch/val_loss", "epoch/val_accuracy"}
STEPS_PER_EPOCH = 4  # 64 rows, batch 16


class MetricsTracker(NullTracker):
    """Keeps what the loop logs, and the artifacts it is given."""

    run_id = "run-tb"

    def __init__(self):
        self.metrics, self.artifacts = {}, []

    def log_metric(self, key, value, step):
        self.metrics.setdefault(key, {})[step] = value

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))


def events_of(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(events, tag):
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


class WaitForLiveScalars(Callback):
    """At the end of the first epoch, waits (up to a deadline) until the event file on disk holds
    that epoch's step losses: what `tensorboard --logdir` would show now, without a flush or close."""

    def __init__(self, logdir):
        self.logdir, self.seen = logdir, None

    def on_epoch_end(self, state, metrics):
        if state.epoch != 1:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            steps = scalar_steps(events_of(self.logdir), "train/loss")
            if len(steps) >= STEPS_PER_EPOCH:
                self.seen = steps
                return
            time.sleep(0.2)
        self.seen = scalar_steps(events_of(self.logdir), "train/loss")


def data(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=generator)
    return x, (x[:, 0] > 0).long()


def run_fit(hooks, tracker, epochs=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    built = hooks(model, optimizer)
    fit(model, optimizer, data(1), data(2), epochs=epochs, batch_size=16, generator=torch.Generator().manual_seed(0),
        tracker=tracker, hooks=built, log_every_steps=2, scheduler=scheduler)
    return model


def test_scalars_are_on_disk_while_training_and_match_the_loop(tmp_path):
    logdir = tmp_path / "tb"
    writer = open_writer(logdir, flush_secs=0.5)
    tracker, probe = MetricsTracker(), WaitForLiveScalars(logdir)

    made = {}

    def hooks(model, optimizer):
        made["histograms"] = SharedWriterHistograms(writer, model, logdir, 3)
        return [made["histograms"], TrainingScalars(writer, optimizer), probe]

    run_fit(hooks, tracker)
    assert probe.seen == list(range(1, STEPS_PER_EPOCH + 1))   # live: before any close()
    made["histograms"].close()                                # closes the shared writer
    events = events_of(logdir)
    assert SCALARS <= set(events.Tags()["scalars"])
    assert "weights/0.weight" in events.Tags()["histograms"]
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1   # one writer, one stream
    for tag in ("train/loss", "train/grad_norm", "train/lr"):
        logged = tracker.metrics[tag]
        assert {e.step: e.value for e in events.Scalars(tag)} == pytest.approx(logged, rel=1e-6), tag
    assert [e.step for e in events.Scalars("epoch/val_accuracy")] == [1, 2, 3]
    assert all(e.value > 0 for e in events.Scalars("train/samples_per_s"))
    assert len(events.Scalars("train/samples_per_s")) == 3 * STEPS_PER_EPOCH
    assert all(e.value > 1 for e in events.Scalars("memory/rss_mb"))


def test_observers_log_the_tensorboard_directory_and_remove_it(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what gettempdir() returns
    params = load_params(REPO / "params.yaml")
    tracker = MetricsTracker()
    for every in (2, None):
        observers = Observers(params, tracker, SimpleNamespace(classes=("a", "b")),
                              TrackingConfig(histogram_every_steps=every, progress="off"))
        tracker.artifacts.clear()
        splits = SimpleNamespace(x_train=None, y_train=torch.zeros(64), x_val=None, y_val=None)
        run_fit(lambda m, o: observers.hooks(m, o, splits), tracker, epochs=1)
        logdir = observers.tensorboard_dir
        assert logdir == tmp_path / "mlops-tensorboard" / "run-tb"
        observers.close()
        logged = {(p.split("/")[-1].split(".")[0], a) for p, a in tracker.artifacts}
        assert ("events", "histograms") in logged, every
        assert (("histograms", "histograms") in logged) == (every is not None)
        assert not logdir.exists()


def test_the_tensorboard_directory_is_a_setting(tmp_path):
    params = load_params(REPO / "params.yaml")
    tracker = MetricsTracker()
    observers = Observers(params, tracker, SimpleNamespace(classes=("a", "b")),
                          TrackingConfig(histogram_every_steps=None, progress="off",
                                         tensorboard_dir=str(tmp_path / "tb")))
    splits = SimpleNamespace(x_train=None, y_train=torch.zeros(64), x_val=None, y_val=None)
    run_fit(lambda m, o: observers.hooks(m, o, splits), tracker, epochs=1)
    assert observers.tensorboard_dir == tmp_path / "tb" / "run-tb"
    assert list(observers.tensorboard_dir.glob("events.out.tfevents.*"))
    observers.close()
