"""MetricBuffer (ordering, chunking, outage spooling, replay, close) and SystemMetricsSampler."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from ml.tracking.buffer import (
    BufferCounters,
    MetricBuffer,
    MetricRecord,
    install_signal_flush,
    mlflow_batch_sender,
)
from ml.tracking.system import SystemMetricsSampler


class FakeStore:
    """A send_batch that records chunks; raises while ``down``, or once ``accept_only`` more were taken."""

    def __init__(self) -> None:
        self.chunks: list[list[MetricRecord]] = []
        self.down = False
        self.accept_only: int | None = None
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self, chunk) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.down:
            raise ConnectionError("store unreachable")
        if self.accept_only is not None:
            if self.accept_only == 0:
                raise ConnectionError("store unreachable again")
            self.accept_only -= 1
        self.chunks.append(list(chunk))

    @property
    def records(self) -> list[MetricRecord]:
        return [r for chunk in self.chunks for r in chunk]


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def log_steps(buffer: MetricBuffer, steps, keys=("loss", "acc")) -> list[tuple[str, float, int]]:
    logged = []
    for step in steps:
        for key in keys:
            value = step + (0.5 if key == "loss" else 0.25)
            buffer.log(key, value, step, timestamp_ms=1_000 + step)
            logged.append((key, value, step))
    return logged


def as_triples(records) -> list[tuple[str, float, int]]:
    return [(r.key, r.value, r.step) for r in records]


def spool_lines(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "metrics.jsonl"


def make_buffer(store, spool: Path, **kwargs) -> MetricBuffer:
    options = dict(flush_interval=0.02, max_batch=7, retry_interval=3600.0, register_atexit=False)
    options.update(kwargs)
    return MetricBuffer(store, spool, **options)


def test_close_delivers_every_point_in_order_in_bounded_chunks(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool)
    logged = log_steps(buffer, range(100), keys=("loss", "acc", "lr"))

    counters = buffer.close()

    assert as_triples(store.records) == logged
    assert all(1 <= len(chunk) <= 7 for chunk in store.chunks)
    assert counters == BufferCounters(sent=300)
    assert not spool.exists()


def test_timestamp_defaults_to_wall_clock_ms_and_values_become_float(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool)
    before = int(time.time() * 1000)
    buffer.log("loss", 3, 0)
    buffer.close()
    after = int(time.time() * 1000)

    (record,) = store.records
    assert before <= record.timestamp_ms <= after
    assert isinstance(record.value, float) and record.value == 3.0


def test_background_thread_ships_without_flush(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool)
    logged = log_steps(buffer, range(20))

    wait_until(lambda: len(store.records) == len(logged))

    assert store.threads == {"MetricBuffer"}
    assert as_triples(store.records) == logged
    buffer.close()


def test_a_full_batch_wakes_the_thread_before_the_interval(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool, flush_interval=3600.0, max_batch=10)
    log_steps(buffer, range(5))  # 10 points: one full batch

    wait_until(lambda: len(store.records) == 10)
    buffer.close()


def test_outage_spools_then_replays_everything_exactly_once_in_order(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool)
    logged = log_steps(buffer, range(10))
    buffer.flush()
    store.down = True
    logged += log_steps(buffer, range(10, 30))
    during = buffer.flush()

    assert during.spooled == 40 and during.spool_backlog == 40
    assert [line[3] for line in spool_lines(spool)][::2] == list(range(10, 30))

    store.down = False
    logged += log_steps(buffer, range(30, 40))
    counters = buffer.close()

    assert as_triples(store.records) == logged
    assert len(set(as_triples(store.records))) == len(logged)
    # Points logged after the store came back go direct, or behind the spool if the background
    # thread had not replayed it yet: either way each lands once, and all spooled ones are replayed.
    assert counters.spooled == counters.replayed >= 40
    assert counters.sent + counters.replayed == len(logged)
    assert (counters.spool_backlog, counters.unflushed, counters.dropped) == (0, 0, 0)
    assert spool.read_text() == ""
    assert all(len(chunk) <= 7 for chunk in store.chunks)


def test_points_queue_behind_the_spool_until_it_is_replayed(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool, retry_interval=3600.0)
    store.down = True
    logged = log_steps(buffer, range(5))
    buffer.flush()
    store.down = False
    calls_when_back = store.calls
    logged += log_steps(buffer, range(5, 10))

    # The retry is not due yet, so the background drain must put the new points behind the old ones.
    wait_until(lambda: buffer.counters().spooled == 20)
    assert store.calls == calls_when_back
    counters = buffer.close()

    assert as_triples(store.records) == logged
    assert counters.replayed == 20 and counters.sent == 0


def test_background_retry_replays_after_the_store_comes_back(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool, retry_interval=0.05)
    store.down = True
    logged = log_steps(buffer, range(10))
    buffer.flush()
    store.down = False

    # the replayed count grows before the spool's offset is made durable: wait for both
    wait_until(lambda: (buffer.counters().replayed, buffer.counters().spool_backlog) == (20, 0))
    buffer.close()
    assert as_triples(store.records) == logged


def test_replay_interrupted_half_way_sends_nothing_twice(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool, max_batch=10)
    store.down = True
    logged = log_steps(buffer, range(15))  # 30 points: three spool chunks of 10
    buffer.flush()
    store.down = False
    store.accept_only = 1
    partial = buffer.flush()
    assert partial.replayed == 10 and partial.spool_backlog == 20

    store.accept_only = None
    counters = buffer.close()

    assert as_triples(store.records) == logged
    assert counters.replayed == 30 and counters.spool_backlog == 0


def test_new_buffer_replays_a_leftover_spool_before_new_points(spool):
    dead = FakeStore()
    dead.down = True
    first = make_buffer(dead, spool)
    leftover = log_steps(first, range(8))
    assert first.close().spool_backlog == 16

    store = FakeStore()
    second = make_buffer(store, spool)
    fresh = log_steps(second, range(8, 12))
    counters = second.close()

    assert as_triples(store.records) == leftover + fresh
    assert counters.replayed == 16 and counters.spool_backlog == 0


def test_leftover_spool_with_torn_tail_and_replay_offset(spool):
    spool.parent.mkdir(parents=True)
    lines = [json.dumps(["loss", float(step), 1_000 + step, step]) + "\n" for step in range(6)]
    spool.write_text("".join(lines) + '["loss", 6.0, 10')
    # A crashed process had already replayed the first two lines.
    Path(str(spool) + ".offset").write_text(str(len(lines[0]) + len(lines[1])))

    store = FakeStore()
    buffer = make_buffer(store, spool)
    assert buffer.counters().spool_backlog == 4
    counters = buffer.close()

    assert [r.step for r in store.records] == [2, 3, 4, 5]
    assert counters.replayed == 4
    assert not Path(str(spool) + ".offset").exists()


def test_send_errors_never_reach_the_caller(spool, tmp_path):
    def always_broken(chunk):
        raise RuntimeError("boom")

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    buffer = make_buffer(always_broken, not_a_dir / "spool.jsonl")
    log_steps(buffer, range(10))
    buffer.flush()
    log_steps(buffer, range(10, 20))
    counters = buffer.close()

    assert counters.dropped == 40 and counters.sent == 0 and counters.spooled == 0


def test_close_is_idempotent_and_drains_points_logged_after_it(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool)
    log_steps(buffer, range(3))
    first = buffer.close()
    again = buffer.close()

    assert first == again == BufferCounters(sent=6)
    assert buffer.closed and not buffer._thread.is_alive()

    buffer.log("late", 1.0, 99)
    assert buffer.close() == BufferCounters(sent=7)
    assert store.records[-1].key == "late"


def test_max_batch_must_be_positive(spool):
    with pytest.raises(ValueError):
        MetricBuffer(FakeStore(), spool, max_batch=0, register_atexit=False)


def test_signal_flush_closes_the_buffer_then_chains_the_previous_handler(spool):
    store = FakeStore()
    buffer = make_buffer(store, spool, flush_interval=3600.0, max_batch=1000)
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append((signum, buffer.closed)))
    try:
        assert install_signal_flush(buffer, signals=(signal.SIGUSR1,))
        logged = log_steps(buffer, range(4))
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_until(lambda: seen)
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert seen == [(signal.SIGUSR1, True)]
    assert as_triples(store.records) == logged


def test_signal_flush_is_skipped_outside_the_main_thread(spool):
    buffer = make_buffer(FakeStore(), spool)
    result = []
    worker = threading.Thread(target=lambda: result.append(install_signal_flush(buffer, signals=(signal.SIGUSR2,))))
    worker.start()
    worker.join()
    buffer.close()

    assert result == [False]


def test_mlflow_batch_sender_builds_metric_entities():
    from mlflow.entities import Metric

    calls = []
    client = types.SimpleNamespace(log_batch=lambda run_id, metrics: calls.append((run_id, metrics)))
    send = mlflow_batch_sender(client, "run-1")
    send([MetricRecord("loss", 0.5, 1234, 7)])

    ((run_id, metrics),) = calls
    assert run_id == "run-1"
    assert [(m.key, m.value, m.timestamp, m.step) for m in metrics] == [("loss", 0.5, 1234, 7)]
    assert all(isinstance(m, Metric) for m in metrics)


HOST_KEYS = {"system/cpu_percent", "system/process_rss_mb", "system/memory_used_percent"}


def no_nvml(monkeypatch):
    fake = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", fake)


def test_sampler_logs_host_readings_with_steps_and_keeps_peaks(monkeypatch):
    no_nvml(monkeypatch)
    logged: list[tuple[str, float, int]] = []
    sampler = SystemMetricsSampler(lambda key, value, step: logged.append((key, value, step)), interval_s=0.01)
    sampler.start()
    wait_until(lambda: {step for _, _, step in logged} >= {0, 1, 2})
    sampler.stop()
    sampler.stop()

    assert HOST_KEYS <= {key for key, _, _ in logged}
    peaks = sampler.peaks()
    for key in HOST_KEYS:
        peak_key = "system/peak/" + key.removeprefix("system/")
        assert peaks[peak_key] == max(value for k, value, _ in logged if k == key)
    assert not any("gpu" in key for key, _, _ in logged)


def test_sampler_reports_missing_nvml_once_and_survives_a_failing_log(monkeypatch, caplog):
    no_nvml(monkeypatch)

    failed_steps: set[int] = set()
    sampled_again = threading.Event()

    def broken_log(key, value, step):
        failed_steps.add(step)
        if len(failed_steps) >= 3:  # the sampler went on after two failed samples
            sampled_again.set()
        raise RuntimeError("sink gone")

    with caplog.at_level(logging.INFO, logger="ml.tracking.system"):
        sampler = SystemMetricsSampler(broken_log, interval_s=0.01)
        sampler.start()
        assert sampled_again.wait(timeout=30), f"the sampler stopped after samples {sorted(failed_steps)}"
        assert sampler._thread.is_alive()
        sampler.stop()

    messages = [r.getMessage() for r in caplog.records]
    assert sum("NVML unavailable" in m for m in messages) == 1
    assert sum("logging a system metric failed" in m for m in messages) == 1


def test_sampler_reads_gpus_through_nvml_and_skips_unsupported_readings(monkeypatch, caplog):
    fake = types.ModuleType("pynvml")
    fake.NVML_TEMPERATURE_GPU = 0
    fake.shutdown_calls = 0
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    utilization = iter([30, 70, 90, 10] * 10)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=next(utilization))
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2_000_000 * (h + 1))
    fake.nvmlDeviceGetTemperature = lambda h, sensor: 60 + h

    def power(handle):
        if handle == 1:
            raise RuntimeError("Not Supported")
        return 250_000

    fake.nvmlDeviceGetPowerUsage = power

    def shutdown():
        fake.shutdown_calls += 1

    fake.nvmlShutdown = shutdown
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    sampler = SystemMetricsSampler(lambda *a: None, interval_s=3600.0)
    with caplog.at_level(logging.INFO, logger="ml.tracking.system"):
        sampler.start()
        first = sampler.sample()
        second = sampler.sample()
        sampler.stop()

    assert first["system/gpu0/power_w"] == 250.0
    assert first["system/gpu1/memory_used_mb"] == 4.0
    assert first["system/gpu1/temperature_c"] == 61.0
    assert "system/gpu1/power_w" not in first and "system/gpu1/power_w" not in second
    assert sum("gpu1/power_w" in r.getMessage() for r in caplog.records) == 1
    assert sampler.peaks()["system/peak/gpu0/utilization_percent"] == 90.0
    assert sampler.peaks()["system/peak/gpu1/utilization_percent"] == 70.0
    assert fake.shutdown_calls == 1
